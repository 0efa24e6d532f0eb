"""Schedules: LLaVolta's staged visual-token compression, and warmup + cosine learning rate.

LLaVolta trains with the visual tokens average-pooled heavily at first, then lightly, then not at
all, so that most steps are cheap and the last stage matches inference (all tokens). Its reference
(``scripts/v1_5/train-4stage.sh``) uses four stages of about a quarter of the steps each: stride 8
at LLM layer 2, stride 2 at layer 2, stride 2 at layer 16, none. Stride s keeps N/s tokens
(1-D ``avgpool1d`` along the sequence): on LLaVA-1.5's 576 tokens, 72 / 288 / 288 / 576.

Here a stride keeps the same N/s tokens (pooled 2-D on a square grid, see ``pool_by_stride``) and
``llavolta`` pools at the same *fractions of the LLM's depth* as the reference (layers 2, 2, 16 of
LLaVA-1.5-7B's 32: 6.25%, 6.25%, 50%; rounded half up to a whole layer, so 2, 2, 16 on 32 layers and
0, 0, 2 on the demo model's 4), with averaged position ids (``model.layer_pool``). Clamping the
reference layers to a shallow LLM (2 and 3 of 4) pooled at 50% and 75% of its depth instead. ``llavolta-layer0`` is the same schedule pooled
before the LLM, which also saves the first layers' compute; a family whose decoder the layer loop
cannot run (Qwen2-VL's M-RoPE) pools before the LLM whatever the stage's layer says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

LLAVOLTA = ((0.25, 8, 2), (0.25, 2, 2), (0.25, 2, 16), (0.25, 1, 0))
LLAVOLTA_DEPTH = 32  # the depth of LLaVA-1.5-7B's LLM, which LLAVOLTA's layers refer to
LLAVOLTA_LAYER0 = tuple((f, s, 0) for f, s, _ in LLAVOLTA)
PRESETS = {"llavolta": LLAVOLTA, "llavolta-layer0": LLAVOLTA_LAYER0, "none": ((1.0, 1, 0),), "off": ((1.0, 1, 0),)}


class ScheduleError(ValueError):
    """A pooling schedule that cannot be used."""


@dataclass(frozen=True)
class PoolSchedule:
    """Stages of (fraction of the steps, pooling stride, LLM layer the pooling happens before);
    the last stage must be stride 1. Stages given as (fraction, stride) pool at layer 0."""

    stages: tuple[tuple[float, int, int], ...] = ((1.0, 1, 0),)
    reference_depth: int | None = None  # layers are for an LLM this deep; scaled to the real one (None: as given)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ScheduleError("a pooling schedule needs at least one stage")
        stages = tuple((*st, 0) if len(st) == 2 else tuple(st) for st in self.stages)
        for fraction, stride, layer in stages:
            if not fraction > 0:
                raise ScheduleError(f"stage fraction must be positive, got {fraction}")
            if int(stride) != stride or stride < 1:
                raise ScheduleError(f"stage stride must be a whole number >= 1, got {stride}")
            if int(layer) != layer or layer < 0:
                raise ScheduleError(f"stage layer must be a whole number >= 0, got {layer}")
        if stages[-1][1] != 1:
            raise ScheduleError(
                f"the last stage must be uncompressed (stride 1) so training ends on what inference sees; "
                f"got stride {stages[-1][1]}: append a stage like 0.25:1"
            )
        total = sum(f for f, _, _ in stages)
        object.__setattr__(self, "stages", tuple((f / total, int(s), int(l)) for f, s, l in stages))

    @classmethod
    def parse(cls, spec: "str | Sequence[tuple[float, int]] | PoolSchedule | None") -> "PoolSchedule":
        """``None``/'none' (off), 'llavolta', 'llavolta-layer0', '0.25:8@2,0.25:2,0.5:1' (FRACTION:STRIDE[@LAYER]),
        or a list of (fraction, stride[, layer])."""
        if isinstance(spec, PoolSchedule):
            return spec
        if spec is None:
            return cls()
        if isinstance(spec, str):
            text = spec.strip().lower()
            if text in PRESETS:
                return cls(PRESETS[text], reference_depth=LLAVOLTA_DEPTH if text == "llavolta" else None)
            stages = []
            for part in text.split(","):
                fraction, sep, rest = part.partition(":")
                stride, _, layer = rest.partition("@")
                try:
                    if not sep:
                        raise ValueError
                    stages.append((float(fraction), int(stride), int(layer or 0)))
                except ValueError:
                    raise ScheduleError(
                        f"pool schedule {spec!r}: write stages as FRACTION:STRIDE[@LAYER] separated by commas "
                        f"(e.g. 0.25:8@2,0.25:2,0.5:1) or use a preset ({', '.join(PRESETS)})"
                    ) from None
            return cls(tuple(stages))
        return cls(tuple((float(st[0]), int(st[1]), int(st[2]) if len(st) > 2 else 0) for st in spec))

    @property
    def is_staged(self) -> bool:
        return any(s > 1 for _, s, _ in self.stages)

    def stage_index(self, step: int, total: int) -> int:
        """Which stage optimizer step ``step`` (0-based) of ``total`` falls in."""
        if total <= 0 or step >= total - 1:  # the last step always sees all tokens, even in a short run
            return len(self.stages) - 1
        position = min(max(step, 0), total - 1) / total
        edge = 0.0
        for i, (fraction, _, _) in enumerate(self.stages):
            edge += fraction
            if position < edge - 1e-12:
                return i
        return len(self.stages) - 1

    def stage_at(self, step: int, total: int) -> int:
        """The pooling stride at optimizer step ``step`` (0-based) of ``total``."""
        return self.stages[self.stage_index(step, total)][1]

    def layer_at(self, step: int, total: int, depth: int | None = None) -> int:
        """The LLM layer before which stage pooling happens at optimizer step ``step`` of ``total``;
        with ``depth`` (the LLM's layers) a depth-relative schedule is scaled to it."""
        return self.scaled_layer(self.stages[self.stage_index(step, total)][2], depth)

    def scaled_layer(self, layer: int, depth: int | None) -> int:
        """``layer`` at the same fraction of a ``depth``-layer LLM as of ``reference_depth`` (half up)."""
        if self.reference_depth is None or depth is None:
            return layer
        return int(math.floor(layer * depth / self.reference_depth + 0.5))

    def layers_for(self, depth: int | None) -> list[int]:
        """Each stage's pooling layer on a ``depth``-layer LLM (what a card or a report should state)."""
        return [self.scaled_layer(layer, depth) for _, _, layer in self.stages]

    def to_list(self) -> list[list[float]]:
        return [[f, s, l] for f, s, l in self.stages]


def stage_at(step: int, total: int, schedule: "str | Sequence[tuple[float, int]] | PoolSchedule" = "llavolta") -> int:
    """The pooling stride at ``step`` of ``total`` under ``schedule`` (LLaVolta's preset by default)."""
    return PoolSchedule.parse(schedule).stage_at(step, total)


def effective_stride(stride: int, num_tokens: int) -> int:
    """``stride`` capped at the number of visual tokens (a stride never pools below one token)."""
    return max(1, min(int(stride), num_tokens))


def pooled_token_count(num_tokens: int, stride: int) -> int:
    """How many visual tokens pass 1 sees at this stride: N // s, as in LLaVolta (``pool_by_stride``)."""
    stride = effective_stride(stride, num_tokens)
    return num_tokens if stride <= 1 else max(1, num_tokens // stride)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class PlateauLR:
    """Learning-rate multiplier that keeps learning through plateaus: linear warm-up, then constant,
    cut by ``factor`` only once the held-out score has not risen by ``min_delta`` for ``patience``
    checks in a row (never below ``min_ratio``).

    A fixed "N steps, cosine to 5%" schedule ended the demo base on a plateau with its learning rate
    already decayed; here the rate stays up as long as held-out accuracy still climbs. The state is
    plain numbers (``state_dict``), so a resumed run continues with exactly the same multipliers.
    """

    warmup: int = 100
    patience: int = 4
    factor: float = 0.5
    min_ratio: float = 0.05
    min_delta: float = 0.005
    scale: float = 1.0
    best: float = float("-inf")
    since_best: int = 0
    cuts: int = 0

    def multiplier(self, step: int) -> float:
        """The multiplier for optimizer step ``step`` (0-based)."""
        ramp = (step + 1) / self.warmup if self.warmup > 0 and step < self.warmup else 1.0
        return ramp * self.scale

    def observe(self, score: float) -> bool:
        """Record a held-out score; True when this check cut the rate."""
        if score > self.best + self.min_delta:
            self.best, self.since_best = score, 0
            return False
        self.best = max(self.best, score)
        self.since_best += 1
        if self.since_best < self.patience or self.scale <= self.min_ratio:
            return False
        self.scale = max(self.min_ratio, self.scale * self.factor)
        self.since_best, self.cuts = 0, self.cuts + 1
        return True

    @property
    def exhausted(self) -> bool:
        """At the floor and out of patience there: more steps are not expected to help."""
        return self.scale <= self.min_ratio and self.since_best >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "best": self.best, "since_best": float(self.since_best), "cuts": float(self.cuts)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.best = float(state["scale"]), float(state["best"])
        self.since_best, self.cuts = int(state["since_best"]), int(state["cuts"])


@dataclass(frozen=True)
class PerTypeStopRule:
    """Stop when *every* tracked held-out type reaches ``floor`` (as the vision warm-up's probe rule),
    or at a step or CPU-time budget. A mean over types hides a type stuck at chance; this does not."""

    floor: float = 0.9
    types: tuple[str, ...] = ()
    max_steps: int = 10_000
    max_seconds: float = float("inf")

    def weakest(self, row: dict[str, float]) -> tuple[str, float]:
        """The tracked type with the lowest score in a monitor row."""
        scores = {t: row[t] for t in self.types if t in row}
        if not scores:
            raise ValueError(f"monitor row has none of the tracked types {self.types}: {sorted(row)}")
        name = min(scores, key=scores.get)
        return name, scores[name]

    def reason(self, row: dict[str, float] | None, step: int, seconds: float,
               schedule: PlateauLR | None = None) -> str | None:
        """Why training stops now ('floor reached', 'step budget', 'time budget', 'plateau'), or None."""
        if row is not None and self.types and self.weakest(row)[1] >= self.floor:
            return "floor reached"
        if step >= self.max_steps:
            return "step budget"
        if seconds >= self.max_seconds:
            return "time budget"
        if schedule is not None and schedule.exhausted:
            return "plateau"
        return None
