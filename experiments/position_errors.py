"""Where a demo base's position answers go wrong: row vs column, by number of objects, top confusions.

    python experiments/position_errors.py --model DIR [--scenes 256] [--seed 0] [--json FILE]

DIR is a stock LLaVA folder (the demo model's ``base/``, or a base run's ``model/``); answers come from all
visual tokens, the way the base is measured. Behind docs/DEMO_MODEL.md's "Where position fails".
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import Any

import numpy as np
import torch

from fwd2bot_index.model import Fwd2Bot
from fwd2bot_index.synthetic.world import POSITIONS
from fwd2bot_index.training.demo.scenes import heldout_scenes


def position_errors(model: Fwd2Bot, scenes: list[Any], batch: int = 128) -> dict[str, Any]:
    """Ask "where is the <colour> <shape>?" of every object of every scene and score the answers."""
    size = int(model.backbone.config.vision_config.image_size)
    with torch.no_grad():
        visual = model.visual_tokens(model.backbone.pixel_values([s.render(size) for s in scenes]))
    asked = [(i, f"where is the {o.color} {o.shape}?", o.position, len(s.objects))
             for i, s in enumerate(scenes) for o in s.objects]
    answers: list[str] = []
    for start in range(0, len(asked), batch):
        chunk = asked[start:start + batch]
        answers += model.answer_batch([visual[i] for i, *_ in chunk], [q for _, q, *_ in chunk],
                                      max_new_tokens=6, kind="full")
    rows, cols, by_objects, confusions = [], [], collections.defaultdict(list), collections.Counter()
    for answer, (_, _, truth, n) in zip(answers, asked):
        answer = answer.strip().lower()
        by_objects[n].append(answer == truth)
        true_row, true_col = divmod(POSITIONS.index(truth), 3)
        row, col = divmod(POSITIONS.index(answer), 3) if answer in POSITIONS else (-1, -1)
        rows.append(row == true_row)
        cols.append(col == true_col)
        if answer != truth:
            confusions[f"{truth} -> {answer}"] += 1
    exact = [a for v in by_objects.values() for a in v]
    return {"questions": len(asked), "exact": float(np.mean(exact)), "row": float(np.mean(rows)),
            "column": float(np.mean(cols)),
            "by_objects": {n: {"questions": len(v), "exact": float(np.mean(v))} for n, v in sorted(by_objects.items())},
            "confusions": dict(confusions.most_common(12))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a stock LLaVA folder (a demo base)")
    parser.add_argument("--scenes", type=int, default=256, help="held-out monitor scenes (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="the recipe seed whose monitor scenes to use")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = Fwd2Bot.from_pretrained(args.model, device="cpu", dtype="fp32")
    model.backbone.hf.eval()
    result = position_errors(model, heldout_scenes(args.seed, args.scenes))
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
