"""Figure 6, on a GPU: pass-1 throughput and model FLOP utilization (MFU) of a LLaVA-1.5-7B-shaped model.

The model is built from configs with random weights directly in bf16 on the GPU (no download): CLIP
ViT-L/14 at 336 px (577 tokens, width 1024, 24 layers, MLP 4096, 16 heads), the LLaVA-1.5 two-layer
projector, and a LLaMA-2-7B-shaped LLM (4096 wide, 32 layers, MLP 11008, 32 heads, vocab 32000), with
a Fwd2Bot compressor (K=32, LoRA r=16 on both adapters) from ``Fwd2Bot.create``. Pass 1 = vision tower,
projector, LLM over [prefix + 576 visual tokens + prompt + 32 summary tokens], embedding head.

Also: time to the first answer token, stock image path vs the answering loop from K=32 stored tokens
(the 7B shape is where the prefill FLOP ratio, 12.3x, bounds it), and one bf16 training step.

Two rates per batch size: ``encode_images`` on PIL images (preprocessing on the CPU included, what
`f2b index` sees) and the model alone on preprocessed pixel tensors (what MFU is computed from). MFU =
model FLOPs per image (counted from the shapes, base weights only, LoRA excluded) x images/s / the
card's dense bf16 peak. It refuses to run without CUDA: a 7B model on a CPU says nothing about a GPU.

    python bench/bench_gpu.py                  # batch sizes 1, 8, 32
    python bench/bench_gpu.py --quick          # batch sizes 1, 8
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _models as M  # noqa: E402

NAME = "gpu"
NO_GPU_EXIT = 3  # run_all.py reads this as "not measurable on this machine"

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets, in TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(name: str) -> float | None:
    """The card's dense bf16 peak from its device name (longest matching key), None when unknown."""
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


# Test-only geometry (``--smoke``): the same code path on a CPU in seconds.
SMOKE_GEOMETRY = {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "vocab": 1024, "visual_tokens": 16,
                  "vision_width": 32, "vision_layers": 2, "vision_mlp": 64, "vision_tokens": 17, "K": 8,
                  "image_size": 64, "patch_size": 16, "vision_heads": 4}


def build_llava_shape(g: dict, device: str = "cuda", seed: int = 0) -> Any:
    """A Fwd2Bot over a random LLaVA-shaped model of geometry ``g`` (LLaVA-1.5-7B by default) in bf16."""
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from fwd2bot_index.model import Fwd2Bot
    from fwd2bot_index.model.backbone import LlavaBackbone

    tokenizer = M.world_tokenizer(2048)
    size, patch = g.get("image_size", 336), g.get("patch_size", 14)
    vision = CLIPVisionConfig(hidden_size=g["vision_width"], intermediate_size=g["vision_mlp"],
                              num_hidden_layers=g["vision_layers"], num_attention_heads=g.get("vision_heads", 16),
                              image_size=size, patch_size=patch, projection_dim=g["vision_width"])
    text = LlamaConfig(vocab_size=g["vocab"], hidden_size=g["hidden"], intermediate_size=g["intermediate"],
                       num_hidden_layers=g["layers"], num_attention_heads=g["heads"], num_key_value_heads=g["heads"],
                       max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=g["visual_tokens"],
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            hf = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": size},
                                                                     crop_size={"height": size, "width": size}),
                               tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    backbone = LlavaBackbone(hf, processor, reference="llava-1.5-7b-shape (random)")
    model = Fwd2Bot.create(backbone, num_summary_tokens=g["K"], embed_dim=256, seed=seed)
    model.config.trained_steps = 1  # random weights: timing only
    return model


def pass1_flops(model: Any, g: dict) -> tuple[float, int]:
    """(FLOPs per image, LLM sequence length) of pass 1, base weights only."""
    parts = model.backbone.chat(model.config.compress_prompt)
    prompt = len(model.backbone.token_ids(parts.before, bos=True)) + len(model.backbone.token_ids(parts.after))
    seq = prompt + g["visual_tokens"] + g["K"]
    vision = M.vit_flops(g["vision_width"], g["vision_layers"] - 1, g["vision_mlp"], g["vision_tokens"])  # layer -2
    projector = 2 * g["visual_tokens"] * (g["vision_width"] * g["hidden"] + g["hidden"] * g["hidden"])
    llm = M.llm_prefill_flops(g["hidden"], g["layers"], g["intermediate"], seq)
    head = 2 * g["hidden"] * model.config.embed_dim
    return float(vision + projector + llm + head), int(seq)


def rate(fn: Any, n_images: int, repeats: int, cuda: bool = True) -> float:
    """Images/s of ``fn`` (CUDA-synchronized), best of ``repeats`` after one warm-up."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return n_images / best


def measure(batches: list[int], repeats: int, smoke: bool = False, train_batches: tuple[int, ...] = (8,)) -> dict:
    import torch

    from fwd2bot_index.model.tiny import random_images

    g = SMOKE_GEOMETRY if smoke else M.LLAVA_7B
    device = "cpu" if smoke else "cuda"
    model = build_llava_shape(g, device)
    flops, seq = pass1_flops(model, g)
    name = "CPU (smoke test geometry)" if smoke else torch.cuda.get_device_name(0)
    peak = None if smoke else peak_tflops(name)
    rows = []
    for b in batches:
        images = random_images(b, seed=b, size=(640, 480))
        pixels = model.backbone.pixel_values(images)

        def model_only() -> None:
            with torch.inference_mode():
                model.embed_summary(model.compress(model.visual_tokens(pixels)))

        end_to_end = rate(lambda: model.encode_images(images, batch_size=b), b, repeats, not smoke)
        core = rate(model_only, b, repeats, not smoke)
        achieved = core * flops / 1e12
        rows.append({"batch": b, "encode_images_per_s": end_to_end, "model_images_per_s": core,
                     "achieved_tflops": achieved, "mfu": achieved / peak if peak else None,
                     "max_memory_gib": None if smoke else torch.cuda.max_memory_allocated() / 2**30})
        C.log(f"  batch {b}: {core:.1f} img/s model-only, {end_to_end:.1f} img/s encode_images, {achieved:.0f} TFLOP/s")
    answer = ttft(model, repeats, not smoke)
    C.log(f"  TTFT: stock {answer['stock_ms']:.1f} ms, fwd2bot {answer['fwd2bot_ms']:.1f} ms ({answer['ratio']:.1f}x)")
    training = []
    for b in train_batches:
        training.append(train_step_rate(model, b, repeats, not smoke))
        C.log(f"  training step, batch {b}: {training[-1]['step_s']:.3f} s")
    return {"device": name, "peak_tflops": peak, "flops_per_image": flops, "sequence": seq, "rows": rows,
            "repeats": repeats, "ttft": answer, "training": training, "K": g["K"],
            "dtype": str(model.backbone.dtype).replace("torch.", "")}


def train_step_rate(model: Any, batch: int, repeats: int, cuda: bool = True) -> dict:
    """One Fwd2Bot training step as ``f2b train`` takes it (pass 1 over the images, InfoNCE against the
    captions' text embeddings, pass-2 autoregressive loss, backward, AdamW) with the base frozen and the
    LoRA adapters, summary tokens and heads trainable, all in the model's dtype (bf16 on the GPU)."""
    import torch

    from fwd2bot_index.model.tiny import random_images
    from fwd2bot_index.training.losses import info_nce

    images = random_images(batch, seed=100 + batch, size=(640, 480))
    pixels = model.backbone.pixel_values(images)
    captions = [f"picture {i}: a red circle left of a blue square" for i in range(batch)]
    strategy = model.resolve_strategy("fwd2bot")
    model.enable_adapter_training(True)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        summary = model.compress(model.visual_tokens(pixels))
        loss = info_nce(model.embed_summary(summary), model.embed_text_batch(captions, strategy),
                        model.compressor.logit_scale, captions)
        loss = loss + model.pass2_loss(summary, ["Describe the image."] * batch, captions)
        loss.backward()
        optimizer.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    samples = rate(step, batch, repeats, cuda)
    model.enable_adapter_training(False)
    return {"batch": batch, "samples_per_s": samples, "step_s": batch / samples,
            "trainable_parameters": sum(p.numel() for p in params),
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def ttft(model: Any, repeats: int, cuda: bool = True) -> dict:
    """Time to the first answer token: stock (image -> vision tower -> all visual tokens -> ``generate``)
    vs the product's answering loop from K stored summary tokens, best of ``repeats``."""
    import torch

    from fwd2bot_index.model.tiny import random_images

    image = random_images(1, seed=7, size=(640, 480))
    with torch.inference_mode():
        stored = model.compress(model.visual_tokens(model.backbone.pixel_values(image)))[0]
    question = "What is the color of the small circle on the left?"

    def stock() -> None:
        with torch.inference_mode():
            visual = model.visual_tokens(model.backbone.pixel_values(image))
            embeds, mask = model.pass2_inputs([visual[0]], [question], "full")
            with model.adapter(None):
                model.backbone.generate(embeds, mask, 1)

    def lazy() -> None:
        for _ in model.answerer.steps([stored], [question], 1, "fwd2bot"):
            break

    times = {}
    for name, fn in (("stock", stock), ("fwd2bot", lazy)):
        times[name] = 1.0 / rate(fn, 1, repeats, cuda)  # rate() synchronizes CUDA around each run
    return {"stock_ms": 1000 * times["stock"], "fwd2bot_ms": 1000 * times["fwd2bot"],
            "ratio": times["stock"] / times["fwd2bot"]}


def render(result: dict) -> str:
    peak = result["peak_tflops"]
    lines = [f"Device: {result['device']} (dense bf16 peak {peak:.0f} TFLOP/s)" if peak else
             f"Device: {result['device']} (bf16 peak unknown to this script: MFU not computed)",
             f"Pass-1 model FLOPs per image: {result['flops_per_image'] / 1e12:.2f} TFLOP (LLM sequence "
             f"{result['sequence']} tokens); best of {result['repeats']} runs per batch size.", ""]
    lines.append(C.md_table(["batch", "model-only images/s", "encode_images images/s (CPU preprocessing incl.)",
                             "achieved TFLOP/s", "MFU", "peak memory GiB"],
                            [[r["batch"], r["model_images_per_s"], r["encode_images_per_s"], r["achieved_tflops"],
                              f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-", r["max_memory_gib"]]
                             for r in result["rows"]]))
    t = result["ttft"]
    lines += ["", f"**Time to first answer token** ({result['dtype']}, best of {result['repeats']}): stock image path "
              f"(vision tower, all visual tokens, generate) {t['stock_ms']:.1f} ms vs the answering loop from "
              f"{result['K']} stored summary tokens {t['fwd2bot_ms']:.1f} ms: {t['ratio']:.1f}x.", "",
              f"**Training step** ({result['dtype']} weights; base frozen; LoRA r=16 on both adapters, summary tokens "
              "and heads trained; pass 1 + InfoNCE + pass-2 loss, backward, AdamW):", "",
              C.md_table(["batch", "s / step", "samples/s", "trainable parameters", "peak memory GiB"],
                         [[r["batch"], r["step_s"], r["samples_per_s"], f"{r['trainable_parameters']:,}",
                           r["max_memory_gib"]] for r in result["training"]])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__, NAME)
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,8,32; quick 1,8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-batches", help="comma-separated batch sizes of the timed training step (default 8)")
    p.add_argument("--smoke", action="store_true", help="tests only: a tiny geometry on the CPU (no figure)")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print(f"figure 6 needs a CUDA GPU and none is visible here (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False): a 7B model on a CPU says nothing about GPU throughput. "
              "Run this script on a machine with a GPU and a CUDA build of torch.", file=sys.stderr)
        return NO_GPU_EXIT
    batches = [int(x) for x in (args.batches or ("1,8" if args.quick else "1,8,32")).split(",")]
    info = C.machine()
    train = tuple(int(x) for x in (args.train_batches or ("2" if args.smoke else "8")).split(","))
    result = measure(batches, args.repeats, smoke=args.smoke, train_batches=train)
    text = render(result)
    print(text)
    best = max(result["rows"], key=lambda r: r["model_images_per_s"])
    goals = [C.goal("6", "pass-1 throughput and MFU on a GPU (reported, no target)",
                    f"{best['model_images_per_s']:.1f} img/s at batch {best['batch']}"
                    + (f", MFU {100 * best['mfu']:.1f}%" if best["mfu"] is not None else ""), True)]
    C.write_json(args.json, {"figure": 6, "name": NAME, "machine": info, "result": result, "goals": goals,
                             "markdown": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
