"""Held-out monitoring of the compressor stage (a trainer callback) and a stage's summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..trainer import Trainer


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class QAMonitor:
    """At each held-out evaluation of the trainer, QA exact match on a few monitor questions,
    answered from what the stage stores (summary tokens for ``fwd2bot``, all visual tokens for ``full``)."""

    def __init__(self, trainer: Trainer, data_dir: Path, n_images: int, kind: str, say: Callable[[str], None]):
        self.trainer, self.kind, self.say = trainer, kind, say
        images = [r["image"] for r in read_jsonl(data_dir / "captions.jsonl") if r["split"] == "test"][:n_images]
        wanted = set(images)
        self.records = [r for r in read_jsonl(data_dir / "qa.jsonl") if r["image"] in wanted]
        self.paths = {name: data_dir / name for name in images}
        self.history: list[dict[str, Any]] = []

    def __call__(self, event: Any) -> None:
        if event.kind == "eval" and self.records:
            row = {"step": event.step, "qa_exact_match": self.measure(),
                   **{k: v for k, v in event.metrics.items() if k not in ("kind", "step")}}
            self.history.append(row)
            self.say(f"held-out at step {event.step}: {json.dumps(row)}")

    @torch.no_grad()
    def measure(self) -> float:
        from ...evaluation import exact_match
        from ...imaging import load_image

        model = self.trainer.model
        self.trainer._set_train_mode(False)
        names = list(self.paths)
        visual = model.visual_tokens(model.backbone.pixel_values([load_image(self.paths[n]).convert("RGB")
                                                                  for n in names]))
        tokens = model.compress(visual) if self.kind == "fwd2bot" else visual
        index = {n: i for i, n in enumerate(names)}
        hits = []
        for start in range(0, len(self.records), 64):
            chunk = self.records[start:start + 64]
            answers = model.answer_batch([tokens[index[r["image"]]] for r in chunk], [r["question"] for r in chunk],
                                         max_new_tokens=8, kind=self.kind)
            hits += [exact_match(a, r["answer"]) for a, r in zip(answers, chunk)]
        return float(np.mean(hits))


def stage_summary(result: Any) -> dict[str, Any]:
    """The numbers of a finished trainer run worth keeping in the model card."""
    keep = ("loss", "autoregressive", "contrastive", "temperature")
    # threads: a run's weights differ in the last bits with the thread count, and its outcome can differ more
    # (docs/DEMO_MODEL.md, the one-object phrases), so the card says what each stage ran on
    return {"steps": result.steps, "samples_seen": result.samples_seen, "seconds": round(result.elapsed_s, 1),
            "samples_per_s": round(result.samples_per_s, 2), "threads": torch.get_num_threads(),
            "last": {k: round(v, 4) for k, v in result.last.items() if k in keep},
            "heldout": {k: v for k, v in (result.evals[-1] if result.evals else {}).items() if k not in ("kind",)}}
