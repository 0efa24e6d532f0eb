"""The training losses (contrastive, pooled distillation, their weighted sum) and the retrieval metric."""

from __future__ import annotations

import math
from typing import Any, Sequence

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


def pooled_distillation(projected: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """How far pass 2's input (the projected summary tokens, (B, k, H)) is from the pooled visual tokens the
    base already answers from (``pool@k``, (B, k, H)): squared error over the target's variance, so 1.0 is
    what predicting the batch's mean token gives, whatever the model's hidden scale.

    Why: the autoregressive gradient reaches pass 1 only through pass 2 and is weak early on. On the demo
    model a K = 16 compressor trained 400 steps with contrastive + autoregressive losses kept the colour of a
    grid cell at 43% (linear probe) where pool@16 keeps 99.9%, and pass 2 answered colour at the blind
    level; this dense target taught pass 1 to carry each cell within ~150 steps. The target is detached:
    it teaches the compressor, never the visual tokens.
    """
    target = pooled.detach().float()
    centered = target - target.mean(dim=(0, 1), keepdim=True)
    return (projected.float() - target).pow(2).mean() / centered.pow(2).mean().clamp_min(1e-12)


def distill_scale(config: Any, step: int | None, total: int | None) -> float:
    """The share of ``distill_weight`` in force at optimizer step ``step`` of ``total``: 1 until
    ``distill_fade_from`` of training, then linearly down to 0 at the last step (1 when either is unknown).

    Why a fade: on the demo model the distillation that teaches pass 1 what the base reads also pulls the
    summary tokens toward pooled grid cells, which mix objects; swapped-object hard negatives scored 55.5
    with it against 65.0 without. Fading it lets the paper's two losses alone shape the end of training.
    """
    start = float(getattr(config, "distill_fade_from", 1.0))
    if step is None or not total or start >= 1.0:
        return 1.0
    begin, last = start * total, total - 1  # steps run 0 .. total - 1: the last one trains without it
    if step < begin:
        return 1.0
    return max(0.0, 1.0 - (step - begin) / (last - begin)) if last > begin else 0.0


def weighted_loss(parts: dict[str, torch.Tensor], config: Any, step: int | None = None,
                  total: int | None = None) -> torch.Tensor:
    """``contrastive_weight * contrastive + autoregressive_weight * autoregressive + distill_weight * distill``
    over the parts a step computed (a missing part adds nothing), in fp32; the distillation's weight fades
    after ``distill_fade_from`` of ``total`` steps (``distill_scale``)."""
    loss = None
    for name in ("contrastive", "autoregressive", "distill"):
        if name in parts:
            weight = getattr(config, f"{name}_weight")
            if name == "distill":
                weight *= distill_scale(config, step, total)
            term = weight * parts[name].float()
            loss = term if loss is None else loss + term
    if loss is None:
        device = next(iter(parts.values())).device if parts else None
        return torch.zeros((), dtype=torch.float32, device=device)
    return loss
