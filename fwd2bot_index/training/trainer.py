"""The double-forward trainer (Fwd2Bot) and base pretraining, with LLaVolta's staged compression.

One optimizer step of the ``fwd2bot`` objective, per micro-batch:
  pass 1 (pass-1 adapter): visual tokens, pooled by the stage's stride -> K summary tokens;
  contrastive: symmetric InfoNCE between the image embedding (image head over the summary tokens)
    and the caption embedding (same LLM and adapter, text head), in-batch negatives, learnable
    temperature;
  pass 2 (pass-2 adapter): the summary tokens in front of a prompt -> autoregressive loss on the
    caption or answer tokens only;
  loss = contrastive_weight * contrastive + autoregressive_weight * autoregressive
         (+ distill_weight * distill: pass 2's input pulled toward pool@K, ``losses.pooled_distillation``).
The ``pretrain`` objective trains a stock LLaVA's projector and LLM to caption / answer from all its
visual tokens (no compressor) and saves a plain transformers folder: how the demo model's base is made.

Output folder: ``model/`` (the released model), ``checkpoints/step-N/`` (resumable state),
``metrics.jsonl`` (one row per step and per evaluation), ``train_config.json``.

Under ``torchrun`` (or ``accelerate launch``) the same code runs data-parallel: see ``distributed.py``.
The class is assembled from its parts by responsibility: settings in ``config.py``, the step and its
losses in ``step.py`` (``StepMixin``), checkpoints and logs in ``records.py`` (``RecordsMixin``); this
module sets a run up and drives it.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from ..model import Fwd2Bot, Strategy
from ..model.backbone import load_backbone
from ..model.checkpoint import is_checkpoint, resolve_model_name
from . import state as ckpt
from .config import OBJECTIVES, RESUME_FIXED, TrainConfig, TrainEvent, TrainingError, TrainResult
from .data import ImageLoader, Sample, read_dataset, split_samples
from .distributed import DistContext, wrap_ddp
from .records import RecordsMixin
from .step import Batch, BatchPlan, StepMixin, WarmupCosine

__all__ = ["OBJECTIVES", "RESUME_FIXED", "Batch", "BatchPlan", "TrainConfig", "TrainEvent", "TrainResult", "Trainer",
           "TrainingError", "run_training", "train"]


def _model_source(name: str) -> str:
    """An existing local path made absolute, so a checkpoint's base reference works from any folder."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


class Trainer(StepMixin, RecordsMixin):
    """Runs one training configuration; ``train()`` does everything, the pieces are public for tests."""

    def __init__(self, config: TrainConfig, progress: bool = True,
                 callbacks: Iterable[Callable[[TrainEvent], None]] = (), model: Fwd2Bot | None = None,
                 train_samples: Sequence[Sample] | None = None, eval_samples: Sequence[Sample] | None = None):
        config.validate()
        self.config = config
        self.distributed = DistContext.from_environment(config.device)
        self.progress = progress and self.distributed.is_main
        self.callbacks = list(callbacks)
        self.out = Path(config.output_dir)
        self.loader = ImageLoader()
        self.schedule = config.schedule()
        self.parts = config.parts()
        self.step = 0
        self.samples_seen = 0
        self.evals: list[dict[str, Any]] = []
        self.last: dict[str, float] = {}
        self.resumed_from: str | None = None
        self._elapsed_before = 0.0
        self._started = time.perf_counter()
        self._pool = ThreadPoolExecutor(config.num_workers) if config.num_workers > 0 else None
        self._tb = None
        torch.manual_seed(config.seed)
        resume_dir = self._resume_dir()
        self.train_samples, self.eval_samples = self._samples(train_samples, eval_samples)
        self.model = model if model is not None else self._load_model(resume_dir)
        self.device = self.model.backbone.device
        if self.distributed.rank > 0:  # every rank built the same model; dropout should differ per rank
            torch.manual_seed(config.seed + self.distributed.rank)
        k = self.model.config.num_summary_tokens or 1
        self._text_strategy = Strategy("fwd2bot", "fwd2bot", k)
        self.budgets = self._nested_budgets()
        self.check_distillation()
        self.autocast = self._autocast_setting()
        self.named_params = self._select_parameters()
        trainable = {id(p) for _, p in self.named_params}
        self._idle = [p for n, p in self.model.backbone.hf.named_parameters() if "lora_" in n and id(p) not in trainable]
        self._ddp = (wrap_ddp(self, [p for _, p in self.named_params], self.distributed)
                     if self.distributed.enabled else None)
        self.optimizer = self._optimizer()
        self.plan = BatchPlan(len(self.train_samples), config.batch_size, config.seed,
                              self.distributed.rank, self.distributed.world)
        self.total_steps = self._total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(self.total_steps, config.warmup_steps, config.min_lr_ratio))
        if resume_dir is not None:
            self._restore(resume_dir)

    # -- setup --------------------------------------------------------------------------------
    def _resume_dir(self) -> Path | None:
        resume = self.config.resume
        if resume in (False, None, "", "false"):
            return None
        if resume in (True, "true", "latest"):
            found = ckpt.latest_checkpoint(self.out / "checkpoints")
            if found is None:
                raise TrainingError(f"--resume: no complete checkpoint under {self.out / 'checkpoints'}; "
                                    "start without --resume")
            return found
        path = Path(resume)
        if not (path / ckpt.STATE_FILE).is_file():
            raise TrainingError(f"--resume {path}: not a training checkpoint (no {ckpt.STATE_FILE})")
        return path

    def _samples(self, train, held) -> tuple[list[Sample], list[Sample]]:
        if train is not None:
            return list(train), list(held or [])
        samples: list[Sample] = []
        for source in self.config.data:
            samples += read_dataset(source, image_root=self.config.image_root)
        return split_samples(samples, self.config.eval_split, self.config.eval_fraction, self.config.eval_max)

    def _load_model(self, resume_dir: Path | None) -> Fwd2Bot:
        cfg = self.config
        if resume_dir is not None:
            source = str(resume_dir / ckpt.MODEL_DIR)
        else:
            source = _model_source(resolve_model_name(cfg.model))
        pixels = {"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels}
        device = self.distributed.device(cfg.device)  # one GPU per rank under torchrun
        if cfg.objective == "pretrain":
            if is_checkpoint(source):
                raise TrainingError(f"{source} is a Fwd2Bot compressor checkpoint; objective 'pretrain' "
                                    "trains a stock LLaVA model (give its folder)")
            return Fwd2Bot.stock(load_backbone(source, device=device, dtype=cfg.dtype, **pixels))
        if is_checkpoint(source):  # continue training a compressor (or resume)
            return Fwd2Bot.from_pretrained(source, device=device, dtype=cfg.dtype, **pixels)
        backbone = load_backbone(source, device=device, dtype=cfg.dtype, **pixels)
        return Fwd2Bot.create(backbone, num_summary_tokens=cfg.num_summary_tokens, embed_dim=cfg.embed_dim,
                              lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              lora_targets=cfg.lora_targets, seed=cfg.seed, image_readout=cfg.image_readout,
                              text_readout=cfg.text_readout)

    def _nested_budgets(self) -> list[int]:
        """The nested budgets this run trains (``training.nested``), recorded in the model's config so the
        checkpoint says them: ``--nested``, else those of the compressor being continued, else none.
        A continued nested compressor stays nested (plain steps at K would untrain the shorter prefixes
        its checkpoint still claims)."""
        model = self.model
        if self.config.objective != "fwd2bot" or model.compressor is None:
            return []
        k = model.config.num_summary_tokens
        budgets = list(self.config.nested or model.config.nested_budgets or [])
        if budgets and budgets[-1] != k:
            raise TrainingError(f"--nested {','.join(map(str, budgets))}: the largest budget must be the compressor's "
                                f"K = {k} (continuing {self.config.model})")
        model.config.nested_budgets = budgets
        return budgets

    def _autocast_setting(self) -> bool:
        """bf16 autocast: on by default on CUDA; on the CPU only when asked (``bf16=True``), since it
        pays only where the CPU has bf16 matrix units (the demo compressor: ~1.5x with AMX)."""
        wanted = self.config.bf16
        return bool(self.device.type == "cuda" if wanted is None else wanted)

    def _select_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Set requires_grad by part, and return the trainable (name, parameter) pairs, sorted by name
        so the optimizer's order is the same for a fresh model and one reloaded to resume."""
        model, parts = self.model, self.parts
        hf = model.backbone.hf
        for p in hf.parameters():
            p.requires_grad_(False)
        chosen: dict[str, torch.nn.Parameter] = {}
        if model.compressor is not None:
            for name, p in model.compressor.named_parameters():
                on = parts["summary_tokens"] if name == "summary_tokens" else parts["heads"]
                p.requires_grad_(on)
                if on:
                    chosen[f"compressor.{name}"] = p
        elif self.config.objective == "fwd2bot":
            raise TrainingError("the fwd2bot objective needs a compressor")
        if model.peft is not None:
            model.enable_adapter_training(parts["adapters"])
            for name, p in hf.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(parts["adapters"])
                    if parts["adapters"]:
                        chosen[f"hf.{name}"] = p
        groups = []
        if parts["projector"]:
            groups.append(model.backbone.projector)
        if parts["llm"]:
            groups += [model.backbone.decoder, hf.lm_head]
        if self.config.train_vision_tower:
            groups.append(model.backbone.vision_tower)
        for module in groups:
            prefix = {id(m): n for n, m in hf.named_modules()}[id(module)]
            for name, p in module.named_parameters():
                if "lora_" in name:
                    continue
                p.requires_grad_(True)
                chosen[f"hf.{prefix}.{name}"] = p
        if not chosen:
            raise TrainingError("no parameter is trainable with these train_* settings")
        return sorted(chosen.items())

    def _optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.named_params:
            plain = p.ndim < 2 or name.endswith(("summary_tokens", "logit_scale")) or "norm" in name
            (no_decay if plain else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.lr)

    def _total_steps(self) -> int:
        if self.config.max_steps:
            return int(self.config.max_steps)
        micro = self.config.epochs * max(1, self.plan.batches_per_epoch)
        return max(1, math.ceil(micro / self.config.grad_accum))

    # -- the run ---------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Train to ``total_steps`` (continuing a resumed run), checkpointing and evaluating on the way."""
        from tqdm.auto import tqdm

        cfg = self.config
        self._started = time.perf_counter()
        self._open_logs()
        if cfg.eval_at_start and self.step == 0 and self.eval_samples:
            self._run_eval()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, file=sys.stderr,
                   desc=f"training ({cfg.objective})", unit="step", dynamic_ncols=True)
        rate = None
        try:
            while self.step < self.total_steps:
                metrics = self.train_step()
                rate = metrics["samples_per_s"] if rate is None else 0.9 * rate + 0.1 * metrics["samples_per_s"]
                self._log({"kind": "train", **metrics})
                bar.update(1)
                bar.set_postfix(_postfix(metrics, rate), refresh=False)
                self._emit(TrainEvent("step", self.step, metrics))
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self._run_eval()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        if self.eval_samples and (not self.evals or self.evals[-1]["step"] != self.step):
            self._run_eval()
        self.loader.skipped.update(self._all_skipped())
        model_dir = self.out / "model"
        if self.distributed.is_main:
            self._save_final(model_dir)
        self.distributed.barrier()  # the released model is complete before any rank returns
        elapsed = self._elapsed_before + (time.perf_counter() - self._started)
        result = TrainResult(
            model_dir=str(model_dir), output_dir=str(self.out), steps=self.step, samples_seen=self.samples_seen,
            elapsed_s=elapsed, samples_per_s=self.samples_seen / elapsed if elapsed > 0 else 0.0,
            last=self.last, evals=self.evals, skipped_images=dict(self.loader.skipped),
            resumed_from=self.resumed_from, world_size=self.distributed.world,
        )
        if self.distributed.is_main:
            (self.out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
        if self.loader.skipped and self.distributed.is_main:
            warnings.warn(self.loader.report(), stacklevel=2)
        self._emit(TrainEvent("end", self.step, {"skipped_images": len(self.loader.skipped)}, str(model_dir)))
        if self._tb is not None:
            self._tb.close()
        if self._pool is not None:
            self._pool.shutdown()
        return result


def _postfix(metrics: dict[str, Any], rate: float) -> dict[str, str]:
    out = {"loss": f"{metrics['loss']:.3f}"}
    if "contrastive" in metrics:
        out["con"] = f"{metrics['contrastive']:.3f}"
    if "autoregressive" in metrics:
        out["ar"] = f"{metrics['autoregressive']:.3f}"
    if "distill" in metrics:
        out["dist"] = f"{metrics['distill']:.3f}"
    out["lr"] = f"{metrics['lr']:.2e}"
    out["sps"] = f"{rate:.1f}"
    if metrics.get("pool_stride", 1) > 1:
        out["stride"] = str(metrics["pool_stride"])
    return out


def run_training(config: TrainConfig, progress: bool = True,
                 callbacks: Iterable[Callable[[TrainEvent], None]] = ()) -> TrainResult:
    """Train as ``config`` says and return what was produced (the CLI's entry point).

    Under torchrun every process calls this; the process group it joined is closed at the end."""
    trainer = Trainer(config, progress=progress, callbacks=callbacks)
    try:
        return trainer.train()
    finally:
        trainer.distributed.shutdown()


train = run_training
