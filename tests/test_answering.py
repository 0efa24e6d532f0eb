"""Pass 2's own answering loop (``fwd2bot_index.model.answering``) against transformers' ``generate``.

The loop replaces ``generate`` for speed (cached chat prefix, merged pass-2 adapter, no per-call set-up);
these tests hold it to the same greedy answers, on the shipped demo model (whose answers mean something)
and on tiny Qwen2-VL models (M-RoPE positions, pooled tokens on a grid, a real chat template).
"""

from __future__ import annotations

import json

import pytest
import torch

from fwd2bot_index.imaging import load_image
from fwd2bot_index.model import Fwd2Bot
from fwd2bot_index.model.answering import Answerer, base_decoder, lean_supported, merged_bytes, merged_decoder
from fwd2bot_index.model.tiny import (TinyIdeficsSpec, TinyQwenSpec, random_images, save_tiny_idefics3,
                                      save_tiny_qwen2vl)
from fwd2bot_index.synthetic.demo_data import write_demo_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def generated(model: Fwd2Bot, tokens, questions, kind: str, max_new: int) -> list[str]:
    """Today's reference: ``transformers.generate`` (greedy) on the same pass-2 inputs and positions."""
    with torch.inference_mode():
        embeds, mask, positions = model._pass2_batch([model._as_tensor(t) for t in tokens], questions, kind)
        with model.adapter("pass2" if kind == "fwd2bot" else None):
            out = model.backbone.generate(embeds, mask, max_new, positions=positions)
    return [s.strip() for s in model.backbone.tokenizer.batch_decode(out, skip_special_tokens=True)]


@pytest.fixture(scope="module")
def demo():
    return Fwd2Bot.from_pretrained("demo", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def world(demo, tmp_path_factory):
    """Eight demo-world scenes: their fwd2bot tokens, pooled tokens and all their questions."""
    folder = tmp_path_factory.mktemp("answer-world")
    write_demo_data(folder, n=8, seed=21)
    rows = [json.loads(line) for line in (folder / "qa.jsonl").read_text().splitlines() if line.strip()]
    names = sorted({r["image"] for r in rows})
    images = [load_image(folder / name) for name in names]
    where = {name: i for i, name in enumerate(names)}
    summary = demo.encode_images(images, strategy="fwd2bot").tokens
    pooled = demo.encode_images(images, strategy="prompt+pool@16").tokens
    pick = [where[r["image"]] for r in rows]
    return {"questions": [r["question"] for r in rows], "fwd2bot": [summary[i] for i in pick],
            "pool": [pooled[i] for i in pick]}


@pytest.mark.parametrize("merge", ["on", "off"])
@pytest.mark.parametrize("kind", ["fwd2bot", "pool"])
def test_demo_answers_equal_generate(demo, world, kind, merge, monkeypatch):
    monkeypatch.setenv("F2B_ANSWER_MERGE", merge)
    demo.answerer = Answerer(demo)
    tokens, questions = world[kind], world["questions"]
    expected = generated(demo, tokens, questions, kind, 8)
    singles = [demo.answer(t, q, max_new_tokens=8, kind=kind) for t, q in zip(tokens, questions)]
    assert singles == expected
    assert demo.answer_batch(tokens[:16], questions[:16], max_new_tokens=8, kind=kind) == expected[:16]
    streamed = ["".join(demo.answer(t, q, max_new_tokens=8, kind=kind, stream=True)).strip()
                for t, q in zip(tokens[:6], questions[:6])]
    assert streamed == expected[:6]
    assert len(set(expected)) > 3  # the model answers differently per question: the comparison has teeth
    if kind == "fwd2bot":
        assert (demo.answerer._merged[1] is not None) == (merge == "on")


def test_merged_copy_shares_everything_but_the_merged_weights(demo):
    decoder = demo.backbone.decoder
    merged = merged_decoder(decoder, "pass2")
    assert merged is not None and merged is not decoder
    assert merged.embed_tokens.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()
    assert merged.norm.weight.data_ptr() == decoder.norm.weight.data_ptr()
    q_merged, q_lora = merged.layers[0].self_attn.q_proj, decoder.layers[0].self_attn.q_proj
    assert type(q_merged) is torch.nn.Linear
    base = q_lora.get_base_layer().weight
    torch.testing.assert_close(q_merged.weight, base + q_lora.get_delta_weight("pass2"))
    assert not torch.equal(q_merged.weight, base)  # the adapter is really in it
    copies = sum(m.weight.numel() * 4 for m in merged.modules() if type(m) is torch.nn.Linear)
    assert merged_bytes(decoder) == copies
    base = base_decoder(decoder)  # the adapter-free view: no LoRA module left, no tensor copied
    assert not any("lora" in name for name, _ in base.named_modules())
    assert base.layers[0].self_attn.q_proj.weight.data_ptr() == base_weight_ptr(q_lora)
    assert {p.data_ptr() for p in base.parameters()} <= {p.data_ptr() for p in decoder.parameters()}


def base_weight_ptr(layer) -> int:
    return layer.get_base_layer().weight.data_ptr()


def test_caches_follow_the_weights_when_the_adapter_changes(tmp_path, tiny_llava_dir, monkeypatch):
    """Training moves the pass-2 adapter: the merged copy and the prefix cache must not answer with old weights."""
    monkeypatch.setenv("F2B_ANSWER_MERGE", "on")
    model = Fwd2Bot.create(Fwd2Bot.from_pretrained(str(tiny_llava_dir), device="cpu", dtype="fp32").backbone,
                           num_summary_tokens=4, embed_dim=16, lora_r=4, seed=0)
    model.config.trained_steps = 1
    enc = model.encode_images(random_images(2), strategy="fwd2bot")
    questions = ["what color is it?", "how many shapes?"]
    before = model.answer_batch(list(enc.tokens), questions, 6)
    assert before == generated(model, enc.tokens, questions, "fwd2bot", 6)
    version = model.answerer._merged[0]
    with torch.no_grad():  # an optimizer step, as far as the weights can tell
        for name, p in model.peft.named_parameters():
            if "lora_B" in name and ".pass2." in name:
                p.normal_(0, 0.5)
    after = model.answer_batch(list(enc.tokens), questions, 6)
    assert model.answerer._merged[0] != version
    assert after == generated(model, enc.tokens, questions, "fwd2bot", 6)


def test_generation_config_processors(demo, world):
    tokens, questions = world["fwd2bot"][:12], world["questions"][:12]
    config = demo.backbone.hf.generation_config
    try:
        config.repetition_penalty = 5.0  # applied by the loop itself
        assert lean_supported(config)
        assert [demo.answer(t, q, max_new_tokens=8) for t, q in zip(tokens, questions)] == \
            generated(demo, tokens, questions, "fwd2bot", 8)
        config.repetition_penalty = None
        config.no_repeat_ngram_size = 1  # not applied by the loop: generate() answers instead
        assert not lean_supported(config)
        assert demo.answer_batch(tokens, questions, 8) == generated(demo, tokens, questions, "fwd2bot", 8)
    finally:
        config.repetition_penalty = None
        config.no_repeat_ngram_size = None


def test_a_stream_left_early_stops_decoding(demo, world):
    calls = []
    hook = demo.backbone.hf.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        stream = demo.answer(world["fwd2bot"][0], "describe the picture", max_new_tokens=30, stream=True)
        next(stream)
        stream.close()
    finally:
        hook.remove()
    assert 1 <= len(calls) < 30


def _random_adapters(stock: Fwd2Bot, scale: float = 0.05) -> Fwd2Bot:
    """A compressor over ``stock`` whose two adapters both matter (LoRA B starts at zero)."""
    model = Fwd2Bot.create(stock.backbone, num_summary_tokens=6, embed_dim=32, lora_r=4, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    model.config.trained_steps = 1
    return model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = save_tiny_qwen2vl(tmp_path_factory.mktemp("answer-qwen") / "qwen2vl", TinyQwenSpec(version="2"), seed=0)
    return _random_adapters(Fwd2Bot.from_pretrained(str(folder), device="cpu", dtype="fp32"))


@pytest.mark.parametrize("strategy,kind", [("fwd2bot", "fwd2bot"), ("prompt+pool@4", "pool")])
def test_qwen2vl_answers_equal_generate(qwen, strategy, kind):
    """M-RoPE: pooled tokens sit on their grid (3-D positions), the chat template has a system turn before
    the image, so the cached prefix is long; batched rows of different lengths."""
    images = [random_images(1, seed=i, size=size)[0] for i, size in enumerate([(56, 56), (140, 84), (84, 56)])]
    tokens = list(qwen.encode_images(images, strategy=strategy).tokens)
    questions = ["what color is it?", "is there a red circle left of a square?", "how many?"]
    expected = [generated(qwen, [t], [q], kind, 5)[0] for t, q in zip(tokens, questions)]
    assert [qwen.answer(t, q, max_new_tokens=5, kind=kind) for t, q in zip(tokens, questions)] == expected
    assert qwen.answer_batch(tokens, questions, 5, kind=kind) == expected
    assert len(qwen.answerer._shared_prefix(questions)) > 5


def test_using_the_model_between_tokens_does_not_change_the_answer(tiny_llava_dir, monkeypatch):
    """The loop enters inference mode and the adapter around each step, not across yields: a caller that
    encodes texts (the pass-1 adapter) between two tokens of a stream still gets the same answer."""
    monkeypatch.setenv("F2B_ANSWER_MERGE", "off")  # unmerged: the pass-2 adapter must be switched back each step
    model = _random_adapters(Fwd2Bot.from_pretrained(str(tiny_llava_dir), device="cpu", dtype="fp32"))
    tokens = [torch.as_tensor(t) for t in model.encode_images(random_images(3), strategy="fwd2bot").tokens]
    questions = ["what color is it?", "how many shapes?", "where is the circle?"]
    expected = generated(model, tokens, questions, "fwd2bot", 8)
    steps = []
    for token in model.answerer.steps(tokens, questions, 8, "fwd2bot"):
        steps.append(token)
        model.encode_texts(["a red circle"])  # switches to the pass-1 adapter
        assert torch.is_grad_enabled()  # the caller's own mode between tokens
    assert len(steps) == 8  # a random model rarely stops early: every step after the first is exposed
    answers = model.backbone.tokenizer.batch_decode(torch.stack(steps, 1), skip_special_tokens=True)
    assert [a.strip() for a in answers] == expected


def test_smolvlm_answers_equal_generate(tmp_path):
    """SmolVLM's template puts image markers and a role before the stored tokens: a longer cached prefix."""
    folder = save_tiny_idefics3(tmp_path / "smolvlm", TinyIdeficsSpec(version="smolvlm"), seed=0)
    model = _random_adapters(Fwd2Bot.from_pretrained(str(folder), device="cpu", dtype="fp32"))
    tokens = list(model.encode_images(random_images(3), strategy="fwd2bot").tokens)
    questions = ["what color is it?", "is there a red circle left of a square?", "how many?"]
    expected = [generated(model, [t], [q], "fwd2bot", 5)[0] for t, q in zip(tokens, questions)]
    assert model.answer_batch(tokens, questions, 5) == expected
    assert [model.answer(t, q, max_new_tokens=5) for t, q in zip(tokens, questions)] == expected
    assert len(model.answerer._shared_prefix(questions)) > 3
