"""Measure verified search on a demo-data folder: does the model's own check of its hits help, and can
its "no good match" be trusted?

Four measurements, all from the public model API (``encode_images``, ``encode_texts``, ``relevance``)
on held-out splits of an ``f2b demo-data`` folder (the scene-unique first caption of each image is the
query, as in the demo model's claims table):

- **retrieval**: text-to-image R@1/5/10 of the embedding alone, and after verifying the top N hits
  (N = 10, 20): the top N re-ranked by relevance, the rest in embedding order;
- **rejection**: for ``min_relevance``, the share of *nonsense* queries (compositions no gallery image
  holds: ``synthetic.nonsense``) for which no verified hit passes, and the share of *true* queries
  wrongly cut (no hit passes, though the gallery holds the described image), plus the share whose
  true image was verified but cut;
- **hard negatives**: SugarCrepe-style accuracy when P(yes) decides between the true caption and the
  negative (strictly higher wins, as SugarCrepe's own code), beside the embedding's accuracy;
- ``fit_calibration``: a temperature and bias for ``config.relevance_calibration`` from true and
  negative captions (logistic regression on the yes/no margin), for a recipe that records one.

Latency is measured by ``bench/bench_verify.py`` (through the server, verified against plain search).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..verification import DEFAULT_MIN_RELEVANCE, MAX_VERIFY
from .datasets import read_captions_jsonl
from .metrics import retrieval_recall
from .sugarcrepe import read_sugarcrepe

SPLITS = ("test", "test_unseen")
KS = (1, 5, 10)


def _say(progress: bool | Callable[[str], None], text: str) -> None:
    if callable(progress):
        progress(text)
    elif progress:
        print(text, flush=True)


def _images(paths: Sequence[Path]) -> list[Any]:
    from ..imaging import load_image

    return [load_image(p).convert("RGB") for p in paths]


def _top(sim: np.ndarray, n: int) -> np.ndarray:
    """(Q, n) gallery indices of the n best scores per row, best first (ties: lower index first)."""
    return np.argsort(-sim, axis=1, kind="stable")[:, :n]


def _relevance_of(model: Any, tokens: np.ndarray, top: np.ndarray, queries: Sequence[str], kind: str,
                  batch_size: int) -> np.ndarray:
    """(Q, N) P(yes) of each query's top-N gallery images, one ``model.relevance`` call for all pairs."""
    flat = [tokens[j] for j in top.reshape(-1)]
    asked = [q for q in queries for _ in range(top.shape[1])]
    return np.asarray(model.relevance(flat, asked, kind=kind, batch_size=batch_size)).reshape(top.shape)


def verified_ranks(sim: np.ndarray, relevance: np.ndarray, top: np.ndarray, owners: np.ndarray,
                   n: int) -> np.ndarray:
    """0-based rank of each query's own image after its top ``n`` are re-ranked by relevance (ties keep
    the embedding order); an image beyond the top n keeps its embedding rank."""
    full = np.argsort(-sim, axis=1, kind="stable")
    ranks = np.argmax(full == owners[:, None], axis=1)
    for q in range(len(owners)):
        head = top[q, :n][np.argsort(-relevance[q, :n], kind="stable")]
        hit = np.flatnonzero(head == owners[q])
        if hit.size:
            ranks[q] = int(hit[0])
    return ranks


def _rejection(relevance: np.ndarray, cutoff: float) -> np.ndarray:
    """Per query: True when no verified hit reaches ``cutoff`` ("no good match")."""
    return relevance.max(axis=1) < cutoff if relevance.size else np.zeros(len(relevance), dtype=bool)


def _scenes(data_dir: Path) -> dict[str, Any]:
    """image path (resolved) -> Scene, from the folder's ``scenes.jsonl``."""
    from ..synthetic.scene import Scene

    out = {}
    for line in (data_dir / "scenes.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out[str((data_dir / row["image"]).resolve())] = Scene.from_dict(row["scene"])
    return out


def measure_split(model: Any, data_dir: Path, split: str, verify: Sequence[int], min_relevance: float,
                  n_gallery: int | None, n_nonsense: int, strategy: Any, batch_size: int, seed: int,
                  progress: bool | Callable[[str], None] = False) -> dict[str, Any]:
    """Retrieval with and without verification, and rejection of true and nonsense queries, on one split."""
    from ..synthetic.nonsense import nonsense_queries

    gallery = read_captions_jsonl(data_dir / "captions.jsonl", split=split, limit=n_gallery, max_captions_per_image=1)
    _say(progress, f"{split}: encoding {gallery.n_images} images and their captions")
    encoded = model.encode_images(_images(gallery.image_paths), batch_size=batch_size, strategy=strategy)
    kind = encoded.strategy.tokens
    texts = model.encode_texts(gallery.captions, batch_size=batch_size, strategy=encoded.strategy)
    sim = texts @ encoded.embeddings.T
    owners = gallery.caption_to_image
    deepest = min(max(verify), gallery.n_images)
    top = _top(sim, deepest)
    started = time.perf_counter()
    _say(progress, f"{split}: verifying the top {deepest} of {len(owners)} true queries")
    relevance = _relevance_of(model, encoded.tokens, top, gallery.captions, kind, batch_size)
    seconds = time.perf_counter() - started
    retrieval = {"embedding": retrieval_recall(sim, owners, ks=KS)["t2i"]}
    for n in verify:
        ranks = verified_ranks(sim, relevance, top, owners, min(n, deepest))
        retrieval[f"verify@{n}"] = {k: float(np.mean(ranks < k)) for k in KS}
    in_top = top == owners[:, None]
    true_cut = _rejection(relevance, min_relevance)
    owner_cut = (in_top & (relevance < min_relevance)).any(axis=1)
    scenes = _scenes(data_dir)
    gallery_scenes = [scenes[str(p.resolve())] for p in gallery.image_paths]
    nonsense = nonsense_queries(gallery_scenes, n_per_kind=n_nonsense, seed=seed)
    rejected: dict[str, Any] = {}
    if nonsense:
        _say(progress, f"{split}: verifying the top {deepest} of {len(nonsense)} nonsense queries")
        queries = [q for _, q in nonsense]
        vectors = model.encode_texts(queries, batch_size=batch_size, strategy=encoded.strategy)
        fake_sim = vectors @ encoded.embeddings.T
        fake_top = _top(fake_sim, deepest)
        fake = _relevance_of(model, encoded.tokens, fake_top, queries, kind, batch_size)
        said_none = _rejection(fake, min_relevance)
        kinds = np.array([k for k, _ in nonsense])
        rejected = {"all": float(said_none.mean()), "n": len(nonsense),
                    "by_kind": {k: {"rejected": float(said_none[kinds == k].mean()), "n": int((kinds == k).sum())}
                                for k in dict.fromkeys(kinds.tolist())},
                    "mean_top_relevance": float(fake.max(axis=1).mean()),
                    "examples": [q for q, r in zip(queries, said_none) if not r][:5]}
    return {
        "split": split, "n_images": gallery.n_images, "n_queries": len(owners), "strategy": encoded.strategy.name,
        "verified_depth": deepest, "retrieval_t2i": retrieval,
        "true_queries": {"cut": float(true_cut.mean()), "true_image_cut": float(owner_cut.mean()),
                         "true_image_in_top": float(in_top.any(axis=1).mean()),
                         "mean_top_relevance": float(relevance.max(axis=1).mean()),
                         "mean_true_image_relevance": float(relevance[in_top].mean()) if in_top.any() else None},
        "nonsense_rejected": rejected,
        "verify_seconds_per_query": seconds / max(1, len(owners)),
    }


def measure_hard_negatives(model: Any, data_dir: Path, strategy: Any = None, limit: int | None = None,
                           batch_size: int = 32, progress: bool | Callable[[str], None] = False) -> dict[str, Any]:
    """Per SugarCrepe-style category of ``data_dir/sugarcrepe``: accuracy when the model's P(yes) decides
    (true caption strictly above the negative) and when the embedding's cosine does; plus the raw yes/no
    margins of both captions (``fit_calibration`` takes them)."""
    categories = read_sugarcrepe(data_dir / "sugarcrepe", data_dir / "images", limit=limit)
    out: dict[str, Any] = {}
    margins: dict[str, list[float]] = {"true": [], "negative": []}
    for name, category in categories.items():
        if not category.pairs:
            continue
        _say(progress, f"hard negatives: {name} ({len(category.pairs)} pairs)")
        paths = list(dict.fromkeys(p.image for p in category.pairs))
        encoded = model.encode_images(_images(paths), batch_size=batch_size, strategy=strategy)
        where = {p: i for i, p in enumerate(paths)}
        rows = [where[p.image] for p in category.pairs]
        tokens = [encoded.tokens[i] for i in rows]
        kind = encoded.strategy.tokens
        true = np.asarray(model.relevance(tokens, [p.caption for p in category.pairs], kind=kind,
                                          batch_size=batch_size, calibrated=False))
        negative = np.asarray(model.relevance(tokens, [p.negative_caption for p in category.pairs], kind=kind,
                                              batch_size=batch_size, calibrated=False))
        pos_t = model.encode_texts([p.caption for p in category.pairs], batch_size=batch_size, strategy=encoded.strategy)
        neg_t = model.encode_texts([p.negative_caption for p in category.pairs], batch_size=batch_size,
                                   strategy=encoded.strategy)
        image = encoded.embeddings[rows]
        out[name] = {"relevance": float(np.mean(true > negative)),
                     "embedding": float(np.mean((pos_t * image).sum(1) > (neg_t * image).sum(1))),
                     "n_pairs": len(category.pairs)}
        margins["true"] += _logit(true).tolist()
        margins["negative"] += _logit(negative).tolist()
    return {"accuracy": out, "margins": margins}


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def fit_calibration(true_margins: Sequence[float], negative_margins: Sequence[float],
                    steps: int = 50) -> dict[str, float]:
    """Temperature and bias so that sigmoid(margin / T + b) is a calibrated P(match): logistic regression
    (Newton's method) of "true caption" on the raw yes/no margin, true captions labelled 1 and negatives 0.
    The result goes into ``config.relevance_calibration``."""
    x = np.concatenate([np.asarray(true_margins, float), np.asarray(negative_margins, float)])
    y = np.concatenate([np.ones(len(true_margins)), np.zeros(len(negative_margins))])
    if len(x) < 2 or y.min() == y.max():
        raise ValueError("fitting a calibration needs both true and negative margins")
    w = np.zeros(2)  # (slope, bias)
    design = np.stack([x, np.ones_like(x)], axis=1)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + 1e-4 * w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + 1e-4 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    informative = float(w[0]) > 1e-3  # a slope at or below zero: the margin does not tell true from negative
    slope = max(float(w[0]), 1e-3)  # never invert the model's own answer
    return {"temperature": 1.0 / slope, "bias": float(w[1]), "n": int(len(x)), "informative": informative}


def measure_verification(model: Any, data_dir: str | Path, splits: Sequence[str] = SPLITS,
                         verify: Sequence[int] = (10, 20), min_relevance: float = DEFAULT_MIN_RELEVANCE,
                         n_gallery: int | None = None, n_nonsense: int = 50, n_sugarcrepe: int | None = None,
                         strategy: Any = None, batch_size: int = 32, seed: int = 0,
                         progress: bool | Callable[[str], None] = False) -> dict[str, Any]:
    """Everything in the module docstring, on ``data_dir`` (an ``f2b demo-data`` folder), as one dict
    (JSON-ready). ``n_gallery`` caps the images per split; ``n_nonsense`` is per nonsense kind."""
    data_dir = Path(data_dir)
    verify = sorted({int(n) for n in verify})
    if not verify or verify[0] < 1 or verify[-1] > MAX_VERIFY:
        raise ValueError(f"verify depths must be 1 to {MAX_VERIFY}, got {verify}")
    if not 0 <= min_relevance <= 1:
        raise ValueError(f"min_relevance must be between 0 and 1, got {min_relevance}")
    strategy = model.resolve_strategy(strategy)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "settings": {"data": str(data_dir), "splits": list(splits), "verify": verify, "min_relevance": min_relevance,
                     "n_gallery": n_gallery, "n_nonsense_per_kind": n_nonsense, "n_sugarcrepe": n_sugarcrepe,
                     "strategy": strategy.name, "verify_prompt": model.config.verify_prompt,
                     "calibration": dict(model.config.relevance_calibration or {}), "seed": seed,
                     "model": str(getattr(model, "source", "")), "fingerprint": getattr(model, "fingerprint", None)},
        "splits": {split: measure_split(model, data_dir, split, verify, min_relevance, n_gallery, n_nonsense,
                                        strategy, batch_size, seed, progress) for split in splits},
    }
    if (data_dir / "sugarcrepe").is_dir():
        hard = measure_hard_negatives(model, data_dir, strategy, n_sugarcrepe, batch_size, progress)
        results["hard_negatives"] = hard["accuracy"]
        if hard["margins"]["true"]:
            results["fitted_calibration"] = fit_calibration(hard["margins"]["true"], hard["margins"]["negative"])
    results["seconds"] = time.perf_counter() - started
    return results


def report_lines(results: dict[str, Any]) -> list[str]:
    """The results as short lines for a terminal or a report."""
    s = results["settings"]
    lines = [f"verified search, {s['strategy']}, cutoff {s['min_relevance']:g}, prompt {s['verify_prompt']!r}"]
    for split, r in results["splits"].items():
        row = ", ".join(f"{name} R@1 {v[1]:.3f} R@5 {v[5]:.3f}" for name, v in r["retrieval_t2i"].items())
        lines.append(f"{split} ({r['n_images']} images): {row}")
        rej, true = r["nonsense_rejected"], r["true_queries"]
        if rej:
            kinds = ", ".join(f"{k} {v['rejected']:.2f}" for k, v in rej["by_kind"].items())
            lines.append(f"{split}: nonsense rejected {rej['all']:.3f} ({kinds}; n={rej['n']}); true queries cut "
                         f"{true['cut']:.3f}, true image cut {true['true_image_cut']:.3f}")
    for name, v in results.get("hard_negatives", {}).items():
        lines.append(f"hard negatives {name}: relevance {v['relevance']:.3f}, embedding {v['embedding']:.3f} "
                     f"(n={v['n_pairs']})")
    if "fitted_calibration" in results:
        c = results["fitted_calibration"]
        lines.append(f"fitted calibration: temperature {c['temperature']:.3f}, bias {c['bias']:+.3f} (n={c['n']})"
                     + ("" if c.get("informative", True) else ": uninformative, the margin does not separate them"))
    return lines


def write_verification_report(results: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``results.json`` and ``report.md`` (the report lines) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results.json": out / "results.json", "report.md": out / "report.md"}
    files["results.json"].write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    body = "\n".join(f"- {line}" for line in report_lines(results))
    files["report.md"].write_text(f"# Verified search\n\n{body}\n", encoding="utf-8")
    return files
