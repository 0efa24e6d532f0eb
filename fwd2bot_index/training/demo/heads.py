"""Stage 2b of the demo recipe: the contrastive heads refitted on the compressor's frozen features.

The joint run (1,400 steps of 32 images, every step a pass-1 and a pass-2 forward) leaves the heads
undertrained: refitting only the shipped model's linear heads on its frozen features (3,000 images, 1,500
steps of 128) lifted t2i R@1 from 86.9 / 62.3 to 89.7 / 75.4 on the held-out world (docs/DEMO_MODEL.md,
"Why swap_att stays at chance"). Here pass 1 runs once per training image and once per text (summary
tokens; every token's state of the text prompt, as the text readout reads them), then the heads, their
readouts and the temperature train on those features with the compressor's own contrastive loss and hard
negatives, in minutes of CPU. Pass 2 never reads the heads: answers are unchanged. The experiment
``experiments/embedding_head.py`` trains other head shapes on the same features.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...evaluation import read_captions_jsonl
from ...imaging import load_image
from ...model.config import PASS1
from ...model.fwd2bot import Fwd2Bot
from ..losses import MAX_LOGIT_SCALE
from .compressor import hard_negative_pairs, info_nce_with_negatives

ImageHead = Callable[[torch.Tensor], torch.Tensor]
TextHead = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.inference_mode()
def summary_tokens(model: Fwd2Bot, paths: Sequence[Path], batch: int = 64) -> torch.Tensor:
    """(n, K, H) pass-1 summary tokens of the images, float32."""
    out = []
    for start in range(0, len(paths), batch):
        images = [load_image(p).convert("RGB") for p in paths[start:start + batch]]
        out.append(model.compress(model.visual_tokens(model.backbone.pixel_values(images))).float())
    return torch.cat(out) if out else torch.zeros(0, model.config.num_summary_tokens, model.backbone.hidden_size)


@torch.inference_mode()
def text_states(model: Fwd2Bot, texts: Sequence[str], batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, L, H) fp16 states of every token of the texts as the model embeds them (its prompt, the pass-1
    adapter), left-padded to one length, and the (n, L) mask of real tokens."""
    chunks = []
    for start in range(0, len(texts), batch):
        hidden, mask = model.text_states(texts[start:start + batch], model.config.text_embed_prompt, PASS1)
        chunks.append((hidden.half(), mask.bool()))
    length = max(h.shape[1] for h, _ in chunks)
    states = torch.cat([F.pad(h, (0, 0, length - h.shape[1], 0)) for h, _ in chunks])
    return states, torch.cat([F.pad(m, (length - m.shape[1], 0)) for _, m in chunks])


def embed_texts(head: TextHead, feats: dict[str, Any], rows: Sequence[int] | None = None,
                chunk: int = 2048) -> torch.Tensor:
    """Normalized text embeddings of the given text rows of ``feats`` (all when None) under ``head``."""
    index = torch.arange(len(feats["mask"])) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    out = []
    for i in index.split(chunk):
        mask = feats["mask"][i]
        start = int((~mask.any(dim=0)).sum())  # left padding no row of this chunk needs
        out.append(F.normalize(head(feats["states"][i, start:].float(), mask[:, start:]), dim=-1))
    return torch.cat(out)


def training_rows(data: Path, n_images: int, categories: Sequence[str] = (),
                  captions_per_image: int | None = None) -> list[dict[str, Any]]:
    """The first ``n_images`` 'train' images of a demo-data folder with their captions (the first
    ``captions_per_image``, or all) and hard-negative pairs (of ``categories`` only, when given)."""
    pairs = hard_negative_pairs(data, categories)
    gallery = read_captions_jsonl(data / "captions.jsonl", split="train", limit=n_images,
                                  max_captions_per_image=captions_per_image)
    rows = [{"image": p, "captions": [], "pairs": pairs.get(str(p), [])} for p in gallery.image_paths]
    for caption, owner in zip(gallery.captions, gallery.caption_to_image):
        rows[int(owner)]["captions"].append(caption)
    return rows


def row_features(model: Fwd2Bot, rows: list[dict[str, Any]], say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The frozen features of the training rows: ``tokens`` / ``image_row`` and ``states`` / ``mask`` / ``text_row``."""
    texts = list(dict.fromkeys(t for r in rows for t in r["captions"] + [x for p in r["pairs"] for x in p]))
    started = time.perf_counter()
    tokens = summary_tokens(model, [r["image"] for r in rows])
    states, mask = text_states(model, texts)
    say(f"features of {len(rows)} images and {len(texts)} texts in {time.perf_counter() - started:.0f} s")
    return {"tokens": tokens, "image_row": {r["image"]: i for i, r in enumerate(rows)},
            "states": states, "mask": mask, "text_row": {t: i for i, t in enumerate(texts)}}


def fit_heads(image_head: ImageHead, text_head: TextHead, parameters: Sequence[nn.Parameter],
              logit_scale: nn.Parameter, feats: dict[str, Any], rows: list[dict[str, Any]], steps: int,
              batch: int, lr: float, hard_share: float, seed: int,
              say: Callable[[str], None] = lambda _: None) -> list[float]:
    """Train ``parameters`` (the heads' and ``logit_scale``) on frozen features with the compressor's loss: each
    image's caption, or for ``hard_share`` of them one of its hard-negative pairs' captions with the negative as
    an extra text column (``info_nce_with_negatives``). One-cycle rate; returns the loss every 50 steps."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([*parameters, logit_scale], lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    image_row, text_row, curve = feats["image_row"], feats["text_row"], []
    for step in range(steps):
        chosen = rng.sample(rows, min(batch, len(rows)))
        captions, negatives = [], []
        for r in chosen:
            if r["pairs"] and rng.random() < hard_share:
                caption, negative = rng.choice(r["pairs"])
                negatives.append(negative)
            else:
                caption = rng.choice(r["captions"])
            captions.append(caption)
        image_emb = F.normalize(image_head(feats["tokens"][[image_row[r["image"]] for r in chosen]]), dim=-1)
        text_emb = embed_texts(text_head, feats, [text_row[t] for t in captions])
        negative_emb = embed_texts(text_head, feats, [text_row[t] for t in negatives]) if negatives else None
        loss = info_nce_with_negatives(image_emb, text_emb, negative_emb, logit_scale, captions, negatives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():  # as the house trainer: the temperature never below CLIP's 0.01
            logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        if step % 50 == 0 or step == steps - 1:
            curve.append(round(float(loss.detach()), 4))
        if step % 250 == 249:
            say(f"heads: step {step + 1} / {steps}, loss {float(loss.detach()):.3f}")
    return curve


def refit_heads(model: Fwd2Bot, data: Path, n_images: int, steps: int, batch: int, lr: float, hard_share: float,
                categories: Sequence[str] = (), seed: int = 0, say: Callable[[str], None] = lambda _: None,
                readouts: tuple[str, str] | None = None) -> dict[str, Any]:
    """Refit ``model``'s contrastive heads, their readouts and temperature in place (from where the joint run left
    them, or fresh when ``readouts`` differ from the compressor's), on ``n_images`` training images of ``data``;
    the rest of the model is untouched. Each image's
    caption is its first, the scene-unique one the compressor's contrastive loss trained on (the shorter ones,
    "four shapes on a gradient gray background", are true of many images, and the heads never saw them: on all
    five, the contrastive-only mixer compressor's joint heads started the refit at chance, loss 5.2 for a batch
    of 128, while they find the first caption's image at R@1 0.98)."""
    if model.compressor is None:
        raise ValueError("only a Fwd2Bot compressor has contrastive heads to refit")
    torch.manual_seed(seed)
    fresh = readouts is not None and tuple(readouts) != (model.config.image_readout, model.config.text_readout)
    if fresh:
        _fresh_heads(model, *readouts)
    compressor = model.compressor
    rows = training_rows(data, n_images, categories, captions_per_image=1)
    feats = row_features(model, rows, say)
    heads = [m for m in (compressor.image_mixer, compressor.image_head, compressor.text_mixer, compressor.text_head)
             if m is not None]
    dtype = compressor.image_head.weight.dtype
    compressor.float()
    parameters = [p for m in heads for p in m.parameters()]
    for m in heads:
        m.train()
    try:
        with torch.enable_grad():
            for p in [*parameters, compressor.logit_scale]:
                p.requires_grad_(True)
            started = time.perf_counter()
            curve = fit_heads(compressor.image_vector, compressor.text_vector, parameters, compressor.logit_scale,
                              feats, rows, steps, batch, lr, hard_share, seed, say)
    finally:
        for m in heads:
            m.eval()
        compressor.to(dtype)
    say(f"heads refitted: {steps} steps of {batch} in {time.perf_counter() - started:.0f} s, loss {curve[0]} -> {curve[-1]}")
    return {"images": len(rows), "steps": steps, "image_readout": model.config.image_readout,
            "text_readout": model.config.text_readout, "fresh_heads": fresh, "batch": batch, "lr": lr, "hard_share": hard_share,
            "hard_categories": list(categories), "loss_curve": curve,
            "temperature": round(float(1 / compressor.logit_scale.detach().float().exp()), 4)}


def _fresh_heads(model: Fwd2Bot, image_readout: str, text_readout: str) -> None:
    """Give ``model`` new, untrained heads with these readouts; summary tokens, pass-2 projection and temperature
    stay (a compressor trained with the paper's readouts gets a mixer's; the tokens it stores do not change)."""
    from ...model.fwd2bot import Compressor

    old, config = model.compressor, model.config
    new = Compressor(config.hidden_size, config.num_summary_tokens, config.embed_dim,
                     image_readout=image_readout, text_readout=text_readout)
    kept = {k: v for k, v in old.state_dict().items() if k.startswith(("summary_tokens", "pass2_projection", "logit_scale"))}
    new.load_state_dict(kept, strict=False)
    model.compressor = new.to(old.summary_tokens.device, old.summary_tokens.dtype).eval()
    config.image_readout, config.text_readout = image_readout, text_readout
