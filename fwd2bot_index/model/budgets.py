"""Token budgets of a compressor: which numbers of summary tokens it may store, and embeddings
recomputed from stored tokens.

Pass 1 is causal, so the first k summary tokens of a K-token encode are exactly a k-token encode; a
nested compressor (``f2b train --nested 4,8,16,32``) is trained so that each listed prefix is a good
stored form on its own (``training.nested``). A plain compressor was trained at K only: its shorter
prefixes exist but were never asked to retrieve or answer, so they are refused rather than served.

The image embedding is the contrastive head over the mean of the summary tokens it is given; from the
first k stored tokens it is the embedding at budget k. That is how a collection shrinks without
re-encoding a single image (``f2b migrate --tokens k``): truncate, then this head pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import Fwd2BotConfig, StrategyError

if TYPE_CHECKING:
    from .fwd2bot import Fwd2Bot


def trained_budgets(config: Fwd2BotConfig) -> list[int]:
    """The nested budgets recorded in the checkpoint, else K alone."""
    budgets = sorted(int(b) for b in (config.nested_budgets or []))
    return budgets or [int(config.num_summary_tokens)]


def check_budget(config: Fwd2BotConfig, budget: int, source: str | None = None) -> None:
    """Refuse, in one line, a number of stored summary tokens the compressor was not trained for."""
    budgets = trained_budgets(config)
    if budget in budgets:
        return
    name = source or "this compressor"
    if len(budgets) == 1:
        raise StrategyError(
            f"{name} stores {budgets[0]} summary tokens per image (it was not trained with nested budgets), "
            f"not {budget}; use --tokens {budgets[0]}, or train a nested compressor (f2b train --nested "
            f"...,{budgets[0]})")
    raise StrategyError(f"{name} was trained for {', '.join(map(str, budgets))} summary tokens per image, "
                        f"not {budget}; pick one of them")


def embed_stored(model: "Fwd2Bot", tokens: Any, budget: int | None = None, batch_size: int = 1024) -> np.ndarray:
    """(n, T, H) stored summary tokens -> (n, D) normalized float32 embeddings from their first ``budget``
    tokens (default: all T). Only the contrastive head runs: no image decode, no vision tower, no LLM."""
    if model.compressor is None:
        raise StrategyError("embeddings from stored summary tokens need a Fwd2Bot compressor checkpoint")
    arr = np.asarray(tokens, dtype=np.float32) if not torch.is_tensor(tokens) else tokens
    if arr.ndim != 3 or arr.shape[-1] != model.backbone.hidden_size:
        raise ValueError(f"stored summary tokens must be (n, T, {model.backbone.hidden_size}), got {tuple(arr.shape)}")
    budget = arr.shape[1] if budget is None else int(budget)
    if not 0 < budget <= arr.shape[1]:
        raise ValueError(f"budget {budget} is outside the {arr.shape[1]} stored tokens")
    check_budget(model.config, budget, model.source)
    out = []
    head = model.compressor.image_head
    with torch.inference_mode():
        for start in range(0, arr.shape[0], batch_size):
            part = torch.as_tensor(arr[start:start + batch_size, :budget])
            part = part.to(head.weight.device, head.weight.dtype)
            out.append(model.embed_summary(part).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.embed_dim), np.float32)
