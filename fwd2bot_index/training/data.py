"""Training data: readers for caption pairs, LLaVA instruction JSON and the synthetic world.

Every reader produces ``Sample`` records: one image path with its captions (for the contrastive
loss and for captioning in pass 2) and its question/answer pairs (pass 2 only). Records are
validated when read, so a malformed record stops the run *before* training, with the file and line
that is wrong. Images are only opened while training: a missing or undecodable image is skipped and
counted by ``ImageLoader`` (reported at the end), never a reason to abort a multi-hour run.

Paths inside a data file are relative to that file's folder unless ``image_root`` says otherwise
(LLaVA's JSON files conventionally point into a separate image folder).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

IMAGE_KEYS = ("image", "image_path", "path", "file", "file_name", "filename", "filepath")
CAPTION_KEYS = ("captions", "caption", "text", "texts", "sentences")
EVAL_SPLITS = ("val", "validation", "dev", "test")
IMAGE_TAG = "<image>"


class DataFormatError(ValueError):
    """A data file, or one record in it, is not in a format the trainer reads."""


@dataclass
class Sample:
    """One training image with what the trainer may say about it."""

    image: Path
    captions: list[str] = field(default_factory=list)
    qa: list[tuple[str, str]] = field(default_factory=list)
    split: str | None = None
    source: str = ""  # "file:line" where the record came from, for messages

    @property
    def key(self) -> str:
        return str(self.image)


def _where(path: Path, line: int | None, kind: str = "line") -> str:
    return f"{path}:{line}" if line is not None and kind == "line" else f"{path} ({kind} {line})"


def _pick(record: dict, keys: Sequence[str], preferred: str | None) -> tuple[str | None, Any]:
    if preferred is not None:
        return (preferred, record[preferred]) if preferred in record else (None, None)
    for key in keys:
        if key in record and record[key] is not None:
            return key, record[key]
    return None, None


def _as_captions(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):  # a JSON list inside a CSV cell
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return [text] if text else []
        else:
            return [text] if text else []
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise DataFormatError(f"{where}: captions must be a string or a list of strings, got {type(value).__name__}")


def _resolve(image: Any, base: Path, where: str) -> Path:
    if not isinstance(image, str) or not image.strip():
        raise DataFormatError(f"{where}: the image path must be a non-empty string, got {image!r}")
    path = Path(image.strip()).expanduser()
    return path if path.is_absolute() else (base / path)


def _pair_record(record: Any, base: Path, where: str, image_key: str | None,
                 caption_key: str | None) -> Sample:
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected an object with an image path and captions, got "
                              f"{type(record).__name__}")
    key, image = _pick(record, IMAGE_KEYS, image_key)
    if key is None:
        names = image_key or " / ".join(IMAGE_KEYS)
        raise DataFormatError(f"{where}: no image path (expected a field {names}); found fields "
                              f"{sorted(record)}")
    ckey, value = _pick(record, CAPTION_KEYS, caption_key)
    if ckey is None:
        names = caption_key or " / ".join(CAPTION_KEYS)
        raise DataFormatError(f"{where}: no caption (expected a field {names}); found fields {sorted(record)}")
    captions = _as_captions(value, f"{where}: field {ckey!r}")
    if not captions:
        raise DataFormatError(f"{where}: field {ckey!r} holds no caption text")
    split = record.get("split")
    return Sample(_resolve(image, base, where), captions, [], str(split) if split else None, where)


def _merge(samples: Iterable[Sample]) -> list[Sample]:
    """Join records of the same image (several caption rows, captions + QA files) in first-seen order."""
    merged: "OrderedDict[str, Sample]" = OrderedDict()
    for s in samples:
        have = merged.get(s.key)
        if have is None:
            merged[s.key] = Sample(s.image, list(s.captions), list(s.qa), s.split, s.source)
            continue
        have.captions += [c for c in s.captions if c not in have.captions]
        have.qa += s.qa
        have.split = have.split or s.split
    return list(merged.values())


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def read_pairs_jsonl(path: str | Path, image_root: str | Path | None = None, image_key: str | None = None,
                     caption_key: str | None = None) -> list[Sample]:
    """JSONL, one object a line: an image path and ``captions`` (list) or ``caption`` (string)."""
    path = Path(path)
    base = Path(image_root) if image_root else path.parent
    return _merge(_pair_record(rec, base, f"{path}:{n}", image_key, caption_key) for n, rec in _jsonl_records(path))


def read_pairs_csv(path: str | Path, image_root: str | Path | None = None, image_key: str | None = None,
                   caption_key: str | None = None) -> list[Sample]:
    """CSV with a header row; several rows of the same image add captions to it."""
    path = Path(path)
    base = Path(image_root) if image_root else path.parent
    out = []
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise DataFormatError(f"{path}: empty CSV file (expected a header row with image and caption columns)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataFormatError(f"{where}: more cells than header columns ({len(reader.fieldnames)})")
            clean = {k: v for k, v in row.items() if v not in (None, "")}
            out.append(_pair_record(clean, base, where, image_key, caption_key))
    return _merge(out)


def read_pairs_parquet(path: str | Path, image_root: str | Path | None = None, image_key: str | None = None,
                       caption_key: str | None = None) -> list[Sample]:
    """Parquet with an image-path column and a caption (string) or captions (list) column."""
    import pyarrow.parquet as pq

    path = Path(path)
    base = Path(image_root) if image_root else path.parent
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    rows = table.to_pylist()
    return _merge(_pair_record(row, base, _where(path, i, "row"), image_key, caption_key)
                  for i, row in enumerate(rows))


def _llava_record(record: Any, base: Path, where: str) -> Sample | None:
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected an object with 'image' and 'conversations'")
    if "conversations" not in record:
        raise DataFormatError(f"{where}: no 'conversations' field (LLaVA instruction format); found fields "
                              f"{sorted(record)}")
    if "image" not in record:
        return None  # text-only instruction rows exist in LLaVA mixtures; there is nothing to compress
    turns = record["conversations"]
    if not isinstance(turns, list) or len(turns) < 2:
        raise DataFormatError(f"{where}: 'conversations' must be a list of at least one human and one gpt turn")
    qa = []
    for k in range(0, len(turns) - 1, 2):
        human, gpt = turns[k], turns[k + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)) or "value" not in human or "value" not in gpt:
            raise DataFormatError(f"{where}: conversation turn {k} must be objects with 'from' and 'value'")
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise DataFormatError(f"{where}: conversation turns {k}/{k + 1} must be 'human' then 'gpt', got "
                                  f"{human.get('from')!r} / {gpt.get('from')!r}")
        question = str(human["value"]).replace(IMAGE_TAG, "").strip()
        qa.append((question, str(gpt["value"]).strip()))
    # LLaVA's pretraining JSON is captions in this shape ("<image>\nDescribe briefly." -> caption):
    # the first answer is the text paired with the image for the contrastive loss.
    captions = [qa[0][1]] if qa[0][1] else []
    return Sample(_resolve(record["image"], base, where), captions, qa, record.get("split"), where)


def read_llava_json(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """LLaVA instruction JSON: a list of {"image", "conversations": [{"from": "human", ...}, ...]}."""
    path = Path(path)
    base = Path(image_root) if image_root else path.parent
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    out = [_llava_record(rec, base, _where(path, i, "record")) for i, rec in enumerate(records)]
    return _merge(s for s in out if s is not None)


def read_demo_folder(folder: str | Path) -> list[Sample]:
    """The synthetic world's demo-data folder: ``captions.jsonl`` plus (optional) ``qa.jsonl``."""
    folder = Path(folder)
    captions_file = folder / "captions.jsonl"
    if not captions_file.is_file():
        raise DataFormatError(f"{folder}: no captions.jsonl (write one with `f2b demo-data {folder}`)")
    samples = read_pairs_jsonl(captions_file, folder)
    qa_file = folder / "qa.jsonl"
    if qa_file.is_file():
        extra = []
        for n, rec in _jsonl_records(qa_file):
            where = f"{qa_file}:{n}"
            if not isinstance(rec, dict):
                raise DataFormatError(f"{where}: expected an object with image, question, answer")
            missing = [k for k in ("image", "question", "answer") if not isinstance(rec.get(k), str)]
            if missing:
                raise DataFormatError(f"{where}: missing or non-text field(s) {', '.join(missing)}")
            extra.append(Sample(_resolve(rec["image"], folder, where), [], [(rec["question"], rec["answer"])],
                                None, where))
        samples = _merge([*samples, *extra])
    return samples


def read_dataset(path: str | Path, image_root: str | Path | None = None, image_key: str | None = None,
                 caption_key: str | None = None) -> list[Sample]:
    """Read any supported source, chosen by what ``path`` is (folder, .jsonl, .csv, .parquet, .json)."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file or folder")
    if path.is_dir():
        return read_demo_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_pairs_jsonl(path, image_root, image_key, caption_key)
    if suffix in (".csv", ".tsv"):
        return read_pairs_csv(path, image_root, image_key, caption_key)
    if suffix in (".parquet", ".pq"):
        return read_pairs_parquet(path, image_root, image_key, caption_key)
    if suffix == ".json":
        return _read_json_any(path, image_root, image_key, caption_key)
    raise DataFormatError(f"{path}: unknown data format {suffix!r}; use a demo-data folder, .jsonl, .csv, "
                          ".parquet (image-caption pairs) or .json (LLaVA instruction format)")


def _read_json_any(path: Path, image_root, image_key, caption_key) -> list[Sample]:
    """A .json list is LLaVA instruction data when records have 'conversations', else pairs."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(records, list) and records and isinstance(records[0], dict) and "conversations" not in records[0]:
        base = Path(image_root) if image_root else path.parent
        return _merge(_pair_record(r, base, _where(path, i, "record"), image_key, caption_key)
                      for i, r in enumerate(records))
    return read_llava_json(path, image_root)


# -- splits ------------------------------------------------------------------------------------
def _bucket(key: str) -> float:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def split_samples(samples: Sequence[Sample], eval_split: str = "auto", eval_fraction: float = 0.05,
                  eval_max: int = 512) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out). Records marked with another split than 'train' never train.

    ``auto``: the first of val/validation/dev/test present in the records is held out; with none
    marked, a stable hash of the image path holds out ``eval_fraction`` (the same on every run).
    ``none``: no held-out set. Any other name: the records of that split.
    """
    marked = {s.split for s in samples if s.split}
    train = [s for s in samples if not s.split or s.split == "train"]
    if eval_split == "none":
        return train, []
    if eval_split == "auto":
        chosen = next((name for name in EVAL_SPLITS if name in marked), None)
    else:
        chosen = eval_split
        if chosen not in marked:
            raise DataFormatError(f"no records of split {eval_split!r} (splits present: {sorted(marked) or 'none'})")
    if chosen is not None:
        held = [s for s in samples if s.split == chosen and s.captions]
    else:
        held = [s for s in train if s.captions and _bucket(s.key) < eval_fraction]
        keys = {s.key for s in held}
        train = [s for s in train if s.key not in keys]
    return train, held[:eval_max]


# -- images ------------------------------------------------------------------------------------
def _open_image(path: Path):
    """Decode fully (truncated files fail here, not later), EXIF-rotated, RGB."""
    try:
        from ..imaging import load_image  # the house loader, when present
    except ImportError:
        load_image = None
    if load_image is not None:
        return load_image(path)
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")


class ImageLoader:
    """Opens training images; a missing or undecodable one is skipped, counted and remembered."""

    def __init__(self, cache_size: int = 0):
        self.skipped: dict[str, str] = {}  # path -> reason
        self.cache_size = cache_size
        self._cache: "OrderedDict[str, Any]" = OrderedDict()

    def load(self, sample: Sample):
        """The decoded image, or ``None`` when it cannot be read (then it is counted once)."""
        key = sample.key
        if key in self.skipped:
            return None
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if not sample.image.is_file():
            self.skipped[key] = "missing"
            return None
        try:
            image = _open_image(sample.image)
        except Exception as exc:  # PIL raises OSError, ValueError, DecompressionBombError, ...
            self.skipped[key] = f"undecodable ({type(exc).__name__}: {exc})"
            return None
        if self.cache_size > 0:
            self._cache[key] = image
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return image

    def report(self, limit: int = 5) -> str:
        """One line for the end of a run: how many images were skipped, and a few examples."""
        if not self.skipped:
            return "no images skipped"
        examples = "; ".join(f"{path}: {why}" for path, why in list(self.skipped.items())[:limit])
        more = f" (and {len(self.skipped) - limit} more)" if len(self.skipped) > limit else ""
        return f"skipped {len(self.skipped)} unreadable image(s): {examples}{more}"
