"""Routes that need the model for more than one query vector: answers (JSON or SSE) and /v1/embed.

Every model call goes through the app's bounded model queue (a full queue is a 503 at once) and is
dropped if its client leaves before it starts. Concurrent JSON answers are batched by the model
thread (see ``worker``). /v1/embed cuts its texts into model jobs of bounded
size (``CHUNK_CHARS``), so a long call shares the model thread with searches and stops when its
client goes; its images are decoded and encoded in groups of bounded size (``CHUNK_PIXELS``) under
the decode gate, so one call holds at most one group of decoded pictures.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from .files import catalog_row
from .limits import result_or_drop
from .problems import ApiProblem, classify, problem_body, problem_responses
from .schemas import MAX_ID, MAX_TEXT, NOT_BLANK, AskRequest, AskResponse, EmbedRequest, EmbedResponse, not_blank

if TYPE_CHECKING:
    from .app import AppState

log = logging.getLogger("fwd2bot_index.api")

CHUNK_CHARS = 2000  # characters of text per model job in /v1/embed (short texts share one job)
CHUNK_PIXELS = 4_000_000  # decoded pixels per model job in /v1/embed (small images share one job)
SSE_EXAMPLE = ('event: token\ndata: {"text": "red"}\n\nevent: done\n'
               'data: {"id": 17, "question": "What color is the circle?", "answer": "red"}\n\n')
IdParam = Annotated[int, PathParam(ge=0, le=MAX_ID, description="Image id (from a search result).", examples=[17])]


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _stream_answer(state: AppState, image_id: int, question: str, max_new_tokens: int) -> StreamingResponse:
    """Server-sent events: ``token`` ({"text"}) per piece, then ``done`` ({"answer"}) or ``error`` (a problem).

    If the client leaves before the model thread reaches this answer, the job is dropped; if it leaves
    while the answer is generated, the generation stops at its next piece of text (the answering loop runs
    in the model thread and computes no more tokens once it is no longer iterated).
    """
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    end = object()
    left = threading.Event()  # set when the client is gone (or the stream ended)

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def generate() -> None:
        try:
            for piece in state.service.ask(image_id, question, max_new_tokens=max_new_tokens, stream=True):
                if left.is_set():
                    break  # leaving the loop closes the answer's generator: no more tokens are computed
                put(str(piece))
        except Exception as exc:  # noqa: BLE001 - becomes an SSE error event
            put(exc)
        finally:
            put(end)

    job = state.worker.call(generate)  # a full queue raises here: a 503 before the stream starts
    state.metrics.answers.inc("stream")

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b": answer stream\n\n"
            text: list[str] = []
            while True:
                item = await pieces.get()
                if item is end:
                    break
                if isinstance(item, Exception):
                    known = classify(item)
                    if known is None:
                        log.error("answer stream failed: %r", item)
                        known = ApiProblem(500, "the answer failed; the details are in the server log",
                                           "internal-error")
                    yield _sse("error", problem_body(known.status, known.detail, known.kind))
                    return
                text.append(item)
                yield _sse("token", {"text": item})
            yield _sse("done", {"id": image_id, "question": question, "answer": "".join(text).strip()})
        finally:
            left.set()
            job.cancel()  # the client left (or the stream ended): drop the job if it has not started

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _text_chunks(texts: list[str]) -> list[list[str]]:
    """Texts in order, cut into model jobs of at most CHUNK_CHARS characters (a longer text alone)."""
    chunks: list[list[str]] = []
    size = 0
    for text in texts:
        if not chunks or size + len(text) > CHUNK_CHARS:
            chunks.append([])
            size = 0
        chunks[-1].append(text)
        size += len(text)
    return chunks


def _base64(n: int, encoded: str) -> bytes:
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ApiProblem(400, f"images[{n}] is not valid base64", "bad-request") from None


def model_routes(app: FastAPI, state: AppState, read_deps: list[Any]) -> None:
    sse_200 = {"description": "Server-sent events: `token` events, then `done` (or `error`); see the schema",
               "content": {"text/event-stream": {"example": SSE_EXAMPLE}}}

    def precheck(image_id: int) -> None:
        catalog_row(state.collection, image_id)
        state.require_model()

    @app.post("/v1/images/{image_id}/ask", response_model=AskResponse, tags=["answers"], dependencies=read_deps,
              summary="Answer a question about an image from its stored tokens (JSON, or SSE with stream=true)",
              responses={**problem_responses(400, 401, 403, 404, 422, 503), 200: {
                  **sse_200, "description": "The answer (JSON), or server-sent events with stream=true"}})
    async def ask(image_id: IdParam, body: AskRequest, request: Request) -> Any:
        await run_in_threadpool(precheck, image_id)
        if body.stream:
            return _stream_answer(state, image_id, body.question, body.max_new_tokens)
        # The tokens are read here (collection reads run side by side); the model thread answers queued
        # asks with the same max_new_tokens together in one answer_batch call.
        tokens = await run_in_threadpool(state.collection.get_tokens, image_id)
        job = state.worker.answer(tokens, body.question, body.max_new_tokens, state.service.strategy.tokens)
        answer = await result_or_drop(request, job)
        state.metrics.answers.inc("json")
        return AskResponse(id=image_id, question=body.question, answer=str(answer),
                           warning=state.service.demo_world()["warning"])

    @app.get("/v1/images/{image_id}/ask", tags=["answers"], dependencies=read_deps,
             summary="The same answer as server-sent events, for EventSource (GET)",
             response_class=StreamingResponse,
             responses={**problem_responses(400, 401, 403, 404, 422, 503), 200: sse_200})
    async def ask_stream(image_id: IdParam,
                         question: Annotated[str, Query(min_length=1, max_length=MAX_TEXT, pattern=NOT_BLANK),
                                             AfterValidator(not_blank)],
                         max_new_tokens: Annotated[int, Query(ge=1, le=256)] = 32) -> StreamingResponse:
        await run_in_threadpool(precheck, image_id)
        return _stream_answer(state, image_id, question, max_new_tokens)

    @app.post("/v1/embed", response_model=EmbedResponse, tags=["embeddings"], dependencies=read_deps,
              summary="Embed texts or images (base64 files) into the collection's vector space",
              responses=problem_responses(400, 401, 403, 413, 415, 422, 503))
    async def embed(body: EmbedRequest, request: Request) -> EmbedResponse:
        rows: list[list[float]] = []
        if body.texts is not None:
            chars = sum(len(t) for t in body.texts)
            if chars > state.max_embed_chars:
                raise ApiProblem(413, f"the texts hold {chars:,} characters in all; one call may hold at most "
                                      f"{state.max_embed_chars:,}: split them over several calls", "too-much-text")
            state.require_model()
            for chunk in _text_chunks(body.texts):
                rows += (await result_or_drop(request, state.worker.call(state.service.encode_texts, chunk))).tolist()
        else:
            blobs = [_base64(n, encoded) for n, encoded in enumerate(body.images)]
            n = 0
            while n < len(blobs):
                # One slot holds at most CHUNK_PIXELS of decoded pictures plus one more picture.
                async with state.decodes.hold():
                    pictures, pixels = [], 0
                    while n < len(blobs) and pixels < CHUNK_PIXELS:
                        image = await state.decode(blobs[n], f"images[{n}]", None)
                        pictures.append(image.picture)
                        pixels, n = pixels + image.width * image.height, n + 1
                    state.require_model()
                    job = state.worker.call(state.service.encode_images, pictures)
                    del pictures, image
                    rows += (await result_or_drop(request, job)).tolist()
        rows = [[float(x) for x in row] for row in rows]
        return EmbedResponse(model=str(state.service.model_name), strategy=str(state.service.strategy.name),
                             dim=len(rows[0]) if rows else 0, embeddings=rows)
