"""Image loading for evaluation: the library's loader when present, else Pillow directly."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps


def _library_loader():  # type: ignore[no-untyped-def]
    try:
        from fwd2bot_index.imaging import load_image
    except ModuleNotFoundError as e:
        if e.name in ("fwd2bot_index.imaging",):
            return None
        raise
    return load_image


def load_rgb(path: str | Path) -> Image.Image:
    """Decode one image as RGB (EXIF orientation applied); errors name the file."""
    loader = _library_loader()
    try:
        if loader is not None:
            image = loader(path)
        else:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened)
                image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"{path}: cannot decode image ({e})") from e
    if not isinstance(image, Image.Image):
        raise TypeError(f"{path}: image loader returned {type(image).__name__}, expected a PIL image")
    return image if image.mode == "RGB" else image.convert("RGB")
