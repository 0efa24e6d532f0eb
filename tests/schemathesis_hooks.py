"""schemathesis hooks for tests/test_api_schema.py: uploaded files and base64 images are real images.

The schema says a file is one of the image types, which JSON Schema cannot describe byte by byte;
these strategies make schemathesis send small real images there (PNG, JPEG, ...), so a valid
generated request is one the server must accept. Loaded through SCHEMATHESIS_HOOKS.
"""

from __future__ import annotations

import base64
import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF", "image/bmp": "BMP",
           "image/tiff": "TIFF"}


def _image(fmt: str) -> st.SearchStrategy[bytes]:
    def draw(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", size, color).save(out, format=fmt)
        return out.getvalue()

    sizes = st.tuples(st.integers(8, 48), st.integers(8, 48))
    colors = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
    return st.builds(draw, sizes, colors)


for media_type, fmt in FORMATS.items():
    schemathesis.openapi.media_type(media_type, _image(fmt))

# /v1/embed takes images as base64 strings ("format": "byte").
schemathesis.openapi.format("byte", _image("PNG").map(lambda data: base64.b64encode(data).decode()))
