"""Export of the demo checkpoint, its model card, and the claims tables for README and card."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...model import Fwd2Bot
from .compressor import CLAIMS_VARIANTS
from .measure import OBJECT_QUERY_KINDS, base_rate_key
from .targets import EVAL_SPLITS, qa_by_type, qa_overall

CLAIMS_START = "<!-- demo-claims:start -->"
CLAIMS_END = "<!-- demo-claims:end -->"
TRAIN_COMMAND = "f2b train --recipe demo"
MODULE_COMMAND = ("python -m fwd2bot_index.training.demo_recipe --out fwd2bot_index/demo_model --readme README.md "
                  "--work-dir runs/demo --variants " + ",".join(CLAIMS_VARIANTS))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def export_fp16(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Load a compressor checkpoint and write it self-contained (``base/`` included) in fp16."""
    model = Fwd2Bot.from_pretrained(str(checkpoint), device="cpu", dtype="fp32")
    model.backbone.hf.half()
    model.compressor.half()
    model.config.base_signature = model.backbone.signature()
    model.save_pretrained(str(out_dir), include_base=True)
    for path in [Path(out_dir), *Path(out_dir).rglob("*")]:  # package data: readable by everyone
        path.chmod(0o755 if path.is_dir() else 0o644)


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


def write_model_card(out_dir: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """README.md of the checkpoint: what it is, what it knows (only the shapes world), how it was made."""
    r, stages = report["recipe"], report["stages"]
    spec = r["spec"]
    tokens = (spec["image_size"] // spec["patch_size"]) ** 2
    warm, base, finish = stages.get("warmup", {}), stages.get("base", {}), stages.get("base-finish", {})
    comp = {k[len("compressor-"):]: v for k, v in stages.items() if k.startswith("compressor-")}
    lines = [
        "# fwd2bot-index demo model", "",
        "A small LLaVA-architecture model with a trained Fwd2Bot compressor, made by this project from nothing "
        "(no downloaded weights) so that every part of fwd2bot-index works offline. It is the default model "
        "(`demo`) of `f2b index` / `search` / `ask`.", "",
        "**It only knows the procedural shapes world** of `f2b demo-data`: 2-4 flat shapes (circle, square, "
        "triangle, star, cross, diamond) in 8 colours and 2 sizes on a 3x3 grid over a plain, gradient or noisy "
        "background, at 64x64 pixels. On photographs, or on any other kind of image, its embeddings, search "
        "results and answers are meaningless. Use a real checkpoint (`--model llava-hf/llava-1.5-7b-hf`) for "
        "real images.", "",
        "## Model", "",
        f"- vision: CLIP-style ViT from scratch, {spec['image_size']} px, patch {spec['patch_size']} -> {tokens} "
        f"visual tokens, width {spec['vision_hidden']}, {spec['vision_layers']} layers (LLaVA reads its last layer)",
        f"- language: Llama, hidden {spec['hidden']}, {spec['layers']} layers, {spec['heads']} heads, "
        f"{spec['max_positions']} positions; byte-level BPE tokenizer ({warm.get('vocab_size', r['vocab_size'])} "
        "tokens, any English text encodes)",
        f"- base parameters: {warm.get('parameters', 0) / 1e6:.2f}M; weights stored in fp16 "
        f"(checkpoint folder {report.get('size_bytes', 0) / 2**20:.1f} MiB, base included)",
        f"- Fwd2Bot: K = {r['num_summary_tokens']} summary tokens, embedding dimension {r['embed_dim']}, LoRA "
        f"r = {r['lora_r']} (alpha {r['lora_alpha']}) adapters for pass 1 and pass 2; the base stays frozen; "
        + _readout_clause(stages.get("heads-k16") or comp.get("k16", {})), "",
        "## Recipe (seed " + str(report["seed"]) + ")", "",
        _warmup_line(r, warm),
        f"1. Base: {base.get('steps', '?')} steps x {r['base_batch']} fresh scenes (stopped by "
        f"{base.get('stopped_by', '?')}; rule: every question type >= {r['base_floor']} on held-out scenes, or "
        f"{r['base_max_steps']} steps / {r['base_max_minutes']:.0f} min), lr {r['base_lr']} constant after a "
        f"{r['base_warmup']}-step warm-up and halved only after {r['base_patience']} checks without a held-out rise "
        f"({base.get('lr_cuts', 0)} cuts), vision tower frozen, bf16 autocast "
        f"{'on' if r.get('bf16_autocast') else 'off'}. {_llm_init(base)} Every question of an image (and, in "
        f"{int(r['base_caption_share'] * 100)}% of sequences, a caption weighted {r['base_caption_weight']}) is a "
        "branch of one sequence that sees the image and its own question only, in the layout answering uses; "
        f"answer tokens weighted by type {_json(dict(r['base_type_weights']))}; {base.get('pooled_share')} "
        "(share, tokens) of the sequences see the visual tokens 2-D average-pooled, so the pooled baselines are "
        "answered by a base trained on them. Visual tokens' RMS over the word embeddings' at the end: "
        f"{base.get('visual_rms_vs_words', '?')}. Held-out monitor at the end: `{_json(base.get('heldout'))}`; "
        "the per-type curve is below.",
        *([_finish_line(r, base, finish)] if finish else []),
        f"2. Compressor: {r['compressor_steps']} steps x {r['compressor_batch']}, lr {r['compressor_lr']}; summary "
        "tokens, both adapters and the heads. Symmetric InfoNCE (the scene-unique caption, or for "
        f"{int(r['hard_negative_share'] * 100)}% of items a hard-negative pair's caption whose negative joins the "
        "text side) + the branched autoregressive loss after pass 2" + _absent_clause(comp.get("k16", {}))
        + (f" + pooled distillation weighted {r['compressor_distill_weight']} (pass 2's input, the projected summary "
           "tokens, regressed onto the base's own 2-D pool@K visual tokens, which the base already answers from)"
           if r.get("compressor_distill_weight") else "")
        + _phrase_clause(comp.get("k16", {}))
        + f"; LLaVolta staged pooling `{r['compressor_pool_schedule']}` in pass 1 (stride s keeps N/s tokens; "
        f"{_llavolta_layers(r)}). Variants trained the same way: {_variant_list(comp)}.",
        *([_refit_line(stages["heads-k16"])] if "heads-k16" in stages else []),
        "3. Export: base, adapters and compressor cast to fp16 into one self-contained folder.", "",
        f"Stage summaries: `{_json({k: {kk: vv for kk, vv in v.items() if kk not in ('history', 'monitor')} for k, v in stages.items()})}`",
        "",
        f"Training time: {report.get('stage_seconds', 0) / 60:.0f} min over all stages on {report['threads']} CPU "
        "thread(s) of a shared 2-core machine.", "",
        *_curve_table(finish.get("history") or base.get("history") or []),
        "## Reproduce", "",
        "```bash", f"{MODULE_COMMAND}   # train (resumable), measure, write the tables",
        f"{TRAIN_COMMAND}   # the shipped model's training alone, into ./f2b-demo", "```", "",
        *([f"This model's run continued an earlier base: the same command with `--base-from {warm['from']}` (that "
           "folder is the previous demo model's `base/`, in this repository's history).", ""] if "from" in warm else []),
        "Seeded: the same command gives the same scenes and the same step sequence; weights can differ in the "
        "last bits with the number of CPU threads.", "",
        "## Measured results", "",
        CLAIMS_START, "_Not measured yet: run the command above with `--measure-only`._", CLAIMS_END, "",
    ]
    path = Path(out_dir) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _readout_clause(k16: dict[str, Any]) -> str:
    image, text = k16.get("image_readout", "mean"), k16.get("text_readout", "last")
    return ("the image embedding is a linear head on " + ("the mean of the summary tokens" if image == "mean" else
            "two small transformer layers over the summary tokens, then their mean")
            + ", the text embedding one on " + ("the prompt's last token state" if text == "last" else
            "two small transformer layers over every token state of the prompt, then their mean"))


def _refit_line(refit: dict[str, Any]) -> str:
    curve = refit.get("loss_curve") or ["?"]
    what = (f"new contrastive heads (image readout {refit.get('image_readout')}, text readout "
            f"{refit.get('text_readout')}) in place of the compressor's, and the temperature," if refit.get("fresh_heads")
            else "the contrastive heads, their readouts and the temperature")
    return (f"2b. Heads refitted: pass 1 frozen, the summary tokens of {refit.get('images', '?')} training images and "
            f"the token states of their first (scene-unique) captions and hard-negative pairs computed once, then "
            f"{what} trained on them for {refit.get('steps', '?')} steps x "
            f"{refit.get('batch', '?')} (lr {refit.get('lr', '?')}, one cycle) with the same loss; loss {curve[0]} -> "
            f"{curve[-1]}. Pass 2 does not read the heads: answers are unchanged.")


def _finish_line(r: dict[str, Any], base: dict[str, Any], finish: dict[str, Any]) -> str:
    return (f"1b. Base, finish: from step {finish.get('started_at_step', base.get('steps', '?'))} to "
            f"{finish.get('steps', '?')} on all visual tokens only (LLaVolta's last stage, no compression), the "
            f"optimizer's state kept and lr back at {r['base_lr']}, halved after {r['base_patience']} checks without "
            f"a rise ({finish.get('lr_cuts', 0)} cuts); stopped by {finish.get('stopped_by', '?')} (rule as above, or "
            f"{r['base_finish_max_steps']} more steps / {r['base_finish_max_minutes']:.0f} more min). Held-out "
            f"monitor at the end: `{_json(finish.get('heldout'))}`. The compressors train on this base.")


def _warmup_line(r: dict[str, Any], warm: dict[str, Any]) -> str:
    if "from" in warm:
        return (f"0. Vision warm-up: not rerun; the vision tower, projector and LLM start from `{warm['from']}` "
                "(the previous demo model's base, made by this recipe's earlier stages with the same seed).")
    return (f"0. Vision warm-up: fresh scenes every batch ({r['vision_batch']} per step), lr {r['vision_lr']}, shape "
            "terms weighted x5; the vision tower and projector learn each grid cell's and each token's colour, "
            "shape and size, each token's cell and the background from the scene ground truth (linear probes, "
            f"discarded). Stopped by {warm.get('stopped_by', '?')} at step {warm.get('steps', '?')} (rule: every "
            f"cell probe >= {r['vision_floor']} on {r['vision_heldout']} held-out scenes). Held-out probe accuracy: "
            f"`{_json(warm.get('heldout_accuracy'))}`.")


def _llm_init(base: dict[str, Any]) -> str:
    if base.get("started_from"):
        return f"The LLM continues the base in `{base['started_from']}`."
    if base.get("llm_init_std"):
        return (f"The LLM is initialised at std {base['llm_init_std']} (~1/sqrt(hidden)) and the projector output "
                f"rescaled to the word embeddings' RMS at step 0 (factor {base.get('projector_scale', 1.0):.3g}); "
                "training moves both afterwards.")
    return "The LLM starts from the warm-up's initialisation."


def _absent_clause(shipped: dict[str, Any]) -> str:
    """The absent-referent questions among the shipped compressor's pass-2 turns, when it trained with them."""
    if not shipped.get("absent_share"):
        return ""
    return (f" (for {int(shipped['absent_share'] * 100)}% of the images one of the questions asks about something the "
            "scene does not hold: \"what color is the square?\" -> \"there is no square\")")


def _phrase_clause(shipped: dict[str, Any]) -> str:
    """The one-object phrases of the shipped compressor's contrastive captions, when it trained with them."""
    if not shipped.get("object_share"):
        return ""
    how = ("each a positive of every image in the batch that holds its object (multi-positive InfoNCE)"
           if shipped.get("multi_positive") else "masked from the negatives of every other image holding its object")
    return (f"; {int(shipped['object_share'] * 100)}% of the contrastive captions name one object of the image "
            f"(\"a blue square\"), {how}")


def _llavolta_layers(r: dict[str, Any]) -> str:
    from ..schedule import PoolSchedule

    schedule = PoolSchedule.parse(r["compressor_pool_schedule"])
    layers = schedule.layers_for(r["spec"]["layers"])
    stages = ", ".join(f"stride {s} before layer {l}" if s > 1 else "none"
                       for (_, s, _), l in zip(schedule.stages, layers))
    return f"on this {r['spec']['layers']}-layer LLM: {stages}"


def _variant_list(comp: dict[str, dict[str, Any]]) -> str:
    """``k32, k8, k16-contrastive (no autoregressive loss and no distillation)``: what each variant changes,
    including its share of questions about missing objects and its number of steps where those differ from
    the shipped compressor's (a compressor kept from an earlier recipe, or an experiment such as
    ``k16-no-absent``)."""
    from .compressor import VARIANT_CHANGES

    shipped = comp.get("k16", {}).get("absent_share", 0.0)
    shipped_steps = comp.get("k16", {}).get("steps")
    readouts = _readouts(comp.get("k16", {}))
    said = {}
    for name, stage in comp.items():
        changes = [VARIANT_CHANGES[name]] if name in VARIANT_CHANGES else []
        mine = stage.get("absent_share", 0.0)
        if stage.get("autoregressive_weight", 1.0) > 0 and mine != shipped:
            changes.append(f"questions about missing objects in {int(mine * 100)}% of the images" if mine
                           else "no questions about missing objects")
        if name not in VARIANT_CHANGES and shipped_steps and stage.get("steps") not in (None, shipped_steps):
            changes.append(f"{stage['steps']:,} steps")  # kept from an earlier recipe's length
        if name not in VARIANT_CHANGES and _readouts(stage) != readouts:  # kept from a recipe with other heads
            changes.append("{} / {} readouts, {} hard negatives".format(*_readouts(stage)))
        said[name] = f"{name} ({'; '.join(changes)})" if changes else name
    return ", ".join(said[n] for n in sorted(said))


def _readouts(stage: dict[str, Any]) -> tuple[str, str, str]:
    """A compressor stage's image and text readouts and hard-negative kinds (stages from before them: the defaults)."""
    kinds = stage.get("hard_categories") or []
    return (stage.get("image_readout", "mean"), stage.get("text_readout", "last"),
            " and ".join(kinds) + " only" if kinds else "all seven kinds of")


def _curve_table(history: list[dict[str, Any]], rows: int = 16) -> list[str]:
    """The base stage's held-out curve (per question type), thinned to about ``rows`` checks."""
    if not history:
        return []
    types = [k for k in history[-1] if k not in ("step", "loss", "lr", "qa")]
    keep = history[:: max(1, math.ceil(len(history) / rows))]
    if keep[-1] is not history[-1]:
        keep.append(history[-1])
    lines = ["### Base stage: held-out exact match by question type", "",
             "| step | lr | loss | " + " | ".join(types) + " | all |", "|---" * (len(types) + 4) + "|"]
    for row in keep:
        lines.append(f"| {int(row['step'])} | {row.get('lr', float('nan')):.2g} | {row.get('loss', float('nan')):.3f} | "
                     + " | ".join(_pct(row.get(t)) for t in types) + f" | {_pct(row.get('qa'))} |")
    return lines + [""]


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _recall(r: dict[str, Any] | None, way: str) -> str:
    if r is None:
        return ""
    table = {int(k): v for k, v in r[way].items()}
    return " / ".join(_pct(table.get(k)) for k in (1, 5, 10))


def _rows(results: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    """(label, stored-form name, tokens, search embedding) in order of stored tokens."""
    k = results["num_summary_tokens"]
    rows = [("blind: the template's most common answer, no image", "blind", 0, "")]
    rows += [(f"2-D average pooling to {b} before the LLM (test time)", f"pool@{b}", b, "prompt (E5-V), training-free")
             for b in results["budgets"]]
    rows.append((f"Fwd2Bot summary tokens, K={k} (shipped)", "fwd2bot", k, "Fwd2Bot heads"))
    for name, v in results.get("variants", {}).items():
        nested = v.get("nested_budgets")
        label = (f"Fwd2Bot K={v['num_summary_tokens']}, contrastive loss only (ablation)" if name.endswith("contrastive")
                 else f"Fwd2Bot nested (one compressor), all {v['num_summary_tokens']} tokens" if nested
                 else f"Fwd2Bot summary tokens, K={v['num_summary_tokens']}")
        tag = "" if name in CLAIMS_VARIANTS else f" ({name})"  # an experiment's rows say which one
        rows.append((label + tag, f"fwd2bot-{name}", v["num_summary_tokens"], "its heads"))
        rows += [(f"Fwd2Bot nested (one compressor), first {k} tokens{tag}", f"fwd2bot-{name}@{k}", k, "its head")
                 for k in nested or ()]
    rows.append(("all visual tokens", "full", results["visual_tokens"], "prompt (E5-V), training-free"))
    return sorted(rows, key=lambda r: (r[2], r[1].startswith("fwd2bot")))


def _object_query_table(seen: dict[str, Any], unseen: dict[str, Any]) -> list[str]:
    """Queries naming one object ("a blue square", "a blue square at the bottom right"), which many images
    answer: results measured before these rows existed have none, and render without them."""
    lines: list[str] = []

    def cell(row: dict[str, float] | None) -> str:
        return " / ".join(_pct(row.get(k)) for k in ("p@1", "p@5", "map")) if row else "-"

    for kind, words, placed in OBJECT_QUERY_KINDS:
        if not seen.get(kind):
            continue
        what = "object placed somewhere" if placed else "composition"
        rate = base_rate_key(kind)
        lines += ["", f"Object queries: \"{words}\" for each {what} in the seen gallery ({seen[f'n_{kind}']}; "
                  f"{unseen.get(f'n_{kind}', 0)} unseen), every image holding it relevant (a random ranking's "
                  f"precision: {_pct(seen[rate])} seen, {_pct(unseen.get(rate))} unseen):", "",
                  "| search embedding | seen P@1 / P@5 / mAP | unseen P@1 / P@5 / mAP |", "|---|---|---|"]
        for name, row in seen[kind].items():
            lines.append(f"| {name} | {cell(row)} | {cell(unseen.get(kind, {}).get(name))} |")
    return lines


def _absent_table(results: dict[str, Any], names: Sequence[str]) -> list[str]:
    """Questions about something the image does not hold, per stored form (measurements made before these
    questions existed have none, and render without them)."""
    seen, unseen = results["splits"]["test"].get("absent_qa"), results["splits"]["test_unseen"].get("absent_qa")
    if not seen or not unseen:
        return []
    templates = sorted({*seen["blind"]["by_template"], *unseen["blind"]["by_template"]})
    lines = ["", f"Questions about something the image does not hold ({seen['blind']['n']} + {unseen['blind']['n']}: "
             "two per QA image, e.g. \"what color is the square?\" in a scene without a square, answered \"there is no "
             "square\"; not in the QA columns above, and the base never trained on them). Per template both splits; "
             "the last column is how often the same stored form answers \"there is no ...\" to one of the world's own "
             "questions about something the scene holds (all but existence \"no\" and count \"0\"):", "",
             "| stored form | seen | unseen | " + " | ".join(templates) + " | denies a present object |",
             "|" + "|".join(["---"] * (len(templates) + 4)) + "|"]
    for name in names:
        s, u = seen.get(name), unseen.get(name)
        if not s or not u:
            continue
        both = {t: sum(r["by_template"].get(t, 0.0) * r["n_by_template"].get(t, 0) for r in (s, u))
                / max(1, sum(r["n_by_template"].get(t, 0) for r in (s, u))) for t in templates}
        counts = [r.get("n_present", 1) for r in (s, u)]  # older results: equal splits
        denies = (s["denies_present"] * counts[0] + u["denies_present"] * counts[1]) / max(1, sum(counts))
        lines.append(f"| {name} | {_pct(s['exact_match'])} | {_pct(u['exact_match'])} | "
                     + " | ".join(_pct(both[t]) for t in templates) + f" | {_pct(denies)} |")
    return lines


def render_claims(results: dict[str, Any], command: str = MODULE_COMMAND + " --measure-only") -> str:
    """The markdown block that goes between the claim markers."""
    hidden = results["hidden_size"]
    seen, unseen = results["splits"]["test"], results["splits"]["test_unseen"]
    n_q = (seen["qa"]["fwd2bot"]["n"], unseen["qa"]["fwd2bot"]["n"])
    lines = [f"Measured {results['measured_on']} on held-out scenes (seed {results['eval_seed']}, "
             f"{results['image_size']} px): {seen['n_images']:,} 'test' scenes (seen colour-shape compositions, never "
             f"trained on) and {unseen['n_images']:,} 'test_unseen' scenes (each holds a colour-shape pair no training "
             f"scene has). Retrieval: the scene-unique caption as the query, the split's {seen['n_images']:,} images as "
             f"the gallery. QA: exact match over all questions of the first {results['n_qa_images']} images of each "
             f"split ({n_q[0]} + {n_q[1]} questions), answered from the stored tokens only. Pooled and full tokens are "
             "answered by the base (adapters off), which was trained on those forms; Fwd2Bot rows by their pass-2 "
             "adapter.", "", f"Command: `{command}`" + (" (quick smoke settings)" if results.get("quick") else ""), "",
             "| stored form | tokens / image | fp16 KiB / image | QA EM seen | QA EM unseen | search embedding "
             "| seen t2i R@1/5/10 | seen i2t R@1/5/10 | unseen t2i R@1/5/10 | unseen i2t R@1/5/10 |",
             "|" + "|".join(["---"] * 10) + "|"]
    for label, name, tokens, embed in _rows(results):
        emb = name if name.startswith("fwd2bot") else ("prompt" if embed else None)
        qa_s, qa_u = seen["qa"].get(name), unseen["qa"].get(name)
        lines.append(f"| {label} | {tokens} | {tokens * hidden * 2 / 1024:.1f} | "
                     f"{_pct(qa_s['exact_match']) if qa_s else '-'} | {_pct(qa_u['exact_match']) if qa_u else '-'} | "
                     f"{embed} | {_recall(seen['retrieval'].get(emb), 't2i')} | {_recall(seen['retrieval'].get(emb), 'i2t')} | "
                     f"{_recall(unseen['retrieval'].get(emb), 't2i')} | {_recall(unseen['retrieval'].get(emb), 'i2t')} |")
    small = seen.get("n_small_gallery")
    if small:
        lines += ["", f"Text->image recall with a {small}-image gallery (the first {small} images of each split and "
                      "their captions):", "", "| search embedding | seen t2i R@1/5/10 | unseen t2i R@1/5/10 |",
                  "|---|---|---|"]
        for name, table in seen.get("retrieval_small", {}).items():
            label = "prompt (E5-V), base model" if name == "prompt" else name
            lines.append(f"| {label} | {_recall(table, 't2i')} | "
                         f"{_recall(unseen.get('retrieval_small', {}).get(name), 't2i')} |")
    lines += _object_query_table(seen, unseen)
    names = [n for _, n, _, _ in _rows(results) if n in seen["qa"]]
    types = sorted(seen["qa"]["fwd2bot"]["by_type"])
    lines += ["", "QA exact match by question type (both splits):", "",
              "| stored form | " + " | ".join(types) + " | all |", "|" + "|".join(["---"] * (len(types) + 2)) + "|"]
    for name in names:
        by = qa_by_type(results, name)
        lines.append(f"| {name} | " + " | ".join(_pct(by.get(t)) for t in types) + f" | {_pct(qa_overall(results, name))} |")
    lines += _absent_table(results, names)
    sc = results["sugarcrepe"]
    cats = [c for c in sc["fwd2bot"]["accuracy"] if c[0].islower()]
    lines += ["", f"SugarCrepe-style hard negatives (the held-out scenes' pairs, first {results['n_sugarcrepe']} of "
                  "each category): share of pairs where the true caption scores strictly above the negative.", "",
              "| search embedding | " + " | ".join(cats) + " | mean |", "|" + "|".join(["---"] * (len(cats) + 2)) + "|"]
    for name, v in sc.items():
        acc = v["accuracy"]
        label = "prompt (E5-V), base model" if name == "prompt" else name
        lines.append(f"| {label} | " + " | ".join(_pct(acc[c]) for c in cats) +
                     f" | {_pct(float(np.mean([acc[c] for c in cats])))} |")
    lines += _verification_lines(results.get("verification"))
    lines += ["", "Goals (issues 20, 21, 24; reported, not asserted):", ""]
    for t in results["targets"]:
        if t["met"] is None:
            lines.append(f"- {t['target']}: {_pct(t['measured'])}")
            continue
        goal = _pct(t["goal"]) if isinstance(t["goal"], float) else t["goal"]
        lines.append(f"- {t['target']}: {_pct(t['measured'])} (goal {goal}): **{'met' if t['met'] else 'NOT met'}**")
    return "\n".join(lines)


def _verification_lines(v: dict[str, Any] | None) -> list[str]:
    """Verified search (``f2b search --verify``) on the same held-out scenes, from the shipped model's tokens."""
    if not v:
        return []
    cfg = v["settings"]
    lines = ["", f"Verified search (the shipped model checks its top hits from their stored tokens: P(yes) to "
                 f"\"{cfg['verify_prompt']}\", cutoff {cfg['min_relevance']:g}); the same held-out scenes and captions:",
             "", "| split | embedding t2i R@1/5/10 | " + " | ".join(f"{n} t2i R@1/5/10" for n in
                                                         (f"verify@{d}" for d in cfg["verify"])) +
             " | nonsense queries rejected | true queries cut |", "|" + "|".join(["---"] * (4 + len(cfg["verify"]))) + "|"]
    for split, r in v["splits"].items():
        ret = r["retrieval_t2i"]
        cells = [" / ".join(_pct(ret[name][k]) for k in (1, 5, 10))
                 for name in ["embedding", *(f"verify@{d}" for d in cfg["verify"])]]
        rej = r["nonsense_rejected"]
        lines.append(f"| {split} | " + " | ".join(cells) +
                     f" | {_pct(rej.get('all')) if rej else 'n/a'} | {_pct(r['true_queries']['cut'])} |")
    hard = v.get("hard_negatives") or {}
    if hard:
        cats = [c for c in hard if c[0].islower()]
        lines += ["", "Hard negatives decided by relevance (P(yes) of the true caption strictly above the "
                      "negative's) beside the embedding's cosine:", "",
                  "| decided by | " + " | ".join(cats) + " |", "|" + "|".join(["---"] * (len(cats) + 1)) + "|",
                  "| relevance | " + " | ".join(_pct(hard[c]["relevance"]) for c in cats) + " |",
                  "| embedding | " + " | ".join(_pct(hard[c]["embedding"]) for c in cats) + " |"]
    return lines


def _replace_between_markers(text: str, block: str, heading: str) -> str:
    start, end = text.find(CLAIMS_START), text.find(CLAIMS_END)
    if start != -1 and end > start:
        return text[: start + len(CLAIMS_START)] + "\n" + block + "\n" + text[end:]
    section = f"{heading}\n\n{CLAIMS_START}\n{block}\n{CLAIMS_END}\n"
    return (text.rstrip("\n") + "\n\n" + section) if text.strip() else section


DEMO_TAGS = ("demo", "synthetic-data", "shapes-world", "llava")


def card_eval_results(results: dict[str, Any]) -> list[Any]:
    """The headline measurements as model-index entries: QA exact match of the shipped summary tokens and of
    all visual tokens, and text->image R@1 of the shipped heads, per held-out split."""
    from ...model_card import EvalResult

    out = []
    for split, label in (("test", "seen compositions"), ("test_unseen", "unseen compositions")):
        measured = results["splits"][split]
        data = f"shapes world (f2b demo-data, seed {results['eval_seed']}), {label}"
        for form, what in (("fwd2bot", f"QA exact match, {results['num_summary_tokens']} summary tokens"),
                           ("full", "QA exact match, all visual tokens")):
            if form in measured["qa"]:
                out.append(EvalResult("visual-question-answering", data, "fwd2bot-demo-world", "exact_match",
                                      round(100 * measured["qa"][form]["exact_match"], 1), metric_name=what,
                                      dataset_split=split))
        t2i = {int(k): v for k, v in measured["retrieval"]["fwd2bot"]["t2i"].items()}
        out.append(EvalResult("text-to-image-retrieval", data, "fwd2bot-demo-world", "recall@1", round(100 * t2i[1], 1),
                              metric_name=f"text->image R@1, {measured['n_images']}-image gallery", dataset_split=split))
    return out


def write_claims_table(results: dict[str, Any], readme_path: str | os.PathLike[str] | None,
                       card_path: str | os.PathLike[str] | None, command: str | None = None) -> str:
    """Put the claims block between the markers of README.md and of the model card (appending a
    section where a file has no markers); returns the block. Other text is left as it was."""
    from ...model_card import with_front_matter

    block = render_claims(results, command or MODULE_COMMAND + " --measure-only")
    for path in (readme_path, card_path):
        if path is None:
            continue
        path = Path(path)
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        updated = _replace_between_markers(text, block, "## The demo model: Fwd2Bot's claim, measured")
        if path == (Path(card_path) if card_path is not None else None):  # the card carries the hub's metadata
            updated = with_front_matter(updated, "fwd2bot-index demo", license="mit", tags=DEMO_TAGS,
                                        eval_results=card_eval_results(results))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(updated, encoding="utf-8")
        os.replace(tmp, path)
    return block


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Measured results saved with ``--json``, with recall tables keyed by int again (JSON made them strings)."""
    def restore(value: Any) -> Any:
        if isinstance(value, dict):
            keys = list(value)
            numeric = bool(keys) and all(isinstance(k, str) and k.isdigit() for k in keys)
            return {(int(k) if numeric else k): restore(v) for k, v in value.items()}
        if isinstance(value, list):
            return [restore(v) for v in value]
        return value

    return restore(json.loads(Path(path).read_text(encoding="utf-8")))


def only_variants(results: dict[str, Any], keep: Sequence[str]) -> dict[str, Any]:
    """The results as if only the compressor variants ``keep`` had been measured (the shipped compressor,
    pooled, full and blind rows stay): one measurement of experiments and claims together renders the claims
    table exactly as a measurement of the claims variants alone would (every row is measured on its own)."""
    import copy

    out = copy.deepcopy(results)
    dropped = [n for n in out.get("variants", {}) if n not in keep]
    for name in dropped:
        del out["variants"][name]

    def wanted(form: str) -> bool:
        return not any(form == f"fwd2bot-{n}" or form.startswith(f"fwd2bot-{n}@") for n in dropped)

    for split in out["splits"].values():
        for part in ("qa", "absent_qa", "retrieval", "retrieval_small", *(k for k, _, _ in OBJECT_QUERY_KINDS), "stored_tokens"):
            if part in split:
                split[part] = {k: v for k, v in split[part].items() if wanted(k)}
    out["sugarcrepe"] = {k: v for k, v in out["sugarcrepe"].items() if wanted(k)}
    from .targets import check_targets

    out["targets"] = check_targets(out)
    return out


def record_relevance_verdict(model_dir: str | os.PathLike[str], results: dict[str, Any]) -> bool | None:
    """Write into the checkpoint whether re-ranking by its relevance helped on held-out scenes
    (``config.relevance_ranks_well``: verify@20 t2i R@1 at least the embedding's on the seen split), so the
    search page does not verify by default with a model whose P(yes) makes ranking worse. None (and nothing
    written) when verification was not measured. ``results['fingerprint']`` is refreshed to the folder's new one."""
    split = ((results.get("verification") or {}).get("splits") or {}).get("test") or {}
    recall = split.get("retrieval_t2i") or {}
    deepest = max((k for k in recall if k.startswith("verify@")), key=lambda k: int(k.split("@")[1]), default=None)
    if deepest is None or "embedding" not in recall:
        return None
    from ...model.config import Fwd2BotConfig

    def at_1(row: dict) -> float:  # recall@k keyed by k: ints as measured, strings once read back from JSON
        return float(row[1] if 1 in row else row["1"])

    verdict = bool(at_1(recall[deepest]) >= at_1(recall["embedding"]))
    config = Fwd2BotConfig.read(model_dir)
    config.relevance_ranks_well = verdict
    path = Path(model_dir) / "fwd2bot_config.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(config.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    if "fingerprint" in results:  # the config is part of what the fingerprint hashes: keep the results true
        from ...model.files import folder_fingerprint

        results["fingerprint"] = folder_fingerprint(model_dir)
    return verdict
