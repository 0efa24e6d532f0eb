"""The model core on tiny random LLaVA models: shapes, invariance, strategies, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fwd2bot_index.model import (
    Fwd2Bot,
    Strategy,
    StrategyError,
    UnsupportedModelError,
    UntrainedCompressorError,
    pool_visual_tokens,
)
from fwd2bot_index.model.pooling import budget_grid, pool_grid
from fwd2bot_index.model.tiny import TinySpec, random_images



SPEC = TinySpec()


@pytest.fixture(scope="module")
def compressor(tiny_llava_dir):
    """A compressor marked trained, with LoRA weights perturbed so adapters really act."""
    model = Fwd2Bot.create(
        Fwd2Bot.from_pretrained(str(tiny_llava_dir), device="cpu", dtype="fp32").backbone,
        num_summary_tokens=4, embed_dim=24, lora_r=4,
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.config.trained_steps = 1
    return model


def test_pass1_and_pass2_shapes(compressor, images):
    pixels = compressor.backbone.pixel_values(images)
    visual = compressor.visual_tokens(pixels)
    assert visual.shape == (5, SPEC.image_tokens, SPEC.hidden)
    summary = compressor.compress(visual)
    assert summary.shape == (5, 4, SPEC.hidden)
    emb = compressor.embed_summary(summary)
    assert emb.shape == (5, 24)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    embeds, mask = compressor.pass2_inputs(list(summary), ["what color?"] * 5, "fwd2bot")
    assert embeds.shape[0] == 5 and embeds.shape[-1] == SPEC.hidden
    assert int(mask[0].sum()) >= 4 + 2  # summary tokens plus at least some prompt tokens


def test_encode_images_fwd2bot_outputs(compressor, images):
    enc = compressor.encode_images(images, batch_size=2)
    assert enc.strategy == Strategy("fwd2bot", "fwd2bot", 4)
    assert enc.embeddings.shape == (5, 24) and enc.embeddings.dtype == np.float32
    assert enc.tokens.shape == (5, 4, SPEC.hidden)
    np.testing.assert_allclose(np.linalg.norm(enc.embeddings, axis=1), 1.0, atol=1e-5)
    texts = compressor.encode_texts(["a red circle", "a blue square on the left"])
    assert texts.shape == (2, 24)


def test_image_alone_equals_image_in_batch(compressor, images):
    alone = compressor.encode_images(images[3:4])
    batched = compressor.encode_images(images, batch_size=5)
    np.testing.assert_allclose(alone.embeddings[0], batched.embeddings[3], atol=1e-5)
    np.testing.assert_allclose(alone.tokens[0], batched.tokens[3], atol=1e-4)


def test_text_alone_equals_text_in_padded_batch(compressor):
    texts = ["red", "a small green triangle above a large yellow star in the middle", "two circles"]
    for strategy in ("fwd2bot", "prompt"):
        batched = compressor.encode_texts(texts, strategy=strategy)
        for i, text in enumerate(texts):
            alone = compressor.encode_texts([text], strategy=strategy)
            np.testing.assert_allclose(alone[0], batched[i], atol=1e-5)


def test_bf16_batch_invariance_is_looser_but_holds(tiny_llava_dir, images):
    model = Fwd2Bot.from_pretrained(str(tiny_llava_dir), device="cpu", dtype="bf16")
    assert model.backbone.dtype == torch.bfloat16
    alone = model.encode_images(images[:1])
    batched = model.encode_images(images, batch_size=5)
    np.testing.assert_allclose(alone.embeddings[0], batched.embeddings[0], atol=3e-2)
    texts = model.encode_texts(["a", "a much longer sentence with many words in it"])
    np.testing.assert_allclose(model.encode_texts(["a"])[0], texts[0], atol=3e-2)


def test_answer_from_stored_tokens_matches_batched_and_streamed(compressor, images):
    enc = compressor.encode_images(images[:3])
    questions = ["what color is it?", "how many?", "is there a circle?"]
    singles = [compressor.answer(enc.tokens[i], q, max_new_tokens=6) for i, q in enumerate(questions)]
    batched = compressor.answer_batch(list(enc.tokens), questions, max_new_tokens=6)
    assert singles == batched
    assert all(isinstance(a, str) and a for a in singles)
    streamed = "".join(compressor.answer(enc.tokens[0], questions[0], max_new_tokens=6, stream=True))
    assert streamed.strip() == singles[0]


def test_pass2_uses_the_stored_tokens(compressor, images):
    """Different stored tokens must change the first-step logits (the answer really reads them)."""
    enc = compressor.encode_images(images[:2])
    with torch.inference_mode():
        embeds, mask = compressor.pass2_inputs([torch.tensor(t) for t in enc.tokens], ["what?"] * 2, "fwd2bot")
        with compressor.adapter("pass2"):
            hidden = compressor.backbone.run_decoder(embeds, mask)
    assert not torch.allclose(hidden[0, -1], hidden[1, -1], atol=1e-4)


def test_pass2_adapter_differs_from_pass1(compressor, images):
    visual = compressor.visual_tokens(compressor.backbone.pixel_values(images[:1]))
    seq = visual
    mask = torch.ones(seq.shape[:2], dtype=torch.long)
    with torch.inference_mode():
        with compressor.adapter("pass1"):
            a = compressor.backbone.run_decoder(seq, mask)
        with compressor.adapter("pass2"):
            b = compressor.backbone.run_decoder(seq, mask)
        with compressor.adapter(None):
            c = compressor.backbone.run_decoder(seq, mask)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_untrained_compressor_refuses_fwd2bot(tiny_llava_dir, images):
    stock = Fwd2Bot.from_pretrained(str(tiny_llava_dir), device="cpu", dtype="fp32")
    fresh = Fwd2Bot.create(stock.backbone, num_summary_tokens=4, embed_dim=8)
    assert fresh.default_strategy.name == "prompt+pool@16"
    with pytest.raises(UntrainedCompressorError, match="never been trained"):
        fresh.encode_images(images[:1], strategy="fwd2bot")
    with pytest.raises(StrategyError, match="stock model"):
        Fwd2Bot.stock(stock.backbone).encode_texts(["x"], strategy="fwd2bot")


def test_prompt_strategy_on_stock_model(tiny_model, images):
    enc = tiny_model.encode_images(images, strategy="prompt")
    assert enc.embeddings.shape == (5, SPEC.hidden)
    np.testing.assert_allclose(np.linalg.norm(enc.embeddings, axis=1), 1.0, atol=1e-5)
    texts = tiny_model.encode_texts(["a red circle", "a blue square"])
    assert texts.shape == (2, SPEC.hidden)
    # different images give different embeddings (the prompt pass really sees the image)
    assert np.abs(enc.embeddings[0] - enc.embeddings[1]).max() > 1e-4


def test_pool_strategy_averages_visual_tokens(tiny_model, images):
    enc_full = tiny_model.encode_images(images[:2], strategy="full")
    assert enc_full.tokens.shape == (2, SPEC.image_tokens, SPEC.hidden)
    enc_pool = tiny_model.encode_images(images[:2], strategy="pool@4")
    assert enc_pool.tokens.shape == (2, 4, SPEC.hidden)
    # 4x4 grid -> 2x2: each pooled token is the mean of one 2x2 block of the full tokens
    grid = enc_full.tokens[0].reshape(4, 4, SPEC.hidden)
    expected = grid[:2, :2].reshape(-1, SPEC.hidden).mean(axis=0)
    np.testing.assert_allclose(enc_pool.tokens[0, 0], expected, atol=1e-5)
    # answering from pooled tokens works without adapters
    assert isinstance(tiny_model.answer(enc_pool.tokens[0], "what?", max_new_tokens=3, kind="pool"), str)


def test_pool_visual_tokens_2d_when_budget_not_square():
    # 4x4 grid to 8 tokens: a 4x2 output grid, each window 1 row x 2 columns of patches (not whole rows)
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    pooled = pool_visual_tokens(tokens, 8)
    assert pooled.shape == (2, 8, 3)
    assert torch.allclose(pooled[0, 0], tokens[0, [0, 1]].mean(0))
    assert torch.allclose(pooled[0, 1], tokens[0, [2, 3]].mean(0))
    # 8x8 grid to 8 tokens: windows of 2 rows x 4 columns
    big = torch.arange(64, dtype=torch.float32).reshape(1, 64, 1)
    expected = big[0].reshape(8, 8)[:2, :4].mean()
    assert torch.isclose(pool_visual_tokens(big, 8)[0, 0, 0], expected)
    assert pool_visual_tokens(tokens, 32) is tokens


def test_pool_grid_uneven_and_one_dimensional_fallback():
    # a 13x9 grid (an odd Qwen2-VL-like size) to 16 tokens: 4x4 adaptive windows, every token counted
    tokens = torch.ones(1, 13 * 9, 2)
    assert torch.allclose(pool_grid(tokens, 13, 9, 16), torch.ones(1, 16, 2))
    assert budget_grid(13, 9, 16) == (4, 4)
    # no factorization fits a 1x5 grid with budget 4 as 2x2: pools 1-D
    assert pool_grid(torch.arange(5.).reshape(1, 5, 1), 1, 5, 4).shape == (1, 4, 1)
    with pytest.raises(ValueError, match="grid"):
        pool_grid(tokens, 10, 10, 4)


def test_strategy_parsing():
    assert Strategy.parse("pool@8") == Strategy("prompt", "pool", 8)
    assert Strategy.parse("fwd2bot").name == "fwd2bot"
    assert Strategy.parse("prompt+full").tokens == "full"
    with pytest.raises(StrategyError, match="unknown strategy"):
        Strategy.parse("clip")
    with pytest.raises(StrategyError, match="whole number"):
        Strategy.parse("pool@x")


def test_qwen2_text_family(tiny_qwen_dir, images):
    model = Fwd2Bot.from_pretrained(str(tiny_qwen_dir), device="cpu", dtype="fp32")
    assert model.backbone.config.text_config.model_type == "qwen2"
    enc = model.encode_images(images[:2])
    assert enc.tokens.shape == (2, 16, SPEC.hidden)
    assert isinstance(model.answer(enc.tokens[0], "what?", max_new_tokens=3), str)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, vocab_size=64)).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedModelError) as err:
        Fwd2Bot.from_pretrained(str(tmp_path / "llama"), device="cpu")
    assert "LlamaForCausalLM" in str(err.value) and "LlavaForConditionalGeneration" in str(err.value)


def test_missing_model_folder_error(tmp_path):
    from fwd2bot_index.model import ModelLoadError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither a Fwd2Bot checkpoint"):
        Fwd2Bot.from_pretrained(str(tmp_path / "empty"), device="cpu")


def test_wrong_token_shape_is_refused(tiny_model):
    with pytest.raises(ValueError, match="another model"):
        tiny_model.answer(np.zeros((4, 7), np.float32), "what?")
