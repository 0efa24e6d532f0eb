"""Request and response bodies of the REST API, with the examples shown in the OpenAPI schema."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from fwd2bot_index.verification import MAX_VERIFY

from .filters import FILTER_SCHEMA, check_filter

MAX_ID = 2**53 - 1  # ids a JSON client (JavaScript too) holds exactly; the collection counts up from 1
MAX_TEXT = 2000
MAX_EMBED_TEXTS = 16  # texts per /v1/embed call
MAX_EMBED_IMAGES = 8  # images per /v1/embed call (decoded and encoded one at a time)
MAX_EMBED_CHARS = 8000  # characters in all the texts of one /v1/embed call (the default; see create_app)
NOT_BLANK = r"\S"  # at least one character that is not white space

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


def _lone_surrogate(value: Any, where: str = "body") -> str | None:
    """Where in a decoded JSON value a lone surrogate (like "\\ud800") hides, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _lone_surrogate(k, f"{where} key") or _lone_surrogate(v, f"{where}.{k}")
            if found:
                return found
    elif isinstance(value, list):
        for n, v in enumerate(value):
            found = _lone_surrogate(v, f"{where}[{n}]")
            if found:
                return found
    return None


def check_text(value: Any, where: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate cannot be encoded, tokenized or stored)."""
    found = _lone_surrogate(value, where)
    if found:
        raise ValueError(f"{found} holds a lone surrogate (e.g. \\ud800), which is not valid Unicode text; "
                         "send UTF-8 text")


class Input(BaseModel):
    """A request body: strict JSON types (``0`` is not ``false``), no unknown fields, valid Unicode only.

    ``regex_engine="python-re"`` makes ``pattern`` mean what it means to Python's ``re``, the engine
    schema-driven test generators use, so the schema and the server agree on every string.
    """

    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_text(data, "body")
        return data


def _exactly_one(names: tuple[str, ...], examples: list[dict[str, Any]],
                 needs: dict[str, list[str]] | None = None) -> Any:
    """Schema extra: ``oneOf`` on which field is given, and no ``default: null`` on those fields (null is refused);
    ``needs``: fields that may only come with others (``dependentRequired``), also not nullable."""

    def extra(schema: dict[str, Any]) -> None:
        schema["examples"] = examples
        schema["oneOf"] = [{"required": [n]} for n in names]
        for n in [*names, *(needs or {})]:
            schema["properties"][n].pop("default", None)
        if needs:
            schema["dependentRequired"] = needs

    return extra


Filter = Annotated[dict[str, Any], WithJsonSchema(FILTER_SCHEMA), AfterValidator(check_filter)]
Base64 = Annotated[str, Field(json_schema_extra={"format": "byte"})]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT, pattern=NOT_BLANK)]


def not_blank(value: str) -> str:
    """``NOT_BLANK`` as Python's ``re`` reads it, for parameters outside a body model (whose regex engine is
    pydantic's default, where a few control characters such as \\x1c are not white space)."""
    if not re.search(NOT_BLANK, value):
        raise ValueError("must hold a character that is not white space")
    return value
Component = Annotated[float, Field(allow_inf_nan=False)]


def _integral(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; strict mode would refuse it, so it becomes 3 first."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_integral)]


class SearchRequest(Input):
    """Exactly one of ``query`` (text), ``embedding`` (a vector) or ``like`` (a stored image id)."""

    model_config = ConfigDict(
        json_schema_extra=_exactly_one(("query", "embedding", "like"), [
            {"query": "a red circle above a blue square", "k": 10},
            {"query": "a green triangle", "k": 5, "filter": {"split": "test", "width>=": 64}, "min_score": 0.1},
            {"like": 42, "k": 8},
            {"embedding": [0.12, -0.03, 0.5], "k": 3, "offset": 3},
            {"query": "a red circle at the top left", "k": 10, "verify": 20, "min_relevance": 0.5},
        ], needs={"verify": ["query"], "min_relevance": ["verify"]}),
    )
    # Optional but not nullable: left out means None (the default is not validated); null is refused.
    query: Text = Field(None, description="Text to search for (not blank).")  # type: ignore[assignment]
    embedding: list[Component] = Field(  # type: ignore[assignment]
        None, min_length=1, max_length=16384,
        description="A query vector of the collection's dimension, not all zero (only its direction counts).")
    like: Integer = Field(None, ge=0, le=MAX_ID,  # type: ignore[assignment]
                      description="More like this stored image (excluded itself).")
    k: Integer = Field(10, ge=1, le=500, description="How many results to return.")
    offset: Integer = Field(0, ge=0, le=100_000, description="Skip this many results first (pagination).")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="Drop results whose cosine is lower.")
    filter: Filter | None = None
    # Optional but not nullable, like ``query``: left out means no verification.
    verify: Integer = Field(  # type: ignore[assignment]
        None, ge=1, le=MAX_VERIFY,
        description=f"Text queries: verify the top N hits (at most {MAX_VERIFY}): the model checks each from its "
                    "stored tokens, results are re-ranked by its P(yes) and carry it as 'relevance'.")
    min_relevance: float = Field(  # type: ignore[assignment]
        None, ge=0.0, le=1.0, allow_inf_nan=False,
        description="With 'verify': drop hits whose relevance is lower (0.5: the model says yes more than no); "
                    "no result left means no good match.")

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchRequest":
        given = [name for name in ("query", "embedding", "like") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'query', 'embedding' or 'like'"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.verify is not None and self.query is None:
            raise ValueError("'verify' needs a text 'query': the model checks whether each hit shows that text")
        if self.min_relevance is not None and self.verify is None:
            raise ValueError("'min_relevance' needs 'verify' (the relevance comes from verifying the top N hits)")
        return self


class SearchHit(BaseModel):
    model_config = _example({
        "id": 17, "path": "/photos/2021/beach.jpg", "score": 0.412, "metadata": {"width": 640, "height": 480},
        "thumbnail_url": "/v1/images/17/thumbnail", "url": "/v1/images/17",
    })
    id: int
    path: str = Field(description="Absolute path of the indexed file.")
    score: float = Field(description="Cosine similarity with the query (higher is better).")
    relevance: float | None = Field(
        None, description="With 'verify': the model's P(yes) that the image shows the query, from its stored tokens "
                          "(null: beyond the verified top N).")
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
    verified: int | None = Field(None, description="With 'verify': how many top hits the model checked.")
    dropped: int | None = Field(None, description="With 'min_relevance': how many verified hits it cut.")
    warning: str | None = Field(None, description="Present when the results are not to be trusted: the collection is "
                                "on the `demo` model and holds images from outside its shapes world.")


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


class AskRequest(Input):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"question": "What color is the circle?", "max_new_tokens": 32},
        {"question": "How many shapes are there?", "stream": True},
    ]})
    question: Text
    max_new_tokens: Integer = Field(32, ge=1, le=256)
    stream: bool = Field(False, description="Answer as server-sent events (token, done, error).")


class AskResponse(BaseModel):
    model_config = _example({"id": 17, "question": "What color is the circle?", "answer": "red"})
    id: int
    question: str
    answer: str
    warning: str | None = Field(None, description="Present when the answer is not to be trusted: the collection is "
                                "on the `demo` model and holds images from outside its shapes world.")


class EmbedRequest(Input):
    """Exactly one of ``texts`` or ``images`` (base64-encoded image files)."""

    model_config = ConfigDict(json_schema_extra=_exactly_one(("texts", "images"), [
        {"texts": ["a red circle", "two blue squares"]},
        {"images": ["iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"]},
    ]))
    texts: list[Text] = Field(  # type: ignore[assignment]
        None, min_length=1, max_length=MAX_EMBED_TEXTS, description=f"Texts to embed: at most {MAX_EMBED_TEXTS}, and at most {MAX_EMBED_CHARS:,} characters in all "
                    "(more is a 413: split them over several calls).")
    images: list[Base64] = Field(  # type: ignore[assignment]
        None, min_length=1, max_length=MAX_EMBED_IMAGES,
        description="Base64-encoded image files (JPEG, PNG, WebP, GIF, BMP or TIFF).")

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
