"""Average pooling of visual tokens (LLaVolta's visual context compressor).

Visual tokens come from a square patch grid, so pooling is 2-D where the budget allows it (a 24x24
grid to 4x4 keeps spatial neighbourhoods together) and 1-D along the sequence otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _grid_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def pool_visual_tokens(tokens: torch.Tensor, budget: int) -> torch.Tensor:
    """(B, N, H) -> (B, budget, H) by average pooling; budget >= N returns the tokens unchanged."""
    batch, n, hidden = tokens.shape
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    if budget >= n:
        return tokens
    side, out_side = _grid_side(n), _grid_side(budget)
    if side is not None and out_side is not None:
        grid = tokens.transpose(1, 2).reshape(batch, hidden, side, side)
        pooled = F.adaptive_avg_pool2d(grid.float(), out_side)
        return pooled.reshape(batch, hidden, budget).transpose(1, 2).to(tokens.dtype)
    pooled = F.adaptive_avg_pool1d(tokens.transpose(1, 2).float(), budget)
    return pooled.transpose(1, 2).to(tokens.dtype)


def pool_by_stride(tokens: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, N, H) -> (B, ceil-free N/stride^2 or N/stride, H): LLaVolta's stride-s pooling.

    On a square grid the stride applies to both sides (stride 2 keeps a quarter of the tokens);
    otherwise it applies along the sequence.
    """
    if stride <= 1:
        return tokens
    batch, n, hidden = tokens.shape
    side = _grid_side(n)
    if side is not None and side % stride == 0:
        grid = tokens.transpose(1, 2).reshape(batch, hidden, side, side)
        pooled = F.avg_pool2d(grid.float(), stride)
        return pooled.flatten(2).transpose(1, 2).to(tokens.dtype)
    keep = n // stride
    pooled = F.avg_pool1d(tokens[:, : keep * stride].transpose(1, 2).float(), stride)
    return pooled.transpose(1, 2).to(tokens.dtype)
