"""The contrastive loss and the retrieval metric used to evaluate it."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap: temperature never below 0.01


def duplicate_mask(texts: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
    """(B, B) True where two *different* batch items share the same text.

    Identical captions of two images are not negatives of each other; scoring them as such
    teaches the model to separate what the text cannot tell apart.
    """
    n = len(texts)
    same = torch.tensor([[texts[i] == texts[j] and i != j for j in range(n)] for i in range(n)],
                        dtype=torch.bool, device=device)
    return same.reshape(n, n)


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
             texts: Sequence[str] | None = None, same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives and a learnable (log-scale) temperature.

    Both inputs are (B, D) and L2-normalized; item i of one side matches item i of the other.
    Pairs that share a caption are not negatives: give the ``texts`` or the (B, B) ``same`` mask.
    """
    scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * image_emb.float() @ text_emb.float().t()
    if same is None and texts is not None:
        same = duplicate_mask(texts, logits.device)
    if same is not None:
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def recall_at_1(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[float, float]:
    """(text->image R@1, image->text R@1) for aligned pairs: item i's match is item i."""
    sims = text_emb.float() @ image_emb.float().t()
    target = torch.arange(sims.shape[0], device=sims.device)
    t2i = (sims.argmax(dim=1) == target).float().mean().item()
    i2t = (sims.argmax(dim=0) == target).float().mean().item()
    return t2i, i2t
