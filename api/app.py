"""The FastAPI app factory: REST routes over the service facade, the search page, metrics.

Concurrency model. Reads (image records, files, thumbnails, filtered or slow searches) run in the
thread pool at the same time; the collection guards its own state. A search by id or vector that
costs well under a millisecond runs on the event loop itself (``SearchCost``: the hop to a pool
thread cost more). Every model call goes to one model thread (``ModelWorker``), which batches
concurrent text queries (and searches them in the same turn) and concurrent JSON answers; no
search by id or vector ever waits for it. Writes (upload, delete) hold
one write lock, so the collection sees one writer at a time. The model loads in the background at
startup: ``/healthz`` answers at once, ``/readyz`` says 503 until the model is ready, and routes
that need the model answer 503 with ``Retry-After`` meanwhile (searches by id or vector work).

Overload (see ``limits``): at most ``max_queue`` model jobs and ``max_queue`` search, embed, answer
or upload requests in flight; beyond either, 503 with ``Retry-After`` at once. A job whose client
left is dropped. Images are decoded ``decode_slots`` at a time on their own threads. ``/healthz``
and ``/readyz`` are coroutines that touch neither the model nor the pool. Abuse (see ``guard``):
Host allow-list and Origin check; request bodies are strict, valid Unicode, and described exactly
by the OpenAPI document (see ``openapi``); JSON bodies with too many keys or too deep are refused before
they are parsed, and parsed off the loop (``bodies``); images are refused from their header when their
decode would pass the memory bound (``fwd2bot_index.image_shape``).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import logging
import os
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Header, Query, Response, Security, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from fwd2bot_index.verification import verify_by_default

from .bodies import JsonBodyMiddleware, PreparsedJsonRoute
from .docs import install_docs
from .files import ThumbnailCache, catalog_row, read_verified
from .guard import HostOriginMiddleware, default_hosts
from .limits import Gate
from .metrics import Metrics
from .middleware import AllowMiddleware, BodyLimitMiddleware, MetricsMiddleware
from .model_routes import IdParam, model_routes
from .openai_routes import openai_routes
from .openapi import install_openapi
from .problems import ApiProblem, install_handlers, problem_responses
from .schemas import (
    MAX_EMBED_CHARS,
    Health,
    ImageInfo,
    Readiness,
    UploadResponse,
)
from .search_routes import search_routes
from .uploads import CheckedImage, Uploader, check_image, safe_name
from .worker import DEFAULT_BATCH_WAIT, ModelWorker

log = logging.getLogger("fwd2bot_index.api")

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_QUEUE = 64  # model jobs waiting or running; more get 503 at once
DEFAULT_DECODE_SLOTS = 2  # image decodes at once (each holds one upload and one decoded picture)
DEFAULT_BATCH_WAIT_MS = DEFAULT_BATCH_WAIT * 1000  # how long a model turn under load may wait for more texts
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")

class AppState:
    """Everything the routes share: the service, the model worker, caches, locks, limits."""

    def __init__(self, service: Any, *, owns_service: bool, preload: bool, max_upload_bytes: int,
                 max_pixels: int, metrics: Metrics, max_queue: int = DEFAULT_MAX_QUEUE,
                 decode_slots: int = DEFAULT_DECODE_SLOTS, max_embed_chars: int = MAX_EMBED_CHARS,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS) -> None:
        self.service = service
        self.owns_service = owns_service
        self.preload = preload
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.max_embed_chars = max_embed_chars
        self.metrics = metrics
        # The worker waits for more texts only while admitted requests could still send one.
        self.worker = ModelWorker(service, on_batch=lambda n: metrics.model_batch.observe(n), max_queue=max_queue,
                                  batch_wait=batch_wait_ms / 1000, expected=lambda: self.in_flight.active)
        # Image decoding: at most `decode_slots` at once, each holding one upload (<= max_upload_bytes) and one
        # decoded picture (<= max_pixels x 4 bytes) until the model has encoded it; a few more may wait.
        self.decodes = Gate("the image decoding queue", decode_slots, max_waiting=4 * decode_slots)
        # Requests that search, embed, answer or upload: at most `max_queue` in flight, more get 503 at once. The
        # model queue bounds work for the model; this bounds everything else a flood makes the CPU do (parsing,
        # searching, answering), so a served request waits for at most `max_queue` others.
        self.in_flight = Gate("the request queue", max_queue, max_waiting=0)
        self._decode_slots = decode_slots
        self._decoder: ThreadPoolExecutor | None = None
        self.write_lock = threading.Lock()
        self.thumbnails = ThumbnailCache()
        self.uploader = Uploader(service, self.worker, self.write_lock)

    async def decode(self, data: bytes, name: str, declared: str | None) -> CheckedImage:
        """``check_image`` on one of ``decode_slots`` dedicated threads (call inside ``decodes.hold()``).

        Dedicated threads, not the shared pool: large decodes never take the pool's threads from the
        routes that need them (file reads, thumbnails, searches).
        """
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(self._decode_slots, thread_name_prefix="f2b-decode")
        call = functools.partial(check_image, data, name, declared, self.max_upload_bytes, self.max_pixels)
        return await asyncio.get_running_loop().run_in_executor(self._decoder, call)

    async def read_upload(self, file: UploadFile) -> CheckedImage:
        """An uploaded image read (at most ``max_upload_bytes`` + 1) and decoded (call inside ``decodes.hold()``)."""
        data = await file.read(self.max_upload_bytes + 1)
        return await self.decode(data, file.filename or "upload", file.content_type)

    async def admit(self) -> AsyncIterator[None]:
        """A route dependency: hold a place among the requests in flight (503 at once when none is free)."""
        async with self.in_flight.hold():
            yield

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)
            self._decoder = None

    @property
    def collection(self) -> Any:
        return self.service.collection

    def require_model(self) -> None:
        """503 while the model loads (or failed to load); starts the worker if lifespan did not."""
        self.worker.start(self.preload)
        if self.worker.state == "loading":
            raise ApiProblem(503, "the model is still loading; retry in a few seconds (GET /readyz says when it "
                                  "is ready)", "not-ready", headers={"Retry-After": "2"})
        if self.worker.state == "failed":
            raise ApiProblem(503, self.worker.detail or "the model could not be loaded", "model-failed")

    def require_writable(self) -> None:
        if not self.collection.writable:
            raise ApiProblem(409, "this server opened the collection read-only (another process may be indexing "
                                  "it); restart the server when that is done to add or remove images", "read-only")


def _open(path: str | os.PathLike[str], model: str | None, writable: bool | None, device: str, dtype: str) -> Any:
    from fwd2bot_index.collection.errors import CollectionLockedError
    from fwd2bot_index.service import open_service

    if writable is None:
        try:
            return open_service(collection=path, model=model, device=device, dtype=dtype, writable=True)
        except CollectionLockedError as exc:
            log.warning("%s; serving it read-only (uploads and deletes answer 409)", exc)
            writable = False
    return open_service(collection=path, model=model, device=device, dtype=dtype, writable=bool(writable))


def create_app(service_or_path: Any, api_key: str | None = None, protect_reads: bool = False,
               cors_origins: Sequence[str] = (), max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, preload: bool = True, model: str | None = None,
               writable: bool | None = None, device: str = "auto", dtype: str = "auto", host: str = "127.0.0.1",
               allowed_hosts: Sequence[str] = (), max_queue: int = DEFAULT_MAX_QUEUE,
               decode_slots: int = DEFAULT_DECODE_SLOTS, max_embed_chars: int = MAX_EMBED_CHARS,
               batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS) -> FastAPI:
    """Build the app over an ``ImageService`` or a collection folder (opened here, closed at shutdown).

    ``api_key``: required for writes, and for reads too with ``protect_reads``. ``cors_origins``: CORS is
    off unless origins are given. ``max_upload_bytes`` / ``max_pixels``: limits for uploaded images.
    ``preload``: load the model at startup (readiness waits for it); otherwise on first use.
    ``writable`` (path only): None tries write access and falls back to read-only if another process
    holds the collection's writer lock. ``host``: the address served; requests must name it, a loopback
    name, or one of ``allowed_hosts`` (``*.example.org`` patterns; ``*`` for any) in ``Host``, and
    state-changing requests from a browser must come from such an origin (see ``guard``).
    ``max_queue``: model jobs waiting or running before 503; ``decode_slots``: image decodes at once;
    ``max_embed_chars``: characters in all the texts of one /v1/embed call; ``batch_wait_ms``: how long
    the model thread, under load, waits for more concurrent text queries to encode together (0: never).
    """
    if isinstance(service_or_path, (str, os.PathLike)):
        service, owns = _open(service_or_path, model, writable, device, dtype), True
    else:
        service, owns = service_or_path, False
    metrics = Metrics()
    state = AppState(service, owns_service=owns, preload=preload, max_upload_bytes=max_upload_bytes,
                     max_pixels=max_pixels, metrics=metrics, max_queue=max_queue, decode_slots=decode_slots,
                     max_embed_chars=max_embed_chars, batch_wait_ms=batch_wait_ms)
    metrics.gauge("f2b_model_ready", "1 once the model has loaded.", lambda: state.worker.ready)
    metrics.gauge("f2b_collection_images", "Images in the collection.", lambda: len(state.collection))
    metrics.gauge("f2b_model_queue_jobs", "Model jobs waiting or running.", lambda: state.worker.pending)
    metrics.counter("f2b_model_queue_refused_total", "Model jobs refused with 503 (queue full).",
                    lambda: state.worker.refused)
    metrics.gauge("f2b_model_batch_wait_seconds", "How long a model turn under load may wait for more texts.",
                  lambda: state.worker.batch_wait)
    metrics.counter("f2b_model_text_turns_total", "Model turns that encoded texts.", lambda: state.worker.turns)
    metrics.counter("f2b_model_text_turns_waited_total", "Text turns that waited for more texts (load seen).",
                    lambda: state.worker.waited_turns)
    metrics.counter("f2b_model_answer_calls_total", "answer_batch calls for JSON answers.",
                    lambda: state.worker.answer_calls)
    metrics.counter("f2b_model_answers_total", "Questions those calls answered (answers per call = this / calls).",
                    lambda: state.worker.answers)
    metrics.gauge("f2b_image_decodes_in_progress", "Image decodes holding a slot.", lambda: state.decodes.active)
    metrics.gauge("f2b_requests_in_flight", "Search, embed, answer and upload requests in flight.",
                  lambda: state.in_flight.active)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.decodes.reset()
        state.in_flight.reset()
        state.worker.start(preload)
        try:
            yield
        finally:
            await run_in_threadpool(state.worker.stop)
            await run_in_threadpool(state.close)
            if owns:
                await run_in_threadpool(service.close)

    app = FastAPI(
        title="fwd2bot-index",
        version=_version(),
        description="Search an image collection by text, by example image, by a stored image or by a vector, "
                    "and ask questions about images answered from their stored summary tokens. Errors are "
                    "RFC 9457 problem objects. With an API key set, writes (and with protect_reads, reads) need "
                    "`X-API-Key: KEY` or `Authorization: Bearer KEY`.",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # the CDN pages; api/docs.py serves them from the package
        **_telemetry_options(),
    )
    app.router.route_class = PreparsedJsonRoute  # JSON bodies come parsed by JsonBodyMiddleware (``bodies``)
    install_docs(app)
    app.state.f2b = state
    install_handlers(app)
    read_deps, write_deps = _auth(api_key, protect_reads)
    heavy_reads, heavy_writes = [*read_deps, Depends(state.admit)], [*write_deps, Depends(state.admit)]
    # Added innermost first: metrics see every answer; Host and Origin are checked before anything else runs.
    app.add_middleware(JsonBodyMiddleware)  # keys and nesting checked, parsed off the loop (inside the size limit)
    app.add_middleware(BodyLimitMiddleware, limit=max_upload_bytes * 4 // 3 + 256 * 1024)
    app.add_middleware(AllowMiddleware, router=app.router)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type"])
    app.add_middleware(HostOriginMiddleware, allowed_hosts=default_hosts(host), extra_hosts=list(allowed_hosts),
                       cors_origins=list(cors_origins))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _page_routes(app)
    _health_routes(app, state, read_deps)
    search_routes(app, state, heavy_reads, read_deps)
    _image_routes(app, state, read_deps, write_deps, heavy_writes)
    model_routes(app, state, heavy_reads)
    openai_routes(app, state, heavy_reads)
    install_openapi(app, state)
    return app


def _telemetry_options() -> dict[str, Any]:
    """FastAPI's built-in OpenTelemetry hooks (FastAPI >= 0.16x), off unless the environment configures
    OpenTelemetry (an ``OTEL_*`` or ``FASTAPI_OTEL_*`` variable). With none configured they still asked
    the global providers on every request: about 80 us of the event loop's CPU per search, measured."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    if any(name.startswith(("OTEL_", "FASTAPI_OTEL_")) for name in os.environ):
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _version() -> str:
    try:
        from fwd2bot_index import __version__

        return str(__version__)
    except Exception:  # noqa: BLE001
        return "0"


# ---------------------------------------------------------------------------------------- auth


def _auth(api_key: str | None, protect_reads: bool) -> tuple[list[Any], list[Any]]:
    """Dependencies for reads and writes. Missing key -> 401, wrong key -> 403 (constant-time compare)."""
    if not api_key:
        return [], []
    expected = api_key.encode()
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key.")
    bearer = HTTPBearer(auto_error=False, description="The server's API key as a bearer token.")

    # Defaults, not Annotated: the annotations are strings here and could not see these locals.
    def check(key: str | None = Security(key_header),
              token: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        given = key or (token.credentials if token else None)
        if not given:
            raise ApiProblem(401, "this request needs the API key: send it as 'X-API-Key: KEY' or "
                                  "'Authorization: Bearer KEY'", "unauthorized",
                             headers={"WWW-Authenticate": 'Bearer realm="fwd2bot-index"'})
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            raise ApiProblem(403, "the API key is wrong", "forbidden")

    write = [Depends(check)]
    return (write if protect_reads else []), write


# ---------------------------------------------------------------------------------------- page


def _page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# ---------------------------------------------------------------------------------------- health


def _health_routes(app: FastAPI, state: AppState, read_deps: list[Any]) -> None:
    # Both are `async def`: they run on the event loop itself, so a busy model thread or a full
    # thread pool never delays them.
    @app.get("/healthz", response_model=Health, tags=["health"], summary="Liveness: the process answers")
    async def healthz() -> Health:
        return Health()

    @app.get("/readyz", response_model=Readiness, tags=["health"], summary="Readiness: the model has loaded",
             responses={503: {"model": Readiness, "description": "Model loading or failed"}})
    async def readyz() -> JSONResponse:
        state.worker.start(state.preload)
        body = Readiness(status=state.worker.state, model=state.service.model_name, detail=state.worker.detail)
        code = 200 if state.worker.ready else 503
        headers = {"Retry-After": "2"} if state.worker.state == "loading" else None
        return JSONResponse(body.model_dump(), status_code=code, headers=headers)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", dependencies=read_deps,
             response_class=PlainTextResponse, responses={**problem_responses(401, 403), 200: {
                 "content": {"text/plain": {"example": "f2b_searches_total{kind=\"text\"} 12\n"}}}})
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/collection", tags=["collection"], summary="Counts, model, strategy, bytes per image",
             dependencies=read_deps, responses={**problem_responses(401, 403), 200: {"content": {"application/json": {
                 "example": {"indexed": 1000, "failed": 2, "model": "demo", "strategy": "prompt+pool",
                             "bytes_per_image": 2112.0, "embed_dim": 128, "backend": "faiss", "ready": "ready"}}}}})
    def collection_info() -> JSONResponse:
        info = dict(state.service.info())
        info.pop("backend_options", None)
        info.update({"ready": state.worker.state, "writable": bool(state.collection.writable),
                     "model_load_seconds": state.worker.load_seconds})
        if state.worker.state == "ready":  # what the loaded model declares (the search page's default)
            info["verify_by_default"] = verify_by_default(state.service.model)
        return JSONResponse(jsonable_encoder(info))


# ---------------------------------------------------------------------------------------- images


def _image_info(row: Any) -> ImageInfo:
    return ImageInfo(id=int(row.id), path=str(row.path), paths=[str(p) for p in row.paths], hash=str(row.hash),
                     size=int(row.size), metadata=dict(row.metadata or {}), added=getattr(row, "added", None),
                     thumbnail_url=f"/v1/images/{int(row.id)}/thumbnail", file_url=f"/v1/images/{int(row.id)}/file")


def _image_routes(app: FastAPI, state: AppState, read_deps: list[Any], write_deps: list[Any],
                  upload_deps: list[Any]) -> None:
    @app.post("/v1/images", response_model=UploadResponse, status_code=201, tags=["images"], dependencies=upload_deps,
              summary="Upload an image and add it to the collection (409 if its content is already there)",
              responses=problem_responses(401, 403, 409, 413, 415, 422, 503))
    async def upload(file: Annotated[UploadFile, File(description="A JPEG, PNG, WebP, GIF, BMP or TIFF file.")],
                     response: Response) -> UploadResponse:
        state.require_writable()
        async with state.decodes.hold():
            image = await state.read_upload(file)
            state.require_model()
            image_id, created = await run_in_threadpool(state.uploader.add, image)
            del image
        if not created:
            state.metrics.uploads.inc("duplicate")
            raise ApiProblem(409, f"this image is already in the collection as id {image_id}", "duplicate",
                             existing_id=image_id, url=f"/v1/images/{image_id}")
        state.metrics.uploads.inc("added")
        response.headers["Location"] = f"/v1/images/{image_id}"
        row = await run_in_threadpool(catalog_row, state.collection, image_id)
        return UploadResponse(created=True, image=_image_info(row))

    @app.get("/v1/images/{image_id}", response_model=ImageInfo, tags=["images"], dependencies=read_deps,
             summary="The record of one image", responses=problem_responses(401, 403, 404, 422))
    def get_image(image_id: IdParam) -> ImageInfo:
        return _image_info(catalog_row(state.collection, image_id))

    @app.delete("/v1/images/{image_id}", status_code=204, tags=["images"], dependencies=write_deps,
                summary="Remove an image (all its paths) from the collection; files are not deleted, "
                        "except the server's own copy of an uploaded image",
                responses=problem_responses(401, 403, 404, 409, 422))
    def delete_image(image_id: IdParam) -> Response:
        state.require_writable()
        with state.write_lock:
            row = catalog_row(state.collection, image_id)
            state.service.remove([int(image_id)])
            state.thumbnails.forget(int(image_id))
            state.uploader.forget_files(list(row.paths))
        return Response(status_code=204)

    @app.get("/v1/images/{image_id}/thumbnail", tags=["images"], dependencies=read_deps,
             summary="A JPEG thumbnail of the indexed file (made on the fly, cached)",
             responses={**problem_responses(401, 403, 404, 422), 200: {"content": {"image/jpeg": {}}},
                        304: {"description": "Not modified (ETag matched)"}})
    def thumbnail(image_id: IdParam,
                  size: Annotated[int, Query(ge=16, le=1024, description="Longest side in pixels.")] = 256,
                  if_none_match: Annotated[str | None, Header()] = None) -> Response:
        data, etag = state.thumbnails.get(state.collection, image_id, size)
        headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
        if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/v1/images/{image_id}/file", tags=["images"], dependencies=read_deps,
             summary="The original file, if it still holds the indexed content",
             responses={**problem_responses(401, 403, 404, 422), 200: {"content": {"image/*": {}}}})
    def original(image_id: IdParam) -> Response:
        verified = read_verified(state.collection, image_id)
        name = safe_name(os.path.basename(verified.path)) or f"image-{image_id}"
        return Response(verified.data, media_type=verified.media_type, headers={
            "Content-Disposition": f'inline; filename="{name}"', "Cache-Control": "private, max-age=3600",
            "Content-Security-Policy": "default-src 'none'; sandbox"})
