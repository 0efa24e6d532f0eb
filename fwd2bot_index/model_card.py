"""Hugging Face model-card metadata (the YAML front matter of a model's README.md).

Why: a checkpoint folder pushed to the hub, or read by tools that index model cards, is described by
that front matter: license, base model, library, pipeline tag, tags and the measured evaluation results
(``model-index``, the format the hub shows as an evaluation table). Every checkpoint ``f2b train``
writes, and the shipped demo model's card, render it here so they agree. No torch; PyYAML renders it
(a dependency of transformers), so the output is YAML that any parser reads back.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

LIBRARY_NAME = "fwd2bot-index"
DEFAULT_TAGS = ("fwd2bot", "image-retrieval", "visual-question-answering", "token-compression")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EvalResult:
    """One measured number for ``model-index``: what task, on which data, which metric, its value."""

    task_type: str  # e.g. "text-to-image-retrieval", "visual-question-answering"
    dataset_name: str  # e.g. "shapes world (f2b demo-data), held-out"
    dataset_type: str  # e.g. "fwd2bot-demo-world", or a hub dataset id
    metric_type: str  # e.g. "recall@1", "exact_match", "accuracy"
    value: float
    metric_name: str | None = None  # shown on the hub, e.g. "text->image R@1 (seen compositions)"
    task_name: str | None = None
    dataset_split: str | None = None

    def to_dict(self) -> dict[str, Any]:
        task = {"type": self.task_type} | ({"name": self.task_name} if self.task_name else {})
        dataset = {"name": self.dataset_name, "type": self.dataset_type}
        if self.dataset_split:
            dataset["split"] = self.dataset_split
        metric = {"type": self.metric_type, "value": float(self.value)}
        if self.metric_name:
            metric["name"] = self.metric_name
        return {"task": task, "dataset": dataset, "metrics": [metric]}


def hub_base_model(reference: str | os.PathLike | None) -> str | None:
    """The hub id to put under ``base_model``, or None: the hub accepts only ``owner/name`` ids, and a
    local folder's path means nothing to anyone else."""
    if reference is None:
        return None
    text = str(reference)
    return text if _HUB_ID.match(text) and not os.path.exists(text) else None


def model_card_metadata(model_name: str, *, license: str = "mit", base_model: str | Sequence[str] | None = None,
                        pipeline_tag: str = "image-text-to-text", tags: Sequence[str] = (),
                        datasets: Sequence[str] = (), eval_results: Sequence[EvalResult] = (),
                        language: Sequence[str] = ("en",)) -> dict[str, Any]:
    """The front matter as a dict (keys in the hub's usual order; empty ones left out)."""
    bases = [base_model] if isinstance(base_model, str) else list(base_model or [])
    bases = [b for b in (hub_base_model(b) for b in bases) if b]
    meta: dict[str, Any] = {"license": license, "library_name": LIBRARY_NAME, "pipeline_tag": pipeline_tag,
                            "language": list(language)}
    if bases:
        meta["base_model"] = bases[0] if len(bases) == 1 else bases
    meta["tags"] = list(dict.fromkeys([*DEFAULT_TAGS, *tags]))
    datasets = [d for d in (hub_base_model(d) for d in datasets) if d]  # hub ids only, as for base_model
    if datasets:
        meta["datasets"] = datasets
    if eval_results:
        meta["model-index"] = [{"name": model_name, "results": [r.to_dict() for r in eval_results]}]
    return meta


def model_card_front_matter(model_name: str, **fields: Any) -> str:
    """``---\\n<yaml>---\\n``: the block that starts a model card README.md (fields: ``model_card_metadata``)."""
    import yaml

    body = yaml.safe_dump(model_card_metadata(model_name, **fields), sort_keys=False, allow_unicode=True,
                          default_flow_style=False)
    return f"---\n{body}---\n"


def with_front_matter(card: str, model_name: str, **fields: Any) -> str:
    """``card`` (Markdown) with the front matter in front, replacing one it already had."""
    if card.startswith("---\n"):
        end = card.find("\n---\n", 4)
        if end != -1:
            card = card[end + 5:].lstrip("\n")
    return model_card_front_matter(model_name, **fields) + "\n" + card


def train_eval_results(row: dict[str, Any], data: str) -> list[EvalResult]:
    """``f2b train``'s held-out evaluation row (``r1_t2i`` / ``r1_i2t`` as fractions) as eval results."""
    named = {"r1_t2i": ("text-to-image-retrieval", "text->image R@1"),
             "r1_i2t": ("image-to-text-retrieval", "image->text R@1")}
    return [EvalResult(task, f"{data}, held-out", "fwd2bot-train-held-out", "recall@1", round(100 * float(row[key]), 2),
                       metric_name=name, dataset_split="held-out")
            for key, (task, name) in named.items() if isinstance(row.get(key), (int, float))]
