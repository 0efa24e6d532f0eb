"""Image decoding memory: peak RSS of the worst shapes under the limits, against the stated bound.

Each case runs in a fresh process (so one peak never hides another): imports first, then the resident
size is read and the high-water mark reset, the case runs, and the peak (``VmHWM``) minus that baseline
is the case's cost. The
images are one-colour PNGs written without holding their pixels (``image_shape.write_flat_png``), so the
files are KB while the decodes are the real thing.

Cases: the hostile shapes that used to cost gigabytes or a crash (4,000,000 x 10, 40,000,000 x 1; just
past 100:1) must be refused from the header for next to nothing; the largest images each limit still
admits (at the pixel cap and at 100:1; rotated by EXIF; alpha and 16-bit; at the decode-memory bound)
must stay under the estimate that admitted them (``image_shape.decode_bytes``). Paths: `f2b index`
(``load_image``: 89.5 M pixels, 1 GiB), the server (``check_image``: 40 M pixels, 512 MiB per decode,
2 decodes at once), and a LLaVA-style preprocessor (CLIP, short side 336) resizing a 100:1 picture, the
step that the aspect limit bounds.

Then what a whole `f2b index` run holds at once: ``INDEX_RUN_IMAGES`` solid-colour 12 MP PNGs (distinct
colours, so none is a duplicate) indexed with a tiny random model (the images, not the model, are what
is measured) with the default in-flight budget (``indexing.DEFAULT_MAX_INFLIGHT_BYTES``, 1 GiB) and with
none (the batch and the read-ahead bounded by counts only: up to 2 x 16 + 4 read ahead plus a batch of
16), each in a fresh process, the model loaded before the baseline.

    python bench/bench_memory.py            # at the limits (~1 GiB per case; about a minute)
    python bench/bench_memory.py --quick    # a quarter of the pixels (not at the limits: a smoke run)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

INDEX_PIXELS, INDEX_BYTES = 89_478_485, 1 << 30
SERVER_PIXELS, SERVER_BYTES = 40_000_000, 512 << 20
RESIZE_SIDE, RESIZE_BYTES_PER_PIXEL = 336, 20  # CLIP-style: PIL RGB (4) + uint8 array (3) + float32 copies (12+)
HOSTILE_MAX_MIB = 32  # a refused image may cost at most this above the baseline (reading the file, the header)
INDEX_RUN_IMAGES, INDEX_RUN_SIZE = 64, (4000, 3000)  # 12 MP: 45.8 MiB each as Pillow holds RGB (4 bytes a pixel)
# The budget counts decoded pixels held; a run's peak RSS also holds the preprocessor's copies of the batch being
# encoded (a CLIP-style processor turns each full-size picture into arrays before resizing: measured ~0.85 x the
# batch's bytes at 12 MP), the decodes in progress (up to 2 x an image each, 4 threads) and freed memory the
# allocator keeps: so a run's peak may be up to this x the budget above its baseline
INDEX_RUN_SLACK = 2.0


def _cases(quick: bool) -> list[dict]:
    """The shapes to measure: (name, path through the code, PNG geometry, the bound that admits it)."""
    from fwd2bot_index.image_shape import DECODE_OVERHEAD_BYTES
    from fwd2bot_index.image_shape import MAX_ASPECT_RATIO as A

    scale = 0.25 if quick else 1.0

    def at(pixels: float, aspect: float = 1.0) -> tuple[int, int]:
        h = int(math.sqrt(pixels * scale / aspect))
        return int(h * aspect), h

    wide = at(INDEX_PIXELS, A)
    cases = [
        {"name": "40,000,000 x 1 (grey, 1 bit)", "path": "index", "size": (40_000_000, 1), "png": (1, 0)},
        {"name": "4,000,000 x 10 (RGB)", "path": "index", "size": (4_000_000, 10), "png": (8, 2)},
        {"name": f"{A + 1}:1 just past the limit (RGB)", "path": "index", "size": ((A + 1) * 400, 400),
         "png": (8, 2)},
        {"name": f"{A}:1 at the pixel cap (RGB)", "path": "index", "size": wide, "png": (8, 2)},
        {"name": f"{A}:1 at the pixel cap, EXIF-rotated (RGB)", "path": "index", "size": wide, "png": (8, 2),
         "orientation": 6},
        {"name": "square at the pixel cap (RGBA)", "path": "index", "size": at(INDEX_PIXELS - 2**16), "png": (8, 6)},
        {"name": "square at the 1 GiB bound (grey + alpha)", "path": "index",
         "size": at((INDEX_BYTES - DECODE_OVERHEAD_BYTES) / 12 - 2**16), "png": (8, 4)},
        {"name": "square at the 1 GiB bound, EXIF-rotated (RGBA)", "path": "index",
         "size": at((INDEX_BYTES - DECODE_OVERHEAD_BYTES) / 12 - 2**16), "png": (8, 6), "orientation": 6},
        {"name": "square at the pixel cap (16-bit grey)", "path": "index", "size": at(INDEX_PIXELS - 2**16),
         "png": (16, 0)},
        {"name": "4,000,000 x 10 (RGB)", "path": "server", "size": (4_000_000, 10), "png": (8, 2)},
        {"name": f"{A}:1 at the server's pixel cap (RGB)", "path": "server", "size": at(SERVER_PIXELS, A), "png": (8, 2)},
        {"name": "square at the server's pixel cap (grey + alpha)", "path": "server", "size": at(SERVER_PIXELS - 2**16),
         "png": (8, 4)},
        {"name": f"{A}:1 resized to short side {RESIZE_SIDE} (CLIP preprocessor)", "path": "resize",
         "size": (A * 10, 10), "png": (8, 2)},
    ]
    return cases


def _peak() -> int:
    """This process's peak resident size: ``VmHWM`` (its own memory map's high-water mark; ``ru_maxrss``
    after fork and exec can still hold the parent's size at the fork, e.g. a pytest process with torch)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> int:
    """Start the high-water mark again from the resident size now (Linux: ``clear_refs`` 5); the old peak."""
    old = _peak()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return old


def _child(spec: dict) -> dict:
    """Run one case in this (fresh) process; the peak above the resident size measured just before it."""
    from fwd2bot_index.image_shape import decode_bytes
    from fwd2bot_index.imaging import ImageTooLargeError, load_image

    path = spec["file"]
    if spec["path"] == "server":
        from fwd2bot_index.api.problems import ApiProblem
        from fwd2bot_index.api.uploads import check_image
    if spec["path"] == "resize":
        from transformers import CLIPImageProcessorPil

        processor = CLIPImageProcessorPil(size={"shortest_edge": RESIZE_SIDE},
                                          crop_size={"height": RESIZE_SIDE, "width": RESIZE_SIDE})
    before = C.rss_bytes()
    peak_before = _reset_peak()
    outcome, estimate = "decoded", None
    (w, h), (depth, ctype) = spec["size"], spec["png"]
    mode = {(1, 0): "1", (8, 0): "L", (16, 0): "I;16", (8, 2): "RGB", (8, 4): "LA", (8, 6): "RGBA"}[(depth, ctype)]
    try:
        if spec["path"] == "index":
            estimate = decode_bytes(w, h, mode, oriented=bool(spec.get("orientation")))
            picture = load_image(path)
        elif spec["path"] == "server":
            estimate = decode_bytes(w, h, mode)
            picture = check_image(Path(path).read_bytes(), "upload.png", "image/png", 20 << 20, SERVER_PIXELS).picture
        else:
            picture = load_image(path)
            short = RESIZE_SIDE
            estimate = short * round(short * max(w, h) / min(w, h)) * RESIZE_BYTES_PER_PIXEL
            processor(images=[picture], return_tensors="np")
        del picture
    except ImageTooLargeError as exc:
        outcome = "refused: " + exc.reason.split(":")[0]
    except Exception as exc:  # noqa: BLE001 - the server's refusal is an ApiProblem
        if type(exc).__name__ != "ApiProblem":
            raise
        outcome = f"refused: {exc.status}"
    peak = _peak()
    return {"outcome": outcome, "estimate": estimate, "baseline": before,
            "above_baseline": max(0, peak - before), "peak_before_case": peak_before}


def _index_child(spec: dict) -> dict:
    """One `f2b index` run (``ImageService.index``) in this fresh process: its peak above the resident size
    once the model is loaded."""
    import torch

    from fwd2bot_index.service import open_service

    torch.set_num_threads(1)
    with open_service(spec["collection"], model=spec["model"], device="cpu", create=True) as svc:
        svc.preload()
        before = C.rss_bytes()
        _reset_peak()
        report = svc.index([spec["images"]], batch_size=16, workers=4, max_inflight_bytes=spec["budget"])
        peak = _peak()
    return {"indexed": report.indexed, "failed": len(report.failed), "seconds": report.seconds,
            "baseline": before, "above_baseline": max(0, peak - before)}


def measure_index(quick: bool, workdir: Path) -> list[dict]:
    """The same folder of large PNGs indexed with the default in-flight budget and with none."""
    from fwd2bot_index.image_shape import held_bytes, write_flat_png
    from fwd2bot_index.indexing import DEFAULT_MAX_INFLIGHT_BYTES
    from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava

    n, (w, h) = (12, (1200, 900)) if quick else (INDEX_RUN_IMAGES, INDEX_RUN_SIZE)
    model = save_tiny_llava(workdir / "model", TinySpec(image_size=64, patch_size=16, vision_hidden=32,
                                                        vision_layers=1, hidden=64, layers=2, heads=4), seed=0)
    images = workdir / "large"
    images.mkdir()
    for i in range(n):
        write_flat_png(images / f"{i:03d}.png", w, h, fill=(i * 37 % 256, i * 91 % 256, i * 53 % 256))
    C.log(f"index: {n} solid-colour {w}x{h} PNGs ({sum(f.stat().st_size for f in images.iterdir()):,} bytes on disk)")
    budget = DEFAULT_MAX_INFLIGHT_BYTES // 64 if quick else DEFAULT_MAX_INFLIGHT_BYTES  # quick: 4 images' worth
    rows = []
    for name, limit in (("default budget", budget), ("no byte budget (counts only)", None)):
        spec = {"collection": str(workdir / f"c{len(rows)}"), "model": str(model), "images": str(images),
                "budget": limit}
        done = subprocess.run([sys.executable, __file__, "--index-child", json.dumps(spec)], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"index run {name} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        C.log(f"index, {name}: peak {result['above_baseline'] / 2**20:,.0f} MiB above the baseline")
        rows.append({"name": name, "budget": limit, "images": n, "size": (w, h), "held_each": held_bytes(w, h, "RGB"),
                     **result})
    return rows


def measure(quick: bool, workdir: Path, first: int | None = None) -> list[dict]:
    """Every case (or the ``first`` few: the smoke test), each in its own process."""
    from fwd2bot_index.image_shape import write_flat_png

    rows = []
    for n, case in enumerate(_cases(quick)[:first]):
        (w, h), (depth, ctype) = case["size"], case["png"]
        file = workdir / f"case{n}.png"
        write_flat_png(file, w, h, depth, ctype, orientation=case.get("orientation"))
        C.log(f"{case['path']}: {case['name']} {w}x{h} ({file.stat().st_size:,} bytes on disk)")
        spec = {**case, "file": str(file)}
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"case {case['name']} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        file.unlink()
        rows.append({**case, **result, "pixels": w * h})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(_child(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["--index-child"]:
        print(json.dumps(_index_child(json.loads(argv[1]))))
        return 0
    from fwd2bot_index.image_shape import MAX_ASPECT_RATIO as A

    p = C.parser(__doc__, "memory")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="f2b-bench-memory-") as tmp:
        rows = measure(args.quick, Path(tmp))
        runs = measure_index(args.quick, Path(tmp))
    mib = 2**20
    table = C.md_table(
        ["path", "image", "size", "outcome", "estimate MiB", "peak above baseline MiB", "peak / estimate"],
        [[r["path"], r["name"], f"{r['size'][0]:,} x {r['size'][1]:,}", r["outcome"],
          "" if r["estimate"] is None or r["outcome"] != "decoded" else r["estimate"] / mib,
          r["above_baseline"] / mib,
          "" if r["outcome"] != "decoded" else f"{r['above_baseline'] / r['estimate']:.2f}"] for r in rows])
    refused = [r for r in rows if r["outcome"] != "decoded"]
    decoded = [r for r in rows if r["outcome"] == "decoded"]
    hostile_ok = all(r["above_baseline"] <= HOSTILE_MAX_MIB * mib for r in refused) and len(refused) >= 4
    worst = max((r["above_baseline"] / r["estimate"] for r in decoded), default=0.0)
    largest = max((r["above_baseline"] for r in decoded), default=0)
    bounded, free = runs
    ratio = bounded["above_baseline"] / max(1, free["above_baseline"])
    run_ok = (bounded["above_baseline"] <= INDEX_RUN_SLACK * bounded["budget"] and ratio < 1
              and bounded["indexed"] == free["indexed"] == bounded["images"])
    run_table = C.md_table(
        ["in-flight budget", "images indexed", "peak above baseline MiB", "= decoded images' worth", "images/s"],
        [[r["name"] + ("" if r["budget"] is None else f" ({r['budget'] / mib:,.0f} MiB)"), r["indexed"],
          r["above_baseline"] / mib, f"{r['above_baseline'] / r['held_each']:.1f}",
          r["indexed"] / r["seconds"] if r["seconds"] else ""] for r in runs])
    goals = [
        C.goal("decode memory", f"every hostile shape refused from its header for <= {HOSTILE_MAX_MIB} MiB",
               f"{len(refused)} refused, at most {max(r['above_baseline'] for r in refused) / mib:.1f} MiB",
               hostile_ok),
        C.goal("decode memory", "every admitted image at the limits peaks within its estimate (the bound)",
               f"worst peak / estimate {worst:.2f}, largest peak {largest / mib:,.0f} MiB", worst <= 1.0),
        C.goal("decode memory", f"`f2b index` of {bounded['images']} large photos is bounded by its in-flight budget: "
               f"peak RSS <= {INDEX_RUN_SLACK:g} x the budget (decoded pixels, plus the processor's copies of a "
               "batch), below a run bounded by counts only",
               f"{bounded['above_baseline'] / mib:,.0f} MiB with {bounded['budget'] / mib:,.0f} MiB vs "
               f"{free['above_baseline'] / mib:,.0f} MiB without (ratio {ratio:.2f})", run_ok),
    ]
    print(f"{C.machine_line(C.machine(), load=False)}\n\n"
          f"{'A quarter of the pixels (quick run): not at the limits. ' if args.quick else ''}"
          f"Each case in a fresh process; peak RSS (`VmHWM`, reset just before the case) minus the resident size just before it. Bounds: "
          f"`f2b index` {INDEX_PIXELS:,} pixels and {INDEX_BYTES / mib:,.0f} MiB of decode estimate per image "
          f"(several decode threads may each hold one); the server {SERVER_PIXELS:,} pixels and "
          f"{SERVER_BYTES / mib:,.0f} MiB per decode, 2 decodes at once; long side <= {A}x the short side "
          f"everywhere, so a preprocessor's resize to short side S holds <= {A} S^2 pixels.\n\n{table}\n\n"
          f"Hostile shapes: {C.verdict(hostile_ok)}; admitted images within their estimate: "
          f"{C.verdict(worst <= 1.0)} (worst ratio {worst:.2f}).\n\n"
          f"**A whole `f2b index` run** of {bounded['images']} solid-colour {bounded['size'][0]:,} x "
          f"{bounded['size'][1]:,} PNGs (distinct colours; {bounded['held_each'] / mib:.1f} MiB each as Pillow holds "
          f"RGB), batch size 16, 4 decode threads, a tiny random model (the images are what is measured), each run "
          f"in a fresh process, peak above the resident size once the model is loaded:\n\n{run_table}\n\n"
          f"Peak with the default budget / without one: **{ratio:.2f}**; {C.verdict(run_ok)}. The budget counts the "
          f"decoded pixels held (the batch being filled and the read-ahead, half each); the peak also holds the "
          f"preprocessor's copies of the batch being encoded, the decodes in progress and memory the allocator "
          f"keeps, hence up to {INDEX_RUN_SLACK:g} x the budget.")
    C.write_json(args.json, {"rows": rows, "index_runs": runs, "index_ratio": ratio, "goals": goals,
                             "machine": C.machine(), "quick": args.quick})
    return 0


if __name__ == "__main__":
    sys.exit(main())
