"""`f2b index --ray`: decode and encode on a Ray cluster, commit in this process.

Why this shape: the collection has exactly one writer (its lock file), and its commit protocol (one
token shard and one catalog transaction per batch) is what makes a killed run resume without
duplicates. So only the heavy half moves to Ray: actors that each hold one model replica (one per GPU,
or one per CPU slot on a CPU-only cluster) decode a chunk of files and encode it; the results
(embeddings, tokens, metadata, per-file failures) come back to the driver in plan order, and the
service commits each one through the same path as a local run (``ImageService._encode_all``).

Files travel as paths, not bytes: every worker must read the same paths as the driver (a shared
filesystem mounted at the same place). The driver scans and hashes the files, holds the collection
folder, and must reach the cluster's head (``HOST:PORT``, or ``ray://HOST:10001`` through Ray Client).

Ray is an optional extra (``pip install 'fwd2bot-index[ray]'``); this module imports it only when used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from .options import OptionError

INSTALL_HINT = "pip install 'fwd2bot-index[ray]'"
_ADDRESS = re.compile(r"^(local|auto|ray://[^\s:/]+(:\d+)?|[^\s:/]+:\d+)$")


def check_ray_address(address: str) -> None:
    """Refuse a malformed ``--ray`` value, or a missing Ray, before any model loads (no import of ray)."""
    if not _ADDRESS.match(address or ""):
        raise OptionError(f"--ray {address!r}: give local (start a cluster in this process), auto, HOST:PORT "
                          "(a running cluster's head, port 6379 by default) or ray://HOST:10001")
    if importlib.util.find_spec("ray") is None:
        raise OptionError(f"--ray needs Ray, which is not installed here: {INSTALL_HINT}")


@dataclass
class EncodedBatch:
    """One chunk of the plan after a worker decoded and encoded it (images themselves stay remote)."""

    items: list = field(default_factory=list)  # indexing._Prepared, image dropped, in plan order
    failed: list = field(default_factory=list)  # indexing._Prepared with ``error`` set
    embeddings: np.ndarray | None = None
    tokens: np.ndarray | None = None
    world: list[bool] = field(default_factory=list)  # for the first images: True = not from the demo world
    encode_seconds: float = 0.0


class Replica:
    """One model replica on a Ray worker (wrapped with ``ray.remote`` at run time)."""

    def __init__(self, model_name: str, manifest: Any, device: str, dtype: str):
        from .model.config import Strategy
        from .loader import load_checked_model

        self.strategy = Strategy.from_dict(manifest.strategy)
        # A failed load is kept and raised by the first call: Ray then hands the driver the exception
        # itself (an error in __init__ arrives only as the text of an ActorDiedError).
        self.error: BaseException | None = None
        try:
            self.model = load_checked_model(model_name, manifest, device, dtype)  # refuses a different model
        except Exception as exc:  # noqa: BLE001  (re-raised by encode)
            self.error = exc

    def encode(self, chunk: Sequence[Any], sidecar: dict, max_pixels: int | None, world_check: int,
               max_inflight_bytes: int | None = None) -> EncodedBatch:
        """Decode and encode one chunk of the plan. With ``max_inflight_bytes`` the chunk's images go to the
        model in parts whose decoded pixels stay within the budget (``indexing.decoded_batches``, as in a
        local run), and the parts' vectors come back as one batch: a worker holds what a local run would."""
        from .indexing import IndexReport, decoded_batches

        if self.error is not None:
            raise self.error
        out = EncodedBatch()
        embeddings, tokens = [], []
        with ThreadPoolExecutor(min(4, len(chunk)) or 1, thread_name_prefix="f2b-decode") as pool:
            for failed, part in decoded_batches(pool, chunk, sidecar, max_pixels, max(1, len(chunk)),
                                                min(4, len(chunk)) or 1, max_inflight_bytes, IndexReport()):
                if failed is not None:
                    out.failed.append(failed)
                    continue
                if len(out.world) < world_check:
                    from .synthetic.detect import looks_like_demo_world

                    out.world += [not looks_like_demo_world(p.image) for p in part[:world_check - len(out.world)]]
                t0 = time.perf_counter()
                enc = self.model.encode_images([p.image for p in part], batch_size=len(part), strategy=self.strategy)
                out.encode_seconds += time.perf_counter() - t0
                embeddings.append(enc.embeddings)
                tokens.append(enc.tokens)
                for p in part:
                    p.image = None  # the driver needs the path, hash, size, mtime and metadata only
                out.items += part
        if out.items:
            out.embeddings, out.tokens = np.concatenate(embeddings), np.concatenate(tokens)
        return out


class RayEncoder:
    """The ``encoder`` seam of ``ImageService._encode_all``, backed by Ray actors.

    Ray starts (``local``) or is joined only when there is something to encode, and is shut down (or
    left) when the generator ends, also on Ctrl-C or an error.
    """

    def __init__(self, address: str, model_name: str, manifest: Any, device: str = "auto", dtype: str = "auto",
                 progress: bool = False):
        check_ray_address(address)
        self.address, self.model_name, self.manifest = address, model_name, manifest
        self.device, self.dtype, self.progress = device, dtype, progress

    def _say(self, message: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)  # above the progress bar, not through it

    def _connect(self) -> bool:
        """Start or join the cluster; True when this call did (and so must shut it down)."""
        import ray

        if ray.is_initialized():  # a library user inside their own Ray driver
            return False
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if self.address == "local":
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", num_cpus=os.cpu_count() or 1, _node_ip_address="127.0.0.1",  # not $RAY_ADDRESS
                     object_store_memory=512 * 1024**2, **quiet)
        else:
            quiet.pop("include_dashboard")  # a setting of the cluster, not of a client
            try:
                ray.init(address=self.address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                from .errors import ServiceError

                raise ServiceError(f"--ray {self.address}: cannot reach the Ray cluster ({exc}); start it with "
                                   "`ray start --head` or check the address") from None
        return True

    def __call__(self, todo: Sequence[Any], sidecar: dict, batch_size: int, max_pixels: int | None,
                 world_check: int, max_inflight_bytes: int | None = None) -> Iterator[EncodedBatch]:
        """Encode ``todo`` in chunks of ``batch_size`` on the cluster's replicas, yielding them in plan order;
        each replica holds at most ``max_inflight_bytes`` of decoded pixels (``Replica.encode``)."""
        import ray
        from ray.util import ActorPool

        chunks = [list(todo[i:i + batch_size]) for i in range(0, len(todo), batch_size)]
        started = self._connect()
        actors = []
        try:
            resources = ray.cluster_resources()
            gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
            replicas = min(gpus or cpus, len(chunks))
            remote = ray.remote(num_gpus=1, num_cpus=1)(Replica) if gpus else ray.remote(num_cpus=1)(Replica)
            actors = [remote.remote(self.model_name, self.manifest, self.device, self.dtype) for _ in range(replicas)]
            self._say(f"ray: {replicas} model replica(s) on {self.address} ({cpus} CPU, {gpus} GPU), "
                      f"{len(chunks)} batch(es) of up to {batch_size}")
            pool = ActorPool(actors)
            jobs = [(chunk, {s.path: sidecar[s.path] for s in chunk if s.path in sidecar}) for chunk in chunks]
            left = world_check
            results = pool.map(lambda actor, job: actor.encode.remote(job[0], job[1], max_pixels, left,
                                                                      max_inflight_bytes), jobs)
            for done in _surface_errors(results):
                yield done
        finally:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()


def _surface_errors(results: Iterator[EncodedBatch]) -> Iterator[EncodedBatch]:
    """A worker's exception becomes one line (the cause, not Ray's remote traceback)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from .errors import ServiceError, user_error_types

    while True:
        try:
            done = next(results)
        except StopIteration:
            return
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            # the library's own errors (a model that cannot load or does not match) are one line, as locally
            if isinstance(cause, user_error_types()) or type(cause).__module__.startswith("fwd2bot_index"):
                raise ServiceError(f"on a Ray worker: {str(cause).strip(chr(39) + chr(34))}") from None
            raise
        except RayActorError as exc:
            raise ServiceError(f"a Ray worker died ({str(exc).splitlines()[0]}); the batches committed so far are "
                               "kept: run the same command again to continue") from None
        except ray.exceptions.RaySystemError as exc:
            raise ServiceError(f"Ray failed: {str(exc).splitlines()[0]}") from None
        yield done
