"""Branched pass-2 sequences: every question of a scene (and a caption) answered from one image prefix.

One image prefix followed by all of a scene's questions gives several answers' worth of gradient for
one prefix (a single-turn sequence spends ~64 visual tokens on one answer of ~2 tokens). Earlier
versions chained the questions as a multi-turn chat, which let ~58% of the yes/no answers be read off
the text of earlier turns (both halves of a yes/no pair sat in one sequence) and trained later turns
in a layout answering never uses. Here each turn is a *branch*: it attends to the shared prefix and to
itself only (a block attention mask), and its position ids continue from the prefix exactly as a
single question's would at inference. So every answer is scored in the very layout ``answer`` uses,
with nothing to copy from its neighbours, at the cost of one shared prefix.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...model.config import PASS2

Turn = tuple[str, str, float]  # (prompt or question, target text, loss weight)


def scene_turns(captions: Sequence[str], qa: Sequence[tuple[str, str]], rng: np.random.Generator,
                caption_prompt: str, caption_share: float, caption_weight: float,
                weights: Sequence[float] | None = None) -> list[Turn]:
    """Every question of a scene (weight 1, or ``weights``) plus, with ``caption_share``, one caption turn."""
    turns: list[Turn] = [(q, a, 1.0 if weights is None else float(w))
                         for (q, a), w in zip(qa, weights or [1.0] * len(qa))]
    if captions and (not turns or rng.random() < caption_share):
        caption = captions[int(rng.integers(len(captions)))]
        turns.append((caption_prompt, caption, caption_weight))
    return turns


def branch_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean attention mask from per-token segment ids (B, L).

    Segment 0 is the shared prefix, 1..n the branches, -1 padding. A token sees earlier tokens of the
    prefix and of its own branch; a padding row sees only itself (so no softmax row is empty).
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def branched_turn_loss(model: Any, stored: Sequence[torch.Tensor], turns: Sequence[Sequence[Turn]],
                       kind: str) -> torch.Tensor:
    """Weighted next-token loss on the answer tokens of every turn, each answered from the prefix alone.

    ``stored`` (B items of (T_i, H)): what each image is stored as (visual tokens for ``full``/``pool``,
    summary tokens for ``fwd2bot``, which pass through the pass-2 projection and adapter as in
    answering). Items may hold different numbers of stored tokens.
    """
    backbone = model.backbone
    eos = backbone.tokenizer.eos_token_id
    rows = []  # (embeds, segments, positions, labels, weights) per item
    for tokens, item_turns in zip(stored, turns):
        before, visual, _ = model.pass2_parts(tokens, item_turns[0][0], kind)
        pieces = [before, visual]
        prefix = before.shape[0] + visual.shape[0]
        segments, positions = [0] * prefix, list(range(prefix))
        labels, weights = [-100] * prefix, [0.0] * prefix
        for branch, (prompt, target, weight) in enumerate(item_turns, start=1):
            after = model.pass2_parts(tokens[:0], prompt, kind)[2]
            ids = backbone.token_ids(" " + target.strip()) + [eos]
            pieces += [after, backbone.embed_ids(ids)]
            n = after.shape[0] + len(ids)
            segments += [branch] * n
            positions += list(range(prefix, prefix + n))
            labels += [-100] * after.shape[0] + ids
            weights += [0.0] * after.shape[0] + [weight] * len(ids)
        rows.append((torch.cat(pieces), segments, positions, labels, weights))
    length = max(r[0].shape[0] for r in rows)
    device = rows[0][0].device
    embeds = rows[0][0].new_zeros(len(rows), length, rows[0][0].shape[1])
    seg_t = torch.full((len(rows), length), -1, dtype=torch.long, device=device)
    pos_t = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    label_t = torch.full((len(rows), length), -100, dtype=torch.long, device=device)
    weight_t = torch.zeros((len(rows), length), dtype=torch.float32, device=device)
    for i, (emb, seg, pos, lab, wts) in enumerate(rows):  # right-padded: padding only ever sees itself
        n = emb.shape[0]
        embeds[i, :n] = emb
        seg_t[i, :n] = torch.tensor(seg, device=device)
        pos_t[i, :n] = torch.tensor(pos, device=device)
        label_t[i, :n] = torch.tensor(lab, device=device)
        weight_t[i, :n] = torch.tensor(wts, device=device)
    with model.adapter(PASS2 if kind == "fwd2bot" else None):
        hidden = backbone.decoder(inputs_embeds=embeds, attention_mask=branch_mask(seg_t),
                                  position_ids=pos_t).last_hidden_state
    target, w = label_t[:, 1:], weight_t[:, 1:]
    scored = (target != -100) & (w > 0)  # the head runs only where a token is scored
    logits = backbone.logits(hidden[:, :-1][scored]).float()
    ce = F.cross_entropy(logits, target[scored], reduction="none")
    return (ce * w[scored]).sum() / w[scored].sum().clamp(min=1e-6)
