"""The trainer on tiny random LLaVA models: learning, gradient flow, staged pooling, resume after SIGKILL,
unreadable images, base pretraining, settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fwd2bot_index.model import Fwd2Bot, pool_by_stride
from fwd2bot_index.training import (
    PoolSchedule,
    ScheduleError,
    TrainConfig,
    Trainer,
    TrainingError,
    pooled_token_count,
    read_dataset,
    run_training,
    stage_at,
)

REPO = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
          "purple": (140, 30, 160), "orange": (240, 140, 20), "white": (245, 245, 245), "black": (10, 10, 10)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, write_shape_pairs) -> Path:
    """16 images (8 colours x circle/square) with one distinct caption each, as a JSONL pairs file."""
    return write_shape_pairs(tmp_path_factory.mktemp("pairs"), COLORS)


def _config(tiny_llava_dir, pairs, out, **overrides) -> TrainConfig:
    settings = dict(model=str(tiny_llava_dir), data=[str(pairs)], output_dir=str(out), num_summary_tokens=4,
                    embed_dim=32, lora_r=8, lr=1e-3, batch_size=8, max_steps=8, eval_split="none", seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def _rows(out: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


def test_losses_fall_and_retrieval_beats_untrained(tiny_llava_dir, pairs, tmp_path):
    samples = read_dataset(pairs)
    config = _config(tiny_llava_dir, pairs, tmp_path / "run", max_steps=40)
    result = Trainer(config, progress=False, train_samples=samples, eval_samples=samples).train()
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 41)) and result.steps == 40
    # a random tiny LLM's final norm and LM head are frozen and small, which bounds how low the caption
    # loss can go with adapters alone (logit margins of ~2.5): it falls, but by about a tenth here
    for part, factor in (("contrastive", 0.7), ("autoregressive", 0.93)):
        first = np.mean([r[part] for r in rows[:4]])
        last = np.mean([r[part] for r in rows[-4:]])
        assert last < factor * first, (part, first, last)
    before, after = result.evals[0], result.evals[-1]
    assert before["step"] == 0 and after["step"] == 40
    assert after["r1_t2i"] >= before["r1_t2i"] + 0.25 and after["r1_i2t"] >= before["r1_i2t"] + 0.25
    assert after["caption_loss"] < before["caption_loss"]
    # the released checkpoint loads, is marked trained, and retrieves as well as the trainer measured
    model = Fwd2Bot.from_pretrained(result.model_dir, device="cpu", dtype="fp32")
    assert model.config.trained_steps == 40 and model.default_strategy.name == "fwd2bot"
    images = [Image.open(s.image).convert("RGB") for s in samples]
    img = model.encode_images(images)
    txt = model.encode_texts([s.captions[0] for s in samples])
    t2i = float(np.mean((txt @ img.embeddings.T).argmax(axis=1) == np.arange(len(samples))))
    assert t2i == pytest.approx(after["r1_t2i"], abs=1 / 16)


def _lora(model, adapter: str, kind: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.backbone.hf.named_parameters() if f"{kind}.{adapter}." in n]


def test_every_trained_part_gets_gradients_and_changes(tiny_llava_dir, pairs, tmp_path):
    trainer = Trainer(_config(tiny_llava_dir, pairs, tmp_path / "g"), progress=False)
    model = trainer.model
    comp = model.compressor
    watched = {"summary_tokens": comp.summary_tokens, "image_head": comp.image_head.weight,
               "text_head": comp.text_head.weight, "pass2_projection": comp.pass2_projection.weight,
               "temperature": comp.logit_scale}
    for adapter in ("pass1", "pass2"):
        for kind in ("lora_A", "lora_B"):
            params = _lora(model, adapter, kind)
            assert params, f"no {kind} parameters for {adapter}"
            watched.update({f"{adapter}.{kind}.{i}": p for i, p in enumerate(params)})
    frozen = {n: p.detach().clone() for n, p in model.backbone.hf.named_parameters()
              if "lora_" not in n and ("vision_tower" in n or "embed_tokens" in n or "layers.0.self_attn.q_proj" in n)}
    before = {k: p.detach().clone() for k, p in watched.items()}
    trainer.train_step()
    trainer.train_step()  # lora_A's gradient is zero while lora_B is still at its zero init: look at step 2
    for name, p in watched.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    for name, p in model.backbone.hf.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name]), f"frozen {name} changed"
            assert p.grad is None


def test_frozen_parts_stay_put(tiny_llava_dir, pairs, tmp_path):
    trainer = Trainer(_config(tiny_llava_dir, pairs, tmp_path / "f", train_adapters=False, train_summary_tokens=False),
                      progress=False)
    lora = {n: p.detach().clone() for n, p in trainer.model.backbone.hf.named_parameters() if "lora_" in n}
    tokens = trainer.model.compressor.summary_tokens.detach().clone()
    head = trainer.model.compressor.image_head.weight.detach().clone()
    trainer.train_step()
    assert all(torch.equal(p.detach(), lora[n]) for n, p in trainer.model.backbone.hf.named_parameters() if n in lora)
    assert torch.equal(trainer.model.compressor.summary_tokens.detach(), tokens)
    assert not torch.equal(trainer.model.compressor.image_head.weight.detach(), head)
    assert all(not name.startswith("hf.") for name, _ in trainer.named_params)


def test_llavolta_schedule_stages_and_token_counts():
    total = 100
    strides = [stage_at(s, total) for s in range(total)]
    assert strides[:25] == [8] * 25 and strides[25:75] == [2] * 50 and strides[75:] == [1] * 25
    assert stage_at(total - 1, total) == 1 and stage_at(0, 1) == 1  # a one-step run is uncompressed
    # LLaVolta's reference: stride s keeps N/s tokens; LLaVA-1.5 (576 tokens): 72, 288, 288, 576
    assert [pooled_token_count(576, s) for s in (8, 2, 2, 1)] == [72, 288, 288, 576]
    assert [pooled_token_count(16, s) for s in (8, 2, 1)] == [2, 8, 16]
    assert [pooled_token_count(64, s) for s in (8, 2, 1)] == [8, 32, 64]
    assert pooled_token_count(4, 8) == 1  # never below one token
    custom = PoolSchedule.parse("0.5:4,0.5:1")
    assert [custom.stage_at(s, 4) for s in range(4)] == [4, 4, 1, 1]
    with pytest.raises(ScheduleError, match="last stage must be uncompressed"):
        PoolSchedule.parse("0.5:4,0.5:2")
    with pytest.raises(ScheduleError, match="FRACTION:STRIDE"):
        PoolSchedule.parse("fast")


def test_staged_training_feeds_pooled_tokens_per_stage(tiny_llava_dir, pairs, tmp_path):
    config = _config(tiny_llava_dir, pairs, tmp_path / "s", pool_schedule="llavolta")
    trainer = Trainer(config, progress=False)
    visual = torch.zeros(1, trainer.model.backbone.num_image_tokens, 8)
    expected = [2, 2, 8, 8, 8, 8, 16, 16]  # 8 steps on a 4x4 grid: stride 8, 2, 2, 1 keep N/s tokens
    assert [pool_by_stride(visual, trainer.stride_at(s)).shape[1] for s in range(8)] == expected
    result = trainer.train()
    assert [r["visual_tokens"] for r in _rows(tmp_path / "s")] == expected
    assert result.last["pool_stride"] == 1


_CHILD = """
import json, sys, time
from fwd2bot_index.training import TrainConfig, run_training
config = TrainConfig.from_dict(json.loads(sys.argv[1]))
stop_at = int(sys.argv[2])
def hang(event):
    if event.kind == "step" and event.step == stop_at:
        time.sleep(600)  # a long run, killed here from outside
run_training(config, progress=False, callbacks=[hang])
"""


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_llava_dir, pairs, tmp_path):
    steps = dict(max_steps=8, checkpoint_every=3, batch_size=4, warmup_steps=2)
    straight = run_training(_config(tiny_llava_dir, pairs, tmp_path / "a", **steps), progress=False)
    expected = {r["step"]: r for r in _rows(tmp_path / "a")}

    out = tmp_path / "b"
    config = _config(tiny_llava_dir, pairs, out, **steps)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(config.to_dict()), "5"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((out / "metrics.jsonl").is_file() and any(r["step"] == 5 for r in _rows(out))):
            assert child.poll() is None, f"training child exited early:\n{child.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "training child made no progress"
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
    assert not (out / "model").exists()

    resumed = run_training(TrainConfig.from_dict({**config.to_dict(), "resume": True}), progress=False)
    assert resumed.resumed_from.endswith("step-00000003") and resumed.steps == straight.steps == 8
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))  # the killed run's steps 4-5 were redone, once
    for row in rows:
        want = expected[row["step"]]
        for key in ("loss", "contrastive", "autoregressive", "lr"):
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (row["step"], key)
    assert row["epoch"] == want["epoch"]
    a = load_file(str(Path(straight.model_dir) / "compressor.safetensors"))
    b = load_file(str(Path(resumed.model_dir) / "compressor.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert Fwd2Bot.from_pretrained(resumed.model_dir, device="cpu").config.trained_steps == 8


def test_resume_refuses_changed_settings_and_missing_checkpoint(tiny_llava_dir, pairs, tmp_path):
    run_training(_config(tiny_llava_dir, pairs, tmp_path / "r", max_steps=2, checkpoint_every=1), progress=False)
    with pytest.raises(TrainingError, match=r"settings changed \(batch_size: 8 -> 4\)"):
        Trainer(_config(tiny_llava_dir, pairs, tmp_path / "r", max_steps=2, batch_size=4, resume=True))
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        Trainer(_config(tiny_llava_dir, pairs, tmp_path / "empty", resume=True))


def test_unreadable_images_are_skipped_and_counted(tiny_llava_dir, pairs, tmp_path):
    rows = [json.loads(line) for line in pairs.read_text().splitlines()][:6]
    for row in rows:
        row["image"] = str(pairs.parent / row["image"])
    (tmp_path / "broken.png").write_bytes((pairs.parent / rows[0]["image"]).read_bytes()[:50])
    rows += [{"image": "gone.png", "caption": "a missing picture"}, {"image": "broken.png", "caption": "a broken one"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="skipped 2 unreadable image"):
        result = run_training(_config(tiny_llava_dir, data, tmp_path / "out", max_steps=3, batch_size=4),
                              progress=False)
    assert result.steps == 3
    assert result.skipped_images[str(tmp_path / "gone.png")] == "missing"
    assert result.skipped_images[str(tmp_path / "broken.png")].startswith("undecodable")


def test_no_readable_image_fails_clearly(tiny_llava_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) + "\n" for i in range(4)))
    with pytest.raises(TrainingError, match="no training image could be read: skipped 4"):
        run_training(_config(tiny_llava_dir, data, tmp_path / "out", max_steps=1, batch_size=2), progress=False)


def test_pretrain_objective_trains_base_and_saves_transformers_folder(tiny_llava_dir, pairs, tmp_path):
    config = _config(tiny_llava_dir, pairs, tmp_path / "p", objective="pretrain", max_steps=12, lr=3e-3,
                     eval_split="none")
    result = run_training(config, progress=False)
    rows = _rows(tmp_path / "p")
    assert np.mean([r["autoregressive"] for r in rows[-3:]]) < 0.8 * np.mean([r["autoregressive"] for r in rows[:3]])
    folder = Path(result.model_dir)
    assert (folder / "config.json").is_file() and not (folder / "fwd2bot_config.json").exists()
    model = Fwd2Bot.from_pretrained(str(folder), device="cpu", dtype="fp32")
    assert model.compressor is None
    base = load_file(str(tiny_llava_dir / "model.safetensors"))
    trained = load_file(str(folder / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert any("multi_modal_projector" in k for k in changed) and any("language_model" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)


def test_training_the_base_saves_a_self_contained_checkpoint(tiny_llava_dir, pairs, tmp_path):
    config = _config(tiny_llava_dir, pairs, tmp_path / "w", max_steps=2, train_projector=True, train_llm=True,
                     train_vision_tower=True)
    trainer = Trainer(config, progress=False)
    result = trainer.train()
    folder = Path(result.model_dir)
    assert (folder / "base" / "config.json").is_file()
    base = load_file(str(tiny_llava_dir / "model.safetensors"))
    trained = load_file(str(folder / "base" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in trained) and trained.keys() == base.keys()
    for part in ("vision_tower", "multi_modal_projector", "language_model", "lm_head"):
        assert any(part in k and not torch.equal(base[k], trained[k]) for k in base), f"{part} did not train"
    loaded = Fwd2Bot.from_pretrained(str(folder), device="cpu", dtype="fp32")
    images = [Image.open(p).convert("RGB") for p in sorted((pairs.parent / "images").glob("*.png"))[:3]]
    np.testing.assert_allclose(loaded.encode_images(images).embeddings,
                               trainer.model.encode_images(images).embeddings, atol=1e-5)


def test_settings_from_cli_and_validation(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps({"model": "m", "data": ["d.jsonl"], "lr": 0.01}))
    config = TrainConfig.from_cli_args(tmp_path / "base.json", lr=None, batch_size=4, data="other.jsonl",
                                       pool_schedule="llavolta")
    assert config.lr == 0.01 and config.batch_size == 4 and config.data == ["other.jsonl"]
    assert config.schedule().is_staged
    with pytest.raises(TrainingError, match="unknown setting"):
        TrainConfig.from_dict({"model": "m", "learning_rate": 1})
    bad = TrainConfig(model="m", data=["d"], batch_size=0, pool_schedule="0.5:2,0.5:4", objective="x")
    with pytest.raises(TrainingError) as err:
        bad.validate()
    assert "batch_size" in str(err.value) and "pool_schedule" in str(err.value) and "objective" in str(err.value)
    assert TrainConfig(objective="pretrain").parts() == {"summary_tokens": False, "adapters": False, "heads": False,
                                                         "projector": True, "llm": True}


def test_llavolta_pools_inside_the_llm_at_the_reference_layers():
    """LLaVolta's reference schedule: stride 8 before layer 2, stride 2 before layer 2, stride 2 before
    layer 16 of a 32-layer LLM, then none; on another depth the same fractions of it (rounded half up,
    not clamped); the layer-0 variant keeps the strides."""
    schedule = PoolSchedule.parse("llavolta")
    assert [(schedule.stage_at(s, 8), schedule.layer_at(s, 8)) for s in range(0, 8, 2)] == [(8, 2), (2, 2), (2, 16), (1, 0)]
    assert schedule.layers_for(32) == [2, 2, 16, 0] and schedule.layers_for(None) == [2, 2, 16, 0]
    assert schedule.layers_for(4) == [0, 0, 2, 0]  # the demo LLM: 6.25% of 4 layers is none, 50% is 2
    assert schedule.layers_for(40) == [3, 3, 20, 0] and schedule.layers_for(28) == [2, 2, 14, 0]
    assert [schedule.layer_at(s, 8, depth=4) for s in range(0, 8, 2)] == [0, 0, 2, 0]
    assert PoolSchedule.parse("0.5:4@3,0.5:1").layers_for(4) == [3, 0]  # explicit layers stay as written
    layer0 = PoolSchedule.parse("llavolta-layer0")
    assert [layer0.layer_at(s, 8) for s in range(8)] == [0] * 8
    assert PoolSchedule.parse("0.5:4@3,0.5:1").to_list() == [[0.5, 4, 3], [0.5, 1, 0]]
    with pytest.raises(ScheduleError, match="FRACTION:STRIDE"):
        PoolSchedule.parse("0.5:4@x,0.5:1")


def test_layer_pooling_matches_the_plain_decoder_and_averages_positions():
    from fwd2bot_index.model.layer_pool import pooled_positions, run_with_layer_pooling
    from fwd2bot_index.model.tiny import TinySpec, build_tiny_llava

    model, _ = build_tiny_llava(TinySpec(layers=3))
    decoder = model.model.language_model
    torch.manual_seed(0)
    x = torch.randn(2, 30, 64)
    ones = torch.ones(2, 30, dtype=torch.long)
    with torch.no_grad():
        plain = decoder(inputs_embeds=x, attention_mask=ones).last_hidden_state
        assert torch.allclose(run_with_layer_pooling(decoder, x, 5, 16, 1, 2), plain, atol=1e-6)  # stride 1: unchanged
        # stride 2 keeps 8 of the 16 visual tokens; positions of a pooled token are its members' mean
        assert run_with_layer_pooling(decoder, x, 5, 16, 2, 2).shape == (2, 30 - 8, 64)
        positions = pooled_positions(30, 5, 16, 2)
        assert positions[:5].tolist() == [0, 1, 2, 3, 4] and positions[5].item() == 5.5 and positions[-1].item() == 29
        # pooling before layer 0 is pooling the inputs, with the averaged positions
        pre = torch.cat([x[:, :5], pool_by_stride(x[:, 5:21], 2), x[:, 21:]], dim=1)
        direct = decoder(inputs_embeds=pre, attention_mask=torch.ones(2, 22, dtype=torch.long),
                         position_ids=positions.expand(2, -1)).last_hidden_state
        assert torch.allclose(run_with_layer_pooling(decoder, x, 5, 16, 2, 0), direct, atol=1e-6)
        # the deeper the pooling, the closer the kept positions stay to the unpooled run
        late, early = run_with_layer_pooling(decoder, x, 5, 16, 2, 2), run_with_layer_pooling(decoder, x, 5, 16, 2, 1)
        assert not torch.allclose(late, early)


def test_staged_compressor_training_pools_inside_the_llm(tiny_llava_dir, pairs, tmp_path):
    scaled = Trainer(_config(tiny_llava_dir, pairs, tmp_path / "s", pool_schedule="llavolta"), progress=False)
    # the tiny LLM has 2 layers: LLaVolta's fractions of depth put the first stages before the LLM
    assert [(scaled.stride_at(s), scaled.layer_at(s)) for s in (0, 2, 4, 7)] == [(8, 0), (2, 0), (2, 1), (1, 0)]
    config = _config(tiny_llava_dir, pairs, tmp_path / "l", pool_schedule="0.25:8@2,0.25:2@2,0.25:2@16,0.25:1")
    trainer = Trainer(config, progress=False)
    assert [(trainer.stride_at(s), trainer.layer_at(s)) for s in (0, 2, 4, 7)] == [(8, 2), (2, 2), (2, 16), (1, 0)]
    trainer.train()
    rows = _rows(tmp_path / "l")
    assert [r["pool_layer"] for r in rows][:2] == [2, 2] and rows[-1]["pool_layer"] == 0
