"""Checkpoint folders: bit-exact round trip, content fingerprint, base mismatch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fwd2bot_index.model import CheckpointMismatchError, Fwd2Bot, folder_fingerprint
from fwd2bot_index.model.tiny import TinySpec, random_images, save_tiny_llava




def _trained_like(base_dir, seed=5):
    model = Fwd2Bot.create(Fwd2Bot.from_pretrained(str(base_dir), device="cpu", dtype="fp32").backbone,
                           num_summary_tokens=4, embed_dim=12, lora_r=4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
        for p in model.compressor.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.config.trained_steps = 10
    return model


def test_round_trip_is_bit_exact(tiny_llava_dir, tmp_path):
    model = _trained_like(tiny_llava_dir)
    model.save_pretrained(str(tmp_path / "ckpt"))
    names = sorted(p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file())
    assert "fwd2bot_config.json" in names and "compressor.safetensors" in names
    assert "adapters/pass1/adapter_model.safetensors" in names and "adapters/pass2/adapter_config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    loaded = Fwd2Bot.from_pretrained(str(tmp_path / "ckpt"), device="cpu", dtype="fp32")
    for key, value in model.compressor.state_dict().items():
        assert torch.equal(value, loaded.compressor.state_dict()[key]), key
    lora_a = {n: p for n, p in model.peft.named_parameters() if "lora_" in n}
    lora_b = {n: p for n, p in loaded.peft.named_parameters() if "lora_" in n}
    assert lora_a.keys() == lora_b.keys() and len(lora_a) > 0
    for name in lora_a:
        assert torch.equal(lora_a[name], lora_b[name]), name
    images = random_images(3)
    a, b = model.encode_images(images), loaded.encode_images(images)
    assert np.array_equal(a.embeddings, b.embeddings) and np.array_equal(a.tokens, b.tokens)
    config = json.loads((tmp_path / "ckpt" / "fwd2bot_config.json").read_text())
    assert config["num_summary_tokens"] == 4 and config["base_model"] == str(tiny_llava_dir)
    assert config["versions"]["transformers"]


def test_fingerprint_is_content_not_path(tiny_llava_dir, tmp_path):
    model = _trained_like(tiny_llava_dir)
    model.save_pretrained(str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    assert folder_fingerprint(tmp_path / "a") == folder_fingerprint(tmp_path / "moved")
    other = _trained_like(tiny_llava_dir, seed=6)
    other.save_pretrained(str(tmp_path / "b"))
    assert folder_fingerprint(tmp_path / "a") != folder_fingerprint(tmp_path / "b")
    loaded = Fwd2Bot.from_pretrained(str(tmp_path / "moved"), device="cpu")
    assert loaded.fingerprint == folder_fingerprint(tmp_path / "a")


def test_self_contained_checkpoint_includes_base(tiny_llava_dir, tmp_path):
    model = _trained_like(tiny_llava_dir)
    model.save_pretrained(str(tmp_path / "ckpt"), include_base=True)
    assert (tmp_path / "ckpt" / "base" / "config.json").is_file()
    state = load_file(str(next((tmp_path / "ckpt" / "base").glob("*.safetensors"))))
    assert not any("lora_" in k or "base_layer" in k for k in state)
    shutil.rmtree(tiny_llava_dir.parent / "unused", ignore_errors=True)
    loaded = Fwd2Bot.from_pretrained(str(tmp_path / "ckpt"), device="cpu", dtype="fp32")
    assert json.loads((tmp_path / "ckpt" / "fwd2bot_config.json").read_text())["base_model"] == "base"
    images = random_images(2)
    np.testing.assert_array_equal(model.encode_images(images).embeddings, loaded.encode_images(images).embeddings)


def test_mismatched_base_fails_clearly(tiny_llava_dir, tmp_path):
    model = _trained_like(tiny_llava_dir)
    model.save_pretrained(str(tmp_path / "ckpt"))
    other = save_tiny_llava(tmp_path / "other", TinySpec(), seed=42)  # same shape, other weights
    with pytest.raises(CheckpointMismatchError, match="another base model"):
        Fwd2Bot.from_pretrained(str(tmp_path / "ckpt"), device="cpu", base=str(other))
    bigger = save_tiny_llava(tmp_path / "bigger", TinySpec(hidden=96), seed=0)
    with pytest.raises(CheckpointMismatchError, match="hidden_size"):
        Fwd2Bot.from_pretrained(str(tmp_path / "ckpt"), device="cpu", base=str(bigger))
