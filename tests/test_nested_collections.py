"""Nested budgets in collections (issue 24): ``f2b index --tokens k`` stores k summary tokens of a nested
compressor; ``f2b migrate --tokens k`` shrinks a collection in place without re-encoding (tokens truncated,
embeddings recomputed by the head), keeps every image, id and metadata, survives a SIGKILL at each named
point of the rewrite, and gives what indexing at that budget from scratch gives. Real FAISS, real SQLite,
tiny random models of every family."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app
from fwd2bot_index.collection import Collection
from fwd2bot_index.model import Fwd2Bot, StrategyError
from fwd2bot_index.model.tiny import (TinyIdeficsSpec, TinyQwenSpec, TinySpec, random_images, save_tiny_idefics3,
                                      save_tiny_llava, save_tiny_qwen2vl)
from fwd2bot_index.service import open_service
from fwd2bot_index.shrinking import BudgetError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
BUDGETS = [2, 4, 6]
runner = CliRunner()


def _nested_checkpoint(base: Path, out: Path, budgets: list[int] | None = BUDGETS) -> Path:
    """A compressor over ``base`` that says it was trained with ``budgets`` (random weights, one step)."""
    import torch

    stock = Fwd2Bot.from_pretrained(str(base), device="cpu", dtype="fp32")
    model = Fwd2Bot.create(stock.backbone, num_summary_tokens=6, embed_dim=16, lora_r=2, seed=0)
    with torch.no_grad():  # LoRA B starts at zero: give both adapters weight so they matter
        for name, p in model.peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.config.trained_steps = 1
    model.config.nested_budgets = list(budgets or [])
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nested-photos")
    for i, image in enumerate(random_images(10, seed=3)):
        image.save(root / f"p{i:02d}.png")
    (root / "meta.json").write_text(json.dumps({f"p{i:02d}.png": {"album": f"a{i % 3}"} for i in range(10)}))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny LLaVA compressor trained three steps with ``f2b train --nested 2,4,6``."""
    from fwd2bot_index.synthetic import write_demo_data

    root = tmp_path_factory.mktemp("nested-train")
    base = save_tiny_llava(root / "base", TinySpec(), seed=0)
    write_demo_data(root / "data", n=16, seed=0)
    result = runner.invoke(app, ["train", "--model", str(base), "--data", str(root / "data"), "--nested", "2,4,6",
                                 "--embed-dim", "16", "--lora-r", "2", "--batch-size", "4", "--max-steps", "3",
                                 "-o", str(root / "run"), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    return root / "run" / "model"


def _index(model: Path, photos: Path, folder: Path, tokens: int | None, batch_size: int = 4) -> Path:
    with open_service(folder, model=str(model), device="cpu", create=True, writable=True, tokens=tokens) as svc:
        svc.index([photos], batch_size=batch_size, metadata=photos / "meta.json")
    return folder


def _contents(folder: Path) -> dict[str, dict]:
    """path -> id, metadata, tokens, embedding: everything a migration must keep or recompute."""
    with Collection.open(folder) as col:
        rows = col.catalog.images(col.catalog.ids().tolist())
        out = {}
        for row in rows:
            out[row.path] = {"id": row.id, "hash": row.hash, "metadata": row.metadata, "paths": row.paths,
                             "tokens": col.get_tokens(row.id), "embedding": col.embedding(row.id)}
        return out


def _same(migrated: dict, scratch: dict) -> None:
    assert sorted(migrated) == sorted(scratch)
    for path, want in scratch.items():
        got = migrated[path]
        assert (got["id"], got["hash"], got["metadata"], got["paths"]) == \
            (want["id"], want["hash"], want["metadata"], want["paths"])
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
        # the head over the stored fp16 tokens vs over the fp32 ones before storing: equal up to that rounding
        np.testing.assert_allclose(got["embedding"], want["embedding"], atol=3e-3)
        assert float(got["embedding"] @ want["embedding"]) > 0.9999


@pytest.fixture(scope="module")
def built(trained, photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("nested-built")
    return {k: _contents(_index(trained, photos, root / f"k{k}", k)) for k in BUDGETS} | {"root": root}


def test_a_nested_model_indexes_at_every_budget_and_tokens_are_the_first_k(trained, built):
    full = built[6]
    for k in BUDGETS:
        rows = built[k]
        assert len(rows) == 10
        for path, row in rows.items():
            assert row["tokens"].shape[0] == k
            np.testing.assert_array_equal(row["tokens"], full[path]["tokens"][:k])
    with Collection.open(built["root"] / "k2") as col:
        assert col.manifest.token_count == 2 and col.manifest.strategy["budget"] == 2
    small = json.loads(runner.invoke(app, ["info", "--collection", str(built["root"] / "k2"), "--json"]).output)
    large = json.loads(runner.invoke(app, ["info", "--collection", str(built["root"] / "k6"), "--json"]).output)
    assert small["tokens_per_image"] == 2 and large["tokens_per_image"] == 6
    assert small["tokens_bytes_per_image"] < large["tokens_bytes_per_image"]
    text = runner.invoke(app, ["info", "--collection", str(built["root"] / "k4")]).output
    assert "tokens/image 4" in text and "bytes/image" in text


def test_migrate_shrinks_in_place_like_indexing_from_scratch(trained, built, tmp_path):
    for k in (4, 2):
        folder = tmp_path / f"m{k}"
        shutil.copytree(built["root"] / "k6", folder)
        reader = Collection.open(folder)  # a reader open across the migration (a server) follows it
        first = int(reader.catalog.ids()[0])
        assert reader.get_tokens(first).shape[0] == 6
        result = runner.invoke(app, ["migrate", "--tokens", str(k), "--collection", str(folder), "--device", "cpu",
                                     "--json"])
        assert result.exit_code == 0, result.output
        query = built[k][next(iter(built[k]))]["embedding"]
        assert reader.search(query, k=1)[0].score == pytest.approx(1.0, abs=1e-3)
        assert reader.get_tokens(first).shape[0] == k and reader.manifest.token_count == k
        reader.close()
        report = json.loads(result.output)
        assert report["images"] == 10 and report["from_token_count"] == 6 and report["verified"]
        _same(_contents(folder), built[k])
        with Collection.open(folder) as col:
            assert col.manifest.token_count == k and col.verify().ok
            assert not (folder / "shrink.json").exists()
            assert len(col.tokens.list_shards()) == len(col.catalog.shard_live_rows())  # old shards deleted
    again = runner.invoke(app, ["migrate", "--tokens", "2", "--collection", str(tmp_path / "m2"), "--device", "cpu"])
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_budgets_outside_the_set_are_refused_in_one_line(trained, built, photos, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(built["root"] / "k4", folder)
    for k, why in ((3, "trained for 2, 4, 6 summary tokens per image, not 3"), (6, "growing it to 6"),
                   (5, "growing it to 5")):
        result = runner.invoke(app, ["migrate", "--tokens", str(k), "--collection", str(folder), "--device", "cpu"])
        assert result.exit_code != 0 and why in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = runner.invoke(app, ["index", str(photos), "--collection", str(tmp_path / "n"), "--model", str(trained),
                                 "--tokens", "5", "--device", "cpu"])
    assert result.exit_code != 0 and "not 5" in result.output and len(result.output.strip().splitlines()) == 1
    assert not Collection.exists(tmp_path / "n")
    result = runner.invoke(app, ["index", str(photos), "--collection", str(folder), "--tokens", "2", "--device", "cpu"])
    assert result.exit_code != 0 and "f2b migrate --tokens 2" in result.output
    with Collection.open(folder) as col:  # nothing changed by the refusals
        assert col.manifest.token_count == 4 and len(col) == 10 and col.verify().ok


def test_a_plain_checkpoint_serves_only_k(tiny_llava_dir, photos, tmp_path):
    plain = _nested_checkpoint(tiny_llava_dir, tmp_path / "plain", budgets=None)
    with pytest.raises(StrategyError, match="not trained with nested budgets"):
        _index(plain, photos, tmp_path / "p4", 4)
    folder = _index(plain, photos, tmp_path / "p6", 6)
    with open_service(folder, device="cpu", writable=True) as svc:
        with pytest.raises(StrategyError, match="not trained with nested budgets"):
            svc.migrate_tokens(2)
        with pytest.raises(BudgetError, match="growing"):
            svc.migrate_tokens(8)


MIGRATE_CHILD = textwrap.dedent("""
    import os, signal, sys
    import fwd2bot_index.collection.shrink as shrink
    from fwd2bot_index.service import open_service

    folder, k, point = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def step(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    shrink._step = step
    with open_service(folder, device="cpu", writable=True) as svc:
        svc.migrate_tokens(k)
    print("finished without being killed", flush=True)
""")


@pytest.mark.parametrize("point", ["after-shard", "before-switch", "after-switch", "after-manifest", "after-index"])
def test_migrate_survives_sigkill_at_every_step(built, tmp_path, point):
    folder = tmp_path / "c"
    shutil.copytree(built["root"] / "k6", folder)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", MIGRATE_CHILD, str(folder), "2", point], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    if point in ("after-switch", "after-manifest", "after-index"):  # past the switch: readers see the new tokens
        with Collection.open(folder) as reader:
            assert reader.manifest.token_count == 2
            assert reader.get_tokens(int(reader.catalog.ids()[0])).shape[0] == 2
    else:  # before it: the collection is untouched
        with Collection.open(folder) as reader:
            assert reader.manifest.token_count == 6 and len(reader) == 10
    result = runner.invoke(app, ["migrate", "--tokens", "2", "--collection", str(folder), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    _same(_contents(folder), built[2])
    with Collection.open(folder) as col:
        assert col.verify().ok and len(col) == 10
        assert not (folder / "shrink.json").exists()
        assert len(col.tokens.list_shards()) == len(col.catalog.shard_live_rows())


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_every_family_indexes_at_a_budget_and_migrates(family, photos, tmp_path):
    if family == "qwen2_vl":
        base = save_tiny_qwen2vl(tmp_path / "base", TinyQwenSpec(version="2"), seed=0)
    else:
        base = save_tiny_idefics3(tmp_path / "base", TinyIdeficsSpec(version="idefics3"), seed=0)
    model = _nested_checkpoint(base, tmp_path / "model")
    scratch = _contents(_index(model, photos, tmp_path / "k2", 2))
    folder = _index(model, photos, tmp_path / "k6", None)
    full = _contents(folder)
    for path, row in scratch.items():
        np.testing.assert_array_equal(row["tokens"], full[path]["tokens"][:2])
    with open_service(folder, device="cpu", writable=True) as svc:
        report = svc.migrate_tokens(2)
        assert report["images"] == 10 and svc.verify().ok
        hits = svc.search(text="a photo", k=3)
        assert len(hits) == 3
        assert svc.ask(hits[0].id, "what is it?", max_new_tokens=2) is not None
    _same(_contents(folder), scratch)
