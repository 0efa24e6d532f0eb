"""Benchmark metrics, in plain numpy, computed the way the field computes them.

Retrieval recall follows CLIP_benchmark: a text query hits at k when its image is among the k
best-scoring images; an image query hits at k when ANY of its captions is among the k best-scoring
captions. Results are fractions in [0, 1].

Ties count against the query: a positive ranks behind every other item with an equal score (for an
image query, behind every non-positive caption that scores at least as high as its best positive).
Why this rule: CLIP_benchmark ranks with ``torch.topk``, whose order among equal scores is not
specified (torch 2.13 on CPU does not keep the lower index first), so under ties its numbers depend on
the torch build and on the order of the gallery. Counting ties against the query is the worst case
over all tie orders: it does not depend on the order of images or captions, a model cannot gain from
scoring things equal (a constant scorer gets R@k = 0 below the gallery size), and it is SugarCrepe's
rule too (a tie is wrong). Wherever no scores tie, the result equals CLIP_benchmark's.

SugarCrepe accuracy is the share of pairs where the true caption scores strictly higher than the hard
negative; a tie is wrong. The Replace / Swap / Add figures are micro-averages over their pairs.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import overload

import numpy as np
from numpy.typing import ArrayLike

from .sugarcrepe import SUGARCREPE_GROUPS

__all__ = [
    "retrieval_recall",
    "multi_relevant_precision",
    "pairwise_accuracy",
    "sugarcrepe_accuracy",
    "normalize_answer",
    "exact_match",
    "normalized_contains",
]

_ROW_CHUNK = 1024


def _check_similarity(sim: ArrayLike, caption_to_image: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(sim)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"sim must be a non-empty [n_texts, n_images] matrix, got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.number) or not np.all(np.isfinite(scores)):
        raise ValueError("sim must hold finite numbers (found NaN/inf or a non-numeric type)")
    owners = np.asarray(caption_to_image)
    if owners.shape != (scores.shape[0],) or not np.issubdtype(owners.dtype, np.integer):
        raise ValueError(
            f"caption_to_image must be integers of shape ({scores.shape[0]},), got {owners.dtype} {owners.shape}"
        )
    n_images = scores.shape[1]
    if owners.min() < 0 or owners.max() >= n_images:
        raise ValueError(f"caption_to_image has indices outside [0, {n_images})")
    orphans = np.flatnonzero(np.bincount(owners, minlength=n_images) == 0)
    if orphans.size:
        raise ValueError(f"images without any caption (image->text recall undefined): {orphans[:10].tolist()}")
    return scores, owners.astype(np.int64)


def _t2i_ranks(scores: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """0-based rank of each caption's image: the other images scoring at least as high (ties count against)."""
    out = np.empty(scores.shape[0], dtype=np.int64)
    for start in range(0, scores.shape[0], _ROW_CHUNK):
        block = scores[start : start + _ROW_CHUNK]
        own = block[np.arange(block.shape[0]), owners[start : start + _ROW_CHUNK]][:, None]
        out[start : start + block.shape[0]] = (block >= own).sum(axis=1) - 1
    return out


def _i2t_ranks(scores_i2t: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """0-based rank of each image's best caption: non-positive captions scoring at least as high."""
    out = np.empty(scores_i2t.shape[0], dtype=np.int64)
    for start in range(0, scores_i2t.shape[0], _ROW_CHUNK):
        block = scores_i2t[start : start + _ROW_CHUNK].astype(np.float64)
        rows = np.arange(start, start + block.shape[0])
        mine = owners[None, :] == rows[:, None]
        best = np.where(mine, block, -np.inf).max(axis=1)[:, None]
        out[start : start + block.shape[0]] = ((block >= best) & ~mine).sum(axis=1)
    return out


def retrieval_recall(
    sim: ArrayLike, caption_to_image: ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[int, float]]:
    """Recall@k both ways from a [n_texts, n_images] similarity matrix.

    Returns ``{"t2i": {k: r}, "i2t": {k: r}}``. A k at or beyond the gallery size counts every query
    as a hit (the whole gallery is returned).
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    scores, owners = _check_similarity(sim, caption_to_image)
    t2i_rank = _t2i_ranks(scores, owners)
    i2t_rank = _i2t_ranks(scores.T, owners)  # a view: chunks are copied as needed, never the whole matrix
    return {
        "t2i": {int(k): float(np.mean(t2i_rank < int(k))) for k in ks},
        "i2t": {int(k): float(np.mean(i2t_rank < int(k))) for k in ks},
    }


def multi_relevant_precision(sim: ArrayLike, relevant: ArrayLike, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Precision@k and mean average precision of text queries that many images answer.

    ``sim`` is [n_queries, n_images]; ``relevant`` a boolean matrix of the same shape (which images answer
    which query: "a blue square" and every image holding one). Recall@k of one paired caption cannot
    score such a query, and it is the query a person types first. Every query needs at least one
    relevant image (a query with fewer than k cannot reach P@k = 1: plain precision). Ties count against
    the query, as in ``retrieval_recall``: a relevant image ranks behind every irrelevant one with an
    equal score, so a constant scorer gets nothing it did not earn. Returns ``{"p@k": ..., "map": ...}``,
    fractions averaged over the queries.
    """
    scores = np.asarray(sim, dtype=np.float64)
    rel = np.asarray(relevant, dtype=bool)
    if scores.ndim != 2 or rel.shape != scores.shape:
        raise ValueError(f"similarity {scores.shape} and relevance {rel.shape} must be the same 2-D shape")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    if not rel.any(axis=1).all():
        raise ValueError("every query needs at least one relevant image")
    out: dict[str, float] = {f"p@{int(k)}": 0.0 for k in ks}
    aps = []
    for q in range(scores.shape[0]):
        # best first; among equal scores the irrelevant images first (the worst order of a tie)
        hits = rel[q][np.lexsort((rel[q], -scores[q]))]
        for k in ks:
            out[f"p@{int(k)}"] += hits[:int(k)].sum() / min(int(k), len(hits)) / scores.shape[0]
        ranks = np.flatnonzero(hits)  # 0-based positions of the relevant images
        aps.append(float(np.mean((np.arange(len(ranks)) + 1) / (ranks + 1))))
    out = {k: float(v) for k, v in out.items()}
    out["map"] = float(np.mean(aps))
    return out


def _pair_wins(pos_scores: ArrayLike, neg_scores: ArrayLike, label: str = "") -> np.ndarray:
    pos = np.asarray(pos_scores, dtype=np.float64).ravel()
    neg = np.asarray(neg_scores, dtype=np.float64).ravel()
    where = f" for {label!r}" if label else ""
    if pos.shape != neg.shape:
        raise ValueError(f"pos and neg scores differ in length{where}: {pos.size} vs {neg.size}")
    if pos.size == 0:
        raise ValueError(f"no pairs{where}: accuracy is undefined")
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError(f"scores must be finite{where}")
    return pos > neg


def pairwise_accuracy(pos_scores: ArrayLike, neg_scores: ArrayLike) -> float:
    """Share of pairs with pos strictly greater than neg (ties are wrong)."""
    return float(np.mean(_pair_wins(pos_scores, neg_scores)))


@overload
def sugarcrepe_accuracy(pos_scores: Mapping[str, ArrayLike], neg_scores: Mapping[str, ArrayLike]) -> dict[str, float]: ...
@overload
def sugarcrepe_accuracy(pos_scores: ArrayLike, neg_scores: ArrayLike) -> float: ...


def sugarcrepe_accuracy(pos_scores, neg_scores):  # type: ignore[no-untyped-def]
    """Per-category accuracy plus the paper's micro-averaged Replace / Swap / Add.

    Given two mappings category -> scores, returns ``{category: acc, ..., "Replace": acc, ...}``; a
    group appears only when all of its categories are present (a partial group would be mislabelled).
    Given two arrays, returns the single accuracy.
    """
    if not isinstance(pos_scores, Mapping):
        return pairwise_accuracy(pos_scores, neg_scores)
    if not isinstance(neg_scores, Mapping) or set(pos_scores) != set(neg_scores):
        raise ValueError("pos_scores and neg_scores must be mappings over the same categories")
    wins = {name: _pair_wins(pos_scores[name], neg_scores[name], name) for name in pos_scores}
    result = {name: float(np.mean(w)) for name, w in wins.items()}
    for group, members in SUGARCREPE_GROUPS.items():
        if all(m in wins for m in members):
            result[group] = float(np.mean(np.concatenate([wins[m] for m in members])))
    return result


# --------------------------------------------------------------------------------------------------
# QA answer matching

_ARTICLES = {"a", "an", "the"}
_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_UNITS["none"] = 0  # VQA's convention: "none" answers a counting question as 0
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace(".", "").replace("'", "")) + "]")


def _numbers_to_digits(tokens: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in _TENS:
            value = _TENS[tok]
            if i + 1 < len(tokens) and tokens[i + 1] in _UNITS and 0 < _UNITS[tokens[i + 1]] < 10:
                value += _UNITS[tokens[i + 1]]
                i += 1
            out.append(str(value))
        elif tok in _UNITS:
            out.append(str(_UNITS[tok]))
        else:
            out.append(tok)
        i += 1
    return out


def normalize_answer(text: str) -> str:
    """Canonical form for answer matching.

    Lowercase; drop thousands separators (``1,000`` -> ``1000``) and apostrophes (``dog's`` -> ``dogs``);
    other punctuation becomes a space, except a decimal point between digits; number words 0-99 become
    digits (``twenty-one`` -> ``21``, ``none`` -> ``0``); articles a/an/the are removed; whitespace is
    collapsed.
    """
    s = text.lower()
    s = re.sub(r"(?<=\d),(?=\d)", "", s)
    s = s.replace("'", "").replace("\u2019", "")
    s = _PUNCT.sub(" ", s)
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)
    tokens = _numbers_to_digits(s.split())
    return " ".join(t for t in tokens if t not in _ARTICLES)


def _as_answers(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """True when the normalised prediction equals any normalised accepted answer."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in _as_answers(answers))


def normalized_contains(prediction: str, answers: str | Sequence[str]) -> bool:
    """True when any normalised answer occurs in the normalised prediction as whole words.

    ``"2"`` is contained in ``"there are 2 dogs"`` but not in ``"12 dogs"``. An answer that normalises
    to nothing (e.g. ``"the"``) only matches an equally empty prediction.
    """
    pred = normalize_answer(prediction).split()
    for answer in _as_answers(answers):
        gold = normalize_answer(answer).split()
        if not gold:
            if not pred:
                return True
            continue
        if any(pred[i : i + len(gold)] == gold for i in range(len(pred) - len(gold) + 1)):
            return True
    return False
