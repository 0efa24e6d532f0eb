"""Continue a demo base run from its saved state with other answer weights, to see whether a plateau moves.

    python experiments/base_continue.py --run RUN --out DIR [--minutes 50] [--weight position=3 --weight count=2]
                                        [--positions 2d] [--all-tokens] [--fresh-lr]

RUN is a base-run folder of the demo recipe (``state.pt``, ``curves.jsonl``, ``model/``; a recipe's work
dir keeps it as ``base-run``). Its state and curves are copied to DIR, which then resumes exactly like the
stage does (same scenes per step, same plateau schedule, its own time budget on top of the time spent),
with the weights given here instead of the recipe's. Per-type held-out curves go to DIR/curves.jsonl.
``--positions 2d`` gives the visual tokens (row, column) rotary ids (``grid_rope.py``) for the whole
run (measure the result with ``position_errors.py --positions 2d``); ``--all-tokens`` trains on all
visual tokens only (no pooled sequences, whose shorter blocks the 2-D mapping does not lay out);
``--fresh-lr`` restarts the plateau schedule at the full learning rate (with ``--all-tokens``: the
recipe's ``base-finish`` stage, which this experiment found). Behind docs/DEMO_MODEL.md's
"A longer run alone does not lift position" and its 2-D positions experiment. Rerunning continues DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from fwd2bot_index.model import Fwd2Bot
from fwd2bot_index.synthetic.qa import QA_TYPES
from fwd2bot_index.training.demo.base import POOLED_SHARE, restart_state, train_base
from fwd2bot_index.training.demo.recipe import FULL, base_training_args
from fwd2bot_index.training.demo.stage_state import load_stage_state
from fwd2bot_index.training.schedule import PerTypeStopRule, PlateauLR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="the base-run folder to continue from")
    parser.add_argument("--out", required=True, type=Path, help="where the continued run goes")
    parser.add_argument("--minutes", type=float, default=50.0, help="training time on top of the run's own")
    parser.add_argument("--weight", action="append", default=[], metavar="TYPE=W",
                        help="answer weight of a question type (repeatable; default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="the recipe seed the run was trained with")
    parser.add_argument("--positions", choices=("1d", "2d"), default="1d",
                        help="the visual tokens' rotary ids: 1d as trained, 2d (row, column; grid_rope.py)")
    parser.add_argument("--all-tokens", action="store_true", help="no pooled sequences: all visual tokens only")
    parser.add_argument("--fresh-lr", action="store_true", help="restart the plateau schedule at the full rate")
    args = parser.parse_args(argv)
    recipe = FULL
    weights = dict(recipe.base_type_weights)
    for item in args.weight:
        kind, _, value = item.partition("=")
        if kind not in QA_TYPES or not value:
            parser.error(f"--weight {item}: expected TYPE=W with TYPE one of {', '.join(QA_TYPES)}")
        weights[kind] = float(value)
    state = load_stage_state(args.run / "state.pt")
    if state is None:
        parser.error(f"{args.run} has no state.pt: not a base run of the demo recipe")
    restart_state(args.run, args.out, fresh_rate=args.fresh_lr)  # fresh: what the recipe's base-finish does
    torch.set_num_threads(1)
    positions = contextlib.nullcontext()
    if args.positions == "2d":
        from grid_rope import positions_for

        positions = positions_for(Fwd2Bot.from_pretrained(str(args.run / "model"), device="cpu", dtype="fp32"), "2d")
    budget = float(state["seconds"]) + args.minutes * 60
    stop = PerTypeStopRule(floor=recipe.base_floor, types=QA_TYPES, max_steps=10 ** 6, max_seconds=budget)
    with positions:
        shared = base_training_args(recipe, args.seed, lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True))
        summary = train_base(args.run / "model", args.out, **{**shared, "type_weights": weights},
                             schedule=PlateauLR(warmup=recipe.base_warmup, patience=recipe.base_patience), stop=stop,
                             pooled_share=() if args.all_tokens else POOLED_SHARE)
    print(f"stopped by {summary['stopped_by']} at step {summary['steps']}: {summary['heldout']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
