"""Nested budgets (Matryoshka over summary tokens): the first k of K summary tokens are a complete
stored form for every k in a trained set, so one compressor serves 4, 8, 16 or 32 tokens per image.

Pass 1 is causal: summary token i attends to the image, the prompt and summary tokens before it,
never after. The first k tokens of a K-token encode are therefore exactly what a k-token encode
would give; what nested training adds is making them *good* on their own: both losses are applied
to the truncated summary ``summary[:, :k]`` (the contrastive head pools only those k; pass 2 reads
only those k), as Matryoshka representation learning does for embedding dimensions.

What a step computes, and why:

- **contrastive: every budget of the set, averaged.** The head is a mean over tokens plus one linear
  layer, and the text side is embedded once and shared, so each extra budget costs one (B, B)
  similarity matrix. Averaging over all budgets (not sampling one) gives every prefix a gradient every
  step, which is what keeps the small budgets' retrieval close to a separately trained compressor.
- **autoregressive: one budget per step, sampled uniformly from the set.** Pass 2 is a full LLM
  forward and backward over the stored tokens plus the target text: doing it for every budget would
  multiply the step's cost by the number of budgets. One sampled budget costs what a plain step costs
  and, in expectation, trains each budget equally. The draw is seeded by (seed, step) only, so a
  resumed run, every micro-batch of a step and every data-parallel rank draw the same budget.

The public entry point is ``nested_losses``: a trainer passes the (B, K, H) summary and two callables
that compute its own contrastive / autoregressive loss from a truncated summary, so the house trainer
and the demo recipe's hard-negative trainer share the budget logic without sharing their losses.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .config import TrainingError

__all__ = ["ar_budget_at", "coarse_to_fine_orders", "nested_losses", "parse_budgets"]

#: a fixed stream id so the budget draw never collides with the batch order's or the captions' draws
_STREAM = 24


def parse_budgets(value: str | Iterable[int] | None, num_summary_tokens: int | None = None) -> list[int]:
    """``"4,8,16,32"`` or ``[4, 8, 16, 32]`` -> ``[4, 8, 16, 32]``; refuses, in one line, values that are
    not whole positive numbers in increasing order, and a set whose largest differs from an explicit K."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        try:
            budgets = [int(p) for p in parts]
        except ValueError:
            raise TrainingError(f"--nested {value!r}: give whole numbers separated by commas, e.g. 4,8,16,32") from None
    else:
        try:
            budgets = [int(v) for v in value]
        except (TypeError, ValueError):
            raise TrainingError(f"nested {value!r}: give a list of whole numbers, e.g. [4, 8, 16, 32]") from None
    shown = ",".join(str(b) for b in budgets)
    if any(b < 1 for b in budgets):
        raise TrainingError(f"--nested {shown}: every budget must be at least 1 token")
    if any(b >= c for b, c in zip(budgets, budgets[1:])):
        raise TrainingError(f"--nested {shown}: budgets must be strictly increasing, e.g. 4,8,16,32")
    if num_summary_tokens is not None and budgets[-1] != num_summary_tokens:
        raise TrainingError(f"--nested {shown}: the largest budget is K, but -K is {num_summary_tokens}; "
                            f"drop -K or make the last budget {num_summary_tokens}")
    return budgets


def ar_budget_at(budgets: Sequence[int], seed: int, step: int) -> int:
    """The budget pass 2 trains at on optimizer step ``step`` (uniform over the set, seeded by
    (seed, step) so a resume, every micro-batch and every rank agree)."""
    if not budgets:
        raise ValueError("no budgets")
    rng = np.random.default_rng([int(seed), int(step), _STREAM])
    return int(budgets[int(rng.integers(len(budgets)))])


def nested_losses(summary: torch.Tensor, budgets: Sequence[int], step: int, seed: int,
                  contrastive: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                  autoregressive: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  distill: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The loss parts of one batch under nested training (see the module docstring).

    ``summary`` is the (B, K, H) pass-1 output; ``contrastive(s)`` and ``autoregressive(s)`` compute the
    trainer's own losses from a truncated (B, k, H) summary (``contrastive`` may return None when the batch
    cannot form pairs). Returns ``contrastive`` (the mean over all budgets), ``contrastive@k`` per budget
    (for the logs), ``autoregressive`` (at one sampled budget) and ``ar_budget`` (that budget, a tensor so
    it is logged like the losses) and, given ``distill``, ``distill`` (the mean over all budgets: cheap, no
    LLM pass; each prefix k is pulled toward its own pool@k). The caller weights and sums them into its ``loss``.
    """
    if not budgets:
        raise ValueError("nested_losses needs at least one budget")
    if budgets[-1] > summary.shape[1]:
        raise ValueError(f"budget {budgets[-1]} exceeds the {summary.shape[1]} summary tokens")
    parts: dict[str, torch.Tensor] = {}
    if contrastive is not None:
        per_budget = []
        for k in budgets:
            value = contrastive(summary[:, :k])
            if value is None:
                per_budget = []
                break
            parts[f"contrastive@{k}"] = value.detach()
            per_budget.append(value)
        if per_budget:
            parts["contrastive"] = torch.stack([v.float() for v in per_budget]).mean()
    if autoregressive is not None:
        k = ar_budget_at(budgets, seed, step)
        parts["autoregressive"] = autoregressive(summary[:, :k])
        parts["ar_budget"] = torch.tensor(float(k))
    if distill is not None:
        parts["distill"] = torch.stack([distill(summary[:, :k]).float() for k in budgets]).mean()
    return parts


def coarse_to_fine_orders(cells: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """For each budget, the order of its pool@k cells that makes every prefix cover the whole image.

    ``cells[k]`` is the (k, N) weight of each pooled cell over the N visual tokens (pooling an identity
    matrix gives it, whatever the backbone's pooling). In reading order, nested distillation pulls one summary
    token toward unrelated places: on an 8x8 grid token 2 is the bottom-left quadrant at budget 4 but a top-row
    cell at budget 16. Here the smallest budget keeps reading order and each larger budget puts at position i
    the free cell overlapping most with position i of the next smaller budget, then the remaining cells in their
    parents' order: token i's targets are nested regions of the image (quadrant, its upper half, ...).
    Returns budget -> (k,) long tensor of cell indices.
    """
    orders: dict[int, torch.Tensor] = {}
    previous: torch.Tensor | None = None
    for k in sorted(cells):
        weights = cells[k].float()
        if previous is None:
            order = list(range(weights.shape[0]))
        else:
            overlap = weights @ previous.t()  # (k, k_prev): new cell x ordered previous token
            free = set(range(weights.shape[0]))
            order = []
            for j in range(previous.shape[0]):
                if not free:
                    break
                best = max(sorted(free), key=lambda c: float(overlap[c, j]))
                order.append(best)
                free.discard(best)
            order += sorted(free, key=lambda c: (int(overlap[c].argmax()), c))
        orders[k] = torch.tensor(order, dtype=torch.long)
        previous = weights[orders[k]]
    return orders
