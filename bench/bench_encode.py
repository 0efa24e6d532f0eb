"""Figure 3, encoding: pass-1 images/s against batch size, and end-to-end `f2b index` images/s against
model-only throughput on the same images.

Pass 1 = ``Fwd2Bot.encode_images`` under the model's default strategy (preprocessing, vision tower, the
LLM pass over visual + summary tokens, the embedding head) on images already decoded in memory.
End to end = the real `f2b index DIR --json` command in a subprocess (scan, hash, decode in worker
threads, encode, write token shards, catalog and FAISS index, compaction); its own report's images/s
excludes loading the model, as does the model-only figure. The ratio (goal >= 0.9) says whether
decoding and storage hide behind compute. Model-only and end-to-end runs alternate, and the ratio is
taken per round against the mean of the model-only runs just before and just after it, so load from
other processes hits both alike. Each round also records where `f2b index` spent its time (the
report's ``timings``: hashing, waiting for decoded images, encoding, committing on the writer thread,
waiting for the writer, compaction and save), so a missed goal is explained by numbers.

Measured on the demo model (small: ~5 ms of compute per image on 2 cores, so the milliseconds of
decoding (~0.2 ms per 64 px PNG), committing (~4 ms per batch) and a fresh process's first pass show)
and on a LLaVA-1.5 shape with 576 visual tokens where compute dominates.

    python bench/bench_encode.py --quick
    python bench/bench_encode.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _models as M  # noqa: E402

NAME = "encode"
GOAL_RATIO = 0.9
BATCHES = (1, 4, 16, 32)


def decoded(folder: Path) -> list[Any]:
    from fwd2bot_index.imaging import load_image

    return [load_image(p) for p in sorted((folder / "images").glob("*.png"))]


def pass1_throughput(model: Any, images: list[Any], batch_size: int) -> float:
    """Images/s of ``encode_images`` at ``batch_size`` (one warm-up batch first)."""
    model.encode_images(images[:batch_size], batch_size=batch_size)
    seconds, _ = C.timed(lambda: model.encode_images(images, batch_size=batch_size))
    return len(images) / seconds


def cli_index(model_name: str, images: Path, collection: Path, batch_size: int) -> dict:
    """Run the real `f2b index` command; returns its JSON report plus wall time (model load included)."""
    cmd = [sys.executable, "-m", "fwd2bot_index.cli", "index", str(images), "--collection", str(collection),
           "--model", model_name, "--device", "cpu", "--dtype", "fp32", "--batch-size", str(batch_size), "--json"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(C.ROOT), timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"`f2b index` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    report = json.loads(done.stdout)
    report["wall_s"] = wall
    return report


COLD_PASS = """
import gc, json, sys, time
sys.path.insert(0, sys.argv[1])
import bench_encode as B, _models as M
model = M.load(sys.argv[2])
images = B.decoded(B.Path(sys.argv[3]))
gc.freeze()  # as `f2b index` does for its run: no full collection walking the just-loaded libraries
start = time.perf_counter()
model.encode_images(images, batch_size=int(sys.argv[4]))
print(json.dumps(time.perf_counter() - start))
"""


def cold_model_only(model_name: str, world: Path, batch_size: int) -> float:
    """Seconds of the first ``encode_images`` pass in a fresh process (no warm-up, the GC set as `f2b index`
    sets it), alone on the machine's cores: what part of the gap is the encoder's own first pass rather
    than the pipeline's threads beside it."""
    done = subprocess.run([sys.executable, "-c", COLD_PASS, str(Path(__file__).resolve().parent), model_name, str(world),
                           str(batch_size)], capture_output=True, text=True, cwd=str(C.ROOT), timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the cold model-only pass failed: {done.stderr.strip()[-500:]}")
    return float(done.stdout.strip().splitlines()[-1])


def end_to_end(label: str, model_name: str, n: int, batch_size: int, rounds: int, work: Path, tag: str) -> dict:
    model = M.load(model_name)
    geometry = M.model_geometry(model)
    world = M.world_images(work / f"world-{tag}", n, geometry["image_size"], seed=3)
    images = decoded(world)
    model.encode_images(images[:batch_size], batch_size=batch_size)  # warm-up
    per_round = []
    before = pass1_throughput(model, images, batch_size)
    for r in range(rounds):
        report = cli_index(model_name, world / "images", work / f"coll-{tag}-{r}", batch_size)
        after = pass1_throughput(model, images, batch_size)
        if report["indexed"] != n:
            raise RuntimeError(f"`f2b index` indexed {report['indexed']} of {n} images: {report.get('failed')}")
        model_only = (before + after) / 2  # the model-only runs on either side of this index run
        per_round.append({"model_only": model_only, "index": report["images_per_second"],
                          "ratio": report["images_per_second"] / model_only, "wall_s": report["wall_s"],
                          "seconds": report["seconds"], "model_only_s": n / model_only,
                          "timings": report.get("timings", {})})
        C.log(f"  {label} round {r + 1}: model-only {model_only:.1f} img/s, f2b index "
              f"{report['images_per_second']:.1f} img/s; {breakdown_text(per_round[-1])}")
        before = after
    cold = cold_model_only(model_name, world, batch_size)
    for run in per_round:
        run["cold_model_only_s"] = cold
    C.log(f"  {label}: a fresh process's first model-only pass (no warm-up) takes {cold:.2f} s "
          f"({n / cold:.1f} img/s)")
    middle = sorted(per_round, key=lambda x: x["ratio"])[(len(per_round) - 1) // 2]  # the median round
    return {"label": label, "geometry": geometry, "images": n, "batch_size": batch_size, "rounds": per_round,
            "model_only": C.median([x["model_only"] for x in per_round]),
            "index": C.median([x["index"] for x in per_round]),
            "ratio": C.median([x["ratio"] for x in per_round]), "cold_model_only_s": cold,
            "breakdown": breakdown_text(middle)}


def breakdown_text(run: dict) -> str:
    """Where one `f2b index` run's seconds went, next to what model-only needs for the same images."""
    t = run.get("timings") or {}
    if not t:
        return f"f2b index {run['seconds']:.2f} s vs model-only {run['model_only_s']:.2f} s"
    other = run["seconds"] - sum(t.get(k, 0.0) for k in ("check", "decode_wait", "encode", "commit_wait", "finish"))
    cold = (f"; a fresh process's first model-only pass, alone, takes {run['cold_model_only_s']:.2f} s"
            if run.get("cold_model_only_s") else "")
    return (f"f2b index {run['seconds']:.2f} s vs model-only {run['model_only_s']:.2f} s (warmed up{cold}): encoding "
            f"{t['encode']:.2f} s (the model, with decode and commit threads beside it), waiting for decoded images "
            f"{t['decode_wait']:.2f} s, hashing {t['check']:.2f} s, commits {t['commit']:.2f} s on the writer "
            f"thread of which the encoder waited {t['commit_wait']:.2f} s, compaction and save {t['finish']:.2f} s, "
            f"the rest (scan, stat, thread start) {max(other, 0.0):.2f} s")


def batch_sweep(model_name: str, n: int, work: Path) -> dict:
    model = M.load(model_name)
    geometry = M.model_geometry(model)
    images = decoded(M.world_images(work / "world-sweep", n, geometry["image_size"], seed=4))
    rates = {}
    for b in BATCHES:
        rates[b] = pass1_throughput(model, images, b)
        C.log(f"  batch {b}: {rates[b]:.1f} img/s")
    return {"geometry": geometry, "images": n, "images_per_s": rates, "strategy": model.default_strategy.name}


def render(sweep: dict, e2e: list[dict], desc: str) -> str:
    g = sweep["geometry"]
    base = sweep["images_per_s"][BATCHES[0]]
    lines = [f"**Pass-1 throughput vs batch size** ({desc}; {M.geometry_text(g)}; strategy {sweep['strategy']}; "
             f"{sweep['images']} images decoded in memory)", ""]
    lines.append(C.md_table(["batch size", "images/s", "vs batch 1"],
                            [[b, r, f"{r / base:.2f}x"] for b, r in sweep["images_per_s"].items()]))
    lines += ["", "**End-to-end `f2b index` vs model-only `encode_images`** (same images, same batch size)", ""]
    rows = []
    for r in e2e:
        kind = "compute dominates" if r["geometry"]["visual_tokens"] >= 576 else "small model: per-batch costs show"
        rows.append([r["label"], kind, r["images"], r["batch_size"], r["model_only"], r["index"], f"{r['ratio']:.2f}",
                     "met" if r["ratio"] >= GOAL_RATIO else "**MISSED**"])
    lines.append(C.md_table(["model", "regime", "images", "batch", "model-only images/s", "f2b index images/s",
                             "ratio (goal >= 0.9)", "goal"], rows))
    lines += ["", "Median of per-round ratios over "
              f"{len(e2e[0]['rounds']) if e2e else 0} rounds, each `f2b index` run against the mean of the model-only "
              "runs just before and after it; `f2b index` runs in a subprocess and its images/s is its own report's "
              "(model load excluded)."]
    for r in e2e:
        lines.append(f"- {r['label']}: {M.geometry_text(r['geometry'])}; median round: {r['breakdown']}.")
    return "\n".join(lines)


def goals(e2e: list[dict]) -> list[dict]:
    out = []
    for r in e2e:
        met = r["ratio"] >= GOAL_RATIO
        why = "" if met else f"median round: {r['breakdown']}"
        out.append(C.goal("3", f"`f2b index` / model-only >= {GOAL_RATIO} ({r['label']})", f"{r['ratio']:.2f}", met, why))
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__, NAME)
    p.add_argument("--images", type=int, help="images for the demo-model runs (default 256; quick 48)")
    p.add_argument("--compute-images", type=int, help="images for the LLaVA-1.5-shape run (default 32; quick 8)")
    p.add_argument("--rounds", type=int, help="alternating model-only / f2b index rounds (default 3; quick 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--models", default="demo,llava15",
                   help="end-to-end runs, comma-separated: demo, llava15 (the batch sweep always uses demo)")
    p.add_argument("--smoke", action="store_true", help="tiny geometries only (tests)")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    n = args.images or (48 if args.quick else 256)
    n_compute = args.compute_images or (8 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)
    info = C.machine()
    with tempfile.TemporaryDirectory(prefix="f2b-bench-encode-") as tmp:
        work = Path(tmp)
        name, desc, is_demo = M.demo_or_standin(work, smoke=args.smoke)
        demo_label = "demo model" if is_demo else ("smoke model" if args.smoke else "demo stand-in")
        C.log("encode: batch-size sweep ...")
        sweep = batch_sweep(name, n, work)
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if set(models) - {"demo", "llava15"}:
            p.error(f"unknown model(s) in --models {args.models!r}: use demo, llava15")
        e2e = []
        if "demo" in models:
            C.log("encode: end to end, demo model ...")
            e2e.append(end_to_end(demo_label, name, n, args.batch_size, rounds, work, "demo"))
        if "llava15" in models:
            spec = M.SMOKE if args.smoke else M.LLAVA15_COMPUTE
            C.log(f"encode: end to end, LLaVA-1.5 shape ({M.spec_text(spec)}) ...")
            folder = M.random_compressor(spec, work / "llava15", num_summary_tokens=32 if not args.smoke else 8)
            e2e.append(end_to_end("LLaVA-1.5 shape, random weights" if not args.smoke else "smoke shape", str(folder),
                                  n_compute, args.batch_size, rounds, work, "llava15"))
    text = render(sweep, e2e, desc)
    print(text)
    C.write_json(args.json, {"figure": 3, "name": NAME, "machine": info, "model": desc, "sweep": sweep, "e2e": e2e,
                             "goals": goals(e2e), "markdown": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
