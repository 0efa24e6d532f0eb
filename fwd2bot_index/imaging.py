"""Reading image files safely: decode fully or fail clearly, hash, and read EXIF metadata.

Pillow only (numpy for the 16-bit rescale). Every failure to read an image raises ``ImageDecodeError``
whose text names the file and says what is wrong in words a user can act on, so an indexing run can
record the reason per file and carry on instead of crashing or silently storing a half-decoded picture.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import struct
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .image_shape import DEFAULT_MAX_DECODE_BYTES, MAX_ASPECT_RATIO, shape_problem
from .scanning import IMAGE_EXTENSIONS, ScanError, scan_images  # noqa: F401  (re-exported: imported from here)

__all__ = [
    "DEFAULT_MAX_DECODE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "HEIF_SUPPORTED",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageTooLargeError",
    "MAX_ASPECT_RATIO",
    "ScanError",
    "file_sha256",
    "image_metadata",
    "load_image",
    "load_image_bytes",
    "load_thumbnail",
    "scan_images",
]

log = logging.getLogger(__name__)

#: Pillow's own default, restated so the limit is a decision of this package, not an accident.
DEFAULT_MAX_PIXELS = 89_478_485
# Pillow's global guard stays as an outer bound (it raises at twice this value inside Image.open);
# the per-call ``max_pixels`` check below is the one that decides. A caller allowing more than
# twice this must raise ``PIL.Image.MAX_IMAGE_PIXELS`` too (a process-wide, deliberate choice).
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS

try:  # HEIC/HEIF (every iPhone library): pillow-heif is a dependency; ~50 ms to import and register
    import pillow_heif  # type: ignore[import-not-found]

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except Exception:  # noqa: BLE001 - a broken or removed plug-in: HEIC files then fail with a clear reason
    HEIF_SUPPORTED = False

_HEIF_EXTENSIONS = {".heic", ".heif"}
_WHITE = (255, 255, 255)


class ImageDecodeError(Exception):
    """An image that cannot be used. ``str()`` is ``"<file>: <reason>"``, meant for the user."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageTooLargeError(ImageDecodeError):
    """An image refused from its header (pixels, shape or decode memory over the limits), never decoded.

    Its own type so a server can answer 413 (too large) rather than 422 (damaged)."""


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect: float = MAX_ASPECT_RATIO, max_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> Image.Image:
    """Decode ``path`` completely into an 8-bit RGB image, or raise ``ImageDecodeError``.

    EXIF orientation is applied, 16-bit greyscale is rescaled (not clipped), CMYK / palette / alpha
    images become plain RGB (alpha composited on white), animations give their first frame.
    Truncated data is an error: a half-grey picture must never be indexed as if it were whole.
    The header is checked before decoding (``image_shape``): more than ``max_pixels``, a long side over
    ``max_aspect`` times the short one, or a decode estimated over ``max_bytes`` raise ``ImageTooLargeError``.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise ImageDecodeError(path, "is a folder, not an image file")
        with open(p, "rb") as fh:
            return _decode(fh, str(path), size, _Limits(max_pixels, max_aspect, max_bytes))
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found (was it moved or deleted?)") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied (the file cannot be read; check its permissions)") from None
    except IsADirectoryError:
        raise ImageDecodeError(path, "is a folder, not an image file") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read the file ({exc.strerror or exc})") from None


def load_image_bytes(
    data: bytes | bytearray | memoryview | BinaryIO, name: str = "upload", max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = MAX_ASPECT_RATIO, max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
) -> Image.Image:
    """Like ``load_image`` for an upload held in memory (bytes or a binary file-like object).

    ``name`` only labels error messages (use the uploaded file name).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = data.read()
    raw = bytes(data)
    return _decode(io.BytesIO(raw), name, len(raw), _Limits(max_pixels, max_aspect, max_bytes))


def load_thumbnail(data: bytes, size: int, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_aspect: float = MAX_ASPECT_RATIO, max_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> Image.Image:
    """An RGB picture whose longest side is at most ``size``, decoded as small as the format allows.

    Why not ``load_image`` then shrink: a JPEG can be decoded at 1/2, 1/4 or 1/8 scale (``draft``), so a
    256-px thumbnail of a 40 M-pixel photo never holds the 40 M pixels; other formats decode whole. The
    same header checks apply (on the size that will actually be decoded).
    """
    limits = _Limits(max_pixels, max_aspect, max_bytes, draft=(int(size), int(size)))
    picture = _decode(io.BytesIO(bytes(data)), name, len(data), limits)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    return picture


class _Limits:
    """The header checks of one decode (see ``image_shape``); ``draft``: a JPEG may decode reduced to this."""

    def __init__(self, max_pixels: int, max_aspect: float, max_bytes: int, draft: tuple[int, int] | None = None):
        self.max_pixels, self.max_aspect, self.max_bytes, self.draft = max_pixels, max_aspect, max_bytes, draft

    def check(self, im: Image.Image, name: str) -> None:
        """Raise ``ImageTooLargeError`` if the image the header describes must not be decoded."""
        if self.draft is not None and im.format == "JPEG":
            with contextlib.suppress(Exception):  # a draft the decoder cannot make: decode at full size
                im.draft("RGB", self.draft)
        width, height = im.size
        oriented = _orientation(im) not in (None, 1)
        transparent = im.mode in ("P", "L", "RGB", "I;16", "I") and "transparency" in im.info
        problem = shape_problem(width, height, im.mode, max_pixels=self.max_pixels, max_aspect=self.max_aspect,
                                max_bytes=self.max_bytes, transparent=transparent, oriented=oriented)
        if problem:
            raise ImageTooLargeError(name, problem)


def _orientation(im: Image.Image) -> int | None:
    """The EXIF orientation from the header, without decoding: Pillow's PNG ``getexif`` decodes the whole
    image to look for an ``eXIf`` chunk after the pixels, so a PNG counts only one found before them."""
    if im.format == "PNG" and "exif" not in im.info:
        return None
    try:
        return im.getexif().get(_TAG_ORIENTATION)
    except Exception:  # noqa: BLE001 - an unreadable EXIF block is ignored when decoding, too
        return None


def _decode(fh: BinaryIO, name: str, size: int, limits: _Limits) -> Image.Image:
    """Open, bound-check (header only), fully load and normalise one image from an open binary stream."""
    if size == 0:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    _check_riff_length(fh, name, size)
    try:
        im = Image.open(fh)  # lazy: reads the header only, so the size check below is cheap
    except UnidentifiedImageError:
        raise ImageDecodeError(name, _unidentified_reason(name)) from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"image too large ({exc}); possible decompression bomb") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(name, _reason_from_exception(exc)) from None
    with im:
        limits.check(im, name)  # from the header: nothing is decoded yet
        source_format = im.format
        try:
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(name, f"image too large ({exc}); possible decompression bomb") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
            raise ImageDecodeError(name, _reason_from_exception(exc)) from None
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by some other code: truncated files may pass")
        # exif_transpose copies even an image it leaves as it is: call it only for a real rotation or flip
        oriented = _apply_orientation(im) if _orientation(im) not in (None, 1) else im
        rgb = _to_rgb(oriented, owned=oriented is not im)
    rgb.info["source_format"] = source_format
    return rgb


def _check_riff_length(fh: BinaryIO, name: str, size: int) -> None:
    """WebP decoders report cut files as a generic failure; the RIFF header knows the true length."""
    head = fh.read(12)
    fh.seek(0)
    if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        if declared > size:
            raise ImageDecodeError(name, _TRUNCATED)


_TRUNCATED = "truncated image data (the file is incomplete; re-copy it)"


def _reason_from_exception(exc: BaseException) -> str:
    """Turn Pillow's assorted decoder exceptions into one user-readable sentence."""
    text = str(exc)
    low = text.lower()
    if "truncated" in low or isinstance(exc, EOFError) or "premature end" in low:
        return _TRUNCATED
    return f"corrupt or unsupported image data ({text or type(exc).__name__}); the file may be damaged"


def _unidentified_reason(name: str) -> str:
    ext = Path(name).suffix.lower()
    if ext in _HEIF_EXTENSIONS and not HEIF_SUPPORTED:
        return "HEIC/HEIF images need the package pillow-heif, which is missing or broken here (pip install pillow-heif)"
    return "not an image file, or an image format Pillow cannot read"


def _apply_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says; a broken EXIF block is ignored, not fatal."""
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception as exc:  # noqa: BLE001 - malformed EXIF must not make a good picture unusable
        log.debug("ignoring unreadable EXIF orientation: %s", exc)
        return im


def _to_rgb(im: Image.Image, owned: bool = False) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping high bit depths.

    Memory (the estimate in ``image_shape`` follows this): at most one full-size copy beside ``im``. An RGB
    image the caller ``owned`` (a rotated copy) is returned as is; alpha is composited by pasting onto white
    with the alpha as mask (the same values as ``alpha_composite``, checked, without its two extra copies).
    """
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _rescale_to_l(im, 65535.0).convert("RGB")
    if mode == "F":
        top = 1.0 if max((float(np.nanmax(s, initial=0.0)) for _, s in _strips(im)), default=0.0) <= 1.0 else 255.0
        return _rescale_to_l(im, top).convert("RGB")
    if "A" in mode or "transparency" in im.info:
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba)
        out.info.update({k: v for k, v in im.info.items() if k != "transparency"})
        return out
    if mode == "RGB" and owned:
        return im
    return im.convert("RGB")


def _strips(im: Image.Image, pixels: int = 1 << 20) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows as an array)`` about ``pixels`` at a time: the float math of a rescale then
    needs memory for one strip, not 8+ bytes for every pixel of a 16-bit image."""
    width, height = im.size
    rows = max(1, pixels // max(1, width))
    for top in range(0, height, rows):
        yield top, np.asarray(im.crop((0, top, width, min(height, top + rows))))


def _rescale_to_l(im: Image.Image, top: float) -> Image.Image:
    """Map 0..top linearly to 0..255 (16-bit data is scaled, never clipped at 255), strip by strip."""
    out = np.empty((im.size[1], im.size[0]), dtype=np.uint8)
    for first, strip in _strips(im):
        scaled = np.clip(np.nan_to_num(strip.astype(np.float64)), 0.0, top) * (255.0 / top)
        out[first:first + strip.shape[0]] = np.rint(scaled).astype(np.uint8)
    return Image.fromarray(out, mode="L")


# --------------------------------------------------------------------------------------------
# Hashing and metadata
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (identical files get one catalog entry)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


_TAG_MAKE, _TAG_MODEL, _TAG_DATETIME, _TAG_ORIENTATION = 0x010F, 0x0110, 0x0132, 0x0112
_IFD_EXIF, _IFD_GPS = 0x8769, 0x8825
_TAG_DATE_ORIGINAL, _TAG_DATE_DIGITIZED, _TAG_OFFSET_ORIGINAL = 0x9003, 0x9004, 0x9011


def image_metadata(img_or_path: Image.Image | str | os.PathLike[str]) -> dict[str, Any]:
    """Filterable facts about an image, JSON-serialisable.

    Always ``width``, ``height`` (as displayed, i.e. after EXIF rotation) and ``format``; when the
    EXIF block has them: ``date_taken`` (ISO 8601), ``camera_make``, ``camera_model``, ``gps_lat``,
    ``gps_lon`` (decimal degrees, south/west negative). A path is opened lazily (header only).
    """
    if isinstance(img_or_path, Image.Image):
        return _metadata_of(img_or_path, img_or_path.format or img_or_path.info.get("source_format"))
    try:
        with Image.open(img_or_path) as im:
            return _metadata_of(im, im.format)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(img_or_path, _reason_from_exception(exc)) from None


def _metadata_of(im: Image.Image, fmt: str | None) -> dict[str, Any]:
    try:
        # a PNG without EXIF before its pixels: none (Pillow would decode every pixel again to look after them)
        unloaded_png = fmt == "PNG" and "exif" not in im.info and getattr(im, "_im", None) is None
        exif = Image.Exif() if unloaded_png else im.getexif()
    except Exception:  # noqa: BLE001 - a broken EXIF block means no EXIF facts, not a broken image
        exif = Image.Exif()
    width, height = im.size
    if exif.get(_TAG_ORIENTATION) in (5, 6, 7, 8):
        width, height = height, width
    meta: dict[str, Any] = {"width": int(width), "height": int(height), "format": fmt}
    _safe(meta, exif, _exif_date)
    _safe(meta, exif, _exif_camera)
    _safe(meta, exif, _exif_gps)
    return meta


def _safe(meta: dict[str, Any], exif: Image.Exif, reader: Callable[[Image.Exif], dict[str, Any]]) -> None:
    try:
        meta.update(reader(exif))
    except Exception as exc:  # noqa: BLE001 - each EXIF field is optional; bad values are dropped
        log.debug("ignoring malformed EXIF field: %s", exc)


def _exif_date(exif: Image.Exif) -> dict[str, Any]:
    sub = exif.get_ifd(_IFD_EXIF)
    for raw in (sub.get(_TAG_DATE_ORIGINAL), sub.get(_TAG_DATE_DIGITIZED), exif.get(_TAG_DATETIME)):
        text = _text(raw)
        if not text:
            continue
        try:
            when = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
        except ValueError:
            continue
        iso = when.isoformat()
        offset = _text(sub.get(_TAG_OFFSET_ORIGINAL))
        if offset and len(offset) == 6 and offset[0] in "+-" and offset[3] == ":":
            iso += offset
        return {"date_taken": iso}
    return {}


def _exif_camera(exif: Image.Exif) -> dict[str, Any]:
    out = {}
    for key, tag in (("camera_make", _TAG_MAKE), ("camera_model", _TAG_MODEL)):
        text = _text(exif.get(tag))
        if text:
            out[key] = text
    return out


def _exif_gps(exif: Image.Exif) -> dict[str, Any]:
    gps = exif.get_ifd(_IFD_GPS)
    if not gps:
        return {}
    lat = _degrees(gps.get(2), _text(gps.get(1)), "S")
    lon = _degrees(gps.get(4), _text(gps.get(3)), "W")
    if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return {}
    return {"gps_lat": lat, "gps_lon": lon}


def _degrees(value: Any, ref: str | None, negative_ref: str) -> float | None:
    if value is None:
        return None
    parts = [float(v) for v in (value if isinstance(value, (tuple, list)) else (value,))]
    parts += [0.0] * (3 - len(parts))
    deg = parts[0] + parts[1] / 60.0 + parts[2] / 3600.0
    if not np.isfinite(deg):
        return None
    return round(-deg if (ref or "").upper().startswith(negative_ref) else deg, 7)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value).replace("\x00", "").strip()
    return text or None
