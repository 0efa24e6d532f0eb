"""What `f2b index` prints after a run: the one summary line on stdout and the details on stderr.

A module of its own so that commands.py, which parses the arguments, stays under 500 lines.
"""

from __future__ import annotations

from fwd2bot_index.demo_notice import REAL_MODEL

from .main import DEFAULT_MODEL, err


def index_summary(report) -> str:
    """One line that adds up: every scanned file is new, a copy, moved, unchanged or failed."""
    parts = [f"indexed {report.indexed} new", f"{report.duplicates} duplicate"]
    if report.moved:
        parts.append(f"{len(report.moved)} moved")
    parts.append(f"{report.unchanged} unchanged")
    if report.skipped_removed:
        parts.append(f"{report.skipped_removed} skipped as removed (--include-removed to index them again)")
    failed = f"{len(report.failed)} failed"
    if report.still_failing:
        failed += f" (+{len(report.still_failing)} still failing from earlier runs)"
    parts.append(failed)
    line = ", ".join(parts)
    if report.indexed:
        line += f" ({report.images_per_second:.1f} images/s)"
    if report.pruned:
        line += f"; pruned {report.pruned} vanished path(s)"
    return line


def index_details(report, model: str = DEFAULT_MODEL) -> None:
    """The lines behind the summary, on stderr: failures, moves, prunes and the warning of ``model`` (the
    shipped model the collection uses: ``demo`` or ``demo-nested``, named as the user knows it)."""
    def listed(label: str, rows: list, more: str) -> None:
        for row in rows[:20]:
            err(f"  {label}: {row}")
        if len(rows) > 20:
            err(f"  ... and {len(rows) - 20} more {more}")

    listed("failed", [f"{p}: {r}" for p, r in report.failed], "(see `f2b info --failed`)")
    listed("still failing", [f"{p}: {r}" for p, r in report.still_failing],
           "(see `f2b info --failed`; a file is retried once it changes)")
    listed("moved", [f"{a} -> {b}" for a, b in report.moved], "")
    listed("pruned", report.pruned_paths, "")
    if report.world_foreign:
        err(f"warning: {report.world_foreign} of the {report.world_checked} new images checked are not from the "
            f"shapes world that the `{model}` model was trained on ({model} knows only the coloured "
            "shapes of `f2b demo-data`), so search and answers on them will be noise. For real photos use a real "
            f"model in a new collection: f2b index DIR --model {REAL_MODEL} --collection photos.f2b")
