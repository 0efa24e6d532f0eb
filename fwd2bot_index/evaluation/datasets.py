"""Readers for retrieval and QA benchmarks in the formats they are published in.

* Karpathy split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``): ``{"images": [{"filename",
  "filepath"?, "split", "sentences": [{"raw", ...}, ...]}, ...], "dataset": ...}``.
* CSV mirrors: one row per image with a list of captions (a JSON or Python list literal), several rows
  per image with one caption each, or numbered caption columns (``caption_0``, ``caption_1``, ...);
  delimiter sniffed (``,`` ``|`` tab ``;``), headers matched case-insensitively.
* The demo-data layout (``captions.jsonl`` rows ``{"image", "captions", "split"}``; ``qa.jsonl`` rows
  ``{"image", "question", "answer", "type"}``), paths relative to the file's folder.

Every reader returns images in file order and keeps the first ``limit`` records of the split (before
any are skipped, so a limit selects the same subset whichever images are present). An image that is
not on disk raises :class:`MissingImageError` or, with ``skip_missing=True``, is skipped and counted. Malformed records raise :class:`EvalDataError` naming the file and the record.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EvalDataError, MissingImageError

__all__ = [
    "RetrievalSet",
    "QARecord",
    "QASet",
    "read_karpathy_json",
    "read_captions_csv",
    "read_captions_jsonl",
    "read_qa_jsonl",
    "load_retrieval_set",
]


@dataclass(frozen=True)
class RetrievalSet:
    """Images and their captions; caption ``j`` belongs to image ``caption_to_image[j]``."""

    image_paths: list[Path]
    captions: list[str]
    caption_to_image: np.ndarray
    name: str = ""
    split: str | None = None
    source: Path | None = None
    skipped_missing: int = 0

    def __post_init__(self) -> None:
        index = np.asarray(self.caption_to_image, dtype=np.int64)
        object.__setattr__(self, "caption_to_image", index)
        if index.shape != (len(self.captions),):
            raise ValueError(
                f"caption_to_image has shape {index.shape}, expected ({len(self.captions)},)"
            )
        if index.size and (index.min() < 0 or index.max() >= len(self.image_paths)):
            raise ValueError("caption_to_image refers to an image index out of range")
        if len(self.image_paths) and np.bincount(index, minlength=len(self.image_paths)).min() == 0:
            raise ValueError("every image needs at least one caption")

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def captions_of(self, image_index: int) -> list[str]:
        """The captions of one image, in file order."""
        return [c for c, i in zip(self.captions, self.caption_to_image) if i == image_index]


@dataclass(frozen=True)
class QARecord:
    """One question about one image; ``answers`` holds every accepted answer."""

    image: Path
    question: str
    answers: tuple[str, ...]
    type: str | None = None


@dataclass(frozen=True)
class QASet:
    records: list[QARecord]
    source: Path | None = None
    skipped_missing: int = 0


@dataclass
class _ImageRecord:
    where: str
    path: Path
    split: str | None
    captions: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# shared assembly


def _assemble(
    records: Iterable[_ImageRecord],
    file: Path,
    *,
    name: str,
    split: str | None,
    limit: int | None,
    skip_missing: bool,
    max_captions_per_image: int | None,
) -> RetrievalSet:
    """Filter by split, check images exist, apply the limit and flatten captions."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    image_paths: list[Path] = []
    captions: list[str] = []
    owners: list[int] = []
    skipped = 0
    taken = 0
    for record in records:
        if split is not None and record.split != split:
            continue
        if limit is not None and taken >= limit:
            break
        taken += 1
        if not record.captions:
            raise EvalDataError(file, record.where, "no captions")
        if not record.path.is_file():
            if not skip_missing:
                raise MissingImageError(file, record.where, record.path)
            skipped += 1
            continue
        kept = record.captions[:max_captions_per_image] if max_captions_per_image else record.captions
        owners.extend([len(image_paths)] * len(kept))
        captions.extend(kept)
        image_paths.append(record.path)
    return RetrievalSet(
        image_paths=image_paths,
        captions=captions,
        caption_to_image=np.asarray(owners, dtype=np.int64),
        name=name,
        split=split,
        source=file,
        skipped_missing=skipped,
    )


def _require_str(value: Any, file: Path, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EvalDataError(file, where, f"{what} must be a non-empty string, got {value!r}")
    return value.strip()


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise EvalDataError(path, f"line {e.lineno} column {e.colno}", f"not valid JSON ({e.msg})") from None


# --------------------------------------------------------------------------------------------------
# Karpathy JSON


def read_karpathy_json(
    path: str | Path,
    images_dir: str | Path | None = None,
    split: str | None = "test",
    limit: int | None = None,
    skip_missing: bool = False,
    max_captions_per_image: int | None = None,
) -> RetrievalSet:
    """Read a Karpathy split file; image ``i`` lives at ``images_dir / filepath / filename``.

    ``images_dir`` defaults to the JSON file's folder. ``split=None`` keeps every split (note COCO's
    ``restval`` is its own split). ``max_captions_per_image`` trims the few COCO images with 6-7
    captions when a strict 5-per-image protocol is wanted; by default all captions are kept.
    """
    file = Path(path)
    data = _load_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise EvalDataError(file, "top level", 'expected an object with an "images" list (Karpathy format)')
    root = Path(images_dir) if images_dir is not None else file.parent
    name = str(data.get("dataset") or file.stem)
    return _assemble(
        _karpathy_records(data["images"], file, root),
        file,
        name=name,
        split=split,
        limit=limit,
        skip_missing=skip_missing,
        max_captions_per_image=max_captions_per_image,
    )


def _karpathy_records(images: list[Any], file: Path, root: Path) -> Iterator[_ImageRecord]:
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            raise EvalDataError(file, where, f"expected an object, got {type(entry).__name__}")
        filename = _require_str(entry.get("filename"), file, where, '"filename"')
        split = _require_str(entry.get("split"), file, where, '"split"')
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise EvalDataError(file, where, '"sentences" must be a list')
        captions = []
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            captions.append(_require_str(raw, file, f"{where}.sentences[{j}]", '"raw"'))
        filepath = entry.get("filepath")
        folder = root / filepath if isinstance(filepath, str) and filepath else root
        yield _ImageRecord(where=where, path=folder / filename, split=split, captions=captions)


# --------------------------------------------------------------------------------------------------
# CSV mirrors

_IMAGE_COLUMNS = ("filename", "file_name", "image", "image_name", "image_file", "image_path", "img", "file", "path")
_CAPTION_COLUMNS = ("captions", "caption", "raw", "sentences", "sentence", "comment", "text")
_NUMBERED_CAPTION = re.compile(r"^(?:caption|captions|sentence|raw|text|comment)[ _-]?(\d+)$")


def read_captions_csv(
    path: str | Path,
    images_dir: str | Path | None = None,
    split: str | None = "test",
    limit: int | None = None,
    skip_missing: bool = False,
    *,
    image_column: str | None = None,
    caption_columns: str | Sequence[str] | None = None,
    split_column: str | None = None,
    delimiter: str | None = None,
    max_captions_per_image: int | None = None,
) -> RetrievalSet:
    """Read a caption CSV; rows naming the same image are merged in file order.

    Columns are found by name unless given: image ``filename``/``image``/``image_name``/...,
    captions ``captions``/``caption``/``raw``/``comment``/... or numbered ``caption_0``, ``caption_1``...;
    an optional ``filepath`` column is joined before the file name. A caption cell that looks like a
    list (``["a", "b"]`` or ``['a', 'b']``) holds several captions. A file without a split column must be
    read with ``split=None``.
    """
    file = Path(path)
    root = Path(images_dir) if images_dir is not None else file.parent
    if not file.is_file():
        raise FileNotFoundError(f"annotation file not found: {file}")
    with file.open(encoding="utf-8-sig", newline="") as f:
        sep = delimiter or _sniff_delimiter(file, f.read(8192))
        f.seek(0)
        reader = csv.reader(f, delimiter=sep)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise EvalDataError(file, "line 1", "empty file, expected a header row") from None
        columns = _csv_columns(file, header, image_column, caption_columns, split_column, split)
        records = _csv_records(file, reader, header, columns, root)
    return _assemble(
        records.values(),
        file,
        name=file.stem,
        split=split,
        limit=limit,
        skip_missing=skip_missing,
        max_captions_per_image=max_captions_per_image,
    )


def _sniff_delimiter(file: Path, sample: str) -> str:
    if file.suffix.lower() == ".tsv":
        return "\t"
    first_line = sample.splitlines()[0] if sample else ""
    counts = {d: first_line.count(d) for d in (",", "\t", "|", ";")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


@dataclass(frozen=True)
class _CsvColumns:
    image: int
    captions: list[int]
    split: int | None
    filepath: int | None


def _csv_columns(
    file: Path,
    header: list[str],
    image_column: str | None,
    caption_columns: str | Sequence[str] | None,
    split_column: str | None,
    split: str | None,
) -> _CsvColumns:
    lowered = [h.lower() for h in header]

    def find(name: str) -> int:
        if name.lower() not in lowered:
            raise EvalDataError(file, "header", f"no column named {name!r}; columns are {header}")
        return lowered.index(name.lower())

    def first_of(candidates: Sequence[str], what: str, flag: str) -> int:
        for c in candidates:
            if c in lowered:
                return lowered.index(c)
        raise EvalDataError(
            file, "header", f"cannot tell which column holds the {what}; columns are {header} (pass {flag}=...)"
        )

    image = find(image_column) if image_column else first_of(_IMAGE_COLUMNS, "image file names", "image_column")
    if caption_columns is not None:
        names = [caption_columns] if isinstance(caption_columns, str) else list(caption_columns)
        captions = [find(n) for n in names]
    else:
        numbered = sorted(
            ((int(m.group(1)), i) for i, h in enumerate(lowered) if (m := _NUMBERED_CAPTION.match(h))),
        )
        captions = [i for _, i in numbered] or [first_of(_CAPTION_COLUMNS, "captions", "caption_columns")]
    split_index = find(split_column) if split_column else (lowered.index("split") if "split" in lowered else None)
    if split is not None and split_index is None:
        raise EvalDataError(
            file, "header", f"no split column, so split {split!r} cannot be selected (pass split=None, or `--split all` on the command line, to use every row)"
        )
    filepath = lowered.index("filepath") if "filepath" in lowered else None
    return _CsvColumns(image=image, captions=captions, split=split_index, filepath=filepath)


def _csv_records(
    file: Path, reader: Any, header: list[str], columns: _CsvColumns, root: Path
) -> dict[str, _ImageRecord]:
    records: dict[str, _ImageRecord] = {}
    for row in reader:
        where = f"line {reader.line_num}"
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise EvalDataError(file, where, f"{len(row)} fields, the header has {len(header)}")
        filename = _require_str(row[columns.image], file, where, f"column {header[columns.image]!r}")
        folder = root
        if columns.filepath is not None and row[columns.filepath].strip():
            folder = root / row[columns.filepath].strip()
        split = row[columns.split].strip() if columns.split is not None else None
        captions = [c for i in columns.captions for c in _parse_caption_cell(row[i], file, where)]
        key = str(folder / filename)
        record = records.get(key)
        if record is None:
            records[key] = _ImageRecord(where=where, path=folder / filename, split=split, captions=captions)
        elif record.split != split:
            raise EvalDataError(
                file, where, f"image {filename!r} is in split {split!r} here but {record.split!r} at {record.where}"
            )
        else:
            record.captions.extend(captions)
    return records


def _parse_caption_cell(cell: str, file: Path, where: str) -> list[str]:
    """One caption, or a list literal of captions (JSON or Python quoting)."""
    text = cell.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [text] if text else []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise EvalDataError(file, where, f"caption cell looks like a list but does not parse: {text[:80]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EvalDataError(file, where, "caption list must hold strings only")
    return [v.strip() for v in value if v.strip()]


# --------------------------------------------------------------------------------------------------
# JSON lines (demo-data layout)


def _jsonl_rows(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        handle = file.open(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {file}") from None
    with handle:
        for n, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(file, where, f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalDataError(file, where, f"expected an object, got {type(row).__name__}")
            yield where, row


def _string_list(value: Any, file: Path, where: str, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise EvalDataError(file, where, f"{what} must be a string or a non-empty list of strings")
    return [_require_str(v, file, where, what) for v in value]


def read_captions_jsonl(
    path: str | Path,
    images_dir: str | Path | None = None,
    split: str | None = "test",
    limit: int | None = None,
    skip_missing: bool = False,
    max_captions_per_image: int | None = None,
) -> RetrievalSet:
    """Read ``captions.jsonl`` (rows ``{"image", "captions", "split"}``, paths relative to its folder)."""
    file = Path(path)
    root = Path(images_dir) if images_dir is not None else file.parent

    def records() -> Iterator[_ImageRecord]:
        for where, row in _jsonl_rows(file):
            image = _require_str(row.get("image"), file, where, '"image"')
            captions = _string_list(row.get("captions"), file, where, '"captions"')
            row_split = row.get("split")
            if split is not None and not isinstance(row_split, str):
                raise EvalDataError(file, where, f'"split" must be a string, got {row_split!r}')
            yield _ImageRecord(where=where, path=root / image, split=row_split, captions=captions)

    return _assemble(
        records(),
        file,
        name=file.parent.name or file.stem,
        split=split,
        limit=limit,
        skip_missing=skip_missing,
        max_captions_per_image=max_captions_per_image,
    )


def read_qa_jsonl(
    path: str | Path,
    images_dir: str | Path | None = None,
    limit: int | None = None,
    skip_missing: bool = False,
) -> QASet:
    """Read ``qa.jsonl`` rows ``{"image", "question", "answer" | "answers", "type"?}``."""
    file = Path(path)
    root = Path(images_dir) if images_dir is not None else file.parent
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of questions, got {limit}")
    records: list[QARecord] = []
    skipped = 0
    for n, (where, row) in enumerate(_jsonl_rows(file)):
        if limit is not None and n >= limit:
            break
        image = root / _require_str(row.get("image"), file, where, '"image"')
        question = _require_str(row.get("question"), file, where, '"question"')
        answers = _string_list(row.get("answers", row.get("answer")), file, where, '"answer"')
        kind = row.get("type")
        if not image.is_file():
            if not skip_missing:
                raise MissingImageError(file, where, image)
            skipped += 1
            continue
        records.append(QARecord(image, question, tuple(answers), kind if isinstance(kind, str) else None))
    return QASet(records=records, source=file, skipped_missing=skipped)


def load_retrieval_set(
    path: str | Path,
    images_dir: str | Path | None = None,
    split: str | None = "test",
    limit: int | None = None,
    skip_missing: bool = False,
    **options: Any,
) -> RetrievalSet:
    """Pick the reader by suffix: ``.json`` Karpathy, ``.csv``/``.tsv`` CSV, ``.jsonl`` demo-data."""
    suffix = Path(path).suffix.lower()
    readers = {".json": read_karpathy_json, ".csv": read_captions_csv, ".tsv": read_captions_csv, ".jsonl": read_captions_jsonl}
    if suffix not in readers:
        raise ValueError(f"{path}: unknown annotation format {suffix!r}; expected .json (Karpathy), .csv/.tsv or .jsonl")
    return readers[suffix](path, images_dir, split=split, limit=limit, skip_missing=skip_missing, **options)
