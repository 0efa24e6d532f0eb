"""Where a model's files are and what they hash to, without torch.

Why a module of its own: the CLI's lean query path (``lean``) and ``f2b info`` need the demo model's
folder and a checkpoint's fingerprint, and importing ``checkpoint`` costs seconds of torch,
transformers and peft. ``checkpoint`` re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

CONFIG_FILE = "fwd2bot_config.json"
COMPRESSOR_FILE = "compressor.safetensors"
DEMO_NAME = "demo"
#: the shipped models (package data), by the name ``--model`` takes: the demo model and its nested compressor
#: (4/8/16/32 tokens per image, ``f2b index --tokens k``), which shares the demo model's base
DEMO_FOLDERS = {DEMO_NAME: "demo_model", "demo-nested": "demo_model_nested"}
_HASH_FULL_LIMIT = 256 * 2**20  # larger weight files are hashed by size, header and both ends
_HASH_ENDS = 4 * 2**20
_CARD_FILES = {"README.md", "MODEL_CARD.md"}


def demo_model_path(name: str = DEMO_NAME) -> Path:
    """The folder of a shipped model (package data): ``demo`` or ``demo-nested``."""
    return Path(str(resources.files("fwd2bot_index"))) / DEMO_FOLDERS[name]


def is_demo_name(name: str | None) -> bool:
    """Whether ``name`` is one of the shipped models, which know only the shapes world."""
    return name in DEMO_FOLDERS


def is_local_base(base_model: str) -> bool:
    """Whether a checkpoint's recorded base names a folder relative to the checkpoint itself: ``base`` (its
    own ``base/``) or a path starting ``./`` or ``../`` (a base shared with another checkpoint, as
    ``demo-nested`` shares ``demo``'s). One test for the loader, the lean query path and the fingerprint, so
    they never disagree about which bases are folders beside the checkpoint and which are hub ids."""
    return base_model == "base" or base_model.startswith(("./", "../"))


def base_folder(checkpoint: str | Path, base_model: str) -> str:
    """Where a checkpoint's base is: ``base`` is its own ``base/``; a path starting ``./`` or ``../`` is
    relative to the checkpoint folder (``is_local_base``); anything else (a folder, a hub id) as given."""
    if base_model == "base":
        return str(Path(checkpoint) / "base")
    if is_local_base(base_model):
        return str((Path(checkpoint) / base_model).resolve())
    return base_model


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _hash_file(digest: "hashlib._Hash", path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{size}\0".encode())
    with path.open("rb") as fh:
        if size <= _HASH_FULL_LIMIT:
            for block in iter(lambda: fh.read(2**20), b""):
                digest.update(block)
        else:
            digest.update(fh.read(_HASH_ENDS))
            fh.seek(size - _HASH_ENDS)
            digest.update(fh.read(_HASH_ENDS))


def _content_digest(folder: Path) -> "hashlib._Hash":
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.name in _CARD_FILES or "/." in f"/{rel}" or rel.endswith(".lock"):
            continue
        digest.update(rel.encode() + b"\0")
        _hash_file(digest, path)
    return digest


def _base_outside(folder: Path) -> Path | None:
    """The base folder a checkpoint names relative to itself when it lies outside it (``../demo_model/base``),
    else None (no checkpoint, its own ``base/``, a hub id, a base that is not there)."""
    try:
        base_model = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(base_model, str) or base_model == "base" or not is_local_base(base_model):
        return None
    base = Path(base_folder(folder, base_model))
    return base if base.is_dir() and not base.is_relative_to(folder.resolve()) else None


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 over the relative names and contents of a folder's model files (cards excluded). A checkpoint
    whose base is a folder outside it (``demo-nested`` on the demo model's base) folds that base's content in:
    the weights it runs on are part of what a collection was built with, so retraining the shared base makes
    the collections of every checkpoint on it report a model mismatch (the base's path is not hashed)."""
    folder = Path(folder)
    digest = _content_digest(folder)
    base = _base_outside(folder)
    if base is not None:
        digest.update(b"\0base\0" + _content_digest(base).hexdigest().encode())
    return digest.hexdigest()[:32]
