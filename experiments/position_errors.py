"""Where a demo base's position answers go wrong: row vs column, by number of objects, by neighbours
in the same row and by objects sharing a colour or shape, and whether a wrong answer names another
object's cell; optionally with the visual tokens' position ids laid out otherwise than in training.

    python experiments/position_errors.py --model DIR [--scenes 256] [--seed 0] [--layout L ...] [--positions 2d]
                                          [--json FILE]

DIR is a stock LLaVA folder (the demo model's ``base/``, or a base run's ``model/``); answers come from all
visual tokens, the way the base is measured. ``--layout`` (repeatable) re-asks with the 8x8 visual tokens'
position ids permuted while their content stays: ``mirror-columns`` (a row's ids reversed),
``mirror-rows``, ``transpose`` (column-major) or ``shared`` (every visual token at the block's first id).
If an answer's row or column follows the permuted ids, the LLM reads it from RoPE, not from the tokens.
``--positions 2d`` answers with (row, column) rotary ids (``grid_rope.py``), for a base trained that way.
Behind docs/DEMO_MODEL.md's "Where position fails".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import types
from typing import Any, Iterator

import numpy as np
import torch

from fwd2bot_index.model import Fwd2Bot
from fwd2bot_index.synthetic.world import POSITIONS
from fwd2bot_index.training.demo.scenes import heldout_scenes
from grid_rope import positions_for, square_side

LAYOUTS = ("row-major", "mirror-columns", "mirror-rows", "transpose", "shared")


def _cell(position: str) -> tuple[int, int]:
    return divmod(POSITIONS.index(position), 3)


def layout_offsets(count: int, layout: str) -> torch.Tensor:
    """(count,) position offsets of a square grid of visual tokens (row-major is how they were trained)."""
    side = square_side(count)
    row, col = torch.arange(count) // side, torch.arange(count) % side
    offsets = {"row-major": row * side + col, "mirror-columns": row * side + (side - 1 - col),
               "mirror-rows": (side - 1 - row) * side + col, "transpose": col * side + row,
               "shared": torch.zeros(count, dtype=torch.long)}
    return offsets[layout]


@contextlib.contextmanager
def visual_layout(model: Fwd2Bot, layout: str) -> Iterator[None]:
    """Answer with the stored visual block's position ids permuted by ``layout`` (text positions unchanged)."""
    if layout == "row-major":
        yield
        return

    def stored_positions(self, mask: torch.Tensor, blocks, kind: str) -> torch.Tensor:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        for i, (start, count) in enumerate(blocks):
            first = mask.shape[1] - int(mask[i].sum()) + start  # rows are left-padded
            positions[i, first:first + count] = positions[i, first] + layout_offsets(count, layout)
        return positions

    backbone = model.backbone
    backbone.stored_positions = types.MethodType(stored_positions, backbone)
    try:
        yield
    finally:
        del backbone.stored_positions


def position_errors(model: Fwd2Bot, scenes: list[Any], batch: int = 128, layout: str = "row-major") -> dict[str, Any]:
    """Ask "where is the <colour> <shape>?" of every object of every scene and score the answers."""
    size = int(model.backbone.config.vision_config.image_size)
    with torch.no_grad():
        visual = model.visual_tokens(model.backbone.pixel_values([s.render(size) for s in scenes]))
    asked = [(i, o) for i, s in enumerate(scenes) for o in s.objects]
    answers: list[str] = []
    with visual_layout(model, layout):
        for start in range(0, len(asked), batch):
            chunk = asked[start:start + batch]
            answers += model.answer_batch([visual[i] for i, _ in chunk],
                                          [f"where is the {o.color} {o.shape}?" for _, o in chunk],
                                          max_new_tokens=6, kind="full")
    rows, cols, confusions = [], [], collections.Counter()
    by_objects, by_row_neighbours, by_sharers = (collections.defaultdict(list) for _ in range(3))
    wrong, wrong_named_other = 0, 0
    for answer, (i, obj) in zip(answers, asked):
        answer, others = answer.strip().lower(), [o for o in scenes[i].objects if o is not obj]
        right = answer == obj.position
        true_row, true_col = _cell(obj.position)
        row, col = _cell(answer) if answer in POSITIONS else (-1, -1)
        rows.append(row == true_row)
        cols.append(col == true_col)
        by_objects[len(scenes[i].objects)].append(right)
        by_row_neighbours[sum(_cell(o.position)[0] == true_row for o in others)].append(right)
        by_sharers[min(2, sum(o.color == obj.color or o.shape == obj.shape for o in others))].append(right)
        if not right:
            confusions[f"{obj.position} -> {answer}"] += 1
            wrong += 1
            wrong_named_other += answer in {o.position for o in others}

    def scored(groups: dict[int, list[bool]]) -> dict[int, dict[str, float]]:
        return {n: {"questions": len(v), "exact": float(np.mean(v))} for n, v in sorted(groups.items())}

    exact = [a for v in by_objects.values() for a in v]
    return {"layout": layout, "questions": len(asked), "exact": float(np.mean(exact)), "row": float(np.mean(rows)),
            "column": float(np.mean(cols)), "by_objects": scored(by_objects),
            "by_same_row_objects": scored(by_row_neighbours), "by_objects_sharing_colour_or_shape": scored(by_sharers),
            "wrong_naming_another_objects_cell": wrong_named_other / wrong if wrong else 0.0,
            "confusions": dict(confusions.most_common(12))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a stock LLaVA folder (a demo base)")
    parser.add_argument("--scenes", type=int, default=256, help="held-out monitor scenes (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="the recipe seed whose monitor scenes to use")
    parser.add_argument("--layout", action="append", choices=LAYOUTS,
                        help="visual tokens' position ids (repeatable; default: row-major, as trained)")
    parser.add_argument("--positions", choices=("1d", "2d"), default="1d",
                        help="the visual tokens' rotary ids: 1d as trained, 2d (row, column; grid_rope.py)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = Fwd2Bot.from_pretrained(args.model, device="cpu", dtype="fp32")
    model.backbone.hf.eval()
    scenes = heldout_scenes(args.seed, args.scenes)
    with positions_for(model, args.positions):
        results = [position_errors(model, scenes, layout=layout) for layout in args.layout or ["row-major"]]
    text = json.dumps(results[0] if len(results) == 1 else results, indent=1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
