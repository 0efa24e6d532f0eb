"""The FastAPI app factory: REST routes over the service facade, the search page, metrics.

Concurrency model. Reads (search by id or vector, image records, files, thumbnails) run in the
thread pool at the same time; the collection guards its own state. Every model call goes to one
model thread (``ModelWorker``), which batches concurrent text queries. Writes (upload, delete) hold
one write lock, so the collection sees one writer at a time. The model loads in the background at
startup: ``/healthz`` answers at once, ``/readyz`` says 503 until the model is ready, and routes
that need the model answer 503 with ``Retry-After`` meanwhile (searches by id or vector work).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Header, Query, Response, Security, UploadFile
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .docs import install_docs
from .files import ThumbnailCache, catalog_row, read_verified
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .problems import PROBLEM_MEDIA_TYPE, ApiProblem, install_handlers
from .schemas import (
    MAX_ID,
    MAX_TEXT,
    AskRequest,
    AskResponse,
    EmbedRequest,
    EmbedResponse,
    Health,
    ImageInfo,
    Problem,
    Readiness,
    SearchHit,
    SearchRequest,
    SearchResponse,
    UploadResponse,
)
from .uploads import CheckedImage, Uploader, check_image, safe_name
from .worker import ModelWorker

log = logging.getLogger("fwd2bot_index.api")

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SSE_EXAMPLE = ('event: token\ndata: {"text": "red"}\n\nevent: done\n'
               'data: {"id": 17, "question": "What color is the circle?", "answer": "red"}\n\n')

IdParam = Annotated[int, PathParam(ge=0, le=MAX_ID, description="Image id (from a search result).",
                                   examples=[17])]


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem responses a route can give."""
    words = {400: "Invalid request", 401: "API key missing", 403: "API key wrong", 404: "Not found",
             409: "Conflict (duplicate, read-only collection)", 413: "Upload too large (bytes or pixels)",
             415: "Not a supported image type", 422: "Invalid input or undecodable image",
             503: "Model not ready yet (see Retry-After)"}
    return {code: {"model": Problem, "description": words.get(code, "Error"),
                   "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for code in codes}


class AppState:
    """Everything the routes share: the service, the model worker, caches, locks, limits."""

    def __init__(self, service: Any, *, owns_service: bool, preload: bool, max_upload_bytes: int,
                 max_pixels: int, metrics: Metrics) -> None:
        self.service = service
        self.owns_service = owns_service
        self.preload = preload
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.metrics = metrics
        self.worker = ModelWorker(service, on_batch=lambda n: metrics.model_batch.observe(n))
        self.write_lock = threading.Lock()
        self.thumbnails = ThumbnailCache()
        self.uploader = Uploader(service, self.worker, self.write_lock)

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
               writable: bool | None = None, device: str = "auto", dtype: str = "auto") -> FastAPI:
    """Build the app over an ``ImageService`` or a collection folder (opened here, closed at shutdown).

    ``api_key``: required for writes, and for reads too with ``protect_reads``. ``cors_origins``: CORS is
    off unless origins are given. ``max_upload_bytes`` / ``max_pixels``: limits for uploaded images.
    ``preload``: load the model at startup (readiness waits for it); otherwise on first use.
    ``writable`` (path only): None tries write access and falls back to read-only if another process
    holds the collection's writer lock.
    """
    if isinstance(service_or_path, (str, os.PathLike)):
        service, owns = _open(service_or_path, model, writable, device, dtype), True
    else:
        service, owns = service_or_path, False
    metrics = Metrics()
    state = AppState(service, owns_service=owns, preload=preload, max_upload_bytes=max_upload_bytes,
                     max_pixels=max_pixels, metrics=metrics)
    metrics.gauge("f2b_model_ready", "1 once the model has loaded.", lambda: state.worker.ready)
    metrics.gauge("f2b_collection_images", "Images in the collection.", lambda: len(state.collection))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.worker.start(preload)
        try:
            yield
        finally:
            await run_in_threadpool(state.worker.stop)
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
    )
    install_docs(app)
    app.state.f2b = state
    install_handlers(app)
    read_deps, write_deps = _auth(api_key, protect_reads)
    app.add_middleware(BodyLimitMiddleware, limit=max_upload_bytes * 4 // 3 + 256 * 1024)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _page_routes(app)
    _health_routes(app, state, read_deps)
    _search_routes(app, state, read_deps)
    _image_routes(app, state, read_deps, write_deps)
    _model_routes(app, state, read_deps)
    return app


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
    @app.get("/healthz", response_model=Health, tags=["health"], summary="Liveness: the process answers")
    def healthz() -> Health:
        return Health()

    @app.get("/readyz", response_model=Readiness, tags=["health"], summary="Readiness: the model has loaded",
             responses={503: {"model": Readiness, "description": "Model loading or failed"}})
    def readyz() -> JSONResponse:
        state.worker.start(state.preload)
        body = Readiness(status=state.worker.state, model=state.service.model_name, detail=state.worker.detail)
        code = 200 if state.worker.ready else 503
        headers = {"Retry-After": "2"} if state.worker.state == "loading" else None
        return JSONResponse(body.model_dump(), status_code=code, headers=headers)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", dependencies=read_deps,
             response_class=PlainTextResponse, responses={**_problems(401, 403), 200: {
                 "content": {"text/plain": {"example": "f2b_searches_total{kind=\"text\"} 12\n"}}}})
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/collection", tags=["collection"], summary="Counts, model, strategy, bytes per image",
             dependencies=read_deps, responses={**_problems(401, 403), 200: {"content": {"application/json": {
                 "example": {"indexed": 1000, "failed": 2, "model": "demo", "strategy": "prompt+pool",
                             "bytes_per_image": 2112.0, "embed_dim": 128, "backend": "faiss", "ready": "ready"}}}}})
    def collection_info() -> JSONResponse:
        info = dict(state.service.info())
        info.pop("backend_options", None)
        info.update({"ready": state.worker.state, "writable": bool(state.collection.writable),
                     "model_load_seconds": state.worker.load_seconds})
        return JSONResponse(jsonable_encoder(info))


# ---------------------------------------------------------------------------------------- search


def _hits(hits: Sequence[Any]) -> list[SearchHit]:
    return [SearchHit(id=int(h.id), path=str(h.path), score=float(h.score), metadata=dict(h.metadata or {}),
                      thumbnail_url=f"/v1/images/{int(h.id)}/thumbnail", url=f"/v1/images/{int(h.id)}")
            for h in hits]


def _run_search(state: AppState, **kwargs: Any) -> list[Any]:
    """``service.search`` with the collection's input errors (bad filter, huge number) as 400."""
    try:
        return state.service.search(**kwargs)
    except (ValueError, OverflowError) as exc:
        raise ApiProblem(400, str(exc) or "invalid search", "bad-request") from None


def _finite(values: list[float]) -> list[float]:
    """A query vector must hold float32-representable finite numbers (else a 400, not a cast warning)."""
    if not all(math.isfinite(x) and abs(x) < 3.0e38 for x in values):
        raise ApiProblem(400, "the embedding must contain finite numbers within float32 range", "bad-request")
    return values


def _parse_filter(raw: str | None) -> dict[str, Any] | None:
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise ApiProblem(400, "'filter' must be a JSON object, e.g. {\"split\": \"test\"}", "bad-request") from None
    if not isinstance(value, dict):
        raise ApiProblem(400, "'filter' must be a JSON object, e.g. {\"split\": \"test\"}", "bad-request")
    return value


async def _read_upload(state: AppState, file: UploadFile) -> CheckedImage:
    data = await file.read(state.max_upload_bytes + 1)
    return await run_in_threadpool(check_image, data, file.filename or "upload", file.content_type,
                                   state.max_upload_bytes, state.max_pixels)


def _search_routes(app: FastAPI, state: AppState, read_deps: list[Any]) -> None:
    metrics = state.metrics

    @app.post("/v1/search", response_model=SearchResponse, tags=["search"], dependencies=read_deps,
              summary="Search by text, by a stored image (like) or by an embedding",
              responses=_problems(400, 401, 403, 404, 422, 503))
    async def search(body: SearchRequest) -> SearchResponse:
        started = time.perf_counter()
        common = {"k": body.k, "filter": body.filter, "offset": body.offset, "min_score": body.min_score}
        if body.query is not None:
            kind = "text"
            if not body.query.strip():
                raise ApiProblem(400, "the text query is empty", "bad-request")
            state.require_model()
            vector = await state.worker.embed_text(body.query)
            hits = await run_in_threadpool(_run_search, state, embedding=vector.tolist(), **common)
        elif body.like is not None:
            kind = "like"
            hits = await run_in_threadpool(_run_search, state, like=int(body.like), **common)
        else:
            kind = "embedding"
            hits = await run_in_threadpool(_run_search, state, embedding=_finite(body.embedding or []), **common)
        took = time.perf_counter() - started
        metrics.searches.inc(kind)
        metrics.search_latency.observe(took, kind)
        return SearchResponse(kind=kind, k=body.k, offset=body.offset, took_ms=round(took * 1000, 3),
                              results=_hits(hits))

    @app.post("/v1/search/image", response_model=SearchResponse, tags=["search"], dependencies=read_deps,
              summary="Search by an uploaded example image (multipart)",
              responses=_problems(400, 401, 403, 413, 415, 422, 503))
    async def search_image(
        file: Annotated[UploadFile, File(description="The example image.")],
        k: Annotated[int, Form(ge=1, le=500)] = 10,
        offset: Annotated[int, Form(ge=0, le=100_000)] = 0,
        min_score: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None,
        filter: Annotated[str | None, Form(description="Metadata filter as a JSON object.")] = None,
    ) -> SearchResponse:
        started = time.perf_counter()
        conditions = _parse_filter(filter)
        image = await _read_upload(state, file)
        state.require_model()
        vectors = await state.worker.run(state.service.encode_images, [image.picture])
        hits = await run_in_threadpool(_run_search, state, embedding=[float(x) for x in vectors[0]], k=k,
                                       filter=conditions, offset=offset, min_score=min_score)
        took = time.perf_counter() - started
        metrics.searches.inc("image")
        metrics.search_latency.observe(took, "image")
        return SearchResponse(kind="image", k=k, offset=offset, took_ms=round(took * 1000, 3), results=_hits(hits))


# ---------------------------------------------------------------------------------------- images


def _image_info(row: Any) -> ImageInfo:
    return ImageInfo(id=int(row.id), path=str(row.path), paths=[str(p) for p in row.paths], hash=str(row.hash),
                     size=int(row.size), metadata=dict(row.metadata or {}), added=getattr(row, "added", None),
                     thumbnail_url=f"/v1/images/{int(row.id)}/thumbnail", file_url=f"/v1/images/{int(row.id)}/file")


def _image_routes(app: FastAPI, state: AppState, read_deps: list[Any], write_deps: list[Any]) -> None:
    @app.post("/v1/images", response_model=UploadResponse, status_code=201, tags=["images"], dependencies=write_deps,
              summary="Upload an image and add it to the collection (409 if its content is already there)",
              responses=_problems(401, 403, 409, 413, 415, 422, 503))
    async def upload(file: Annotated[UploadFile, File(description="A JPEG, PNG, WebP, GIF, BMP or TIFF file.")],
                     response: Response) -> UploadResponse:
        state.require_writable()
        image = await _read_upload(state, file)
        state.require_model()
        image_id, created = await run_in_threadpool(state.uploader.add, image)
        if not created:
            state.metrics.uploads.inc("duplicate")
            raise ApiProblem(409, f"this image is already in the collection as id {image_id}", "duplicate",
                             existing_id=image_id, url=f"/v1/images/{image_id}")
        state.metrics.uploads.inc("added")
        response.headers["Location"] = f"/v1/images/{image_id}"
        row = await run_in_threadpool(catalog_row, state.collection, image_id)
        return UploadResponse(created=True, image=_image_info(row))

    @app.get("/v1/images/{image_id}", response_model=ImageInfo, tags=["images"], dependencies=read_deps,
             summary="The record of one image", responses=_problems(401, 403, 404, 422))
    def get_image(image_id: IdParam) -> ImageInfo:
        return _image_info(catalog_row(state.collection, image_id))

    @app.delete("/v1/images/{image_id}", status_code=204, tags=["images"], dependencies=write_deps,
                summary="Remove an image (all its paths) from the collection; files are not deleted, "
                        "except the server's own copy of an uploaded image",
                responses=_problems(401, 403, 404, 409, 422))
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
             responses={**_problems(401, 403, 404, 422), 200: {"content": {"image/jpeg": {}}},
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
             responses={**_problems(401, 403, 404, 422), 200: {"content": {"image/*": {}}}})
    def original(image_id: IdParam) -> Response:
        verified = read_verified(state.collection, image_id)
        name = safe_name(os.path.basename(verified.path)) or f"image-{image_id}"
        return Response(verified.data, media_type=verified.media_type, headers={
            "Content-Disposition": f'inline; filename="{name}"', "Cache-Control": "private, max-age=3600",
            "Content-Security-Policy": "default-src 'none'; sandbox"})


# ---------------------------------------------------------------------------------------- model


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _stream_answer(state: AppState, image_id: int, question: str, max_new_tokens: int) -> StreamingResponse:
    """Server-sent events: ``token`` ({"text"}) per piece, then ``done`` ({"answer"}) or ``error`` (a problem).

    The model thread drains the whole generation even if the client leaves, so the model is never
    used by two calls at once.
    """
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    end = object()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def generate() -> None:
        try:
            for piece in state.service.ask(image_id, question, max_new_tokens=max_new_tokens, stream=True):
                put(str(piece))
        except Exception as exc:  # noqa: BLE001 - becomes an SSE error event
            put(exc)
        finally:
            put(end)

    state.worker.call(generate)
    state.metrics.answers.inc("stream")

    async def events() -> AsyncIterator[bytes]:
        yield b": answer stream\n\n"
        text: list[str] = []
        while True:
            item = await pieces.get()
            if item is end:
                break
            if isinstance(item, Exception):
                from .problems import classify, problem_body

                known = classify(item)
                if known is None:
                    log.error("answer stream failed: %r", item)
                    known = ApiProblem(500, "the answer failed; the details are in the server log", "internal-error")
                yield _sse("error", problem_body(known.status, known.detail, known.kind))
                return
            text.append(item)
            yield _sse("token", {"text": item})
        yield _sse("done", {"id": image_id, "question": question, "answer": "".join(text).strip()})

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _model_routes(app: FastAPI, state: AppState, read_deps: list[Any]) -> None:
    ask_responses = {**_problems(400, 401, 403, 404, 422, 503), 200: {
        "description": "The answer (JSON), or server-sent events when streaming",
        "content": {"text/event-stream": {"schema": {"type": "string"}, "example": SSE_EXAMPLE}}}}

    def precheck(image_id: int, question: str) -> None:
        catalog_row(state.collection, image_id)
        if not question.strip():
            raise ApiProblem(400, "the question is empty", "bad-request")
        state.require_model()

    @app.post("/v1/images/{image_id}/ask", response_model=AskResponse, tags=["answers"], dependencies=read_deps,
              summary="Answer a question about an image from its stored tokens (JSON, or SSE with stream=true)",
              responses=ask_responses)
    async def ask(image_id: IdParam, body: AskRequest) -> Any:
        await run_in_threadpool(precheck, image_id, body.question)
        if body.stream:
            return _stream_answer(state, image_id, body.question, body.max_new_tokens)
        answer = await state.worker.run(state.service.ask, image_id, body.question,
                                        max_new_tokens=body.max_new_tokens)
        state.metrics.answers.inc("json")
        return AskResponse(id=image_id, question=body.question, answer=str(answer))

    @app.get("/v1/images/{image_id}/ask", tags=["answers"], dependencies=read_deps,
             summary="The same answer as server-sent events, for EventSource (GET)",
             response_class=StreamingResponse,
             responses={**_problems(400, 401, 403, 404, 422, 503), 200: {
                 "content": {"text/event-stream": {"schema": {"type": "string"}, "example": SSE_EXAMPLE}}}})
    async def ask_stream(image_id: IdParam,
                         question: Annotated[str, Query(min_length=1, max_length=MAX_TEXT)],
                         max_new_tokens: Annotated[int, Query(ge=1, le=256)] = 32) -> StreamingResponse:
        await run_in_threadpool(precheck, image_id, question)
        return _stream_answer(state, image_id, question, max_new_tokens)

    @app.post("/v1/embed", response_model=EmbedResponse, tags=["embeddings"], dependencies=read_deps,
              summary="Embed texts or images (base64 files) into the collection's vector space",
              responses=_problems(400, 401, 403, 413, 415, 422, 503))
    async def embed(body: EmbedRequest) -> EmbedResponse:
        if body.texts is not None:
            if any(len(t) > MAX_TEXT or not t.strip() for t in body.texts):
                raise ApiProblem(400, f"every text must be non-empty and at most {MAX_TEXT} characters", "bad-request")
            state.require_model()
            vectors = await state.worker.run(state.service.encode_texts, list(body.texts))
        else:
            pictures = []
            for n, encoded in enumerate(body.images or []):
                try:
                    data = base64.b64decode(encoded, validate=True)
                except (binascii.Error, ValueError):
                    raise ApiProblem(400, f"images[{n}] is not valid base64", "bad-request") from None
                image = await run_in_threadpool(check_image, data, f"images[{n}]", None, state.max_upload_bytes,
                                                state.max_pixels)
                pictures.append(image.picture)
            state.require_model()
            vectors = await state.worker.run(state.service.encode_images, pictures)
        rows = [[float(x) for x in row] for row in vectors]
        return EmbedResponse(model=str(state.service.model_name), strategy=str(state.service.strategy.name),
                             dim=len(rows[0]) if rows else 0, embeddings=rows)
