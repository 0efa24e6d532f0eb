"""Issue 23: model cards carry Hugging Face's YAML front matter (license, base_model, library_name,
pipeline_tag, tags, model-index eval results), rendered by one library function; every checkpoint
`f2b train` writes has it. Parsed back with a YAML parser, as the hub does."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app
from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
from fwd2bot_index.model_card import EvalResult, model_card_front_matter, with_front_matter
from fwd2bot_index.synthetic import write_demo_data


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---\n", 4)])


def test_front_matter_parses_with_every_field(tmp_path):
    results = [EvalResult("text-to-image-retrieval", "shapes world, held-out", "fwd2bot-demo-world", "recall@1",
                          40.1, metric_name="text->image R@1 (seen)", dataset_split="test"),
               EvalResult("visual-question-answering", "shapes world QA", "fwd2bot-demo-world", "exact_match", 43.5)]
    card = model_card_front_matter("demo", license="mit", base_model="llava-hf/llava-1.5-7b-hf",
                                   tags=["demo", "fwd2bot"], datasets=["nlphuji/flickr30k", str(tmp_path)],
                                   eval_results=results)
    meta = _front_matter(card)
    assert meta["license"] == "mit" and meta["library_name"] == "fwd2bot-index"
    assert meta["base_model"] == "llava-hf/llava-1.5-7b-hf" and meta["pipeline_tag"] == "image-text-to-text"
    assert "demo" in meta["tags"] and meta["tags"].count("fwd2bot") == 1
    assert meta["datasets"] == ["nlphuji/flickr30k"]  # a local folder is no hub dataset
    (entry,) = meta["model-index"]
    assert entry["name"] == "demo" and len(entry["results"]) == 2
    first = entry["results"][0]
    assert first["task"]["type"] == "text-to-image-retrieval" and first["dataset"]["split"] == "test"
    assert first["metrics"] == [{"type": "recall@1", "value": 40.1, "name": "text->image R@1 (seen)"}]
    local = _front_matter(model_card_front_matter("x", base_model=str(tmp_path)))
    assert "base_model" not in local and "model-index" not in local  # a path means nothing on the hub


def test_with_front_matter_replaces_an_old_block():
    once = with_front_matter("# Title\n\ntext\n", "m", license="mit")
    twice = with_front_matter(once, "m", license="apache-2.0")
    assert twice.count("---\n") == 2 and _front_matter(twice)["license"] == "apache-2.0"
    assert twice.endswith("# Title\n\ntext\n")


def test_f2b_train_writes_a_card_with_front_matter(tmp_path):
    model = save_tiny_llava(tmp_path / "tiny64", TinySpec(image_size=64), seed=0)
    write_demo_data(tmp_path / "world", n=24, seed=5)
    result = CliRunner().invoke(app, ["train", "--model", str(model), "--data", str(tmp_path / "world"), "-o",
                                      str(tmp_path / "run"), "-K", "4", "--embed-dim", "16", "--max-steps", "2",
                                      "--batch-size", "4", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    card = (Path(json.loads(result.stdout)["model_dir"]) / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "fwd2bot-index" and meta["license"] == "mit"
    assert meta["pipeline_tag"] == "image-text-to-text" and "fwd2bot" in meta["tags"]
    assert "base_model" not in meta  # trained from a local folder
    results = meta["model-index"][0]["results"]  # the held-out evaluation at the end of the run
    assert [r["metrics"][0]["name"] for r in results] == ["text->image R@1", "image->text R@1"]
    assert all(0.0 <= r["metrics"][0]["value"] <= 100.0 for r in results)
    assert "trained by fwd2bot-index" in card  # the card's own text follows the front matter
