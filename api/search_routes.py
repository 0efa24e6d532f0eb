"""Search routes: /v1/search (text, like, embedding) and /v1/search/image.

The hot path of the server. Admission to the requests in flight is checked inline (``Gate.hold_now``)
rather than through a dependency; a text query without a filter is encoded and searched in its model
batch (``ModelWorker.search_text``); other searches run on the event loop when they cost well under a
millisecond (``SearchCost``), else in the thread pool; the JSON is written directly. Each of these was
measured with bench/bench_service.py (server CPU per request). A verified search (``verify``) re-ranks
its candidates by the model's relevance, scored on the model thread (``_verified``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from fwd2bot_index.verification import VerifiedHits, candidate_count, refusal, rerank

from .filters import FilterInvalid, check_filter
from .limits import result_or_drop
from .problems import ApiProblem, problem_responses
from .schemas import SearchRequest, SearchResponse, check_text

if TYPE_CHECKING:
    from .app import AppState



def _search_body(kind: str, k: int, offset: int, took: float, hits: Sequence[Any], warning: str | None = None) -> bytes:
    """The ``SearchResponse`` JSON (hits as ``SearchHit``) written directly, without building and
    re-validating pydantic models per hit (a measurable share of a search's CPU at hundreds per second).
    Hits of a verified search (``VerifiedHits``) carry ``relevance``, the body ``verified`` and ``dropped``."""
    verified = isinstance(hits, VerifiedHits)
    results = [{"id": int(h.id), "path": str(h.path), "score": float(h.score), "metadata": dict(h.metadata or {}),
                "thumbnail_url": f"/v1/images/{int(h.id)}/thumbnail", "url": f"/v1/images/{int(h.id)}"}
               | ({"relevance": h.relevance} if verified else {})
               for h in hits]
    body = {"kind": kind, "k": k, "offset": offset, "took_ms": round(took * 1000, 3), "results": results}
    if verified:
        body.update(verified=hits.verified, dropped=hits.dropped)
    if warning:
        body["warning"] = warning  # the demo model on images outside its world (see demo_notice)
    return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def _verified(state: AppState, request: Request, body: SearchRequest, hits: Sequence[Any]) -> VerifiedHits:
    """Re-rank a text search's candidates by the model's relevance (``fwd2bot_index.verification``): the
    top ``verify`` hits' stored tokens are read off the loop, then scored on the model thread together
    with the verifications queued beside them (``ModelWorker.relevance``)."""
    reason = refusal(state.service)
    if reason:
        raise ApiProblem(400, reason, "bad-request")
    head = list(hits[:body.verify])
    tokens = await run_in_threadpool(state.service.collection.get_tokens_batch, [h.id for h in head]) if head else []
    job = state.worker.relevance(list(tokens), body.query, state.service.strategy.tokens)
    relevance = await _bad_request(result_or_drop(request, job))
    return rerank(hits, relevance, body.k, body.offset, body.min_relevance)


class SearchCost:
    """A running average of how long ``service.search`` takes, to decide where the next one runs.

    A search that takes well under a millisecond of CPU (FAISS over a small or HNSW index, no filter) costs
    less on the event loop than the hop to a pool thread and back (measured about 0.1 ms of the loop's
    CPU plus the thread's wake-up); a slow one (a large flat index, a filter that reads SQLite) goes to
    the pool so the loop keeps answering. Starts "slow": the first searches measure.
    """

    INLINE_BELOW = 0.0005  # seconds

    def __init__(self) -> None:
        self.average = float("inf")

    @property
    def inline(self) -> bool:
        return self.average < self.INLINE_BELOW

    def run(self, state: AppState, **kwargs: Any) -> list[Any]:
        started = time.thread_time()  # CPU, not wall time: waiting for the GIL under load is not the search's cost
        try:
            return _run_search(state, **kwargs)
        finally:
            took = time.thread_time() - started
            self.average = took if self.average == float("inf") else 0.9 * self.average + 0.1 * took


def _run_search(state: AppState, **kwargs: Any) -> list[Any]:
    """``service.search`` with the collection's input errors (bad filter, huge number) as 400."""
    try:
        return state.service.search(**kwargs)
    except (ValueError, OverflowError) as exc:
        raise ApiProblem(400, str(exc) or "invalid search", "bad-request") from None


async def _bad_request(search: Any) -> Any:
    """Await a search; the collection's input errors become 400, as in ``_run_search``."""
    try:
        return await search
    except (ValueError, OverflowError) as exc:
        raise ApiProblem(400, str(exc) or "invalid search", "bad-request") from None


def _direction(values: list[float]) -> list[float]:
    """The query vector scaled to unit length in float64 (first by its largest component, so neither
    1e300 nor 1e-300 over- or underflows): any finite vector that is not all zero is a direction."""
    vector = np.asarray(values, dtype=np.float64)
    largest = float(np.max(np.abs(vector))) if vector.size else 0.0
    if not largest:
        raise ApiProblem(400, "the embedding is all zeros; a query vector needs a direction", "bad-request")
    vector = vector / largest
    return (vector / np.linalg.norm(vector)).tolist()


def _parse_filter(raw: str | None) -> dict[str, Any] | None:
    """The multipart ``filter`` field: a JSON object following the same schema as in /v1/search (else 422)."""
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
        check_text(value, "filter")
        return check_filter(value)
    except FilterInvalid as exc:
        raise ApiProblem(422, str(exc), "validation-error") from None
    except ValueError as exc:
        detail = str(exc) if "surrogate" in str(exc) else "'filter' must be a JSON object, e.g. {\"split\": \"test\"}"
        raise ApiProblem(422, detail, "validation-error") from None


def search_routes(app: FastAPI, state: AppState, read_deps: list[Any], auth_deps: list[Any]) -> None:
    """POST /v1/search (auth only: admission is checked inline) and POST /v1/search/image (``read_deps``)."""
    metrics = state.metrics
    cost = {kind: SearchCost() for kind in ("text", "like", "embedding")}

    # The hot route: admission is checked inline (``hold_now``) instead of through the ``admit`` dependency,
    # text queries are searched in their model batch, other searches run on the loop when cheap
    # (``SearchCost``), and the JSON is written directly.
    @app.post("/v1/search", response_model=SearchResponse, tags=["search"], dependencies=auth_deps,
              summary="Search by text, by a stored image (like) or by an embedding",
              responses=problem_responses(400, 401, 403, 404, 422, 503))
    async def search(body: SearchRequest, request: Request) -> Response:
        started = time.perf_counter()
        with state.in_flight.hold_now():
            # a verified search takes the candidates it re-ranks from the top (see verification.rerank)
            k, offset = (candidate_count(body.verify, body.k, body.offset), 0) if body.verify else (body.k, body.offset)
            common = {"k": k, "filter": body.filter, "offset": offset, "min_score": body.min_score}
            if body.query is not None and body.filter is None:
                kind = "text"  # encoded and searched in the model thread's batch (see ModelWorker.search_text)
                state.require_model()
                job = state.worker.search_text(body.query, k, offset, body.min_score)
                hits = await _bad_request(result_or_drop(request, job))
            else:
                if body.query is not None:
                    kind = "text"
                    state.require_model()
                    vector = await result_or_drop(request, state.worker.encode_text(body.query))
                    common["embedding"] = vector.tolist()
                elif body.like is not None:
                    kind, common["like"] = "like", int(body.like)
                else:
                    kind, common["embedding"] = "embedding", _direction(body.embedding)
                runner = cost[kind]
                if runner.inline and body.filter is None:
                    hits = runner.run(state, **common)
                else:
                    hits = await run_in_threadpool(runner.run, state, **common)
            if body.verify:
                hits = await _verified(state, request, body, hits)
        took = time.perf_counter() - started
        metrics.searches.inc(kind)
        metrics.search_latency.observe(took, kind)
        return Response(_search_body(kind, body.k, body.offset, took, hits, state.service.demo_world()["warning"]),
                        media_type="application/json")

    @app.post("/v1/search/image", response_model=SearchResponse, tags=["search"], dependencies=read_deps,
              summary="Search by an uploaded example image (multipart)",
              responses=problem_responses(400, 401, 403, 413, 415, 422, 503))
    async def search_image(
        request: Request,
        file: Annotated[UploadFile, File(description="The example image.")],
        k: Annotated[int, Form(ge=1, le=500)] = 10,
        offset: Annotated[int, Form(ge=0, le=100_000)] = 0,
        # Form fields cannot be null: left out means no limit / no filter (the defaults are not validated).
        min_score: Annotated[float, Form(ge=-1.0, le=1.0)] = None,  # type: ignore[assignment]
        filter: Annotated[str, Form(description="Metadata filter as a JSON object.")] = None,  # type: ignore[assignment]
    ) -> Response:
        started = time.perf_counter()
        conditions = _parse_filter(filter)
        async with state.decodes.hold():  # the decoded picture lives until the model has encoded it
            image = await state.read_upload(file)
            state.require_model()
            vectors = await result_or_drop(request, state.worker.call(state.service.encode_images, [image.picture]))
            del image
        hits = await run_in_threadpool(_run_search, state, embedding=[float(x) for x in vectors[0]], k=k,
                                       filter=conditions, offset=offset, min_score=min_score)
        took = time.perf_counter() - started
        metrics.searches.inc("image")
        metrics.search_latency.observe(took, "image")
        return Response(_search_body("image", k, offset, took, hits, state.service.demo_world()["warning"]),
                        media_type="application/json")
