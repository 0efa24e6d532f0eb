"""Whether the image embedding's head, not the summary tokens, is why swaps sit at chance.

The shipped head is linear on the *mean* of the summary tokens. If each token holds colour and shape as
separate features, a mean keeps the bag of attributes and loses which colour went with which shape, and no
loss on the tokens can show through it. Here every compressor's pass 1 is frozen: its summary tokens and
its text prompt's token states are computed once, then fresh heads are trained on them with the recipe's
contrastive loss (in-batch + the training world's hard negatives, ``info_nce_with_negatives``), and the
held-out world's SugarCrepe pairs and t2i recall are scored per head. A head that lifts swap_att / swap_obj
on the AR-trained tokens more than on the contrastive-only ones says the AR loss's binding is in the tokens
and the head hid it; ``text_pair_distance`` says whether the text side can tell a negative from its caption.

    python experiments/embedding_head.py --train WORK/data-train --eval EVAL --model demo \\
        --model WORK/compressor-k16-contrastive/model [--heads mean-linear,mlp-mean,attention,flatten]

WORK: the recipe's ``--work-dir``; EVAL: the claims' ``--eval-dir`` (seed 1000). JSON on stdout, progress
on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fwd2bot_index.evaluation import read_captions_jsonl, read_sugarcrepe, retrieval_recall
from fwd2bot_index.model import Fwd2Bot
from fwd2bot_index.training.demo.heads import embed_texts, fit_heads, summary_tokens, text_states, training_rows

class MeanLinear(nn.Module):
    """The shipped form: a linear layer on the mean of the tokens."""

    def __init__(self, k: int, hidden: int, dim: int):
        super().__init__()
        self.out = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(tokens.mean(dim=1))


class MlpMean(nn.Module):
    """A per-token MLP (residual) before the mean: each token can form conjunctions (red AND square)
    that survive averaging, as a DeepSets encoder does."""

    def __init__(self, k: int, hidden: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                 nn.Linear(4 * hidden, hidden))
        self.out = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out((tokens + self.mlp(tokens)).mean(dim=1))


class AttentionPool(nn.Module):
    """One learned query attends over the tokens (CLIP / SigLIP's attention-pooling head)."""

    def __init__(self, k: int, hidden: int, dim: int, heads: int = 4):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, hidden) * hidden ** -0.5)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.out = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.attention(self.query.expand(tokens.shape[0], -1, -1), tokens, tokens)
        return self.out(pooled[:, 0])


class Flatten(nn.Module):
    """A linear layer on the K tokens side by side: every token's features get their own weights."""

    def __init__(self, k: int, hidden: int, dim: int):
        super().__init__()
        self.out = nn.Linear(k * hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(tokens.flatten(1))


class TokenMixer(nn.Module):
    """Two small transformer layers over the tokens, then the mean: conjunctions across tokens (a colour
    in one token, the shape at the same place in another), as pass 2's attention forms them when it answers."""

    def __init__(self, k: int, hidden: int, dim: int, layers: int = 2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(hidden, 4, 4 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        self.mixer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.mixer(tokens).mean(dim=1))


class LastLinear(nn.Module):
    """The shipped text head: linear on the prompt's last state."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.out = nn.Linear(hidden, dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(states[:, -1])  # left-padded: the last position is every text's last token


class LastMlp(nn.Module):
    """A text head with a hidden layer on the last state."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, dim))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(states[:, -1])


class TextMixer(nn.Module):
    """Two transformer layers over *every* token's state, then their mean: a colour word and the shape word
    next to it can be bound here even when the last state no longer tells them apart."""

    def __init__(self, hidden: int, dim: int, layers: int = 2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(hidden, 4, 4 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        self.mixer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(hidden, dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mixed = self.mixer(states, src_key_padding_mask=~mask)
        keep = mask.unsqueeze(-1).to(mixed.dtype)
        return self.out((mixed * keep).sum(1) / keep.sum(1))


HEADS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "mean-linear": MeanLinear, "mlp-mean": MlpMean, "attention": AttentionPool, "flatten": Flatten,
    "mixer": TokenMixer}
TEXT_HEADS: dict[str, Callable[[int, int], nn.Module]] = {"linear": LastLinear, "mlp": LastMlp, "mixer": TextMixer}


def feature_rows(train: list[dict[str, Any]], eval_dir: Path, n_gallery: int, n_pairs: int) -> dict[str, Any]:
    """Which images and texts the heads train and are scored on (row numbers), and the held-out pairs and
    galleries; ``encode`` adds a compressor's tokens and states for those rows."""
    sugar = read_sugarcrepe(eval_dir / "sugarcrepe", eval_dir / "images", limit=n_pairs)
    galleries = {s: read_captions_jsonl(eval_dir / "captions.jsonl", split=s, limit=n_gallery, max_captions_per_image=1)
                 for s in ("test", "test_unseen")}
    texts = list(dict.fromkeys([t for r in train for t in r["captions"] + [x for p in r["pairs"] for x in p]]
                               + [t for c in sugar.values() for p in c.pairs for t in (p.caption, p.negative_caption)]
                               + [t for g in galleries.values() for t in g.captions]))
    images = list(dict.fromkeys([r["image"] for r in train] + [p.image for c in sugar.values() for p in c.pairs]
                                + [p for g in galleries.values() for p in g.image_paths]))
    return {"image_row": {p: i for i, p in enumerate(images)}, "text_row": {t: i for i, t in enumerate(texts)},
            "sugarcrepe": sugar, "galleries": galleries}


def encode(model: Fwd2Bot, rows: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """``rows`` with the frozen compressor's summary tokens and text states for them."""
    started = time.perf_counter()
    tokens = summary_tokens(model, list(rows["image_row"]))
    say(f"{len(tokens)} images in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    states, mask = text_states(model, list(rows["text_row"]))
    say(f"{len(states)} texts in {time.perf_counter() - started:.0f} s")
    return {**rows, "tokens": tokens, "states": states, "mask": mask}


def train_head(name: str, feats: dict[str, Any], train: list[dict[str, Any]], model: Fwd2Bot, steps: int,
               batch: int, lr: float, hard_share: float, seed: int, text: str = "linear") -> tuple[nn.Module, nn.Module]:
    """A fresh image head ``name`` and a fresh text head ``text``, trained together on the frozen features."""
    torch.manual_seed(seed)
    k, hidden = feats["tokens"].shape[1:]
    dim = model.compressor.image_head.out_features
    image_head, text_head = HEADS[name](k, hidden, dim), TEXT_HEADS[text](hidden, dim)
    logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    fit_heads(image_head, text_head, [*image_head.parameters(), *text_head.parameters()], logit_scale, feats, train,
              steps, batch, lr, hard_share, seed)
    return image_head.eval(), text_head.eval()


@torch.inference_mode()
def score(image_head: Callable[[torch.Tensor], torch.Tensor], text_head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
          feats: dict[str, Any]) -> dict[str, Any]:
    """SugarCrepe accuracy per category and t2i R@1 (seen / unseen galleries) under the given heads."""
    images = F.normalize(image_head(feats["tokens"]), dim=-1)
    wanted = list(dict.fromkeys([t for c in feats["sugarcrepe"].values() for p in c.pairs
                                 for t in (p.caption, p.negative_caption)]
                                + [t for g in feats["galleries"].values() for t in g.captions]))
    texts = embed_texts(text_head, feats, [feats["text_row"][t] for t in wanted])
    image_row, text_row = feats["image_row"], {t: i for i, t in enumerate(wanted)}
    out: dict[str, Any] = {"sugarcrepe": {}}
    for name, category in feats["sugarcrepe"].items():
        img = images[[image_row[p.image] for p in category.pairs]]
        pos = (img * texts[[text_row[p.caption] for p in category.pairs]]).sum(-1)
        neg = (img * texts[[text_row[p.negative_caption] for p in category.pairs]]).sum(-1)
        out["sugarcrepe"][name] = round(100 * float((pos > neg).float().mean()), 1)
    for split, gallery in feats["galleries"].items():
        sim = texts[[text_row[t] for t in gallery.captions]] @ images[[image_row[p] for p in gallery.image_paths]].T
        out[f"t2i_r1_{split}"] = round(100 * retrieval_recall(sim.numpy(), gallery.caption_to_image, ks=(1,))["t2i"][1], 1)
    return out


def pair_distances(feats: dict[str, Any], seed: int = 0) -> dict[str, float]:
    """Per SugarCrepe category: how far a caption's last state is from its negative's, as a share of how far
    it is from a random other caption's (states centred). Near 0: the text side hardly tells the two apart,
    so no image head can rank them."""
    states = feats["states"][:, -1].float()
    states = states - states.mean(dim=0)
    row = feats["text_row"]
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, category in feats["sugarcrepe"].items():
        pos = states[[row[p.caption] for p in category.pairs]]
        neg = states[[row[p.negative_caption] for p in category.pairs]]
        other = pos[torch.randperm(len(pos), generator=generator)]
        out[name] = round(float((pos - neg).norm(dim=1).mean() / (pos - other).norm(dim=1).mean()), 3)
    return out


def cached_features(args: argparse.Namespace, model: Fwd2Bot, name: str, train: list[dict[str, Any]],
                    say: Callable[[str], None]) -> dict[str, Any]:
    """``encode``'s features, read from / written to ``args.cache`` under the model's fingerprint and the sizes asked."""
    key = f"{model.fingerprint[:12]}-tokens-{args.n_train}-{args.n_gallery}-{args.n_pairs}.pt"
    path = args.cache / key if args.cache else None
    feats = feature_rows(train, args.eval, args.n_gallery, args.n_pairs)
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        images = {p: i for i, p in enumerate(saved["images"])}
        texts = {t: i for i, t in enumerate(saved["texts"])}
        if all(str(p) in images for p in feats["image_row"]) and all(t in texts for t in feats["text_row"]):
            say(f"{name}: features from {path}")  # the rows asked for, from a cache of the same or more
            keep = torch.tensor([texts[t] for t in feats["text_row"]])
            return {**feats, "tokens": saved["tokens"][[images[str(p)] for p in feats["image_row"]]],
                    "states": saved["states"][keep], "mask": saved["mask"][keep]}
    feats = encode(model, feats, say)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": [str(p) for p in feats["image_row"]], "texts": list(feats["text_row"]),
                    "tokens": feats["tokens"], "states": feats["states"], "mask": feats["mask"]}, path)
    return feats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", required=True, type=Path, help="the compressors' training world (WORK/data-train)")
    parser.add_argument("--eval", required=True, type=Path, help="the held-out world (the claims' --eval-dir)")
    parser.add_argument("--model", action="append", required=True, help="a Fwd2Bot checkpoint (repeatable)")
    parser.add_argument("--heads", default=",".join(HEADS),
                        help=f"comma-separated image heads, from {', '.join(HEADS)}; IMAGE+TEXT picks the text head "
                             f"too ({', '.join(TEXT_HEADS)}; default linear), e.g. mixer+mlp")
    parser.add_argument("--n-train", type=int, default=3000, help="training images (default 3000)")
    parser.add_argument("--n-gallery", type=int, default=1000, help="t2i gallery per split (default 1000)")
    parser.add_argument("--n-pairs", type=int, default=1000, help="SugarCrepe pairs per category (default 1000)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hard-share", type=float, default=0.5, help="captions drawn from hard-negative pairs")
    parser.add_argument("--hard-categories", default="",
                        help="draw hard-negative pairs of these SugarCrepe categories only (default: all seven)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep each model's frozen features here and reuse them (the encoding is most of the time)")
    args = parser.parse_args(argv)
    heads = [(h.split("+") + ["linear"])[:2] for h in args.heads.split(",") if h]
    unknown = [f"{i}+{t}" for i, t in heads if i not in HEADS or t not in TEXT_HEADS]
    if unknown:
        parser.error(f"unknown head(s) {', '.join(unknown)}: image heads {', '.join(HEADS)}, "
                     f"text heads {', '.join(TEXT_HEADS)}")
    for folder, what in ((args.train, "captions.jsonl"), (args.eval, "sugarcrepe")):
        if not (folder / what).exists():
            parser.error(f"{folder} has no {what}: pass a demo-data folder written with its hard negatives")
    torch.set_num_threads(args.threads)

    def say(message: str) -> None:
        print(f"[embedding_head {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    train = training_rows(args.train, args.n_train, [c for c in args.hard_categories.split(",") if c])
    report: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    for name in args.model:
        model = Fwd2Bot.from_pretrained(name, device="cpu", dtype="fp32")
        say(f"{name}: K={model.config.num_summary_tokens}")
        feats = cached_features(args, model, name, train, say)
        rows: dict[str, Any] = {"text_pair_distance": pair_distances(feats, args.seed),
                                "shipped": score(model.embed_summary, model.compressor.text_vector, feats)}
        for image, text in heads:
            label = image if text == "linear" else f"{image}+{text}"
            trained = train_head(image, feats, train, model, args.steps, args.batch, args.lr, args.hard_share,
                                 args.seed, text)
            rows[label] = score(*trained, feats)
            say(f"{name} {label}: swap_att {rows[label]['sugarcrepe'].get('swap_att')} "
                f"swap_obj {rows[label]['sugarcrepe'].get('swap_obj')} R@1 {rows[label]['t2i_r1_test']}")
        say(f"{name} text_pair_distance: {rows['text_pair_distance']}")
        report[name] = rows
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
