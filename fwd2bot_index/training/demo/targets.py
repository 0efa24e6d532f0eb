"""The demo model's goals (issue 20, which replaced issue 11's), each with the measured value and whether
it holds.

Reported in the model card and README, never asserted in tests: the measurement is the point.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EVAL_SPLITS = ("test", "test_unseen")


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


def _r1(results: dict[str, Any], split: str, key: str = "retrieval") -> float:
    table = results["splits"][split].get(key, {}).get("fwd2bot")
    return float(table["t2i"][1]) if table else float("nan")


def separate_compressors(results: dict[str, Any]) -> dict[int, str]:
    """K -> the form name of the separately trained compressor of that K that a nested budget is compared with:
    the shipped compressor, then the claims' plain variants (``CLAIMS_VARIANTS``: not nested, not the
    contrastive-only ablation). One answer for the targets and the nested card, so they compare alike."""
    from .compressor import CLAIMS_VARIANTS

    separate = {results["num_summary_tokens"]: "fwd2bot"}
    for n, v in results.get("variants", {}).items():
        if n in CLAIMS_VARIANTS and not v.get("nested_budgets") and not n.endswith("contrastive"):
            separate.setdefault(v["num_summary_tokens"], f"fwd2bot-{n}")
    return separate


def _nested_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 24: at each budget the nested compressor is within 1 point of QA and 2 points of seen t2i R@1
    of the separately trained compressor of that K (where one was trained)."""
    separate = separate_compressors(results)
    rows = []
    for name, v in results.get("variants", {}).items():
        for k in [*v.get("nested_budgets", [])] + ([v["num_summary_tokens"]] if v.get("nested_budgets") else []):
            form = f"fwd2bot-{name}" if k == v["num_summary_tokens"] else f"fwd2bot-{name}@{k}"
            if k not in separate:
                continue
            qa, ref = qa_overall(results, form), qa_overall(results, separate[k])
            rows.append(_target(f"nested, first {k} tokens: QA within 1 point of the separate K={k}", qa, ref - 0.01,
                                qa >= ref - 0.01))
            r1 = float(results["splits"]["test"]["retrieval"][form]["t2i"][1])
            r1_ref = float(results["splits"]["test"]["retrieval"][separate[k]]["t2i"][1])
            rows.append(_target(f"nested, first {k} tokens: seen t2i R@1 within 2 points of the separate K={k}", r1,
                                r1_ref - 0.02, r1 >= r1_ref - 0.02))
    return rows


def _verification_targets(v: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 21's goals for verified search (latency is bench/bench_verify.py's)."""
    if not v:
        return []
    rows = []
    for split, r in v["splits"].items():
        ret = r["retrieval_t2i"]
        gain = ret["verify@20"][1] - ret["embedding"][1] if "verify@20" in ret else float("nan")
        rows.append(_target(f"verify@20 adds >= 15 points of t2i R@1 ({split})", gain, 0.15, gain >= 0.15))
        rej, cut = r["nonsense_rejected"].get("all", float("nan")), r["true_queries"]["cut"]
        rows.append(_target(f"nonsense rejection >= 0.9 ({split})", rej, 0.9, rej >= 0.9))
        rows.append(_target(f"true queries cut <= 5% ({split}; lower is better)", cut, 0.05, cut <= 0.05))
    for cat in ("swap_att", "swap_obj"):
        if cat in (v.get("hard_negatives") or {}):
            acc = v["hard_negatives"][cat]["relevance"]
            rows.append(_target(f"{cat} decided by relevance >= 0.8", acc, 0.8, acc >= 0.8))
    return rows


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    k = results["num_summary_tokens"]
    full, blind, fw = qa_overall(results, "full"), qa_overall(results, "blind"), qa_overall(results, "fwd2bot")
    full_types = qa_by_type(results, "full")
    worst_type = min(full_types, key=full_types.get) if full_types else "?"
    worst = full_types.get(worst_type, float("nan"))
    rows = [
        _target("all visual tokens: QA exact match >= 0.9 overall", full, 0.9, full >= 0.9),
        _target(f"all visual tokens: every question type >= 0.8 (lowest: {worst_type})", worst, 0.8, worst >= 0.8),
        _target(f"Fwd2Bot K={k}: QA within 2 points of all visual tokens", fw, full - 0.02, fw >= full - 0.02),
    ]
    for budget in results["budgets"]:
        if budget == k:
            pool = qa_overall(results, f"pool@{budget}")
            rows.append(_target(f"Fwd2Bot K={k}: QA not below pool@{budget} (goal: pool@{budget}'s score)", fw, pool,
                                fw >= pool))
    for split, label in (("test", "seen"), ("test_unseen", "unseen")):
        n_small = results["splits"][split].get("n_small_gallery", 0)
        small, large = _r1(results, split, "retrieval_small"), _r1(results, split)
        rows.append(_target(f"text->image R@1 >= 0.8, {n_small}-image gallery, {label} compositions", small, 0.8,
                            small >= 0.8))
        rows.append(_target(f"text->image R@1 >= 0.8, {results['n_gallery']}-image gallery, {label} compositions "
                            "(the card's figure)", large, 0.8, large >= 0.8))
    hn = _categories(results["sugarcrepe"]["fwd2bot"]["accuracy"])
    ablation = results["sugarcrepe"].get("fwd2bot-k16-contrastive")
    if ablation is not None:
        base = _categories(ablation["accuracy"])
        for cat in ("swap_att", "swap_obj"):
            if cat in hn and cat in base:
                gain = hn[cat] - base[cat]
                rows.append(_target(f"autoregressive loss adds >= 10 points on {cat} (vs contrastive-only)", gain,
                                    0.10, gain >= 0.10))
    rows += _nested_targets(results)
    rows += _verification_targets(results.get("verification"))
    rows.append({"target": "blind row (answers without the image), for reference", "measured": blind, "goal": "",
                 "met": None})
    return rows
