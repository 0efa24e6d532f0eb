"""Errors as RFC 9457 problem objects, and the mapping from library exceptions to HTTP statuses.

Every error leaves the server as ``application/problem+json`` with ``type``, ``title``, ``status`` and
``detail``. Library errors carry messages written for users (they name the id or file and say what to
do), so they are passed through; anything unexpected becomes a bare 500 whose detail hides internals
(the traceback goes to the server log only).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .schemas import Problem

log = logging.getLogger("fwd2bot_index.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://fwd2bot-index.invalid/problems/"


class ApiProblem(Exception):
    """An error raised by a route with a chosen status, a stable problem ``kind`` and a user message."""

    def __init__(self, status: int, detail: str, kind: str | None = None, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or _slug(status)
        self.headers = headers or {}
        self.extra = extra


def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem responses a route can give."""
    words = {400: "Invalid request", 401: "API key missing", 403: "API key wrong", 404: "Not found",
             409: "Conflict (duplicate, read-only collection)",
             413: "Too large: the body, an upload (bytes or pixels), or the texts of one call",
             415: "Not a supported image type", 422: "Invalid input or undecodable image",
             503: "Model not ready yet, or the server is busy: retry after Retry-After seconds"}
    return {code: {"model": Problem, "description": words.get(code, "Error"),
                   "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for code in codes}


def _slug(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "-")
    except ValueError:
        return "error"


def problem_body(status: int, detail: str, kind: str | None = None, instance: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The JSON object of a problem (also used inside server-sent ``error`` events)."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": PROBLEM_BASE + (kind or _slug(status)), "title": title, "status": status,
                            "detail": detail}
    if instance:
        body["instance"] = instance
    body.update(extra)
    return body


def problem_response(status: int, detail: str, kind: str | None = None, instance: str | None = None,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(problem_body(status, detail, kind, instance, **extra), status_code=status,
                        media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def classify(exc: BaseException) -> ApiProblem | None:
    """Map a library exception to a problem, or None when it is unexpected (-> 500)."""
    from fwd2bot_index.collection.errors import (
        CollectionError,
        CollectionLockedError,
        CollectionMismatchError,
        CollectionNotFoundError,
        CollectionReadOnlyError,
    )
    from fwd2bot_index.imaging import ImageDecodeError, ImageTooLargeError
    from fwd2bot_index.service import NotFoundError, ServiceError

    from .limits import ClientGone, Overloaded

    if isinstance(exc, ApiProblem):
        return exc
    if isinstance(exc, Overloaded):
        return ApiProblem(503, str(exc), "overloaded", headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ClientGone):
        return ApiProblem(499, "the client closed the request before its answer was ready", "client-closed-request")
    if isinstance(exc, NotFoundError):
        return ApiProblem(404, str(exc), "not-found")
    if isinstance(exc, ServiceError):
        return ApiProblem(400, str(exc), "bad-request")
    if isinstance(exc, ImageTooLargeError):  # refused from its header: too many pixels, too elongated, too much memory
        return ApiProblem(413, f"the image cannot be used: {exc.reason}", "image-too-large")
    if isinstance(exc, ImageDecodeError):
        return ApiProblem(422, f"the image cannot be used: {exc.reason}", "undecodable-image")
    if isinstance(exc, CollectionReadOnlyError):
        return ApiProblem(409, "this server opened the collection read-only; restart it with write access "
                               "(no other process may be indexing the collection) to change it", "read-only")
    if isinstance(exc, (CollectionLockedError, CollectionMismatchError)):
        return ApiProblem(409, str(exc), "collection-conflict")
    if isinstance(exc, CollectionNotFoundError):
        return ApiProblem(503, str(exc), "collection-missing")
    if isinstance(exc, CollectionError):
        return ApiProblem(503, str(exc), "collection-unavailable")
    return None


def library_errors() -> tuple[type[BaseException], ...]:
    """The library's own error classes, whose messages are written for users."""
    from fwd2bot_index.collection.errors import CollectionError
    from fwd2bot_index.imaging import ImageDecodeError
    from fwd2bot_index.service import ServiceError

    from .limits import ClientGone, Overloaded

    return (ServiceError, ImageDecodeError, CollectionError, Overloaded, ClientGone)


def install_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem object."""

    @app.exception_handler(ApiProblem)
    async def _api_problem(request: Request, exc: ApiProblem) -> JSONResponse:
        return problem_response(exc.status, exc.detail, exc.kind, request.url.path, exc.headers, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path} (see /docs for the API)"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path} (see /docs for the API)"
        return problem_response(exc.status_code, detail, None, request.url.path, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        where = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5]) or "invalid request"
        return problem_response(422, f"the request is invalid: {where}", "validation-error", request.url.path,
                                errors=errors)

    async def _library(request: Request, exc: Exception) -> JSONResponse:
        known = classify(exc)
        assert known is not None
        return problem_response(known.status, known.detail, known.kind, request.url.path, known.headers)

    for cls in library_errors():
        app.add_exception_handler(cls, _library)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        known = classify(exc)
        if known is not None:
            return problem_response(known.status, known.detail, known.kind, request.url.path, known.headers)
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "the server failed to handle this request; the details are in the server log",
                                "internal-error", request.url.path)
