"""Errors raised by the benchmark readers.

Both name the annotation file and the record (index, key or line) so a user can open the file at the
right place; a missing image also names the image path and how to proceed.
"""

from __future__ import annotations

from pathlib import Path


class EvalDataError(ValueError):
    """An annotation file is malformed: wrong shape, missing field, wrong type."""

    def __init__(self, file: Path | str, where: str, problem: str) -> None:
        self.file = Path(file)
        self.where = where
        self.problem = problem
        super().__init__(f"{self.file}: {where}: {problem}")


class MissingImageError(FileNotFoundError):
    """An annotation record refers to an image file that does not exist."""

    def __init__(self, file: Path | str, where: str, image_path: Path | str) -> None:
        self.file = Path(file)
        self.where = where
        self.image_path = Path(image_path)
        super().__init__(
            f"{self.file}: {where}: image not found: {self.image_path} "
            "(check the images folder, or pass skip_missing=True to skip and count such records)"
        )
