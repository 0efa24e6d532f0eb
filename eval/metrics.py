"""The metrics live in the library (``fwd2bot_index.evaluation.metrics``); re-exported for ``f2b eval``."""

from ..evaluation.metrics import (  # noqa: F401
    exact_match,
    normalize_answer,
    normalized_contains,
    pairwise_accuracy,
    retrieval_recall,
    sugarcrepe_accuracy,
)
