"""Benchmark readers, metrics, runners and reports (Flickr30k / COCO retrieval, SugarCrepe, QA).

Installed as ``fwd2bot_index.eval``: the ``f2b eval`` shell. Readers, metrics and runners live in the
library (``fwd2bot_index.evaluation``, which the demo recipe uses too) and are re-exported here; this
package adds the reports, the published reference numbers and the evaluation targets.
"""

from ..evaluation import *  # noqa: F401,F403 - the readers, metrics and runners, re-exported for the shell
from ..evaluation import __all__ as _library_names
from .report import write_report

__all__ = [*_library_names, "write_report"]
