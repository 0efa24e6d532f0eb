"""The demo recipe's numbers and its stage runner (``train_demo_model``).

Stages, each resumable inside ``work_dir`` (a killed run continues with ``reuse=True``):

0. ``warmup`` (warmup.py): vision tower + projector read the scene from its ground truth;
1. ``base`` (base.py): a byte-level BPE tokenizer and a small Llama LLM learn to caption scenes and
   answer all of a scene's questions in one multi-turn sequence, from all visual tokens (a share of
   sequences from pooled ones), on the frozen tower; ``base-finish`` goes on from its state on all
   visual tokens only with the learning rate restarted, until the plateau rule ends it;
2. ``compressor`` (compressor.py): Fwd2Bot on the frozen base: K summary tokens, both LoRA adapters
   and the heads, contrastive (with hard negatives) + autoregressive losses;
3. export: one self-contained fp16 checkpoint folder with a model card.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...model.tiny import TinySpec, build_tiny_llava, train_tokenizer
from ...synthetic import world_vocabulary
from .scenes import train_scenes


@dataclass(frozen=True)
class DemoRecipe:
    """Every number of the recipe; ``FULL`` makes the shipped model, ``QUICK`` proves the code path."""

    name: str
    n_train: int = 8000  # scenes on disk for the compressor stage (warm-up and base draw fresh ones)
    image_size: int = 64
    vocab_size: int = 512
    spec: TinySpec = TinySpec(image_size=64, patch_size=8, vision_hidden=128, vision_layers=4, hidden=128,
                              layers=4, heads=4, kv_heads=4, intermediate=384, max_positions=512)
    # stage 0: vision warm-up, stopped by the held-out probe rule
    vision_max_steps: int = 4000
    vision_batch: int = 64
    vision_lr: float = 1e-3
    vision_check_every: int = 250
    vision_floor: float = 0.99
    vision_heldout: int = 512
    # stage 1: base (captions + every question of a scene as branches, all visual tokens, tower frozen),
    # trained until every question type answers (PlateauLR + PerTypeStopRule)
    base_batch: int = 16
    base_lr: float = 1e-3
    base_warmup: int = 100
    base_patience: int = 4  # checks without a held-out rise before the learning rate is halved
    base_floor: float = 0.9  # stop when every question type reaches this on held-out scenes
    base_max_steps: int = 8000
    base_max_minutes: float = 85.0  # time budget of the stage (wall clock of the training loop)
    base_caption_share: float = 0.5  # share of sequences that also hold a caption turn
    base_caption_weight: float = 0.5  # caption tokens' weight against answer tokens
    base_type_weights: tuple[tuple[str, float], ...] = (("existence", 2.0), ("relation", 2.0))
    base_llm_init_std: float | None = 0.088  # ~1/sqrt(hidden); None keeps the warm-up's LLM init
    base_check_every: int = 200
    base_layers: int | None = None  # the LLM's depth for the base stage (None: the spec's)
    # stage 1b: the base goes on from stage 1's state on all visual tokens, the rate back at base_lr, until the
    # plateau rule ends it (stage 1 had stopped at its time budget unconverged: position 0.68, count 0.77)
    base_finish_max_steps: int = 12000
    base_finish_max_minutes: float = 150.0
    # stage 2: the compressor
    num_summary_tokens: int = 16
    embed_dim: int = 128
    lora_r: int = 16
    lora_alpha: int = 32
    # 1,400 (~5.6 passes over the training world): twice the earlier 700 lifted t2i R@1 from 53.3 to 75.0 and
    # QA from 86.2 to 87.8 on the held-out world (docs/DEMO_MODEL.md, "training length")
    compressor_steps: int = 1400
    compressor_batch: int = 32
    compressor_lr: float = 3e-3  # 1e-3 moved pass 1 too slowly: a distillation loss 1.2 -> 0.8 in 180 steps vs -> 0.2
    # pass 2's input pulled toward pool@K (losses.pooled_distillation): without it pass 1 kept a cell's colour at
    # 43% (probe) and pass 2 answered colour at the blind level; variants may switch it off (contrastive-only)
    compressor_distill_weight: float = 4.0
    compressor_pool_schedule: str = "llavolta"
    hard_negative_share: float = 0.5
    # stage 2b (``heads.py``): the contrastive heads refitted on the compressor's frozen features; 0 steps: off
    head_refit_images: int = 3000
    head_refit_steps: int = 1500
    head_refit_batch: int = 128
    head_refit_lr: float = 2e-3
    # the readouts the refit gives every compressor (fresh heads where it trained with others): the token mixer lifted
    # the shipped tokens' t2i R@1 to 96.8 / 84.2 in the embedding-head experiment; pass 2 and the tokens are unchanged
    head_refit_readouts: tuple[str, str] = ("mixer", "mixer")
    verify_share: float = 0.5  # images whose pass-2 turns also hold verified search's yes/no question (true / negative)
    absent_share: float = 0.5  # images whose pass-2 turns also hold a question about something the scene lacks
    bf16_autocast: bool = True  # base and compressors (~1.5x on a CPU with bf16 matrix units; losses in fp32)
    # monitoring and measurement
    monitor_images: int = 128
    n_gallery: int = 1000
    n_qa_images: int = 250
    n_sugarcrepe: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FULL = DemoRecipe(name="demo")
QUICK = DemoRecipe(
    name="demo-quick",
    spec=TinySpec(image_size=64, patch_size=8, vision_hidden=32, vision_layers=2, hidden=64, layers=2, heads=4,
                  kv_heads=2, intermediate=128, max_positions=512),
    n_train=160, vocab_size=400, vision_max_steps=6, vision_batch=8, vision_check_every=3, vision_heldout=16, base_max_steps=6,
    base_finish_max_steps=3,
    base_batch=4, base_check_every=3, base_warmup=2, compressor_steps=6, compressor_batch=8, monitor_images=8, n_gallery=24,
    head_refit_images=40, head_refit_steps=4, head_refit_batch=8,
    n_qa_images=6, n_sugarcrepe=12,
)


def recipe_for(quick: bool) -> DemoRecipe:
    return QUICK if quick else FULL


def say(progress: bool, message: str) -> None:
    if progress:
        print(f"[demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def choose_threads(threads: int | None = None) -> int:
    """Torch CPU threads: ``threads`` if given, else the cores not already busy (at least 1).

    On a shared 2-core machine two threads fighting other processes ran ~5x slower than one.
    """
    if threads is None:
        cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
        threads = max(1, min(cores, int(round(cores - busy))))
    torch.set_num_threads(threads)
    return threads


def tokenizer_corpus(seed: int, n_scenes: int = 3000) -> list[str]:
    """World words plus the captions, questions and answers of fresh training scenes (the BPE's corpus)."""
    texts = [" ".join(world_vocabulary())]
    for scene in train_scenes(seed, "tokenizer", 0, n_scenes):
        texts += scene.captions()
        texts += [f"{qa['question']} {qa['answer']}" for qa in scene.qa()]
    return texts


def build_base(recipe: DemoRecipe, seed: int, device: torch.device) -> tuple[Any, Any]:
    """A fresh tiny LLaVA of the recipe's geometry with its own tokenizer.

    LLaVA reads the vision tower's *last* layer here (``vision_feature_layer=-1``): a tower trained
    from scratch would otherwise compute a last layer that nothing ever trains.
    """
    # the quick recipe's BPE reads as many scenes as it trains on (160, not 3000: ~3 s less in the smoke test)
    tokenizer = train_tokenizer(recipe.vocab_size, corpus=tokenizer_corpus(seed, min(3000, recipe.n_train)))
    spec = dataclasses.replace(recipe.spec, vocab_size=len(tokenizer))
    hf, processor = build_tiny_llava(spec, seed=seed, tokenizer=tokenizer)
    hf.config.vision_feature_layer = -1
    return hf.to(device), processor


def stage_done(folder: Path) -> dict[str, Any] | None:
    """A finished stage's recorded summary (``demo_stage.json``), or None."""
    path = folder / "demo_stage.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def finish_stage(folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
    tmp = folder / "demo_stage.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    tmp.replace(folder / "demo_stage.json")
    return summary


def warmup_stage(recipe: DemoRecipe, work: Path, seed: int, device: torch.device, progress: bool) -> dict[str, Any]:
    """Stage 0 into ``work / 'base-init'`` (a stock LLaVA folder: model + processor)."""
    from .warmup import vision_warmup

    folder = work / "base-init"
    done = stage_done(folder)
    if done is not None:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    hf, processor = build_base(recipe, seed, device)
    say(progress, f"base built: {sum(p.numel() for p in hf.parameters()) / 1e6:.2f}M parameters, "
                  f"vocabulary {len(processor.tokenizer)}")
    summary = vision_warmup(hf, processor, folder, seed=seed, max_steps=recipe.vision_max_steps,
                            batch=recipe.vision_batch, lr=recipe.vision_lr, check_every=recipe.vision_check_every,
                            floor=recipe.vision_floor, n_heldout=recipe.vision_heldout,
                            say=lambda m: say(progress, m))
    summary.update(parameters=sum(p.numel() for p in hf.parameters()), vocab_size=len(processor.tokenizer))
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    return finish_stage(folder, summary)


def base_training_args(recipe: DemoRecipe, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    """The ``train_base`` arguments both base phases (and the continuation experiment) share."""
    return dict(seed=seed, batch=recipe.base_batch, lr=recipe.base_lr, check_every=recipe.base_check_every,
                caption_share=recipe.base_caption_share, caption_weight=recipe.base_caption_weight,
                n_monitor=recipe.monitor_images, say=log, type_weights=dict(recipe.base_type_weights),
                autocast=recipe.bf16_autocast)


def base_stage(recipe: DemoRecipe, work: Path, seed: int, progress: bool,
               base_from: Path | None = None) -> dict[str, Any]:
    """Stage 1 into ``work / 'base-run'`` (the pretrained stock LLaVA in ``base-run/model``); ``base_from``:
    a stock LLaVA folder whose tower, projector and LLM the stage continues instead of the warm-up's."""
    from ...synthetic.qa import QA_TYPES
    from ..schedule import PerTypeStopRule, PlateauLR
    from .base import train_base

    folder = work / "base-run"
    done = stage_done(folder)
    if done is not None:
        return done
    stop = PerTypeStopRule(floor=recipe.base_floor, types=QA_TYPES, max_steps=recipe.base_max_steps,
                           max_seconds=recipe.base_max_minutes * 60)
    schedule = PlateauLR(warmup=recipe.base_warmup, patience=recipe.base_patience)
    init, std = work / "base-init", recipe.base_llm_init_std
    if base_from is not None:  # continue an existing base instead of a fresh LLM
        init, std = Path(base_from), None
    summary = train_base(init, folder, **base_training_args(recipe, seed, lambda m: say(progress, m)),
                         schedule=schedule, stop=stop, layers=recipe.base_layers, llm_init_std=std)
    if base_from is not None:
        summary["started_from"] = str(base_from)
    return finish_stage(folder, summary)


def base_finish_stage(recipe: DemoRecipe, work: Path, seed: int, progress: bool,
                      base: dict[str, Any]) -> dict[str, Any]:
    """Stage 1b into ``work / 'base-finish'``: stage 1's run (``base``, its summary) goes on from its saved
    state on all visual tokens only, the learning rate restarted, until every type answers, the plateau
    rule ends it or its own budget (``base_finish_*``) is spent; compressors train on its ``model``."""
    from ...synthetic.qa import QA_TYPES
    from ..schedule import PerTypeStopRule, PlateauLR
    from .base import restart_state, train_base

    folder = work / "base-finish"
    done = stage_done(folder)
    if done is not None:
        return done
    restart_state(work / "base-run", folder)
    stop = PerTypeStopRule(floor=recipe.base_floor, types=QA_TYPES,
                           max_steps=int(base["steps"]) + recipe.base_finish_max_steps,
                           max_seconds=float(base["seconds"]) + recipe.base_finish_max_minutes * 60)
    summary = train_base(work / "base-run" / "model", folder, **base_training_args(recipe, seed, lambda m: say(progress, m)),
                         schedule=PlateauLR(warmup=0, patience=recipe.base_patience), stop=stop, pooled_share=())
    summary["started_at_step"] = int(base["steps"])
    return finish_stage(folder, summary)


def write_training_world(folder: Path, recipe: DemoRecipe, seed: int) -> dict[str, Any]:
    """The compressor's training set on disk (the house trainer reads folders): 95% 'train' scenes,
    5% 'test' scenes the trainer monitors (never trained on)."""
    from ...synthetic import write_demo_data

    done = folder / "demo_data.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    return write_demo_data(folder, n=recipe.n_train, seed=seed, image_size=recipe.image_size,
                           split_fractions=(0.95, 0.05, 0.0), sugarcrepe_splits=())


def compressor_stage(recipe: DemoRecipe, work: Path, seed: int, variant: str, device: str,
                     progress: bool) -> dict[str, Any]:
    """Stage 2 (one variant, see ``compressor.VARIANTS``) into ``work / f'compressor-{variant}'``."""
    from ..state import latest_checkpoint
    from ..trainer import TrainConfig
    from .compressor import VARIANTS, HardNegativeTrainer, hard_negative_pairs, scene_objects, scenes_by_image
    from .monitor import QAMonitor, stage_summary

    folder = work / f"compressor-{variant}"
    done = stage_done(folder)
    if done is not None:
        return done
    data = work / "data-train"
    write_training_world(data, recipe, seed)
    spec = VARIANTS[variant]
    steps = max(1, round(recipe.compressor_steps * spec.get("steps_factor", 1.0)))
    # eighths of the run, at least 3 steps apart (the quick recipe's 6 steps were evaluated and checkpointed
    # at every step; now at 3, still proving both paths)
    every = max(3, steps // 8)
    config = TrainConfig(
        model=str(work / "base-finish" / "model"), data=[str(data)], output_dir=str(folder), objective="fwd2bot",
        num_summary_tokens=spec["k"], nested=list(spec.get("nested", ())) or None, embed_dim=recipe.embed_dim,
        image_readout=spec.get("image_readout", "mean"), text_readout=spec.get("text_readout", "last"),
        lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
        lr=recipe.compressor_lr, batch_size=recipe.compressor_batch, pool_schedule=recipe.compressor_pool_schedule,
        bf16=recipe.bf16_autocast,
        autoregressive_weight=spec["ar"], distill_weight=recipe.compressor_distill_weight * spec.get("distill", 1.0),
        distill_fade_from=spec.get("distill_fade_from", 1.0), distill_layout=spec.get("distill_layout", "row-major"),
        seed=seed, device=device, max_steps=steps, eval_at_start=False,
        eval_split="test", eval_max=recipe.monitor_images, warmup_steps=max(1, min(30, steps // 10)),
        min_lr_ratio=0.05, weight_decay=0.01, clip_norm=1.0, dtype="fp32", eval_every=every,
        checkpoint_every=every, keep_checkpoints=1,
        resume=latest_checkpoint(folder / "checkpoints") is not None)
    absent_share = spec.get("absent_share", recipe.absent_share) if spec["ar"] > 0 else 0.0
    hard_categories = spec.get("hard_categories", ())
    trainer = HardNegativeTrainer(config, hard_negative_pairs(data, hard_categories), recipe.hard_negative_share,
                                  caption_share=recipe.base_caption_share, caption_weight=recipe.base_caption_weight,
                                  verify_share=recipe.verify_share if spec["ar"] > 0 else 0.0,
                                  objects=scene_objects(data, placed=bool(spec.get("placed_share")))
                                  if spec.get("object_share") else None, object_share=spec.get("object_share", 0.0),
                                  multi_positive=spec.get("multi_positive", False),
                                  placed_share=spec.get("placed_share", 0.0), absent_share=absent_share,
                                  scenes=scenes_by_image(data) if absent_share else None, progress=progress)
    monitor = QAMonitor(trainer, data, recipe.monitor_images // 4, "fwd2bot", lambda m: say(progress, m))
    trainer.callbacks.append(monitor)
    summary = stage_summary(trainer.train())
    summary.update(variant=variant, num_summary_tokens=spec["k"], autoregressive_weight=spec["ar"],
                   distill_weight=config.distill_weight, distill_fade_from=config.distill_fade_from,
                   distill_layout=config.distill_layout, object_share=spec.get("object_share", 0.0),
                   multi_positive=spec.get("multi_positive", False), placed_share=spec.get("placed_share", 0.0),
                   absent_share=absent_share, image_readout=config.image_readout,
                   text_readout=config.text_readout, hard_categories=list(hard_categories), monitor=monitor.history)
    return finish_stage(folder, summary)


def variant_model(work: Path, variant: str) -> Path:
    """Where a variant's finished model is: after the head refit (stage 2b) when it ran, else the compressor's."""
    refitted = work / f"heads-{variant}" / "model"
    return refitted if stage_done(refitted.parent) is not None else work / f"compressor-{variant}" / "model"


def heads_stage(recipe: DemoRecipe, work: Path, seed: int, variant: str, progress: bool) -> dict[str, Any] | None:
    """Stage 2b (``heads.py``): the compressor of ``variant`` with its contrastive heads refitted on frozen
    features, into ``work / f'heads-{variant}'``; None when the recipe refits nothing."""
    from ...model.fwd2bot import Fwd2Bot
    from .compressor import VARIANTS
    from .heads import refit_heads

    if recipe.head_refit_steps <= 0:
        return None
    folder = work / f"heads-{variant}"
    done = stage_done(folder)
    if done is not None:
        return done
    started = time.perf_counter()
    model = Fwd2Bot.from_pretrained(str(work / f"compressor-{variant}" / "model"), device="cpu", dtype="fp32")
    summary = refit_heads(model, work / "data-train", recipe.head_refit_images, recipe.head_refit_steps,
                          recipe.head_refit_batch, recipe.head_refit_lr, recipe.hard_negative_share,
                          VARIANTS[variant].get("hard_categories", ()), seed, lambda m: say(progress, m),
                          readouts=tuple(recipe.head_refit_readouts))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder / "model"))  # on the same base as the compressor it refits
    return finish_stage(folder, {**summary, "variant": variant, "seconds": round(time.perf_counter() - started, 1)})


def train_demo_model(out_dir: str | os.PathLike[str], quick: bool = False, seed: int = 0, device: str = "auto",
                     progress: bool = True, work_dir: str | os.PathLike[str] | None = None,
                     threads: int | None = None, variants: tuple[str, ...] = ("k16",),
                     stop_after: str | None = None,
                     base_from: str | os.PathLike[str] | None = None,
                     compressors_only: bool = False) -> dict[str, Any]:
    """Run the recipe and write the self-contained demo checkpoint (variant ``k16``) to ``out_dir``.

    Stages and intermediate models live in ``work_dir`` (a temporary folder when not given); a stage
    that finished there is kept and an interrupted one continues from its last checkpoint, so the
    same command after a kill goes on where it stopped. ``variants`` adds the other compressors the
    claims table compares (``k8``, ``k32``, ``k16-contrastive``); ``stop_after`` ('warmup', 'base': both
    base phases) ends the run early. ``base_from`` (a stock LLaVA folder, e.g. an earlier demo model's ``base/``)
    replaces stages 0 and the LLM's fresh start: the base stage continues that model, and the card
    says so. ``compressors_only`` trains exactly ``variants`` (k16 not implied) and exports nothing:
    several processes can then train different variants in one work folder at once (one core each),
    and a last plain run exports and measures. Returns what was done and measured during training.
    """
    import shutil
    import tempfile

    from ...model.backbone import resolve_device

    recipe = recipe_for(quick)
    threads = choose_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="f2b-demo-")) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    base_from = Path(base_from).resolve() if base_from is not None else None
    identity = json.dumps({"recipe": recipe.to_dict(), "seed": seed,
                           **({"base_from": str(base_from)} if base_from else {})}, sort_keys=True)
    marker = work / "recipe.json"
    if marker.is_file() and marker.read_text(encoding="utf-8") != identity:
        raise ValueError(f"{work} holds stages of another recipe or seed: use a fresh --work-dir")
    marker.write_text(identity, encoding="utf-8")
    started = time.perf_counter()
    report: dict[str, Any] = {"recipe": recipe.to_dict(), "seed": seed, "threads": threads, "stages": {}}
    try:
        if base_from is None:
            report["stages"]["warmup"] = warmup_stage(recipe, work, seed, resolve_device(device), progress)
        else:
            report["stages"]["warmup"] = {"from": str(base_from)}
        if stop_after == "warmup":
            return report
        report["stages"]["base"] = base_stage(recipe, work, seed, progress, base_from)
        report["stages"]["base-finish"] = base_finish_stage(recipe, work, seed, progress, report["stages"]["base"])
        if stop_after == "base":
            return report
        for variant in (variants if compressors_only else dict.fromkeys(("k16", *variants))):
            report["stages"][f"compressor-{variant}"] = compressor_stage(recipe, work, seed, variant, device, progress)
            refit = heads_stage(recipe, work, seed, variant, progress)
            if refit is not None:
                report["stages"][f"heads-{variant}"] = refit
        if compressors_only:
            return report
        from .report import export_fp16, folder_bytes, write_model_card

        export_fp16(variant_model(work, "k16"), out_dir)
        report["variants"] = {v: str(variant_model(work, v)) for v in variants if v != "k16"}
        report["model_dir"] = str(out_dir)
        report["size_bytes"] = folder_bytes(Path(out_dir))
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["stage_seconds"] = round(sum(s.get("seconds", 0) for s in report["stages"].values()), 1)
        write_model_card(out_dir, report)
        say(progress, f"demo model written to {out_dir} ({report['size_bytes'] / 2**20:.1f} MiB)")
        return report
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
