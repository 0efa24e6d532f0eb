"""Uploaded images: checking them (size, type, pixels, whole decode) and adding them to the collection.

An upload is kept in a folder the collection owns, ``<collection>/uploads/<sha256>.<ext>``, named by
its content (never by the client's file name), and indexed from there with the service's own
``index`` so it gets the same decode checks, metadata and crash safety as any indexed file.
Duplicates are refused with 409 and the id of the image that already has this content.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .problems import ApiProblem

UPLOAD_DIR = "uploads"
ALLOWED_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
DECLARED_OK = ("image/", "application/octet-stream")
#: the decode-memory bound of one uploaded image (``image_shape.decode_bytes``): the server decodes
#: ``decode_slots`` (2) at a time, so images being decoded hold at most twice this
SERVER_MAX_DECODE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class CheckedImage:
    """An upload that decoded completely: its bytes, Pillow format, size and the decoded picture."""

    data: bytes
    format: str
    width: int
    height: int
    picture: Any
    name: str


def check_image(data: bytes, name: str, declared: str | None, max_bytes: int, max_pixels: int,
                max_decode_bytes: int = SERVER_MAX_DECODE_BYTES) -> CheckedImage:
    """Check an uploaded file: 413 too big (bytes, pixels, an elongated shape, or the memory its decode
    would take, all from the header: see ``fwd2bot_index.image_shape``), 415 not an image we accept,
    422 damaged."""
    from PIL import Image, UnidentifiedImageError

    from fwd2bot_index.imaging import ImageDecodeError, ImageTooLargeError, load_image_bytes

    label = safe_name(name) or "upload"
    if len(data) > max_bytes:
        raise ApiProblem(413, f"{label} is {len(data):,} bytes; the limit is {max_bytes:,} bytes", "upload-too-large")
    if declared and not declared.lower().startswith(DECLARED_OK):
        raise ApiProblem(415, f"{label} was sent as {declared!r}; send an image (JPEG, PNG, WebP, GIF, BMP or TIFF)",
                         "unsupported-media-type")
    if not data:
        raise ApiProblem(422, f"{label} is empty (0 bytes)", "undecodable-image")
    try:
        with Image.open(io.BytesIO(data), formats=tuple(ALLOWED_FORMATS)) as probe:
            fmt, (width, height) = str(probe.format), probe.size
    except UnidentifiedImageError:
        raise ApiProblem(415, f"{label} is not an image in a supported format (JPEG, PNG, WebP, GIF, BMP, TIFF)",
                         "unsupported-media-type") from None
    except Image.DecompressionBombError:
        raise ApiProblem(413, f"{label} has too many pixels (decompression bomb guard)", "too-many-pixels") from None
    except Exception as exc:  # noqa: BLE001 - a header Pillow chokes on is a damaged file
        raise ApiProblem(422, f"{label} cannot be read as an image ({type(exc).__name__})", "undecodable-image") from None
    if width * height > max_pixels:
        raise ApiProblem(413, f"{label} is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
                         "too-many-pixels")
    try:
        picture = load_image_bytes(data, name=label, max_pixels=max_pixels, max_bytes=max_decode_bytes)
    except ImageTooLargeError as exc:
        raise ApiProblem(413, f"{label}: {exc.reason}", "image-too-large") from None
    except ImageDecodeError as exc:
        raise ApiProblem(422, f"{label}: {exc.reason}", "undecodable-image") from None
    return CheckedImage(data, fmt, width, height, picture, label)


_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_name(name: str | None) -> str:
    """The client's file name reduced to a harmless label (kept as metadata, never used as a path)."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    return _UNSAFE.sub("_", base).strip(" .")[:120]


class Uploader:
    """Adds checked uploads to the collection; one at a time (the collection has one writer)."""

    def __init__(self, service: Any, worker: Any, write_lock: threading.Lock) -> None:
        self.service = service
        self.worker = worker
        self.lock = write_lock
        self.folder = Path(service.collection.path) / UPLOAD_DIR

    def existing_id(self, digest: str) -> int | None:
        found = self.service.collection.catalog.ids_by_hashes([digest])
        return int(found[digest]) if digest in found else None

    def add(self, image: CheckedImage) -> tuple[int, bool]:
        """Store and index the upload; returns ``(id, created)``. Blocking: call from a worker thread."""
        digest = hashlib.sha256(image.data).hexdigest()
        with self.lock:
            known = self.existing_id(digest)
            if known is not None:
                return known, False
            self.folder.mkdir(parents=True, exist_ok=True)
            target = self.folder / f"{digest}{ALLOWED_FORMATS[image.format]}"
            _write_atomic(target, image.data)
            sidecar = self.folder / f".{digest}.meta.json"
            meta = {"source": "upload", "original_name": image.name}
            _write_atomic(sidecar, json.dumps({str(target.resolve()): meta}).encode())
            try:
                report = self.worker.call(self.service.index, [str(target)], metadata=str(sidecar)).result()
            except BaseException:
                target.unlink(missing_ok=True)
                raise
            finally:
                sidecar.unlink(missing_ok=True)
            image_id = self.existing_id(digest)
            if image_id is None:
                target.unlink(missing_ok=True)
                reason = report.failed[0][1] if getattr(report, "failed", None) else "it was not indexed"
                raise ApiProblem(422, f"{image.name} could not be added: {reason}", "undecodable-image")
            return image_id, True

    def forget_files(self, paths: list[str]) -> None:
        """Delete stored upload files of a removed image (only files inside the uploads folder)."""
        root = self.folder.resolve()
        for p in paths:
            path = Path(p)
            if path.parent.resolve() == root and not path.is_symlink():
                path.unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
