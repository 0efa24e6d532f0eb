"""Serving indexed files and their thumbnails, and only those.

Clients name images by id, never by path. The path comes from the catalog, and the bytes are served
only if they are still the bytes that were indexed: a regular file of the recorded size whose SHA-256
equals the recorded hash. A file swapped for a symlink to ``/etc/passwd`` (or anything else) after
indexing therefore fails the check; the bytes checked are the bytes sent, so there is no window
between check and use.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .problems import ApiProblem

FORMAT_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
                      "BMP": "image/bmp", "TIFF": "image/tiff"}
MAX_SERVED_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Verified:
    """The checked bytes of one indexed file."""

    image_id: int
    path: str
    data: bytes
    hash: str
    media_type: str


def catalog_row(collection: Any, image_id: int) -> Any:
    """The catalog record of ``image_id`` or a 404 problem."""
    row = collection.get(int(image_id))
    if row is None:
        raise ApiProblem(404, f"no image with id {image_id} in this collection (ids come from search results)",
                         "not-found")
    return row


def _read_exact(path: str, size: int) -> bytes | None:
    """The file's bytes if it is a regular file of exactly ``size`` bytes, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size or size > MAX_SERVED_BYTES:
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(size + 1)
        return data if len(data) == size else None
    except OSError:
        return None
    finally:
        os.close(fd)


def read_verified(collection: Any, image_id: int) -> Verified:
    """The bytes of an indexed image from the first of its paths that still holds the indexed content."""
    row = catalog_row(collection, image_id)
    for path in row.paths:
        data = _read_exact(path, int(row.size))
        if data is not None and hashlib.sha256(data).hexdigest() == row.hash:
            return Verified(int(row.id), path, data, row.hash, _media_type(data))
    raise ApiProblem(404, f"the file of image {image_id} is missing or was changed on disk since it was indexed; "
                          "re-index the folder (`f2b index`) to pick up the change", "file-missing")


def _media_type(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=tuple(FORMAT_MEDIA_TYPES)) as im:
            return FORMAT_MEDIA_TYPES.get(im.format or "", "application/octet-stream")
    except Exception:  # noqa: BLE001 - unknown formats are served as opaque bytes
        return "application/octet-stream"


class ThumbnailCache:
    """Thumbnails made on demand with Pillow, kept in memory (LRU, bounded in bytes)."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, str, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, collection: Any, image_id: int, size: int) -> tuple[bytes, str]:
        """JPEG bytes of the thumbnail (longest side at most ``size``) and its ETag."""
        row = catalog_row(collection, image_id)
        key = (int(image_id), row.hash, int(size))
        etag = f'"{row.hash[:20]}-{size}"'
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                return data, etag
        verified = read_verified(collection, image_id)
        data = make_thumbnail(verified.data, size, f"image {image_id}")
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._bytes += len(data)
            while self._bytes > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return data, etag

    def forget(self, image_id: int) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == image_id]:
                self._bytes -= len(self._items.pop(key))


def make_thumbnail(data: bytes, size: int, name: str) -> bytes:
    """Decode (EXIF orientation applied, like indexing does; a JPEG at the smallest scale that still fills
    ``size``) and shrink to fit ``size``. An image the header checks refuse (too many pixels, too elongated,
    too much decode memory: ``fwd2bot_index.image_shape``) is a 422, decoded not at all."""
    from fwd2bot_index.imaging import ImageTooLargeError, load_thumbnail

    from .uploads import SERVER_MAX_DECODE_BYTES

    try:
        picture = load_thumbnail(data, size, name=name, max_bytes=SERVER_MAX_DECODE_BYTES)
    except ImageTooLargeError as exc:
        raise ApiProblem(422, f"no thumbnail: {exc}", "image-too-large") from None
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=85, optimize=True)
    return out.getvalue()
