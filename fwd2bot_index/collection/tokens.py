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
"""

from __future__ import annotations

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
_FORMAT = b"f2b-token-shard/1"
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
            if meta.get(b"format") != _FORMAT:
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
        self._batch = batch

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
    ) -> None:
        if dtype not in ("fp16", "int8"):
            raise ValueError(f"token dtype must be 'fp16' or 'int8', got {dtype!r}")
        self.folder = Path(folder)
        self.token_count, self.token_dim, self.embed_dim = int(token_count), int(token_dim), int(embed_dim)
        self.dtype = dtype
        self.locate = locate
        self._open: OrderedDict[str, _Shard] = OrderedDict()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ writing

    def new_shard_name(self) -> str:
        return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"

    def write_shard(
        self, ids: np.ndarray, embeddings: np.ndarray, tokens: np.ndarray, name: str | None = None
    ) -> str:
        """Write one batch atomically and durably; returns the shard name to record in the catalog."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        n = len(ids)
        emb = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(n, self.embed_dim)
        tok = np.asarray(tokens, dtype=np.float32).reshape(n, self.token_count, self.token_dim)
        if self.dtype == "int8":
            raw, scale = quantize_int8(tok)
        else:
            raw, scale = tok.astype(np.float16), None
        return self._write(ids, emb, raw, scale, name)

    def _write(
        self, ids: np.ndarray, emb: np.ndarray, raw: np.ndarray, scale: np.ndarray | None, name: str | None
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
        batch = pa.record_batch(columns, names=names)
        schema = batch.schema.with_metadata(
            {"format": _FORMAT, "dtype": self.dtype, "T": str(self.token_count), "H": str(self.token_dim),
             "D": str(self.embed_dim)}
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
        return name

    def copy_rows(self, sources: Iterable[tuple[str, Sequence[int]]]) -> tuple[str, list[int]]:
        """Write a new shard from rows of existing ones, bytes unchanged (compaction).

        Returns the new shard's name and the ids in its row order.
        """
        ids, embs, raws, scales = [], [], [], []
        for name, rows in sources:
            shard = self._shard(name)
            r = np.asarray(rows, dtype=np.int64)
            ids.append(shard.ids[r])
            embs.append(shard.embeddings[r])
            raws.append(shard.tokens[r])
            if shard.scale is not None:
                scales.append(shard.scale[r])
        all_ids = np.concatenate(ids)
        scale = np.concatenate(scales) if scales else None
        name = self._write(all_ids, np.concatenate(embs), np.concatenate(raws), scale, None)
        return name, all_ids.tolist()

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
            shard = _Shard(path, self.token_count, self.token_dim, self.embed_dim)
            self._open[name] = shard
            while len(self._open) > _MAX_OPEN:
                _, old = self._open.popitem(last=False)
                old.close()
            return shard

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
        return sorted(p.name for p in self.folder.iterdir() if p.suffix == SHARD_SUFFIX and not p.name.startswith("."))

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

    def cleanup(self, referenced: set[str]) -> list[str]:
        """Delete temporary files and shards the catalog does not reference (crash leftovers)."""
        for tmp in self.temp_files():
            tmp.unlink(missing_ok=True)
        return self.delete_shards([s for s in self.list_shards() if s not in referenced])

    def bytes_on_disk(self) -> int:
        return disk_bytes(self.folder)

    def close(self) -> None:
        with self._lock:
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
            with pq.ParquetWriter(str(tmp), schema) as writer:
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
