"""The Qwen2-VL family (Qwen2-VL, Qwen2.5-VL) behind the backbone seam.

What differs from LLaVA, and the choices made here:

* **Dynamic resolution.** Each image keeps (about) its own aspect ratio: 14-px patches, merged 2x2, so
  an image gives ``h * w`` visual tokens on its own merged grid (``image_grid_thw / [1, 2, 2]``),
  bounded by ``min_pixels`` / ``max_pixels``. Visual tokens are therefore a ``GridTokens`` (one
  ``(h*w, H)`` tensor and one ``(h, w)`` grid per image), never one padded tensor, so a batch of mixed
  sizes gives what each image gives alone.
* **M-RoPE.** The decoder takes (temporal, height, width) positions. A sequence is laid out as
  transformers' ``get_rope_index`` does for a real prompt: text tokens advance all three by one; an
  image grid at offset ``p`` gets ``(p, p + row, p + col)`` and the text after it resumes at
  ``p + max(h, w)``. Summary tokens are *text-like* (all three components equal, consecutive), in pass 1
  (after the compression prompt) and in pass 2 (where they stand in for the image): their relative
  layout is then identical in both passes and independent of the image's size, and pass 2 needs
  nothing but the stored ``(K, H)`` matrix. Pooled tokens (``pool@N``) are placed in pass 2 on their
  fixed pooled grid, as transformers would place an image with that merged grid: the grid follows
  from N alone, so the stored ``(N, H)`` matrix is again all pass 2 needs. In pass 1 every grid,
  pooled by the training schedule or not, is placed as a grid. Base pretraining (``--objective
  pretrain``) feeds all visual tokens to pass 2 at text positions (the trainer passes bare tensors).
* **Pooling to a budget** (``pool@N``): each image's merged grid is average-pooled to one fixed grid of
  ``N`` cells (rows x cols, the most square factorization, rows <= cols) with
  ``adaptive_avg_pool2d``: a grid that does not divide evenly gets windows that differ by one cell and
  may overlap; a grid smaller than the target repeats cells. Every image stores exactly N tokens.
* **``full`` is refused**: the count varies per image and the token store holds one ``(T, H)`` shape
  per collection; ``pool@N`` or ``fwd2bot`` keep a fixed cost per image.
* **Loading without torchvision**: transformers 5 cannot build the combined ``Qwen2VLProcessor``
  without torchvision (its video processor), so the image processor, the tokenizer and the chat
  template are loaded separately (``parts.ProcessorParts``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .backbone import ChatParts, ImageOptionError, LlavaBackbone
from .parts import ProcessorParts, load_parts
from .pooling import budget_grid

ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
MODEL_TYPES = {"qwen2_vl": ARCHITECTURES[0], "qwen2_5_vl": ARCHITECTURES[1]}
IMAGE_PAD = "<|image_pad|>"

# The Qwen2-VL-Instruct template (used only when a folder ships none, e.g. a base checkpoint).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class GridPixels:
    """What ``pixel_values`` returns for this family: flat patches plus each image's (t, h, w) grid."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor

    def __len__(self) -> int:
        return int(self.grid_thw.shape[0])


@dataclass
class GridTokens:
    """Per-image visual tokens of varying length, each with its (rows, cols) grid.

    Iterating or indexing yields the ``(rows*cols, H)`` tensors, so code that walks a batch image by
    image (pass 2, the trainer) works as it does on a ``(B, N, H)`` tensor.
    """

    tokens: list[torch.Tensor]
    grids: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.tokens)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tokens[index]


def stored_grid(budget: int) -> tuple[int, int]:
    """The one grid ``pool@budget`` stores every image on: the most square rows x cols, rows <= cols.

    Fixed by the budget alone (not each image's aspect, as ``pooling.budget_grid`` would choose), so
    pass 2 can place the stored tokens from their count.
    """
    rows = max(d for d in range(1, math.isqrt(budget) + 1) if budget % d == 0)
    return rows, budget // rows


def stride_grid(rows: int, cols: int, stride: int) -> tuple[int, int]:
    """The grid LLaVolta's stride ``s`` pools an image's (rows, cols) grid to: about rows*cols/s cells.

    ``pooling.budget_grid`` when N/s factors inside the grid, else the largest grid of at most N/s
    cells with the closest aspect.
    """
    keep = max(1, rows * cols // stride)
    found = budget_grid(rows, cols, keep)
    if found is not None:
        return found
    aspect = math.log(rows / cols)
    cells = [(r, c) for r in range(1, rows + 1) for c in range(1, cols + 1) if r * c <= keep]
    return max(cells, key=lambda rc: (rc[0] * rc[1], -abs(math.log(rc[0] / rc[1]) - aspect)))


def _pool_grid(tokens: torch.Tensor, grid: tuple[int, int], out: tuple[int, int]) -> torch.Tensor:
    """(h*w, H) on an (h, w) grid -> (out_h*out_w, H) by adaptive average pooling."""
    h, w = grid
    cells = tokens.t().reshape(1, -1, h, w).float()
    pooled = F.adaptive_avg_pool2d(cells, out)
    return pooled.reshape(tokens.shape[-1], -1).t().to(tokens.dtype)


def visual_token_count(width: int, height: int, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
                       patch_size: int = 14, merge_size: int = 2) -> int:
    """Visual tokens the Qwen2-VL processor gives an image of this size (its own ``smart_resize``, then
    one token per merged 28x28 cell). Used for the README's bytes-per-image table."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    factor = patch_size * merge_size
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // factor) * (w // factor)


def grid_positions(start: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(3, h*w) M-RoPE positions of one image grid placed at ``start`` (as ``get_rope_index``)."""
    h, w = grid
    rows = torch.arange(h, device=device).view(-1, 1).expand(h, w).reshape(-1)
    cols = torch.arange(w, device=device).view(1, -1).expand(h, w).reshape(-1)
    return torch.stack([torch.zeros_like(rows), rows, cols]) + start


def _text_positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device).view(1, -1).expand(3, -1)


def _layout(start: int, grid: tuple[int, int], rest: int, device: torch.device) -> torch.Tensor:
    """(3, start + h*w + rest) positions: text, an image grid at ``start``, text resuming after the grid."""
    return torch.cat([_text_positions(0, start, device), grid_positions(start, grid, device),
                      _text_positions(start + max(grid), rest, device)], dim=1)


def load_processor_parts(ref: str, revision: str | None = None, min_pixels: int | None = None,
                         max_pixels: int | None = None) -> ProcessorParts:
    """The image processor (Pil class without torchvision), tokenizer and chat template, with the bounds."""
    size_args = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    parts = load_parts(ref, revision, "Qwen2VLImageProcessorPil", DEFAULT_CHAT_TEMPLATE, **size_args)
    low, high = parts.image_processor.size["shortest_edge"], parts.image_processor.size["longest_edge"]
    if low > high:
        raise ImageOptionError(f"{ref}: min_pixels ({low}) is larger than max_pixels ({high}); give both "
                               "--min-pixels and --max-pixels, the first no larger than the second")
    return parts


class Qwen2VLBackbone(LlavaBackbone):
    """Adapter over ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``."""

    family = "qwen2_vl"
    image_placeholder = IMAGE_PAD
    variable_image_tokens = True

    def __init__(self, hf_model: Any, processor: Any, reference: str, revision: str | None = None):
        super().__init__(hf_model, processor, reference, revision)
        self.family = str(self.hf.config.model_type)  # qwen2_vl or qwen2_5_vl
        self.merge = int(self.hf.config.vision_config.spatial_merge_size)

    # -- geometry --------------------------------------------------------------------------
    @property
    def pixel_bounds(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) of the image processor: they decide how many tokens an image gets."""
        size = self.processor.image_processor.size
        return int(size["shortest_edge"]), int(size["longest_edge"])

    def image_options(self) -> dict:
        low, high = self.pixel_bounds
        return {"min_pixels": low, "max_pixels": high}

    @property
    def num_image_tokens(self) -> int:
        """Nominal count: a square image at ``max_pixels`` (the trainer's stride schedule uses it)."""
        patch = int(self.processor.image_processor.patch_size) * self.merge
        side = max(1, math.isqrt(self.pixel_bounds[1]) // patch)
        return side * side

    def pooled_tokens(self, budget: int) -> int:
        return budget

    @property
    def projector(self) -> torch.nn.Module:
        return self.hf.model.visual.merger  # the 2x2 patch merger is this family's projector

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.hf.model.visual

    # -- inputs ----------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Any]) -> GridPixels:
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return GridPixels(out["pixel_values"].to(self.device, self.dtype), out["image_grid_thw"].to(self.device))

    def visual_tokens(self, pixels: GridPixels) -> GridTokens:
        out = self.hf.get_image_features(pixel_values=pixels.pixel_values, image_grid_thw=pixels.grid_thw)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        grids = [(int(t) * int(h) // self.merge, int(w) // self.merge) for t, h, w in pixels.grid_thw.tolist()]
        return GridTokens(list(feats), grids)

    def chat(self, prompt: str) -> ChatParts:
        """The family's chat template with the image as an image content item."""
        return self.chat_with_image_item(prompt)

    # -- running ---------------------------------------------------------------------------
    def run_image_prompt(self, before: torch.Tensor, visual: GridTokens, after: torch.Tensor,
                         tail: torch.Tensor | None = None) -> torch.Tensor:
        """Each image's own sequence with M-RoPE grid positions; left-padded, so the last positions
        (the tail, or the last prompt token) line up across the batch."""
        seqs, positions = [], []
        device = before.device
        for tokens, grid in zip(visual.tokens, visual.grids):
            parts = [before, tokens.to(before.dtype), after] + ([tail] if tail is not None else [])
            seqs.append(torch.cat(parts))
            rest = after.shape[0] + (tail.shape[0] if tail is not None else 0)
            positions.append(_layout(before.shape[0], grid, rest, device))
        longest = max(s.shape[0] for s in seqs)
        embeds = seqs[0].new_zeros(len(seqs), longest, seqs[0].shape[-1])
        mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=device)
        pos = torch.zeros(3, len(seqs), longest, dtype=torch.long, device=device)
        for i, (seq, p) in enumerate(zip(seqs, positions)):
            embeds[i, longest - seq.shape[0]:] = seq
            mask[i, longest - seq.shape[0]:] = 1
            pos[:, i, longest - seq.shape[0]:] = p
        return self.run_decoder(embeds, mask, positions=pos)

    def stored_positions(self, mask: torch.Tensor, blocks: Sequence[tuple[int, int]], kind: str) -> torch.Tensor | None:
        """Pooled tokens (``pool@N``) sit on their fixed pooled grid, as a small image would; summary tokens
        (and everything else) keep consecutive text positions, as in pass 1."""
        if kind != "pool":
            return None
        batch, length = mask.shape
        positions = torch.zeros(3, batch, length, dtype=torch.long, device=mask.device)
        for i, (start, count) in enumerate(blocks):
            real = int(mask[i].sum())
            positions[:, i, length - real:] = _layout(start, stored_grid(count), real - start - count, mask.device)
        return positions

    def pool_to_budget(self, visual: GridTokens, budget: int) -> torch.Tensor:
        """(B, budget, H): every image's grid pooled to the same ``stored_grid(budget)``."""
        target = stored_grid(budget)
        return torch.stack([_pool_grid(t, g, target) for t, g in zip(visual.tokens, visual.grids)])

    def pool_by_stride(self, visual: GridTokens, stride: int) -> GridTokens:
        """LLaVolta's stride pooling on each image's grid: about N/s tokens (as ``pooling.pool_by_stride``
        keeps N/s), 2-D on ``stride_grid`` by adaptive average pooling (uneven windows where a side does
        not divide), so the pooled tokens keep a grid for their M-RoPE positions."""
        if stride <= 1:
            return visual
        grids = [stride_grid(h, w, stride) for h, w in visual.grids]
        return GridTokens([_pool_grid(t, g, o) for t, g, o in zip(visual.tokens, visual.grids, grids)], grids)

    def generation_eos(self) -> list[int]:
        """The tokenizer's EOS plus ``<|im_end|>`` (an instruct turn ends there)."""
        ids = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
        return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != self.tokenizer.unk_token_id)

    def signature(self) -> dict:
        """As LLaVA's, with the exact architecture; no image-token count (it varies per image and with
        ``max_pixels``, which a user may change without changing the weights)."""
        signature = super().signature()
        signature.update(architecture=type(self.hf).__name__, num_image_tokens=None)
        return signature
