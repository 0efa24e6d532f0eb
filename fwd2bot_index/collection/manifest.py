"""``manifest.json``: what a collection was built with, so a different model is refused, not mixed in.

Embeddings from two models live in different spaces; searching one with the other returns confident
nonsense (the "dimension mismatch" class of bugs). The manifest records the model fingerprint, the
strategy and the shapes, and ``check_compatible`` turns a mismatch into an error that says how to fix it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._fs import atomic_write_bytes
from .errors import CollectionFormatError, CollectionMismatchError, CollectionNotFoundError

__all__ = ["BACKENDS", "FORMAT_VERSION", "MANIFEST_NAME", "Manifest"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BACKENDS = ("faiss", "qdrant-edge", "qdrant-local", "qdrant-server")
Backend = Literal["faiss", "qdrant-edge", "qdrant-local", "qdrant-server"]
#: Options that must never be written to disk (secrets are passed at open time instead).
SECRET_OPTIONS = ("api_key",)


def utc_now() -> str:
    """ISO 8601 UTC timestamp with seconds precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class Manifest(BaseModel):
    """The identity of a collection: model, strategy, shapes, storage choices, timestamps."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    model_name: str = Field(min_length=1, description="display name of the model (e.g. 'demo')")
    model_fingerprint: str = Field(min_length=1, description="content hash of the model checkpoint")
    strategy: dict[str, Any] = Field(description="{'embed': ..., 'tokens': ..., 'budget': ...}")
    embed_dim: int = Field(gt=0, description="D, length of one embedding")
    token_count: int = Field(gt=0, description="T, summary tokens stored per image")
    token_dim: int = Field(gt=0, description="H, width of one stored token")
    token_dtype: Literal["fp16", "int8"] = "fp16"
    image_options: dict[str, int] = Field(
        default_factory=dict, description="preprocessing that changes what is stored (Qwen2-VL: min/max pixels)")
    backend: Backend = "faiss"
    backend_options: dict[str, Any] = Field(default_factory=dict)
    collection_id: str = Field(default="", description="this collection's id, in every part (see identity.py)")
    created: str = Field(default_factory=utc_now)
    updated: str = Field(default_factory=utc_now)

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str | Path) -> Path:
        """Write ``<folder>/manifest.json`` atomically (tmp + fsync + rename). Secrets are dropped."""
        data = self.model_dump()
        data["backend_options"] = {k: v for k, v in self.backend_options.items() if k not in SECRET_OPTIONS}
        path = Path(folder) / MANIFEST_NAME
        atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Read ``<folder>/manifest.json``; clear errors for a missing, damaged or too-new file."""
        path = Path(folder) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            remains = lost_manifest_remains(Path(folder))
            if remains:
                raise CollectionFormatError(lost_manifest_message(Path(folder), remains)) from None
            raise CollectionNotFoundError(
                f"no collection at {folder} ({MANIFEST_NAME} is missing); index some images into it first "
                f"(f2b index PHOTOS --collection {folder})"
            ) from None
        except (OSError, ValueError) as exc:
            raise CollectionFormatError(f"{path} is unreadable ({exc}); run f2b verify --repair --collection {folder} "
                                        "to rebuild it from the token shards, or restore it from a backup") from None
        version = data.get("format_version", 0) if isinstance(data, dict) else 0
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CollectionFormatError(
                f"collection {folder} has format version {version}, newer than this fwd2bot-index "
                f"understands ({FORMAT_VERSION}); upgrade fwd2bot-index"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": str(exc)}
            where = ".".join(str(p) for p in first["loc"]) or "it"
            raise CollectionFormatError(f"{path} is not a valid manifest ({where}: {first['msg']}); run f2b verify "
                                        f"--repair --collection {folder} to rebuild it from the token shards") from None

    def touch(self) -> None:
        """Record that the collection content changed now."""
        self.updated = utc_now()

    # ------------------------------------------------------------------ compatibility

    def describe_model(self) -> str:
        return _describe(self.model_name, self.model_fingerprint, self.strategy)

    def is_compatible(self, model_fingerprint: str, strategy: dict[str, Any] | None = None) -> bool:
        """True when embeddings from this model and strategy can share this collection."""
        if model_fingerprint != self.model_fingerprint:
            return False
        return strategy is None or _norm(strategy) == _norm(self.strategy)

    def check_compatible(
        self, model_fingerprint: str, strategy: dict[str, Any] | None = None, model_name: str | None = None,
        collection: str | Path | None = None,
    ) -> None:
        """Raise ``CollectionMismatchError`` naming both models when they differ, and how to fix it."""
        if self.is_compatible(model_fingerprint, strategy):
            return
        where = f"collection {collection}" if collection else "this collection"
        flag = f" --collection {collection}" if collection else ""
        ours = _describe(model_name or "?", model_fingerprint, strategy if strategy is not None else self.strategy)
        raise CollectionMismatchError(
            f"{where} was built with {self.describe_model()}, but you are using {ours}; their embeddings "
            f"are not comparable. Either index into a new collection (--collection NEW_FOLDER), or "
            f"re-encode everything with the new model: f2b index --reindex{flag}"
        )


def lost_manifest_remains(folder: Path) -> str | None:
    """What shows that ``folder`` held a collection whose manifest is gone (None: nothing does), so
    that no command suggests creating a new collection over it."""
    if any((folder / "tokens").glob("*.arrow")):
        return f"{folder / 'tokens'} holds token shards"
    if (folder / "catalog.sqlite").exists():
        return f"{folder / 'catalog.sqlite'} is there"
    return None


def lost_manifest_message(folder: Path, remains: str) -> str:
    """One line for a collection without its manifest, naming a command that works: the repair when
    token shards remain to rebuild it from, else a restore or a fresh start."""
    if remains.endswith("holds token shards"):
        return (f"{folder / MANIFEST_NAME} is missing but {remains}; run f2b verify --repair --collection {folder} "
                "to rebuild it from them")
    return (f"{folder / MANIFEST_NAME} is missing but {remains}, and no token shard is left to rebuild it from; "
            f"restore it from a backup, or start over with f2b index PHOTOS --collection {folder} --reindex")


def _norm(strategy: dict[str, Any]) -> dict[str, Any]:
    """Strategies compare by value; JSON round-trip makes 16 and 16.0 or tuples vs lists agree."""
    return json.loads(json.dumps(strategy, sort_keys=True, default=str))


def _describe(name: str, fingerprint: str, strategy: dict[str, Any]) -> str:
    parts = ", ".join(f"{k}={v}" for k, v in sorted(strategy.items()))
    return f"model '{name}' (fingerprint {fingerprint[:12]}, strategy {parts or 'default'})"
