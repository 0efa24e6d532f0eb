"""Average pooling of visual tokens (LLaVolta's visual context compressor).

Visual tokens come from a 2-D patch grid, so pooling is 2-D at every budget (a 24x24 grid to 4x4
keeps spatial neighbourhoods together; a budget of 8 on an 8x8 grid uses 2x4 windows of 4x2
patches) and 1-D along the sequence only when the tokens form no known grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_side(n: int) -> int | None:
    """The side of a square grid of ``n`` tokens, or ``None`` when ``n`` is not a square."""
    side = math.isqrt(n)
    return side if side * side == n else None


def budget_grid(rows: int, cols: int, budget: int) -> tuple[int, int] | None:
    """The (rows, cols) output grid of ``budget`` cells whose aspect is closest to the input's.

    A budget that is not a square (8 on an 8x8 grid) still pools 2-D, with non-square windows
    (2x4 cells of 4x2 patches), so neighbourhoods stay together; ``None`` when no factorization fits
    inside the grid (then pooling falls back to 1-D along the sequence).
    """
    options = [(r, budget // r) for r in range(1, budget + 1) if budget % r == 0]
    options = [(r, c) for r, c in options if r <= rows and c <= cols]
    if not options:
        return None
    target = math.log(rows / cols)
    return min(options, key=lambda rc: (abs(math.log(rc[0] / rc[1]) - target), -rc[0]))


def pool_grid(tokens: torch.Tensor, rows: int, cols: int, budget: int) -> torch.Tensor:
    """(B, rows*cols, H) tokens of a row-major 2-D grid -> (B, budget, H) by 2-D average pooling.

    Windows are PyTorch's adaptive pooling windows: when the grid does not divide evenly they have
    unequal sizes (and may share a row or column), so every token counts and none is dropped.
    """
    batch, n, hidden = tokens.shape
    if n != rows * cols:
        raise ValueError(f"{n} tokens do not form a {rows}x{cols} grid")
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    if budget >= n:
        return tokens
    out = budget_grid(rows, cols, budget)
    if out is None:
        pooled = F.adaptive_avg_pool1d(tokens.transpose(1, 2).float(), budget)
        return pooled.transpose(1, 2).to(tokens.dtype)
    grid = tokens.transpose(1, 2).reshape(batch, hidden, rows, cols)
    pooled = F.adaptive_avg_pool2d(grid.float(), out)
    return pooled.reshape(batch, hidden, budget).transpose(1, 2).to(tokens.dtype)


def pool_visual_tokens(tokens: torch.Tensor, budget: int) -> torch.Tensor:
    """(B, N, H) -> (B, budget, H) by average pooling; budget >= N returns the tokens unchanged.

    Tokens of a square patch grid pool 2-D at every budget (see ``pool_grid``); other counts pool
    1-D along the sequence.
    """
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    n = tokens.shape[1]
    side = grid_side(n)
    if side is not None:
        return pool_grid(tokens, side, side, budget)
    if budget >= n:
        return tokens
    pooled = F.adaptive_avg_pool1d(tokens.transpose(1, 2).float(), budget)
    return pooled.transpose(1, 2).to(tokens.dtype)


def pool_by_stride(tokens: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, N, H) -> (B, N // stride, H): LLaVolta's stride-``s`` pooling, which keeps N/s tokens.

    LLaVolta average-pools 1-D along the visual-token sequence (``avgpool1d``, stride s). On a square
    patch grid we keep the same ratio but pool 2-D (``pool_grid`` to a budget of N/s), so a pooled
    token averages a compact neighbourhood instead of a strip of one row; other counts pool 1-D
    exactly as LLaVolta does.
    """
    if stride <= 1:
        return tokens
    n = tokens.shape[1]
    keep = max(1, n // stride)
    side = grid_side(n)
    if side is not None:
        return pool_grid(tokens, side, side, keep)
    pooled = F.avg_pool1d(tokens[:, : keep * stride].transpose(1, 2).float(), stride)
    return pooled.transpose(1, 2).to(tokens.dtype)
