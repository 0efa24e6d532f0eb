"""The shipped 7B training recipes (recipes/*.json) parse and validate as TrainConfig, without loading a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fwd2bot_index.training.config import TrainConfig, TrainingError

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FILES = sorted(RECIPES.glob("*.json"))


def test_both_recipes_are_shipped():
    assert [f.name for f in FILES] == ["llava15-7b.json", "qwen2vl-7b.json"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_recipe_parses_and_validates(path):
    config = TrainConfig.load(path)
    config.validate()
    assert config.objective == "fwd2bot" and config.num_summary_tokens == 32
    assert config.parts() == {"summary_tokens": True, "adapters": True, "heads": True, "projector": False,
                              "llm": False}  # the 7B base stays frozen
    assert config.data and config.image_root and config.bf16 and config.dtype == "fp32"
    # what recipes/README.md states: 8 per GPU x 4 accumulation x 8 GPUs = 256 per optimizer step
    assert config.batch_size * config.grad_accum * 8 == 256
    # the CLI's overrides apply on top of the file
    trial = TrainConfig.from_cli_args(path, max_steps=10, output_dir="trial")
    assert (trial.max_steps, trial.output_dir, trial.model) == (10, "trial", config.model)


def test_recipe_models_and_image_bounds():
    llava = TrainConfig.load(RECIPES / "llava15-7b.json")
    qwen = TrainConfig.load(RECIPES / "qwen2vl-7b.json")
    assert llava.model == "llava-hf/llava-1.5-7b-hf" and llava.schedule().is_staged
    assert llava.min_pixels is None and llava.max_pixels is None  # fixed 336 px: the bounds would be refused
    assert qwen.model == "Qwen/Qwen2-VL-7B-Instruct" and not qwen.schedule().is_staged
    assert (qwen.min_pixels, qwen.max_pixels) == (224 * 224, 448 * 448)  # 64 to 256 visual tokens (28 px each)


def test_a_broken_recipe_fails_with_the_file_and_setting(tmp_path):
    good = json.loads((RECIPES / "llava15-7b.json").read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**good, "lora_rank": 8}))
    with pytest.raises(TrainingError, match=r"bad\.json: unknown setting\(s\) lora_rank"):
        TrainConfig.load(bad)
    bad.write_text(json.dumps({**good, "grad_accum": 0}))
    with pytest.raises(TrainingError, match="grad_accum must be at least 1"):
        TrainConfig.load(bad).validate()
