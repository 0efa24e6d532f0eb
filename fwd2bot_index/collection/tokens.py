"""The token store: each committed batch's summary tokens and embeddings as one immutable shard file.

A shard is an Arrow IPC file (``tokens/<name>.arrow``) with columns ``id`` (int64), ``embedding``
(fixed-size list of float32, D), ``tokens`` (fixed-size list of float16 or int8, T*H) and, for int8,
``scale`` (float32 per token). Arrow IPC rather than Parquet because it is memory-mappable: reading
one image's tokens for an answer touches only its bytes (Parquet would decode a whole column chunk).
Parquet is still offered for export (pandas / DuckDB). A shard is written to a temporary name,
fsynced and renamed into place *before* the catalog commit that points at it, so a crash leaves at
worst an unreferenced shard, which the next writer deletes. Shards are never modified: deletions
live in the catalog and ``Collection.compact`` rewrites sparse shards into new ones.

Embeddings are kept in float32 so a rebuilt index is bit-identical to the original one.

Format 2 shards describe themselves, so a lost catalog or manifest can be rebuilt from them alone:
each row also carries the image's ``hash``, ``size``, ``metadata`` (JSON), ``paths`` (JSON list of
``[path, size, mtime]`` at commit) and ``check`` (8-byte BLAKE2b of its id, embedding and tokens, so a
damaged shard can be salvaged row by row); the schema metadata holds the model identity. Arrow IPC has
no checksum of its own: the whole-file SHA-256 is recorded in the catalog at commit (``checksum``).
Format 1 shards (ids, embeddings, tokens only) are still read.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ._fs import commit_tmp, disk_bytes, fsync_dir, tmp_name
from .errors import CollectionFormatError

__all__ = ["SHARD_SUFFIX", "TOKENS_DIR", "Locator", "TokenStore", "dequantize_int8", "quantize_int8"]

TOKENS_DIR = "tokens"
SHARD_SUFFIX = ".arrow"
_FORMAT = b"f2b-token-shard/2"
_FORMATS = (b"f2b-token-shard/1", _FORMAT)
_DESCRIBE = ("hash", "size", "metadata", "paths")
_MAX_OPEN = 32

#: Maps image ids to their (id, shard, row) locations; ``None`` asks for every image.
Locator = Callable[[Sequence[int] | None], list[tuple[int, str, int]]]


def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per token: ``q = round(x / s)`` with ``s = max|x| / 127`` over the token's H values."""
    x = np.asarray(tokens, dtype=np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[..., None].astype(np.float32)


class _Shard:
    """A memory-mapped shard; numpy views over its columns (no copy)."""

    def __init__(self, path: Path, token_count: int, token_dim: int, embed_dim: int) -> None:
        self.path = path
        self._source = pa.memory_map(str(path), "r")
        try:
            reader = ipc.open_file(self._source)
            meta = reader.schema.metadata or {}
            if meta.get(b"format") not in _FORMATS:
                raise CollectionFormatError(f"{path} is not a token shard of this format")
            if reader.num_record_batches != 1:
                raise CollectionFormatError(f"{path} should hold one record batch")
            batch = reader.get_batch(0)
        except (pa.ArrowInvalid, OSError, IndexError) as exc:
            self._source.close()
            raise CollectionFormatError(f"token shard {path} is unreadable ({exc})") from None
        self.n = batch.num_rows
        self.ids = _flat(batch.column("id")).astype(np.int64, copy=False)
        self.embeddings = _flat(batch.column("embedding").values).reshape(self.n, embed_dim)
        self.tokens = _flat(batch.column("tokens").values).reshape(self.n, token_count, token_dim)
        names = batch.schema.names
        self.scale = _flat(batch.column("scale").values).reshape(self.n, token_count) if "scale" in names else None
        self.check = batch.column("check").to_pylist() if "check" in names else None
        self._batch = batch

    def _texts(self) -> dict[str, list[Any]] | None:
        if self._batch is None or "paths" not in self._batch.schema.names:
            return None
        return {k: self._batch.column(k).to_pylist() for k in _DESCRIBE}

    def describe(self) -> list[dict[str, Any]] | None:
        """Per row ``{"id", "hash", "size", "metadata", "paths"}`` (format 2), None for format 1 shards.
        A row whose text columns are garbled gets ``paths`` [] (its row check fails anyway)."""
        cols = self._texts()
        if cols is None:
            return None
        out = []
        for r in range(self.n):
            try:
                paths = json.loads(cols["paths"][r])
                paths = [[str(p), int(s), float(m)] for p, s, m in paths]
            except (TypeError, ValueError):
                paths = []
            out.append({"id": int(self.ids[r]), "hash": str(cols["hash"][r]), "size": int(cols["size"][r] or 0),
                        "metadata": str(cols["metadata"][r]), "paths": paths})
        return out

    def good_rows(self) -> np.ndarray | None:
        """Boolean mask of rows whose per-row check still matches (None: format 1, no checks)."""
        if self.check is None:
            return None
        cols = self._texts()
        return np.array([_row_check(self.ids[r], self.embeddings[r], self.tokens[r],
                                    None if self.scale is None else self.scale[r],
                                    None if cols is None else [cols[k][r] for k in _DESCRIBE]) == self.check[r]
                         for r in range(self.n)], dtype=bool)

    def tokens_f32(self, rows: np.ndarray) -> np.ndarray:
        raw = self.tokens[rows]
        if self.scale is not None:
            return dequantize_int8(raw, self.scale[rows])
        return raw.astype(np.float32)

    def close(self) -> None:
        self._batch = None
        self._source.close()


def _flat(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=True)


def _row_check(image_id: Any, emb: np.ndarray, raw: np.ndarray, scale: np.ndarray | None,
               texts: list[Any] | None = None) -> bytes:
    """8-byte BLAKE2b of one row: id, embedding, tokens (+ scale) and its descriptive columns."""
    h = hashlib.blake2b(digest_size=8)
    for part in (np.int64(image_id), emb, raw) + (() if scale is None else (scale,)):
        h.update(np.ascontiguousarray(part).tobytes())
    if texts is not None:
        h.update(json.dumps(texts, default=str).encode("utf-8", "surrogatepass"))
    return h.digest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content (shard and index checksums)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class TokenStore:
    """Immutable shard files under ``<collection>/tokens`` plus a locator from the catalog."""

    def __init__(
        self,
        folder: str | Path,
        token_count: int,
        token_dim: int,
        embed_dim: int,
        dtype: str = "fp16",
        locate: Locator | None = None,
        identity: dict[str, Any] | None = None,
        expected: Callable[[str], str | None] | None = None,
    ) -> None:
        if dtype not in ("fp16", "int8"):
            raise ValueError(f"token dtype must be 'fp16' or 'int8', got {dtype!r}")
        self.folder = Path(folder)
        self.token_count, self.token_dim, self.embed_dim = int(token_count), int(token_dim), int(embed_dim)
        self.dtype = dtype
        self.locate = locate
        #: Model identity written into each new shard's schema (so a lost manifest can be rebuilt).
        self.identity = dict(identity or {})
        #: The checksum recorded at commit for a shard name (None when unknown); checked on first use.
        self.expected = expected
        self._verified: set[str] = set()
        self._open: OrderedDict[str, _Shard] = OrderedDict()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ writing

    def new_shard_name(self) -> str:
        return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"

    def write_shard(
        self, ids: np.ndarray, embeddings: np.ndarray, tokens: np.ndarray, name: str | None = None,
        describe: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Write one batch atomically and durably; returns the shard name to record in the catalog.

        ``describe`` gives per row ``{"hash", "size", "metadata", "paths"}`` (what the catalog holds),
        stored so the catalog can be rebuilt from the shards."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        n = len(ids)
        emb = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(n, self.embed_dim)
        tok = np.asarray(tokens, dtype=np.float32).reshape(n, self.token_count, self.token_dim)
        if self.dtype == "int8":
            raw, scale = quantize_int8(tok)
        else:
            raw, scale = tok.astype(np.float16), None
        return self._write(ids, emb, raw, scale, name, describe)

    def _write(
        self, ids: np.ndarray, emb: np.ndarray, raw: np.ndarray, scale: np.ndarray | None, name: str | None,
        describe: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        name = name or self.new_shard_name()
        self.folder.mkdir(parents=True, exist_ok=True)
        th = self.token_count * self.token_dim
        columns = [
            pa.array(ids, type=pa.int64()),
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), self.embed_dim),
            pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(raw).reshape(-1)), th),
        ]
        names = ["id", "embedding", "tokens"]
        if scale is not None:
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(scale.reshape(-1)), self.token_count))
            names.append("scale")
        texts: list[list[Any]] | None = None
        if describe is not None:
            texts = [[str(d["hash"]), int(d["size"]),
                      d["metadata"] if isinstance(d["metadata"], str) else json.dumps(d["metadata"], sort_keys=True),
                      json.dumps(d["paths"])] for d in describe]
            columns += [pa.array([t[k] for t in texts], kind)
                        for k, kind in enumerate((pa.string(), pa.int64(), pa.string(), pa.string()))]
            names += list(_DESCRIBE)
        checks = [_row_check(ids[r], emb[r], raw[r], None if scale is None else scale[r],
                             None if texts is None else texts[r]) for r in range(len(ids))]
        columns.append(pa.array(checks, pa.binary(8)))
        names.append("check")
        batch = pa.record_batch(columns, names=names)
        schema = batch.schema.with_metadata(
            {"format": _FORMAT, "dtype": self.dtype, "T": str(self.token_count), "H": str(self.token_dim),
             "D": str(self.embed_dim), "identity": json.dumps(self.identity, sort_keys=True)}
        )
        target = self.folder / name
        tmp = tmp_name(target)
        try:
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, schema) as writer:
                writer.write_batch(batch)
            commit_tmp(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._verified.add(name)
        return name

    def copy_rows(
        self, sources: Iterable[tuple[str, Sequence[int]]],
        describe: Callable[[list[int]], list[dict[str, Any]]] | None = None, checked: bool = True,
        name: str | None = None,
    ) -> tuple[str, list[int]]:
        """Write a new shard from rows of existing ones, bytes unchanged (compaction, salvage).

        ``describe(ids)`` supplies the self-describing columns (from the catalog). Returns the new
        shard's name and the ids in its row order.
        """
        ids, embs, raws, scales = [], [], [], []
        for source, rows in sources:
            shard = self._shard(source) if checked else self._unchecked(source)
            r = np.asarray(rows, dtype=np.int64)
            ids.append(shard.ids[r].copy())
            embs.append(shard.embeddings[r].copy())
            raws.append(shard.tokens[r].copy())
            if shard.scale is not None:
                scales.append(shard.scale[r].copy())
            if not checked:
                shard.close()
        all_ids = np.concatenate(ids)
        scale = np.concatenate(scales) if scales else None
        order = all_ids.tolist()
        name = self._write(all_ids, np.concatenate(embs), np.concatenate(raws), scale, name,
                           describe(order) if describe is not None else None)
        return name, order

    # ------------------------------------------------------------------ reading by location

    def _shard(self, name: str) -> _Shard:
        with self._lock:
            shard = self._open.get(name)
            if shard is not None:
                self._open.move_to_end(name)
                return shard
            path = self.folder / name
            if not path.exists():
                raise FileNotFoundError(f"token shard {path} is missing")
            self._check(name, path)
            shard = _Shard(path, self.token_count, self.token_dim, self.embed_dim)
            self._open[name] = shard
            while len(self._open) > _MAX_OPEN:
                _, old = self._open.popitem(last=False)
                old.close()
            return shard

    def _check(self, name: str, path: Path) -> None:
        """First use of a shard in this process: compare its content with the checksum recorded at
        commit, so damaged tokens are never served as if they were good."""
        if name in self._verified or self.expected is None:
            return
        want = self.expected(name)
        if want is not None and file_sha256(path) != want:
            raise CollectionFormatError(
                f"token shard {path} is damaged (its content differs from the checksum recorded at commit); "
                f"run f2b verify --repair --collection {self.folder.parent}"
            )
        self._verified.add(name)

    def checksum(self, name: str) -> str:
        return file_sha256(self.folder / name)

    def describe_rows(self, name: str) -> list[dict[str, Any]] | None:
        """The self-describing columns of a shard (None for format 1); no checksum check (repair)."""
        shard = self._unchecked(name)
        try:
            return shard.describe()
        finally:
            shard.close()

    def good_rows(self, name: str) -> np.ndarray | None:
        """Which rows of a (possibly damaged) shard still pass their per-row check."""
        shard = self._unchecked(name)
        try:
            return shard.good_rows()
        finally:
            shard.close()

    def _unchecked(self, name: str) -> _Shard:
        """Open a shard without the checksum check and without caching it (repair reads damaged ones)."""
        path = self.folder / name
        if not path.exists():
            raise FileNotFoundError(f"token shard {path} is missing")
        return _Shard(path, self.token_count, self.token_dim, self.embed_dim)

    def raw_ids(self, name: str) -> list[int]:
        """The ids a shard holds, read without the checksum check (repair)."""
        shard = self._unchecked(name)
        try:
            return shard.ids.tolist()
        finally:
            shard.close()

    def schema_of(self, name: str) -> dict[str, Any]:
        """Shapes and identity from a shard's footer alone: ``{"T", "H", "D", "dtype", "identity"}``."""
        path = self.folder / name
        try:
            with pa.memory_map(str(path), "r") as source:
                meta = ipc.open_file(source).schema.metadata or {}
        except (pa.ArrowInvalid, OSError) as exc:
            raise CollectionFormatError(f"token shard {path} is unreadable ({exc})") from None
        if meta.get(b"format") not in _FORMATS:
            raise CollectionFormatError(f"{path} is not a token shard of this format")
        try:
            identity = json.loads(meta.get(b"identity", b"{}"))
        except ValueError:
            identity = {}
        return {"T": int(meta[b"T"]), "H": int(meta[b"H"]), "D": int(meta[b"D"]),
                "dtype": meta[b"dtype"].decode(), "identity": identity}

    def shard_ids(self, name: str) -> np.ndarray:
        return self._shard(name).ids.copy()

    def shard_rows(self, name: str) -> int:
        return self._shard(name).n

    def read_tokens(self, locations: Sequence[tuple[str, int]]) -> np.ndarray:
        """float32 (n, T, H) for ``(shard, row)`` locations, in the order given."""
        out = np.empty((len(locations), self.token_count, self.token_dim), dtype=np.float32)
        for name, positions, rows in _group(locations):
            out[positions] = self._shard(name).tokens_f32(rows)
        return out

    def read_embeddings(self, locations: Sequence[tuple[str, int]]) -> np.ndarray:
        """float32 (n, D) for ``(shard, row)`` locations, in the order given."""
        out = np.empty((len(locations), self.embed_dim), dtype=np.float32)
        for name, positions, rows in _group(locations):
            out[positions] = self._shard(name).embeddings[rows]
        return out

    # ------------------------------------------------------------------ reading by id (via the catalog)

    def _where(self, ids: Sequence[int]) -> list[tuple[str, int]]:
        if self.locate is None:
            raise RuntimeError("this TokenStore has no locator; read by (shard, row) instead")
        found = {i: (s, r) for i, s, r in self.locate([int(i) for i in ids])}
        missing = [int(i) for i in ids if int(i) not in found]
        if missing:
            raise KeyError(f"no image with id {missing[0]} in this collection")
        return [found[int(i)] for i in ids]

    def get_tokens(self, image_id: int) -> np.ndarray:
        """The stored summary tokens of one image as float32 (T, H)."""
        return self.read_tokens(self._where([image_id]))[0]

    def get_tokens_batch(self, ids: Sequence[int]) -> np.ndarray:
        return self.read_tokens(self._where(ids))

    def get_embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """float32 (n, D) embeddings of ``ids`` in the order given."""
        return self.read_embeddings(self._where(ids))

    def iter_embeddings(self, batch_size: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every live image as ``(ids int64[n], embeddings float32[n, D])`` chunks, for index rebuilds."""
        if self.locate is None:
            raise RuntimeError("this TokenStore has no locator")
        locs = self.locate(None)
        for start in range(0, len(locs), batch_size):
            part = locs[start : start + batch_size]
            ids = np.fromiter((i for i, _, _ in part), dtype=np.int64, count=len(part))
            yield ids, self.read_embeddings([(s, r) for _, s, r in part])

    # ------------------------------------------------------------------ housekeeping

    def list_shards(self) -> list[str]:
        if not self.folder.exists():
            return []
        return sorted(p.name for p in self.folder.iterdir()  # a folder named like a shard is not one (parts.py)
                      if p.suffix == SHARD_SUFFIX and not p.name.startswith(".") and p.is_file())

    def temp_files(self) -> list[Path]:
        if not self.folder.exists():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name.startswith(".tmp-"))

    def delete_shards(self, names: Iterable[str]) -> list[str]:
        """Remove shard files (they must no longer be referenced by the catalog)."""
        gone = []
        with self._lock:
            for name in names:
                shard = self._open.pop(name, None)
                if shard is not None:
                    shard.close()
                path = self.folder / name
                if path.exists():
                    path.unlink()
                    gone.append(name)
        if gone:
            fsync_dir(self.folder)
        return gone

    def remove_temp_files(self) -> int:
        """Delete ``.tmp-*`` files left by an interrupted write (only a writer holding the lock may)."""
        gone = self.temp_files()
        for tmp in gone:
            tmp.unlink(missing_ok=True)
        return len(gone)

    def bytes_on_disk(self) -> int:
        return disk_bytes(self.folder)

    def close(self) -> None:
        with self._lock:
            self._verified.clear()
            while self._open:
                _, shard = self._open.popitem()
                shard.close()

    # ------------------------------------------------------------------ export

    def export_parquet(
        self, path: str | Path, rows: Iterable[tuple[int, str, str, str, str, int]], chunk: int = 256
    ) -> int:
        """Write a Parquet file readable by pandas and DuckDB; ``rows`` are
        ``(id, path, hash, metadata_json, shard, row)``. Tokens are exported as float32 ``T x H``
        nested fixed-size lists. Returns the number of rows written."""
        import pyarrow.parquet as pq

        T, H, D = self.token_count, self.token_dim, self.embed_dim
        schema = pa.schema([
            ("id", pa.int64()), ("path", pa.string()), ("hash", pa.string()), ("metadata", pa.string()),
            ("embedding", pa.list_(pa.float32(), D)),
            ("tokens", pa.list_(pa.list_(pa.float32(), H), T)),
        ])
        target = Path(path)
        tmp = tmp_name(target)
        total = 0
        try:
            with pq.ParquetWriter(str(tmp), schema, write_page_checksum=True) as writer:  # CRC per page
                for part in _batched(rows, chunk):
                    writer.write_table(self._export_table(part, schema))
                    total += len(part)
                if total == 0:
                    writer.write_table(schema.empty_table())
            commit_tmp(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return total

    def _export_table(self, part: list[tuple[Any, ...]], schema: pa.Schema) -> pa.Table:
        T, H, D = self.token_count, self.token_dim, self.embed_dim
        locs = [(s, r) for *_, s, r in part]
        emb = self.read_embeddings(locs)
        tok = self.read_tokens(locs)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(tok.reshape(-1)), H)
        return pa.table(
            [
                pa.array([p[0] for p in part], pa.int64()),
                pa.array([p[1] for p in part], pa.string()),
                pa.array([p[2] for p in part], pa.string()),
                pa.array([p[3] for p in part], pa.string()),
                pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), D),
                pa.FixedSizeListArray.from_arrays(inner, T),
            ],
            schema=schema,
        )


def _group(locations: Sequence[tuple[str, int]]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Group (shard, row) locations by shard: yields (shard, output positions, rows)."""
    by: dict[str, tuple[list[int], list[int]]] = {}
    for pos, (name, row) in enumerate(locations):
        slot = by.setdefault(name, ([], []))
        slot[0].append(pos)
        slot[1].append(int(row))
    for name, (positions, rows) in by.items():
        yield name, np.asarray(positions, dtype=np.int64), np.asarray(rows, dtype=np.int64)


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    part: list[Any] = []
    for item in items:
        part.append(item)
        if len(part) >= size:
            yield part
            part = []
    if part:
        yield part


def shard_row_bytes(token_count: int, token_dim: int, embed_dim: int, dtype: str) -> int:
    """Payload bytes of one image in a shard (without file overhead), for size estimates."""
    per_token = 1 if dtype == "int8" else 2
    extra = 4 * token_count if dtype == "int8" else 0
    return 8 + 4 * embed_dim + per_token * token_count * token_dim + extra
