"""Request and response bodies of the REST API, with the examples shown in the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_ID = 2**63 - 1
MAX_TEXT = 2000

ImageId = Field(ge=0, le=MAX_ID, description="An image id from a search result (int64).")


def _example(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class Health(BaseModel):
    model_config = _example({"status": "ok"})
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """``ready`` once the model has loaded; ``loading`` before; ``failed`` if it could not load."""

    model_config = _example({"status": "ready", "model": "demo", "detail": None})
    status: Literal["ready", "loading", "failed"]
    model: str | None = None
    detail: str | None = None


class SearchRequest(BaseModel):
    """Exactly one of ``query`` (text), ``embedding`` (a vector) or ``like`` (a stored image id)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"query": "a red circle above a blue square", "k": 10},
            {"query": "a green triangle", "k": 5, "filter": {"split": "test", "width>=": 64}, "min_score": 0.1},
            {"like": 42, "k": 8},
            {"embedding": [0.12, -0.03, 0.5], "k": 3, "offset": 3},
        ]},
    )
    query: str | None = Field(None, min_length=1, max_length=MAX_TEXT, description="Text to search for.")
    embedding: list[float] | None = Field(None, min_length=1, max_length=16384,
                                          description="A query vector of the collection's dimension.")
    like: int | None = Field(None, ge=0, le=MAX_ID, description="More like this stored image (excluded itself).")
    k: int = Field(10, ge=1, le=500, description="How many results to return.")
    offset: int = Field(0, ge=0, le=100_000, description="Skip this many results first (pagination).")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="Drop results whose cosine is lower.")
    filter: dict[str, Any] | None = Field(
        None, description='Metadata conditions, all must hold: {"key": value}, {"key>=": 3}, '
                          '{"key": {"gte": 1, "lt": 5}}, {"key": {"in": [..]}}, {"path": "*/holiday/*"}.')

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchRequest":
        given = [name for name in ("query", "embedding", "like") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'query', 'embedding' or 'like'"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


class SearchHit(BaseModel):
    model_config = _example({
        "id": 17, "path": "/photos/2021/beach.jpg", "score": 0.412, "metadata": {"width": 640, "height": 480},
        "thumbnail_url": "/v1/images/17/thumbnail", "url": "/v1/images/17",
    })
    id: int
    path: str = Field(description="Absolute path of the indexed file.")
    score: float = Field(description="Cosine similarity with the query (higher is better).")
    metadata: dict[str, Any]
    thumbnail_url: str
    url: str


class SearchResponse(BaseModel):
    model_config = _example({
        "kind": "text", "k": 10, "offset": 0, "took_ms": 4.2,
        "results": [{"id": 17, "path": "/photos/2021/beach.jpg", "score": 0.412, "metadata": {},
                     "thumbnail_url": "/v1/images/17/thumbnail", "url": "/v1/images/17"}],
    })
    kind: Literal["text", "image", "like", "embedding"]
    k: int
    offset: int
    took_ms: float
    results: list[SearchHit]


class ImageInfo(BaseModel):
    model_config = _example({
        "id": 17, "path": "/photos/2021/beach.jpg", "paths": ["/photos/2021/beach.jpg"],
        "hash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "size": 48213,
        "metadata": {"width": 640, "height": 480}, "added": "2024-05-01T10:00:00Z",
        "thumbnail_url": "/v1/images/17/thumbnail", "file_url": "/v1/images/17/file",
    })
    id: int
    path: str
    paths: list[str]
    hash: str
    size: int
    metadata: dict[str, Any]
    added: str | None = None
    thumbnail_url: str
    file_url: str


class UploadResponse(BaseModel):
    model_config = _example({"created": True, "image": ImageInfo.model_config["json_schema_extra"]["examples"][0]})
    created: bool
    image: ImageInfo


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"question": "What color is the circle?", "max_new_tokens": 32},
        {"question": "How many shapes are there?", "stream": True},
    ]})
    question: str = Field(min_length=1, max_length=MAX_TEXT)
    max_new_tokens: int = Field(32, ge=1, le=256)
    stream: bool = Field(False, description="Answer as server-sent events (token, done, error).")


class AskResponse(BaseModel):
    model_config = _example({"id": 17, "question": "What color is the circle?", "answer": "red"})
    id: int
    question: str
    answer: str


class EmbedRequest(BaseModel):
    """Exactly one of ``texts`` or ``images`` (base64-encoded image files)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"texts": ["a red circle", "two blue squares"]},
        {"images": ["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"]},
    ]})
    texts: list[str] | None = Field(None, min_length=1, max_length=64)
    images: list[str] | None = Field(None, min_length=1, max_length=16, description="Base64 image files.")

    @model_validator(mode="after")
    def _one_kind(self) -> "EmbedRequest":
        if (self.texts is None) == (self.images is None):
            raise ValueError("give exactly one of 'texts' or 'images'")
        return self


class EmbedResponse(BaseModel):
    model_config = _example({"model": "demo", "strategy": "prompt+pool", "dim": 3,
                             "embeddings": [[0.6, 0.0, 0.8], [0.0, 1.0, 0.0]]})
    model: str
    strategy: str
    dim: int
    embeddings: list[list[float]]


class Problem(BaseModel):
    """RFC 9457 problem details; some problems add fields (``errors``, ``existing_id``)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "type": "https://fwd2bot-index.invalid/problems/not-found", "title": "Not Found", "status": 404,
        "detail": "no image with id 99 in this collection", "instance": "/v1/images/99",
    }]})
    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
