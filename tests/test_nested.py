"""Nested budgets (issue 24), training and model: ``f2b train --nested`` trains the first k summary tokens
for every k of a set, the checkpoint records the set, a budget-k encode is the first k tokens of a K
encode, embeddings are recomputed from stored tokens by the head alone, and a resumed run is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fwd2bot_index.model import Fwd2Bot, Strategy, StrategyError
from fwd2bot_index.training import TrainConfig, Trainer, TrainingError, run_training
from fwd2bot_index.training.nested import ar_budget_at, nested_losses, parse_budgets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, write_shape_pairs) -> Path:
    return write_shape_pairs(tmp_path_factory.mktemp("nested-pairs"), COLORS)


def _config(base, pairs, out, **overrides) -> TrainConfig:
    settings = dict(model=str(base), data=[str(pairs)], output_dir=str(out), nested=[2, 4, 6], num_summary_tokens=6,
                    embed_dim=16, lora_r=4, lr=1e-3, batch_size=4, max_steps=4, eval_split="none", seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def nested_run(tiny_llava_dir, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("nested-run")
    return run_training(_config(tiny_llava_dir, pairs, out), progress=False)


@pytest.fixture(scope="module")
def nested_model(nested_run):
    return Fwd2Bot.from_pretrained(nested_run.model_dir, device="cpu", dtype="fp32")


def test_budgets_parse_and_bad_sets_are_refused_in_one_line():
    assert parse_budgets("4,8,16,32") == [4, 8, 16, 32] and parse_budgets(None) == []
    for bad, why in (("4,8,8", "strictly increasing"), ("8,4", "strictly increasing"), ("0,4", "at least 1"),
                     ("-4,8", "at least 1"), ("4,x", "whole numbers")):
        with pytest.raises(TrainingError, match=why) as err:
            parse_budgets(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(TrainingError, match="the largest budget is K, but -K is 16") as err:
        TrainConfig.from_cli_args(None, model="m", data="d", nested="4,8,32", num_summary_tokens=16)
    assert "\n" not in str(err.value)
    config = TrainConfig.from_cli_args(None, model="m", data="d", nested="4,8,32", num_summary_tokens=None)
    assert config.nested == [4, 8, 32] and config.num_summary_tokens == 32
    assert TrainConfig.from_dict({"model": "m", "data": ["d"], "nested": [2, 4]}).num_summary_tokens == 4
    with pytest.raises(TrainingError, match="objective 'fwd2bot'"):
        TrainConfig(model="m", data=["d"], objective="pretrain", nested=[2, 4], num_summary_tokens=4).validate()


def test_ar_budget_is_seeded_by_step_and_covers_the_set():
    budgets = [4, 8, 16, 32]
    draws = [ar_budget_at(budgets, 0, s) for s in range(200)]
    assert draws == [ar_budget_at(budgets, 0, s) for s in range(200)]  # a resume draws the same
    assert set(draws) == set(budgets)
    assert draws != [ar_budget_at(budgets, 1, s) for s in range(200)]


def test_nested_losses_truncate_for_both_losses():
    summary = torch.randn(3, 8, 5)
    seen = {"con": [], "ar": []}

    def con(s):
        seen["con"].append(s.shape[1])
        return s.pow(2).mean()

    def ar(s):
        seen["ar"].append(s.shape[1])
        return s.abs().mean()

    parts = nested_losses(summary, [2, 4, 8], step=5, seed=0, contrastive=con, autoregressive=ar)
    assert seen["con"] == [2, 4, 8] and seen["ar"] == [ar_budget_at([2, 4, 8], 0, 5)]
    want = torch.stack([summary[:, :k].pow(2).mean() for k in (2, 4, 8)]).mean()
    torch.testing.assert_close(parts["contrastive"], want)
    assert float(parts["ar_budget"]) == seen["ar"][0]
    assert {"contrastive@2", "contrastive@4", "contrastive@8"} <= set(parts)


def test_nested_run_records_its_budgets_and_logs_per_budget_losses(nested_run, nested_model):
    assert nested_model.config.nested_budgets == [2, 4, 6] and nested_model.config.num_summary_tokens == 6
    assert nested_model.budgets == [2, 4, 6]
    card = (Path(nested_run.model_dir) / "README.md").read_text()
    assert "nested budgets 2, 4, 6" in card
    rows = _rows(Path(nested_run.output_dir))
    assert all({"contrastive@2", "contrastive@4", "contrastive@6", "ar_budget"} <= set(r) for r in rows)
    assert [r["ar_budget"] for r in rows] == [ar_budget_at([2, 4, 6], 0, s) for s in range(len(rows))]


def test_budget_k_encode_is_the_first_k_of_a_full_encode(nested_model, images):
    full = nested_model.encode_images(images, strategy="fwd2bot")
    assert full.tokens.shape[1] == 6 and full.strategy == Strategy("fwd2bot", "fwd2bot", 6)
    for k in (2, 4):
        part = nested_model.encode_images(images, strategy=f"fwd2bot@{k}")
        assert part.tokens.shape == (len(images), k, full.tokens.shape[2]) and part.strategy.budget == k
        np.testing.assert_allclose(part.tokens, full.tokens[:, :k], rtol=1e-5, atol=1e-6)
        # the embedding at budget k is the head over the first k stored tokens: no image needed
        np.testing.assert_allclose(nested_model.embed_stored(full.tokens, k), part.embeddings, rtol=1e-5, atol=1e-6)
        assert not np.allclose(part.embeddings, full.embeddings, atol=1e-3)
    np.testing.assert_allclose(nested_model.embed_stored(full.tokens), full.embeddings, rtol=1e-5, atol=1e-6)


def test_budgets_outside_the_set_are_refused_in_one_line(nested_model, tiny_llava_dir, pairs, tmp_path, images):
    for k in (3, 8):
        with pytest.raises(StrategyError, match=r"trained for 2, 4, 6 summary tokens per image, not") as err:
            nested_model.resolve_strategy(f"fwd2bot@{k}")
        assert "\n" not in str(err.value)
    with pytest.raises(StrategyError, match="not 3"):
        nested_model.embed_stored(np.zeros((1, 6, nested_model.backbone.hidden_size), np.float32), 3)
    plain = run_training(_config(tiny_llava_dir, pairs, tmp_path / "plain", nested=None, max_steps=1), progress=False)
    model = Fwd2Bot.from_pretrained(plain.model_dir, device="cpu", dtype="fp32")
    assert model.config.nested_budgets == [] and model.budgets == [6]
    assert model.resolve_strategy("fwd2bot@6").budget == 6
    with pytest.raises(StrategyError, match="not trained with nested budgets") as err:
        model.resolve_strategy("fwd2bot@4")
    assert "\n" not in str(err.value)


def test_continuing_a_checkpoint_with_another_largest_budget_is_refused(nested_run, pairs, tmp_path):
    with pytest.raises(TrainingError, match="largest budget must be the compressor's K = 6"):
        Trainer(_config(nested_run.model_dir, pairs, tmp_path / "c", nested=[2, 8], num_summary_tokens=8),
                progress=False)


def test_nested_resume_is_exact(tiny_llava_dir, pairs, tmp_path):
    steps = dict(max_steps=6, batch_size=4, warmup_steps=1)
    straight = run_training(_config(tiny_llava_dir, pairs, tmp_path / "a", **steps), progress=False)
    expected = {r["step"]: r for r in _rows(tmp_path / "a")}

    config = _config(tiny_llava_dir, pairs, tmp_path / "b", **steps)
    first = Trainer(config, progress=False)  # three steps, a checkpoint, then the process "dies"
    first._open_logs()
    for _ in range(3):
        first._log({"kind": "train", **first.train_step()})
    first.save_checkpoint()
    del first
    resumed = run_training(TrainConfig.from_dict({**config.to_dict(), "resume": True}), progress=False)
    assert resumed.resumed_from.endswith("step-00000003") and resumed.steps == 6
    for row in _rows(tmp_path / "b"):
        want = expected[row["step"]]
        assert row["ar_budget"] == want["ar_budget"]
        for key in ("loss", "contrastive", "contrastive@2", "autoregressive"):
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (row["step"], key)
    a = load_file(str(Path(straight.model_dir) / "compressor.safetensors"))
    b = load_file(str(Path(resumed.model_dir) / "compressor.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
