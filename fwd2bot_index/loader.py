"""Loading the model a collection was built with, and refusing any other.

Why a module of its own: the facade (``service``) loads the model in-process and every Ray worker
(``ray_index.Replica``) loads its own replica; living in ``service`` it made ``ray_index`` import the
facade that imports it. ``fwd2bot_index.service.load_checked_model`` stays importable (re-exported).
"""

from __future__ import annotations

from typing import Any

from .collection import Manifest
from .collection.errors import CollectionMismatchError
from .options import check_model_reference

__all__ = ["load_checked_model"]


def load_checked_model(name: str, manifest: Manifest | None, device: str, dtype: str,
                       image_options: dict | None = None) -> Any:
    """Load a model; with a manifest, refuse one whose fingerprint differs from the collection's.

    The image preprocessing options are the manifest's (what the collection was built with), else
    ``image_options`` (a new collection), else the model folder's own.
    """
    from .model import load_model
    from .model.backbone import quiet_transformers

    check_model_reference(name)  # a hub id: fail fast offline, or read the cache without retries
    quiet_transformers()
    options = manifest.image_options if manifest is not None else (image_options or {})
    model = load_model(name, device=device, dtype=dtype, **options)
    if manifest is not None and manifest.model_fingerprint and model.fingerprint != manifest.model_fingerprint:
        raise CollectionMismatchError(
            f"the collection was built with model {manifest.model_name!r} (fingerprint "
            f"{manifest.model_fingerprint[:12]}), but {name!r} is a different model ({model.fingerprint[:12]}). "
            "Use the collection's own model, index into a new --collection, or re-index with --reindex."
        )
    return model
