"""2-D (row, column) rotary positions for a LLaVA demo base's visual tokens, as an experiment.

The demo base is a LLaVA with a Llama LLM, whose RoPE sees one id per token: the 8x8 visual tokens
are ids ``first .. first + 63`` in row-major order, so a row is 8 ids apart and a column 1 (and
``position_errors.py --layout`` shows the base took the row from the ids and the column from content).
Qwen2-VL's M-RoPE gives a visual token three ids (time, row, column) and text the same id three
times; this module does that inside Llama's rotary embedding, for an experiment only:

* a 1-D id ``p`` is mapped to (t, h, w): text before the image keeps (p, p, p); the visual token
  ``k = p - first`` gets (first, first + k // side, first + k % side); text after the image resumes
  at ``first + side`` (Qwen2-VL's layout), i.e. (p - count + side) three times;
* the rotary frequencies are split between t, h and w interleaved (frequency i reads section i % 3,
  as Qwen3-VL's interleaved M-RoPE), so rows and columns both get a spread of frequencies.

Text-only sequences are unchanged (every section reads the same id). The mapping needs the visual
block at the same 1-D ids in every row, which holds for the base's pass-2 sequences (the chat text
before the image has a fixed length; training and answering both number the first real token 0).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from fwd2bot_index.model.pooling import grid_side


def square_side(count: int) -> int:
    """The side of the square grid of ``count`` visual tokens (a LLaVA's 8x8 for the demo base)."""
    side = grid_side(count)
    if side is None:
        raise ValueError(f"{count} visual tokens are not a square grid")
    return side


def grid_ids(position_ids: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """(3, ...) M-RoPE ids (time, row, column) for 1-D ``position_ids`` with a square visual grid of
    ``count`` tokens starting at id ``first``."""
    side = square_side(count)
    p = position_ids
    k = (p - first).clamp(0, count - 1)
    inside = (p >= first) & (p < first + count)
    after = p >= first + count
    text = torch.where(after, p - count + side, p)
    t = torch.where(inside, torch.full_like(p, first), text)
    h = torch.where(inside, first + k // side, text)
    w = torch.where(inside, first + k % side, text)
    return torch.stack([t, h, w])


@contextlib.contextmanager
def grid_rope(first: int, count: int = 64) -> Iterator[None]:
    """Within the block, every Llama rotary embedding reads 2-D ids for the visual grid (see module)."""
    from transformers.models.llama import modeling_llama

    cls = modeling_llama.LlamaRotaryEmbedding
    original = cls.forward

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        ids = grid_ids(position_ids, first, count).float()  # (3, B, L)
        inv = self.inv_freq.to(device=x.device, dtype=torch.float)
        section = torch.arange(inv.shape[0], device=x.device) % 3  # interleaved t, h, w
        chosen = ids.permute(1, 2, 0)[..., section]  # (B, L, F): each frequency's own id
        freqs = chosen * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype))

    cls.forward = forward
    try:
        yield
    finally:
        cls.forward = original


def visual_block_start(model) -> int:
    """The 1-D id of the first visual token in the base's answering layout (the chat text before it)."""
    before, _, _ = model.pass2_parts(torch.zeros(1, model.backbone.config.text_config.hidden_size), "?", "full")
    return int(before.shape[0])


def positions_for(model, positions: str) -> contextlib.AbstractContextManager:
    """The scripts' ``--positions``: ``1d`` as the base was trained (nothing changes), ``2d`` this module's ids
    for ``model``'s visual block."""
    if positions == "1d":
        return contextlib.nullcontext()
    return grid_rope(visual_block_start(model), int(model.backbone.config.image_seq_length))
