"""Collection commands: index, ask, info, verify, remove, serve (search: search.py). Thin over the service."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from .main import (
    CollectionOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    app,
    check,
    collection_path,
    err,
    fail,
    model_name,
    print_json,
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's user-facing errors (the facade lists them) into one line on stderr, exit 1."""
    from fwd2bot_index.service import user_error_types

    try:
        yield
    except KeyboardInterrupt:
        err("interrupted")
        raise typer.Exit(130)
    except Exception as exc:
        if isinstance(exc, user_error_types()):
            raise fail(str(exc).strip("'\""))
        raise


def _service(collection: Optional[Path], model: Optional[str], device: str, dtype: str, **kw):
    from fwd2bot_index.service import open_service

    return open_service(collection_path(collection), model=model, device=device, dtype=dtype, **kw)


def _parse_filters(values: Optional[List[str]]) -> Optional[dict]:
    if not values:
        return None
    from fwd2bot_index.service import parse_filter

    try:
        return parse_filter(values)
    except ValueError as exc:
        raise fail(f"--filter: {exc}", 2)


@app.command()
def index(
    dirs: List[Path] = typer.Argument(..., help="Folders (or files) to index, recursively."),
    collection: Optional[Path] = CollectionOpt,
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Images per model batch and per commit."),
    max_inflight_mb: float = typer.Option(1024, "--max-inflight-mb", min=0,
                                          help="Decoded pixels held at once, in MiB (half the batch being filled, "
                                               "half read ahead; large photos make smaller batches); 0: no limit."),
    backend: str = typer.Option("faiss", "--backend",
                                help="faiss, qdrant-edge, qdrant-local or qdrant-server (new collections)."),
    index_kind: Optional[str] = typer.Option(None, "--faiss-index",
                                             help="FAISS index: auto (by size), flat, hnsw or ivfpq (new collections)."),
    qdrant_url: Optional[str] = typer.Option(None, "--qdrant-url", help="Qdrant server/cluster URL (backend qdrant-server)."),
    qdrant_collection: Optional[str] = typer.Option(None, "--qdrant-collection",
                                                    help="Collection name on the Qdrant server (default f2b)."),
    qdrant_shards: Optional[int] = typer.Option(None, "--qdrant-shards", min=1,
                                                help="Qdrant cluster: shards of a new collection (e.g. 2 per node)."),
    qdrant_replicas: Optional[int] = typer.Option(None, "--qdrant-replicas", min=1,
                                                  help="Qdrant cluster: copies of each shard (replication factor)."),
    qdrant_on_disk: bool = typer.Option(False, "--qdrant-on-disk",
                                        help="Qdrant: keep vectors and the HNSW graph on disk (memory-mapped)."),
    qdrant_quantization: Optional[str] = typer.Option(None, "--qdrant-quantization",
                                                      help="Qdrant: int8 or binary copies in RAM, rescored with full vectors."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="fwd2bot, pool[@N], prompt, full (new collections)."),
    token_dtype: str = typer.Option("fp16", "--token-dtype", help="Stored token precision: fp16 or int8 (new collections)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1,
                                         help="Summary tokens stored per image: a budget the nested compressor was "
                                              "trained for (new collections; default K)."),
    min_pixels: Optional[int] = typer.Option(None, "--min-pixels", min=1,
                                             help="Qwen2-VL family: smallest resized image area in pixels (new collections; recorded)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1,
                                             help="Qwen2-VL family: largest resized image area in pixels (new collections; recorded)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Glob pattern of paths to skip (repeatable)."),
    include_hidden: bool = typer.Option(False, "--hidden", help="Also index hidden files and folders."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Follow symbolic links."),
    prune: bool = typer.Option(False, "--prune", help="Drop catalog entries whose files vanished under DIRS."),
    include_removed: bool = typer.Option(False, "--include-removed",
                                         help="Also index files removed with `f2b remove` that have not changed."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="Sidecar JSON/CSV with a 'path' column of per-image metadata."),
    reindex: bool = typer.Option(False, "--reindex", help="Rebuild the collection from scratch with --model/--strategy."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Decode and encode on Ray: local (a cluster in this "
                                      "process), auto, HOST:PORT or ray://HOST:10001. Workers need the same paths."),
    as_json: bool = JsonOpt,
) -> None:
    """Add new or changed images to the collection (crash-safe, incremental, deduplicated)."""
    if not math.isfinite(max_inflight_mb):  # click's min=0 lets inf through (and nan, in some click versions)
        raise fail(f"--max-inflight-mb {max_inflight_mb!r}: use a finite number of MiB (0: no limit)", 2)
    if ray is not None:
        from fwd2bot_index.options import OptionError
        from fwd2bot_index.ray_index import check_ray_address

        try:
            check_ray_address(ray)
        except OptionError as exc:
            raise fail(str(exc), 2)
    check(model=model_name(model, None), device=device, dtype=dtype, backend=backend, token_dtype=token_dtype,
          faiss_index=index_kind, strategy=strategy)
    cluster = [name for name, v in (("--qdrant-shards", qdrant_shards), ("--qdrant-replicas", qdrant_replicas),
                                    ("--qdrant-on-disk", qdrant_on_disk or None),
                                    ("--qdrant-quantization", qdrant_quantization)) if v is not None]
    if qdrant_quantization not in (None, "int8", "binary"):
        raise fail(f"--qdrant-quantization {qdrant_quantization!r}: use int8 or binary", 2)
    if cluster and backend != "qdrant-server":
        raise fail(f"{', '.join(cluster)}: settings of a new Qdrant server collection; add --backend qdrant-server "
                   "--qdrant-url URL", 2)
    missing = [str(d) for d in dirs if not d.exists()]
    if missing:  # before a collection folder is created: a typo leaves nothing behind
        raise fail(f"no such file or folder: {', '.join(missing)}")
    if metadata is not None and not metadata.is_file():
        raise fail(f"--metadata {metadata}: no such file")
    from fwd2bot_index.service import IndexInterrupted

    with user_errors():
        options = {k: v for k, v in (("kind", index_kind), ("url", qdrant_url),
                                      ("collection_name", qdrant_collection), ("shards", qdrant_shards),
                                      ("replication_factor", qdrant_replicas), ("on_disk", qdrant_on_disk or None),
                                      ("quantization", qdrant_quantization)) if v is not None}
        # the server's API key comes from $QDRANT_API_KEY and is never written to the manifest
        service = _service(collection, model_name(model, None), device, dtype, create=True, writable=True,
                           strategy=strategy, backend=backend, token_dtype=token_dtype, reindex=reindex, tokens=tokens,
                           backend_options=options, image_options={"min_pixels": min_pixels, "max_pixels": max_pixels})
        with service:
            if model is None and not service.collection.manifest.model_name:
                raise fail("the collection records no model; pass --model")
            try:
                report = service.index([str(d) for d in dirs], exclude=exclude or [], include_hidden=include_hidden,
                                       follow_symlinks=follow_symlinks, batch_size=batch_size, prune=prune,
                                       metadata=metadata, progress=True, ray=ray, include_removed=include_removed,
                                       max_inflight_bytes=max(1, int(max_inflight_mb * 2**20))
                                       if max_inflight_mb else None)
            except IndexInterrupted as stop:
                err(f"interrupted: {stop.report.indexed} new image(s) were committed and are kept; "
                    "run the same command again to continue")
                world_warning(None, service.demo_world())  # what the committed batches recorded
                raise typer.Exit(130)
    from .index_report import index_details, index_summary

    if as_json:
        print_json(report.to_dict())
    else:
        typer.echo(index_summary(report))
    index_details(report, service.model_name)
    if not report.world_foreign:  # this run's images were fine, but the collection may hold others
        world_warning(collection)


def _answered_by(record: dict) -> None:
    err(f"(answered by the running f2b serve at {record['url']}; --local to load the model here)")


@app.command()
def ask(
    ref: str = typer.Argument(..., help="Image id (from search) or the path of an indexed file."),
    question: str = typer.Argument(..., help="The question."),
    collection: Optional[Path] = CollectionOpt,
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    stream: bool = typer.Option(False, "--stream", help="Print the answer as it is generated."),
    local: bool = typer.Option(False, "--local",
                               help="Load the model in this process even when `f2b serve` of this collection runs."),
    as_json: bool = JsonOpt,
) -> None:
    """Answer a question about an indexed image from its stored tokens (no image decode).

    While `f2b serve` of the same collection runs, it answers (no model load here).
    """
    check(model=model, device=device, dtype=dtype)
    if not question.strip():
        raise fail("the question is empty")
    streaming = stream and not as_json
    with user_errors():
        served = None if local or model else _ask_via_server(collection, ref, question, max_new_tokens, streaming,
                                                             as_json)
        if served is not None:
            image_id, path, answer = served
            if streaming:
                _print_stream(answer)
                return world_warning(collection)
        else:
            with _service(collection, model, device, dtype) as service:
                image_id = service.resolve(int(ref) if ref.isdigit() else ref)
                answer = service.ask(image_id, question, max_new_tokens=max_new_tokens, stream=streaming)
                if streaming:
                    _print_stream(answer)
                    return world_warning(collection, service.demo_world())
                path = service.get(image_id).path
    if as_json:
        print_json({"id": image_id, "path": str(path), "question": question, "answer": answer})
    else:
        typer.echo(answer)
    world_warning(collection)


def _print_stream(pieces: Iterator[str]) -> None:
    from .remote import RemoteError

    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except RemoteError as exc:  # the server's error event in the middle of a stream
        sys.stdout.write("\n")
        raise fail(str(exc))
    sys.stdout.write("\n")


def _ask_via_server(collection: Optional[Path], ref: str, question: str, max_new_tokens: int, stream: bool,
                    with_path: bool):
    """(id, path, answer or its pieces) from a running `f2b serve` of this collection, or None (answer
    here). An id goes to the server as it is (no local imports); a path is resolved in the catalog first."""
    from .remote import RemoteError, find_server, remote_ask, remote_image

    record = find_server(collection_path(collection))
    if record is None:
        return None
    path = None
    if ref.isdigit():
        image_id = int(ref)
    else:
        with _service(collection, None, "cpu", "auto") as catalog:  # the catalog only: no model loads
            image_id = catalog.resolve(ref)
            path = catalog.get(image_id).path
    try:
        answer = remote_ask(record, image_id, question, max_new_tokens, stream=stream)
        if answer is not None and with_path and path is None:
            path = (remote_image(record, image_id) or {}).get("path")
    except RemoteError as exc:
        raise fail(str(exc))
    if answer is None or (with_path and path is None):
        return None
    _answered_by(record)
    return image_id, path, answer


@app.command()
def info(
    collection: Optional[Path] = CollectionOpt,
    failed: bool = typer.Option(False, "--failed", help="List the files that failed and why."),
    as_json: bool = JsonOpt,
) -> None:
    """Counts, sizes, bytes per image, model and strategy of the collection."""
    with user_errors():
        with _service(collection, None, "cpu", "auto") as service:
            data = service.info()
            failures = service.collection.failures() if failed else []
    if failed:
        data["failures"] = failures
    if as_json:
        print_json(data)
        return
    typer.echo(f"collection   {data['collection']}")
    typer.echo(f"indexed      {data['indexed']} images")
    typer.echo(f"failed       {data['failed']} files")
    typer.echo(f"model        {data['model']}  (fingerprint {str(data.get('model_fingerprint', ''))[:12]})")
    typer.echo(f"strategy     {data['strategy']}")
    typer.echo(f"tokens/image {data.get('tokens_per_image', data.get('token_count'))}")
    typer.echo(f"backend      {data.get('backend', '')}")
    per_image = data.get("bytes_per_image")
    typer.echo(f"bytes/image  {per_image:.0f}" if per_image is not None else "bytes/image  - (no images yet)")
    for row in failures:
        typer.echo(f"  failed: {row.get('path')}: {row.get('error') or row.get('reason')}")
    if data.get("warning"):
        err(f"warning: {data['warning']}")


def world_warning(collection: Optional[Path], status: Optional[dict] = None) -> None:
    """The demo model's blind spot, on stderr, whenever the collection holds images outside its world
    (``status`` from a service already open, else read from the collection folder: no model, no index)."""
    from fwd2bot_index.service import collection_world_status

    warning = (status or collection_world_status(collection_path(collection))).get("warning")
    if warning:
        err(f"warning: {warning}")


@app.command()
def verify(
    collection: Optional[Path] = CollectionOpt,
    repair: bool = typer.Option(False, "--repair", help="Rebuild what is damaged from what survives: manifest and "
                                "catalog from the token shards, the index from the embeddings (damaged files are "
                                "kept aside; images whose data is lost are re-encoded by the next index)."),
    deep: bool = typer.Option(False, "--deep", help="Also re-hash every indexed file and name paths that no longer "
                              "hold their image's content (reads every file); with --repair, re-link them."),
    as_json: bool = JsonOpt,
) -> None:
    """Check that catalog, token store and index agree (exit 0 only then)."""
    with user_errors():
        with _service(collection, None, "cpu", "auto", writable=repair, repair=repair) as service:
            report = service.verify(repair=repair, deep=deep)
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    if as_json:
        print_json(data)
    else:
        for action in data.get("actions", []):
            typer.echo(f"repaired: {action}")
        typer.echo("ok: catalog, tokens and index agree" if data.get("ok") else "problems found:")
        for problem in data.get("problems", []):
            typer.echo(f"  - {problem}")
        for note in data.get("notes", []):  # not problems: the exit status does not depend on them
            typer.echo(f"note: {note}")
    if not data.get("ok"):
        raise typer.Exit(1)


@app.command()
def remove(
    refs: List[str] = typer.Argument(..., help="Image ids or indexed paths to remove."),
    collection: Optional[Path] = CollectionOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Remove images by id (all their paths), or paths by path (the image goes with its last path).

    The files themselves are not touched.
    """
    with user_errors():
        with _service(collection, None, "cpu", "auto", writable=True) as service:
            done = service.remove_refs([int(r) if r.isdigit() else r for r in refs])
    if as_json:
        print_json({"removed": [r["id"] for r in done if r["image_removed"]], "details": done})
        return
    for r in done:
        if r.get("already_removed"):
            what = f"image {r['id']}" if r["id"] is not None else r["path"]
            typer.echo(f"{what} is not in the collection (already removed); nothing to do")
        elif r["path"] is None:
            typer.echo(f"removed image {r['id']} (all its paths)")
        elif r["image_removed"]:
            typer.echo(f"removed {r['path']}; it was the last path of image {r['id']}, so the image is removed")
        else:
            typer.echo(f"removed path {r['path']}; image {r['id']} stays under {r['paths_left']} other path(s)")


@app.command()
def serve(
    collection: Optional[Path] = CollectionOpt,
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1 unless you mean it)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="F2B_API_KEY", show_envvar=False,
                                           help="Require this key for writes (env F2B_API_KEY)."),
    protect_reads: bool = typer.Option(False, "--protect-reads", help="Require the API key for reads too."),
    threads: Optional[int] = typer.Option(None, "--threads", envvar="F2B_THREADS", show_envvar=False, min=1,
                                          help="Torch threads for model calls (1 gives steadier latency on a busy "
                                               "CPU; env F2B_THREADS)."),
    allowed_hosts: List[str] = typer.Option(
        [], "--allowed-host", help="Another host name clients reach the server by (a reverse proxy's, a LAN name, "
                                   "*.example.org); repeatable. Loopback names, --host and IP addresses are always allowed."),
    max_queue: int = typer.Option(64, "--max-queue", min=1,
                                  help="Model requests that may wait; more are answered 503 with Retry-After at once."),
    batch_wait_ms: float = typer.Option(0.0, "--batch-wait-ms", min=0, max=1000,
                                        help="Under load, how long the model may wait to encode more text queries "
                                             "together (default 0: texts that queue while it runs are batched "
                                             "anyway; a lone query never waits)."),
) -> None:
    """Serve the REST API (/v1/...) and the search page (/)."""
    check(model=model, device=device, dtype=dtype)
    _check_port_free(host, port)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from .remote import announce

    # uvicorn stops gracefully on SIGTERM and then re-raises it; with the default handler the process
    # died there and left its announcement behind (a record of a dead server). Exiting through
    # SystemExit runs the cleanup below (the previous handler is back afterwards).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with user_errors(), announce(collection_path(collection), host, port):
            from fwd2bot_index.api import serve as run_server

            run_server(collection_path(collection), model=model, device=device, dtype=dtype, host=host, port=port,
                       api_key=api_key, protect_reads=protect_reads, allowed_hosts=allowed_hosts,
                       max_queue=max_queue, batch_wait_ms=batch_wait_ms, threads=threads)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_port_free(host: str, port: int) -> None:
    """A taken port is refused in a line, before the model loads (uvicorn would log a traceback later)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another f2b serve running? "
                       "pick another --port") from None


@app.command()
def export(
    out: Path = typer.Argument(..., help="Parquet file to write (readable by pandas, DuckDB, pyarrow)."),
    collection: Optional[Path] = CollectionOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Export ids, paths, metadata, embeddings and stored tokens as one Parquet file."""
    if not out.parent.is_dir():
        raise fail(f"cannot write {out}: the folder {out.parent} does not exist")
    with user_errors():
        with _service(collection, None, "cpu", "auto") as service:
            rows = service.export(out)
    if as_json:
        print_json({"rows": rows, "path": str(out.resolve())})
    else:
        typer.echo(f"wrote {rows} rows to {out}")


@app.command()
def migrate(
    backend: Optional[str] = typer.Option(None, "--backend", help="faiss, qdrant-edge, qdrant-local or qdrant-server."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1,
                                         help="Keep the first k stored summary tokens of each image (a budget of "
                                              "the nested compressor); embeddings recomputed, no re-encoding."),
    faiss_index: Optional[str] = typer.Option(None, "--faiss-index", help="auto, flat, hnsw or ivfpq."),
    qdrant_url: Optional[str] = typer.Option(None, "--qdrant-url", help="Qdrant server/cluster URL (backend qdrant-server)."),
    qdrant_collection: Optional[str] = typer.Option(None, "--qdrant-collection",
                                                    help="Collection name on the Qdrant server (default f2b)."),
    collection: Optional[Path] = CollectionOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Move the vector index to another backend, or shrink the stored tokens (--tokens): no re-encoding."""
    if backend is None and tokens is None:
        raise fail("give --backend (move the index) or --tokens (shrink the stored summary tokens)", 2)
    if backend is not None:
        check(backend=backend, faiss_index=faiss_index)
    if tokens is not None:
        _migrate_tokens(collection, tokens, device, as_json)
        if backend is None:
            return
    options = {k: v for k, v in (("kind", faiss_index), ("url", qdrant_url),
                                  ("collection_name", qdrant_collection)) if v is not None}
    with user_errors():
        with _service(collection, None, "cpu", "auto", writable=True) as service:
            service.change_backend(backend, options)
            report = service.verify()
    typer.echo(f"index moved to {backend}; " + ("verified" if report.ok else "problems: " + "; ".join(report.problems)))
    if not report.ok:
        raise typer.Exit(1)


def _migrate_tokens(collection: Optional[Path], tokens: int, device: str, as_json: bool) -> None:
    """``migrate --tokens k``: the model's head recomputes each embedding from the first k stored tokens."""
    check(device=device)
    with user_errors():
        with _service(collection, None, device, "auto", writable=True) as service:
            report = service.migrate_tokens(tokens)
            checked = service.verify()
    report["verified"] = checked.ok
    if as_json:
        print_json(report)
    elif not report["changed"]:
        typer.echo(f"the collection already stores {tokens} tokens per image; nothing to do")
    else:
        typer.echo(f"shrank {report['images']} images from {report['from_token_count']} to {tokens} tokens each in "
                   f"{report['seconds']:.1f} s (no re-encoding); {report.get('bytes_per_image') or 0:.0f} bytes/image; "
                   + ("verified" if checked.ok else "problems: " + "; ".join(checked.problems)))
    if not checked.ok:
        raise typer.Exit(1)
