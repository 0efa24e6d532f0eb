"""Benchmark readers, metrics and runners (Flickr30k / COCO retrieval, SugarCrepe, QA), in the library.

The demo recipe measures its claims with these, and the ``f2b eval`` shell (the top-level ``eval/``
folder) re-exports them beside its reports: the library never imports a shell. The readers and metrics need
only numpy and Pillow (no torch); the runners reach a model only through its public ``encode_images``
/ ``encode_texts`` / ``answer``.
"""

from .datasets import (
    QARecord,
    QASet,
    RetrievalSet,
    load_retrieval_set,
    read_captions_csv,
    read_captions_jsonl,
    read_karpathy_json,
    read_qa_jsonl,
)
from .errors import EvalDataError, MissingImageError
from .metrics import (
    exact_match,
    multi_relevant_precision,
    normalize_answer,
    normalized_contains,
    pairwise_accuracy,
    retrieval_recall,
    sugarcrepe_accuracy,
)
from .runners import model_answerer, run_qa, run_retrieval, run_sugarcrepe
from .sugarcrepe import (
    SUGARCREPE_CATEGORIES,
    SUGARCREPE_GROUPS,
    SugarCrepeCategory,
    SugarCrepePair,
    read_sugarcrepe,
)

__all__ = [
    "EvalDataError", "MissingImageError", "QARecord", "QASet", "RetrievalSet", "SUGARCREPE_CATEGORIES",
    "SUGARCREPE_GROUPS", "SugarCrepeCategory", "SugarCrepePair", "exact_match", "load_retrieval_set",
    "model_answerer", "multi_relevant_precision", "normalize_answer", "normalized_contains", "pairwise_accuracy",
    "read_captions_csv",
    "read_captions_jsonl", "read_karpathy_json", "read_qa_jsonl", "read_sugarcrepe", "retrieval_recall",
    "run_qa", "run_retrieval", "run_sugarcrepe", "sugarcrepe_accuracy",
]
