"""OpenAI's embeddings shape (``POST /v1/embeddings``) over a collection's model, without a web framework.

Why: tools that speak OpenAI's API (LangChain, LlamaIndex, the ``openai`` client, vector databases'
"OpenAI-compatible" connectors) can then embed with this model unchanged. The request is
``{"model", "input"}``; the response ``{"object": "list", "data": [{"object": "embedding", "embedding",
"index"}], "model", "usage"}``. Inputs are texts, as OpenAI's are; this service adds two kinds of string
as a documented extension: an image as a data URL (``data:image/png;base64,...``) and an image already
in the collection as ``id:12`` (its stored embedding, no model call). Token arrays are refused.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+);base64,(.*)$", re.S)
_ID_REF = re.compile(r"^id:(\d{1,18})$")


class EmbeddingsInputError(ValueError):
    """An input the endpoint cannot embed; the message names it (``input[3]: ...``)."""


@dataclass(frozen=True)
class EmbeddingInput:
    """One input, classified: a text, an image file's bytes (from a data URL), or a stored image's id."""

    kind: Literal["text", "image", "id"]
    text: str = ""
    data: bytes = b""
    media_type: str = ""
    image_id: int = 0


def parse_inputs(value: Any) -> list[EmbeddingInput]:
    """``input`` as OpenAI takes it (a string or a list of strings) -> classified inputs, in order."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise EmbeddingsInputError("input must be a string or a non-empty list of strings")
    out: list[EmbeddingInput] = []
    for n, item in enumerate(items):
        where = "input" if isinstance(value, str) else f"input[{n}]"
        if not isinstance(item, str):
            raise EmbeddingsInputError(f"{where}: a string (text, a data:image/...;base64 URL or id:N); "
                                       "token arrays are not supported")
        if (url := _DATA_URL.match(item)) is not None:
            try:
                data = base64.b64decode(url.group(2), validate=True)
            except (binascii.Error, ValueError):
                raise EmbeddingsInputError(f"{where}: the data URL's base64 is not valid") from None
            out.append(EmbeddingInput("image", data=data, media_type=url.group(1)))
        elif (ref := _ID_REF.match(item.strip())) is not None:
            out.append(EmbeddingInput("id", image_id=int(ref.group(1))))
        elif not item.strip():
            raise EmbeddingsInputError(f"{where} is empty")
        else:
            out.append(EmbeddingInput("text", text=item))
    return out


def count_tokens(service: Any, texts: Sequence[str]) -> int:
    """``usage.prompt_tokens``: the texts' tokens by the model's own tokenizer (images and ids count 0)."""
    if not texts:
        return 0
    tokenizer = service.model.backbone.tokenizer
    return int(sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]))


def embeddings_response(rows: np.ndarray, model: str, prompt_tokens: int,
                        encoding_format: Literal["float", "base64"] = "float") -> dict[str, Any]:
    """The response body. ``base64``: each embedding's float32 little-endian bytes, base64-encoded (what
    the ``openai`` client asks for by default and decodes itself)."""
    rows = np.asarray(rows, dtype="<f4")
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(row.tobytes()).decode("ascii") if encoding_format == "base64"
             else [float(x) for x in row]}
            for i, row in enumerate(rows)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": int(prompt_tokens), "total_tokens": int(prompt_tokens)}}


def model_names(model_name: str) -> set[str]:
    """The names a request's ``model`` may use for the model this service runs (as given, or its folder's name)."""
    name = str(model_name)
    return {name, name.rstrip("/").rsplit("/", 1)[-1]}
