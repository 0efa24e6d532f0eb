"""Figure 2, storage per image: retrieval vector (fp32 / fp16 / PQ) and stored tokens (summary fp16 /
int8, pooled, all visual tokens), with the quality each setting keeps.

Demo model: a fresh shapes world (a seed the model was not trained on) is indexed into one real
collection per setting with ``open_service(..., strategy=..., token_dtype=...)``; sizes are read from
``info()`` (bytes on disk per image: the token store also holds the fp32 embedding, so "stored" is
what a collection costs, "raw" the tokens alone). Quality is measured on the same collections the way
`f2b eval` does on a collection: QA exact match with answers generated from the *stored* tokens
(``ask``), and text->image R@1 from the stored embeddings. Retrieval-vector precision is measured by
re-scoring the same stored embeddings after an fp16 round trip and after product quantization.

LLaVA-1.5-7B: sizes computed from its geometry (H=4096, 576 visual tokens, K=32), no quality (no such
model can be run here).

    python bench/bench_storage.py --quick
    python bench/bench_storage.py
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import _models as M  # noqa: E402

NAME = "storage"
GOAL_RATIO = 16.0
GOAL_QA_LOSS = 2.0  # points
SETTINGS = [("fwd2bot", "fp16"), ("fwd2bot", "int8"), ("pool@8", "fp16"), ("pool@16", "fp16"), ("full", "fp16")]


# -- LLaVA-1.5-7B, computed ------------------------------------------------------------------------
def computed_7b(embed_dim: int = 256) -> list[dict]:
    """Bytes per image at LLaVA-1.5-7B geometry; ratios against all 576 visual tokens in fp16."""
    h, n, k = M.LLAVA_7B["hidden"], M.LLAVA_7B["visual_tokens"], M.LLAVA_7B["K"]
    full = n * h * 2
    pq_m = 64
    rows = [
        ("retrieval vector", f"fwd2bot embedding, {embed_dim}-d fp32", embed_dim * 4),
        ("retrieval vector", f"fwd2bot embedding, {embed_dim}-d fp16", embed_dim * 2),
        ("retrieval vector", f"fwd2bot embedding, PQ {pq_m} x 8 bit", pq_m),
        ("retrieval vector", f"E5-V-style prompt embedding, {h}-d fp32", h * 4),
        ("stored tokens", f"all {n} visual tokens, fp16", full),
        ("stored tokens", f"pooled to 64 tokens, fp16", 64 * h * 2),
        ("stored tokens", f"pooled to {k} tokens, fp16", k * h * 2),
        ("stored tokens", f"summary K={k}, fp16", k * h * 2),
        ("stored tokens", f"summary K={k}, int8 (+ fp32 scale per token)", k * h + 4 * k),
        ("stored tokens", "summary K=16, int8 (+ fp32 scale per token)", 16 * h + 4 * 16),
    ]
    return [{"part": part, "item": item, "bytes": b, "ratio_vs_full": full / b if part == "stored tokens" else None}
            for part, item, b in rows]


def kib(b: float | None) -> str:
    if b is None:
        return "-"
    if b >= 2**20:
        return f"{b / 2**20:.2f} MiB"
    if b >= 1024:
        return f"{b / 1024:.1f} KiB"
    return f"{b:.0f} B"


# -- demo model, measured -----------------------------------------------------------------------------
def index_setting(model_name: str, strategy: str, token_dtype: str, images: Path, work: Path) -> Any:
    from fwd2bot_index.service import open_service

    tag = f"{strategy.replace('@', '-')}-{token_dtype}"
    service = open_service(work / f"coll-{tag}", model=model_name, device="cpu", dtype="fp32", create=True,
                           writable=True, strategy=strategy, token_dtype=token_dtype)
    report = service.index([images], batch_size=16)
    if report.failed:
        raise RuntimeError(f"indexing failed for {len(report.failed)} images, e.g. {report.failed[0]}")
    return service


def quality(service: Any, world: Path, qa_limit: int, with_quality: bool) -> dict:
    """QA exact match from stored tokens and text->image R@1 from stored embeddings (eval's runners)."""
    if not with_quality:
        return {}
    from fwd2bot_index.eval import read_captions_jsonl, read_qa_jsonl, run_qa, run_retrieval
    from fwd2bot_index.eval.targets import CollectionTarget

    target = CollectionTarget(service, max_new_tokens=16)
    data = read_captions_jsonl(world / "captions.jsonl", images_dir=world, split=None, max_captions_per_image=1)
    recall = run_retrieval(target, data, show_progress=False)["recall"]
    records = read_qa_jsonl(world / "qa.jsonl", images_dir=world, limit=qa_limit)
    qa = run_qa(target.answerer([r.image for r in records.records]), records, show_progress=False,
                keep_predictions=False)
    return {"qa_exact": 100 * qa["exact_match"], "qa_n": qa["n"], "r1_t2i": recall["t2i"][1],
            "r1_i2t": recall["i2t"][1], "captions": data.n_captions}


def vector_precision(service: Any, world: Path) -> list[dict]:
    """R@1 of the same stored embeddings kept as fp32, as fp16, and as PQ codes (asymmetric scoring)."""
    import faiss

    from fwd2bot_index.eval import read_captions_jsonl, retrieval_recall

    data = read_captions_jsonl(world / "captions.jsonl", images_dir=world, split=None, max_captions_per_image=1)
    ids = [service.resolve(str(Path(p).resolve())) for p in data.image_paths]
    emb = np.ascontiguousarray(service.collection.embeddings(ids), dtype=np.float32)
    texts = np.asarray(service.encode_texts(data.captions), dtype=np.float32)
    d = emb.shape[1]
    m = next(x for x in range(min(64, max(1, d // 2)), 0, -1) if d % x == 0)  # the collection's PQ rule
    variants = [("fp32", emb, 4 * d), ("fp16", emb.astype(np.float16).astype(np.float32), 2 * d)]
    if len(emb) >= 256:
        pq = faiss.ProductQuantizer(d, m, 8)
        pq.train(emb)
        variants.append((f"PQ {m} x 8 bit", pq.decode(pq.compute_codes(emb)), m))
    out = []
    for name, vecs, nbytes in variants:
        recall = retrieval_recall(texts @ vecs.T, data.caption_to_image, (1, 5, 10))
        out.append({"item": f"{d}-d embedding, {name}", "bytes": nbytes, "r1_t2i": recall["t2i"][1]})
    if len(emb) < 256:
        out.append({"item": f"{d}-d embedding, PQ {m} x 8 bit", "bytes": m, "r1_t2i": None,
                    "note": "needs >= 256 images to train the codebooks"})
    return out


def parse_settings(text: str) -> list[tuple[str, str]]:
    """``"fwd2bot:fp16,full:fp16"`` -> [(strategy, token dtype)]; ``full`` must be among them (the reference)."""
    out = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        strategy, _, dtype = item.partition(":")
        if dtype not in ("fp16", "int8"):
            raise ValueError(f"setting {item!r}: write STRATEGY:fp16 or STRATEGY:int8")
        out.append((strategy, dtype))
    if not any(s == "full" for s, _ in out):
        raise ValueError("the settings must include full:fp16 or full:int8, the reference the ratios are taken against")
    return out


def measure_demo(model_name: str, n: int, qa_limit: int, work: Path, with_quality: bool,
                 settings_list: list[tuple[str, str]] = SETTINGS) -> dict:
    model = M.load(model_name)
    geometry = M.model_geometry(model)
    del model
    world = M.world_images(work / "world", n, geometry["image_size"], seed=12345)
    settings = []
    vectors: list[dict] = []
    for strategy, token_dtype in settings_list:
        C.log(f"storage: {strategy} {token_dtype} ...")
        service = index_setting(model_name, strategy, token_dtype, world / "images", work)
        info = service.info()
        t, h = info["token_count"], info["token_dim"]
        raw = t * h * (1 if token_dtype == "int8" else 2) + (4 * t if token_dtype == "int8" else 0)
        row = {"strategy": info["strategy"], "token_dtype": token_dtype, "stored_tokens": t, "hidden": h,
               "raw_token_bytes": raw, "token_store_bytes_per_image": info["tokens_bytes_per_image"],
               "index_bytes_per_image": info["index_bytes_per_image"], "embed_dim": info["embed_dim"],
               "images": info["indexed"], **quality(service, world, qa_limit, with_quality)}
        if strategy == "fwd2bot" and token_dtype == "fp16":
            vectors = vector_precision(service, world) if with_quality else []
            row_index = info["index_bytes_per_image"]
            vectors.insert(0, {"item": f"FAISS flat index file, measured on disk ({info['embed_dim']}-d fp32 + id)",
                               "bytes": row_index, "r1_t2i": None})
        settings.append(row)
        service.close()
    full = next(r for r in settings if r["strategy"].endswith("full"))
    for r in settings:
        r["ratio_raw"] = full["raw_token_bytes"] / r["raw_token_bytes"]
        r["ratio_stored"] = full["token_store_bytes_per_image"] / r["token_store_bytes_per_image"]
        if with_quality:
            r["qa_loss_points"] = full["qa_exact"] - r["qa_exact"]
    return {"geometry": geometry, "images": n, "settings": settings, "vectors": vectors}


# -- output -----------------------------------------------------------------------------------------------
def render(seven: list[dict], demo: dict, desc: str, with_quality: bool) -> str:
    lines = ["**LLaVA-1.5-7B geometry (computed: H=4096, 576 visual tokens, K=32; quality not measurable here)**", ""]
    lines.append(C.md_table(["part", "what is stored", "bytes / image", "smaller than all visual tokens"],
                            [[r["part"], r["item"], kib(r["bytes"]),
                              f"{r['ratio_vs_full']:.1f}x" if r["ratio_vs_full"] else "-"] for r in seven]))
    g = demo["geometry"]
    lines += ["", f"**Demo world, measured on disk** ({desc}; {M.geometry_text(g)}; {demo['images']} images of a "
              "fresh world, seed 12345)", ""]
    headers = ["strategy", "token dtype", "stored tokens", "raw token bytes", "token store bytes / image",
               "smaller than full (raw / stored)", "QA exact match %", "QA loss vs full (points)",
               "text->image R@1"]
    rows = []
    for r in demo["settings"]:
        rows.append([r["strategy"], r["token_dtype"], f"{r['stored_tokens']} x {r['hidden']}", kib(r["raw_token_bytes"]),
                     kib(r["token_store_bytes_per_image"]), f"{r['ratio_raw']:.1f}x / {r['ratio_stored']:.1f}x",
                     r.get("qa_exact"), r.get("qa_loss_points"), r.get("r1_t2i")])
    lines.append(C.md_table(headers, rows))
    if demo["vectors"]:
        lines += ["", "**Retrieval vector, demo model (fwd2bot embeddings; R@1 re-scored from the stored vectors)**", ""]
        lines.append(C.md_table(["retrieval vector", "bytes / image", "text->image R@1", "note"],
                                [[v["item"], kib(v["bytes"]), v.get("r1_t2i"), v.get("note", "")] for v in demo["vectors"]]))
    if with_quality:
        n_q = next((r.get("qa_n") for r in demo["settings"] if r.get("qa_n")), 0)
        lines += ["", f"QA: {n_q} questions answered from the stored tokens (`ask`, greedy, 16 new tokens), exact "
                  f"match; R@1: each image's scene-unique caption (as in the demo model's claims table) against the "
                  f"{demo['images']}-image gallery, from the stored embeddings. "
                  "`pool` and `full` embed with the E5-V-style prompt (same vector for every token budget), so their "
                  "R@1 is the same; only the stored tokens (and so QA) differ. The token store holds the fp32 "
                  "embedding and an id next to the tokens, hence stored > raw."]
        card = claims_card()
        if card:
            lines += ["", f"The demo model's own claims table ({card}) measures the same strategies on two "
                      "1,000-image held-out galleries (seen and unseen compositions) from unquantized tokens; this "
                      "table adds what storage does to them (fp16 / int8 on disk, read back through the collection)."]
    else:
        lines += ["", "Quality not measured: this model has random weights."]
    return "\n".join(lines)


def claims_card() -> str | None:
    """The demo model card's path (relative to the repo) when it carries the claims table."""
    from fwd2bot_index.model import demo_model_path

    card = demo_model_path() / "README.md"
    try:
        if "<!-- demo-claims:start -->" in card.read_text(encoding="utf-8"):
            return str(card.relative_to(C.ROOT)) if card.is_relative_to(C.ROOT) else str(card)
    except OSError:
        pass
    return None


def _sampling_error(ours: dict, full: dict) -> str:
    """How far two scores over the same few hundred questions can differ by chance alone: the standard error
    of the difference of two binomial proportions (their correlation ignored, so an upper figure)."""
    n = ours.get("qa_n")
    if not n:
        return ""
    a, b = ours["qa_exact"] / 100, full["qa_exact"] / 100
    se = 100 * math.sqrt((a * (1 - a) + b * (1 - b)) / n)
    return f"; one standard error of that difference at {n} questions is {se:.1f} points"


def goals(seven: list[dict], demo: dict, with_quality: bool, desc: str) -> list[dict]:
    out = []
    best = max((r for r in seven if "summary K=32" in r["item"] and "fp16" in r["item"]), key=lambda r: r["ratio_vs_full"])
    out.append(C.goal("2", f"LLaVA-1.5-7B: K=32 summary >= {GOAL_RATIO:.0f}x smaller than all visual tokens",
                      f"{best['ratio_vs_full']:.1f}x in fp16, {next(r for r in seven if 'K=32, int8' in r['item'])['ratio_vs_full']:.1f}x in int8 (computed)",
                      best["ratio_vs_full"] >= GOAL_RATIO))
    if not with_quality:
        out.append(C.goal("2", f"demo world: Fwd2Bot QA loss <= {GOAL_QA_LOSS:.0f} points at its largest compression",
                          f"not measured ({desc})", None))
        return out
    full = next(r for r in demo["settings"] if r["strategy"].endswith("full"))
    ours = [r for r in demo["settings"] if r["strategy"] == "fwd2bot"]
    text = f"demo world: Fwd2Bot QA loss <= {GOAL_QA_LOSS:.0f} points at its largest compression"
    if not ours:
        out.append(C.goal("2", text, "no fwd2bot setting in this run", None))
        return out
    top = max(ours, key=lambda r: r["ratio_stored"])
    met = top["qa_loss_points"] <= GOAL_QA_LOSS
    others = [r for r in demo["settings"] if r["strategy"].startswith("prompt+pool")]
    context = "; " + ", ".join(f"{r['strategy']} {r['token_dtype']} ({r['ratio_stored']:.1f}x): "
                               f"{r['qa_loss_points']:+.1f}" for r in others) if others else ""
    why = "" if met else (f"{top['strategy']} {top['token_dtype']} answers {top['qa_exact']:.1f}% vs "
                          f"{full['qa_exact']:.1f}% from all visual tokens" + _sampling_error(top, full))
    out.append(C.goal("2", text, f"{top['strategy']} {top['token_dtype']} ({top['ratio_stored']:.1f}x smaller "
                      f"stored than all visual tokens): {top['qa_loss_points']:+.1f} points (pooling at similar "
                      f"sizes{context or ': not run'}) on {top.get('qa_n')} questions", met, why))
    return out


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__, NAME)
    p.add_argument("--images", type=int, help="world images per collection (default 300; quick 40)")
    p.add_argument("--qa-limit", type=int, help="QA questions per setting (default 300; quick 40)")
    p.add_argument("--settings", default=",".join(f"{a}:{b}" for a, b in SETTINGS),
                   help="STRATEGY:DTYPE list (default: %(default)s); must include full")
    p.add_argument("--smoke", action="store_true", help="tiny stand-in model (tests)")
    p.add_argument("--quality", choices=("auto", "on", "off"), default="auto",
                   help="measure QA and R@1 (auto: only on the real demo model; on a random stand-in they are noise)")
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    try:
        chosen = parse_settings(args.settings)
    except ValueError as exc:
        p.error(str(exc))
    n = args.images or (40 if args.quick else 300)
    qa_limit = args.qa_limit or (40 if args.quick else 300)
    info = C.machine()
    seven = computed_7b()
    with tempfile.TemporaryDirectory(prefix="f2b-bench-storage-") as tmp:
        name, desc, is_demo = M.demo_or_standin(Path(tmp), smoke=args.smoke)
        with_quality = is_demo if args.quality == "auto" else args.quality == "on"
        demo = measure_demo(name, n, qa_limit, Path(tmp), with_quality=with_quality, settings_list=chosen)
    if with_quality and not is_demo:
        desc += "; quality columns are noise from random weights"
    text = render(seven, demo, desc, with_quality)
    print(text)
    C.write_json(args.json, {"figure": 2, "name": NAME, "machine": info, "model": desc, "llava7b": seven,
                             "demo": demo, "goals": goals(seven, demo, with_quality and is_demo, desc),
                             "markdown": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
