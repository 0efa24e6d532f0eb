"""The one facade: a collection opened with a model. Add, remove, search, ask.

``model`` and ``collection`` never import each other; this module joins them. The CLI, the REST app
and evaluation call only this (and the model's public API). The model loads lazily: ``info``,
``verify`` and ``remove`` never pay for it, and a server can preload it once at start. Its errors
(``errors``), the checked model loader (``loader``), the sidecar reader (``sidecar``) and the shape of it
that its helpers take (``service_view``) live below it, so that what it drives (``ray_index``,
``verification``, ``shrinking``, ``indexing``) never imports it back (tests/test_layering.py); their
names stay importable from here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .collection import Collection, Hit, ImageRow, Manifest, NewImage
from .collection.errors import CollectionMismatchError, CollectionNotFoundError
from .collection.catalog import FilterError, parse_filter  # noqa: F401  (re-exported for the shells)
from .imaging import load_image, scan_images
from .indexing import (  # noqa: F401  (IndexReport, IndexInterrupted re-exported: the shells import them here)
    DEFAULT_MAX_INFLIGHT_BYTES, WORLD_CHECK_IMAGES, IndexInterrupted, IndexReport, _Committer, _index_settings,
    _not_from_world, _Prepared, decoded_batches, world_flags,
)
from .options import OptionError, check_model_reference, check_options  # noqa: F401  (re-exported for the shells)
from .demo_notice import collection_world_status, demo_world_status  # noqa: F401  (the shells import them here)
from .errors import NotFoundError, ServiceError, user_error_types  # noqa: F401  (re-exported for the shells)
from .hints import no_collection_message
from .model.files import is_demo_name
from .loader import load_checked_model  # noqa: F401  (re-exported)
from .sidecar import read_sidecar  # noqa: F401  (re-exported)
from .shrinking import check_index_tokens, migrate_tokens, with_tokens

log = logging.getLogger("fwd2bot_index")

DEFAULT_COLLECTION = ".f2b"
DEFAULT_MODEL = "demo"


class ImageService:
    """A collection plus the model that made it. Use ``open_service`` to build one."""

    def __init__(self, collection: Collection, model_name: str | None, device: str = "auto", dtype: str = "auto",
                 model: Any = None):
        self.collection = collection
        self.model_name = model_name or collection.manifest.model_name
        self.device, self.dtype = device, dtype
        self._model = model
        self._model_lock = threading.Lock()

    # -- model ---------------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The model, loaded on first use and checked against the collection's fingerprint."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = load_checked_model(self.model_name, self.collection.manifest, self.device, self.dtype)
        return self._model

    @property
    def strategy(self):
        from .model.config import Strategy

        return Strategy.from_dict(self.collection.manifest.strategy)

    def preload(self) -> None:
        _ = self.model

    def _lean_text_encoder(self) -> Any:
        """``model.lean.LeanTextEncoder`` for this collection's model while the real model is not loaded:
        the same query embeddings for a small self-contained checkpoint (the demo model) without importing
        torch, transformers and peft (~5 s of a cold `f2b search`). None when it does not apply."""
        if self._model is not None or self.strategy.embed != "fwd2bot":
            return None
        if getattr(self, "_lean", False) is False:
            from .model.lean import LeanTextEncoder

            lean = LeanTextEncoder.load(self.model_name)
            fingerprint = self.collection.manifest.model_fingerprint
            self._lean = lean if lean is not None and (not fingerprint or lean.fingerprint == fingerprint) else None
        return self._lean

    # -- indexing ------------------------------------------------------------------------------
    def index(self, roots: Sequence[str | os.PathLike], exclude: Sequence[str] = (), include_hidden: bool = False,
              follow_symlinks: bool = False, batch_size: int = 16, prune: bool = False,
              metadata: str | os.PathLike | None = None, workers: int | None = None, max_pixels: int | None = None,
              progress: bool = False, ray: str | None = None, include_removed: bool = False,
              max_inflight_bytes: int | None = DEFAULT_MAX_INFLIGHT_BYTES) -> IndexReport:
        """Scan ``roots`` and add new or changed images; failures are recorded, never fatal. Paths
        removed with ``remove`` stay out while unchanged, unless ``include_removed``.

        ``max_inflight_bytes`` bounds the decoded pixels held at once (the batch being filled and the
        read-ahead, half each; ``indexing.decoded_batches``): large photos make smaller batches instead
        of gigabytes of read-ahead. None: ``batch_size`` and the read-ahead's count only. (With ``ray``
        the budget is each model replica's: a worker encodes its batch in parts that fit in it.)

        ``ray`` (an address, or ``"local"``) decodes and encodes on a Ray cluster; this process stays the
        one writer and commits each returned batch exactly as a local run does (see ``ray_index``).
        """
        from tqdm.auto import tqdm

        if max_inflight_bytes is not None and (isinstance(max_inflight_bytes, bool) or max_inflight_bytes < 1):
            raise ServiceError(f"max_inflight_bytes must be a positive number of bytes or None, "
                               f"got {max_inflight_bytes!r}")
        with _index_settings():  # process-wide, for this run only
            started = time.perf_counter()
            report = IndexReport()
            files = list(scan_images(roots, exclude=list(exclude), include_hidden=include_hidden,
                                     follow_symlinks=follow_symlinks, skip_dirs=[self.collection.path]))
            report.scanned = len(files)
            stats = []
            for path in files:
                try:
                    st = os.stat(path)
                except OSError as exc:
                    report.failed.append((str(path), f"unreadable: {exc.strerror}"))
                    continue
                stats.append((str(path), st.st_size, st.st_mtime))
            with tqdm(total=len(stats), desc="checking", unit="file", disable=not progress or not stats,
                      dynamic_ncols=True) as bar:
                checking = time.perf_counter()
                plan = self.collection.plan(stats, on_checked=bar.update, include_removed=include_removed)
                report.check_seconds = time.perf_counter() - checking
            report.skipped_removed = len(plan.removed)
            report.unchanged = len(plan.already_indexed)
            report.still_failing = [(stat.path, reason) for stat, reason in plan.failed_unchanged]
            for stat, reason in plan.unreadable:
                self.collection.record_failure(stat.path, stat.size, stat.mtime, reason)
                report.failed.append((stat.path, reason))
            sidecar = read_sidecar(metadata) if metadata else {}
            try:
                encoder = None
                if ray is not None:
                    from .ray_index import RayEncoder

                    encoder = RayEncoder(ray, self.model_name, self.collection.manifest, self.device, self.dtype,
                                         progress)
                self._encode_all(plan, report, sidecar, batch_size, workers, max_pixels, progress, encoder,
                                 max_inflight_bytes)
            except KeyboardInterrupt as exc:
                report.interrupted = True
                report.seconds = time.perf_counter() - started
                with contextlib.suppress(Exception):
                    self.collection.save()
                raise IndexInterrupted(report) from exc
            if prune:  # after moved files were re-linked: pruning first would drop their images
                pruned = self.collection.prune([p for p, _, _ in stats], roots=[str(Path(r).resolve()) for r in roots])
                report.pruned = len(pruned["paths"])
                report.pruned_paths = list(pruned["paths"])
            finishing = time.perf_counter()
            if report.indexed:
                self.collection.compact()  # one shard per batch was written; merge the small ones
            self.collection.save()
            report.finish_seconds = time.perf_counter() - finishing
            report.seconds = time.perf_counter() - started
            return report

    def _encode_all(self, plan, report: IndexReport, sidecar: dict, batch_size: int, workers: int | None,
                    max_pixels: int | None, progress: bool, encoder: Callable | None = None,
                    max_inflight_bytes: int | None = DEFAULT_MAX_INFLIGHT_BYTES) -> None:
        """Decode, encode and commit the plan's new files, then link its duplicates and moved files.

        The seam: ``encoder(todo, sidecar, batch_size, max_pixels, world_check, max_inflight_bytes)`` yields already
        encoded batches (``EncodedBatch``, in plan order) from elsewhere (a Ray cluster); they go
        through the same failure records and the same per-batch commit as the local path's.
        """
        from tqdm.auto import tqdm

        todo = plan.to_encode
        watch_world = is_demo_name(self.model_name)
        workers = workers or min(8, (os.cpu_count() or 2) + 2)
        was_linked = {stat.path: self.collection.path_status(stat.path).get("status") == "indexed"
                      for stat in plan.duplicates}
        # Files holding content the collection already has are linked first, all in one commit: a file
        # encoded below may displace an image whose content moved to one of them (renamed files, or
        # two files that swapped content); linked after, that image was already gone.
        linked_ids = dict(zip((s.path for s in plan.duplicates), self.collection.add_path_aliases(plan.duplicates)))
        committer = _Committer(report)  # every write of this phase, in plan order, on one writer thread
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="f2b-decode") as pool, \
                    tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress or not todo,
                         dynamic_ncols=True) as bar:
                if encoder is not None and todo:
                    batches = encoder(todo, sidecar, batch_size, max_pixels, WORLD_CHECK_IMAGES if watch_world else 0,
                                      max_inflight_bytes)
                    with contextlib.closing(batches):  # on Ctrl-C too: the cluster goes now, not at exit
                        for done in batches:
                            for item, foreign in zip(done.items, done.world):
                                item.world = foreign  # recorded with the batch's commit
                            for item in done.failed:
                                committer.submit(self._record_failed, item, report)
                            for foreign in done.world[:max(0, WORLD_CHECK_IMAGES - report.world_checked)]:
                                report.world_checked += 1
                                report.world_foreign += foreign
                            if done.items:
                                report.encode_seconds += done.encode_seconds
                                committer.submit(self._store, done.items, done.embeddings, done.tokens, report)
                            bar.update(len(done.items) + len(done.failed))
                    todo = []
                # the first decoded images are tested in the decode pool while the model encodes
                world: list[Future] = []

                def check_world(item: _Prepared) -> None:
                    if watch_world and len(world) < WORLD_CHECK_IMAGES:
                        item.world = pool.submit(_not_from_world, item.image)  # recorded at its commit
                        world.append(item.world)

                for failed, batch in decoded_batches(pool, todo, sidecar, max_pixels, batch_size, workers,
                                                     max_inflight_bytes, report, check_world):
                    if failed is not None:
                        committer.submit(self._record_failed, failed, report)
                        bar.update(1)
                    else:
                        self._commit(batch, report, batch_size, committer)
                        bar.update(len(batch))
                for check in world:
                    report.world_checked += 1
                    report.world_foreign += check.result()
        except BaseException:
            with contextlib.suppress(Exception):  # the error already on its way is the one to report
                committer.close()  # what was encoded before it is still committed, and counted
            raise
        committer.close()
        later = [s for s in plan.duplicates if linked_ids[s.path] is None]  # twins of files encoded above
        linked_ids.update(zip((s.path for s in later), self.collection.add_path_aliases(later)))
        for stat in plan.duplicates:  # identical content: one entry, several paths
            linked = was_linked[stat.path]  # before the alias
            image_id = linked_ids[stat.path]
            if image_id is None:
                reason = "same content as another file that could not be indexed"
                self.collection.record_failure(stat.path, stat.size, stat.mtime, reason)
                report.failed.append((stat.path, reason))
                continue
            new_path = os.path.abspath(stat.path)
            row = self.collection.get(image_id)
            gone = [p for p in (row.paths if row else ()) if p != new_path and not os.path.exists(p)]
            if gone:  # moved or renamed: the old path is re-linked to the new one, not kept as a ghost
                self.collection.remove_paths(gone)
                report.moved += [(old, new_path) for old in gone]
            elif linked and row is not None and new_path in row.paths:
                report.unchanged += 1  # rewritten in place with the same content (touched, copied over)
            else:
                report.duplicates += 1

    def _commit(self, batch: list[_Prepared], report: IndexReport, batch_size: int, committer: _Committer) -> None:
        """Encode one batch of decoded images and hand it to the writer (one shard, one catalog
        transaction), which commits it while the next batch is encoded."""
        t0 = time.perf_counter()
        enc = self.model.encode_images([i.image for i in batch], batch_size=batch_size, strategy=self.strategy)
        report.encode_seconds += time.perf_counter() - t0
        for item in batch:
            item.image = None  # the writer needs the file's facts only: free the pixels now
        committer.submit(self._store, batch, enc.embeddings, enc.tokens, report)

    def _store(self, batch: list[_Prepared], embeddings: np.ndarray, tokens: np.ndarray, report: IndexReport) -> None:
        """Commit one encoded batch (one shard, one catalog transaction): a killed run keeps it."""
        new = [NewImage(path=i.path, hash=i.hash, size=i.size, mtime=i.mtime, metadata=i.metadata or {})
               for i in batch]
        self.collection.add_batch(new, embeddings, tokens, outside_world=world_flags(batch))
        report.indexed += len(batch)

    def _record_failed(self, item: _Prepared, report: IndexReport) -> None:
        self.collection.record_failure(item.path, item.size, item.mtime, item.error)
        report.failed.append((item.path, item.error))

    # -- queries -------------------------------------------------------------------------------
    def search(self, text: str | None = None, image: str | os.PathLike | Any = None, like: int | str | None = None,
               embedding: Sequence[float] | None = None, k: int = 10, filter: dict | None = None, offset: int = 0,
               min_score: float | None = None, verify: int | None = None,
               min_relevance: float | None = None) -> list[Hit]:
        """Search by text, by example image (path or PIL image), by a stored image, or by a vector.

        ``verify=N`` (text only) re-ranks the top N hits by the model's own check of each from its stored
        tokens, and ``min_relevance`` cuts them (``verification``): hits gain ``relevance``."""
        given = [x is not None for x in (text, image, like, embedding)]
        if sum(given) != 1:
            raise ServiceError("give exactly one of: a text query, --image PATH, --like ID, or an embedding")
        if k < 1:
            raise ServiceError(f"k must be at least 1, got {k}")
        if verify is not None or min_relevance is not None:
            from .verification import check_verify, verified_search

            check_verify(verify, min_relevance, text=text is not None)
            return verified_search(self, text, k, filter, offset, min_score, verify, min_relevance)
        query = self.query_vector(text=text, image=image, like=like, embedding=embedding)
        exclude = {self.resolve(like)} if like is not None else None
        return self.collection.search(query, k=k, filter=filter, offset=offset, min_score=min_score,
                                      exclude_ids=exclude)

    def query_vector(self, text=None, image=None, like=None, embedding=None) -> np.ndarray:
        if text is not None:
            if not text.strip():
                raise ServiceError("the text query is empty")
            lean = self._lean_text_encoder()
            if lean is not None:  # a small checkpoint, model not loaded: numpy, no torch import (CLI cold start)
                return lean.encode([text])[0]
            return self.model.encode_texts([text], strategy=self.strategy)[0]
        if image is not None:
            picture = load_image(image) if isinstance(image, (str, os.PathLike)) else image
            return self.model.encode_images([picture], strategy=self.strategy).embeddings[0]
        if like is not None:
            return self.collection.embedding(self.resolve(like))
        vec = np.asarray(embedding, dtype=np.float32).reshape(-1)
        dim = self.collection.manifest.embed_dim
        if vec.shape[0] != dim or not np.isfinite(vec).all() or not np.any(vec):
            raise ServiceError(f"the embedding must be {dim} finite numbers, not all zero")
        return vec / np.linalg.norm(vec)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode_texts(list(texts), strategy=self.strategy)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        return self.model.encode_images(list(images), strategy=self.strategy).embeddings

    def resolve(self, ref: int | str) -> int:
        """An image id, or a path to an indexed file, -> its id."""
        try:
            return self.collection.resolve(ref).id
        except KeyError:
            raise NotFoundError(f"{ref} is not in the collection {self.collection.path} "
                                "(give an id from `f2b search`, or the path of an indexed file)") from None

    def ask(self, ref: int | str, question: str, max_new_tokens: int = 32, stream: bool = False):
        """Answer from the stored tokens only: no image decode, no vision tower."""
        if not question.strip():
            raise ServiceError("the question is empty")
        tokens = self.collection.get_tokens(self.resolve(ref))
        return self.model.answer(tokens, question, max_new_tokens=max_new_tokens, stream=stream,
                                 kind=self.strategy.tokens)

    def get(self, ref: int | str) -> ImageRow:
        return self.collection.get(self.resolve(ref))

    def remove(self, refs: Iterable[int | str]) -> list[int]:
        """Remove images by id, or paths by path; returns the ids of the images that went."""
        return [r["id"] for r in self.remove_refs(refs) if r["image_removed"]]

    def remove_refs(self, refs: Iterable[int | str]) -> list[dict]:
        """An id removes the image (all its paths); a path removes that path only, and the image goes
        with its last path. One record per ref: ``{"ref", "id", "path", "image_removed", "paths_left"}``.
        All refs go in one catalog transaction (``Collection.remove_refs``): a kill removes all or none.
        An unknown ref (a path not indexed, an id never given) fails before anything is removed."""
        try:
            return self.collection.remove_refs(refs)
        except KeyError as exc:
            raise NotFoundError(f"{exc.args[0]} is not in the collection {self.collection.path} "
                                "(give an id from `f2b search`, or the path of an indexed file)") from None

    def info(self) -> dict:
        data = self.collection.info()
        manifest = self.collection.manifest
        data.update({"model": manifest.model_name, "model_fingerprint": manifest.model_fingerprint,
                     "strategy": self.strategy.name, "collection": str(self.collection.path),
                     "tokens_per_image": manifest.token_count})
        world = self.demo_world()
        data.update({"demo_world": {"checked": world["checked"], "outside": world["outside"]},
                     "warning": world["warning"]})
        return data

    def demo_world(self) -> dict:
        """``{"checked", "outside", "warning"}``: whether this collection, on the ``demo`` model, holds
        images from outside the demo world (``demo_notice``); one small catalog read, none for other models."""
        name = self.collection.manifest.model_name
        return demo_world_status(name, *self.collection.world_counts()) if is_demo_name(name) else \
            demo_world_status(name, 0, 0)

    def export(self, path: str | os.PathLike) -> int:
        """Write ids, paths, metadata, embeddings and stored tokens to one Parquet file; returns rows."""
        return self.collection.export_parquet(path)

    def change_backend(self, backend: str, options: dict | None = None) -> None:
        """Rebuild the vector index in another backend from the stored embeddings (no re-encoding)."""
        self.collection.change_backend(backend, options)

    def verify(self, repair: bool = False, deep: bool = False):
        """Check the collection; with ``repair``, rebuild what can be rebuilt from what survives
        (``actions`` in the report says what was done, including ``open_service(repair=True)``'s).
        ``deep`` also re-hashes the indexed files (paths that hold another image's content)."""
        if not repair:
            return self.collection.verify(deep=deep)
        report = self.collection.repair(deep=deep)
        report.actions[:0] = getattr(self, "recovered", [])
        return report

    def close(self) -> None:
        self.collection.close()

    def __enter__(self) -> "ImageService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_service(collection: str | os.PathLike | None = None, model: str | None = None, device: str = "auto",
                 dtype: str = "auto", create: bool = False, writable: bool = False, strategy: str | None = None,
                 backend: str = "faiss", token_dtype: str = "fp16", reindex: bool = False,
                 backend_options: dict | None = None, image_options: dict | None = None,
                 repair: bool = False, tokens: int | None = None) -> ImageService:
    """Open (or with ``create``, make) a collection and pair it with its model.

    A new collection records the model's fingerprint, strategy and image options (``min_pixels`` /
    ``max_pixels`` for Qwen2-VL); an existing one refuses another model, strategy or image options
    with a message that says how to re-index.
    """
    image_options = {k: v for k, v in (image_options or {}).items() if v is not None}
    path = Path(collection or os.environ.get("F2B_COLLECTION") or DEFAULT_COLLECTION)
    # verify --repair: a lost or damaged manifest/catalog is rebuilt from the token shards first
    recovered = Collection.recover(path) if repair and path.is_dir() else []
    exists = Collection.exists(path)
    if not exists and not create:
        raise CollectionNotFoundError(no_collection_message(path))
    if exists and not reindex:
        coll = Collection.open(path, writable=writable or create)
        name = model or coll.manifest.model_name
        service = ImageService(coll, name, device, dtype)
        service.recovered = recovered
        recorded = coll.manifest.image_options
        if any(recorded.get(k) != v for k, v in image_options.items()):
            raise CollectionMismatchError(
                f"the collection {path} was built with image options {recorded or 'none'}, not {image_options}; "
                "index into a new --collection, or re-index with --reindex")
        if model is not None or strategy is not None:
            service._check_request(model, strategy)
        check_index_tokens(service, tokens)
        return service
    name = model or os.environ.get("F2B_MODEL") or DEFAULT_MODEL
    loaded = load_checked_model(name, None, device, dtype, image_options)
    chosen = with_tokens(loaded, loaded.resolve_strategy(strategy), tokens)  # --tokens k of a nested compressor
    t, h = loaded.token_shape(chosen)
    manifest = Manifest(
        # a shipped model (demo, demo-nested) by its name, even beside a folder of that name (it is the one loaded):
        # the name is what turns the demo-world check and warning on for the collection
        model_name=name if is_demo_name(name) or not Path(name).exists() else str(Path(name).resolve()),
        model_fingerprint=loaded.fingerprint,
        strategy=chosen.to_dict(),
        embed_dim=loaded.embed_dim_for(chosen),
        token_count=t,
        token_dim=h,
        token_dtype=token_dtype,
        backend=backend,
        backend_options=backend_options or {},
        image_options=loaded.image_options,
    )
    coll = Collection.create(path, manifest, overwrite=reindex)
    return ImageService(coll, name, device, dtype, model=loaded)


def _check_request(self: ImageService, model: str | None, strategy: str | None) -> None:
    """An explicit --model/--strategy on an existing collection must match what it was built with."""
    manifest = self.collection.manifest
    if strategy is not None:
        from .model.config import Strategy

        asked = Strategy.parse(strategy, default_budget=manifest.strategy.get("budget", 16))
        have = Strategy.from_dict(manifest.strategy)
        if (asked.embed, asked.tokens) != (have.embed, have.tokens) or (
                asked.tokens == "pool" and asked.budget != have.budget):
            raise CollectionMismatchError(
                f"the collection {self.collection.path} uses strategy {have.name!r}, not {asked.name!r}; "
                "index into a new --collection, or re-index with --reindex"
            )
    if model is not None:
        self._model = load_checked_model(model, manifest, self.device, self.dtype)


ImageService._check_request = _check_request
ImageService.migrate_tokens = migrate_tokens  # shrink the stored summary tokens in place (``shrinking``)
