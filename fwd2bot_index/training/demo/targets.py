"""Issue 11's targets for the demo model, each with the measured values and whether it holds.

Reported in the model card and README, never asserted in tests: the measurement is the point.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EVAL_SPLITS = ("test", "test_unseen")
CLEAR_MARGIN = 0.05  # "clearly above chance": at least 5 points over the blind row on every question type


def qa_overall(results: dict[str, Any], name: str) -> float:
    """QA exact match of one stored form over both held-out splits (question-weighted)."""
    rows = [results["splits"][s]["qa"][name] for s in EVAL_SPLITS if name in results["splits"][s]["qa"]]
    n = sum(r["n"] for r in rows)
    return sum(r["exact_match"] * r["n"] for r in rows) / n if n else float("nan")


def qa_by_type(results: dict[str, Any], name: str) -> dict[str, float]:
    """Per question type, exact match over both splits (question-weighted per split)."""
    out: dict[str, list[float]] = {}
    for s in EVAL_SPLITS:
        row = results["splits"][s]["qa"].get(name)
        for t, v in (row or {}).get("by_type", {}).items():
            out.setdefault(t, []).append(v)
    return {t: float(np.mean(v)) for t, v in sorted(out.items())}


def _categories(accuracy: dict[str, float]) -> dict[str, float]:
    return {c: v for c, v in accuracy.items() if c[0].islower()}


def _target(name: str, measured: float, goal: float | str, met: bool) -> dict[str, Any]:
    return {"target": name, "measured": measured, "goal": goal, "met": bool(met) and not math.isnan(measured)}


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    k = results["num_summary_tokens"]
    seen, unseen = results["splits"]["test"]["retrieval"], results["splits"]["test_unseen"]["retrieval"]
    full, blind, fw = qa_overall(results, "full"), qa_overall(results, "blind"), qa_overall(results, "fwd2bot")
    full_types, blind_types = qa_by_type(results, "full"), qa_by_type(results, "blind")
    worst = min(full_types.values()) if full_types else float("nan")
    margin = min((full_types[t] - blind_types.get(t, 0.0) for t in full_types), default=float("nan"))
    hn = _categories(results["sugarcrepe"]["fwd2bot"]["accuracy"])
    hn_mean, hn_min = float(np.mean(list(hn.values()))), min(hn.values())
    rows = [
        _target("base, all visual tokens: QA exact match >= 0.95 overall", full, 0.95, full >= 0.95),
        _target("base, all visual tokens: every question type >= 0.9", worst, 0.9, worst >= 0.9),
        _target("base, all visual tokens: every question type clearly above the blind row (smallest margin, "
                "points)", margin, CLEAR_MARGIN, margin >= CLEAR_MARGIN),
        _target(f"Fwd2Bot K={k}: QA within 2 points of all visual tokens", fw, full - 0.02, fw >= full - 0.02),
    ]
    for budget in results["budgets"]:
        pool = qa_overall(results, f"pool@{budget}")
        rows.append(_target(f"Fwd2Bot K={k}: QA above pool@{budget} (goal: pool@{budget}'s score)", fw, pool,
                            fw > pool))
    rows += [
        _target("text->image R@1 >= 0.8, seen compositions", seen["fwd2bot"]["t2i"][1], 0.8,
                seen["fwd2bot"]["t2i"][1] >= 0.8),
        _target("text->image R@1 >= 0.7, unseen compositions", unseen["fwd2bot"]["t2i"][1], 0.7,
                unseen["fwd2bot"]["t2i"][1] >= 0.7),
        _target("hard negatives: mean accuracy >= 0.9 (7 categories)", hn_mean, 0.9, hn_mean >= 0.9),
        _target("hard negatives: no category below 0.8 (lowest)", hn_min, 0.8, hn_min >= 0.8),
    ]
    ablation = results["sugarcrepe"].get("fwd2bot-k16-contrastive")
    if ablation is not None:
        base = _categories(ablation["accuracy"])
        for cat in ("swap_att", "swap_obj"):
            if cat in hn and cat in base:
                gain = hn[cat] - base[cat]
                rows.append(_target(f"autoregressive loss adds >= 10 points on {cat} (vs contrastive-only)", gain,
                                    0.10, gain >= 0.10))
    rows.append({"target": "blind row (answers without the image), for reference", "measured": blind, "goal": "",
                 "met": None})
    return rows
