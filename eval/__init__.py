"""Benchmark readers, metrics, runners and reports (Flickr30k / COCO retrieval, SugarCrepe, QA).

Installed as ``fwd2bot_index.eval``: the ``f2b eval`` shell. Readers, metrics and runners live in the
library (``fwd2bot_index.evaluation``, which the demo recipe uses too) and are re-exported here; this
package adds the reports, the published reference numbers and the evaluation targets.
"""

from ..evaluation.datasets import (
    QARecord,
    QASet,
    RetrievalSet,
    load_retrieval_set,
    read_captions_csv,
    read_captions_jsonl,
    read_karpathy_json,
    read_qa_jsonl,
)
from ..evaluation.errors import EvalDataError, MissingImageError
from ..evaluation.metrics import (
    exact_match,
    normalize_answer,
    normalized_contains,
    pairwise_accuracy,
    retrieval_recall,
    sugarcrepe_accuracy,
)
from .report import write_report
from ..evaluation.runners import model_answerer, run_qa, run_retrieval, run_sugarcrepe
from ..evaluation.sugarcrepe import (
    SUGARCREPE_CATEGORIES,
    SUGARCREPE_GROUPS,
    SugarCrepeCategory,
    SugarCrepePair,
    read_sugarcrepe,
)

__all__ = [
    "EvalDataError",
    "MissingImageError",
    "QARecord",
    "QASet",
    "RetrievalSet",
    "SUGARCREPE_CATEGORIES",
    "SUGARCREPE_GROUPS",
    "SugarCrepeCategory",
    "SugarCrepePair",
    "exact_match",
    "load_retrieval_set",
    "model_answerer",
    "normalize_answer",
    "normalized_contains",
    "pairwise_accuracy",
    "read_captions_csv",
    "read_captions_jsonl",
    "read_karpathy_json",
    "read_qa_jsonl",
    "read_sugarcrepe",
    "retrieval_recall",
    "run_qa",
    "run_retrieval",
    "run_sugarcrepe",
    "sugarcrepe_accuracy",
    "write_report",
]
