"""Reader for the seven official SugarCrepe annotation files.

Each file (``replace_obj.json``, ...) is a JSON object keyed ``"0"``, ``"1"``, ... whose values hold
``filename`` (a COCO val2017 image name, or a path relative to the images folder), ``caption`` (true)
and ``negative_caption`` (the hard negative). Pairs keep the file's order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EvalDataError, MissingImageError

__all__ = [
    "SUGARCREPE_CATEGORIES",
    "SUGARCREPE_GROUPS",
    "SugarCrepePair",
    "SugarCrepeCategory",
    "read_sugarcrepe",
    "normalize_category",
]

SUGARCREPE_CATEGORIES: tuple[str, ...] = (
    "replace_obj",
    "replace_att",
    "replace_rel",
    "swap_obj",
    "swap_att",
    "add_obj",
    "add_att",
)
# The paper's three headline figures are micro-averages over the pairs of these categories.
SUGARCREPE_GROUPS: dict[str, tuple[str, ...]] = {
    "Replace": ("replace_obj", "replace_att", "replace_rel"),
    "Swap": ("swap_obj", "swap_att"),
    "Add": ("add_obj", "add_att"),
}


@dataclass(frozen=True)
class SugarCrepePair:
    key: str
    image: Path
    caption: str
    negative_caption: str


@dataclass(frozen=True)
class SugarCrepeCategory:
    name: str
    file: Path
    pairs: list[SugarCrepePair]
    skipped_missing: int = 0


def normalize_category(name: str) -> str:
    """Accept ``replace-obj`` / ``Replace_Obj`` spellings; reject unknown names with the valid list."""
    canonical = name.strip().lower().replace("-", "_")
    if canonical not in SUGARCREPE_CATEGORIES:
        raise ValueError(f"unknown SugarCrepe category {name!r}; valid: {', '.join(SUGARCREPE_CATEGORIES)}")
    return canonical


def read_sugarcrepe(
    data_dir: str | Path,
    images_dir: str | Path | None = None,
    categories: Iterable[str] | None = None,
    limit: int | None = None,
    skip_missing: bool = False,
) -> dict[str, SugarCrepeCategory]:
    """Read ``data_dir/<category>.json`` for each category (all seven by default).

    ``images_dir`` is where ``filename`` resolves; when given, each image must exist (or, with
    ``skip_missing``, the pair is skipped and counted). Without it only the annotations are read and
    ``pair.image`` is the bare ``filename``. ``limit`` keeps the first N records of each category (missing images among them are then
    skipped, not replaced by later records).
    """
    folder = Path(data_dir)
    names = [normalize_category(c) for c in categories] if categories is not None else list(SUGARCREPE_CATEGORIES)
    if not names:
        raise ValueError("no SugarCrepe categories selected")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of pairs, got {limit}")
    missing = [n for n in names if not (folder / f"{n}.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"SugarCrepe files not found in {folder}: {', '.join(m + '.json' for m in missing)} "
            "(point data_dir at the folder holding the official files, or choose categories=...)"
        )
    root = Path(images_dir) if images_dir is not None else None
    return {n: _read_category(n, folder / f"{n}.json", root, limit, skip_missing) for n in dict.fromkeys(names)}


def _read_category(
    name: str, file: Path, images_dir: Path | None, limit: int | None, skip_missing: bool
) -> SugarCrepeCategory:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalDataError(file, f"line {e.lineno} column {e.colno}", f"not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise EvalDataError(file, "top level", 'expected an object keyed "0", "1", ... (official SugarCrepe format)')
    pairs: list[SugarCrepePair] = []
    skipped = 0
    for n, (key, record) in enumerate(data.items()):
        if limit is not None and n >= limit:
            break
        pair = _parse_pair(file, key, record, images_dir)
        if images_dir is not None and not pair.image.is_file():
            if not skip_missing:
                raise MissingImageError(file, f"record {key!r}", pair.image)
            skipped += 1
            continue
        pairs.append(pair)
    return SugarCrepeCategory(name=name, file=file, pairs=pairs, skipped_missing=skipped)


def _parse_pair(file: Path, key: str, record: Any, images_dir: Path | None) -> SugarCrepePair:
    where = f"record {key!r}"
    if not isinstance(record, dict):
        raise EvalDataError(file, where, f"expected an object, got {type(record).__name__}")
    values = {}
    for field_name in ("filename", "caption", "negative_caption"):
        value = record.get(field_name)
        if not isinstance(value, str) or not value.strip():
            raise EvalDataError(file, where, f"{field_name!r} must be a non-empty string, got {value!r}")
        values[field_name] = value.strip()
    image = images_dir / values["filename"] if images_dir is not None else Path(values["filename"])
    return SugarCrepePair(key=key, image=image, caption=values["caption"], negative_caption=values["negative_caption"])
