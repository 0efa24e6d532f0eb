"""`f2b train`: the double-forward recipe (and the demo model's recipe) from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .main import DeviceOpt, DtypeOpt, JsonOpt, app, check, fail, print_json


@app.command()
def train(
    data: Optional[List[str]] = typer.Option(None, "--data", "-d",
                                             help="Pairs JSONL/CSV/Parquet, LLaVA JSON, or a demo-data folder (repeatable)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base LLaVA folder / hub id, or a checkpoint to continue."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Run folder (model/, checkpoints/, metrics.jsonl)."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON file of TrainConfig fields; options override it."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="'demo': the shipped demo model's whole recipe (stages kept in OUTPUT_DIR.work; rerun to resume)."),
    quick: bool = typer.Option(False, "--quick", help="With --recipe demo: a minutes-long run of the same recipe."),
    objective: Optional[str] = typer.Option(None, "--objective", help="fwd2bot (compressor) or pretrain (base)."),
    num_summary_tokens: Optional[int] = typer.Option(None, "--summary-tokens", "-K", help="K summary tokens per image (default 32)."),
    nested: Optional[str] = typer.Option(None, "--nested",
                                         help="Nested budgets, e.g. 4,8,16,32 (K = the largest): the first k summary "
                                              "tokens are trained as a stored form for each k."),
    embed_dim: Optional[int] = typer.Option(None, "--embed-dim", help="Size of the retrieval embedding (default 256)."),
    image_readout: Optional[str] = typer.Option(
        None, "--image-readout", help="How the image embedding reads the summary tokens: mean (default) or mixer "
                                      "(two small transformer layers over them first)."),
    text_readout: Optional[str] = typer.Option(
        None, "--text-readout", help="How the text embedding reads its prompt: last (default: the last token's "
                                     "state) or mixer (every token's state through two small transformer layers)."),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank of both adapters (default 16)."),
    lora_alpha: Optional[int] = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 32)."),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="Regex of LLM module names for LoRA."),
    train_llm: Optional[bool] = typer.Option(None, "--train-llm/--no-train-llm", help="Train the whole LLM (small models)."),
    train_projector: Optional[bool] = typer.Option(None, "--train-projector/--no-train-projector",
                                                   help="Train the vision-to-LLM projector (default: the recipe's choice)."),
    contrastive_weight: Optional[float] = typer.Option(None, "--contrastive-weight",
                                                       help="Weight of the pass-1 contrastive loss (default 1.0)."),
    autoregressive_weight: Optional[float] = typer.Option(None, "--autoregressive-weight",
                                                          help="Weight of the pass-2 answer/caption loss (default 1.0)."),
    distill_weight: Optional[float] = typer.Option(
        None, "--distill-weight", help="Weight of a loss pulling pass 2's input (projected summary tokens) toward the "
                                       "base's pool@K visual tokens, which the base already reads (default 0: off)."),
    distill_fade_from: Optional[float] = typer.Option(
        None, "--distill-fade-from", help="Share of training after which the distillation weight falls linearly to 0 "
                                          "at the last step (default 1.0: constant)."),
    distill_layout: Optional[str] = typer.Option(
        None, "--distill-layout", help="With --nested: row-major (default) or coarse-to-fine, which lines every "
                                       "budget's pool@k cells up so that summary token i covers nested regions."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 1e-4)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="Linear warm-up steps (default 0)."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Batches per optimizer step (default 1)."),
    clip_norm: Optional[float] = typer.Option(None, "--clip-norm", help="Gradient norm clip (default 1.0)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Samples per batch (default 8)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps (default: --epochs)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data (default 1; fractions allowed)."),
    min_pixels: Optional[int] = typer.Option(None, "--min-pixels", min=1,
                                             help="Qwen2-VL family: smallest resized image area in pixels (recorded)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", min=1,
                                             help="Qwen2-VL family: largest resized image area in pixels (recorded)."),
    pool_schedule: Optional[str] = typer.Option(None, "--pool-schedule",
                                                help="LLaVolta staged pooling: none, llavolta, or '0.25:8,0.25:2,0.5:1'."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (CUDA only)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps (default 0: at the end only)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every",
                                                   help="Save a resumable checkpoint every N steps (default 0: none)."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard",
                                               help="Also write TensorBoard logs to the run folder (default off)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --output-dir."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Train a Fwd2Bot compressor: pass 1 -> summary tokens (contrastive), pass 2 -> answers (autoregressive)."""
    options = {k: v for k, v in locals().items() if k not in ("config", "recipe", "quick", "as_json", "resume", "dtype")}
    from .commands import user_errors

    check(device=device, dtype=dtype, model=model if recipe is None else None)

    if recipe is not None:
        _run_recipe(recipe, quick, output_dir, device, seed, as_json)
        return
    from fwd2bot_index.training import TrainConfig, TrainingError, run_training

    options["resume"] = True if resume else None
    options["dtype"] = None if dtype == "auto" else dtype
    try:
        with user_errors():
            cfg = TrainConfig.from_cli_args(config, **options)
            if not cfg.model or not cfg.data:
                raise fail("give --model (a LLaVA base or checkpoint) and --data (or --config / --recipe demo)", 2)
            result = run_training(cfg, progress=True)
    except TrainingError as exc:
        raise fail(str(exc))
    if as_json:
        print_json(result.to_dict())
    else:
        typer.echo(f"trained {result.steps} steps ({result.samples_per_s:.1f} samples/s); model: {result.model_dir}")


def _run_recipe(recipe: str, quick: bool, output_dir: Optional[str], device: str, seed: Optional[int],
                as_json: bool) -> None:
    if recipe != "demo":
        raise fail(f"unknown recipe {recipe!r}: the one recipe is 'demo'", 2)
    from fwd2bot_index.training.demo_recipe import train_demo_model

    out = output_dir or ("f2b-demo-quick" if quick else "f2b-demo")
    work = f"{out.rstrip('/')}.work"  # stages live here: the same command after a kill continues from them
    result = train_demo_model(out, quick=quick, seed=seed or 0, device=device, progress=True, work_dir=work)
    if as_json:
        print_json(result)
    else:
        typer.echo(f"demo model written to {result.get('model_dir', out)}")
