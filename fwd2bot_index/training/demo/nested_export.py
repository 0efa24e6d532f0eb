"""The shipped nested compressor (``--model demo-nested``): exported beside the demo model, sharing its base.

Why ship it: ``f2b index --tokens k`` and ``f2b migrate --tokens k`` need a nested checkpoint, and training
one takes ~45 minutes of a CPU core; the demo model itself stays K = 16 (its separately trained compressor
answers better at 16 than the nested one's first 16 tokens, see the claims table). Both were trained on the
same base, so the nested folder holds only what differs (compressor, both adapters, config: ~1 MB) and names
the demo model's ``base/`` by a path relative to itself (``model.files.base_folder``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...model import Fwd2Bot
from ...model.config import Fwd2BotConfig
from ...model.files import base_folder, is_checkpoint
from .compressor import CLAIMS_VARIANTS
from .targets import qa_overall, separate_compressors

SHARED_BASE = "../demo_model/base"  # from fwd2bot_index/demo_model_nested/ to the demo model's base


def export_sharing_base(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                        base: str = SHARED_BASE) -> None:
    """Write ``checkpoint``'s compressor and adapters in fp16 to ``out_dir`` with ``base`` (relative to
    ``out_dir``) as its base. The base there must be the fp16 export of the base it was trained on: the
    signature recorded here is that of this base cast to fp16, and loading checks it. The verdict of the
    checkpoint owning that base on verified search (``relevance_ranks_well``) is copied: the recipe measures
    it for the demo model only, and an unmeasured (None) verdict would turn verified search on by default."""
    model = Fwd2Bot.from_pretrained(str(checkpoint), device="cpu", dtype="fp32")
    model.backbone.hf.half()
    model.compressor.half()
    model.config.base_signature = model.backbone.signature()
    owner = Path(base_folder(out_dir, base)).parent  # the checkpoint whose base is shared (the demo model)
    if is_checkpoint(owner):  # its measured verdict decides the search page's default for this one too
        model.config.relevance_ranks_well = Fwd2BotConfig.read(owner).relevance_ranks_well
    model.save_pretrained(str(out_dir), include_base=False, base=base)
    for path in [Path(out_dir), *Path(out_dir).rglob("*")]:  # package data: readable by everyone
        path.chmod(0o755 if path.is_dir() else 0o644)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def nested_card(results: dict[str, Any], variant: str = "nested") -> str:
    """The nested checkpoint's README: what it is, how to use it, and its measured rows per budget beside the
    separately trained compressors of the same K (from the recipe's measurement, ``--json``)."""
    info = results["variants"][variant]
    budgets = [*info["nested_budgets"], info["num_summary_tokens"]]
    separate = separate_compressors(results)
    seen, unseen = results["splits"]["test"], results["splits"]["test_unseen"]

    def r1(split: dict[str, Any], form: str) -> float | None:
        table = split["retrieval"].get(form)
        return None if table is None else float(table["t2i"][1])

    def qa(split: dict[str, Any], form: str) -> float | None:
        row = split["qa"].get(form)
        return None if row is None else float(row["exact_match"])

    lines = [
        "# fwd2bot-index demo model, nested compressor (`demo-nested`)", "",
        "The demo model's base with a Fwd2Bot compressor trained so that its first 4, 8, 16 or all 32 summary "
        "tokens are each a complete stored form (nested budgets, issue 24). Like the demo model it knows only the "
        "procedural shapes world of `f2b demo-data`: on photos its scores and answers are noise.", "",
        "It holds only what differs from the demo model (compressor, adapters, config) and loads the demo "
        f"model's base from `{SHARED_BASE}`.", "",
        "## Use", "",
        "```bash",
        "f2b index demo-data/images --model demo-nested --tokens 8 --collection small.f2b   # 8 tokens per image",
        "f2b migrate --tokens 4 --collection small.f2b   # shrink in place, no image re-encoded",
        "f2b info --collection small.f2b",
        "```", "",
        f"## Measured (held-out scenes, seed {results['eval_seed']}, {results['measured_on']})", "",
        "QA exact match from the stored tokens and text->image R@1 over each split's "
        f"{seen['n_images']:,} images; beside each budget the separately trained compressor of that K where the "
        f"recipe trained one. This checkpoint is the recipe's `{variant}` compressor. Commands (see the demo model's "
        "card): measure once, saving the results, then render the tables and export this checkpoint from them:", "",
        "```bash", *export_commands(variant), "```", "",
        "| tokens / image | QA seen | QA unseen | QA, both | t2i R@1 seen | t2i R@1 unseen | separate K: QA, both "
        "| separate K: t2i R@1 seen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in budgets:
        form = f"fwd2bot-{variant}" if k == info["num_summary_tokens"] else f"fwd2bot-{variant}@{k}"
        ref = separate.get(k)
        lines.append(f"| {k} | {_pct(qa(seen, form))} | {_pct(qa(unseen, form))} | {_pct(qa_overall(results, form))} "
                     f"| {_pct(r1(seen, form))} | {_pct(r1(unseen, form))} "
                     f"| {_pct(qa_overall(results, ref)) if ref else '-'} | {_pct(r1(seen, ref)) if ref else '-'} |")
    return "\n".join(lines + _absent_lines(results, f"fwd2bot-{variant}")) + "\n"


def _absent_lines(results: dict[str, Any], form: str) -> list[str]:
    """Questions about something the image does not hold, for this compressor at all its tokens and for the demo
    model (measurements made before these questions existed have none)."""
    rows = [results["splits"][s].get("absent_qa", {}) for s in ("test", "test_unseen")]
    if not all(form in r and "fwd2bot" in r for r in rows):
        return []

    def both(name: str) -> float:
        return sum(r[name]["exact_match"] * r[name]["n"] for r in rows) / sum(r[name]["n"] for r in rows)

    return ["", "Questions about something the image does not hold (\"what color is the square?\" of a scene "
            f"without a square, answered \"there is no square\"; both splits): {_pct(both(form))} exact match with "
            f"all its tokens, the demo model {_pct(both('fwd2bot'))}."]


def export_commands(variant: str, work_dir: str = "runs/demo") -> list[str]:
    """The two commands that make this card: one measurement of the claims' variants and ``variant`` saved with
    ``--json``, then ``--from-json`` keeping the claims' rows in the tables and exporting ``variant``."""
    recipe = "python -m fwd2bot_index.training.demo_recipe --out fwd2bot_index/demo_model"
    measured = ",".join(dict.fromkeys([*CLAIMS_VARIANTS, variant]))
    return [f"{recipe} --work-dir {work_dir} --variants {measured} --measure-only --json {work_dir}/results.json",
            f"{recipe} --readme README.md --work-dir {work_dir} --from-json {work_dir}/results.json "
            f"--variants {','.join(CLAIMS_VARIANTS)} --export-nested {variant}"]


def write_nested_model(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                       results: dict[str, Any], variant: str = "nested") -> Path:
    """Export ``checkpoint`` sharing the demo model's base and write its card; returns the card's path."""
    export_sharing_base(checkpoint, out_dir)
    card = Path(out_dir) / "README.md"
    card.write_text(nested_card(results, variant), encoding="utf-8")
    card.chmod(0o644)
    return card
