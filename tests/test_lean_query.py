"""Issue 23: a cold `f2b search` on the demo model embeds its query with the lean numpy path (no torch,
transformers or peft imported) and gets the same embedding, so the same hits, as the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fwd2bot_index.model.lean import LeanTextEncoder
from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
from fwd2bot_index.synthetic import write_demo_data

TEXTS = ["a red circle at the top left", "two blue squares", "Is there a café? <image> ünïcode", "   ", "x" * 700]


@pytest.fixture(scope="module")
def demo_model():
    from fwd2bot_index.model import Fwd2Bot

    return Fwd2Bot.from_pretrained("demo", device="cpu")


def test_lean_embeddings_equal_the_models(demo_model):
    lean = LeanTextEncoder.load("demo")
    assert lean is not None and lean.fingerprint == demo_model.fingerprint
    assert np.abs(lean.encode(TEXTS) - demo_model.encode_texts(TEXTS)).max() < 1e-5


def test_both_text_readouts_embed_as_the_model_does(tmp_path):
    """The demo model reads its text prompt through the token mixer (``text_readout: mixer``); the same LLM and
    LoRA with the paper's last-state readout (a random text head) embed alike on both paths too; config and
    weights that disagree are left to the model."""
    import shutil

    import torch

    from fwd2bot_index.model import Fwd2Bot, demo_model_path
    from fwd2bot_index.model.fwd2bot import Compressor

    assert LeanTextEncoder.load("demo").mixer is not None
    model = Fwd2Bot.from_pretrained("demo", device="cpu")  # its own copy: changed below
    config = model.config
    last = Compressor(config.hidden_size, config.num_summary_tokens, config.embed_dim, image_readout="mixer")
    torch.manual_seed(0)
    last.load_state_dict({k: v for k, v in model.compressor.state_dict().items() if not k.startswith("text_")},
                         strict=False)
    model.compressor, model.config.text_readout = last.to(model.backbone.dtype), "last"
    model.save_pretrained(str(tmp_path / "last"), include_base=True)
    reloaded = Fwd2Bot.from_pretrained(str(tmp_path / "last"), device="cpu")
    lean = LeanTextEncoder.load(str(tmp_path / "last"))
    assert lean is not None and lean.mixer is None
    assert np.abs(lean.encode(TEXTS) - reloaded.encode_texts(TEXTS)).max() < 1e-5
    assert np.abs(lean.encode(TEXTS) - LeanTextEncoder.load("demo").encode(TEXTS)).max() > 0.1  # the readouts differ
    mixer = shutil.copytree(demo_model_path("demo"), tmp_path / "mixer")
    path = mixer / "fwd2bot_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "text_readout": "last"}))  # weights say mixer
    assert LeanTextEncoder.load(str(mixer)) is None


def test_what_the_lean_path_does_not_cover_is_left_to_the_model(tmp_path, monkeypatch):
    stock = save_tiny_llava(tmp_path / "tiny", TinySpec(image_size=64), seed=0)  # no Fwd2Bot checkpoint
    assert LeanTextEncoder.load(str(stock)) is None
    assert LeanTextEncoder.load(str(tmp_path / "nowhere")) is None
    monkeypatch.setenv("F2B_LEAN", "0")
    assert LeanTextEncoder.load("demo") is None


def _search(coll, env: dict) -> tuple[list, str]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "fwd2bot_index.cli", "search",
                           "a red circle at the top left", "-c", str(coll), "-k", "5", "--local", "--json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    return json.loads(done.stdout), imported


def test_a_cold_search_imports_no_torch_and_finds_the_same_hits(tmp_path):
    from typer.testing import CliRunner

    from fwd2bot_index.cli.main import app

    write_demo_data(tmp_path / "d", n=12, seed=2)
    coll = tmp_path / "c"
    assert CliRunner().invoke(app, ["index", str(tmp_path / "d" / "images"), "-c", str(coll),
                                    "--device", "cpu"]).exit_code == 0
    lean_hits, lean_imports = _search(coll, {})
    full_hits, full_imports = _search(coll, {"F2B_LEAN": "0"})
    assert "torch" not in lean_imports and "transformers" not in lean_imports and "peft" not in lean_imports
    assert "torch" in full_imports  # the same command loading the real model
    assert [h["id"] for h in lean_hits] == [h["id"] for h in full_hits]
    assert np.allclose([h["score"] for h in lean_hits], [h["score"] for h in full_hits], atol=1e-5)
