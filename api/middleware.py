"""ASGI middleware: request-body limit, metrics per route template, security headers, OPTIONS and Allow."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics
from .problems import PROBLEM_MEDIA_TYPE, problem_body

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class BodyLimitMiddleware:
    """Refuse request bodies over ``limit`` bytes with 413, before they are read or spooled to disk.

    A declared ``Content-Length`` over the limit is answered at once; a body sent without one (or
    longer than declared) is counted as it arrives and stopped when it passes the limit.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await send_problem(send, scope, 400, "the Content-Length header is not a number")
                return
            if length > self.limit:
                await send_problem(send, scope, 413, self._message(length), "request-too-large")
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, self._message(seen))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: int) -> str:
        return (f"the request body is {size:,} bytes or more; this server accepts at most {self.limit:,} "
                "(see max_upload_bytes)")


class MetricsMiddleware:
    """Count requests and time them per route template; add security headers to every response."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in dict(SECURITY_HEADERS)]
                message = {**message, "headers": headers + SECURITY_HEADERS}
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        finally:
            route = _route_template(scope)
            method = scope.get("method", "GET")
            self.metrics.requests.inc(method, route, str(status["code"]))
            self.metrics.latency.observe(time.perf_counter() - started, method, route)


class AllowMiddleware:
    """``OPTIONS`` answers 204 with ``Allow``; every 405 lists *all* the methods of its path in ``Allow``.

    Starlette's own 405 names only the methods of the first route matching the path, so a path with
    GET and DELETE in two routes said ``Allow: GET``. CORS preflights (with CORS configured) are
    answered by the CORS middleware outside this one.
    """

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    def methods(self, scope: Scope) -> list[str]:
        found: set[str] = set()
        for route in self.router.routes:
            methods = getattr(route, "methods", None)
            if methods is None:  # a mount (the static files): GET and HEAD
                match, _ = route.matches(scope)
                methods = {"GET", "HEAD"} if match is not Match.NONE else set()
            elif route.matches({**scope, "method": next(iter(methods))})[0] is Match.NONE:
                continue
            found |= set(methods)
        return sorted(found | {"OPTIONS"}) if found else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "OPTIONS":
            allowed = self.methods(scope)
            if allowed:
                await send({"type": "http.response.start", "status": 204,
                            "headers": [(b"allow", ", ".join(allowed).encode())]})
                await send({"type": "http.response.body", "body": b""})
                return

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", ", ".join(self.methods(scope)).encode())]}
            await send(message)

        await self.app(scope, receive, wrapped)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    raw = scope.get("path", "")
    return "/static/{file}" if raw.startswith("/static/") else "unmatched"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def send_problem(send: Send, scope: Scope, status: int, detail: str, kind: str | None = None) -> None:
    body = json.dumps(problem_body(status, detail, kind, scope.get("path"))).encode()
    headers: list[Any] = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
