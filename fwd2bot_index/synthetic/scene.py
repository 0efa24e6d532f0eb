"""The Scene: a few shapes on a 3x3 grid over a background, and everything derived from it.

A scene is plain data (objects, background, split). Its image, captions, questions and hard
negatives are pure functions of that data: any randomness they need (which pair a relation caption
names, which negatives are picked) comes from a seed derived from the scene's own content, so a
scene read back from ``scenes.jsonl`` yields exactly the same texts and pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from .language import check_caption, full_listing, scene_captions
from .negatives import scene_hard_negatives
from .qa import scene_qa
from .render import render_scene
from .world import HELD_OUT_PAIRS, POSITIONS, SPLITS, Background, SceneObject


@dataclass(frozen=True)
class Scene:
    """``objects`` are kept in reading order of their cells; at most one object per cell and per
    (colour, shape), so "the red circle" or "the object at the center" always names one object."""

    objects: tuple[SceneObject, ...]
    background: Background
    split: str = "train"
    _key: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        objects = tuple(sorted(self.objects, key=lambda o: o.cell))
        object.__setattr__(self, "objects", objects)
        if not 1 <= len(objects) <= len(POSITIONS):
            raise ValueError(f"a scene holds 1 to {len(POSITIONS)} objects (got {len(objects)})")
        if len({o.cell for o in objects}) != len(objects):
            raise ValueError("two objects share a grid cell; each cell holds at most one object")
        if len({o.pair for o in objects}) != len(objects):
            raise ValueError("two objects share a (color, shape); each composition appears at most once per scene")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; expected one of {SPLITS}")
        object.__setattr__(self, "_key", f"{self.split}|{self.background}|{self.caption}")

    # --- derived data -------------------------------------------------------------------------
    @property
    def caption(self) -> str:
        """The scene-unique caption (every object, with size, colour, shape and position)."""
        return full_listing(self).text()

    def rng(self, purpose: str) -> np.random.Generator:
        """A generator seeded by this scene's content and ``purpose``: reproducible, independent per use."""
        digest = hashlib.blake2b(f"{purpose}|{self._key}".encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))

    def render(self, size: int = 64) -> Image.Image:
        """The scene as an RGB image of ``size`` x ``size`` pixels (default 64)."""
        return render_scene(self, size)

    def captions(self) -> list[str]:
        """Captions from most to least detailed; the first is unique to the scene."""
        return scene_captions(self)

    def qa(self) -> list[dict[str, str]]:
        """Question-answer pairs: dicts with "question", "answer", "type"."""
        return scene_qa(self)

    def hard_negatives(self, per_category: int = 1) -> dict[str, list[tuple[str, str]]]:
        """Verified (caption, negative_caption) pairs keyed by the seven SugarCrepe categories."""
        return scene_hard_negatives(self, per_category)

    def check(self, caption: str) -> bool:
        """Whether a caption of this world is true of the scene (ValueError if outside the grammar)."""
        return check_caption(self, caption)

    @property
    def held_out_pairs(self) -> set[tuple[str, str]]:
        return {o.pair for o in self.objects} & HELD_OUT_PAIRS

    # --- image-side hard negatives ------------------------------------------------------------
    def swap_colors(self, i: int, j: int) -> "Scene":
        """The same layout with the colours of objects ``i`` and ``j`` exchanged."""
        return self._swapped(i, j, "color")

    def swap_shapes(self, i: int, j: int) -> "Scene":
        """The same layout with the shapes of objects ``i`` and ``j`` exchanged."""
        return self._swapped(i, j, "shape")

    def _swapped(self, i: int, j: int, attr: str) -> "Scene":
        objs = list(self.objects)
        a, b = objs[i], objs[j]
        objs[i], objs[j] = replace(a, **{attr: getattr(b, attr)}), replace(b, **{attr: getattr(a, attr)})
        return replace(self, objects=tuple(objs))

    def swapped_scenes(self) -> list[tuple[str, "Scene"]]:
        """Every valid swap as ("swap_att" | "swap_obj", swapped scene). Valid: the swap changes the
        scene, its result is a legal scene, this scene's caption is false for it, and (for 'train')
        it creates no held-out composition."""
        out: list[tuple[str, Scene]] = []
        for kind, attr in (("swap_att", "color"), ("swap_obj", "shape")):
            for i in range(len(self.objects)):
                for j in range(i + 1, len(self.objects)):
                    if getattr(self.objects[i], attr) == getattr(self.objects[j], attr):
                        continue
                    try:
                        other = self._swapped(i, j, attr)
                    except ValueError:  # the swap would repeat a (colour, shape)
                        continue
                    if self.split == "train" and other.held_out_pairs:
                        continue
                    if not other.check(self.caption):
                        out.append((kind, other))
        return out

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form; ``Scene.from_dict`` restores an equal scene."""
        return {
            "objects": [
                {"shape": o.shape, "color": o.color, "size": o.size, "cell": o.cell, "dx": o.dx, "dy": o.dy}
                for o in self.objects
            ],
            "background": {"tone": self.background.tone, "pattern": self.background.pattern, "seed": self.background.seed},
            "split": self.split,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scene":
        try:
            objects = tuple(SceneObject(**o) for o in data["objects"])
            return cls(objects, Background(**data["background"]), data.get("split", "train"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a scene record (expected objects, background, split): {exc}") from exc
