"""``serve``: build the app over a collection and run it with uvicorn (what ``f2b serve`` calls)."""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
from collections.abc import Sequence
from typing import Any

from .app import DEFAULT_BATCH_WAIT_MS, DEFAULT_MAX_PIXELS, DEFAULT_MAX_QUEUE, DEFAULT_MAX_UPLOAD_BYTES, create_app

log = logging.getLogger("fwd2bot_index.api")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: the addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def model_threads() -> int | None:
    """torch threads for a server's model calls when none are asked for: one core fewer than the process
    may use (at least one), so the event loop, which parses and answers every request, keeps a core.

    Measured on 2 cores (bench/bench_service.py): with torch's default of 2 threads a one-text query cost
    the server about 60 CPU ms (the threads spin while the event loop and the client need the cores),
    with 1 thread about 2 ms. None when $OMP_NUM_THREADS is set: the user's choice is kept.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def freeze_heap() -> None:
    """Move everything alive once the model has loaded (torch, transformers, the model) out of the
    garbage collector's view (``gc.freeze``): a full collection then scans only what requests create.
    Measured in a server under load: a full collection paused every thread for about 210 ms, so the
    99th-percentile search took 250 ms instead of 20; after the freeze it takes 0.3 ms."""
    gc.collect()
    gc.freeze()


def serve(collection: str | os.PathLike[str] | None = None, model: str | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, protect_reads: bool = False,
          cors_origins: Sequence[str] = (), max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
          max_pixels: int = DEFAULT_MAX_PIXELS, device: str = "auto", dtype: str = "auto",
          writable: bool | None = None, log_level: str = "info", allowed_hosts: Sequence[str] = (),
          max_queue: int = DEFAULT_MAX_QUEUE, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
          threads: int | None = None, **uvicorn_options: Any) -> None:
    """Open the collection, start loading the model in the background, and serve until interrupted.

    Binds 127.0.0.1 unless ``host`` says otherwise; binding another address without an API key is
    allowed but logged as a warning, since anyone who can reach the port could then change the
    collection. ``collection`` defaults like the CLI: $F2B_COLLECTION, else ``./.f2b``. ``writable``:
    None tries write access and serves read-only if another process is indexing the collection.
    ``allowed_hosts``: host names (besides loopback names and ``host``) that requests may name, e.g.
    a reverse proxy's public name; ``max_queue``: model jobs waiting before requests get 503;
    ``batch_wait_ms``: how long the model thread, under load, waits to batch more text queries;
    ``threads``: torch's threads for model calls (default: see ``model_threads``).
    """
    make_server(collection, model=model, host=host, port=port, api_key=api_key, protect_reads=protect_reads,
                cors_origins=cors_origins, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, device=device,
                dtype=dtype, writable=writable, log_level=log_level, allowed_hosts=allowed_hosts,
                max_queue=max_queue, batch_wait_ms=batch_wait_ms, threads=threads, **uvicorn_options).run()


def make_server(collection: str | os.PathLike[str] | None = None, model: str | None = None,
                host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, protect_reads: bool = False,
                cors_origins: Sequence[str] = (), max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                max_pixels: int = DEFAULT_MAX_PIXELS, device: str = "auto", dtype: str = "auto",
                writable: bool | None = None, log_level: str = "info", allowed_hosts: Sequence[str] = (),
                max_queue: int = DEFAULT_MAX_QUEUE, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
                threads: int | None = None, **uvicorn_options: Any) -> Any:
    """What ``serve`` runs: a configured ``uvicorn.Server`` (call ``.run()``; tests run it in a thread).

    Sets torch's (process-wide) thread count for model calls: ``threads``, else ``model_threads()``."""
    import torch
    import uvicorn

    count = threads or model_threads()
    if count:
        torch.set_num_threads(count)

    from fwd2bot_index.service import DEFAULT_COLLECTION

    path = collection or os.environ.get("F2B_COLLECTION") or DEFAULT_COLLECTION
    # the collection is opened first: a missing one is the only line, not the last of three
    app = create_app(path, api_key=api_key, protect_reads=protect_reads, cors_origins=cors_origins,
                     max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, preload=True, model=model,
                     writable=writable, device=device, dtype=dtype, host=host, allowed_hosts=allowed_hosts,
                     max_queue=max_queue, batch_wait_ms=batch_wait_ms)
    if host in ("0.0.0.0", "::") and not allowed_hosts:
        log.warning("serving on all addresses (%s): clients may use this machine's IP addresses; host names they "
                    "use (e.g. photos.lan) must be given with --allowed-host", host)
    if not is_loopback(host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach port %d can add and remove images "
                    "(set --api-key)", host, port)
    app.state.f2b.worker.on_ready = freeze_heap
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", **uvicorn_options)
    return uvicorn.Server(config)
