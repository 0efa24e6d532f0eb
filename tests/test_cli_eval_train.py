"""`f2b eval ...` and `f2b train` end to end on a tiny real model and official-format fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app
from fwd2bot_index.model import Fwd2Bot
from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
from fwd2bot_index.synthetic import write_demo_data

runner = CliRunner()
SUGARCREPE = Path(__file__).resolve().parent / "data" / "sugarcrepe"  # vendored sample of the official files


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    model = save_tiny_llava(root / "tiny64", TinySpec(image_size=64), seed=0)
    write_demo_data(root / "world", n=30, seed=5)
    rows = [json.loads(line) for line in (root / "world" / "captions.jsonl").read_text().splitlines()]
    karpathy = {"dataset": "flickr30k", "images": [
        {"filename": Path(r["image"]).name, "split": "test", "sentences": [{"raw": c} for c in r["captions"][:5]]}
        for r in rows[:12]]}
    (root / "karpathy.json").write_text(json.dumps(karpathy))
    return root, model


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_retrieval_on_model_and_on_collection_agree(setup, tmp_path):
    root, model = setup
    args = ["eval", "retrieval", "--annotations", str(root / "karpathy.json"), "--images", str(root / "world" / "images"),
            "--device", "cpu", "--json"]
    direct = _json(runner.invoke(app, args + ["--model", str(model), "--out", str(tmp_path / "rep")]))
    run = direct["retrieval"][0]
    assert run["n_images"] == 12 and run["n_captions"] == 60
    assert set(run["recall"]["t2i"]) == {"1", "5", "10"} or set(run["recall"]["t2i"]) == {1, 5, 10}
    assert (tmp_path / "rep" / "report.md").is_file() and (tmp_path / "rep" / "results.json").is_file()
    coll = tmp_path / "c"
    assert runner.invoke(app, ["index", str(root / "world" / "images"), "-c", str(coll), "-m", str(model)]).exit_code == 0
    stored = _json(runner.invoke(app, args + ["--collection", str(coll)]))
    assert stored["retrieval"][0]["recall"] == run["recall"]  # stored float32 embeddings = fresh ones


def test_eval_retrieval_missing_image_is_named(setup, tmp_path):
    root, model = setup
    data = json.loads((root / "karpathy.json").read_text())
    data["images"][2]["filename"] = "gone.png"
    (tmp_path / "k.json").write_text(json.dumps(data))
    args = ["eval", "retrieval", "--annotations", str(tmp_path / "k.json"), "--images", str(root / "world" / "images"),
            "--model", str(model), "--device", "cpu"]
    failed = runner.invoke(app, args)
    assert failed.exit_code == 1 and "gone.png" in failed.output and "--skip-missing" in failed.output.replace("skip_missing", "--skip-missing")
    skipped = _json(runner.invoke(app, args + ["--skip-missing", "--json"]))
    assert skipped["retrieval"][0]["n_images"] == 11 and skipped["retrieval"][0]["skipped_missing"] == 1


def test_eval_retrieval_settings_name_and_split(setup, tmp_path):
    """Issue 14 items 11-13: settings hold the arguments only, the file names its dataset, `--split all`."""
    root, model = setup
    data = json.loads((root / "karpathy.json").read_text())
    data["dataset"] = "coco"
    (tmp_path / "coco.json").write_text(json.dumps(data))
    base = ["eval", "retrieval", "--images", str(root / "world" / "images"), "--model", str(model), "--device", "cpu",
            "--json"]
    coco = _json(runner.invoke(app, base + ["--annotations", str(tmp_path / "coco.json"), "--out", str(tmp_path / "o")]))
    assert coco["retrieval"][0]["dataset"] == "coco" and coco["settings"]["dataset"] == "coco"
    assert set(coco["settings"]) <= {"annotations", "images", "dataset", "split", "limit", "skip_missing",
                                     "collection", "model", "strategy", "device", "dtype", "batch_size"}
    assert (tmp_path / "o" / "results.json").stat().st_size < 20_000  # was the whole dataset
    assert "flickr30k" not in (tmp_path / "o" / "report.md").read_text().lower()
    renamed = runner.invoke(app, base + ["--annotations", str(tmp_path / "coco.json"), "--dataset", "mine"])
    assert _json(renamed)["retrieval"][0]["dataset"] == "mine" and "says it is 'coco'" in renamed.stderr
    rows = data["images"][:6]
    csv_file = tmp_path / "caps.csv"
    with csv_file.open("w", newline="") as fh:
        import csv

        csv.writer(fh).writerows([("filename", "caption")] + [(r["filename"], r["sentences"][0]["raw"]) for r in rows])
    refused = runner.invoke(app, base + ["--annotations", str(csv_file)])
    assert refused.exit_code == 1 and "--split all" in refused.output
    every = _json(runner.invoke(app, base + ["--annotations", str(csv_file), "--split", "all"]))
    assert every["retrieval"][0]["n_images"] == 6 and every["settings"]["split"] == "all"


def test_eval_bad_options_fail_before_loading(setup):
    root, _ = setup
    bad = runner.invoke(app, ["eval", "qa", "--data", str(root / "world" / "qa.jsonl"), "--device", "tpu"])
    assert bad.exit_code == 2 and "--device 'tpu'" in bad.output and "Traceback" not in bad.output


def test_eval_sugarcrepe_on_real_files_with_standin_images(setup, tmp_path):
    root, model = setup
    from PIL import Image

    images = tmp_path / "val2017"
    images.mkdir()
    for category in SUGARCREPE.glob("*.json"):
        for record in list(json.loads(category.read_text()).values())[:3]:
            Image.new("RGB", (64, 64), (len(record["filename"]) * 7 % 255, 90, 160)).save(images / record["filename"])
    result = _json(runner.invoke(app, ["eval", "sugarcrepe", "--data", str(SUGARCREPE), "--images",
                                       str(images), "--limit", "3", "--model", str(model), "--device", "cpu", "--json"]))
    accuracy = result["sugarcrepe"][0]["accuracy"]
    assert {"replace_obj", "swap_att", "add_att", "Replace", "Swap", "Add"} <= set(accuracy)
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())


def test_eval_qa_compares_strategies(setup):
    root, model = setup
    result = _json(runner.invoke(app, ["eval", "qa", "--data", str(root / "world" / "qa.jsonl"), "--images",
                                       str(root / "world"), "--limit", "6", "--model", str(model), "-s", "pool@4",
                                       "-s", "full", "--max-new-tokens", "3", "--device", "cpu", "--json"]))
    assert [r["strategy"] for r in result["qa"]] == ["prompt+pool@4", "prompt+full"]
    assert all(r["n"] == 6 for r in result["qa"])


def test_train_cli_produces_a_loadable_compressor(setup, tmp_path):
    root, model = setup
    result = _json(runner.invoke(app, ["train", "--model", str(model), "--data", str(root / "world"), "-o",
                                       str(tmp_path / "run"), "-K", "4", "--embed-dim", "16", "--max-steps", "3",
                                       "--batch-size", "4", "--device", "cpu", "--json"]))
    assert result["steps"] == 3
    trained = Fwd2Bot.from_pretrained(result["model_dir"], device="cpu")
    assert trained.is_trained and trained.default_strategy.name == "fwd2bot"
    bad = runner.invoke(app, ["train", "--data", str(root / "world")])
    assert bad.exit_code == 2 and "--model" in bad.output


def test_train_recipe_demo_keeps_its_stages_and_resumes(tmp_path):
    """`f2b train --recipe demo` keeps its stages beside the output, so the same command after a kill goes
    on from them instead of starting over (here: a finished run is not trained again)."""
    from fwd2bot_index.model import folder_fingerprint

    out = tmp_path / "demo-out"
    args = ["train", "--recipe", "demo", "--quick", "-o", str(out), "--json", "--device", "cpu"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "demo-out.work" / "base-run" / "demo_stage.json").is_file()
    fingerprint = folder_fingerprint(out)
    report = json.loads(first.stdout[first.stdout.index("{"):])
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout[again.stdout.index("{"):])["stages"] == report["stages"]
    assert folder_fingerprint(out) == fingerprint
