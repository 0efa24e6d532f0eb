"""Where the demo model is blind, said on every surface.

The shipped ``demo`` model knows only the procedural shapes world of ``f2b demo-data``; on anything else
its search ranks by noise and its answers are guesses. ``f2b index`` checks the first new images of each
run against that world (``synthetic.detect``) and the catalog records the result per image, in the
commit that adds it (so an interrupted run still knows). This module turns those records into the one
status that ``search``, ``ask``, ``info``, the REST responses and the page show: a ``warning`` whenever
a collection on ``demo`` (or ``demo-nested``) holds images from outside its world (None otherwise, and for
other models).
"""

from __future__ import annotations

import os
from typing import Any

from .collection.remembered import peek_world_counts
from .model.files import is_demo_name

REAL_MODEL = "llava-hf/llava-1.5-7b-hf"


def demo_world_status(model_name: str | None, checked: int, outside: int) -> dict[str, Any]:
    """``{"checked", "outside", "warning"}``: how many of the collection's images were checked against
    the demo world, how many are outside it, and the sentence to show (None when there is nothing to say)."""
    warning = None
    if is_demo_name(model_name) and outside:
        warning = (f"{outside} of the {checked} images checked in this collection are not from the shapes world "
                   f"the `{model_name}` model was trained on, so its scores and answers on them are noise; for real "
                   f"photos use a real model in another collection (f2b index DIR --model {REAL_MODEL} "
                   "--collection photos.f2b)")
    return {"checked": int(checked), "outside": int(outside), "warning": warning}


def collection_world_status(folder: str | os.PathLike) -> dict[str, Any]:
    """The status of the collection at ``folder`` without opening it for search (no index, no model):
    what the CLI shows beside an answer that came from a running server."""
    found = peek_world_counts(folder)
    return demo_world_status(*found) if found is not None else demo_world_status(None, 0, 0)
