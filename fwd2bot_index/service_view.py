"""What the helpers below the facade see of it: a collection opened with its model.

Why a module of its own: ``verification`` (verified search) and ``shrinking`` (token budgets) act on an
``ImageService`` but sit below ``service``, which imports them. Naming the class in their signatures
made them import the facade back (at run time for its error, for type checking for the class), an
arrow running up. What they use of it is four members, declared here as a ``Protocol`` that
``ImageService`` satisfies by its shape: the helpers depend on this, the facade on the helpers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: importing the collection package costs nothing here
    import numpy as np

    from .collection import Collection

__all__ = ["ServiceView"]


class ServiceView(Protocol):
    """A collection plus the model that made it, as ``verification`` and ``shrinking`` use it."""

    collection: "Collection"

    @property
    def model(self) -> Any:
        """The collection's model, loaded on first use and checked against its fingerprint."""

    @property
    def strategy(self) -> Any:
        """The collection's strategy (``model.config.Strategy``)."""

    def query_vector(self, text: str | None = None, image: Any = None, like: int | str | None = None,
                     embedding: Any = None) -> "np.ndarray":
        """The normalized query embedding of a text, an image, a stored image or a raw vector."""
