"""``POST /v1/embeddings``: OpenAI's embeddings API over the collection's model (thin; the shape lives in
``fwd2bot_index.openai_compat``).

Texts are encoded on the model thread in chunks, images (data URLs) are decoded in the decode slots
with the upload limits, as ``/v1/embed`` does; ``id:N`` returns the stored embedding of image N.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.concurrency import run_in_threadpool

from fwd2bot_index.openai_compat import (EmbeddingsInputError, count_tokens, embeddings_response, model_names,
                                         parse_inputs)

from .files import catalog_row
from .limits import result_or_drop
from .model_routes import CHUNK_PIXELS, _text_chunks
from .problems import ApiProblem, problem_responses
from .schemas import NOT_BLANK

if TYPE_CHECKING:
    from .app import AppState

MAX_INPUTS = 2048  # OpenAI's own limit on inputs per request
MAX_INPUT_CHARS = 16 * 1024 * 1024  # one input: a text, or a data URL (the upload limit decides its bytes)


InputText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_INPUT_CHARS, pattern=NOT_BLANK)]


class EmbeddingsRequest(BaseModel):
    """OpenAI's request. Other fields OpenAI defines are accepted: ``user`` is ignored, ``dimensions`` must
    equal the model's dimension when given (400 otherwise: embeddings are not truncated)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"model": "demo", "input": ["a red circle", "id:12", "data:image/png;base64,iVBORw0KGgo..."]}]})
    model: str = Field(..., min_length=1, max_length=4096,
                       description="The model this server runs (GET /v1/collection says which; its folder name works too).")
    input: InputText | Annotated[list[InputText], Field(min_length=1, max_length=MAX_INPUTS)] = Field(
        ..., description="A text or a list of them. Extension: an image as a data URL (data:image/png;base64,...) "
                         "or a stored image as 'id:N'.")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes.")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"]
    embedding: list[float] | str
    index: int


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingsUsage


def openai_routes(app: FastAPI, state: AppState, read_deps: list[Any]) -> None:
    """Register ``POST /v1/embeddings`` (``read_deps``: the same admission as ``/v1/embed``)."""

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, tags=["embeddings"], dependencies=read_deps,
              summary="OpenAI-compatible embeddings (texts; images as data URLs or 'id:N' as an extension)",
              responses=problem_responses(400, 401, 403, 404, 413, 415, 422, 503))
    async def embeddings(body: EmbeddingsRequest, request: Request) -> dict[str, Any]:
        served = str(state.service.model_name)
        if body.model not in model_names(served):
            raise ApiProblem(404, f"model {body.model!r} is not served here; this server runs {served!r}",
                             "model-not-found")
        try:
            inputs = parse_inputs(body.input)
        except EmbeddingsInputError as exc:
            raise ApiProblem(400, str(exc), "bad-request") from None
        if len(inputs) > MAX_INPUTS:
            raise ApiProblem(413, f"{len(inputs)} inputs; one call may hold at most {MAX_INPUTS}", "too-many-inputs")
        texts = [(n, i.text) for n, i in enumerate(inputs) if i.kind == "text"]
        chars = sum(len(t) for _, t in texts)
        if chars > state.max_embed_chars:
            raise ApiProblem(413, f"the texts hold {chars:,} characters in all; one call may hold at most "
                                  f"{state.max_embed_chars:,}: split them over several calls", "too-much-text")
        dim = int(state.collection.manifest.embed_dim)
        asked = (body.model_extra or {}).get("dimensions")
        if asked is not None and asked != dim:
            raise ApiProblem(400, f"dimensions {asked}: this model's embeddings have {dim} (they are "
                                  "not truncated); leave dimensions out", "bad-request")
        rows = np.zeros((len(inputs), dim), dtype=np.float32)
        for n, item in enumerate(inputs):
            if item.kind == "id":
                catalog_row(state.collection, item.image_id)  # 404 for an unknown id
                rows[n] = await run_in_threadpool(state.service.query_vector, like=item.image_id)
        if texts or any(i.kind == "image" for i in inputs):
            state.require_model()
        done = 0
        for chunk in _text_chunks([t for _, t in texts]):
            vectors = await result_or_drop(request, state.worker.call(state.service.encode_texts, chunk))
            for (n, _), vector in zip(texts[done:done + len(chunk)], vectors):
                rows[n] = vector
            done += len(chunk)
        images = [(n, i) for n, i in enumerate(inputs) if i.kind == "image"]
        while images:  # one decode slot holds at most CHUNK_PIXELS of pictures (plus one more)
            async with state.decodes.hold():
                batch, pixels = [], 0
                while images and pixels < CHUNK_PIXELS:
                    n, item = images.pop(0)
                    picture = await state.decode(item.data, f"input[{n}]", item.media_type)
                    batch.append((n, picture.picture))
                    pixels += picture.width * picture.height
                job = state.worker.call(state.service.encode_images, [p for _, p in batch])
                vectors = await result_or_drop(request, job)
                for (n, _), vector in zip(batch, vectors):
                    rows[n] = vector
                del batch
        tokens = await run_in_threadpool(count_tokens, state.service, [t for _, t in texts]) if texts else 0
        return embeddings_response(rows, served, tokens, body.encoding_format)
