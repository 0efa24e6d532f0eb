"""What an evaluation runs against: a model (encode on the fly) or an indexed collection.

Both satisfy the runners' protocol (``encode_images`` / ``encode_texts``; a collection adds
``encode_image_paths`` so its stored embeddings are used) and give an answer function for QA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..imaging import load_image


class ModelTarget:
    """A model under one strategy: images and texts are encoded on the fly."""

    def __init__(self, model: Any, strategy: Any = None, max_new_tokens: int = 16):
        self.model = model
        self.strategy = model.resolve_strategy(strategy)
        self.max_new_tokens = max_new_tokens
        self.name = self.strategy.name

    def encode_images(self, images: list, batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        return self.model.encode_images(images, batch_size=batch_size, strategy=self.strategy).embeddings

    def encode_texts(self, texts: list[str], batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        return self.model.encode_texts(texts, batch_size=batch_size, strategy=self.strategy)

    def stored_tokens(self, paths: Sequence[Path], batch_size: int = 32) -> dict[str, np.ndarray]:
        """The tokens this strategy would store for each image, encoded in batches."""
        out: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(str(p) for p in paths))
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            enc = self.model.encode_images([load_image(p) for p in chunk], batch_size=batch_size,
                                           strategy=self.strategy)
            out.update(zip(chunk, enc.tokens))
        return out

    def answerer(self, paths: Sequence[Path]) -> Callable[[Path, str], str]:
        tokens = self.stored_tokens(paths)
        return lambda image, question: self.model.answer(
            tokens[str(image)], question, max_new_tokens=self.max_new_tokens, kind=self.strategy.tokens)


class CollectionTarget:
    """An indexed collection: image embeddings and tokens come from storage, texts from its model."""

    def __init__(self, service: Any, max_new_tokens: int = 16):
        self.service = service
        self.max_new_tokens = max_new_tokens
        self.name = f"collection:{service.strategy.name}"

    def _ids(self, paths: Sequence[Path]) -> list[int]:
        ids = []
        for path in paths:
            try:
                ids.append(self.service.resolve(str(Path(path).resolve())))
            except LookupError:
                raise LookupError(f"{path} is not in the collection {self.service.collection.path}; "
                                  "index the benchmark images into it first") from None
        return ids

    def encode_image_paths(self, paths: Sequence[Path]) -> np.ndarray:
        return self.service.collection.embeddings(self._ids(paths))

    def encode_images(self, images: list, batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        return self.service.encode_images(images)

    def encode_texts(self, texts: list[str], batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        return self.service.encode_texts(texts)

    def answerer(self, paths: Sequence[Path]) -> Callable[[Path, str], str]:
        return lambda image, question: self.service.ask(str(Path(image).resolve()), question,
                                                        max_new_tokens=self.max_new_tokens)
