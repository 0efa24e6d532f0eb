"""A deterministic stand-in encoder that exercises the evaluation plumbing without any model.

It is not a model and says nothing about quality. Texts become hashed bag-of-words count vectors;
:meth:`HashedBagOfWords.render` paints such a vector into an image as vertical grey bands, and
:meth:`HashedBagOfWords.encode_images` reads the mean brightness of each band back. An image rendered
from a caption therefore scores highest against that caption, which lets tests check that pairs,
galleries and scores line up end to end (and lets CLI tests run `f2b eval` without model weights).
A swap-style negative with the same words gets exactly the same text vector: a tie.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["HashedBagOfWords", "EncodedImages"]

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class EncodedImages:
    embeddings: np.ndarray


class HashedBagOfWords:
    """Texts -> hashed word counts; images -> per-band brightness; both L2-normalised, ``dim`` wide."""

    def __init__(self, dim: int = 64, band_width: int = 4, height: int = 16) -> None:
        if dim < 2 or band_width < 1 or height < 1:
            raise ValueError("dim >= 2, band_width >= 1 and height >= 1 are required")
        self.dim = dim
        self.band_width = band_width
        self.height = height

    def _bucket(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.dim

    def text_vector(self, text: str) -> np.ndarray:
        """Unnormalised word counts (lowercase alphanumeric words) in ``dim`` hashed buckets."""
        vec = np.zeros(self.dim, dtype=np.float64)
        for word in _WORD.findall(text.lower()):
            vec[self._bucket(word)] += 1.0
        return vec

    @staticmethod
    def _normalise(rows: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        rows = np.where(norms > 0, rows, 1.0)  # an empty text or black image: the uniform direction
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    def encode_texts(self, texts: list[str], batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of strings")
        rows = np.stack([self.text_vector(t) for t in texts]) if texts else np.zeros((0, self.dim))
        return self._normalise(rows)

    def encode_images(
        self, images: list[Image.Image], batch_size: int = 32, show_progress: bool = False
    ) -> EncodedImages:
        rows = [self._read_bands(img) for img in images]
        stacked = np.stack(rows) if rows else np.zeros((0, self.dim))
        return EncodedImages(embeddings=self._normalise(stacked))

    def _read_bands(self, image: Image.Image) -> np.ndarray:
        # A box filter down to dim x 1 pixels averages each band exactly for rendered images and
        # works for any size of real image.
        strip = image.convert("L").resize((self.dim, 1), Image.Resampling.BOX)
        return np.asarray(strip, dtype=np.float64)[0]

    def render(self, texts: str | Iterable[str]) -> Image.Image:
        """Paint the summed word counts of ``texts`` as bands whose brightness is proportional to them."""
        parts = [texts] if isinstance(texts, str) else list(texts)
        vec = np.sum([self.text_vector(t) for t in parts], axis=0)
        peak = vec.max() if vec.max() > 0 else 1.0
        levels = np.round(255 * vec / peak).astype(np.uint8)
        row = np.repeat(levels, self.band_width)
        pixels = np.repeat(row[None, :], self.height, axis=0)
        return Image.fromarray(np.stack([pixels] * 3, axis=-1))
