"""Seeded scene generation and the split of compositions.

Splits:
- 'train' scenes use only seen (colour, shape) pairs (all but ``HELD_OUT_PAIRS``);
- 'test' scenes use only seen pairs too, drawn from their own seed stream, and moreover only
  scenes whose caption falls in the test bucket (a stable hash of the caption), from which 'train'
  never draws: a test scene can never equal a train scene, whatever seeds or sizes are used;
- 'test_unseen' scenes contain at least one held-out pair (so they never equal a train or test scene).
Scene ``i`` of a split depends only on (seed, split, i) and on the scenes before it (duplicates are
redrawn), so generating more scenes extends a list without changing its beginning.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from .scene import Scene
from .world import (
    BACKGROUND_PATTERNS,
    BACKGROUND_TONES,
    COLOR_NAMES,
    HELD_OUT_PAIRS,
    MAX_OBJECTS,
    MIN_OBJECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Background,
    SceneObject,
    max_jitter,
)

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
UNSEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(sorted(HELD_OUT_PAIRS))
_STREAM = {name: k for k, name in enumerate(SPLITS)}
TEST_BUCKET_SHARE = 10  # one composition in ten is reserved for 'test'
MAX_DRAWS = 10_000


def in_test_bucket(caption: str) -> bool:
    """Whether a scene with this caption is reserved for 'test' (stable across runs and machines)."""
    digest = hashlib.blake2b(caption.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % TEST_BUCKET_SHARE == 0


@lru_cache(maxsize=None)
def _backgrounds_for(colors: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """(tone, pattern) choices on which every colour in ``colors`` stands out."""
    out = tuple(
        (tone, pattern)
        for tone in BACKGROUND_TONES
        for pattern in BACKGROUND_PATTERNS
        if all(Background(tone, pattern).contrasts_with(c) for c in colors)
    )
    if not out:
        raise RuntimeError(f"no background contrasts with all of {sorted(colors)}; fix BACKGROUND_TONES")
    return out


def _pick_pairs(rng: np.random.Generator, n: int, split: str) -> list[tuple[str, str]]:
    if split == "test_unseen":
        first = UNSEEN_PAIRS[int(rng.integers(len(UNSEEN_PAIRS)))]
        rest = [p for p in ALL_PAIRS if p != first]
        others = [rest[int(k)] for k in rng.choice(len(rest), size=n - 1, replace=False)]
        pairs = [first, *others]
        order = rng.permutation(n)  # the held-out object may sit anywhere
        return [pairs[int(k)] for k in order]
    return [SEEN_PAIRS[int(k)] for k in rng.choice(len(SEEN_PAIRS), size=n, replace=False)]


def draw_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """One random scene obeying ``split``'s composition rule (not its test bucket or uniqueness)."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=n, replace=False))
    objects = []
    for cell, (color, shape) in zip(cells, _pick_pairs(rng, n, split)):
        size = SIZES[int(rng.integers(len(SIZES)))]
        jitter = max_jitter(size)
        dx, dy = (round(float(v), 3) for v in rng.uniform(-jitter, jitter, size=2))
        objects.append(SceneObject(shape, color, size, cell, dx, dy))
    choices = _backgrounds_for(frozenset(o.color for o in objects))
    tone, pattern = choices[int(rng.integers(len(choices)))]
    background = Background(tone, pattern, int(rng.integers(2**31)))
    return Scene(tuple(objects), background, split)


def _accepts(scene: Scene, split: str) -> bool:
    if split == "test_unseen":
        return True
    return in_test_bucket(scene.caption) == (split == "test")


def _check_args(n: int, seed: int, split: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int (got {n!r})")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int (got {seed!r})")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def generate_scenes(n: int, seed: int = 0, split: str = "train") -> list[Scene]:
    """``n`` distinct scenes of ``split`` (distinct first captions), the same for the same arguments."""
    _check_args(n, seed, split)
    scenes: list[Scene] = []
    seen: set[str] = set()
    for i in range(n):
        rng = np.random.default_rng([seed, _STREAM[split], i])
        for _ in range(MAX_DRAWS):
            scene = draw_scene(rng, split)
            if scene.caption not in seen and _accepts(scene, split):
                break
        else:  # pragma: no cover - the world has ~10^9 scenes per split
            raise RuntimeError(f"could not draw a new {split} scene after {MAX_DRAWS} tries (n={n} too large?)")
        seen.add(scene.caption)
        scenes.append(scene)
    return scenes
