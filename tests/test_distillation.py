"""Pooled distillation (``--distill-weight``): pass 2's input, the projected summary tokens, is pulled toward
the base's own pool@K visual tokens. The loss is scale-free, teaches only the compressor, and on its own
trains pass 1 (summary tokens, pass-1 adapter) and the projection while pass 2's adapter is left alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fwd2bot_index.training import TrainConfig, Trainer, TrainingError
from fwd2bot_index.training.losses import pooled_distillation, weighted_loss
from fwd2bot_index.training.nested import nested_losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, write_shape_pairs) -> Path:
    return write_shape_pairs(tmp_path_factory.mktemp("distill-pairs"), COLORS)


def test_the_loss_is_zero_at_the_target_one_at_the_mean_and_never_moves_the_target():
    torch.manual_seed(0)
    pooled = torch.randn(6, 4, 8) * 50 + 3  # any hidden scale: the loss is relative to the target's variance
    assert float(pooled_distillation(pooled.clone(), pooled)) == pytest.approx(0.0, abs=1e-9)
    mean = pooled.mean(dim=(0, 1), keepdim=True).expand_as(pooled)
    assert float(pooled_distillation(mean, pooled)) == pytest.approx(1.0, rel=1e-5)
    projected = torch.zeros_like(pooled, requires_grad=True)
    target = pooled.clone().requires_grad_(True)
    pooled_distillation(projected, target).backward()
    assert projected.grad is not None and projected.grad.abs().sum() > 0
    assert target.grad is None  # detached: the visual tokens are a teacher, not a student


def test_weighted_loss_sums_only_the_parts_present():
    config = TrainConfig(contrastive_weight=2.0, autoregressive_weight=0.5, distill_weight=3.0)
    parts = {"contrastive": torch.tensor(1.0), "distill": torch.tensor(0.25), "contrastive@4": torch.tensor(9.0)}
    assert float(weighted_loss(parts, config)) == pytest.approx(2.0 + 0.75)
    parts["autoregressive"] = torch.tensor(2.0)
    assert float(weighted_loss(parts, config)) == pytest.approx(2.0 + 0.75 + 1.0)


def test_nested_distillation_is_the_mean_over_budgets():
    summary = torch.randn(3, 8, 5)
    seen = []

    def distill(s):
        seen.append(s.shape[1])
        return s.pow(2).mean()

    parts = nested_losses(summary, [2, 4, 8], step=1, seed=0, distill=distill)
    assert seen == [2, 4, 8]
    want = torch.stack([summary[:, :k].pow(2).mean() for k in (2, 4, 8)]).mean()
    torch.testing.assert_close(parts["distill"], want)


def test_settings_refuse_a_negative_weight_and_accept_distillation_alone():
    with pytest.raises(TrainingError, match="distill_weight must be 0 or more"):
        TrainConfig(model="m", data=["d"], distill_weight=-1).validate()
    with pytest.raises(TrainingError, match="all 0: nothing to learn"):
        TrainConfig(model="m", data=["d"], contrastive_weight=0, autoregressive_weight=0).validate()
    TrainConfig(model="m", data=["d"], contrastive_weight=0, autoregressive_weight=0, distill_weight=1).validate()
    assert TrainConfig.from_cli_args(None, distill_weight=0.5).distill_weight == 0.5


def test_distillation_alone_trains_pass_one_toward_the_pooled_tokens(tiny_llava_dir, pairs, tmp_path):
    config = TrainConfig(model=str(tiny_llava_dir), data=[str(pairs)], output_dir=str(tmp_path / "run"),
                         num_summary_tokens=4, embed_dim=16, lora_r=8, lr=3e-3, batch_size=8, max_steps=30,
                         eval_split="none", seed=0, contrastive_weight=0.0, autoregressive_weight=0.0,
                         distill_weight=1.0)
    trainer = Trainer(config, progress=False)
    model = trainer.model
    watched = {"summary_tokens": model.compressor.summary_tokens, "pass2_projection": model.compressor.pass2_projection.weight}
    watched.update({n: p for n, p in model.backbone.hf.named_parameters() if ".pass1." in n and "lora_B" in n})
    pass2 = {n: p.detach().clone() for n, p in model.backbone.hf.named_parameters() if ".pass2." in n}
    before = {k: p.detach().clone() for k, p in watched.items()}
    trainer.train()
    for name, p in watched.items():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not learn from the distillation"
    for name, p in model.backbone.hf.named_parameters():
        if name in pass2:  # pass 2 never ran: its adapter has nothing to learn from this loss
            assert torch.equal(p.detach(), pass2[name]), name
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["distill"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 30 and "autoregressive" not in rows[0]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses



def test_the_fade_keeps_the_weight_then_falls_linearly_to_zero():
    from fwd2bot_index.training.losses import distill_scale

    steady = TrainConfig(distill_weight=2.0)
    assert [distill_scale(steady, s, 100) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    fading = TrainConfig(distill_weight=2.0, distill_fade_from=0.6)
    assert distill_scale(fading, 59, 100) == 1.0 and distill_scale(fading, 60, 100) == 1.0
    assert 0.0 < distill_scale(fading, 61, 100) < 1.0
    assert distill_scale(fading, 99, 100) == 0.0  # the last step trained (0-based) is without it
    whole = TrainConfig(distill_weight=2.0, distill_fade_from=0.0)  # 11 steps, 0 .. 10
    assert [distill_scale(whole, s, 11) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert distill_scale(fading, None, None) == 1.0  # outside a run (no step known): the plain weight
    parts = {"contrastive": torch.tensor(1.0), "distill": torch.tensor(0.5)}
    assert float(weighted_loss(parts, whole, 5, 11)) == pytest.approx(1.0 + 2.0 * 0.5 * 0.5)


def test_settings_refuse_a_fade_outside_training_and_an_unknown_layout():
    with pytest.raises(TrainingError, match="distill_fade_from is a share of training"):
        TrainConfig(model="m", data=["d"], distill_fade_from=1.5).validate()
    with pytest.raises(TrainingError, match="distill_layout 'zigzag'"):
        TrainConfig(model="m", data=["d"], distill_layout="zigzag").validate()
    cfg = TrainConfig.from_cli_args(None, distill_fade_from=0.4, distill_layout="coarse-to-fine")
    assert (cfg.distill_fade_from, cfg.distill_layout) == (0.4, "coarse-to-fine")


def _cell_patches(weights: torch.Tensor) -> set[int]:
    return set(torch.nonzero(weights > 0).flatten().tolist())


def test_coarse_to_fine_orders_give_every_token_nested_regions_on_a_grid():
    from fwd2bot_index.model.pooling import pool_visual_tokens
    from fwd2bot_index.training.nested import coarse_to_fine_orders

    identity = torch.eye(64).unsqueeze(0)
    cells = {k: pool_visual_tokens(identity, k)[0] for k in (4, 8, 16, 32)}
    orders = coarse_to_fine_orders(cells)
    assert list(orders[4]) == [0, 1, 2, 3]  # the smallest budget keeps reading order
    for k, order in orders.items():
        assert sorted(order.tolist()) == list(range(k))  # a permutation of the cells
    for small, large in ((4, 8), (8, 16), (16, 32)):
        for i in range(small):
            inner = _cell_patches(cells[large][orders[large][i]])
            outer = _cell_patches(cells[small][orders[small][i]])
            assert inner < outer, (small, large, i)
    # in reading order token 2 would be the bottom-left quadrant at 4 but a top-row cell at 16
    assert not _cell_patches(cells[16][2]) < _cell_patches(cells[4][2])


def test_the_fade_reaches_the_logged_loss_and_nested_targets_follow_the_layout(tiny_llava_dir, pairs, tmp_path):
    config = TrainConfig(model=str(tiny_llava_dir), data=[str(pairs)], output_dir=str(tmp_path / "run"),
                         num_summary_tokens=4, nested=[2, 4], embed_dim=16, lora_r=8, lr=1e-3, batch_size=4,
                         max_steps=4, eval_split="none", seed=0, contrastive_weight=0.0, autoregressive_weight=0.0,
                         distill_weight=1.0, distill_fade_from=0.0, distill_layout="coarse-to-fine")
    trainer = Trainer(config, progress=False)
    n = trainer.model.backbone.num_image_tokens
    orders = trainer._distill_orders(torch.zeros(1, n, 8))
    assert sorted(orders) == [2, 4] and sorted(orders[4].tolist()) == [0, 1, 2, 3]
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 4
    for r in train:  # logged after the step it trained on (0 .. 3): loss = distill x (1 - step / 3)
        assert r["loss"] == pytest.approx(r["distill"] * (1 - (r["step"] - 1) / 3), rel=1e-4, abs=1e-7), r


def test_a_distillation_the_model_cannot_do_is_refused_before_any_step(tiny_llava_dir, pairs, tmp_path):
    base = dict(model=str(tiny_llava_dir), data=[str(pairs)], embed_dim=16, lora_r=8, batch_size=4, max_steps=1,
                eval_split="none", seed=0, distill_weight=1.0)
    n = 16  # the tiny LLaVA's visual tokens
    with pytest.raises(TrainingError, match=f"give {n} visual tokens, fewer than the 32 summary tokens"):
        Trainer(TrainConfig(**base, output_dir=str(tmp_path / "a"), num_summary_tokens=32), progress=False)
    with pytest.raises(TrainingError, match="fewer than the 32 summary tokens"):
        Trainer(TrainConfig(**base, output_dir=str(tmp_path / "b"), num_summary_tokens=32, nested=[4, 32]),
                progress=False)
    with pytest.raises(TrainingError, match="coarse-to-fine orders the targets of nested budgets: add --nested"):
        Trainer(TrainConfig(**base, output_dir=str(tmp_path / "c"), num_summary_tokens=4,
                            distill_layout="coarse-to-fine"), progress=False)


def test_coarse_to_fine_without_distillation_is_refused_not_a_silent_no_op(tiny_llava_dir, pairs, tmp_path):
    config = TrainConfig(model=str(tiny_llava_dir), data=[str(pairs)], output_dir=str(tmp_path / "run"),
                         num_summary_tokens=4, nested=[2, 4], embed_dim=16, lora_r=8, batch_size=4, max_steps=1,
                         eval_split="none", seed=0, distill_weight=0.0, distill_layout="coarse-to-fine")
    with pytest.raises(TrainingError, match="coarse-to-fine orders distillation targets, but --distill-weight is 0") \
            as refused:
        Trainer(config, progress=False)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("change", [{"distill_weight": 2.0}, {"distill_fade_from": 0.5},
                                    {"distill_layout": "coarse-to-fine"}])
def test_a_resume_refuses_changed_distillation_targets(tiny_llava_dir, pairs, tmp_path, change):
    from fwd2bot_index.training import run_training

    settings = dict(model=str(tiny_llava_dir), data=[str(pairs)], output_dir=str(tmp_path / "run"),
                    num_summary_tokens=4, nested=[2, 4], embed_dim=16, lora_r=8, batch_size=4, max_steps=2,
                    checkpoint_every=1, eval_split="none", seed=0, distill_weight=1.0)
    run_training(TrainConfig(**settings), progress=False)
    (key, value), = change.items()
    with pytest.raises(TrainingError, match=rf"settings changed \({key}: "):
        Trainer(TrainConfig(**{**settings, key: value, "resume": True}), progress=False)


def test_a_run_saved_before_the_distillation_settings_existed_still_resumes(tiny_llava_dir, pairs, tmp_path):
    """Its saved settings lack the distillation keys: it ran with their defaults, which are no change."""
    from fwd2bot_index.training import run_training
    from fwd2bot_index.training.state import STATE_FILE, list_checkpoints

    settings = dict(model=str(tiny_llava_dir), data=[str(pairs)], output_dir=str(tmp_path / "run"),
                    num_summary_tokens=4, embed_dim=16, lora_r=8, batch_size=4, max_steps=2, checkpoint_every=1,
                    keep_checkpoints=0, eval_split="none", seed=0)
    run_training(TrainConfig(**settings), progress=False)
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    for checkpoint in checkpoints:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        old = {k: v for k, v in json.loads(state["config"]).items() if not k.startswith("distill_")}
        state["config"] = json.dumps(old)
        torch.save(state, checkpoint / STATE_FILE)
    assert checkpoints and Trainer(TrainConfig(**{**settings, "resume": True}), progress=False).step >= 1
