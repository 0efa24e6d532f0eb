"""Tiny random LLaVA models, built from configs, for tests and for training a base from scratch.

Nothing here downloads: the tokenizer is a byte-level BPE trained in-process on a small corpus, so
any English text encodes (unknown words fall back to bytes). Models are saved and reloaded through
the real ``from_pretrained`` so tests exercise the same loading path a user's checkpoint takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# A small built-in corpus so the BPE learns common English pieces; bytes cover everything else.
_BASE_CORPUS = (
    "a an the of and or with in on at to from is are was were there this that these those "
    "red green blue yellow orange purple white black gray brown pink cyan magenta "
    "circle square triangle star cross diamond hexagon ring small large big tiny "
    "left right above below top bottom middle center next beside behind front "
    "how many what color which shape where is there any yes no one two three four five "
    "image picture photo scene shows contains summary above sentence word user assistant "
    "a man woman dog cat people person table street car sitting standing holding "
)

CHAT_TEMPLATE_FALLBACK = "USER: {prompt} ASSISTANT:"


@dataclass(frozen=True)
class _TinyWidths:
    """Widths and depths every tiny family shares (vision tower and LLM)."""

    vision_hidden: int = 32
    vision_layers: int = 2
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab_size: int = 512

    def text_kwargs(self, tokenizer, **extra) -> dict:
        """Keyword arguments of the LLM's config at these widths, with the tokenizer's special ids."""
        return dict(vocab_size=len(tokenizer), hidden_size=self.hidden, intermediate_size=self.intermediate,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **extra)


@dataclass(frozen=True)
class TinySpec(_TinyWidths):
    """Geometry of a tiny LLaVA: image size / patch set the number of visual tokens."""

    text_family: str = "llama"  # "llama" or "qwen2"
    image_size: int = 32
    patch_size: int = 8
    max_positions: int = 1024

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


_LLAVA_SPECIALS = ("<pad>", "<s>", "</s>", "<image>")


def _trained_bpe(vocab_size: int, corpus: Iterable[str], specials: Iterable[str]):
    """A byte-level BPE (``tokenizers``) trained in-process on the built-in corpus plus ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(specials)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [_BASE_CORPUS] * 4 + list(corpus)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_tokenizer(vocab_size: int = 512, corpus: Iterable[str] = ()):
    """A byte-level BPE tokenizer trained in-process, wrapped as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_trained_bpe(vocab_size, corpus, _LLAVA_SPECIALS),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token=None,
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        chat_template=None,
    )


def build_tiny_llava(spec: TinySpec = TinySpec(), seed: int = 0, tokenizer=None):
    """Return (model, processor) for a random tiny LLaVA of the given geometry."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    tokenizer = tokenizer or train_tokenizer(spec.vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=4,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text_kwargs = spec.text_kwargs(tokenizer, max_position_embeddings=spec.max_positions)
    if spec.text_family == "llama":
        text = LlamaConfig(**text_kwargs)
    elif spec.text_family == "qwen2":
        text = Qwen2Config(**text_kwargs)
    else:
        raise ValueError(f"unknown tiny text family {spec.text_family!r}: use 'llama' or 'qwen2'")
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=spec.image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def save_tiny_llava(path: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Build a tiny LLaVA and save model + processor to ``path`` (a stock-checkpoint folder)."""
    path = Path(path)
    model, processor = build_tiny_llava(spec, seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (48, 40)):
    """``n`` seeded random-noise RGB images (width, height = ``size``) for tests and benchmarks."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


# -- the Qwen2-VL family ----------------------------------------------------------------------
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")


@dataclass(frozen=True)
class TinyQwenSpec(_TinyWidths):
    """Geometry of a tiny Qwen2-VL / Qwen2.5-VL (real patch 14 and 2x2 merge, tiny widths)."""

    version: str = "2"  # "2" (Qwen2-VL) or "2.5" (Qwen2.5-VL)
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224


def train_qwen_tokenizer(vocab_size: int = 512, corpus: Iterable[str] = ()):
    """A byte-level BPE with Qwen's chat and vision specials (no BOS, EOS ``<|im_end|>``)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_trained_bpe(vocab_size, corpus, _QWEN_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",
    )


def build_tiny_qwen2vl(spec: TinyQwenSpec = TinyQwenSpec(), seed: int = 0, tokenizer=None):
    """Return (model, image_processor, tokenizer) for a random tiny Qwen2-VL or Qwen2.5-VL."""
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = tokenizer or train_qwen_tokenizer(spec.vocab_size)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = spec.text_kwargs(tokenizer, max_position_embeddings=4096,
                            rope_scaling={"type": "mrope", "mrope_section": list(spec.mrope_section)})
    if spec.version == "2":
        vision = dict(depth=spec.vision_layers, embed_dim=spec.vision_hidden, hidden_size=spec.hidden,
                      num_heads=4, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif spec.version == "2.5":
        vision = dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden, out_hidden_size=spec.hidden,
                      intermediate_size=spec.vision_hidden * 2, num_heads=4, fullatt_block_indexes=[spec.vision_layers - 1])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"unknown tiny Qwen version {spec.version!r}: use '2' or '2.5'")
    config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    return model, image_processor, tokenizer


def save_tiny_qwen2vl(path: str | Path, spec: TinyQwenSpec = TinyQwenSpec(), seed: int = 0,
                      chat_template: str | None = None, template_file: str = "chat_template.json") -> Path:
    """Save a tiny Qwen2-VL-family model as a hub-like folder: weights + config, the image processor's
    ``preprocessor_config.json`` (naming ``Qwen2VLImageProcessor`` as hub folders do), the tokenizer,
    and the chat template in ``template_file`` (``chat_template.json`` as older hub folders,
    ``chat_template.jinja`` as newer ones)."""
    import json

    from .qwen2vl import DEFAULT_CHAT_TEMPLATE

    path = Path(path)
    model, image_processor, tokenizer = build_tiny_qwen2vl(spec, seed)
    model.save_pretrained(path)
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    pre = path / "preprocessor_config.json"
    data = json.loads(pre.read_text())
    data["image_processor_type"] = "Qwen2VLImageProcessor"
    pre.write_text(json.dumps(data, indent=2))
    template = chat_template or DEFAULT_CHAT_TEMPLATE
    if template_file.endswith(".json"):
        (path / template_file).write_text(json.dumps({"chat_template": template}))
    else:
        (path / template_file).write_text(template)
    return path


# -- the Idefics3 family ----------------------------------------------------------------------
_IDEFICS_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                     "<global-img>")


@dataclass(frozen=True)
class TinyIdeficsSpec(_TinyWidths):
    """Geometry of a tiny Idefics3 / SmolVLM: (image_size / patch)^2 / scale_factor^2 visual tokens."""

    version: str = "smolvlm"  # "smolvlm" or "idefics3"
    image_size: int = 64
    patch_size: int = 8
    scale_factor: int = 2


def save_tiny_idefics3(path: str | Path, spec: TinyIdeficsSpec = TinyIdeficsSpec(), seed: int = 0) -> Path:
    """Save a random tiny Idefics3 or SmolVLM as a hub-like folder (weights, config, image processor,
    tokenizer, ``chat_template.jinja``); the image processor keeps the family's default of splitting."""
    import torch
    import transformers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from .idefics3 import DEFAULT_CHAT_TEMPLATE

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_trained_bpe(spec.vocab_size, (), _IDEFICS_SPECIALS), bos_token="<|im_start|>",
        eos_token="<end_of_utterance>", pad_token="<|endoftext|>", unk_token=None, padding_side="left")
    prefix = {"smolvlm": "SmolVLM", "idefics3": "Idefics3"}[spec.version]
    vision = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_hidden * 2,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=4, image_size=spec.image_size,
                  patch_size=spec.patch_size)
    text = LlamaConfig(**spec.text_kwargs(tokenizer))
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=text.to_dict(), scale_factor=spec.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    image_processor = getattr(transformers, f"{prefix}ImageProcessorPil")(
        size={"longest_edge": spec.image_size * 2}, max_image_size={"longest_edge": spec.image_size})
    path = Path(path)
    model.save_pretrained(path)
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    return path
