"""Data-parallel training: the process group torchrun / ``accelerate launch`` describe, and the
cross-rank contrastive loss.

Under ``torchrun --nproc_per_node N f2b train ...`` every process runs the same trainer on its own
slice of each global batch (``BatchPlan``); torch's ``DistributedDataParallel`` averages the gradients
of the trainable parameters (LoRA adapters, summary tokens, heads), so every rank holds the same
weights and optimizer state, and rank 0 alone writes checkpoints, logs and the released model.

The contrastive loss must see the *global* batch, or N processes would train with N small batches'
worth of negatives. As CLIP / open_clip do it, every rank all-gathers the embeddings of all ranks
(other ranks' rows without gradient, its own rows with) and computes the loss over the whole global
batch. Each rank then holds the exact global loss, but gradient only through its own rows; DDP then
*averages* over ranks, which would leave the towers' gradient at 1/N of the one-process value (open_clip
lives with that). Here the gradient flowing into a rank's own rows is multiplied by N (``scale_grad``),
so the averaged gradient equals the one-process gradient of the global batch exactly, while the
temperature (whose gradient every rank computes in full) is left alone. ``tests/test_training_ddp.py``
checks both against one process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .losses import info_nce

# torchrun sets these; accelerate launch and multi-node launchers (slurm + torchrun, etc.) too.
_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, and whether it started the process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str = "auto", timeout_s: float = 1800.0) -> "DistContext":
        """Join the process group the launcher described (nccl on CUDA, gloo on CPU), or run alone.

        A group someone else already started (accelerate, a test) is used as it is and left to them.
        """
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=False)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        cuda = uses_cuda(device)
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)

    def device(self, requested: str) -> str:
        """The device this rank trains on: its own GPU (``cuda:LOCAL_RANK``) when CUDA is used."""
        if self.enabled and uses_cuda(requested) and requested in ("auto", "cuda", None):
            return f"cuda:{self.local_rank}"
        return requested

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives (no-ops alone) -----------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """The mean of each value over ranks (every rank passes the same keys)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64 if device.type == "cpu"
                         else torch.float32, device=device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def total(self, value: int, device: torch.device) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return int(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` alone."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def uses_cuda(device: str | None) -> bool:
    if device in (None, "auto"):
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in value, its gradient multiplied by ``factor`` on the way back."""
    if factor == 1:
        return x
    return x + (factor - 1) * (x - x.detach())


def gather_rows(x: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """All ranks' rows of ``x`` concatenated in rank order; row counts may differ per rank.

    Other ranks' rows arrive without gradient; this rank's own rows are ``x`` itself (with gradient).
    """
    count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded)
    parts = [b[:n] for b, n in zip(buffers, sizes)]
    parts[rank] = x
    return torch.cat(parts)


def text_keys(texts: Sequence[str], device: torch.device) -> torch.Tensor:
    """A 63-bit content hash per text: equal texts, equal keys (to mask duplicate captions across ranks)."""
    keys = [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") >> 1
            for t in texts]
    return torch.tensor(keys, dtype=torch.int64, device=device).reshape(-1)


def global_info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                    texts: Sequence[str], ctx: DistContext) -> torch.Tensor | None:
    """Symmetric InfoNCE over the global batch (all ranks' pairs), for this rank's backward pass.

    Every rank must call it for every micro-batch (it runs collectives), also with zero local pairs.
    Returns ``None`` on every rank when the global batch holds fewer than two pairs. Alone it is
    ``info_nce`` on the local batch.
    """
    if not ctx.enabled:
        return info_nce(image_emb, text_emb, logit_scale, texts) if len(texts) >= 2 else None
    keys = gather_rows(text_keys(texts, image_emb.device), ctx.world, ctx.rank)
    images = gather_rows(scale_grad(image_emb.float(), ctx.world), ctx.world, ctx.rank)
    captions = gather_rows(scale_grad(text_emb.float(), ctx.world), ctx.world, ctx.rank)
    if keys.shape[0] < 2:
        return None
    same = (keys[:, None] == keys[None, :]) & ~torch.eye(keys.shape[0], dtype=torch.bool, device=keys.device)
    return info_nce(images, captions, logit_scale, same=same)


class StepModule(torch.nn.Module):
    """The trainable model as one module, so DDP can wrap it: its forward is the trainer's
    ``batch_losses`` (subclasses' overrides included), which calls the model's pieces in turn."""

    def __init__(self, trainer: Any):
        super().__init__()
        self.hf = trainer.model.backbone.hf
        if trainer.model.compressor is not None:
            self.compressor = trainer.model.compressor
        self._trainer = (trainer,)  # a tuple: not registered as a submodule

    def forward(self, batch: Any, stride: int) -> dict[str, torch.Tensor]:
        return self._trainer[0].batch_losses(batch, stride)


def wrap_ddp(trainer: Any, trainable: Sequence[torch.nn.Parameter], ctx: DistContext
             ) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over the trainable parameters only: frozen weights (the 7B base) are neither broadcast at
    start nor given gradient buckets; rank 0's trainable values are broadcast so all ranks start equal."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = StepModule(trainer)
    keep = {id(p) for p in trainable}
    ignored = [n for n, p in module.named_parameters() if id(p) not in keep]
    ignored += [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, ignored)
    device = next(iter(trainable)).device
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
               broadcast_buffers=False, find_unused_parameters=True)
