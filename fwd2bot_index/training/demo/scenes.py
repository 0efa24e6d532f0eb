"""Fresh scenes for the demo recipe's stages: an endless, seeded stream of the shapes world.

Rendering a 64 px scene with its labels, questions and captions takes about a millisecond, so the
warm-up and the base stage draw new scenes for every batch instead of cycling over a fixed pool
(a fixed pool of 5,700 scenes held the vision tower on its shape plateau far longer). The stream
of step ``t`` depends only on (seed, stage, t): a resumed stage sees exactly the batches it would
have seen. Training scenes obey the 'train' split's rules (no held-out colour-shape pair, never a
composition reserved for 'test'), so every evaluation scene stays unseen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ...synthetic.generate import _accepts, draw_scene, generate_scenes
from ...synthetic.scene import Scene

STAGE_STREAMS = {"warmup": 11, "base": 12, "compressor": 13, "tokenizer": 14}


def scene_dict(scene: Scene) -> dict[str, Any]:
    """The plain-data form of a scene (as ``scenes.jsonl`` stores it)."""
    return {"objects": [dataclasses.asdict(o) for o in scene.objects],
            "background": dataclasses.asdict(scene.background), "split": scene.split}


def train_scenes(seed: int, stage: str, step: int, n: int) -> list[Scene]:
    """``n`` fresh 'train' scenes for ``step`` of ``stage``, the same for the same arguments."""
    rng = np.random.default_rng([seed, STAGE_STREAMS[stage], step])
    out: list[Scene] = []
    while len(out) < n:
        scene = draw_scene(rng, "train")
        if _accepts(scene, "train"):
            out.append(scene)
    return out


def heldout_scenes(seed: int, n: int) -> list[Scene]:
    """``n`` 'test' scenes (compositions train never draws) for monitoring a stage."""
    return generate_scenes(n, seed=seed + 500, split="test")
