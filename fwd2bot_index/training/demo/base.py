"""Stage 1 of the demo recipe: the base LLM learns to caption and answer from visual tokens.

The vision tower is frozen after its warm-up (training it with the captioning gradient measured
worse: held-out QA 0.37 vs 0.47). Projector and LLM train on fresh scenes every step, each image
followed by all its questions as branches of one sequence (turns.py: every answer sees the image and
its own question only, in the layout answering uses). A share of the sequences see the visual tokens
average-pooled on the 2-D grid to 16 or 8 tokens, so the pooled stored forms are answered by a base
that was trained on them (the fair baseline for Fwd2Bot's summary tokens).

The stage runs until it answers, not for a fixed number of steps: the learning rate stays constant
while held-out accuracy rises and is cut only on a plateau (``PlateauLR``); it stops when every
question type reaches the floor on held-out scenes, or at its step / CPU-time budget
(``PerTypeStopRule``). The original schedule (2,500 steps, cosine to 5%) ended with yes/no at exactly
50% and a decayed learning rate, and the same weights left that plateau within 300 steps of a fresh
warm-up at the full rate.

A second phase (``restart_state``, the recipe's ``base-finish``) goes on from the first phase's saved
state on all visual tokens only, the learning rate back at its full value under the same plateau rule:
LLaVolta's last stage, no compression. The first phase had stopped at its time budget with position at
0.68 and count at 0.77 on the monitor; the finish took them to 0.83 / 0.83 (docs/DEMO_MODEL.md, "a
longer base"), where 2-D position ids for the visual tokens had not helped.

Resumable: every ``check_every`` steps the projector, the LLM, the optimizer, the step and the
schedule's state go to ``state.pt``; a later call continues from there, with the same fresh scenes per step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...evaluation import exact_match
from ...model import Fwd2Bot
from ...model.pooling import pool_visual_tokens
from .scenes import heldout_scenes, train_scenes
from .stage_state import load_stage_state, save_stage_state
from ..schedule import PerTypeStopRule, PlateauLR
from .turns import branched_turn_loss, scene_turns

CAPTION_PROMPT = "Describe the image."
STATE_FILE = "state.pt"
POOLED_SHARE = ((0.2, 16), (0.1, 8))  # (share of sequences, budget): the rest see all visual tokens


def rescale_projector(hf: Any, pixels: torch.Tensor) -> float:
    """Scale the projector's output layer so visual tokens have the word embeddings' RMS; returns the factor."""
    with torch.no_grad():
        out = hf.get_image_features(pixel_values=pixels)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        visual = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        target = hf.get_input_embeddings().weight.float().pow(2).mean().sqrt()
        factor = float(target / visual.float().pow(2).mean().sqrt())
        last = hf.model.multi_modal_projector.linear_2
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    return factor


def tower_features(hf: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The frozen tower's selected layer (no grad); the projector is applied by the caller."""
    cfg = hf.config
    with torch.no_grad():
        out = hf.model.vision_tower(pixels, output_hidden_states=True)
        feats = out.hidden_states[cfg.vision_feature_layer]
        return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats


def pooled_forms(visual: torch.Tensor, rng: np.random.Generator,
                 pooled_share: Sequence[tuple[float, int]] = POOLED_SHARE) -> list[torch.Tensor]:
    """Per item, all visual tokens or (with the ``pooled_share`` odds) a 2-D pooled budget."""
    out = []
    for tokens in visual:
        draw, budget = rng.random(), None
        for share, b in pooled_share:
            if draw < share:
                budget = b
                break
            draw -= share
        out.append(tokens if budget is None else pool_visual_tokens(tokens[None], budget)[0])
    return out


@torch.no_grad()
def qa_monitor(model: Fwd2Bot, scenes: Sequence[Any], budget: int | None = None) -> dict[str, float]:
    """Held-out exact match (overall and per question type) answering from all (or pooled) visual tokens."""
    model.backbone.hf.eval()
    images = [s.render(model.backbone.config.vision_config.image_size) for s in scenes]
    visual = model.visual_tokens(model.backbone.pixel_values(images))
    if budget:
        visual = pool_visual_tokens(visual, budget)
    records = [(i, qa) for i, s in enumerate(scenes) for qa in s.qa()]
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(records), 128):
        chunk = records[start:start + 128]
        answers = model.answer_batch([visual[i] for i, _ in chunk], [qa["question"] for _, qa in chunk],
                                     max_new_tokens=6, kind="full")
        for (_, qa), answer in zip(chunk, answers):
            hits.setdefault(qa["type"], []).append(exact_match(answer, qa["answer"]))
    every = [h for v in hits.values() for h in v]
    return {"qa": round(float(np.mean(every)), 4), **{k: round(float(np.mean(v)), 3) for k, v in sorted(hits.items())}}


def with_fresh_llm(init_dir: Path, out_dir: Path, layers: int, seed: int) -> Path:
    """A copy of the warmed-up LLaVA whose language model has ``layers`` layers, freshly initialised.

    The warm-up never touches the LLM, so the LLM's depth is a base-stage choice: the tower and
    projector are copied, the rest is built from the seed (``out_dir / 'init'``).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    target = out_dir / "init"
    if (target / "config.json").is_file():
        return target
    warm = LlavaForConditionalGeneration.from_pretrained(init_dir)
    config = warm.config
    config.text_config.num_hidden_layers = layers
    torch.manual_seed(seed)
    fresh = LlavaForConditionalGeneration(config)
    fresh.model.vision_tower.load_state_dict(warm.model.vision_tower.state_dict())
    fresh.model.multi_modal_projector.load_state_dict(warm.model.multi_modal_projector.state_dict())
    fresh.save_pretrained(target)
    AutoProcessor.from_pretrained(init_dir).save_pretrained(target)
    return target


def init_llm(hf: Any, std: float, seed: int) -> None:
    """Re-initialise the language model and LM head at ``std`` (norms to 1).

    Measured on the demo world: an LLM initialised at ~1/sqrt(hidden) learned existence to 0.94 where
    the transformers default (0.02) reached 0.74 in the same steps.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        named = list(hf.model.language_model.named_parameters()) + [("lm_head.weight", hf.lm_head.weight)]
        for name, p in named:
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            elif "norm" in name:
                p.fill_(1.0)


def type_weights_for(qa: Sequence[dict[str, str]], weights: dict[str, float]) -> list[float]:
    return [float(weights.get(q["type"], 1.0)) for q in qa]


def train_base(init_dir: Path, out_dir: Path, *, seed: int, batch: int, lr: float, check_every: int,
               caption_share: float, caption_weight: float, n_monitor: int, say: Callable[[str], None],
               schedule: PlateauLR, stop: PerTypeStopRule, type_weights: dict[str, float] | None = None,
               layers: int | None = None, llm_init_std: float | None = None,
               autocast: bool = True,
               pooled_share: Sequence[tuple[float, int]] = POOLED_SHARE) -> dict[str, Any]:
    """Train projector + LLM of the warmed-up LLaVA in ``init_dir`` until every question type answers;
    the result goes to ``out_dir/model``.

    The learning rate follows ``schedule`` (constant until held-out accuracy stops rising) and the stage
    ends by ``stop`` (every type >= the floor on held-out scenes, or a step / CPU-time budget). Every
    answer is trained in the layout answering uses (branched turns); ``type_weights`` weight answer
    tokens by question type. ``layers``: the LLM's depth when it should differ from the one built
    with the warm-up; ``llm_init_std``: re-initialise the LLM at that std (None keeps ``init_dir``'s);
    ``pooled_share``: (share, budget) of the sequences that see pooled visual tokens (empty: all tokens only).
    Per-type curves go to ``out_dir/curves.jsonl`` as they are measured.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if layers is not None:
        init_dir = with_fresh_llm(init_dir, out_dir, layers, seed)
    model = Fwd2Bot.from_pretrained(str(init_dir), device="cpu", dtype="fp32")
    hf = model.backbone.hf
    image_size = hf.config.vision_config.image_size
    for name, p in hf.named_parameters():
        p.requires_grad_("vision_tower" not in name)
    trainable = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    monitor = heldout_scenes(seed, n_monitor)
    weights = dict(type_weights or {})
    state_path, curves = out_dir / STATE_FILE, out_dir / "curves.jsonl"
    step, spent, history, factor, last_loss = 0, 0.0, [], None, float("nan")
    state = load_stage_state(state_path)
    if state is not None:
        hf.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, spent, factor = int(state["step"]), float(state["seconds"]), float(state["factor"])
        history, last_loss = state["history"], float(state["last_loss"])
        schedule.load_state_dict({k[len("schedule_"):]: v for k, v in state.items() if k.startswith("schedule_")})
        say(f"base: resuming at step {step}")
        # the curves are the saved history: a check written after the last saved state is dropped
        curves.write_text("".join(json.dumps(row) + "\n" for row in history), encoding="utf-8")
    else:
        if llm_init_std is not None:
            init_llm(hf, llm_init_std, seed)
            probe = model.backbone.pixel_values([s.render(image_size) for s in monitor[:64]])
            factor = rescale_projector(hf, probe)
            say(f"base: LLM initialised at std {llm_init_std:.3g}; projector output scaled by {factor:.4g} "
                f"to the word embeddings' RMS (at step 0 only: training moves both)")
        else:
            factor = 1.0
        curves.write_text("", encoding="utf-8")
    started = time.perf_counter() - spent
    stopped_by = stop.reason(history[-1] if history else None, step, spent, schedule)
    while stopped_by is None:
        for group in optimizer.param_groups:
            group["lr"] = lr * schedule.multiplier(step)
        hf.train()
        hf.model.vision_tower.eval()
        scenes = train_scenes(seed, "base", step, batch)
        rng = np.random.default_rng([seed, 21, step])
        pixels = model.backbone.pixel_values([s.render(image_size) for s in scenes])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            visual = hf.model.multi_modal_projector(tower_features(hf, pixels))
            turns = []
            for s in scenes:
                qa = s.qa()
                turns.append(scene_turns(s.captions(), [(q["question"], q["answer"]) for q in qa], rng,
                                         CAPTION_PROMPT, caption_share, caption_weight,
                                         weights=type_weights_for(qa, weights)))
            loss = branched_turn_loss(model, pooled_forms(visual, rng, pooled_share), turns, "full")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        last_loss = 0.9 * last_loss + 0.1 * float(loss.detach()) if not math.isnan(last_loss) else float(loss.detach())
        row = None
        if step % check_every == 0 or step >= stop.max_steps:
            row = {"step": step, "loss": round(last_loss, 4), "lr": lr * schedule.multiplier(step - 1),
                   **qa_monitor(model, monitor)}
            cut = schedule.observe(row["qa"])
            history.append(row)
            with curves.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            save_stage_state(state_path, {"model": hf.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                          "seconds": time.perf_counter() - started, "factor": factor,
                                          "last_loss": last_loss,
                                          **{f"schedule_{k}": v for k, v in schedule.state_dict().items()}}, history)
            weakest = stop.weakest(row) if stop.types else ("", float("nan"))
            say(f"base step {step}: {row} weakest {weakest[0]} {weakest[1]:.3f}"
                f"{' - learning rate cut' if cut else ''} ({(time.perf_counter() - started) / 60:.1f} min)")
        stopped_by = stop.reason(row, step, time.perf_counter() - started, schedule) if row else \
            (None if step < stop.max_steps else "step budget")
    hf.eval()
    hf.save_pretrained(out_dir / "model")
    model.backbone.processor.save_pretrained(out_dir / "model")
    final = history[-1] if history else {}
    return {"steps": step, "batch": batch, "projector_scale": factor, "seconds": round(time.perf_counter() - started, 1),
            "heldout": final, "history": history, "stopped_by": stopped_by, "lr_cuts": schedule.cuts,
            "floor": stop.floor, "type_weights": weights, "pooled_share": [list(x) for x in pooled_share],
            "llm_layers": hf.config.text_config.num_hidden_layers, "llm_init_std": llm_init_std,
            "visual_rms_vs_words": visual_rms_ratio(model, monitor[:64])}


def restart_state(run: Path, out_dir: Path, fresh_rate: bool = True) -> None:
    """Start ``out_dir`` from the base run in ``run``: its saved weights, optimizer, step, time spent and
    curve, with the plateau schedule back at the full rate (a fresh ``PlateauLR`` state; ``fresh_rate``
    False keeps the run's). Nothing happens when ``out_dir`` already has a state: a rerun continues that one."""
    if (out_dir / STATE_FILE).is_file():
        return
    state = load_stage_state(run / STATE_FILE)
    if state is None:
        raise FileNotFoundError(f"{run} has no {STATE_FILE}: not a base run of the demo recipe")
    out_dir.mkdir(parents=True, exist_ok=True)
    history = state.pop("history")
    if fresh_rate:
        state.update({f"schedule_{k}": v for k, v in PlateauLR().state_dict().items()})
    save_stage_state(out_dir / STATE_FILE, state, history)


def visual_rms_ratio(model: Fwd2Bot, scenes: Sequence[Any]) -> float:
    """RMS of the projected visual tokens over the word embeddings' RMS (1.0 only right after a rescale)."""
    hf = model.backbone.hf
    with torch.no_grad():
        visual = model.visual_tokens(model.backbone.pixel_values([s.render(hf.config.vision_config.image_size)
                                                                   for s in scenes]))
        words = hf.get_input_embeddings().weight.float().pow(2).mean().sqrt()
        return round(float(visual.float().pow(2).mean().sqrt() / words), 3)
