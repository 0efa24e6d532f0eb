"""Errors of the collection layer. Each message names the collection and says what to do."""

from __future__ import annotations


class CollectionError(Exception):
    """Base class: something about a collection folder prevents the operation."""


class CollectionNotFoundError(CollectionError, FileNotFoundError):
    """No collection (no manifest.json) at the given folder."""


class CollectionExistsError(CollectionError, FileExistsError):
    """``create`` on a folder that already holds a collection."""


class CollectionMismatchError(CollectionError):
    """The collection was built with a different model or strategy than the one in use."""


class CollectionLockedError(CollectionError):
    """Another process is writing the collection (or holds its embedded index open)."""


class CollectionReadOnlyError(CollectionError):
    """A write was attempted on a collection opened for reading."""


class CollectionFormatError(CollectionError):
    """A file of the collection is unreadable or from an incompatible format version."""
