"""Models the benchmarks run on: the shipped demo model, and scaled-down LLaVA-1.5 shapes with random weights.

Random weights are fine for speed: the time of a forward pass depends on shapes, not values. The
compressors built here are marked ``trained_steps=1`` so the library lets the ``fwd2bot`` strategy
run on them; their answers are meaningless and the tables say so. Quality is measured on the demo
model only.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402,F401  (sets HF_HUB_OFFLINE and sys.path)

from fwd2bot_index.model.tiny import TinySpec  # noqa: E402

# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 visual tokens, width 1024, 24 layers) and a 4096-wide,
# 32-layer LLaMA (MLP 11008). Scaled to fit two CPU cores, keeping the visual token count (what
# Fwd2Bot removes), LLaMA's MLP ratio and roughly the 1:20 compute ratio of vision tower to LLM
# prefill; the LLM (150M parameters) is large enough that compute, not per-call overhead, dominates
# a prefill, as it does at 7B.
LLAVA15_SCALED = TinySpec(image_size=336, patch_size=14, vision_hidden=384, vision_layers=6, hidden=1024, layers=12,
                          heads=16, kv_heads=16, intermediate=2752, vocab_size=2048, max_positions=2048)
# The same 576-token vision geometry with a smaller LLM (25M parameters): still compute-bound (tens of
# GFLOP per image, far above decoding a PNG) but quick enough to index a few dozen images per run
# (figure 3).
LLAVA15_COMPUTE = TinySpec(image_size=336, patch_size=14, vision_hidden=256, vision_layers=6, hidden=512, layers=8,
                           heads=8, kv_heads=8, intermediate=1376, vocab_size=2048, max_positions=2048)
# What stands in for the demo model when it is not installed: its recipe's geometry
# (fwd2bot_index/training/demo_recipe.py, K=16), random weights.
DEMO_STANDIN = TinySpec(image_size=64, patch_size=8, vision_hidden=128, vision_layers=4, hidden=128, layers=4,
                        heads=4, kv_heads=4, intermediate=384, vocab_size=512, max_positions=512)
# A tiny geometry for smoke tests.
SMOKE = TinySpec(image_size=64, patch_size=16, vision_hidden=32, vision_layers=1, hidden=64, layers=2, heads=4,
                 kv_heads=2, intermediate=128, vocab_size=2048)

LLAVA_7B = {"hidden": 4096, "layers": 32, "intermediate": 11008, "heads": 32, "vocab": 32000,
            "visual_tokens": 576, "vision_width": 1024, "vision_layers": 24, "vision_mlp": 4096,
            "vision_tokens": 577, "K": 32}


def spec_dict(spec: TinySpec) -> dict[str, Any]:
    return {**asdict(spec), "image_tokens": spec.image_tokens}


def spec_text(spec: TinySpec) -> str:
    return (f"{spec.image_size} px / patch {spec.patch_size} -> {spec.image_tokens} visual tokens, vision "
            f"{spec.vision_hidden} x {spec.vision_layers} layers, LLM {spec.hidden} x {spec.layers} layers "
            f"(MLP {spec.intermediate})")


def random_compressor(spec: TinySpec, folder: Path, num_summary_tokens: int = 32, seed: int = 0) -> Path:
    """Save a random LLaVA of ``spec`` plus a fresh compressor marked trained; return the checkpoint folder.

    It goes through ``save_pretrained`` / ``from_pretrained`` like any user checkpoint, so the
    benchmarks load it by path (``f2b index --model FOLDER`` works on it too).
    """
    from fwd2bot_index.model import Fwd2Bot, load_backbone
    from fwd2bot_index.model.tiny import build_tiny_llava

    folder = Path(folder)
    base = folder / "base-stock"
    hf, processor = build_tiny_llava(spec, seed=seed, tokenizer=world_tokenizer(spec.vocab_size))
    hf.save_pretrained(base)
    processor.save_pretrained(base)
    backbone = load_backbone(str(base), device="cpu", dtype="fp32")
    model = Fwd2Bot.create(backbone, num_summary_tokens=num_summary_tokens, embed_dim=256, seed=seed)
    model.config.trained_steps = 1  # random, but let the fwd2bot strategy run: timing only
    model.save_pretrained(str(folder / "checkpoint"), include_base=True)
    return folder / "checkpoint"


@functools.lru_cache(maxsize=4)
def world_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE that knows the world's words and the chat markers as whole tokens, like a real
    LLaVA tokenizer does for English (a bytes-only vocabulary would make questions several times longer
    and skew the prefill lengths being compared)."""
    from fwd2bot_index.model.tiny import train_tokenizer
    from fwd2bot_index.synthetic import generate_scenes

    corpus = ["USER: ASSISTANT: USER: ASSISTANT:"] * 20
    for scene in generate_scenes(200, seed=99):
        corpus += scene.captions()
        corpus += [row["question"] + " " + str(row["answer"]) for row in scene.qa()]
    return train_tokenizer(vocab_size, corpus)


def demo_available() -> bool:
    from fwd2bot_index.model import demo_model_path, is_checkpoint

    return is_checkpoint(demo_model_path())


def demo_or_standin(work: Path, smoke: bool = False) -> tuple[str, str, bool]:
    """(model name or folder, description, is_demo): the shipped demo model, else a stand-in of its
    expected geometry with random weights (said so in every table that uses it).

    ``F2B_BENCH_DEMO_MODEL=FOLDER`` measures a demo-model checkpoint that is not installed (yet), named
    as such in the tables."""
    candidate = os.environ.get("F2B_BENCH_DEMO_MODEL")
    if candidate and not smoke:
        from fwd2bot_index.model import is_checkpoint

        if not is_checkpoint(candidate):
            raise SystemExit(f"F2B_BENCH_DEMO_MODEL={candidate} is not a Fwd2Bot checkpoint folder "
                             "(no fwd2bot_config.json); unset it to use the installed demo model")
        return candidate, f"a trained demo-model checkpoint from {candidate} (the recipe's output, not yet installed)", True
    if demo_available() and not smoke:
        from fwd2bot_index.model import demo_model_path, folder_fingerprint

        fingerprint = folder_fingerprint(demo_model_path())[:12]
        return "demo", f"the shipped demo model (fwd2bot_index/{demo_model_path().name}/, fingerprint {fingerprint})", True
    spec = SMOKE if smoke else DEMO_STANDIN
    folder = random_compressor(spec, Path(work) / "demo-standin", num_summary_tokens=8 if smoke else 16)
    why = "smoke-test geometry" if smoke else "the demo model was not installed when this ran"
    return str(folder), f"a stand-in with random weights ({why})", False


def load(name: str) -> Any:
    """Load a model by name or folder on the CPU in fp32, quietly."""
    from fwd2bot_index.model import Fwd2Bot
    from fwd2bot_index.model.backbone import quiet_transformers

    quiet_transformers()
    return Fwd2Bot.from_pretrained(name, device="cpu", dtype="fp32")


def model_geometry(model: Any) -> dict[str, Any]:
    """Shapes of a loaded model, for tables."""
    hf = model.backbone.hf.config
    vision, text = hf.vision_config, hf.text_config
    return {"image_size": vision.image_size, "patch_size": vision.patch_size,
            "visual_tokens": model.backbone.num_image_tokens, "vision_hidden": vision.hidden_size,
            "vision_layers": vision.num_hidden_layers, "hidden": text.hidden_size, "layers": text.num_hidden_layers,
            "K": model.config.num_summary_tokens, "embed_dim": model.config.embed_dim,
            "pool_budget": model.config.pool_budget}


def geometry_text(g: dict[str, Any]) -> str:
    return (f"{g['image_size']} px / patch {g['patch_size']} -> {g['visual_tokens']} visual tokens; vision "
            f"{g['vision_hidden']} x {g['vision_layers']}; LLM {g['hidden']} x {g['layers']}; K={g['K']}")


def world_images(folder: Path, n: int, image_size: int, seed: int = 0) -> Path:
    """Write ``n`` scenes of the shapes world as PNGs at ``image_size``; returns the data folder."""
    from fwd2bot_index.synthetic import write_demo_data

    write_demo_data(folder, n=n, seed=seed, image_size=image_size)
    return Path(folder)


def llm_prefill_flops(hidden: int, layers: int, intermediate: int, n: int) -> float:
    """Multiply-adds x 2 of a LLaMA-style decoder over ``n`` tokens: projections, gated MLP, attention."""
    dense = 2 * n * (4 * hidden * hidden + 3 * hidden * intermediate)
    attention = 4 * n * n * hidden
    return float(layers * (dense + attention))


def vit_flops(width: int, layers: int, mlp: int, n: int) -> float:
    """FLOPs of a CLIP ViT over ``n`` tokens (projections, MLP, attention)."""
    return float(layers * (2 * n * (4 * width * width + 2 * width * mlp) + 4 * n * n * width))


def llava7b_ttft_flops(prompt_tokens: int, k: int = 32) -> dict[str, float]:
    """Computed prefill FLOPs of LLaVA-1.5-7B: stock (vision tower + all 576 visual tokens) vs K summary tokens."""
    g = LLAVA_7B
    vision = vit_flops(g["vision_width"], g["vision_layers"], g["vision_mlp"], g["vision_tokens"])
    stock = vision + llm_prefill_flops(g["hidden"], g["layers"], g["intermediate"], g["visual_tokens"] + prompt_tokens)
    lazy = llm_prefill_flops(g["hidden"], g["layers"], g["intermediate"], k + prompt_tokens)
    return {"stock": stock, "fwd2bot": lazy, "ratio": stock / lazy, "prompt_tokens": prompt_tokens, "K": k}
