"""`f2b`: the command line. Thin: parse arguments, call the library, print.

Results go to stdout (JSON with --json, otherwise a readable table); logs and progress go to stderr.
Errors a user can fix print one clear line and exit 1; bad arguments exit 2 (typer's convention).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from fwd2bot_index import __version__

from .errors import OneLineGroup

# Deprecation notices from transformers / peft internals are for library authors, not for someone
# running `f2b search`; they printed two lines on every command that loaded a model.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")

app = typer.Typer(
    name="f2b",
    cls=OneLineGroup,  # click's usage errors (range, type, unknown option) as one line, like our own
    help="Index image collections with Fwd2Bot summary tokens; search them and ask about what you find.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Evaluate on Flickr30k / COCO retrieval, SugarCrepe, and QA from stored tokens.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")

DEFAULT_COLLECTION = ".f2b"
DEFAULT_MODEL = "demo"

CollectionOpt = typer.Option(None, "--collection", "-c",
                             help="Collection folder (default ./.f2b; env F2B_COLLECTION).")
ModelOpt = typer.Option(None, "--model", "-m",
                        help="demo (default; knows only the shapes world of `f2b demo-data`), a checkpoint folder, "
                             "or a LLaVA folder / hub id such as llava-hf/llava-1.5-7b-hf (env F2B_MODEL).")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, mps or auto (CUDA when present).")
DtypeOpt = typer.Option("auto", "--dtype", help="fp32, bf16, fp16 or auto (bf16 on CUDA, fp32 on CPU).")
JsonOpt = typer.Option(False, "--json", help="Print JSON on stdout (logs stay on stderr).")


def err(message: str) -> None:
    typer.echo(message, err=True)


def fail(message: str, code: int = 1) -> "typer.Exit":
    err(f"error: {message}")
    return typer.Exit(code)


def check(**options) -> None:
    """Validate option values before anything heavy loads: a bad one exits 2 with one line."""
    from fwd2bot_index.options import OptionError, check_model_reference, check_options

    model = options.pop("model", None)
    try:
        check_options(**options)
        check_model_reference(model)
    except OptionError as exc:
        raise fail(str(exc), 2)


def collection_path(value: Optional[Path]) -> Path:
    return Path(value or os.environ.get("F2B_COLLECTION") or DEFAULT_COLLECTION)


def model_name(value: Optional[str], fallback: Optional[str] = DEFAULT_MODEL) -> Optional[str]:
    return value or os.environ.get("F2B_MODEL") or fallback


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=None if isinstance(data, list) else 2, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"f2b (fwd2bot-index) {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Show the version and exit.")) -> None:
    """Fwd2Bot image collections: index, search, ask."""


@app.command("demo-data")
def demo_data(
    out_dir: Path = typer.Argument(..., help="Folder to write images/, captions.jsonl, qa.jsonl, sugarcrepe/."),
    n: int = typer.Option(300, "--n", min=1, help="Number of scenes."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed (same seed, same bytes)."),
    image_size: int = typer.Option(64, "--image-size", min=32, help="Image side in pixels (the demo model reads 64)."),
    as_json: bool = JsonOpt,
) -> None:
    """Generate the procedural shapes world (the demo model's world) in the benchmark layouts."""
    from tqdm.auto import tqdm

    from fwd2bot_index.synthetic import write_demo_data

    with tqdm(total=n, desc="writing scenes", unit="img", file=sys.stderr) as bar:
        try:
            summary = write_demo_data(out_dir, n=n, seed=seed, image_size=image_size, progress=lambda done, total: bar.update(1))
        except ValueError as exc:
            raise fail(str(exc), 2)
    if as_json:
        print_json(summary)
    else:
        typer.echo(f"wrote {n} scenes to {out_dir}")


from . import commands, evaluate, evaluate_verify, search, train  # noqa: E402,F401  (register the commands)
from .helptext import tidy_help  # noqa: E402

tidy_help(app)

if __name__ == "__main__":  # pragma: no cover
    app()
