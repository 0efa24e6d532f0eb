"""How much memory an image will cost, decided from its header before a single pixel is decoded.

Why: a pixel cap (width x height) alone does not bound memory. A 114 KB PNG of 4,000,000 x 10 pixels
is only 40 M pixels, but a model's preprocessing scales the *short* side up to its input size (336 px
for LLaVA-1.5, 64 for the demo model), so the long side grows by the same factor: that one upload took
a server to 17.5 GB; a 40,000,000 x 1 PNG overflowed Pillow's resize and killed `f2b index`. And a
decode costs more than its pixel count: Pillow stores RGB in 4 bytes per pixel, 16-bit data is rescaled,
alpha is composited, EXIF rotation makes a copy. So two rules, both checked on the header:

- **Aspect ratio.** The long side may be at most ``MAX_ASPECT_RATIO`` (100) times the short side. Then a
  resize of the short side to ``S`` holds at most ``S * 100 S`` pixels: 11.3 M at ``S = 336`` (LLaVA-1.5:
  ~220 MB with the float copies of a preprocessor, measured 108 MB), 0.4 M for the demo model. Panoramas
  (4:1 to 12:1), banners (10:1), long screenshots (20:1 to 80:1) and tiny strips (256 x 4) pass.
- **Decode memory.** ``decode_bytes`` estimates the peak of decoding and converting to 8-bit RGB from
  the size, the stored mode and the EXIF rotation; an image whose estimate passes ``max_bytes``
  (``DEFAULT_MAX_DECODE_BYTES``, 1 GiB) is refused. bench/bench_memory.py measures the real peak of the
  worst shapes against this estimate.
"""

from __future__ import annotations

import os
import struct
import zlib

#: longest side / shortest side; beyond it an image is refused before decoding (see the module text)
MAX_ASPECT_RATIO = 100
#: the decode-memory bound of one image (the estimate of ``decode_bytes``), for a library caller or `f2b index`
DEFAULT_MAX_DECODE_BYTES = 1 << 30

# Bytes per pixel of the peak while an image of each stored mode is decoded and converted to RGB
# (``imaging._to_rgb``; Pillow keeps RGB, RGBA, LA, CMYK and YCbCr in 4 bytes a pixel, I;16 in 2, I and F
# in 4): the decoded image plus the one full-size copy it becomes (alpha: plus the RGBA copy of a mode that
# is not RGBA; 16-bit and float: rescaled in strips into one byte of grey, then RGB). Measured by
# bench/bench_memory.py at the limits.
_PEAK_BYTES_PER_PIXEL = {
    "1": 5, "L": 5, "P": 5, "RGB": 8, "YCbCr": 8, "CMYK": 8, "LAB": 8, "HSV": 8, "RGBA": 8,
    "LA": 12, "La": 12, "PA": 12, "RGBa": 12,
    "I;16": 8, "I;16L": 8, "I;16B": 8, "I;16N": 8, "I": 10, "F": 10,
}
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # else 4
_UNKNOWN_MODE_BYTES = 16  # a mode not listed: assume more than any listed path
#: what a decode costs beside its pixels, whatever the size (the decoder's buffers, zlib's window, the file's
#: read-ahead): measured under 1 MiB; counted generously so the estimate is a bound, not a guess
DECODE_OVERHEAD_BYTES = 8 << 20
_ROTATIONS = (5, 6, 7, 8)  # EXIF orientations that transpose; 2-8 all copy the image once


def decode_bytes(width: int, height: int, mode: str, transparent: bool = False, oriented: bool = False) -> int:
    """Estimated peak bytes of decoding a ``width`` x ``height`` image stored in ``mode`` into 8-bit RGB.

    ``transparent``: a palette or grey image with a transparency key (composited like alpha);
    ``oriented``: an EXIF orientation other than 1 (the picture is copied once more, rotated)."""
    per_pixel = _PEAK_BYTES_PER_PIXEL.get(mode, _UNKNOWN_MODE_BYTES)
    if transparent:  # a transparency key: the RGBA copy, then the composite
        per_pixel = max(per_pixel, 12) + 1
    if oriented and not (mode == "RGB" and not transparent):
        # the rotated copy of the decoded image (a rotated RGB copy is the result itself: nothing more)
        per_pixel += _STORED_BYTES.get(mode, 4)
    return int(width) * int(height) * per_pixel + DECODE_OVERHEAD_BYTES


def held_bytes(width: int, height: int, mode: str) -> int:
    """Bytes Pillow keeps for a decoded ``width`` x ``height`` image of ``mode`` while it is held.

    Not width x height x bands: Pillow stores RGB (and every 3- or 4-band mode, 32-bit grey and float) in
    4 bytes a pixel, 1- and 8-bit modes in 1, 16-bit grey in 2 (measured: 20 RGB images of 4 M pixels
    are 331 MB resident, 4.1 bytes a pixel). What `f2b index` holds in flight is counted in this."""
    return int(width) * int(height) * _STORED_BYTES.get(mode, 4)


def shape_problem(width: int, height: int, mode: str, *, max_pixels: int, max_aspect: float = MAX_ASPECT_RATIO,
                  max_bytes: int = DEFAULT_MAX_DECODE_BYTES, transparent: bool = False,
                  oriented: bool = False) -> str | None:
    """Why an image of this header must not be decoded, in words for its owner; None when it may be.

    The order matters for the message: the pixel count first (the familiar limit), then the shape, then
    the memory that this mode would need."""
    pixels = int(width) * int(height)
    if width < 1 or height < 1:
        return f"image has no pixels ({width}x{height}); the file is damaged"
    if pixels > max_pixels:
        return (f"image too large: {width}x{height} = {pixels:,} pixels exceeds the limit of {max_pixels:,} "
                "(possible decompression bomb; raise max_pixels if the file is trusted)")
    long_side, short_side = max(width, height), min(width, height)
    if long_side > max_aspect * short_side:
        return (f"image too elongated: {width}x{height} is {long_side / short_side:,.0f}:1; the limit is "
                f"{max_aspect:g}:1 (a model scales the short side up, so such a picture needs gigabytes); "
                "crop or split it to index it")
    need = decode_bytes(width, height, mode, transparent, oriented)
    if need > max_bytes:
        return (f"image needs too much memory to decode: {width}x{height} in mode {mode} takes about "
                f"{need / 2**20:,.0f} MiB, over the limit of {max_bytes / 2**20:,.0f} MiB; scale it down to index it")
    return None


def write_flat_png(path: str | os.PathLike[str], width: int, height: int, bit_depth: int = 8, color_type: int = 2,
                   orientation: int | None = None, fill: tuple[int, ...] | None = None) -> str:
    """Write a one-colour (all zero) PNG of any size, a few KB on disk, in O(1 MiB) of memory.

    For the tests and the memory benchmark: hostile shapes (40,000,000 x 1) and images exactly at the limits
    are made in milliseconds without ever holding their pixels. ``color_type`` 0 grey, 2 RGB, 6 RGBA;
    ``orientation`` adds an EXIF block (before the pixels) with that orientation tag; ``fill`` (8-bit only:
    one value per channel) paints another colour, so that many such files have distinct content.
    """
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    left = (1 + (width * channels * bit_depth + 7) // 8) * height
    zeros, packer = bytes(min(left, 1 << 20)), zlib.compressobj(9)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type,
                                                                      0, 0, 0)))
        if orientation is not None:  # a little-endian TIFF header and one IFD entry: 0x0112 SHORT 1 = orientation
            tiff = b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00" * 4
            fh.write(chunk(b"eXIf", tiff))
        parts = []
        if fill is not None:  # whole rows, each its filter byte (0) and the colour repeated
            if bit_depth != 8 or len(fill) != channels:
                raise ValueError(f"fill needs 8-bit data and {channels} values, got {fill!r} at depth {bit_depth}")
            row = b"\x00" + bytes(fill) * width
            rows = max(1, len(zeros) // len(row))
            for start in range(0, height, rows):
                parts.append(packer.compress(row * min(rows, height - start)))
            left = 0
        while left:
            n = min(left, len(zeros))
            parts.append(packer.compress(zeros[:n]))
            left -= n
        parts.append(packer.flush())
        fh.write(chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return str(path)
