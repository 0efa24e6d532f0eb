"""Messages that must guess what the user meant (kept out of the facade so it stays about behaviour)."""

from __future__ import annotations

import os
from itertools import islice
from pathlib import Path

from .imaging import IMAGE_EXTENSIONS


def holds_images(folder: Path, look: int = 500) -> bool:
    """Whether ``folder`` (its first ``look`` entries, not recursively) holds image files."""
    try:
        with os.scandir(folder) as entries:
            return any(Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in islice(entries, look) if e.is_file())
    except OSError:
        return False


def no_collection_message(path: Path) -> str:
    """``--collection PATH`` where there is no collection. A folder of photos there most likely means the
    user took --collection for the folder to search: say where a collection goes instead of suggesting
    that the photo folder itself become one."""
    if path.is_dir() and holds_images(path):
        inside = path / ".f2b"
        return (f"{path} is a folder of images, not a collection (--collection names the folder where the index "
                f"is kept); index the images with `f2b index {path} --collection {inside}`, then pass "
                f"--collection {inside}")
    return f"no collection at {path}; create one with `f2b index DIR --collection {path}`"
