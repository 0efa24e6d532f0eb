"""The OpenAPI document, corrected where FastAPI's generated one would not tell the truth.

What is added to what FastAPI derives from the routes, each because the server behaves so:

- the query vector of ``/v1/search`` has exactly the collection's dimension, and its example does too;
- server-sent events are described event by event (``token``, ``done``, ``error``, each with the
  JSON schema of its ``data``), which is how OpenAPI 3.1 tools read a ``text/event-stream`` schema;
- uploaded files are images (``encoding`` names the image types) and the multipart ``filter`` is a
  JSON object with the same schema as in ``/v1/search``;
- statuses every route can give: 400 for a Host this server does not answer to, 403 for a
  cross-site state-changing request, 413 for a body over the limit.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from .filters import FILTER_SCHEMA
from .problems import problem_responses

IMAGE_TYPES = "image/png, image/jpeg, image/webp, image/gif, image/bmp, image/tiff"
UNCHECKED_HOST = {"/healthz", "/readyz"}
_REF = "#/components/schemas/"


def _event(name: str, data_schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["event", "data"], "properties": {
        "event": {"const": name},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data_schema},
        "id": {"type": "string"}, "retry": {"type": "integer"}}}


SSE_EVENT_SCHEMA: dict[str, Any] = {
    "description": "One server-sent event: `token` pieces of the answer, then `done` with the whole answer, or "
                   "`error` with a problem object.",
    "oneOf": [
        _event("token", {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}),
        _event("done", {"$ref": _REF + "AskResponse"}),
        _event("error", {"$ref": _REF + "Problem"}),
    ],
}


def _documented_everywhere(schema: dict[str, Any]) -> None:
    extra = problem_responses(400, 403, 413)
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            wanted = [] if path in UNCHECKED_HOST else [400]
            if method in ("post", "put", "patch", "delete"):
                wanted += [403, 413] if method != "delete" else [403]
            for code in wanted:
                if str(code) not in responses:
                    entry = dict(extra[code])
                    entry.pop("model", None)
                    entry["description"] = {400: "Invalid request, or a Host name this server does not answer to",
                                            403: "Refused: a cross-site request from a web page (Origin), or a "
                                                 "wrong API key",
                                            413: "The request body is over the server's limit"}[code]
                    responses[str(code)] = entry


def _multipart(schema: dict[str, Any], path: str, filter_field: bool) -> None:
    body = schema["paths"][path]["post"]["requestBody"]["content"]
    media = body.get("multipart/form-data")
    if media is None:
        return
    encoding = media.setdefault("encoding", {})
    encoding["file"] = {"contentType": IMAGE_TYPES}
    ref = media["schema"].get("$ref", "")
    target = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else media["schema"]
    for field in target["properties"].values():  # a form field is left out, never null
        if field.get("default", 0) is None:
            del field["default"]
    if filter_field:
        # Without its examples: an example-built request would carry an empty file (no example can hold an image).
        target["properties"]["filter"] = {k: v for k, v in copy.deepcopy(FILTER_SCHEMA).items() if k != "examples"}
        encoding["filter"] = {"contentType": "application/json"}


def _embedding(schema: dict[str, Any], dim: int | None) -> None:
    request = schema["components"]["schemas"].get("SearchRequest")
    if request is None:
        return
    field = request["properties"]["embedding"]
    field["contains"] = {"not": {"const": 0}}  # not all zero
    if dim:
        field["minItems"] = field["maxItems"] = dim
        field["description"] = f"A query vector of this collection's dimension ({dim}), not all zero (only its " \
                               "direction counts)."
        example = {"embedding": [round(0.1 * ((i % 7) - 3) + 0.05, 3) for i in range(dim)], "k": 3, "offset": 3}
        request["examples"] = [e for e in request.get("examples", []) if "embedding" not in e] + [example]


def _sse(schema: dict[str, Any]) -> None:
    for method in ("get", "post"):
        operation = schema["paths"].get("/v1/images/{image_id}/ask", {}).get(method)
        if operation is None:
            continue
        content = operation["responses"]["200"].setdefault("content", {})
        content.setdefault("text/event-stream", {})["schema"] = SSE_EVENT_SCHEMA
        if method == "get":
            content.pop("application/json", None)


def install_openapi(app: FastAPI, state: Any) -> None:
    """Make ``app.openapi()`` return the corrected document (built once, on first request)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        try:
            dim = int(state.collection.manifest.embed_dim)
        except Exception:  # noqa: BLE001 - a collection without a manifest: leave the dimension open
            dim = None
        _embedding(schema, dim)
        _sse(schema)
        _multipart(schema, "/v1/images", filter_field=False)
        _multipart(schema, "/v1/search/image", filter_field=True)
        _documented_everywhere(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
