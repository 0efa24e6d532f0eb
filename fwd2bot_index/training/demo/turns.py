"""Multi-turn pass-2 sequences: every question of a scene (and a caption) after one image prefix.

One visual prefix followed by all eight of a scene's questions, each with its answer, gives eight
answers' worth of gradient for one prefix: a single-turn sequence spends ~64 visual tokens for one
answer of ~2 tokens, which left answers ~12% of the signal and the base answering "yes" to 95% of
yes/no questions. Turn 1 has exactly the single-turn layout that answering uses at inference (chat
prefix, stored tokens, question); later turns continue the chat. The turn order is shuffled per
sequence so every question type is sometimes first. Losses are averaged over scored tokens with a
weight per turn (answers 1, captions less), so a long caption does not drown the one-word answers.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...model.fwd2bot import PASS2, _left_pad

Turn = tuple[str, str, float]  # (prompt or question, target text, loss weight)


def scene_turns(captions: Sequence[str], qa: Sequence[tuple[str, str]], rng: np.random.Generator,
                caption_prompt: str, caption_share: float, caption_weight: float) -> list[Turn]:
    """Every question of a scene in a shuffled order, plus (with ``caption_share``) one caption turn."""
    turns: list[Turn] = [(q, a, 1.0) for q, a in qa]
    turns = [turns[int(i)] for i in rng.permutation(len(turns))]
    if captions and (not turns or rng.random() < caption_share):
        caption = captions[int(rng.integers(len(captions)))]
        turns.insert(int(rng.integers(len(turns) + 1)), (caption_prompt, caption, caption_weight))
    return turns


def _continuation_ids(model: Any, prompt: str) -> list[int]:
    """A later user turn in the model's chat format (no image slot, no BOS)."""
    parts = model.backbone.chat(prompt)
    return model.backbone.token_ids(" " + (parts.before + parts.after).strip())


def multi_turn_loss(model: Any, stored: torch.Tensor, turns: Sequence[Sequence[Turn]], kind: str) -> torch.Tensor:
    """Weighted next-token loss on the answer tokens of multi-turn sequences.

    ``stored`` (B, T, H): what the image is stored as (visual tokens for ``full``/``pool``, summary
    tokens for ``fwd2bot``, which pass through the pass-2 projection and adapter as in answering).
    """
    backbone = model.backbone
    eos = backbone.tokenizer.eos_token_id
    seqs, labels, weights = [], [], []
    for tokens, item_turns in zip(stored, turns):
        first, *rest = item_turns
        prefix, _ = model.pass2_inputs([tokens], [first[0]], kind)
        pieces, lab, wts = [prefix[0]], [-100] * prefix.shape[1], [0.0] * prefix.shape[1]
        for k, (prompt, target, weight) in enumerate(item_turns):
            if k:
                ids = _continuation_ids(model, prompt)
                pieces.append(backbone.embed_ids(ids))
                lab += [-100] * len(ids)
                wts += [0.0] * len(ids)
            ids = backbone.token_ids(" " + target.strip()) + [eos]
            pieces.append(backbone.embed_ids(ids))
            lab += ids
            wts += [weight] * len(ids)
        seqs.append(torch.cat(pieces))
        labels.append(lab)
        weights.append(wts)
    embeds, mask = _left_pad(seqs)
    length = mask.shape[1]
    label_t = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
    weight_t = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for i, (lab, wts) in enumerate(zip(labels, weights)):
        label_t[i, length - len(lab):] = torch.tensor(lab, device=mask.device)
        weight_t[i, length - len(wts):] = torch.tensor(wts, device=mask.device)
    with model.adapter(PASS2 if kind == "fwd2bot" else None):
        hidden = backbone.run_decoder(embeds, mask)
    target, w = label_t[:, 1:], weight_t[:, 1:]
    scored = (target != -100) & (w > 0)  # the head runs only where a token is scored
    logits = backbone.logits(hidden[:, :-1][scored]).float()
    ce = F.cross_entropy(logits, target[scored], reduction="none")
    return (ce * w[scored]).sum() / w[scored].sum().clamp(min=1e-6)
