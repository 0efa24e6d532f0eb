"""The service's own errors, and which exceptions a shell prints as one line instead of a traceback.

Why a module of its own: both the facade (``service``) and what it drives (``ray_index``, whose workers
raise these far from the facade) need them; living in ``service`` they made ``ray_index`` import the
facade that imports it. Everything here sits below both. ``fwd2bot_index.service`` re-exports the names,
so ``from fwd2bot_index.service import ServiceError`` keeps working.
"""

from __future__ import annotations

import sys

from .collection.catalog import FilterError
from .collection.errors import CollectionError
from .imaging import ImageDecodeError, ScanError
from .options import OptionError

__all__ = ["NotFoundError", "ServiceError", "user_error_types"]


class ServiceError(Exception):
    """A request the service cannot serve; the message says what to do."""


class NotFoundError(ServiceError, LookupError):
    """An id or path that is not in the collection."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is the whole story for a user: shells print it, with no traceback.

    Model errors join only once the model's torch half was imported (before that none of them can
    have been raised), so an early mistake does not pay seconds for importing torch.
    """
    errors: list[type[BaseException]] = [ServiceError, CollectionError, ImageDecodeError, ScanError, OptionError,
                                         FilterError, FileNotFoundError]
    if "fwd2bot_index.model.config" in sys.modules:
        from .model.config import StrategyError

        errors.append(StrategyError)
    if "fwd2bot_index.model.backbone" in sys.modules:
        from .model import (CheckpointMismatchError, ModelLoadError, StrategyError, UnsupportedModelError,
                            UntrainedCompressorError)

        errors += [ModelLoadError, StrategyError, UnsupportedModelError, CheckpointMismatchError,
                   UntrainedCompressorError]
    return tuple(errors)
