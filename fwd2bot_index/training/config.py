"""Training settings (``TrainConfig``) and what a run reports (``TrainEvent``, ``TrainResult``).

Kept apart from the trainer so that a config file can be read and validated without torch models
(``f2b train --config``, the shipped recipes' tests).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model.config import IMAGE_READOUTS, TEXT_READOUTS
from .schedule import PoolSchedule

OBJECTIVES = ("fwd2bot", "pretrain")
DISTILL_LAYOUTS = ("row-major", "coarse-to-fine")
# Settings that must not change between a run and its resume (the rest, e.g. eval_every, may); the distillation
# settings among them: a resume that changed them would move the targets the compressor learns mid-run.
RESUME_FIXED = ("objective", "data", "batch_size", "grad_accum", "seed", "num_summary_tokens", "embed_dim",
                 "lora_r", "lora_alpha", "lora_targets", "lr", "max_steps", "epochs", "pool_schedule",
                 "train_summary_tokens", "train_adapters", "train_heads", "train_projector", "train_llm",
                 "train_vision_tower", "min_pixels", "max_pixels", "nested",
                 "distill_weight", "distill_fade_from", "distill_layout", "image_readout", "text_readout")


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
    # nested budgets (``training.nested``): the first k summary tokens are trained as a stored form for
    # every k in the list, whose largest is K; None or []: plain training at K only
    nested: list[int] | None = None
    embed_dim: int = 256
    # how the contrastive heads read their tokens (``model.readout``): mean / last (the paper's) or mixer
    image_readout: str = "mean"
    text_readout: str = "last"
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
    # pass 2's input (projected summary tokens) regressed onto the base's pooled visual tokens of the same count
    # (``losses.pooled_distillation``): teaches pass 1 what the base reads; 0 turns it off (the paper's losses)
    distill_weight: float = 0.0
    # the share of training after which that weight falls linearly to 0 at the last step (1.0: constant); lets
    # the contrastive and autoregressive losses alone shape the last part of training
    distill_fade_from: float = 1.0
    # how nested budgets line their pool@k targets up with the summary tokens: "row-major" (each budget's grid
    # in reading order) or "coarse-to-fine" (token i of every budget covers a part of token i's cell of the next
    # smaller budget: ``nested.coarse_to_fine_orders``)
    distill_layout: str = "row-major"
    caption_prompt: str = "Describe the image."
    caption_target_share: float = 0.5  # share of pass-2 targets that are captions when a sample has QA too
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    clip_norm: float | None = 1.0
    bf16: bool | None = None  # autocast; None = on when training on CUDA; True on a CPU too
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
        if isinstance(self.nested, str):
            from .nested import parse_budgets

            self.nested = parse_budgets(self.nested) or None
        elif self.nested is not None:
            self.nested = [int(b) for b in self.nested] if isinstance(self.nested, (list, tuple)) else self.nested
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
        if self.objective == "fwd2bot" and max(self.contrastive_weight, self.autoregressive_weight,
                                               self.distill_weight) <= 0:
            problems.append("contrastive_weight, autoregressive_weight and distill_weight are all 0: nothing to learn")
        if self.distill_weight < 0:
            problems.append(f"distill_weight must be 0 or more, got {self.distill_weight}")
        if not 0 <= self.distill_fade_from <= 1:
            problems.append(f"distill_fade_from is a share of training within [0, 1], got {self.distill_fade_from}")
        if self.image_readout not in IMAGE_READOUTS:
            problems.append(f"image_readout {self.image_readout!r}: use {' or '.join(IMAGE_READOUTS)}")
        if self.text_readout not in TEXT_READOUTS:
            problems.append(f"text_readout {self.text_readout!r}: use {' or '.join(TEXT_READOUTS)}")
        if self.distill_layout not in DISTILL_LAYOUTS:
            problems.append(f"distill_layout {self.distill_layout!r}: use {' or '.join(DISTILL_LAYOUTS)}")
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
        if self.nested and self.objective != "fwd2bot":
            problems.append("nested budgets train a compressor's summary tokens: use objective 'fwd2bot'")
        if self.nested:
            from .nested import parse_budgets

            try:
                parse_budgets(self.nested, self.num_summary_tokens)
            except TrainingError as exc:
                problems.append(f"nested: {str(exc).removeprefix('--nested ')}")
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
        nested = data.get("nested")
        if nested and not isinstance(nested, str) and "num_summary_tokens" not in data:  # K is the largest budget
            data = {**data, "num_summary_tokens": max(int(b) for b in nested)}
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
        nested = options.get("nested")
        if isinstance(nested, str):  # --nested 4,8,16,32: K is its largest; an explicit -K must agree
            from .nested import parse_budgets

            options["nested"] = parse_budgets(nested, options.get("num_summary_tokens")) or None
            if options["nested"] and options.get("num_summary_tokens") is None:
                options["num_summary_tokens"] = options["nested"][-1]
        base.update({k: v for k, v in options.items() if v is not None})
        if isinstance(base.get("data"), str):
            base["data"] = [base["data"]]
        return cls.from_dict(base)


#: the defaults of the resume-fixed settings that have one: a run saved before a setting existed ran with it
RESUME_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                   if f.name in RESUME_FIXED and f.default is not dataclasses.MISSING}


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
    world_size: int = 1  # data-parallel processes (torchrun); steps and samples are global

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

