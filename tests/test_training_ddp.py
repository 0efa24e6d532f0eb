"""Data-parallel training: the cross-rank contrastive loss and gradients equal one process with the whole
batch (2 gloo processes on loopback), ranks split each global batch, and ``torchrun --nproc_per_node 2``
trains the tiny model through ``f2b train``, checkpoints on rank 0 and resumes to the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from fwd2bot_index.training import TrainConfig, Trainer
from fwd2bot_index.training.distributed import DistContext, global_info_nce
from fwd2bot_index.training.losses import info_nce
from fwd2bot_index.training.step import BatchPlan

REPO = Path(__file__).resolve().parents[1]
# 8 pairs; captions 1 and 6 are the same text, on different ranks (both must be masked as negatives)
TEXTS = ["a red circle", "a blue square", "a green circle", "a red square", "a blue circle", "a green square",
         "a blue square", "a white circle"]
SPLIT = 5  # rank 0 holds pairs 0-4, rank 1 pairs 5-7: uneven local batches


def _toy(seed: int = 0):
    """Two 'towers' (linear maps) over fixed inputs, and a learnable log temperature."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)
    image_tower, text_tower = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
    with torch.no_grad():
        for p in (*image_tower.parameters(), *text_tower.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    scale = torch.nn.Parameter(torch.tensor(2.0))
    return x, y, image_tower, text_tower, scale


def _grads(*modules) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in ([m] if isinstance(m, torch.Tensor) else m.parameters())]


def _rank_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        x, y, image_tower, text_tower, scale = _toy()
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, 8)
        image_emb = F.normalize(image_tower(x[rows]), dim=-1)
        text_emb = F.normalize(text_tower(y[rows]), dim=-1)
        loss = global_info_nce(image_emb, text_emb, scale, TEXTS[rows], DistContext(rank, world))
        loss.backward()
        grads = _grads(image_tower, text_tower, scale)
        for g in grads:  # what DDP does with the trainable parameters' gradients
            dist.all_reduce(g)
            g /= world
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gathered_info_nce_equals_one_process_on_the_whole_batch(tmp_path):
    x, y, image_tower, text_tower, scale = _toy()
    expected = info_nce(F.normalize(image_tower(x), dim=-1), F.normalize(text_tower(y), dim=-1), scale, TEXTS)
    expected.backward()
    expected_grads = _grads(image_tower, text_tower, scale)

    # spawn, not fork: autograd deadlocks in a forked child whose parent has already run backward
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}")
        torch.testing.assert_close(got["loss"], expected.detach(), rtol=1e-6, atol=1e-6)
        for g, e in zip(got["grads"], expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # the duplicate caption across ranks matters: without the mask the loss differs
    assert not torch.isclose(info_nce(F.normalize(image_tower(x), dim=-1), F.normalize(text_tower(y), dim=-1), scale),
                             expected).item()


def test_ranks_split_each_global_batch_of_one_process():
    one = BatchPlan(20, 6, seed=3)
    ranks = [BatchPlan(20, 3, seed=3, rank=r, world=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == one.batches_per_epoch == 3
    for _ in range(7):  # across an epoch boundary
        epoch, idx = one.next()
        parts = [plan.next() for plan in ranks]
        assert [p[0] for p in parts] == [epoch, epoch]
        assert parts[0][1] + parts[1][1] == idx
    assert ranks[1].position() == one.position()
    with pytest.raises(Exception, match="cannot feed 4 processes"):
        BatchPlan(3, 2, seed=0, rank=0, world=4)


# -- torchrun ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """10 coloured shapes with distinct captions; 2 marked 'val' (held out, evaluated on rank 0)."""
    root = tmp_path_factory.mktemp("ddp-pairs")
    rows = []
    colors = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
              "white": (245, 245, 245)}
    for i, (color, rgb) in enumerate(colors.items()):
        for shape in ("circle", "square"):
            image = Image.new("RGB", (32, 32), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)([6, 6, 26, 26], fill=rgb)
            image.save(root / f"{color}_{shape}.png")
            split = "val" if color == "white" else "train"
            rows.append({"image": f"{color}_{shape}.png", "captions": [f"a {color} {shape}"], "split": split})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


def _settings(tiny_llava_dir, pairs, out, **overrides) -> dict:
    settings = dict(model=str(tiny_llava_dir), data=[str(pairs)], output_dir=str(out), num_summary_tokens=4,
                    embed_dim=32, lora_r=8, lr=1e-3, batch_size=2, grad_accum=2, max_steps=4, checkpoint_every=2,
                    seed=0,
                    device="cpu")
    settings.update(overrides)
    return settings


def _torchrun(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--local-ranks-filter", "0",  # one copy of the printed result
           "-m", "fwd2bot_index.cli", "train", "--config", str(config), "--json", *extra]
    # a bound for a loaded machine (two ranks import torch and transformers), not a timing assertion
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    found = {f"compressor.{k}": v for k, v in load_file(model_dir / "compressor.safetensors").items()}
    for path in sorted((model_dir / "adapters").rglob("*.safetensors")):
        found.update({f"{path.parent.name}.{k}": v for k, v in load_file(path).items()})
    return found


@pytest.mark.slow
def test_torchrun_two_processes_train_checkpoint_and_resume(tiny_llava_dir, pairs, tmp_path):
    from fwd2bot_index.model import Fwd2Bot

    out = tmp_path / "run"
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps(_settings(tiny_llava_dir, pairs, out)))
    _torchrun(config)

    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 4
    assert result["samples_seen"] == 4 * 2 * 2 * 2  # steps x accumulation x per-rank batch x ranks
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]  # rank 0 alone logs
    assert [r["eval_images"] for r in rows if r["kind"] == "eval"] == [2, 2]  # at the start and at the end
    assert {"contrastive", "autoregressive"} <= set(rows[1])
    model = Fwd2Bot.from_pretrained(str(out / "model"), device="cpu", dtype="fp32")
    assert model.is_trained and model.config.trained_steps == 4
    assert (out / "checkpoints" / "step-00000002" / "trainer_state.pt").is_file()
    Fwd2Bot.from_pretrained(str(out / "checkpoints" / "step-00000002" / "model"), device="cpu", dtype="fp32")

    # the first step's contrastive loss (mean of its 2 micro-batches) is the one-process loss over the
    # same global micro-batches of 4
    first = rows[1]
    assert first["kind"] == "train" and first["step"] == 1
    alone = Trainer(TrainConfig(**_settings(tiny_llava_dir, pairs, tmp_path / "alone", batch_size=4)), progress=False)
    expected = alone.train_step()
    assert first["contrastive"] == pytest.approx(expected["contrastive"], rel=1e-5, abs=1e-6)

    # resume from the step-2 checkpoint on 2 ranks: the same final weights as the uninterrupted run
    finished = _weights(out / "model")
    resumed = json.loads(_torchrun(config, "--resume").stdout)
    assert resumed["resumed_from"].endswith("step-00000002") and resumed["steps"] == 4
    again = _weights(out / "model")
    assert finished.keys() == again.keys()
    for name, value in finished.items():
        torch.testing.assert_close(again[name], value, rtol=1e-5, atol=1e-6, msg=name)
