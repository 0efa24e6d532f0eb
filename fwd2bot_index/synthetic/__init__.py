"""The procedural image world: shapes on a 3x3 grid, with captions, questions and hard negatives.

Pillow and numpy only (no torch), so data can be made anywhere. Typical use::

    from fwd2bot_index.synthetic import generate_scenes, write_demo_data
    scene = generate_scenes(1, seed=0)[0]
    scene.render(64); scene.captions(); scene.qa(); scene.hard_negatives()
    write_demo_data("demo", n=1000, seed=0)
"""

from .demo_data import assign_splits, plan_scenes, write_demo_data
from .generate import ALL_PAIRS, SEEN_PAIRS, UNSEEN_PAIRS, generate_scenes, in_test_bucket
from .language import check_caption, parse_caption
from .negatives import CATEGORIES
from .qa import QA_TYPES
from .scene import Scene
from .vocabulary import world_vocabulary
from .world import (
    COLORS,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Background,
    SceneObject,
)

__all__ = [
    "ALL_PAIRS",
    "CATEGORIES",
    "COLORS",
    "HELD_OUT_PAIRS",
    "POSITIONS",
    "QA_TYPES",
    "SEEN_PAIRS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "UNSEEN_PAIRS",
    "Background",
    "Scene",
    "SceneObject",
    "assign_splits",
    "check_caption",
    "generate_scenes",
    "in_test_bucket",
    "parse_caption",
    "plan_scenes",
    "world_vocabulary",
    "write_demo_data",
]
