"""Token-mixer readouts of the contrastive embeddings (``model.readout``) on a tiny random LLaVA model."""

import json

import numpy as np
import pytest
import torch

from fwd2bot_index.model import Fwd2Bot, StrategyError
from fwd2bot_index.model.readout import MAX_MIXER_WIDTH, TokenMixer, readout_width
from fwd2bot_index.training import TrainConfig


@pytest.fixture(scope="module")
def mixer_model(tiny_llava_dir):
    model = Fwd2Bot.create(Fwd2Bot.from_pretrained(str(tiny_llava_dir), device="cpu", dtype="fp32").backbone,
                           num_summary_tokens=4, embed_dim=24, lora_r=4, image_readout="mixer", text_readout="mixer")
    model.config.trained_steps = 1
    return model


def test_mixer_reads_every_token_and_padding_changes_nothing():
    torch.manual_seed(0)
    mixer = TokenMixer(16).eval()
    states = torch.randn(1, 5, 16)
    padded = torch.cat([torch.full((1, 3, 16), 7.0), states], dim=1)  # left padding holding junk
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(mixer(padded, mask), mixer(states), atol=1e-5, rtol=1e-5)
    # a set (no positions): reordering the tokens changes nothing ...
    torch.testing.assert_close(mixer(states[:, [1, 0, 2, 3, 4]]), mixer(states), atol=1e-5, rtol=1e-5)
    # ... but unlike a mean, moving one feature between two tokens (same sum) changes the readout
    moved = states.clone()
    moved[0, 0, :8], moved[0, 1, :8] = states[0, 1, :8], states[0, 0, :8]
    assert torch.allclose(moved.mean(1), states.mean(1), atol=1e-6)
    assert not torch.allclose(mixer(moved), mixer(states), atol=1e-4)


def test_wide_states_are_projected_down():
    assert readout_width(4096, "mixer") == MAX_MIXER_WIDTH and readout_width(4096, "last") == 4096
    assert TokenMixer(512)(torch.randn(2, 3, 512)).shape == (2, MAX_MIXER_WIDTH)


def test_mixer_compressor_embeds_and_round_trips(mixer_model, images, tmp_path):
    enc = mixer_model.encode_images(images[:3])
    texts = ["a red circle", "a small green triangle above a large yellow star"]
    emb = mixer_model.encode_texts(texts)
    assert enc.embeddings.shape == (3, 24) and emb.shape == (2, 24)
    for i, text in enumerate(texts):  # a text alone = the text in a left-padded batch
        np.testing.assert_allclose(mixer_model.encode_texts([text])[0], emb[i], atol=1e-5)
    np.testing.assert_allclose(mixer_model.embed_stored(enc.tokens), enc.embeddings, atol=1e-5)
    mixer_model.save_pretrained(str(tmp_path / "ckpt"))
    config = json.loads((tmp_path / "ckpt" / "fwd2bot_config.json").read_text())
    assert (config["image_readout"], config["text_readout"]) == ("mixer", "mixer")
    loaded = Fwd2Bot.from_pretrained(str(tmp_path / "ckpt"), device="cpu", dtype="fp32")
    assert loaded.compressor.image_mixer is not None and loaded.compressor.text_mixer is not None
    np.testing.assert_allclose(loaded.encode_images(images[:3]).embeddings, enc.embeddings, atol=1e-5)
    np.testing.assert_allclose(loaded.encode_texts(texts), emb, atol=1e-5)


def test_checkpoint_without_readouts_loads_as_mean_and_last(tiny_llava_dir, tmp_path):
    model = Fwd2Bot.create(Fwd2Bot.from_pretrained(str(tiny_llava_dir), device="cpu", dtype="fp32").backbone,
                           num_summary_tokens=2, embed_dim=8, lora_r=2)
    model.save_pretrained(str(tmp_path / "old"))
    path = tmp_path / "old" / "fwd2bot_config.json"
    config = json.loads(path.read_text())
    del config["image_readout"], config["text_readout"]  # as written before readouts existed
    path.write_text(json.dumps(config))
    loaded = Fwd2Bot.from_pretrained(str(tmp_path / "old"), device="cpu", dtype="fp32")
    assert loaded.compressor.image_mixer is None and loaded.compressor.text_mixer is None
    config["text_readout"] = "attention"  # a newer version's readout: refused, not read as 'last'
    path.write_text(json.dumps(config))
    with pytest.raises(StrategyError, match="readout 'mean' / 'attention'.*upgrade"):
        Fwd2Bot.from_pretrained(str(tmp_path / "old"), device="cpu", dtype="fp32")


def test_train_config_refuses_an_unknown_readout():
    with pytest.raises(Exception, match="text_readout 'cls': use last or mixer"):
        TrainConfig(model="demo", data=["x"], text_readout="cls").validate()
