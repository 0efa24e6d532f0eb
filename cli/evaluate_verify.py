"""`f2b eval verify`: verified search measured on a demo-data folder (fwd2bot_index.evaluation.verified)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List, Optional

import typer

from .commands import user_errors
from .evaluate import BatchOpt, OutOpt, _check_target_options, _eval_errors
from .main import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, err, eval_app, fail, model_name, print_json


@eval_app.command("verify")
def verify(
    data: Optional[Path] = typer.Option(
        None, "--data", help="An `f2b demo-data` folder (its 'test' and 'test_unseen' splits are measured). "
        "Default: a held-out world generated on the fly (--n, --seed)."),
    n: int = typer.Option(600, "--n", min=20, help="Scenes to generate without --data (half test, half test_unseen)."),
    seed: int = typer.Option(1000, "--seed", help="Seed of the generated world (the demo model's held-out seed)."),
    model: Optional[str] = ModelOpt,
    strategy: Optional[str] = typer.Option(None, "--strategy", "-s", help="fwd2bot, pool@N or full (default: the model's)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    depths: Optional[List[int]] = typer.Option(None, "--verify", help="Verify the top N (repeatable; default 10 and 20)."),
    min_relevance: float = typer.Option(0.5, "--min-relevance", help="The cutoff for 'no good match' (0-1)."),
    n_gallery: Optional[int] = typer.Option(None, "--gallery", min=2, help="At most this many images per split."),
    nonsense: int = typer.Option(100, "--nonsense", min=1, help="Nonsense queries per kind (object, relation, count)."),
    sugarcrepe_limit: Optional[int] = typer.Option(None, "--sugarcrepe-limit", min=1, help="Pairs per category."),
    batch_size: int = BatchOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Verified search on the shapes world: R@1/5 with verify@10/@20 vs the embedding alone, hard negatives
    decided by P(yes), nonsense queries rejected and true queries wrongly cut at --min-relevance."""
    from fwd2bot_index.options import OptionError
    from fwd2bot_index.verification import check_verify

    _check_target_options(model, device, dtype, [strategy] if strategy else None)
    try:
        for depth in depths or [10, 20]:
            check_verify(depth, min_relevance)
    except OptionError as exc:
        raise fail(str(exc), 2)
    if data is not None and not (data / "captions.jsonl").is_file():
        raise fail(f"--data {data}: no captions.jsonl there (make one with `f2b demo-data DIR --n N`)", 2)
    with user_errors(), _eval_errors(), tempfile.TemporaryDirectory(prefix="f2b-eval-verify-") as tmp:
        from fwd2bot_index.evaluation.verified import measure_verification, report_lines, write_verification_report
        from fwd2bot_index.service import load_checked_model

        folder = data
        if folder is None:
            from fwd2bot_index.synthetic import write_demo_data

            folder = Path(tmp)
            write_demo_data(folder, n=n, seed=seed, split_fractions=(0.0, 0.5, 0.5))
        loaded = load_checked_model(model_name(model), None, device, dtype)
        results = measure_verification(loaded, folder, verify=depths or (10, 20), min_relevance=min_relevance,
                                       n_gallery=n_gallery, n_nonsense=nonsense, n_sugarcrepe=sugarcrepe_limit,
                                       strategy=strategy, batch_size=batch_size, progress=err)
        results["settings"].update(model=model_name(model), generated=None if data else {"n": n, "seed": seed})
    if out is not None:
        files = write_verification_report(results, out)
        err(f"report: {files['report.md']}")
    if as_json:
        print_json(results)
    else:
        typer.echo("\n".join(report_lines(results)))
