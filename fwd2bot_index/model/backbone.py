"""Backbone adapters: the one seam between Fwd2Bot and a model family.

Fwd2Bot needs six things from a vision-language model: preprocess images, project them into visual
tokens in the LLM's input-embedding space, embed text ids, run the decoder on embeddings, map
hidden states to logits, and generate from embeddings. ``LlavaBackbone`` provides them for every
checkpoint transformers loads as ``LlavaForConditionalGeneration``; ``qwen2vl.Qwen2VLBackbone`` does for
Qwen2-VL and Qwen2.5-VL (dynamic resolution, M-RoPE). Another family (LLaVA-OneVision, Idefics3) is one
more class registered in ``_adapters()``. Sequences that hold an image are run through
``run_image_prompt`` and pooled through ``pool_to_budget`` / ``pool_by_stride``, so a family whose images
differ in token count (and position layout) can lay them out its own way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import LORA_TARGETS

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class UnsupportedModelError(ValueError):
    """The checkpoint is not an architecture Fwd2Bot has a backbone adapter for."""


class ImageOptionError(UnsupportedModelError):
    """Image preprocessing options (min/max pixels) that this model cannot take, or that contradict."""


class ModelLoadError(RuntimeError):
    """The checkpoint could not be found or read."""


def resolve_device(device: str | None) -> torch.device:
    """'auto' (or None) picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on CUDA and fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of fp32, bf16, fp16, auto") from None


_SLOT = "\u2063PROMPT\u2063"


@dataclass(frozen=True)
class ChatParts:
    """A prompt split around the image slot: ``before`` + <visual tokens> + ``after``."""

    before: str
    after: str


class LlavaBackbone:
    """Adapter over ``LlavaForConditionalGeneration`` (transformers 5.x layout).

    ``hf`` may later be wrapped by peft; LoRA layers are injected in place, so the decoder reached
    through ``hf.model.language_model`` always runs with whichever adapter is active.
    """

    family = "llava"
    image_placeholder = "<image>"
    lora_targets = LORA_TARGETS  # LoRA goes into the LLM's projections only, never the vision tower
    variable_image_tokens = False  # every image gives num_image_tokens tokens

    def __init__(self, hf_model: Any, processor: Any, reference: str, revision: str | None = None):
        self.hf = hf_model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.reference = reference
        self.revision = revision
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -- geometry --------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def hidden_size(self) -> int:
        return int(self.hf.config.text_config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.hf.config.text_config.num_hidden_layers)

    @property
    def device(self) -> torch.device:
        return self.hf.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.get_input_embeddings().weight.dtype

    @property
    def num_image_tokens(self) -> int:
        vision = self.hf.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        if self.hf.config.vision_feature_select_strategy == "full":
            n += 1
        return n

    def image_options(self) -> dict:
        """Preprocessing settings a collection must record (none: every image is resized to one size)."""
        return {}

    def pooled_tokens(self, budget: int) -> int:
        """How many tokens ``pool_to_budget`` keeps per image."""
        return min(budget, self.num_image_tokens)

    @property
    def decoder(self) -> torch.nn.Module:
        return self.hf.model.language_model

    @property
    def projector(self) -> torch.nn.Module:
        """The module mapping vision features into the LLM's input space (trained by ``--train-projector``)."""
        return self.hf.model.multi_modal_projector

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.hf.model.vision_tower

    # -- inputs ----------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> normalized pixel tensor on the model's device and dtype."""
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype)

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, H): projected visual tokens in the input-embedding space."""
        out = self.hf.get_image_features(pixel_values=pixel_values)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        return feats

    def token_ids(self, text: str, bos: bool = False) -> list[int]:
        """Token ids without the tokenizer's own specials; BOS prepended explicitly when asked."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        return ids

    def embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        """(L,) ids -> (L, H) input embeddings."""
        t = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        return self.hf.get_input_embeddings()(t)

    def chat(self, prompt: str) -> ChatParts:
        """Wrap a user turn containing one ``<image>`` slot in the model's chat template.

        Without a template (tiny test models) the LLaVA-1.5 convention is used.
        """
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        if template:
            turn = [{"role": "user", "content": [{"type": "text", "text": _SLOT}]}]
            rendered = self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            bos = self.tokenizer.bos_token
            if bos and rendered.startswith(bos):
                rendered = rendered[len(bos) :]  # BOS is added once, as an id, by token_ids()
            text = rendered.replace(_SLOT, prompt)
        else:
            text = f"USER: {prompt} ASSISTANT:"
        before, _, after = text.partition(self.image_placeholder)
        return ChatParts(before=before, after=after)

    def chat_with_image_item(self, prompt: str) -> ChatParts:
        """Like ``chat``, but the image goes in as an image content item (as these families' processors
        write it), rendered by the template as ``image_placeholder``; text right after it starts flush."""
        head, has_image, tail = prompt.partition("<image>")
        content: list[dict] = [{"type": "text", "text": _SLOT}]
        if has_image:
            content = ([{"type": "text", "text": head}] if head.strip() else []) + [{"type": "image"}] + content
        turn = [{"role": "user", "content": content}]
        rendered = self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        bos = self.tokenizer.bos_token
        if bos and rendered.startswith(bos):
            rendered = rendered[len(bos):]  # BOS is added once, as an id, by token_ids()
        text = rendered.replace(_SLOT, tail.lstrip("\n") if has_image else head)
        before, _, after = text.partition(self.image_placeholder)
        return ChatParts(before=before, after=after)

    # -- running ---------------------------------------------------------------------------
    def run_decoder(self, embeds: torch.Tensor, mask: torch.Tensor,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
        """Last-layer hidden states (after the final norm) for left-padded embedded sequences.

        ``positions`` defaults to consecutive positions of the real (unpadded) tokens.
        """
        if positions is None:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
        return out.last_hidden_state

    def run_image_prompt(self, before: torch.Tensor, visual: torch.Tensor, after: torch.Tensor,
                         tail: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states of ``before`` + each image's visual tokens + ``after`` (+ ``tail``), (B, L, H).

        The last positions of every row are ``tail`` (or ``after``), whatever the image.
        """
        batch = visual.shape[0]
        parts = [before.expand(batch, -1, -1), visual, after.expand(batch, -1, -1)]
        if tail is not None:
            parts.append(tail.expand(batch, -1, -1))
        seq = torch.cat(parts, dim=1)
        mask = torch.ones(seq.shape[:2], dtype=torch.long, device=seq.device)
        return self.run_decoder(seq, mask)

    def pool_to_budget(self, visual: torch.Tensor, budget: int) -> torch.Tensor:
        """Visual tokens average-pooled to the stored ``pool@budget`` form, (B, T, H)."""
        from .pooling import pool_visual_tokens

        return pool_visual_tokens(visual, budget)

    def pool_by_stride(self, visual: torch.Tensor, stride: int) -> torch.Tensor:
        """LLaVolta's stride pooling of the visual tokens before the LLM (staged training)."""
        from .pooling import pool_by_stride

        return pool_by_stride(visual, stride)

    def generation_eos(self) -> int | list[int]:
        return self.tokenizer.eos_token_id

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(hidden)

    def stored_positions(self, mask: torch.Tensor, blocks: Sequence[tuple[int, int]], kind: str) -> torch.Tensor | None:
        """Position ids for pass-2 rows holding stored tokens at ``blocks`` (start, count) of each unpadded
        row; ``None``: consecutive positions (every stored kind in a LLaVA model)."""
        return None

    def generate(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, streamer=None,
                 positions: torch.Tensor | None = None):
        """Greedy generation from embedded prompts; returns only the new token ids.

        ``positions``: explicit position ids of the prompt (new tokens continue from the last one).
        """
        eos = self.generation_eos()
        extra = {} if positions is None else {"position_ids": positions}
        return self.hf.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            **extra,
        )

    # -- identity --------------------------------------------------------------------------
    def signature(self) -> dict:
        """A content signature of the base weights: geometry plus a probe of the embedding matrix.

        Stored in a compressor checkpoint so that loading it onto another base fails clearly.
        The probe is dtype-tolerant (compared with a relative tolerance), not a path.
        """
        emb = self.hf.get_input_embeddings().weight.detach()
        rows = emb[: min(64, emb.shape[0])].float().cpu()
        probe = rows.sum(dim=1).tolist()
        text = self.hf.config.text_config
        return {
            "family": self.family,
            "text_model_type": text.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "vocab_size": int(emb.shape[0]),
            "num_image_tokens": self.num_image_tokens,
            "embedding_probe": [round(x, 6) for x in probe],
        }


def _adapters() -> tuple[dict[str, type], dict[str, str]]:
    """Architecture name -> adapter class, and config ``model_type`` -> architecture name."""
    from . import idefics3, qwen2vl

    adapters: dict[str, type] = {"LlavaForConditionalGeneration": LlavaBackbone}
    adapters.update({arch: qwen2vl.Qwen2VLBackbone for arch in qwen2vl.ARCHITECTURES})
    adapters.update({arch: idefics3.Idefics3Backbone for arch in idefics3.ARCHITECTURES})
    return adapters, {"llava": "LlavaForConditionalGeneration", **qwen2vl.MODEL_TYPES, **idefics3.MODEL_TYPES}


def supported_architectures() -> list[str]:
    return sorted(_adapters()[0])


def _architecture(config: Any) -> str | None:
    adapters, model_types = _adapters()
    for arch in getattr(config, "architectures", None) or []:
        if arch in adapters:
            return arch
    return model_types.get(getattr(config, "model_type", None))


def load_backbone(
    name_or_path: str | Path,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> LlavaBackbone:
    """Load a stock checkpoint (local folder or hub id) through its family's adapter.

    ``min_pixels`` / ``max_pixels`` bound the resized image of dynamic-resolution families (Qwen2-VL);
    a fixed-resolution family refuses them rather than ignoring them.
    """
    from transformers import AutoConfig, AutoProcessor

    ref = str(name_or_path)
    try:
        config = AutoConfig.from_pretrained(ref, revision=revision)
    except (OSError, ValueError) as exc:
        hint = " (no network: set HF_HUB_OFFLINE=1 and use a local folder)" if not Path(ref).exists() else ""
        raise ModelLoadError(f"cannot load model {ref!r}: {exc}{hint}") from exc
    arch = _architecture(config)
    if arch is None:
        found = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise UnsupportedModelError(
            f"{ref}: architecture {found} is not supported. Supported: "
            f"{', '.join(supported_architectures())} (LLaVA-1.5, llava-interleave-qwen and other "
            "checkpoints transformers loads as LlavaForConditionalGeneration; Qwen2-VL; Qwen2.5-VL; Idefics3; "
            "SmolVLM)."
        )
    import transformers

    from . import idefics3, qwen2vl

    adapter = _adapters()[0][arch]
    if adapter is qwen2vl.Qwen2VLBackbone:
        processor = qwen2vl.load_processor_parts(ref, revision, min_pixels=min_pixels, max_pixels=max_pixels)
    elif min_pixels is not None or max_pixels is not None:
        raise ImageOptionError(f"{ref}: --min-pixels/--max-pixels apply to dynamic-resolution models (Qwen2-VL "
                         f"family); {arch} resizes every image to one fixed size")
    elif adapter is idefics3.Idefics3Backbone:
        processor = idefics3.load_processor_parts(ref, config.model_type, revision)
    else:
        processor = AutoProcessor.from_pretrained(ref, revision=revision)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if torch_device.type == "cpu":
        from .allocator import tune_malloc

        tune_malloc()  # activations freed and allocated every layer: keep them out of mmap/munmap
    model_cls = getattr(transformers, arch)
    hf = model_cls.from_pretrained(ref, revision=revision, dtype=torch_dtype).to(torch_device).eval()
    return adapter(hf, processor, reference=ref, revision=revision)


def quiet_transformers() -> None:
    """Keep library progress bars and advisory warnings off stderr for CLI use."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging is best effort
        pass
