"""``python -m fwd2bot_index.training.demo_recipe``: train the demo model, measure its claims, write the tables.

The recipe itself lives in ``fwd2bot_index.training.demo`` (one module per stage); this module is
its command line and keeps the historical import path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from .demo import *  # noqa: F401,F403 - the historical import path
from .demo import VARIANTS, measure_demo_claims, train_demo_model, write_claims_table
from .demo.recipe import variant_model
from .demo.report import only_variants, read_results, record_relevance_verdict
from .demo.report import _replace_between_markers  # noqa: F401 - used by tests


def _default_out() -> Path:
    from ..model.checkpoint import demo_model_path

    return demo_model_path()


def main(argv: Sequence[str] | None = None) -> int:
    """Train (unless --measure-only), measure, write the claims tables; a killed run goes on when rerun."""
    parser = argparse.ArgumentParser(prog="python -m fwd2bot_index.training.demo_recipe",
                                     description="Train the shipped demo model and measure Fwd2Bot's claims on it.")
    parser.add_argument("--out", default=None, help="checkpoint folder to write (default: the package's demo_model)")
    parser.add_argument("--quick", action="store_true", help="tiny step counts and data: proves the recipe runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: idle cores)")
    parser.add_argument("--work-dir", default=None,
                        help="stages and intermediate models (a rerun continues from what is there)")
    parser.add_argument("--variants", default="",
                        help=f"other compressors to train and compare, comma-separated: {', '.join(v for v in VARIANTS if v != 'k16')}")
    parser.add_argument("--stop-after", choices=("warmup", "base"), default=None, help="end the run after this stage")
    parser.add_argument("--base-from", default=None,
                        help="continue this stock LLaVA folder (e.g. an earlier demo model's base/) instead of "
                             "a vision warm-up and a fresh LLM")
    parser.add_argument("--compressors-only", action="store_true",
                        help="train exactly --variants (k16 not implied; the base must be done) and stop: run one "
                             "such process per core, then the plain command exports and measures")
    parser.add_argument("--measure-only", action="store_true", help="measure an existing model, do not train")
    parser.add_argument("--no-measure", action="store_true", help="train only")
    parser.add_argument("--eval-dir", default=None, help="held-out data folder (written when empty)")
    parser.add_argument("--n-gallery", type=int, default=1000)
    parser.add_argument("--readme", default=None, help="README.md to put the claims table in (between its markers)")
    parser.add_argument("--json", default=None, help="also write the measured results as JSON here")
    parser.add_argument("--from-json", default=None,
                        help="render the claims tables from results saved with --json instead of measuring; "
                             "--variants then picks which compressors' rows to keep")
    parser.add_argument("--export-nested", default=None, metavar="VARIANT",
                        help="with --from-json and --work-dir: export that nested compressor as the shipped "
                             "demo-nested model (sharing the demo model's base), with its card")
    args = parser.parse_args(argv)
    variants = tuple(v for v in args.variants.split(",") if v)
    if args.compressors_only and not variants:
        parser.error("--compressors-only needs --variants (which compressors this process trains)")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    if args.export_nested:  # it overwrites the shipped demo-nested: refuse anything but that exact use
        if not (args.from_json and args.work_dir):
            parser.error("--export-nested needs --from-json (the results its card shows) and --work-dir (where "
                         "the compressor was trained)")
        nested = [v for v, spec in VARIANTS.items() if spec.get("nested")]
        if args.export_nested not in nested:
            parser.error(f"--export-nested {args.export_nested}: not a nested compressor (demo-nested must take "
                         f"--tokens); choose from {', '.join(nested)}")
    out = Path(args.out) if args.out else _default_out()
    if args.from_json:
        results = read_results(args.from_json)
        if args.export_nested:
            from ..model.files import demo_model_path
            from .demo.nested_export import write_nested_model

            checkpoint = Path(args.work_dir) / f"compressor-{args.export_nested}" / "model"
            card = write_nested_model(checkpoint, demo_model_path("demo-nested"), results, args.export_nested)
            print(f"nested model written, card {card}")
        if variants:
            results = only_variants(results, variants)
        print(write_claims_table(results, args.readme, out / "README.md"))
        return 0
    if not args.measure_only:
        report = train_demo_model(out, quick=args.quick, seed=args.seed, device=args.device, progress=True,
                                  work_dir=args.work_dir, threads=args.threads, variants=variants,
                                  stop_after=args.stop_after, base_from=args.base_from,
                                  compressors_only=args.compressors_only)
        if args.stop_after or args.compressors_only:
            return 0
        print(json.dumps({"trained": str(out), "seconds": round(report["seconds"], 1),
                          "size_bytes": report["size_bytes"]}))
    if args.no_measure:
        return 0
    paths = {v: str(variant_model(Path(args.work_dir), v)) for v in variants if v != "k16"} if args.work_dir else {}
    results = measure_demo_claims(out, data_dir=args.eval_dir, n_gallery=args.n_gallery, quick=args.quick,
                                  device=args.device, progress=True, threads=args.threads, variants=paths)
    results["relevance_ranks_well"] = record_relevance_verdict(out, results)  # the search page's default
    block = write_claims_table(results, args.readme, out / "README.md")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
