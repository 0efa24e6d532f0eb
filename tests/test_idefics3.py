"""The Idefics3 family (SmolVLM, Idefics3) on tiny random models built from the real config classes,
saved as hub-like folders and reloaded through the ordinary loader (no torchvision, no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app
from fwd2bot_index.model import Fwd2Bot, load_backbone
from fwd2bot_index.model.idefics3 import Idefics3Backbone
from fwd2bot_index.model.tiny import TinyIdeficsSpec, random_images, save_tiny_idefics3

SIZES = [(48, 40), (200, 120), (64, 64)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics")
    return {v: save_tiny_idefics3(root / v, TinyIdeficsSpec(version=v), seed=i) for i, v in enumerate(("smolvlm", "idefics3"))}


def _images():
    return [random_images(1, seed=i, size=size)[0] for i, size in enumerate(SIZES)]


@pytest.mark.parametrize("family", ["smolvlm", "idefics3"])
def test_fixed_tokens_per_image_and_batch_equals_one_by_one(folders, family):
    model = Fwd2Bot.from_pretrained(str(folders[family]), device="cpu", dtype="fp32")
    assert isinstance(model.backbone, Idefics3Backbone) and model.backbone.family == family
    assert model.backbone.num_image_tokens == 16  # (64 / 8)^2 / 2^2, whatever the image size (no splitting)
    parts = model.backbone.chat(model.config.image_embed_prompt)
    assert parts.before.endswith("User:<fake_token_around_image><global-img>")
    assert parts.after.startswith("<fake_token_around_image>Summary")
    images = _images()
    for strategy in ("pool@4", "full"):
        batch = model.encode_images(images, batch_size=3, strategy=strategy)
        alone = [model.encode_images([image], strategy=strategy) for image in images]
        np.testing.assert_allclose(batch.embeddings, np.concatenate([a.embeddings for a in alone]), atol=2e-5)
        np.testing.assert_allclose(batch.tokens, np.concatenate([a.tokens for a in alone]), atol=2e-5)
    assert model.encode_images(images, strategy="full").tokens.shape == (3, 16, 64)
    assert model.answer(batch.tokens[0], "what color?", max_new_tokens=3, kind="full") == \
        model.answer_batch(list(batch.tokens), ["what color?", "a", "b"], 3, kind="full")[0]


def test_compressor_lora_sits_in_the_text_model_and_round_trips(folders, tmp_path):
    stock = Fwd2Bot.from_pretrained(str(folders["smolvlm"]), device="cpu", dtype="fp32")
    model = Fwd2Bot.create(stock.backbone, num_summary_tokens=4, embed_dim=16, lora_r=2)
    names = [n for n, _ in model.peft.named_parameters() if "lora_A" in n]
    assert names and all(".text_model." in n for n in names)
    model.config.trained_steps = 1
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert json.loads((tmp_path / "ckpt" / "fwd2bot_config.json").read_text())["base_family"] == "smolvlm"
    loaded = Fwd2Bot.from_pretrained(str(tmp_path / "ckpt"), device="cpu", dtype="fp32")
    a, b = model.encode_images(_images()), loaded.encode_images(_images())
    assert a.tokens.shape == (3, 4, 64)
    np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-5)


def test_training_steps_change_both_adapters(folders, tmp_path):
    from fwd2bot_index.training import TrainConfig, Trainer

    root = tmp_path / "pairs"
    root.mkdir()
    rows = []
    for i, image in enumerate(random_images(4, seed=3, size=(80, 60))):
        image.save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "captions": [f"picture number {i}"]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(model=str(folders["smolvlm"]), data=[str(root / "pairs.jsonl")], output_dir=str(tmp_path / "run"),
                         num_summary_tokens=4, embed_dim=16, lora_r=2, lr=1e-3, batch_size=4, max_steps=2,
                         eval_split="none", seed=0)
    trainer = Trainer(config, progress=False)
    lora = {n: p for n, p in trainer.model.backbone.hf.named_parameters() if "lora_" in n}
    before = {n: p.detach().clone() for n, p in lora.items()}
    trainer.train_step()
    trainer.train_step()
    for adapter in ("pass1", "pass2"):
        names = [n for n in lora if f".{adapter}." in n]
        assert names and all(not torch.equal(lora[n].detach(), before[n]) for n in names), adapter


def test_cli_index_search_ask_and_pixel_options_refused(folders, tmp_path):
    runner = CliRunner()
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(_images()):
        image.save(photos / f"{i}.png")
    coll = str(tmp_path / "coll")
    result = runner.invoke(app, ["index", str(photos), "--collection", coll, "--model", str(folders["smolvlm"]),
                                 "--device", "cpu", "--strategy", "full", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "coll" / "manifest.json").read_text())["token_count"] == 16
    hits = json.loads(runner.invoke(app, ["search", "a red circle", "--collection", coll, "-k", "3", "--json"]).stdout)
    assert len(hits) == 3
    result = runner.invoke(app, ["ask", str(hits[0]["id"]), "what color is it?", "--collection", coll])
    assert result.exit_code == 0, result.output
    with pytest.raises(ValueError, match="dynamic-resolution"):
        load_backbone(str(folders["smolvlm"]), device="cpu", max_pixels=10_000)
