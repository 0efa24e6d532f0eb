"""Write an evaluation's results as ``results.json``, ``report.md`` and PNG plots.

``write_report`` takes one dict; every key is optional:

* ``settings``: free-form run settings (model, strategy, data paths, batch size...), shown as a table;
* ``retrieval``: a :func:`run_retrieval` result, a list of them, or a dict name -> result;
* ``sugarcrepe``: a :func:`run_sugarcrepe` result, a list, or a dict name -> result;
* ``qa``: a :func:`run_qa` result, a list, or a dict name -> result;
* ``sweep``: a list of ``{"strategy", "stored_tokens", "recall": {"t2i": {k: r}, "i2t": {k: r}},
  "qa"?: {"exact_match": x, ...}, "dataset"?: name}``, one per (strategy, token budget) point.

Anything else is kept in ``results.json`` as given. Fractions are stored as fractions; the Markdown
shows percentages beside the published reference numbers (labelled "published", papers cited).
Plots use matplotlib's Agg canvas directly, so no global backend is switched.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .reference import (
    PAPERS,
    PUBLISHED_RETRIEVAL_R1,
    PUBLISHED_SUGARCREPE_CLIP_L14,
    PUBLISHED_TEST_IMAGES,
    RETRIEVAL_PAPER,
    retrieval_reference_key,
)
from ..evaluation.sugarcrepe import SUGARCREPE_CATEGORIES, SUGARCREPE_GROUPS

__all__ = ["write_report", "RESULTS_FILE", "REPORT_FILE", "SUGARCREPE_PLOT", "SWEEP_PLOT"]

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
SUGARCREPE_PLOT = "sugarcrepe_accuracy.png"
SWEEP_PLOT = "recall_vs_stored_tokens.png"
_DASH = "–"


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write the report files into ``out_dir`` (created if needed); returns name -> path written."""
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a dict, got {type(results).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = _jsonable(dict(results))
    payload["report"] = {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": _version()}
    written = {RESULTS_FILE: _write_text(out / RESULTS_FILE, json.dumps(payload, indent=2, sort_keys=False) + "\n")}

    retrieval = _runs(results.get("retrieval"))
    sugarcrepe = _runs(results.get("sugarcrepe"))
    qa = _runs(results.get("qa"))
    sweep = list(results.get("sweep") or [])

    lines = ["# Evaluation report", "", f"Generated {payload['report']['generated_at']}. "
             "Numbers are percentages; `results.json` holds the same numbers as fractions.", ""]
    lines += _settings_section(results.get("settings"))
    for name, run in retrieval:
        lines += _retrieval_section(name, run)
    if sugarcrepe:
        lines += _sugarcrepe_section(sugarcrepe)
        written[SUGARCREPE_PLOT] = _plot_sugarcrepe(sugarcrepe, out / SUGARCREPE_PLOT)
        lines += [f"![SugarCrepe accuracy per category]({SUGARCREPE_PLOT})", ""]
    for name, run in qa:
        lines += _qa_section(name, run)
    if sweep:
        lines += _sweep_section(sweep)
        written[SWEEP_PLOT] = _plot_sweep(sweep, out / SWEEP_PLOT)
        lines += [f"![Recall vs stored tokens]({SWEEP_PLOT})", ""]
    lines += _references_section(bool(retrieval), bool(sugarcrepe))
    written[REPORT_FILE] = _write_text(out / REPORT_FILE, "\n".join(lines).rstrip() + "\n")
    return written


# --------------------------------------------------------------------------------------------------
# helpers


def _version() -> str:
    try:
        from fwd2bot_index import __version__

        return str(__version__)
    except Exception:  # the report must not fail over a version string
        return "unknown"


def _write_text(path: Path, text: str) -> Path:
    """Write via a temporary file and rename, so a crash never leaves a half-written report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _runs(value: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """Normalise one result, a list of results, or a name -> result dict to (name, result) pairs."""
    if not value:
        return []
    if isinstance(value, Mapping) and ("benchmark" in value or "recall" in value or "accuracy" in value):
        return [(str(value.get("dataset") or value.get("name") or ""), value)]
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    return [(str(v.get("dataset") or v.get("name") or f"run {i + 1}"), v) for i, v in enumerate(value)]


def _at(table: Mapping[Any, Any] | None, k: int) -> float | None:
    if not table:
        return None
    value = table.get(k, table.get(str(k)))
    return None if value is None else float(value)


def _pct(value: float | None) -> str:
    return _DASH if value is None else f"{100 * value:.1f}"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(_jsonable(value))
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _label(name: str) -> str:
    return name.replace("_", "-")


# --------------------------------------------------------------------------------------------------
# sections


def _settings_section(settings: Any) -> list[str]:
    if not settings:
        return []
    if not isinstance(settings, Mapping):
        return ["## Settings", "", _cell(settings), ""]
    return ["## Settings", ""] + _table(["setting", "value"], [[_cell(k), _cell(v)] for k, v in settings.items()])


def _ks(recall: Mapping[str, Any]) -> list[int]:
    keys = {int(k) for direction in ("t2i", "i2t") for k in (recall.get(direction) or {})}
    return sorted(keys)


def _retrieval_section(name: str, run: Mapping[str, Any]) -> list[str]:
    recall = run.get("recall") or {}
    ks = _ks(recall)
    title = name or "retrieval"
    meta = ", ".join(
        f"{label} {run[key]}" for key, label in (("split", "split"), ("n_images", "images"), ("n_captions", "captions"),
                                                 ("skipped_missing", "skipped (missing)")) if run.get(key) is not None
    )
    header = ["model"] + [f"T→I R@{k}" for k in ks] + [f"I→T R@{k}" for k in ks]
    rows = [[str(run.get("strategy") or "ours")] + [_pct(_at(recall.get(d), k)) for d in ("t2i", "i2t") for k in ks]]
    ref_key = retrieval_reference_key(title)
    lines = [f"## Retrieval: {title}", "", meta + "." if meta else ""]
    if ref_key:
        for model, numbers in PUBLISHED_RETRIEVAL_R1[ref_key].items():
            cells = [f"{numbers[d]:.1f}" if k == 1 else _DASH for d in ("t2i", "i2t") for k in ks]
            rows.append([f"{model} (published)"] + cells)
    lines += [""] + _table(header, rows)
    if ref_key:
        expected = PUBLISHED_TEST_IMAGES[ref_key]
        if run.get("split") != "test" or run.get("n_images") != expected:
            lines += [
                f"Not directly comparable: the published numbers use the full Karpathy test split ({expected} "
                f"images); this run used split {run.get('split')!r} with {run.get('n_images')} images.",
                "",
            ]
        lines += ["Published numbers are zero-shot R@1 only; other cells are left blank.", ""]
    return lines


def _sugarcrepe_section(runs: list[tuple[str, Mapping[str, Any]]]) -> list[str]:
    names = [n or f"ours ({i + 1})" if len(runs) > 1 else "ours" for i, (n, _) in enumerate(runs)]
    categories = _sugarcrepe_categories(runs)
    header = ["category", "pairs"] + names + ["CLIP ViT-L/14 (published, SugarCrepe paper)"]
    rows = []
    first = runs[0][1]
    for cat in categories:
        pairs = (first.get("n_pairs") or {}).get(cat)
        published = PUBLISHED_SUGARCREPE_CLIP_L14.get(cat)
        rows.append(
            [_label(cat), _DASH if pairs is None else str(pairs)]
            + [_pct((run.get("accuracy") or {}).get(cat)) for _, run in runs]
            + [_DASH if published is None else f"{published:.1f}"]
        )
    for group, members in SUGARCREPE_GROUPS.items():
        if any(group in (run.get("accuracy") or {}) for _, run in runs):
            pairs = sum((first.get("n_pairs") or {}).get(m, 0) for m in members)
            rows.append([f"**{group}** (micro-avg)", str(pairs)]
                        + [_pct((run.get("accuracy") or {}).get(group)) for _, run in runs] + [_DASH])
    lines = ["## SugarCrepe", "", "Accuracy = share of pairs where the true caption scores strictly higher than the "
             "hard negative (ties count as wrong); chance is 50.", ""] + _table(header, rows)
    notes = []
    for name, run in runs:
        skipped = sum((run.get("skipped_missing") or {}).values())
        if run.get("limit") or skipped:
            notes.append(f"{name or 'ours'}: a subset (limit {run.get('limit')}, {skipped} pairs skipped for missing "
                         "images), not directly comparable with the published numbers.")
    return lines + ([*notes, ""] if notes else [])


def _sugarcrepe_categories(runs: list[tuple[str, Mapping[str, Any]]]) -> list[str]:
    seen = {c for _, run in runs for c in (run.get("accuracy") or {}) if c not in SUGARCREPE_GROUPS}
    return [c for c in SUGARCREPE_CATEGORIES if c in seen] + sorted(seen - set(SUGARCREPE_CATEGORIES))


def _qa_section(name: str, run: Mapping[str, Any]) -> list[str]:
    title = f"## Question answering: {name}" if name else "## Question answering"
    rows = [["all", str(run.get("n", _DASH)), _pct(run.get("exact_match")), _pct(run.get("contains"))]]
    for kind, scores in (run.get("by_type") or {}).items():
        rows.append([_cell(kind), str(scores.get("n", _DASH)), _pct(scores.get("exact_match")), _pct(scores.get("contains"))])
    lines = [title, "", "Exact match and containment after answer normalisation (lowercase, no punctuation or "
             "articles, number words as digits).", ""]
    lines += _table(["questions", "n", "exact match", "contains"], rows)
    if run.get("skipped_missing"):
        lines += [f"{run['skipped_missing']} questions skipped for missing images.", ""]
    return lines


def _sweep_points(sweep: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    by_strategy: dict[str, list[Mapping[str, Any]]] = {}
    for i, point in enumerate(sweep):
        if "strategy" not in point or "stored_tokens" not in point:
            raise ValueError(f"sweep[{i}] needs 'strategy' and 'stored_tokens', got keys {sorted(point)}")
        by_strategy.setdefault(str(point["strategy"]), []).append(point)
    return {s: sorted(p, key=lambda q: float(q["stored_tokens"])) for s, p in by_strategy.items()}


def _sweep_section(sweep: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for strategy, points in _sweep_points(sweep).items():
        for p in points:
            recall = p.get("recall") or {}
            qa = p.get("qa") or {}
            rows.append([_cell(strategy), str(p["stored_tokens"]), _pct(_at(recall.get("t2i"), 1)),
                         _pct(_at(recall.get("i2t"), 1)), _pct(qa.get("exact_match"))])
    header = ["strategy", "stored tokens", "T→I R@1", "I→T R@1", "QA exact match"]
    return ["## Recall vs stored tokens", ""] + _table(header, rows)


def _references_section(retrieval: bool, sugarcrepe: bool) -> list[str]:
    lines = []
    if retrieval:
        lines += [f"- {model}: {PAPERS[paper]}" for model, paper in RETRIEVAL_PAPER.items()]
    if sugarcrepe:
        lines.append(f"- SugarCrepe (benchmark, and its per-category figures for OpenAI CLIP ViT-L/14): {PAPERS['SugarCrepe']}")
    if not lines:
        return []
    return ["## Published numbers cited", "", "Rows marked \"published\" are numbers reported in the literature for "
            "the models below, not measured here.", "", *lines, ""]


# --------------------------------------------------------------------------------------------------
# plots


def _figure(width: float, height: float):  # type: ignore[no-untyped-def]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plot_sugarcrepe(runs: list[tuple[str, Mapping[str, Any]]], path: Path) -> Path:
    categories = _sugarcrepe_categories(runs)
    series = [(name or "ours", [100 * float((run.get("accuracy") or {}).get(c, np.nan)) for c in categories], None)
              for name, run in runs]
    series.append(("CLIP ViT-L/14 (published)", [PUBLISHED_SUGARCREPE_CLIP_L14.get(c, np.nan) for c in categories], "//"))
    fig = _figure(max(7.0, 1.1 * len(categories) + 4), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(categories))
    for i, (label, values, hatch) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label, hatch=hatch,
               alpha=0.6 if hatch else 1.0)
    ax.axhline(50, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(x, [_label(c) for c in categories], rotation=20)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("SugarCrepe accuracy per category")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    return path


def _pct_or_nan(value: float | None) -> float:
    return float("nan") if value is None else 100 * value


def _plot_sweep(sweep: Sequence[Mapping[str, Any]], path: Path) -> Path:
    points = _sweep_points(sweep)
    has_qa = any(p.get("qa") for ps in points.values() for p in ps)
    fig = _figure(10.0 if has_qa else 6.0, 4.0)
    axes = [fig.add_subplot(1, 2 if has_qa else 1, i + 1) for i in range(2 if has_qa else 1)]
    tokens = [float(p["stored_tokens"]) for ps in points.values() for p in ps]
    for i, (strategy, ps) in enumerate(points.items()):
        color = f"C{i % 10}"
        x = [float(p["stored_tokens"]) for p in ps]
        for direction, style in (("t2i", "-"), ("i2t", "--")):
            y = [_pct_or_nan(_at((p.get("recall") or {}).get(direction), 1)) for p in ps]
            if not all(np.isnan(y)):
                axes[0].plot(x, y, style, marker="o", color=color, label=f"{strategy} {direction.replace('2', '→').upper()}")
        if has_qa:
            y = [100 * float((p.get("qa") or {}).get("exact_match", np.nan)) for p in ps]
            axes[1].plot(x, y, "-", marker="s", color=color, label=strategy)
    for ax, ylabel, title in zip(axes, ("R@1 (%)", "exact match (%)"), ("Recall vs stored tokens", "QA vs stored tokens")):
        if min(tokens) > 0 and max(tokens) / min(tokens) >= 8:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ticks = sorted(set(tokens))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("stored tokens per image")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path
