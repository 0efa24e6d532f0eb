"""JSON request bodies: refused when over-keyed or over-nested before anything parses them, and parsed
off the event loop.

Why: FastAPI reads a JSON body with ``json.loads`` on the event loop and then validates it there. A 6 MB
body of 500,000 unknown keys took 12.5 s to come back as a 422 (0.3 s of parsing, the rest one
validation error per key), and ``/healthz`` stalled all that time. No body this API accepts comes near
those numbers: the largest filter has 64 keys of at most 6 operators, so ``MAX_JSON_KEYS`` (1,000) and
``MAX_JSON_DEPTH`` (32) refuse nothing a client can send on purpose. The size of a body is bounded
outside (``BodyLimitMiddleware``: base64 images in /v1/embed make large bodies legitimate).

``JsonBodyMiddleware`` reads a JSON body (``application/json`` or ``+json``) whole, counts its keys and
nesting outside strings (``json_shape``: numpy over 256 KiB slices, so a hostile body never holds the
interpreter for long; a body with few colons and brackets needs no count at all), answers 422 when
either is over the limit, and otherwise parses it: on a worker thread when it is larger than
``INLINE_BYTES`` (a small body parses in microseconds, less than the hop to a thread costs). The parsed
value travels in the request scope; ``PreparsedJsonRoute`` hands it to FastAPI, which then does not
parse the body again on the loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import anyio.to_thread
import numpy as np
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .middleware import send_problem

MAX_JSON_KEYS = 1_000
MAX_JSON_DEPTH = 32
INLINE_BYTES = 16 * 1024
PARSED_KEY = "f2b.parsed_json"
_SLICE = 1 << 18
_QUOTE, _BACKSLASH, _COLON = ord('"'), ord("\\"), ord(":")
_OPENERS, _CLOSERS = (ord("{"), ord("[")), (ord("}"), ord("]"))


def json_shape(body: bytes, max_keys: int | None = None, max_depth: int | None = None) -> tuple[int, int]:
    """``(keys, deepest nesting)`` of a JSON text: colons and brackets outside strings (escapes honoured).

    Exact for valid JSON; for invalid JSON some count, and the parser refuses it afterwards. Works slice by
    slice with the string, escape and depth state carried across, so memory stays ~10 MB whatever the body;
    stops at the first slice that passes ``max_keys`` or ``max_depth`` (the counts are then partial).
    """
    data = np.frombuffer(body, dtype=np.uint8)
    keys = depth = deepest = 0
    in_string, run = 0, 0  # inside a string at the slice's start; backslashes ending the previous slice
    for start in range(0, len(data), _SLICE):
        a = data[start:start + _SLICE]
        n = len(a)
        idx = np.arange(n, dtype=np.int64)
        slash = a == _BACKSLASH
        last = np.maximum.accumulate(np.where(slash, -1, idx))  # last non-backslash at or before i
        before = np.empty(n, dtype=np.int64)  # backslashes right before i
        before[0] = run
        before[1:] = np.where(last[:-1] >= 0, idx[:-1] - last[:-1], idx[1:] + run)
        quote = (a == _QUOTE) & (before % 2 == 0)
        toggles = np.cumsum(quote, dtype=np.int64) + in_string
        outside = (toggles % 2 == 0) & ~quote
        keys += int(np.count_nonzero(outside & (a == _COLON)))
        opens = outside & ((a == _OPENERS[0]) | (a == _OPENERS[1]))
        closes = outside & ((a == _CLOSERS[0]) | (a == _CLOSERS[1]))
        levels = np.cumsum(opens.astype(np.int64) - closes, dtype=np.int64) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        in_string = int(toggles[-1] % 2)
        run = int(n - 1 - last[-1]) if last[-1] >= 0 else n + run
        if (max_keys is not None and keys > max_keys) or (max_depth is not None and deepest > max_depth):
            break
    return keys, deepest


def inspect_json(body: bytes, max_keys: int = MAX_JSON_KEYS, max_depth: int = MAX_JSON_DEPTH) -> tuple[str | None, Any]:
    """``(problem, value)``: why the body is refused (None if it is not), and its parsed value (``_INVALID``
    when it is not valid JSON: FastAPI then answers its usual 422 for it)."""
    if body.count(b":") > max_keys or body.count(b"{") + body.count(b"[") > max_depth:
        keys, depth = json_shape(body, max_keys, max_depth)  # only bodies that might be over a limit are counted
        if keys > max_keys:
            return (f"the JSON body has more than {max_keys:,} keys, more than any request to this server "
                    "can hold; send only the fields the API documents"), None
        if depth > max_depth:
            return (f"the JSON body is nested more than {max_depth} deep, deeper than any request to this server "
                    "can be; send only the fields the API documents"), None
    try:
        return None, json.loads(body)
    except (ValueError, RecursionError):
        return None, _INVALID


_INVALID = object()


def _is_json(scope: Scope) -> bool:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))
    return False


class JsonBodyMiddleware:
    """Check and parse JSON request bodies before the app sees them (see the module text)."""

    def __init__(self, app: ASGIApp, max_keys: int = MAX_JSON_KEYS, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app, self.max_keys, self.max_depth = app, max_keys, max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS") or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left before its body was complete: nothing to answer
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except HTTPException as exc:  # the body-size limit outside this middleware stopped it
            await send_problem(send, scope, exc.status_code, str(exc.detail), "request-too-large")
            return
        body = b"".join(chunks)
        if len(body) <= INLINE_BYTES:
            problem, value = inspect_json(body, self.max_keys, self.max_depth)
        else:
            problem, value = await anyio.to_thread.run_sync(inspect_json, body, self.max_keys, self.max_depth)
        if problem:
            await send_problem(send, scope, 422, problem, "json-too-complex")
            return
        if value is not _INVALID and body:
            scope[PARSED_KEY] = (body, value)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only a disconnect can come (see limits.result_or_drop)

        await self.app(scope, replay, send)


class PreparsedJsonRoute(APIRoute):
    """An ``APIRoute`` that gives FastAPI the body ``JsonBodyMiddleware`` already parsed off the loop
    (Starlette's ``Request`` keeps a parsed body in ``_body`` / ``_json``; FastAPI reads it from there)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            parsed = request.scope.pop(PARSED_KEY, None)
            if parsed is not None:
                request._body, request._json = parsed  # type: ignore[attr-defined]
            return await handler(request)

        return route_handler
