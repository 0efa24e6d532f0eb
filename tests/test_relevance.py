"""``Fwd2Bot.relevance``: P(yes) from one pass-2 prefill, on tiny random models of every family and kind.

Held to a computation by hand (the pass-2 row built piece by piece, the decoder with the adapter
switched on through peft, softmax over the two answer words' logits), to batching (a batch gives what
each pair gets alone) and to the checkpoint's calibration.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fwd2bot_index.model import Fwd2Bot
from fwd2bot_index.model.config import StrategyError
from fwd2bot_index.model.relevance import answer_word_ids, verify_question
from fwd2bot_index.model.tiny import (TinyIdeficsSpec, TinyQwenSpec, random_images, save_tiny_idefics3,
                                      save_tiny_qwen2vl)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUERIES = ["a red circle at the top left", "two blue squares.", "a small green star above a large cross?"]


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_llava_dir):
    """family -> a trained-looking Fwd2Bot (random compressor, trained_steps=1) over a tiny stock backbone."""
    root = tmp_path_factory.mktemp("relevance")
    folders = {"llava": tiny_llava_dir, "qwen2_vl": save_tiny_qwen2vl(root / "qwen", TinyQwenSpec(), seed=3),
               "idefics3": save_tiny_idefics3(root / "idefics3", TinyIdeficsSpec(version="idefics3"), seed=4)}
    out = {}
    for family, folder in folders.items():
        stock = Fwd2Bot.from_pretrained(str(folder), device="cpu", dtype="fp32")
        model = Fwd2Bot.create(stock.backbone, num_summary_tokens=4, embed_dim=16, lora_r=2, seed=1)
        model.config.trained_steps = 1
        with torch.no_grad():  # a pass-2 adapter that does something, so "adapter on" is checked
            for name, p in model.peft.named_parameters():
                if "lora_B" in name and ".pass2." in name:
                    p.normal_(0, 0.2)
        out[family] = model
    return out


def kinds(family: str) -> list[str]:
    return ["fwd2bot", "pool"] + ([] if family == "qwen2_vl" else ["full"])  # Qwen2-VL has no fixed 'full'


def stored(model: Fwd2Bot, kind: str, n: int = 3) -> list[np.ndarray]:
    strategy = {"fwd2bot": "fwd2bot", "pool": "prompt+pool@4", "full": "full"}[kind]
    sizes = [(48, 40), (40, 56), (64, 64)]  # Qwen2-VL: different grids per image
    images = [random_images(1, seed=i, size=sizes[i % 3])[0] for i in range(n)]
    return list(model.encode_images(images, strategy=strategy).tokens)


def by_hand(model: Fwd2Bot, tokens: np.ndarray, query: str, kind: str) -> float:
    """One pair, no padding: [chat before] + stored tokens (projected for fwd2bot) + [question], the
    backbone's own positions for the block, the peft model's adapter switched on, softmax over yes/no."""
    question = verify_question(model.config.verify_prompt, query)
    with torch.inference_mode():
        before, block, after = model.pass2_parts(torch.as_tensor(tokens), question, kind)
        seq = torch.cat([before, block, after])[None]
        mask = torch.ones(seq.shape[:2], dtype=torch.long)
        positions = model.backbone.stored_positions(mask, [(before.shape[0], block.shape[0])], kind)
        with model.adapter("pass2" if kind == "fwd2bot" else None):
            hidden = model.backbone.run_decoder(seq, mask, positions)
        logits = model.backbone.logits(hidden[0, -1]).float()
    yes, no = answer_word_ids(model.backbone.tokenizer)
    two = torch.stack([torch.logsumexp(logits[yes], 0), torch.logsumexp(logits[no], 0)])
    return float(torch.softmax(two, 0)[0])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_relevance_is_the_softmax_over_yes_and_no_and_batches_exactly(families, family):
    model = families[family]
    for kind in kinds(family):
        tokens = stored(model, kind)
        queries = [QUERIES[i % len(QUERIES)] for i in range(len(tokens))]
        batched = model.relevance(tokens, queries, kind=kind)
        assert batched.shape == (len(tokens),) and ((batched > 0) & (batched < 1)).all()
        hand = [by_hand(model, t, q, kind) for t, q in zip(tokens, queries)]
        np.testing.assert_allclose(batched, hand, rtol=0, atol=2e-5, err_msg=f"{family}/{kind}")
        alone = [model.relevance([t], [q], kind=kind)[0] for t, q in zip(tokens, queries)]
        np.testing.assert_allclose(batched, alone, rtol=0, atol=2e-5, err_msg=f"{family}/{kind}")
        chunked = model.relevance(tokens, queries, kind=kind, batch_size=2)  # chunks give the same
        np.testing.assert_allclose(batched, chunked, rtol=0, atol=2e-5)
        assert len({round(float(x), 6) for x in batched}) > 1  # the comparison has teeth: scores differ per pair


def test_calibration_moves_the_probability(families):
    model = families["llava"]
    tokens = stored(model, "fwd2bot")
    raw = model.relevance(tokens, QUERIES, kind="fwd2bot")
    model.config.relevance_calibration = {"temperature": 2.0, "bias": 0.3}
    try:
        calibrated = model.relevance(tokens, QUERIES, kind="fwd2bot")
        uncalibrated = model.relevance(tokens, QUERIES, kind="fwd2bot", calibrated=False)
    finally:
        model.config.relevance_calibration = {}
    logit = np.log(raw) - np.log1p(-raw)
    np.testing.assert_allclose(calibrated, 1 / (1 + np.exp(-(logit / 2.0 + 0.3))), atol=1e-6)
    np.testing.assert_allclose(uncalibrated, raw, atol=1e-9)


def test_config_round_trips_the_prompt_and_calibration(families, tmp_path):
    model = families["llava"]
    model.config.relevance_calibration = {"temperature": 1.5, "bias": -0.25}
    try:
        model.save_pretrained(str(tmp_path / "ckpt"))
    finally:
        model.config.relevance_calibration = {}
    again = Fwd2Bot.from_pretrained(str(tmp_path / "ckpt"), device="cpu", dtype="fp32")
    assert again.config.relevance_calibration == {"temperature": 1.5, "bias": -0.25}
    assert again.config.verify_prompt == model.config.verify_prompt == "is there {query}?"


def test_questions_and_bad_input():
    assert verify_question("is there {query}?", "  A red   circle. ") == "is there A red circle?"
    with pytest.raises(ValueError, match="empty"):
        verify_question("is there {query}?", " ?! ")


def test_tokenizer_without_distinct_answers_is_refused():
    class Bytes:  # every spelling starts with the same token: nothing to read
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7, 8]}

    with pytest.raises(StrategyError, match="cannot verify"):
        answer_word_ids(Bytes())


def test_pairs_must_match(families):
    model = families["llava"]
    with pytest.raises(ValueError, match="one query per set"):
        model.relevance(stored(model, "pool", 2), ["one query"], kind="pool")
    assert model.relevance([], [], kind="pool").shape == (0,)


def test_stock_model_refuses_summary_tokens(tiny_model):
    with pytest.raises(StrategyError, match="stock model"):
        tiny_model.relevance([np.zeros((4, tiny_model.backbone.hidden_size), np.float32)], ["a circle"], kind="fwd2bot")
