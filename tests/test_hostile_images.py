"""Images whose shape amplifies memory, refused from their header: in the library, in `f2b index` (a
failure record, the run goes on, a rerun is quiet), and with bounded memory (measured in a subprocess).

The hostile files are one-colour PNGs of extreme shapes (4,000,000 x 10 and 40,000,000 x 1) written
without ever holding their pixels (``image_shape.write_flat_png``): a few KB on disk, a few ms to make.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fwd2bot_index.image_shape import MAX_ASPECT_RATIO, decode_bytes, shape_problem, write_flat_png
from fwd2bot_index.imaging import (DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLargeError, load_image,
                                   load_image_bytes, load_thumbnail)

HOSTILE = [(4_000_000, 10), (40_000_000, 1)]


def flat_png(path: Path, width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> Path:
    """A one-colour PNG of any size, a few KB (``image_shape.write_flat_png``; 1-bit grey by default)."""
    return Path(write_flat_png(path, width, height, bit_depth, color_type))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("hostile")
    return [flat_png(folder / f"wide-{w}x{h}.png", w, h) for w, h in HOSTILE]


def test_extreme_shapes_are_refused_from_the_header(hostile):
    for path in hostile:
        with pytest.raises(ImageTooLargeError, match="too elongated") as err:
            load_image(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(ImageTooLargeError, match="too elongated"):
            load_image_bytes(path.read_bytes(), name=path.name)
        with pytest.raises(ImageTooLargeError):
            load_thumbnail(path.read_bytes(), 256, name=path.name)


def test_the_aspect_limit_is_inclusive_and_applies_both_ways(tmp_path):
    ok = flat_png(tmp_path / "ok.png", MAX_ASPECT_RATIO * 4, 4, 8, 2)
    assert load_image(ok).size == (MAX_ASPECT_RATIO * 4, 4)
    tall = flat_png(tmp_path / "tall.png", 4, MAX_ASPECT_RATIO * 4 + 1, 8, 2)
    with pytest.raises(ImageTooLargeError, match="too elongated"):
        load_image(tall)
    assert load_image(tall, max_aspect=MAX_ASPECT_RATIO + 1).size == (4, MAX_ASPECT_RATIO * 4 + 1)
    assert isinstance(ImageTooLargeError("x", "y"), ImageDecodeError)  # callers catching decode errors still do


def test_decode_memory_bound_depends_on_the_mode():
    assert decode_bytes(1000, 1000, "RGB") == 8_000_000 + decode_bytes(0, 0, "RGB")
    assert decode_bytes(1000, 1000, "LA") > decode_bytes(1000, 1000, "RGBA") >= decode_bytes(1000, 1000, "RGB")
    assert decode_bytes(1000, 1000, "RGBA", oriented=True) > decode_bytes(1000, 1000, "RGBA")
    assert decode_bytes(1000, 1000, "P", transparent=True) > decode_bytes(1000, 1000, "P")
    # the same pixels: grey passes a bound that RGBA does not
    assert shape_problem(4000, 4000, "L", max_pixels=DEFAULT_MAX_PIXELS, max_bytes=100 << 20) is None
    problem = shape_problem(4000, 4000, "RGBA", max_pixels=DEFAULT_MAX_PIXELS, max_bytes=100 << 20)
    assert problem and "memory" in problem and "MiB" in problem


def test_a_16bit_image_over_the_memory_bound_is_refused_and_one_under_it_decodes(tmp_path):
    path = tmp_path / "grey16.png"
    Image.new("I;16", (300, 200), 40000).save(path)
    with pytest.raises(ImageTooLargeError, match="memory"):
        load_image(path, max_bytes=decode_bytes(300, 200, "I;16") - 1)
    picture = load_image(path)
    assert picture.mode == "RGB" and picture.getpixel((5, 5))[0] == round(40000 * 255 / 65535)


def test_thumbnails_of_large_jpegs_decode_reduced(tmp_path):
    out = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(out, format="JPEG", quality=80)
    picture = load_thumbnail(out.getvalue(), 128, name="big.jpg", max_bytes=16 << 20)  # 4000x3000 whole: 96 MB
    assert max(picture.size) == 128 and picture.mode == "RGB"


def test_memory_stays_bounded_for_the_worst_shapes(hostile, tmp_path):
    """In a fresh process: the hostile shapes through the index decode and the server's upload check cost
    next to nothing (they used to cost gigabytes: 17.5 GB for 4,000,000 x 10 in a server), and an image at the aspect limit
    at the limit stays within the estimate that admitted it. Peaks are the process's own high-water mark
    (``VmHWM``, reset before each part; ``ru_maxrss`` can carry the forking parent's size)."""
    edge_size = (MAX_ASPECT_RATIO * 300, 300)  # 9 M pixels at exactly the limit
    edge = flat_png(tmp_path / "edge.png", *edge_size, 8, 2)
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "bench")!r})
        from bench_memory import _peak, _reset_peak
        from _common import rss_bytes
        from fwd2bot_index.imaging import ImageTooLargeError, load_image
        from fwd2bot_index.api.uploads import check_image
        from fwd2bot_index.api.problems import ApiProblem
        refused = 0
        before = rss_bytes(); _reset_peak()
        for path in {[str(p) for p in hostile]!r}:
            try:
                load_image(path)
            except ImageTooLargeError:
                refused += 1
            try:
                check_image(open(path, "rb").read(), path, "image/png", 20 << 20, 40_000_000)
            except ApiProblem as exc:
                refused += exc.status == 413
        hostile = _peak() - before
        before = rss_bytes(); _reset_peak()
        assert load_image({str(edge)!r}).size == {edge_size!r}
        print(refused, hostile, _peak() - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refused, hostile_bytes, edge_bytes = map(int, done.stdout.split())
    assert refused == 4
    assert hostile_bytes < 32 * 2**20, f"refusing the hostile shapes cost {hostile_bytes / 2**20:.0f} MiB"
    estimate = decode_bytes(*edge_size, "RGB")
    assert edge_bytes <= estimate, f"{edge_bytes / 2**20:.0f} MiB for an estimate of {estimate / 2**20:.0f} MiB"


def test_index_records_extreme_shapes_as_failures_and_goes_on(tmp_path, hostile, tiny_llava_dir):
    from fwd2bot_index.cli.main import app
    from fwd2bot_index.synthetic import write_demo_data

    write_demo_data(tmp_path / "data", n=4, seed=3)
    images = tmp_path / "data" / "images"
    for path in hostile:
        (images / path.name).write_bytes(path.read_bytes())
    runner = CliRunner()
    args = ["index", str(images), "--collection", str(tmp_path / "coll"), "--json"]
    first = runner.invoke(app, args + ["--model", str(tiny_llava_dir), "--device", "cpu"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["indexed"] == 4
    failed = {Path(f["path"]).name: f["reason"] for f in report["failed"]}
    assert set(failed) == {p.name for p in hostile}
    assert all("too elongated" in r and "crop or split" in r and "\n" not in r for r in failed.values())
    again = runner.invoke(app, args)  # the rerun neither dies nor retries them
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.stdout)
    assert rerun["indexed"] == 0 and rerun["unchanged"] == 4 and rerun["failed"] == []
    assert {Path(f["path"]).name for f in rerun["still_failing"]} == set(failed)
