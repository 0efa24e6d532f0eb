"""Does an image come from the shapes world? A cheap test, so `f2b index` can warn before the `demo`
model (which knows nothing else) silently ranks photographs by noise.

Why this test: every rendered pixel is either a background tone shifted equally on all three
channels (plain, gradient or luminance noise), exactly one of the eight object colours, or an
anti-aliased edge between the two. A photograph, a scan or a screenshot has almost no pixels of
that kind. Sampling with nearest-neighbour keeps exact colours at any ``--image-size``; the test
reads at most 48x48 pixels, well under a millisecond.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .world import BACKGROUND_TONES, COLORS, PATTERN_AMPLITUDE

__all__ = ["looks_like_demo_world"]

_SIDE = 48
_TONES = np.array(list(BACKGROUND_TONES.values()), dtype=np.int16)  # (T, 3)
_COLORS = np.array(list(COLORS.values()), dtype=np.int16)  # (C, 3)
_AMPLITUDE = max(PATTERN_AMPLITUDE.values())
# Edges blend an object into the background: the rest must be world pixels, and some must be objects.
MIN_WORLD_SHARE = 0.7
MIN_OBJECT_SHARE = 0.01


def looks_like_demo_world(image: Image.Image) -> bool:
    """True when ``image`` could be a scene rendered by ``f2b demo-data`` (any image size)."""
    width, height = image.size
    if width != height or width < 32:
        return False
    small = image.convert("RGB")
    if width > _SIDE:
        small = small.resize((_SIDE, _SIDE), Image.Resampling.NEAREST)
    px = np.asarray(small, dtype=np.int16).reshape(-1, 3)
    is_object = (px[:, None, :] == _COLORS[None]).all(-1).any(-1)
    shift = px[:, None, :] - _TONES[None]  # (N, T, 3): a background pixel shifts all channels alike
    even = (shift.max(-1) - shift.min(-1) <= 1) & (np.abs(shift[..., 0]) <= _AMPLITUDE)
    clipped = ((px == 0) | (px == 255)).any(-1)  # a bright tone plus noise may clip a channel
    is_background = even.any(-1) | clipped & (np.abs(shift).max(-1) <= _AMPLITUDE).any(-1)
    world = is_object | is_background
    return bool(world.mean() >= MIN_WORLD_SHARE and is_object.mean() >= MIN_OBJECT_SHARE)
