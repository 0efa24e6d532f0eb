"""One optimizer step: the seeded batch order, a batch's losses, the step itself, held-out evaluation.

``StepMixin`` is the part of ``Trainer`` that touches data and the model once per step; a subclass
(the demo recipe's hard-negative trainer) overrides ``next_batch`` / ``batch_losses`` and inherits the
rest, under one process or several (``distributed.py``).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .config import TrainingError
from .data import Sample
from .distributed import global_info_nce
from .losses import MAX_LOGIT_SCALE, pooled_distillation, recall_at_1, weighted_loss
from .nested import coarse_to_fine_orders, nested_losses
from .schedule import effective_stride, pooled_token_count, warmup_cosine


class BatchPlan:
    """Seeded, resumable batch order: a fresh permutation each epoch; the position is (epoch, cursor).

    With ``world`` data-parallel processes the permutation is cut into global batches of
    ``batch_size * world`` and rank r takes the r-th slice, so N processes see exactly the samples one
    process would see with the global batch, and every rank agrees on the position.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if size < world:
            raise TrainingError(f"{size} training sample(s) cannot feed {world} processes: use fewer processes "
                                "or more data")
        if size < 1:
            raise TrainingError("no training samples (every record is in a held-out split?)")
        self.local_size = min(batch_size, size // world)
        self.size, self.batch_size, self.seed = size, self.local_size * world, seed
        self.rank = rank
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.batch_size  # the last partial batch is dropped: contrastive wants full batches

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next(self) -> tuple[int, list[int]]:
        """(epoch, this rank's sample indices) of the next global batch."""
        if self.cursor + self.batch_size > self.size:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.cursor + self.rank * self.local_size
        idx = self._order[start:start + self.local_size].tolist()
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


class WarmupCosine:
    """A picklable-free LR lambda (its attributes are saved by the scheduler's state_dict)."""

    def __init__(self, total: int, warmup: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.total, self.warmup, self.min_ratio)


class StepMixin:
    """Data, losses, the optimizer step and evaluation (attributes are set by ``Trainer.__init__``)."""

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
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def stride_at(self, step: int) -> int:
        """The effective pooling stride at ``step`` on this model's visual-token grid."""
        return effective_stride(self.schedule.stage_at(step, self.total_steps), self.model.backbone.num_image_tokens)

    def layer_at(self, step: int) -> int:
        """The LLM layer before which the stage's pooling happens at ``step`` (0: before the LLM)."""
        return self.schedule.layer_at(step, self.total_steps, self.model.backbone.num_layers)

    def batch_losses(self, batch: Batch, stride: int = 1) -> dict[str, torch.Tensor]:
        """The loss parts of one batch (differentiable). Under several processes the contrastive part
        is the global batch's (``global_info_nce``), computed by every rank. With nested budgets
        (``self.budgets``) both losses read truncated summaries (``training.nested``)."""
        model, cfg = self.model, self.config
        pixels = model.backbone.pixel_values(batch.images)
        with self._autocast():
            visual = model.visual_tokens(pixels)
            if cfg.objective == "pretrain":
                tokens = model.backbone.pool_by_stride(visual, stride)  # per family (Qwen2-VL: per grid)
                ar = model.pass2_loss(tokens, batch.prompts, batch.targets, kind="full")
                return {"loss": ar, "autoregressive": ar}
            summary = model.compress(visual, pool_stride=stride, pool_layer=self.layer_at(self.step))
            with_caption = [i for i, c in enumerate(batch.captions) if c is not None]
            contrastive = autoregressive = None
            if cfg.contrastive_weight > 0 and (self.distributed.enabled or len(with_caption) >= 2):
                texts = [batch.captions[i] for i in with_caption]
                text_emb = model.embed_text_batch(texts, self._text_strategy) if texts else None

                def contrastive(s: torch.Tensor) -> torch.Tensor | None:
                    image_emb = model.embed_summary(s[with_caption])
                    return global_info_nce(image_emb, image_emb[:0] if text_emb is None else text_emb,
                                           model.compressor.logit_scale, texts, self.distributed)
            if cfg.autoregressive_weight > 0:
                def autoregressive(s: torch.Tensor) -> torch.Tensor:
                    return model.pass2_loss(s, batch.prompts, batch.targets, kind="fwd2bot")
            distill = self._distillation(visual)
            if self.budgets:
                parts = nested_losses(summary, self.budgets, self.step, cfg.seed, contrastive, autoregressive, distill)
            else:
                parts = {}
                if contrastive is not None and (value := contrastive(summary)) is not None:
                    parts["contrastive"] = value
                if autoregressive is not None:
                    parts["autoregressive"] = autoregressive(summary)
                if distill is not None:
                    parts["distill"] = distill(summary)
            loss = weighted_loss(parts, cfg, self.step, self.total_steps)
        parts["loss"] = loss
        return parts

    def _distillation(self, visual: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The pooled-distillation loss of a (B, k, H) summary against pool@k of this batch's unpooled visual
        tokens (``losses.pooled_distillation``), or None when its weight is 0. With nested budgets and
        ``distill_layout='coarse-to-fine'`` each budget's cells are put in ``nested.coarse_to_fine_orders``."""
        if self.config.distill_weight <= 0:
            return None
        model = self.model
        orders = self._distill_orders(visual)

        def distill(s: torch.Tensor) -> torch.Tensor:
            target = model.backbone.pool_to_budget(visual, s.shape[1])
            if s.shape[1] in orders:
                target = target[:, orders[s.shape[1]].to(target.device)]
            return pooled_distillation(model.compressor.pass2_projection(s), target)
        return distill

    def _distill_orders(self, visual: Any) -> dict[int, torch.Tensor]:
        """Budget -> order of its pool@k cells (empty: reading order), computed once per token count."""
        if self.config.distill_layout != "coarse-to-fine" or not self.budgets:
            return {}
        n_visual = int(visual.shape[1])  # a fixed grid (``check_distillation`` refused variable ones)
        cached = getattr(self, "_orders_cache", None)
        if cached is None or cached[0] != n_visual:
            identity = torch.eye(n_visual).unsqueeze(0)  # pooling the identity gives each cell's weights
            cells = {k: self.model.backbone.pool_to_budget(identity, k)[0] for k in self.budgets}
            cached = (n_visual, coarse_to_fine_orders(cells))
            self._orders_cache = cached
        return cached[1]

    def check_distillation(self) -> None:
        """Refuse, before any step, a distillation this model cannot do: pool@k must give k tokens for every
        trained budget (LLaVA keeps at most its N visual tokens), and the coarse-to-fine layout needs nested
        budgets and one fixed visual grid (Qwen2-VL's grids follow each image's size). A coarse-to-fine layout
        without distillation is refused too: it would silently train what row-major trains."""
        cfg, backbone = self.config, self.model.backbone
        if cfg.distill_layout == "coarse-to-fine" and cfg.distill_weight <= 0:
            raise TrainingError("--distill-layout coarse-to-fine orders distillation targets, but --distill-weight "
                                "is 0 (no distillation): set a weight (e.g. 1.0) or leave the layout row-major")
        if cfg.objective != "fwd2bot" or cfg.distill_weight <= 0 or self.model.compressor is None:
            return
        for k in self.budgets or [self.model.config.num_summary_tokens]:
            if backbone.pooled_tokens(k) != k:
                raise TrainingError(
                    f"--distill-weight: this model's images give {backbone.pooled_tokens(k)} visual tokens, fewer "
                    f"than the {k} summary tokens pool@{k} would teach: use K and --nested budgets of at most "
                    f"{backbone.pooled_tokens(k)}, or --distill-weight 0")
        if cfg.distill_layout == "coarse-to-fine":
            if not self.budgets:
                raise TrainingError("--distill-layout coarse-to-fine orders the targets of nested budgets: add "
                                    "--nested (e.g. 4,8,16,32) or leave the layout row-major")
            if backbone.variable_image_tokens:
                raise TrainingError(f"--distill-layout coarse-to-fine needs one fixed visual-token grid, and "
                                    f"{type(backbone).__name__} gives each image a grid of its own size: use row-major")

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
        for micro in range(cfg.grad_accum):
            batch = self.next_batch()
            # DDP averages gradients across ranks once per optimizer step, after the last micro-batch
            last = self._ddp is None or micro == cfg.grad_accum - 1
            with nullcontext() if last else self._ddp.no_sync():
                parts = self.batch_losses(batch, stride) if self._ddp is None else self._ddp(batch, stride)
                (parts["loss"] / cfg.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
            seen += len(batch.images)
        sums = self.distributed.mean(sums, self.device)  # logged values are the global batch's
        seen = self.distributed.total(seen, self.device)
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
        budget_embs: dict[int, list[torch.Tensor]] = {}
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
                    for k in self.budgets[:-1]:  # retrieval at each smaller nested budget (the head is cheap)
                        budget_embs.setdefault(k, []).append(model.embed_summary(summary[:, :k]))
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
            for k, embs in budget_embs.items():
                t2i, i2t = recall_at_1(torch.cat(embs), torch.cat(txt_embs))
                result.update({f"r1_t2i@{k}": t2i, f"r1_i2t@{k}": i2t})
        return result
