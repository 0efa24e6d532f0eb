"""The metrics live in the library (``fwd2bot_index.evaluation.metrics``); re-exported for ``f2b eval``."""

from ..evaluation.metrics import *  # noqa: F401,F403
from ..evaluation.metrics import __all__  # noqa: F401
