"""Image loading for evaluation: the library's safe decoder, so benchmarks see exactly what indexing sees.

``fwd2bot_index.imaging.load_image`` decodes fully (a truncated file is an error, never a half-grey
picture), applies EXIF orientation and converts 16-bit / CMYK / alpha correctly to 8-bit RGB; its
``ImageDecodeError`` names the file.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..imaging import ImageDecodeError, load_image

__all__ = ["load_rgb", "ImageDecodeError"]


def load_rgb(path: str | Path) -> Image.Image:
    """Decode one image as 8-bit RGB; raises ``ImageDecodeError`` naming the file."""
    image = load_image(path)
    return image if image.mode == "RGB" else image.convert("RGB")
