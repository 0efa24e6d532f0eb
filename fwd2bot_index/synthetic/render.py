"""Drawing scenes with Pillow.

Shapes are drawn at twice the target size and box-reduced, which smooths edges while keeping the
inside of every shape exactly its colour (so tests can read a colour back at an object's centre).
Everything is a function of the scene alone: same scene, same size -> identical pixels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUND_TONES, COLORS, PATTERN_AMPLITUDE, SIZE_RADIUS, Background, SceneObject

if TYPE_CHECKING:
    from .scene import Scene

SUPERSAMPLE = 2
MIN_IMAGE_SIZE = 32


def render_scene(scene: "Scene", size: int = 64) -> Image.Image:
    """An RGB image of ``size`` x ``size`` pixels showing the scene."""
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be an int >= {MIN_IMAGE_SIZE} (got {size!r}): smaller hides small shapes")
    canvas = size * SUPERSAMPLE
    image = Image.fromarray(background_array(scene.background, canvas), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj, canvas)
    return image.reduce(SUPERSAMPLE)


def background_array(background: Background, side: int) -> np.ndarray:
    """The background as a (side, side, 3) uint8 array; texture comes from ``background.seed``."""
    base = np.array(BACKGROUND_TONES[background.tone], dtype=np.int16)
    amp = PATTERN_AMPLITUDE[background.pattern]
    rng = np.random.default_rng([background.seed, side])
    if background.pattern == "plain":
        shift = np.zeros((side, side), dtype=np.int16)
    elif background.pattern == "gradient":
        ramp = np.linspace(-amp, amp, side).round().astype(np.int16)
        if rng.integers(2):
            ramp = ramp[::-1]
        shift = np.broadcast_to(ramp[:, None] if rng.integers(2) else ramp[None, :], (side, side))
    else:  # noisy: luminance noise, same offset on all channels so the tone's hue stays
        shift = rng.integers(-amp, amp + 1, size=(side, side), dtype=np.int16)
    return np.clip(base[None, None, :] + shift[:, :, None], 0, 255).astype(np.uint8)


def object_center(obj: SceneObject, side: float) -> tuple[float, float]:
    """Pixel coordinates (x, y) of the object's centre on a ``side``-pixel image."""
    cell = side / 3.0
    return ((obj.col + 0.5 + obj.dx) * cell, (obj.row + 0.5 + obj.dy) * cell)


def object_radius(obj: SceneObject, side: float) -> float:
    """Radius of the object's bounding circle in pixels on a ``side``-pixel image."""
    return SIZE_RADIUS[obj.size] * side / 3.0


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy = object_center(obj, side)
    r = object_radius(obj, side)
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in _OUTLINES[obj.shape]], fill=fill)


def _star(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    out = []
    for k in range(points * 2):
        rad = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        out.append((rad * math.cos(angle), rad * math.sin(angle)))
    return out


def _triangle() -> list[tuple[float, float]]:
    return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]


_ARM = 0.34  # half-width of the cross's arms, relative to the radius
_HALF = 0.78  # half-side of the square, relative to the radius (visually as heavy as the circle)
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-_HALF, -_HALF), (_HALF, -_HALF), (_HALF, _HALF), (-_HALF, _HALF)],
    "triangle": _triangle(),
    "star": _star(),
    "cross": [
        (-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
        (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM),
    ],
    # narrower than tall, so a diamond never reads as a rotated square
    "diamond": [(0, -1), (0.72, 0), (0, 1), (-0.72, 0)],
}
