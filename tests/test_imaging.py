"""Image decoding, scanning, hashing and metadata on real files written to disk."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fwd2bot_index.imaging import (
    HEIF_SUPPORTED,
    ImageDecodeError,
    ScanError,
    file_sha256,
    image_metadata,
    load_image,
    load_image_bytes,
    scan_images,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _marked(size=(40, 20)) -> Image.Image:
    """Red picture with a blue square in the top-left corner, to check orientation."""
    im = Image.new("RGB", size, RED)
    im.paste(BLUE, (0, 0, 8, 8))
    return im


def _close(pixel, expected, tol=40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tif")])
def test_common_formats_decode_to_rgb(tmp_path, fmt, ext):
    path = tmp_path / f"a.{ext}"
    _marked().save(path, fmt)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (40, 20)
    assert _close(im.getpixel((2, 2)), BLUE) and _close(im.getpixel((30, 15)), RED)
    assert im.info["source_format"] == fmt


def test_animated_gif_gives_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    im = load_image(path)
    assert im.mode == "RGB" and _close(im.getpixel((5, 5)), RED, tol=5)


def test_animated_webp_gives_first_frame(tmp_path):
    path = tmp_path / "anim.webp"
    frames = [Image.new("RGB", (16, 16), c) for c in (BLUE, RED)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    assert _close(load_image(path).getpixel((5, 5)), BLUE, tol=5)


def test_16bit_tiff_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    out = np.asarray(load_image(path))[0, :, 0]
    # Pillow's own convert("L") would give [0, 255, 255, 255].
    assert out.tolist() == [0, 4, 128, 255]


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16bit_rgb_png_keeps_the_high_byte(tmp_path):
    arr = np.zeros((3, 4, 3), np.uint16)
    arr[..., 0], arr[..., 1], arr[..., 2] = 40000, 1000, 65535
    path = tmp_path / "deep.png"
    path.write_bytes(_png16_rgb(arr))
    r, g, b = load_image(path).getpixel((1, 1))
    assert abs(r - 40000 / 257) <= 1 and g <= 4 and b == 255


def test_16bit_grey_png(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 30000, np.uint16)).save(path)
    assert load_image(path).getpixel((0, 0)) == (117, 117, 117)  # 30000 / 257 = 116.7


def test_cmyk_jpeg_converted(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    im = load_image(path)
    assert im.mode == "RGB" and _close(im.getpixel((8, 8)), RED)


def test_rgba_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    im.putpixel((0, 0), (0, 0, 255, 255))
    im.putpixel((1, 0), (0, 0, 0, 128))
    im.save(path)
    out = load_image(path)
    assert out.getpixel((5, 5)) == WHITE and out.getpixel((0, 0)) == BLUE
    assert _close(out.getpixel((1, 0)), (127, 127, 127), tol=2)


def test_palette_with_transparency(tmp_path):
    path = tmp_path / "pal.png"
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.info["transparency"] = 0
    im.save(path, transparency=0)
    out = load_image(path)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == WHITE and out.getpixel((1, 1)) == RED


def test_palette_without_transparency(tmp_path):
    path = tmp_path / "pal.gif"
    _marked().convert("P").save(path)
    out = load_image(path)
    assert out.mode == "RGB" and _close(out.getpixel((2, 2)), BLUE, tol=5)


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    _marked((40, 20)).save(path, "JPEG", exif=exif.tobytes(), quality=95)
    im = load_image(path)
    assert im.size == (20, 40)
    # The blue top-left corner of the stored picture is displayed in the top-right corner.
    assert _close(im.getpixel((17, 2)), BLUE) and _close(im.getpixel((2, 2)), RED)
    assert image_metadata(path)["width"] == 20 and image_metadata(path)["height"] == 40


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("TIFF", "tif")])
def test_truncated_files_are_errors(tmp_path, fmt, ext):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as err:
        load_image(path)
    assert err.value.reason == "truncated image data (the file is incomplete; re-copy it)"
    assert str(err.value) == f"{path}: truncated image data (the file is incomplete; re-copy it)"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        load_image(path)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n" * 10)
    with pytest.raises(ImageDecodeError, match="not an image file"):
        load_image(path)


def test_corrupt_body_is_an_error(tmp_path):
    buf = io.BytesIO()
    _marked().save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[60:80] = b"\xff" * 20  # damage the compressed pixel data (and its CRC)
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError) as err:
        load_image(path)
    assert err.value.path == str(path) and err.value.reason


def test_decompression_bomb_limit_is_per_call(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    with pytest.raises(ImageDecodeError, match=r"200x100 = 20,000 pixels exceeds the limit of 10,000"):
        load_image(path, max_pixels=10_000)
    assert load_image(path, max_pixels=20_000).size == (200, 100)


def test_header_claiming_a_huge_image_is_refused_before_decoding(tmp_path):
    """A tiny file whose PNG header claims 30000 x 20000 pixels: refused from the header alone."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 30000, 20000, 8, 2, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)))
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(path)


def test_missing_and_folder_and_unreadable(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "nope.jpg")
    folder = tmp_path / "dir.jpg"
    folder.mkdir()
    with pytest.raises(ImageDecodeError, match="is a folder"):
        load_image(folder)
    locked = tmp_path / "locked.png"
    _marked().save(locked)
    locked.chmod(0)
    try:
        if os.geteuid() == 0:
            # root reads it anyway: the file is simply fine, which must not be reported as broken
            assert load_image(locked).size == (40, 20)
        else:
            with pytest.raises(ImageDecodeError, match="permission denied"):
                load_image(locked)
    finally:
        locked.chmod(0o644)


def test_heic_without_plugin_says_what_to_install(tmp_path, monkeypatch):
    """pillow-heif is a dependency; a machine where it is missing or broken still gets a message that
    says what to install (simulated: the import-time flag is what the decoder consults)."""
    import fwd2bot_index.imaging as imaging

    monkeypatch.setattr(imaging, "HEIF_SUPPORTED", False)
    path = tmp_path / "phone.heic"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    with pytest.raises(ImageDecodeError, match="pillow-heif"):
        load_image(path)


def test_load_image_bytes_and_file_like():
    buf = io.BytesIO()
    _marked().save(buf, "PNG")
    assert load_image_bytes(buf.getvalue(), "up.png").size == (40, 20)
    buf.seek(0)
    assert load_image_bytes(buf, "up.png").size == (40, 20)
    with pytest.raises(ImageDecodeError, match=r"^up\.png: truncated"):
        load_image_bytes(buf.getvalue()[: len(buf.getvalue()) // 2], "up.png")
    with pytest.raises(ImageDecodeError, match=r"^upload: empty file"):
        load_image_bytes(b"")


# ------------------------------------------------------------------------------------ scanning


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "photos"
    for rel in ["b.jpg", "a.PNG", "sub/c.webp", "sub/deeper/d.gif", "sub/notes.txt", ".hidden.jpg",
                ".cache/e.jpg", "raw/f.tif", "z.tmp.jpg", ".f2b/tokens/x.jpg"]:
        _touch(root / rel)
    return root


def _rel(paths, root):
    return [p.relative_to(root.resolve()).as_posix() for p in paths]


def test_scan_sorted_recursive_skips_hidden(tree):
    found = list(scan_images(tree))
    assert all(p.is_absolute() for p in found)
    assert _rel(found, tree) == ["a.PNG", "b.jpg", "raw/f.tif", "sub/c.webp", "sub/deeper/d.gif", "z.tmp.jpg"]
    assert list(scan_images(str(tree))) == found  # deterministic


def test_scan_hidden_exclude_and_skip_dirs(tree):
    found = _rel(scan_images(tree, include_hidden=True, skip_dirs=[tree / ".f2b"]), tree)
    assert ".hidden.jpg" in found and ".cache/e.jpg" in found and not any(p.startswith(".f2b") for p in found)
    found = _rel(scan_images(tree, exclude=["raw", "*.tmp.jpg", "sub/deeper/*"]), tree)
    assert found == ["a.PNG", "b.jpg", "sub/c.webp"]


def test_scan_symlinks_policy_and_loops(tree, tmp_path):
    outside = _touch(tmp_path / "elsewhere" / "g.jpg")
    os.symlink(outside, tree / "link.jpg")
    os.symlink(tree / "sub", tree / "sub" / "deeper" / "loop")  # a cycle
    os.symlink(tmp_path / "elsewhere", tree / "linked_dir")
    plain = _rel(scan_images(tree), tree)
    assert "link.jpg" not in plain and not any("loop" in p or "linked_dir" in p for p in plain)
    followed = list(scan_images(tree, follow_symlinks=True))
    assert outside.resolve() in followed
    assert len(followed) == len(set(followed))  # no duplicates and the loop terminated
    assert len(followed) == len(plain) + 1


def test_scan_errors_and_file_roots(tree):
    with pytest.raises(ScanError, match="folder to scan does not exist: .*missing"):
        list(scan_images([tree, tree / "missing"]))
    single = list(scan_images(tree / "b.jpg"))
    assert single == [(tree / "b.jpg").resolve()]
    both = list(scan_images([tree / "sub", tree]))
    assert len(both) == len(set(both)) == 6


# ---------------------------------------------------------------------------- hash and metadata


def test_file_sha256_streams(tmp_path):
    import hashlib

    data = os.urandom(3 * (1 << 20) + 17)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()


def test_metadata_from_exif(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "Canon\x00"
    exif[0x0110] = "EOS 5D"
    exif.get_ifd(0x8769)[0x9003] = "2021:05:01 10:20:30"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "S", (33.0, 51.0, 36.0), "W", (70.0, 30.0, 0.0)
    path = tmp_path / "trip.jpg"
    _marked().save(path, "JPEG", exif=exif.tobytes())
    meta = image_metadata(path)
    assert meta == {
        "width": 40, "height": 20, "format": "JPEG", "date_taken": "2021-05-01T10:20:30",
        "camera_make": "Canon", "camera_model": "EOS 5D", "gps_lat": -33.86, "gps_lon": -70.5,
    }
    json.dumps(meta)
    assert image_metadata(Image.open(path)) == meta


def test_metadata_without_exif_and_bad_date(tmp_path):
    path = tmp_path / "plain.png"
    _marked().save(path)
    assert image_metadata(path) == {"width": 40, "height": 20, "format": "PNG"}
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "0000:00:00 00:00:00"
    path2 = tmp_path / "zero.jpg"
    _marked().save(path2, "JPEG", exif=exif.tobytes())
    assert "date_taken" not in image_metadata(path2)
    assert image_metadata(load_image(path2))["format"] == "JPEG"


def test_heic_photo_decodes_with_pillow_heif(tmp_path):
    """Issue 14: HEIC works out of the box (pillow-heif is a dependency), orientation and size intact."""
    assert HEIF_SUPPORTED, "pillow-heif is a dependency and must import"
    import numpy as np
    from PIL import Image

    pixels = np.zeros((40, 90, 3), np.uint8)
    pixels[:, :45] = (200, 30, 30)
    Image.fromarray(pixels).save(tmp_path / "phone.heic", quality=90)
    im = load_image(tmp_path / "phone.heic")
    assert im.size == (90, 40) and im.mode == "RGB"
    left, right = np.asarray(im)[20, 10], np.asarray(im)[20, 80]
    assert left[0] > 150 and right.max() < 60
    assert Path(tmp_path / "phone.heic") in [Path(p) for p in scan_images([tmp_path])]
