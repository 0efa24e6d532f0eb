"""Nested budgets (issue 24): bytes per image at each budget of one nested compressor, and what shrinking a
collection costs: `f2b migrate --tokens k` (truncate the stored tokens, recompute each embedding with the
contrastive head) against re-encoding the same images at k (`f2b index --reindex --tokens k`: decode, vision
tower, pass 1), measured in the same run on the same machine, per 1,000 images.

Model, the first that applies: ``F2B_BENCH_DEMO_MODEL=FOLDER`` (a demo-model checkpoint not yet installed, when
it is nested); the shipped nested demo compressor ``demo-nested`` (real trained weights); the installed demo
model when it is itself a nested checkpoint; else a stand-in of the demo geometry with random weights whose
checkpoint says it was trained at 4, 8, 16 (speed depends on shapes, not values). ``--smoke`` always takes a
tiny stand-in. The tables say which ran. Images: a fresh shapes world.
Migrate times exclude loading the model (reported apart: `f2b migrate` pays it once per run, as does
`f2b index`); re-encode times are `ImageService.index` end to end, as `f2b index` runs it.

    python bench/bench_nested.py --quick
    python bench/bench_nested.py                 # 1,000 images
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _models as M  # noqa: E402

NAME = "nested"
GOAL_SPEEDUP = 50.0
STANDIN_BUDGETS = [4, 8, 16]


def nested_model(work: Path, smoke: bool) -> tuple[str, str, bool]:
    """(model, description, is_demo): the model the module docstring's order picks (``demo-nested`` unless
    ``F2B_BENCH_DEMO_MODEL`` or ``--smoke``), made a nested stand-in where the one found is not nested."""
    from fwd2bot_index.model import Fwd2BotConfig, demo_model_path, folder_fingerprint, is_checkpoint

    shipped = demo_model_path("demo-nested")
    if not smoke and not os.environ.get("F2B_BENCH_DEMO_MODEL") and is_checkpoint(shipped):
        budgets = Fwd2BotConfig.read(shipped).nested_budgets
        return "demo-nested", ("the shipped nested demo compressor (fwd2bot_index/demo_model_nested/, fingerprint "
                               f"{folder_fingerprint(shipped)[:12]}), trained at {budgets}"), True
    name, desc, is_demo = M.demo_or_standin(work, smoke=smoke)
    folder = Path(name) if Path(name).exists() else demo_model_path()
    if len(Fwd2BotConfig.read(folder).nested_budgets or []) > 1:
        return name, desc, is_demo
    if work not in folder.resolve().parents:  # the demo or a user's checkpoint, not nested: never edit it
        spec, k = (M.SMOKE, 8) if smoke else (M.DEMO_STANDIN, 16)
        folder = M.random_compressor(spec, work / "nested-standin", num_summary_tokens=k)
        desc = "a nested stand-in of the demo geometry with random weights " + (
            "(the installed demo model is not nested)" if name == "demo" else f"({name} is not nested)")
    config = json.loads((folder / "fwd2bot_config.json").read_text())
    k = config["num_summary_tokens"]
    config["nested_budgets"] = [b for b in STANDIN_BUDGETS if b < k] + [k]
    (folder / "fwd2bot_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return str(folder), desc + f"; checkpoint marked nested at {config['nested_budgets']}", False


def measure(model_name: str, n: int, work: Path) -> dict[str, Any]:
    from fwd2bot_index.service import open_service

    images = M.world_images(work / "world", n, image_size=64, seed=123) / "images"
    started = time.perf_counter()
    model = M.load(model_name)
    load_s = time.perf_counter() - started
    budgets = model.budgets
    big = budgets[-1]
    rows = []
    full = work / f"k{big}"
    C.log(f"indexing {n} images at K={big}")
    with open_service(full, model=model_name, device="cpu", create=True, writable=True) as svc:
        svc._model = model
        encode_s, _ = C.timed(lambda: svc.index([images], batch_size=32))
        info = svc.info()
    rows.append({"tokens": big, "bytes_per_image": info["bytes_per_image"],
                 "tokens_bytes_per_image": info["tokens_bytes_per_image"], "reencode_s": encode_s,
                 "migrate_s": None})
    for k in reversed(budgets[:-1]):
        C.log(f"re-encoding {n} images at k={k}, then migrating a copy of the K={big} collection")
        with open_service(work / f"scratch{k}", model=model_name, device="cpu", create=True, writable=True,
                          tokens=k) as svc:
            svc._model = model
            reencode_s, _ = C.timed(lambda: svc.index([images], batch_size=32))
        copy = work / f"migrated{k}"
        shutil.copytree(full, copy)
        with open_service(copy, device="cpu", writable=True) as svc:
            svc._model = model
            report = svc.migrate_tokens(k)
            info = svc.info()
            assert svc.verify().ok and report["images"] == n
        rows.append({"tokens": k, "bytes_per_image": info["bytes_per_image"],
                     "tokens_bytes_per_image": info["tokens_bytes_per_image"], "reencode_s": reencode_s,
                     "migrate_s": report["seconds"]})
    for row in rows:
        per = 1000.0 / n
        row["reencode_s_per_1000"] = row["reencode_s"] * per
        row["migrate_s_per_1000"] = None if row["migrate_s"] is None else row["migrate_s"] * per
        row["speedup"] = None if not row["migrate_s"] else row["reencode_s"] / row["migrate_s"]
    return {"images": n, "budgets": budgets, "hidden": model.backbone.hidden_size, "embed_dim": model.config.embed_dim,
            "model_load_s": load_s, "rows": rows}


def render(result: dict[str, Any], desc: str) -> str:
    h7 = M.LLAVA_7B["hidden"]
    lines = [f"Model: {desc}. {result['images']} shapes-world images; hidden {result['hidden']}, "
             f"embedding {result['embed_dim']}-d fp32, tokens fp16, FAISS flat.", ""]
    table = [(r["tokens"], r["tokens_bytes_per_image"], r["bytes_per_image"], r["tokens"] * h7 * 2,
              r["reencode_s_per_1000"], r["migrate_s_per_1000"] if r["migrate_s_per_1000"] is not None else "-",
              f"{r['speedup']:.0f}x" if r["speedup"] else "-") for r in result["rows"]]
    lines.append(C.md_table(["tokens/image", "token store B/image (measured)", "collection B/image (measured)",
                             "tokens B/image at LLaVA-1.5-7B (computed, H=4096)", "re-encode s / 1,000 images",
                             "migrate s / 1,000 images", "migrate speed-up"], table))
    lines += ["", f"The first row is the collection at K, indexed once; each other row shrinks a copy of it with "
                  f"`f2b migrate --tokens k` and compares with indexing the same images at k from scratch. Model "
                  f"load ({result['model_load_s']:.1f} s) is paid once by either command and is excluded."]
    return "\n".join(lines)


def goals(result: dict[str, Any], desc: str) -> list[dict[str, Any]]:
    speedups = [r["speedup"] for r in result["rows"] if r["speedup"]]
    worst = min(speedups) if speedups else None
    return [C.goal("nested", f"migrate >= {GOAL_SPEEDUP:.0f}x faster than re-encoding (demo geometry)",
                   f"{worst:.0f}x (slowest budget; {desc.split(';')[0]})" if worst else "-",
                   None if worst is None else worst >= GOAL_SPEEDUP)]


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__, NAME)
    p.add_argument("--images", type=int, help="world images (default 1000; quick 200)")
    p.add_argument("--smoke", action="store_true", help="tiny stand-in model (tests)")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    n = args.images or (200 if args.quick else 1000)
    machine = C.machine()
    with tempfile.TemporaryDirectory(prefix="f2b-bench-nested-") as tmp:
        name, desc, _ = nested_model(Path(tmp).resolve(), smoke=args.smoke)
        result = measure(name, n, Path(tmp).resolve())
    text = render(result, desc)
    print(text)
    C.write_json(args.json, {"name": NAME, "machine": machine, "model": desc, **result,
                             "goals": goals(result, desc), "markdown": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
