"""The double-forward trainer (Fwd2Bot) and base pretraining, with LLaVolta's staged compression.

One optimizer step of the ``fwd2bot`` objective, per micro-batch:
  pass 1 (pass-1 adapter): visual tokens, pooled by the stage's stride -> K summary tokens;
  contrastive: symmetric InfoNCE between the image embedding (image head over the summary tokens)
    and the caption embedding (same LLM and adapter, text head), in-batch negatives, learnable
    temperature;
  pass 2 (pass-2 adapter): the summary tokens in front of a prompt -> autoregressive loss on the
    caption or answer tokens only;
  loss = contrastive_weight * contrastive + autoregressive_weight * autoregressive.
The ``pretrain`` objective trains a stock LLaVA's projector and LLM to caption / answer from all its
visual tokens (no compressor) and saves a plain transformers folder: how the demo model's base is made.

Output folder: ``model/`` (the released model), ``checkpoints/step-N/`` (resumable state),
``metrics.jsonl`` (one row per step and per evaluation), ``train_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..model import Fwd2Bot, Strategy
from ..model.backbone import load_backbone
from ..model.checkpoint import is_checkpoint, resolve_model_name
from . import state as ckpt
from .data import ImageLoader, Sample, read_dataset, split_samples
from .losses import MAX_LOGIT_SCALE, info_nce, recall_at_1
from .schedule import PoolSchedule, effective_stride, pooled_token_count, warmup_cosine

OBJECTIVES = ("fwd2bot", "pretrain")
# Settings that must not change between a run and its resume (the rest, e.g. eval_every, may).
_RESUME_FIXED = ("objective", "data", "batch_size", "grad_accum", "seed", "num_summary_tokens", "embed_dim",
                 "lora_r", "lora_alpha", "lora_targets", "lr", "max_steps", "epochs", "pool_schedule",
                 "train_summary_tokens", "train_adapters", "train_heads", "train_projector", "train_llm",
                 "train_vision_tower", "min_pixels", "max_pixels")


class TrainingError(RuntimeError):
    """The run cannot start or go on (nothing to train, no readable data, a mismatched resume)."""


@dataclass
class TrainConfig:
    """Everything a training run needs; JSON-serializable (written to ``train_config.json``)."""

    model: str = ""
    data: list[str] = field(default_factory=list)
    output_dir: str = "f2b-run"
    objective: str = "fwd2bot"
    image_root: str | None = None
    # the compressor (ignored when continuing from a compressor checkpoint, which has its own)
    num_summary_tokens: int = 32
    embed_dim: int = 256
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str | None = None
    # which parts train; None = the objective's default (fwd2bot: tokens, adapters, heads; pretrain: projector, LLM)
    train_summary_tokens: bool | None = None
    train_adapters: bool | None = None
    train_heads: bool | None = None  # image head, text head, temperature, pass-2 projection
    train_projector: bool | None = None
    train_llm: bool | None = None  # the whole language model incl. embeddings and LM head (small models)
    train_vision_tower: bool = False  # the vision encoder too (a base trained from scratch, e.g. the demo model)
    # Qwen2-VL family: resize bounds of the images (None: the checkpoint's or the folder's own)
    min_pixels: int | None = None
    max_pixels: int | None = None
    # losses and pass-2 targets
    contrastive_weight: float = 1.0
    autoregressive_weight: float = 1.0
    caption_prompt: str = "Describe the image."
    caption_target_share: float = 0.5  # share of pass-2 targets that are captions when a sample has QA too
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    clip_norm: float | None = 1.0
    bf16: bool | None = None  # autocast; None = on when training on CUDA. CPU runs stay in fp32.
    seed: int = 0
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    pool_schedule: Any = "none"  # 'none', 'llavolta', 'llavolta-layer0', '0.25:8@2,0.5:1' or [(fraction, stride, layer)]
    # evaluation, checkpoints, logging
    eval_every: int = 0  # 0: at the end only
    eval_split: str = "auto"
    eval_fraction: float = 0.05
    eval_max: int = 512
    eval_at_start: bool = True
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    tensorboard: bool = False
    device: str = "auto"
    dtype: str = "fp32"  # master weights; bf16 autocast is separate
    num_workers: int = 0  # threads decoding images
    resume: Any = False  # False, True (latest checkpoint in output_dir) or a checkpoint folder

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        self.data = [str(d) for d in self.data]
        if isinstance(self.pool_schedule, PoolSchedule):
            self.pool_schedule = self.pool_schedule.to_list()
        elif isinstance(self.pool_schedule, (list, tuple)):
            self.pool_schedule = PoolSchedule.parse(self.pool_schedule).to_list()

    # -- parts and derived settings -------------------------------------------------------
    def parts(self) -> dict[str, bool]:
        """Which parts train, with the objective's defaults filled in."""
        pre = self.objective == "pretrain"
        chosen = {
            "summary_tokens": self.train_summary_tokens, "adapters": self.train_adapters,
            "heads": self.train_heads, "projector": self.train_projector, "llm": self.train_llm,
        }
        defaults = {"summary_tokens": not pre, "adapters": not pre, "heads": not pre, "projector": pre, "llm": pre}
        return {k: defaults[k] if v is None else bool(v) for k, v in chosen.items()}

    def schedule(self) -> PoolSchedule:
        return PoolSchedule.parse(self.pool_schedule)

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        problems = []
        if self.objective not in OBJECTIVES:
            problems.append(f"objective {self.objective!r}: use {' or '.join(OBJECTIVES)}")
        if not self.model:
            problems.append("model: name a base LLaVA folder or hub id, a compressor checkpoint, or 'demo'")
        if not self.data:
            problems.append("data: give at least one data file or demo-data folder")
        for name in ("batch_size", "grad_accum", "num_summary_tokens", "embed_dim", "lora_r"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            problems.append(f"epochs must be positive, got {self.epochs}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.objective == "fwd2bot" and self.contrastive_weight <= 0 and self.autoregressive_weight <= 0:
            problems.append("contrastive_weight and autoregressive_weight are both 0: nothing to learn")
        if not any(self.parts().values()) and not self.train_vision_tower:
            problems.append("every train_* switch is off: nothing would train")
        if self.objective == "pretrain" and not (self.parts()["projector"] or self.parts()["llm"]
                                                 or self.train_vision_tower):
            problems.append("objective 'pretrain' trains the projector, the LLM or the vision tower: turn one on")
        if not 0 <= self.caption_target_share <= 1:
            problems.append(f"caption_target_share must be within [0, 1], got {self.caption_target_share}")
        try:
            self.schedule()
        except ValueError as exc:
            problems.append(f"pool_schedule: {exc}")
        if problems:
            raise TrainingError("invalid training settings:\n  " + "\n  ".join(problems))

    # -- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "training settings") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise TrainingError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_cli_args(cls, config_file: str | Path | None = None, **options: Any) -> "TrainConfig":
        """Settings from a JSON file (optional) overridden by CLI options; ``None`` means 'not given'."""
        base = cls.load(config_file).to_dict() if config_file else {}
        base.update({k: v for k, v in options.items() if v is not None})
        if isinstance(base.get("data"), str):
            base["data"] = [base["data"]]
        return cls.from_dict(base)


@dataclass
class TrainEvent:
    """What callbacks receive: kind is 'step', 'eval', 'checkpoint' or 'end'."""

    kind: str
    step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    model_dir: str
    output_dir: str
    steps: int
    samples_seen: int
    elapsed_s: float
    samples_per_s: float
    last: dict[str, float]
    evals: list[dict[str, Any]]
    skipped_images: dict[str, str]
    resumed_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class BatchPlan:
    """Seeded, resumable batch order: a fresh permutation each epoch; the position is (epoch, cursor)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < 1:
            raise TrainingError("no training samples (every record is in a held-out split?)")
        self.size, self.batch_size, self.seed = size, min(batch_size, size), seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size  # the last partial batch is dropped: contrastive wants full batches

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next(self) -> tuple[int, list[int]]:
        if self.cursor + self.batch_size > self.size:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.cursor:self.cursor + self.batch_size].tolist()
        self.cursor += self.batch_size
        return self.epoch, idx

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.cursor = int(position["epoch"]), int(position["cursor"])
        self._order = self._permutation(self.epoch)


@dataclass
class Batch:
    images: list[Any]
    captions: list[str | None]  # contrastive text per item (None: the sample has no caption)
    prompts: list[str]  # pass-2 prompt per item
    targets: list[str]  # pass-2 target per item


class _WarmupCosine:
    """A picklable-free LR lambda (its attributes are saved by the scheduler's state_dict)."""

    def __init__(self, total: int, warmup: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.total, self.warmup, self.min_ratio)


def _model_source(name: str) -> str:
    """An existing local path made absolute, so a checkpoint's base reference works from any folder."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


class Trainer:
    """Runs one training configuration; ``train()`` does everything, the pieces are public for tests."""

    def __init__(self, config: TrainConfig, progress: bool = True,
                 callbacks: Iterable[Callable[[TrainEvent], None]] = (), model: Fwd2Bot | None = None,
                 train_samples: Sequence[Sample] | None = None, eval_samples: Sequence[Sample] | None = None):
        config.validate()
        self.config = config
        self.progress = progress
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
        k = self.model.config.num_summary_tokens or 1
        self._text_strategy = Strategy("fwd2bot", "fwd2bot", k)
        self.autocast = self._autocast_setting()
        self.named_params = self._select_parameters()
        trainable = {id(p) for _, p in self.named_params}
        self._idle = [p for n, p in self.model.backbone.hf.named_parameters() if "lora_" in n and id(p) not in trainable]
        self.optimizer = self._optimizer()
        self.plan = BatchPlan(len(self.train_samples), config.batch_size, config.seed)
        self.total_steps = self._total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _WarmupCosine(self.total_steps, config.warmup_steps, config.min_lr_ratio))
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
        if cfg.objective == "pretrain":
            if is_checkpoint(source):
                raise TrainingError(f"{source} is a Fwd2Bot compressor checkpoint; objective 'pretrain' "
                                    "trains a stock LLaVA model (give its folder)")
            return Fwd2Bot.stock(load_backbone(source, device=cfg.device, dtype=cfg.dtype, **pixels))
        if is_checkpoint(source):  # continue training a compressor (or resume)
            return Fwd2Bot.from_pretrained(source, device=cfg.device, dtype=cfg.dtype, **pixels)
        backbone = load_backbone(source, device=cfg.device, dtype=cfg.dtype, **pixels)
        return Fwd2Bot.create(backbone, num_summary_tokens=cfg.num_summary_tokens, embed_dim=cfg.embed_dim,
                              lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              lora_targets=cfg.lora_targets, seed=cfg.seed)

    def _autocast_setting(self) -> bool:
        wanted = self.config.bf16
        on_cuda = self.device.type == "cuda"
        if wanted and not on_cuda:
            warnings.warn("bf16 autocast is used on CUDA only; this CPU run trains in fp32", stacklevel=3)
        return bool(on_cuda if wanted is None else wanted and on_cuda)

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

    # -- data -----------------------------------------------------------------------------
    def _choose(self, epoch: int, index: int) -> tuple[str | None, str, str]:
        """(contrastive caption, pass-2 prompt, pass-2 target) for a sample in an epoch, seeded so a
        resumed run draws the same."""
        sample = self.train_samples[index]
        rng = np.random.default_rng([self.config.seed, epoch, index, 1])
        caption = sample.captions[int(rng.integers(len(sample.captions)))] if sample.captions else None
        use_caption = caption is not None and (not sample.qa or rng.random() < self.config.caption_target_share)
        if use_caption:
            return caption, self.config.caption_prompt, caption
        question, answer = sample.qa[int(rng.integers(len(sample.qa)))]
        return caption, question, answer

    def _load_images(self, samples: Sequence[Sample]) -> list[Any]:
        if self._pool is not None:
            return list(self._pool.map(self.loader.load, samples))
        return [self.loader.load(s) for s in samples]

    def next_batch(self) -> Batch:
        """The next batch with unreadable images dropped (and counted)."""
        while True:
            epoch, idx = self.plan.next()
            images = self._load_images([self.train_samples[i] for i in idx])
            batch = Batch([], [], [], [])
            for i, image in zip(idx, images):
                if image is None:
                    continue
                caption, prompt, target = self._choose(epoch, i)
                batch.images.append(image)
                batch.captions.append(caption)
                batch.prompts.append(prompt)
                batch.targets.append(target)
            if batch.images:
                return batch
            if len(self.loader.skipped) >= len(self.train_samples):
                raise TrainingError("no training image could be read: " + self.loader.report())

    # -- the step -------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def stride_at(self, step: int) -> int:
        """The effective pooling stride at ``step`` on this model's visual-token grid."""
        return effective_stride(self.schedule.stage_at(step, self.total_steps), self.model.backbone.num_image_tokens)

    def layer_at(self, step: int) -> int:
        """The LLM layer before which the stage's pooling happens at ``step`` (0: before the LLM)."""
        return self.schedule.layer_at(step, self.total_steps)

    def batch_losses(self, batch: Batch, stride: int = 1) -> dict[str, torch.Tensor]:
        """The loss parts of one batch (differentiable)."""
        model, cfg = self.model, self.config
        pixels = model.backbone.pixel_values(batch.images)
        with self._autocast():
            visual = model.visual_tokens(pixels)
            if cfg.objective == "pretrain":
                tokens = model.backbone.pool_by_stride(visual, stride)  # per family (Qwen2-VL: per grid)
                ar = model.pass2_loss(tokens, batch.prompts, batch.targets, kind="full")
                return {"loss": ar, "autoregressive": ar}
            summary = model.compress(visual, pool_stride=stride, pool_layer=self.layer_at(self.step))
            parts: dict[str, torch.Tensor] = {}
            loss = summary.new_zeros((), dtype=torch.float32)
            with_caption = [i for i, c in enumerate(batch.captions) if c is not None]
            if cfg.contrastive_weight > 0 and len(with_caption) >= 2:
                texts = [batch.captions[i] for i in with_caption]
                image_emb = model.embed_summary(summary[with_caption])
                text_emb = model.embed_text_batch(texts, self._text_strategy)
                parts["contrastive"] = info_nce(image_emb, text_emb, model.compressor.logit_scale, texts)
                loss = loss + cfg.contrastive_weight * parts["contrastive"]
            if cfg.autoregressive_weight > 0:
                parts["autoregressive"] = model.pass2_loss(summary, batch.prompts, batch.targets, kind="fwd2bot")
                loss = loss + cfg.autoregressive_weight * parts["autoregressive"]
        parts["loss"] = loss
        return parts

    def _set_train_mode(self, on: bool) -> None:
        self.model.backbone.hf.train(on)
        if self.model.compressor is not None:
            self.model.compressor.train(on)

    def train_step(self) -> dict[str, float]:
        """One optimizer step (``grad_accum`` micro-batches); returns its logged metrics."""
        cfg = self.config
        started = time.perf_counter()
        stride = self.stride_at(self.step)
        self._set_train_mode(True)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        seen = 0
        for _ in range(cfg.grad_accum):
            batch = self.next_batch()
            parts = self.batch_losses(batch, stride)
            (parts["loss"] / cfg.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            seen += len(batch.images)
        for p in self._idle:  # peft's set_adapter makes the active adapter require grad even when frozen here
            p.grad = None
        params = [p for _, p in self.named_params]
        grad_norm = None
        if cfg.clip_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.model.compressor is not None:
            with torch.no_grad():
                self.model.compressor.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        self.step += 1
        self.samples_seen += seen
        if self.model.compressor is not None:
            self.model.config.trained_steps += 1
        elapsed = time.perf_counter() - started
        metrics = {"step": self.step, "epoch": self.plan.epoch, **sums, "lr": lr,
                   "samples_per_s": seen / elapsed if elapsed > 0 else 0.0, "pool_stride": stride,
                   "pool_layer": self.layer_at(self.step - 1) if stride > 1 else 0,
                   "visual_tokens": pooled_token_count(self.model.backbone.num_image_tokens, stride)}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        if self.model.compressor is not None:
            metrics["temperature"] = float(1.0 / self.model.compressor.logit_scale.detach().exp())
        self.last = metrics
        return metrics

    # -- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, samples: Sequence[Sample] | None = None) -> dict[str, float]:
        """Held-out retrieval R@1 (text->image, image->text; first caption per image) and caption loss."""
        samples = [s for s in (self.eval_samples if samples is None else samples) if s.captions]
        if not samples:
            return {}
        model, cfg = self.model, self.config
        self._set_train_mode(False)
        img_embs, txt_embs, loss_sum, count = [], [], 0.0, 0
        size = max(cfg.batch_size, 2)
        for start in range(0, len(samples), size):
            chunk = samples[start:start + size]
            images = [self.loader.load(s) for s in chunk]
            kept = [(img, s.captions[0]) for img, s in zip(images, chunk) if img is not None]
            if not kept:
                continue
            images, captions = [k[0] for k in kept], [k[1] for k in kept]
            with self._autocast():
                visual = model.visual_tokens(model.backbone.pixel_values(images))
                prompts = [cfg.caption_prompt] * len(images)
                if cfg.objective == "pretrain":
                    loss = model.pass2_loss(visual, prompts, captions, kind="full")
                else:
                    summary = model.compress(visual)
                    img_embs.append(model.embed_summary(summary))
                    txt_embs.append(model.embed_text_batch(captions, self._text_strategy))
                    loss = model.pass2_loss(summary, prompts, captions, kind="fwd2bot")
            loss_sum += float(loss) * len(images)
            count += len(images)
        if count == 0:
            return {}
        result = {"caption_loss": loss_sum / count, "eval_images": count}
        if img_embs:
            t2i, i2t = recall_at_1(torch.cat(img_embs), torch.cat(txt_embs))
            result.update({"r1_t2i": t2i, "r1_i2t": i2t})
        return result

    # -- checkpoints ----------------------------------------------------------------------
    def _save_model(self, folder: Path) -> None:
        """The model in its released format: compressor checkpoint, or a plain transformers folder."""
        model = self.model
        if self.config.objective == "pretrain":
            model.backbone.hf.save_pretrained(folder)
            model.backbone.processor.save_pretrained(folder)
            return
        base_trained = self.parts["projector"] or self.parts["llm"] or self.config.train_vision_tower
        if base_trained:  # the stored base changed: its signature must describe the new weights
            model.config.base_signature = model.backbone.signature()
        model.save_pretrained(str(folder), include_base=True if base_trained else None)

    def _save_final(self, folder: Path) -> None:
        """The released model, replaced atomically, with a short card (cards are not fingerprinted)."""
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=self.out))
        try:
            self._save_model(tmp / "model")
            (tmp / "model" / "README.md").write_text(self._card())
            old = folder.with_name(".model-old")
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp / "model", folder)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.model.compressor is not None:
            self.model.source = str(folder)

    def _card(self) -> str:
        cfg = self.config
        what = ("a Fwd2Bot compressor checkpoint (load with `Fwd2Bot.from_pretrained`)" if cfg.objective == "fwd2bot"
                else "a LLaVA base model pretrained for captioning / QA (a transformers folder)")
        last_eval = self.evals[-1] if self.evals else {}
        lines = [f"# {Path(self.out).name}", "", f"This folder is {what}, trained by fwd2bot-index.", "",
                 f"- objective: {cfg.objective}; started from: {cfg.model}", f"- data: {', '.join(cfg.data)}",
                 f"- optimizer steps: {self.step}; samples seen: {self.samples_seen}; batch {cfg.batch_size} x "
                 f"accumulation {cfg.grad_accum}; lr {cfg.lr}", f"- pooling schedule: {self.schedule.to_list()}",
                 f"- trained parts: {', '.join(k for k, v in self.parts.items() if v)}"
                 + (", vision tower" if cfg.train_vision_tower else ""),
                 f"- held-out evaluation at the end: {json.dumps({k: v for k, v in last_eval.items() if k != 'kind'})}",
                 f"- images skipped as unreadable: {len(self.loader.skipped)}", ""]
        return "\n".join(lines)

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "position": self.plan.position(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "skipped": dict(self.loader.skipped),
            "evals": json.dumps(self.evals),
            "elapsed_s": self._elapsed_before + (time.perf_counter() - self._started),
            "config": json.dumps(self.config.to_dict()),
        }

    def save_checkpoint(self) -> Path:
        path = ckpt.write_checkpoint(self.out / "checkpoints", self.step, self._save_model, self._state(),
                                     keep=self.config.keep_checkpoints)
        self._emit(TrainEvent("checkpoint", self.step, path=str(path)))
        return path

    def _restore(self, folder: Path) -> None:
        state = ckpt.read_state(folder)
        saved = json.loads(state["config"])
        now = self.config.to_dict()
        for settings in (saved, now):  # the same files, named from another working folder, are the same data
            settings["data"] = [str(Path(d).resolve()) for d in settings.get("data") or []]
        differs = [k for k in _RESUME_FIXED if saved.get(k) != now.get(k)]
        if differs:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differs)
            raise TrainingError(f"cannot resume from {folder}: settings changed ({detail}); resume with the "
                                f"settings of {self.out / 'train_config.json'} or start a new run")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.plan.restore(state["position"])
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.loader.skipped.update(state["skipped"])
        self.evals = json.loads(state["evals"])
        self._elapsed_before = float(state["elapsed_s"])
        ckpt.set_rng_state(state["rng"])
        self.resumed_from = str(folder)

    # -- logging ----------------------------------------------------------------------------
    def _emit(self, event: TrainEvent) -> None:
        for callback in self.callbacks:
            callback(event)

    def _log(self, row: dict[str, Any]) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            prefix = "eval/" if row.get("kind") == "eval" else "train/"
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(prefix + k, v, row["step"])

    def _open_logs(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        metrics = self.out / "metrics.jsonl"
        if self.resumed_from is not None and metrics.is_file():  # drop rows past the checkpoint: they are redone
            rows = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            metrics.write_text("".join(r + "\n" for r in rows))
        elif self.resumed_from is None and metrics.is_file():
            metrics.unlink()
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed (pip install tensorboard); metrics go to "
                              "metrics.jsonl only", stacklevel=2)

    def _run_eval(self) -> dict[str, Any]:
        result = self.evaluate()
        if result:
            row = {"kind": "eval", "step": self.step, **result}
            self.evals.append(row)
            self._log(row)
            self._emit(TrainEvent("eval", self.step, row))
        return result

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
        model_dir = self.out / "model"
        self._save_final(model_dir)
        elapsed = self._elapsed_before + (time.perf_counter() - self._started)
        result = TrainResult(
            model_dir=str(model_dir), output_dir=str(self.out), steps=self.step, samples_seen=self.samples_seen,
            elapsed_s=elapsed, samples_per_s=self.samples_seen / elapsed if elapsed > 0 else 0.0,
            last=self.last, evals=self.evals, skipped_images=dict(self.loader.skipped),
            resumed_from=self.resumed_from,
        )
        (self.out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
        if self.loader.skipped:
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
    out["lr"] = f"{metrics['lr']:.2e}"
    out["sps"] = f"{rate:.1f}"
    if metrics.get("pool_stride", 1) > 1:
        out["stride"] = str(metrics["pool_stride"])
    return out


def run_training(config: TrainConfig, progress: bool = True,
                 callbacks: Iterable[Callable[[TrainEvent], None]] = ()) -> TrainResult:
    """Train as ``config`` says and return what was produced (the CLI's entry point)."""
    return Trainer(config, progress=progress, callbacks=callbacks).train()


train = run_training
