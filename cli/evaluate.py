"""`f2b eval ...`: benchmarks in their official formats, on a model or on an indexed collection."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, List, Optional

import typer

from .commands import user_errors
from .main import (CollectionOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, check, err, eval_app, fail, model_name,
                   print_json)

StrategiesOpt = typer.Option(None, "--strategy", "-s",
                             help="Strategy to evaluate (repeatable): fwd2bot, pool@N, prompt, full. Default: the model's.")
OutOpt = typer.Option(None, "--out", help="Write results.json, report.md and plots to this folder.")
LimitOpt = typer.Option(None, "--limit", min=1, help="Only the first N records (a quick run).")
SkipOpt = typer.Option(False, "--skip-missing", help="Skip and count records whose image is missing.")
BatchOpt = typer.Option(32, "--batch-size", "-b", min=1, help="Images or captions per model batch.")
ALL_SPLITS = "all"


def _targets(collection: Optional[Path], model: Optional[str], strategies: Optional[List[str]], device: str,
             dtype: str) -> list:
    """Collection mode (stored embeddings/tokens) when --collection is given, else the model per strategy."""
    from fwd2bot_index.eval.targets import CollectionTarget, ModelTarget

    if collection is not None:
        if strategies:
            raise fail("--strategy does not apply to --collection (a collection has one strategy)", 2)
        from fwd2bot_index.service import open_service

        return [CollectionTarget(open_service(collection, model=model, device=device, dtype=dtype))]
    from fwd2bot_index.service import load_checked_model

    loaded = load_checked_model(model_name(model), None, device, dtype)  # quiets transformers' logging too
    return [ModelTarget(loaded, s) for s in (strategies or [None])]


def _finish(results: dict, out: Optional[Path], as_json: bool, summary: str) -> None:
    from fwd2bot_index.eval import write_report

    if out is not None:
        files = write_report(results, out)
        err(f"report: {files.get('report.md', out)}")
    if as_json:
        print_json(results)
    else:
        typer.echo(summary)


def _recall_line(name: str, r: dict) -> str:
    t2i, i2t = r["recall"]["t2i"], r["recall"]["i2t"]
    return (f"{name}: text->image R@1 {t2i[1]:.3f} R@5 {t2i[5]:.3f} R@10 {t2i[10]:.3f} | "
            f"image->text R@1 {i2t[1]:.3f} R@5 {i2t[5]:.3f} R@10 {i2t[10]:.3f}")


@eval_app.command("retrieval")
def retrieval(
    annotations: Path = typer.Option(..., "--annotations", help="Karpathy JSON, captions CSV, or demo captions.jsonl."),
    images: Path = typer.Option(..., "--images", help="Folder the image file names are relative to."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="flickr30k, coco or any name: labels the report and picks the published numbers "
                                "it is shown beside (default: the file's own \"dataset\" field, else its name)."),
    split: str = typer.Option("test", "--split",
                              help=f"Which split to evaluate (test, val, ...), or '{ALL_SPLITS}' for every record "
                                   "(a CSV without a split column)."),
    limit: Optional[int] = LimitOpt,
    skip_missing: bool = SkipOpt,
    collection: Optional[Path] = CollectionOpt,
    model: Optional[str] = ModelOpt,
    strategy: Optional[List[str]] = StrategiesOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: int = BatchOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Text->image and image->text R@1/5/10 (CLIP_benchmark definitions; ties count against the query)."""
    from fwd2bot_index.eval import load_retrieval_set, run_retrieval

    settings = _settings(locals())  # the arguments only: taken before any dataset is loaded
    _check_target_options(model, device, dtype, strategy)
    with user_errors(), _eval_errors():
        data = load_retrieval_set(annotations, images_dir=images, split=None if split == ALL_SPLITS else split,
                                  limit=limit, skip_missing=skip_missing)
        name = dataset or data.name or annotations.stem  # the file's "dataset" field says coco or flickr30k
        if dataset and data.name and dataset.lower() != data.name.lower():
            err(f"warning: --dataset {dataset}, but {annotations.name} says it is {data.name!r}; the report "
                f"labels it {dataset!r} and compares it with that dataset's published numbers")
        data = dataclasses.replace(data, name=name)
        settings["dataset"] = name
        runs = []
        for target in _targets(collection, model, strategy, device, dtype):
            result = run_retrieval(target, data, batch_size=batch_size)
            result.update(dataset=name, strategy=target.name)
            runs.append(result)
    results = {"settings": settings, "retrieval": runs}
    _finish(results, out, as_json, "\n".join(_recall_line(r["strategy"], r) for r in runs))


@eval_app.command("sugarcrepe")
def sugarcrepe(
    data: Path = typer.Option(..., "--data", help="Folder with the seven official SugarCrepe JSON files."),
    images: Path = typer.Option(..., "--images", help="Folder with the COCO val2017 images they name."),
    limit: Optional[int] = LimitOpt,
    skip_missing: bool = SkipOpt,
    collection: Optional[Path] = CollectionOpt,
    model: Optional[str] = ModelOpt,
    strategy: Optional[List[str]] = StrategiesOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: int = BatchOpt,
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Accuracy per SugarCrepe category (ties count as wrong) and micro-averaged Replace / Swap / Add."""
    from fwd2bot_index.eval import run_sugarcrepe

    settings = _settings(locals())
    _check_target_options(model, device, dtype, strategy)
    with user_errors(), _eval_errors():
        runs = []
        for target in _targets(collection, model, strategy, device, dtype):
            result = run_sugarcrepe(target, data, images, limit=limit, skip_missing=skip_missing, batch_size=batch_size)
            result["strategy"] = result["name"] = target.name
            runs.append(result)
    results = {"settings": settings, "sugarcrepe": runs}
    lines = [f"{r['strategy']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["accuracy"].items()) for r in runs]
    _finish(results, out, as_json, "\n".join(lines))


@eval_app.command("qa")
def qa(
    data: Path = typer.Option(..., "--data", help="QA JSONL: {image, question, answer, type} per line."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder the image paths are relative to."),
    limit: Optional[int] = LimitOpt,
    skip_missing: bool = SkipOpt,
    collection: Optional[Path] = CollectionOpt,
    model: Optional[str] = ModelOpt,
    strategy: Optional[List[str]] = StrategiesOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Answers generated from stored tokens only: exact match and normalized containment per strategy."""
    from fwd2bot_index.eval import read_qa_jsonl, run_qa

    settings = _settings(locals())
    _check_target_options(model, device, dtype, strategy)
    with user_errors(), _eval_errors():
        records = read_qa_jsonl(data, images_dir=images, limit=limit, skip_missing=skip_missing)
        runs = []
        for target in _targets(collection, model, strategy, device, dtype):
            target.max_new_tokens = max_new_tokens
            result = run_qa(target.answerer([r.image for r in records.records]), records, keep_predictions=out is not None)
            result["strategy"] = result["name"] = target.name
            runs.append(result)
    results = {"settings": settings, "qa": runs}
    lines = [f"{r['strategy']}: exact match {r['exact_match']:.3f}, contains {r['contains']:.3f} (n={r['n']})"
             for r in runs]
    _finish(results, out, as_json, "\n".join(lines))


@eval_app.command("synthetic")
def synthetic(
    n: int = typer.Option(300, "--n", min=20, help="Scenes to generate (held-out splits are evaluated)."),
    seed: int = typer.Option(12345, "--seed", help="Seed of the generated world (not the training seed)."),
    model: Optional[str] = ModelOpt,
    strategy: Optional[List[str]] = StrategiesOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: int = BatchOpt,
    qa_limit: int = typer.Option(400, "--qa-limit", min=1, help="At most this many QA records."),
    out: Optional[Path] = OutOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Retrieval, SugarCrepe-style hard negatives and QA on the procedural world, generated on the fly."""
    from fwd2bot_index.eval import read_captions_jsonl, read_qa_jsonl, run_qa, run_retrieval, run_sugarcrepe
    from fwd2bot_index.synthetic import write_demo_data

    settings = _settings(locals())
    _check_target_options(model, device, dtype, strategy)
    with user_errors(), _eval_errors(), tempfile.TemporaryDirectory(prefix="f2b-eval-") as tmp:
        world = Path(tmp)
        write_demo_data(world, n=n, seed=seed)
        targets = _targets(None, model, strategy, device, dtype)
        results: dict[str, Any] = {"settings": settings, "retrieval": [], "sugarcrepe": [], "qa": [],
                                   "sweep": []}
        held_out = {}
        for split in ("test", "test_unseen"):
            held_out[split] = read_captions_jsonl(world / "captions.jsonl", images_dir=world, split=split)
        keep = {str(p) for s in held_out.values() for p in s.image_paths}
        records = [r for r in read_qa_jsonl(world / "qa.jsonl", images_dir=world).records if str(r.image) in keep]
        records = records[:qa_limit]
        for target in targets:
            recalls = {}
            for split, data in held_out.items():
                r = run_retrieval(target, data, batch_size=batch_size)
                r.update(dataset=f"shapes world ({split})", strategy=target.name)
                results["retrieval"].append(r)
                recalls[split] = r["recall"]
            s = run_sugarcrepe(target, world / "sugarcrepe", world / "images", batch_size=batch_size)
            s["strategy"] = s["name"] = target.name
            results["sugarcrepe"].append(s)
            q = run_qa(target.answerer([r.image for r in records]), records, keep_predictions=False)
            q["strategy"] = q["name"] = target.name
            results["qa"].append(q)
            results["sweep"].append({"strategy": target.strategy.tokens, "stored_tokens": target.strategy.budget,
                                     "recall": recalls["test"], "qa": {"exact_match": q["exact_match"]}})
    lines = [_recall_line(f"{r['strategy']} {r['dataset']}", r) for r in results["retrieval"]]
    lines += [f"{q['strategy']}: QA exact match {q['exact_match']:.3f} (n={q['n']})" for q in results["qa"]]
    lines += [f"{s['strategy']}: hard negatives " + ", ".join(f"{k} {v:.2f}" for k, v in s["accuracy"].items())
              for s in results["sugarcrepe"]]
    _finish(results, out, as_json, "\n".join(lines))


def _check_target_options(model: Optional[str], device: str, dtype: str, strategies: Optional[List[str]]) -> None:
    """Bad --device/--dtype/--strategy/--model values stop here, before any data or model loads."""
    check(model=model, device=device, dtype=dtype)
    for strategy in strategies or []:
        check(strategy=strategy)


def _settings(scope: dict) -> dict:
    """The run's own arguments, JSON-ready, for results.json (call it first thing, while ``locals()``
    holds only the arguments: a later call picked up the loaded dataset and wrote megabytes)."""
    keys = ("annotations", "images", "data", "dataset", "split", "limit", "skip_missing", "collection", "model",
            "strategy", "device", "dtype", "batch_size", "n", "seed", "max_new_tokens", "qa_limit")
    plain = (str, int, float, bool, list, type(None))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in scope.items()
                if k in keys and isinstance(v, plain + (Path,))}
    if "model" in settings and not scope.get("collection"):
        settings["model"] = model_name(scope.get("model"))  # record the default ('demo') by name
    return settings


class _eval_errors:
    """Benchmark data problems (malformed record, missing image) are user errors: one line, exit 1."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        from fwd2bot_index.eval import EvalDataError, MissingImageError

        if exc is not None and isinstance(exc, (EvalDataError, MissingImageError, LookupError)):
            raise fail(str(exc).strip("'\""))
        return False
