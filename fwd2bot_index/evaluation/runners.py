"""Run benchmarks against any model-like object through its public API only.

A model for retrieval / SugarCrepe needs two methods, in the open_clip / sentence-transformers habit:

* ``encode_images(images: list[PIL.Image.Image], batch_size=, show_progress=)`` returning either an
  object with ``.embeddings`` (float32 [n, D]) or the array itself;
* ``encode_texts(texts: list[str], batch_size=, show_progress=)`` returning float32 [n, D].

Images are decoded here in chunks (a 5k-image gallery would not fit in memory as decoded PIL images),
so each ``encode_images`` call gets at most ``batch_size * CHUNK_BATCHES`` images. Embeddings are
re-normalised before scoring so the score is the cosine even if a model forgets to normalise.
QA takes a plain callable ``(image_path, question) -> answer``; :func:`model_answerer` builds one from
a model's ``answer(tokens, question, max_new_tokens=)``.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .datasets import QARecord, QASet, RetrievalSet
from .images import load_rgb
from .metrics import exact_match, normalized_contains, retrieval_recall, sugarcrepe_accuracy
from .sugarcrepe import read_sugarcrepe

__all__ = ["EmbeddingModel", "run_retrieval", "run_sugarcrepe", "run_qa", "model_answerer", "CHUNK_BATCHES"]

CHUNK_BATCHES = 4


class EmbeddingModel(Protocol):
    def encode_images(self, images: list[Any], batch_size: int = ..., show_progress: bool = ...) -> Any: ...
    def encode_texts(self, texts: list[str], batch_size: int = ..., show_progress: bool = ...) -> Any: ...


def _progress(total: int, desc: str, enabled: bool, unit: str):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=False)


def _as_matrix(output: Any, n: int, what: str) -> np.ndarray:
    """Accept an ndarray or an object with ``.embeddings``; check shape and values; L2-normalise."""
    array = np.asarray(getattr(output, "embeddings", output), dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != n:
        raise ValueError(f"{what} returned shape {array.shape}, expected ({n}, D)")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} returned NaN or inf")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{what} returned an all-zero embedding (row {int(np.flatnonzero(norms == 0)[0])})")
    return array / norms


def encode_image_files(
    model: EmbeddingModel, paths: Sequence[Path], batch_size: int = 32, show_progress: bool = True
) -> np.ndarray:
    """Decode and embed images chunk by chunk; returns L2-normalised float32 [n, D].

    A target with ``encode_image_paths`` (an indexed collection) supplies stored embeddings instead.
    """
    _check_batch_size(batch_size)
    if hasattr(model, "encode_image_paths"):
        return _as_matrix(model.encode_image_paths(list(paths)), len(paths), "encode_image_paths")
    chunk = batch_size * CHUNK_BATCHES
    parts = []
    with _progress(len(paths), "images", show_progress, "img") as bar:
        for start in range(0, len(paths), chunk):
            batch = [load_rgb(p) for p in paths[start : start + chunk]]
            out = model.encode_images(batch, batch_size=batch_size, show_progress=False)
            parts.append(_as_matrix(out, len(batch), "encode_images"))
            bar.update(len(batch))
    return _concat(parts, "encode_images")


def encode_text_list(
    model: EmbeddingModel, texts: Sequence[str], batch_size: int = 32, show_progress: bool = True
) -> np.ndarray:
    """Embed texts chunk by chunk (for progress); returns L2-normalised float32 [n, D]."""
    _check_batch_size(batch_size)
    chunk = batch_size * CHUNK_BATCHES * 4
    parts = []
    with _progress(len(texts), "texts", show_progress, "text") as bar:
        for start in range(0, len(texts), chunk):
            batch = list(texts[start : start + chunk])
            out = model.encode_texts(batch, batch_size=batch_size, show_progress=False)
            parts.append(_as_matrix(out, len(batch), "encode_texts"))
            bar.update(len(batch))
    return _concat(parts, "encode_texts")


def _concat(parts: list[np.ndarray], what: str) -> np.ndarray:
    dims = {p.shape[1] for p in parts}
    if len(dims) > 1:
        raise ValueError(f"{what} returned different dimensions across calls: {sorted(dims)}")
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_same_space(images: np.ndarray, texts: np.ndarray) -> None:
    if images.shape[1] != texts.shape[1]:
        raise ValueError(
            f"image embeddings have {images.shape[1]} dims but text embeddings {texts.shape[1]}: not one space"
        )


def run_retrieval(
    model: EmbeddingModel,
    retrieval_set: RetrievalSet,
    batch_size: int = 32,
    ks: Sequence[int] = (1, 5, 10),
    show_progress: bool = True,
) -> dict[str, Any]:
    """Embed the gallery and the captions, score by cosine, and compute recall@k both ways."""
    if retrieval_set.n_images == 0:
        raise ValueError(f"{retrieval_set.source}: no images to evaluate (split {retrieval_set.split!r})")
    t0 = time.perf_counter()
    images = encode_image_files(model, retrieval_set.image_paths, batch_size, show_progress)
    t1 = time.perf_counter()
    texts = encode_text_list(model, retrieval_set.captions, batch_size, show_progress)
    t2 = time.perf_counter()
    _check_same_space(images, texts)
    recall = retrieval_recall(texts @ images.T, retrieval_set.caption_to_image, ks)
    return {
        "benchmark": "retrieval",
        "dataset": retrieval_set.name,
        "split": retrieval_set.split,
        "source": str(retrieval_set.source) if retrieval_set.source else None,
        "n_images": retrieval_set.n_images,
        "n_captions": retrieval_set.n_captions,
        "skipped_missing": retrieval_set.skipped_missing,
        "batch_size": batch_size,
        "recall": recall,
        "seconds": {"encode_images": t1 - t0, "encode_texts": t2 - t1, "score": time.perf_counter() - t2},
    }


def run_sugarcrepe(
    model: EmbeddingModel,
    data_dir: str | Path,
    images_dir: str | Path,
    categories: Iterable[str] | None = None,
    limit: int | None = None,
    skip_missing: bool = False,
    batch_size: int = 32,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Score each pair by cosine(image, caption) vs cosine(image, negative_caption).

    Each distinct image and each distinct text is embedded once, however many pairs share it.
    """
    data = read_sugarcrepe(data_dir, images_dir, categories=categories, limit=limit, skip_missing=skip_missing)
    pairs = [p for c in data.values() for p in c.pairs]
    if not pairs:
        raise ValueError(f"{data_dir}: no SugarCrepe pairs left to evaluate (all images missing?)")
    image_index = {path: i for i, path in enumerate(dict.fromkeys(p.image for p in pairs))}
    text_index = {t: i for i, t in enumerate(dict.fromkeys(t for p in pairs for t in (p.caption, p.negative_caption)))}
    t0 = time.perf_counter()
    images = encode_image_files(model, list(image_index), batch_size, show_progress)
    t1 = time.perf_counter()
    texts = encode_text_list(model, list(text_index), batch_size, show_progress)
    t2 = time.perf_counter()
    _check_same_space(images, texts)
    pos: dict[str, np.ndarray] = {}
    neg: dict[str, np.ndarray] = {}
    for name, category in data.items():
        img = images[[image_index[p.image] for p in category.pairs]]
        pos[name] = np.einsum("nd,nd->n", img, texts[[text_index[p.caption] for p in category.pairs]])
        neg[name] = np.einsum("nd,nd->n", img, texts[[text_index[p.negative_caption] for p in category.pairs]])
    present = [n for n in data if data[n].pairs]
    accuracy = sugarcrepe_accuracy({n: pos[n] for n in present}, {n: neg[n] for n in present})
    return {
        "benchmark": "sugarcrepe",
        "data_dir": str(data_dir),
        "images_dir": str(images_dir),
        "limit": limit,
        "batch_size": batch_size,
        "n_pairs": {n: len(c.pairs) for n, c in data.items()},
        "skipped_missing": {n: c.skipped_missing for n, c in data.items()},
        "n_images": len(image_index),
        "n_texts": len(text_index),
        "accuracy": accuracy,
        "seconds": {"encode_images": t1 - t0, "encode_texts": t2 - t1},
    }


AnswerFn = Callable[[Path, str], str]


def run_qa(
    answer_fn: AnswerFn,
    qa: QASet | Iterable[QARecord],
    limit: int | None = None,
    show_progress: bool = True,
    keep_predictions: bool = True,
) -> dict[str, Any]:
    """Ask ``answer_fn(image_path, question)`` for every record and score exact match and containment.

    A failing call raises with the record's image and question attached; nothing is silently skipped.
    """
    records = list(qa.records if isinstance(qa, QASet) else qa)[:limit]
    if not records:
        raise ValueError("no QA records to evaluate")
    rows = []
    with _progress(len(records), "questions", show_progress, "q") as bar:
        for record in records:
            try:
                prediction = answer_fn(record.image, record.question)
            except Exception as e:
                raise RuntimeError(f"answering {str(record.image)!r} / {record.question!r} failed: {e}") from e
            if not isinstance(prediction, str):
                raise TypeError(f"answer function returned {type(prediction).__name__} for {record.image}, expected str")
            rows.append(
                {
                    "image": str(record.image),
                    "question": record.question,
                    "answers": list(record.answers),
                    "type": record.type,
                    "prediction": prediction,
                    "exact_match": exact_match(prediction, record.answers),
                    "contains": normalized_contains(prediction, record.answers),
                }
            )
            bar.update(1)
    result: dict[str, Any] = {"benchmark": "qa", **_qa_scores(rows)}
    result["skipped_missing"] = qa.skipped_missing if isinstance(qa, QASet) else 0
    result["source"] = str(qa.source) if isinstance(qa, QASet) and qa.source else None
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["type"] is not None:
            by_type[row["type"]].append(row)
    result["by_type"] = {t: _qa_scores(r) for t, r in sorted(by_type.items())}
    if keep_predictions:
        result["predictions"] = rows
    return result


def _qa_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "n": len(rows),
        "exact_match": float(np.mean([r["exact_match"] for r in rows])),
        "contains": float(np.mean([r["contains"] for r in rows])),
    }


def model_answerer(model: Any, tokens_for: Callable[[Path], Any], max_new_tokens: int = 32) -> AnswerFn:
    """Adapt ``model.answer(tokens, question, max_new_tokens=)`` to ``(image_path, question) -> str``.

    ``tokens_for`` maps an image path to its stored tokens (e.g. a collection lookup). A model that
    answers with a list (batched API) has its first element taken.
    """

    def answer(image: Path, question: str) -> str:
        out = model.answer(tokens_for(image), question, max_new_tokens=max_new_tokens)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return str(out)

    return answer
