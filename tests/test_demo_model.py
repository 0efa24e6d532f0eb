"""The shipped demo model (issue 4): it exists, loads offline, is a trained compressor, fits in the
package, and clears a weak sanity floor on held-out scenes that a random model fails. Plus the quick
variant of the recipe, end to end (train -> export -> measure -> tables)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fwd2bot_index.model import Fwd2Bot, demo_model_path, folder_fingerprint  # noqa: E402
from fwd2bot_index.training import demo_recipe  # noqa: E402

MAX_BYTES = 25 * 2**20
N_SANITY = 50


@pytest.fixture(scope="module")
def demo():
    return Fwd2Bot.from_pretrained("demo", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """50 'test' + 50 'test_unseen' scenes from the evaluation seed, never trained on."""
    folder = tmp_path_factory.mktemp("heldout")
    demo_recipe.write_eval_world(folder, N_SANITY)
    return folder


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gallery(folder, split="test"):
    from PIL import Image

    rows = [r for r in _rows(folder / "captions.jsonl") if r["split"] == split][:N_SANITY]
    images = [Image.open(folder / r["image"]).convert("RGB") for r in rows]
    return rows, images


def test_demo_folder_is_a_small_self_contained_checkpoint():
    folder = demo_model_path()
    files = [p for p in folder.rglob("*") if p.is_file()]
    names = {p.relative_to(folder).as_posix() for p in files}
    assert {"fwd2bot_config.json", "compressor.safetensors", "README.md", "base/config.json"} <= names
    assert any(n.startswith("adapters/pass1/") for n in names) and any(n.startswith("adapters/pass2/") for n in names)
    assert sum(p.stat().st_size for p in files) < MAX_BYTES
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in files), "weights must be safetensors, no pickles"
    config = json.loads((folder / "fwd2bot_config.json").read_text())
    assert config["base_model"] == "base" and config["trained_steps"] > 0
    card = (folder / "README.md").read_text()
    assert "only knows the procedural shapes world" in card and demo_recipe.CLAIMS_START in card


def test_demo_loads_offline_as_a_trained_compressor(demo):
    assert demo.is_trained
    strategy = demo.resolve_strategy("fwd2bot")
    assert strategy.tokens == "fwd2bot" and strategy.budget == 16
    assert demo.backbone.num_image_tokens == 64  # 16 stored tokens are a real 4x squeeze
    assert demo.default_strategy.name == "fwd2bot"
    # any English encodes (byte-level BPE), and a long caption fits
    ids = demo.backbone.token_ids("Zebras grazing near the Eiffel Tower, 1889!")
    assert ids and demo.backbone.tokenizer.decode(ids) == "Zebras grazing near the Eiffel Tower, 1889!"
    assert demo.backbone.config.text_config.max_position_embeddings >= 512


def test_demo_retrieval_clears_the_sanity_floor(demo, held_out):
    rows, images = _gallery(held_out)
    image_emb = demo.encode_images(images, batch_size=25).embeddings
    text_emb = demo.encode_texts([r["captions"][0] for r in rows], batch_size=25)
    assert image_emb.shape == (N_SANITY, demo.embed_dim) and text_emb.shape == (N_SANITY, demo.embed_dim)
    top1 = (text_emb @ image_emb.T).argmax(axis=1)
    r_at_1 = float(np.mean(top1 == np.arange(N_SANITY)))
    # Floor, not target: the shipped model measures 0.92 here (0.40 on the claims table's 1,000-image gallery);
    # the model it replaced measured ~0.5, a random one 0.02
    assert r_at_1 >= 0.7, f"text->image R@1 on {N_SANITY} held-out scenes is {r_at_1:.2f} (chance 0.02)"


def test_demo_answers_from_summary_tokens_above_the_floor(demo, held_out):
    from fwd2bot_index.eval import exact_match

    rows, images = _gallery(held_out)
    rows, images = rows[:12], images[:12]
    tokens = demo.encode_images(images, batch_size=12).tokens
    assert tokens.shape == (12, 16, demo.backbone.hidden_size)
    index = {r["image"]: i for i, r in enumerate(rows)}
    qa = [q for q in _rows(held_out / "qa.jsonl") if q["image"] in index]
    answers = demo.answer_batch([tokens[index[q["image"]]] for q in qa], [q["question"] for q in qa],
                                max_new_tokens=8)
    accuracy = float(np.mean([exact_match(a, q["answer"]) for a, q in zip(answers, qa)]))
    assert len(qa) >= 80
    # Floor, not target: half of these questions are yes/no, so answering "yes" always scores ~0.25, the
    # blind template prior ~0.35 and a random model 0. The shipped model measures 0.45 here (43.5 on the
    # 4,000-question claims table).
    assert accuracy >= 0.38, f"QA exact match from stored tokens is {accuracy:.2f} on {len(qa)} questions"


@pytest.mark.slow
def test_quick_recipe_runs_end_to_end(tmp_path):
    out = tmp_path / "demo-quick"
    work = tmp_path / "work"
    report = demo_recipe.train_demo_model(out, quick=True, seed=0, device="cpu", progress=False, work_dir=work,
                                          variants=("k8", "k16-contrastive", "nested"))
    assert report["size_bytes"] < MAX_BYTES
    assert set(report["stages"]) == {"warmup", "base", "base-finish", "compressor-k16", "compressor-k8",
                                     "compressor-k16-contrastive", "compressor-nested", "heads-k16", "heads-k8",
                                     "heads-k16-contrastive", "heads-nested"}
    refit = report["stages"]["heads-k16"]  # stage 2b: the heads refitted on frozen features, into the export
    assert refit["steps"] == demo_recipe.QUICK.head_refit_steps and len(refit["loss_curve"]) >= 2
    assert "2b. Heads refitted" in (out / "README.md").read_text()
    assert report["stages"]["base"]["steps"] == demo_recipe.QUICK.base_max_steps
    assert report["stages"]["base"]["stopped_by"] in {"step budget", "floor reached"}
    finish = report["stages"]["base-finish"]  # goes on from the base's step, all visual tokens only
    assert finish["started_at_step"] == demo_recipe.QUICK.base_max_steps
    assert finish["steps"] == demo_recipe.QUICK.base_max_steps + demo_recipe.QUICK.base_finish_max_steps
    assert finish["pooled_share"] == [] and report["stages"]["base"]["pooled_share"]
    assert "1b. Base, finish: from step 6 to 9" in (out / "README.md").read_text()
    assert report["stages"]["compressor-k8"]["num_summary_tokens"] == 8
    assert report["stages"]["compressor-k8"]["threads"] == torch.get_num_threads()  # what the stage ran on
    assert report["stages"]["compressor-k16-contrastive"]["last"].get("autoregressive") is None
    # the shipped recipe trains on scene captions only (one-object phrases are an experiment), and its card
    # says nothing of phrases; a card of a compressor trained with them would (below)
    assert not any(report["stages"][f"compressor-{v}"]["object_share"] for v in ("k16", "k8", "k16-contrastive"))
    assert "name one object" not in (out / "README.md").read_text()
    assert report["stages"]["compressor-k16"]["absent_share"] == demo_recipe.QUICK.absent_share > 0
    assert report["stages"]["compressor-k16-contrastive"]["absent_share"] == 0.0  # no pass 2 trained
    assert "\"there is no square\"" in (out / "README.md").read_text()
    from fwd2bot_index.training.demo.report import _phrase_clause

    assert "each a positive of every image" in _phrase_clause(report["stages"]["compressor-k16"] | {
        "object_share": 0.3, "multi_positive": True})
    model = Fwd2Bot.from_pretrained(str(out), device="cpu")
    assert model.is_trained and model.resolve_strategy("fwd2bot").budget == demo_recipe.QUICK.num_summary_tokens
    assert model.backbone.config.vision_feature_layer == -1  # the tower's last layer is the one it trained
    assert (out / "base" / "config.json").is_file()  # self-contained
    from safetensors.torch import load_file

    shipped, refitted, joint = (load_file(str(f / "compressor.safetensors"))["text_head.weight"]
                                for f in (out, work / "heads-k16" / "model", work / "compressor-k16" / "model"))
    assert torch.equal(shipped, refitted.half()) and not torch.equal(shipped, joint.half())  # the refitted heads ship

    # the same command on the same work folder keeps every finished stage: the same checkpoint, no retraining;
    # another seed is refused
    again = demo_recipe.train_demo_model(tmp_path / "again", quick=True, seed=0, device="cpu", progress=False,
                                         work_dir=work, variants=("k8", "k16-contrastive", "nested"))
    assert again["stages"] == report["stages"]
    assert folder_fingerprint(tmp_path / "again") == folder_fingerprint(out)
    with pytest.raises(ValueError, match="another recipe or seed"):
        demo_recipe.train_demo_model(tmp_path / "other", quick=True, seed=1, device="cpu", progress=False,
                                     work_dir=work)

    variants = {v: str(work / f"heads-{v}" / "model") for v in ("k8", "k16-contrastive", "nested")}
    results = demo_recipe.measure_demo_claims(out, data_dir=tmp_path / "eval", quick=True, device="cpu",
                                              variants=variants)
    for split in demo_recipe.EVAL_SPLITS:
        measured = results["splits"][split]
        # the contrastive-only compressor never trained pass 2: it is measured on retrieval only
        nested = {f"fwd2bot-nested@{k}" for k in (4, 8, 16)}
        assert set(measured["qa"]) == {"blind", "fwd2bot", "fwd2bot-k8", "pool@8", "pool@16", "full",
                                       "fwd2bot-nested"} | nested
        assert measured["stored_tokens"] == {"fwd2bot": 16, "fwd2bot-k8": 8, "fwd2bot-k16-contrastive": 16,
                                             "pool@8": 8, "pool@16": 16, "full": 64, "fwd2bot-nested": 32,
                                             "fwd2bot-nested@4": 4, "fwd2bot-nested@8": 8, "fwd2bot-nested@16": 16}
        assert set(measured["retrieval"]) == {"prompt", "fwd2bot", "fwd2bot-k8", "fwd2bot-k16-contrastive",
                                              "fwd2bot-nested"} | nested
        for recall in measured["retrieval"].values():
            assert 0.0 <= recall["t2i"][1] <= recall["t2i"][5] <= recall["t2i"][10] <= 1.0
        # "a blue square": every compressor's own embedding, many relevant images per query
        assert set(measured["object_queries"]) == {"fwd2bot", "fwd2bot-k8", "fwd2bot-k16-contrastive", "fwd2bot-nested"}
        assert measured["n_object_queries"] > 0 and 0.0 < measured["object_query_base_rate"] < 1.0
        for kind in ("object_queries", "placed_object_queries"):  # with its place: "... at the bottom right"
            assert set(measured[kind]) == set(measured["object_queries"]) and measured[f"n_{kind}"] > 0
            for precision in measured[kind].values():
                assert set(precision) == {"p@1", "p@5", "map"} and all(0.0 <= v <= 1.0 for v in precision.values())
        assert 0.0 < measured["placed_object_query_base_rate"] < measured["object_query_base_rate"]
        # questions about a missing object: every answering form, two per QA image, denials of present objects
        assert set(measured["absent_qa"]) == set(measured["qa"])
        for scores in measured["absent_qa"].values():
            assert scores["n"] == 2 * measured["n_qa_images"] and 0.0 <= scores["denies_present"] <= 1.0
            assert sum(scores["n_by_template"].values()) == scores["n"]
        assert measured["absent_qa"]["blind"]["exact_match"] == 0.0  # a template's prior never says "there is no"
    names = [t["target"] for t in results["targets"]]
    assert any("blind" in n for n in names) and any("swap_att" in n for n in names)
    assert set(results["sugarcrepe"]) == {"fwd2bot", "fwd2bot-k8", "fwd2bot-k16-contrastive", "prompt",
                                          "fwd2bot-nested"} | {f"fwd2bot-nested@{k}" for k in (4, 8, 16)}
    assert set(results["sugarcrepe"]["fwd2bot"]["accuracy"]) >= {"swap_att", "replace_rel", "Swap"}

    readme = tmp_path / "README.md"
    readme.write_text(f"# project\n\nintro\n\n{demo_recipe.CLAIMS_START}\nold table\n{demo_recipe.CLAIMS_END}\n\nmore\n")
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers here\n")
    demo_recipe.write_claims_table(results, readme, plain)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# project\n\nintro\n") and text.endswith("\n\nmore\n")
    assert "| Fwd2Bot summary tokens, K=16 (shipped) | 16 |" in text and "| blind: " in text
    assert "contrastive loss only (ablation)" in text and "pool@16" in text
    assert "| Fwd2Bot nested (one compressor), first 4 tokens | 4 |" in text
    assert "Object queries:" in text and "| fwd2bot-k8 | " in text.split("Object queries:")[1]
    assert "a <colour> <shape> at the <position>" in text.split("Object queries:")[2]
    absent = text.split("Questions about something the image does not hold")[1].split("SugarCrepe")[0]
    assert "| fwd2bot-k8 | " in absent and "| full | " in absent and "denies a present object" in absent
    assert set(results["verification"]["splits"]) == set(demo_recipe.EVAL_SPLITS) and "| verify@20 t2i R@1/5/10 |" in \
        text.replace("| embedding t2i R@1/5/10 ", "")
    assert any("verify@20 adds" in n for n in names) and any("nonsense rejection" in n for n in names)
    appended = plain.read_text()  # the card: hub metadata in front, its own text kept, the block appended
    assert appended.startswith("---\nlicense: mit\n") and "\n---\n\n# no markers here\n" in appended
    assert demo_recipe.CLAIMS_END in appended
    demo_recipe.write_claims_table(results, readme, plain)  # idempotent: markers found, replaced again
    assert readme.read_text() == text and plain.read_text() == appended

    # saved with --json and rendered again (--from-json): the same tables; keeping only some variants drops
    # exactly their rows, as if only those had been measured
    from fwd2bot_index.training.demo.report import only_variants, read_results, render_claims

    saved = tmp_path / "claims.json"
    saved.write_text(json.dumps(results, default=str))
    assert render_claims(read_results(saved)) == render_claims(results)
    kept = only_variants(read_results(saved), ["k8"])
    block = render_claims(kept)
    assert "fwd2bot-k8" in block and "fwd2bot-nested" not in block and "contrastive loss only" not in block
    assert set(kept["splits"]["test"]["absent_qa"]) == set(kept["splits"]["test"]["qa"])
    older = read_results(saved)  # measured before absent questions existed: the table renders without them
    for split in older["splits"].values():
        del split["absent_qa"]
    assert "does not hold" not in render_claims(older) and "Object queries:" in render_claims(older)
    assert "| Fwd2Bot summary tokens, K=16 (shipped) | 16 |" in block
    assert set(kept["sugarcrepe"]) == {"fwd2bot", "fwd2bot-k8", "prompt"}
    assert not any("swap_obj (vs contrastive-only)" in t["target"] for t in kept["targets"])

    # the nested compressor exported beside the exported demo model, sharing its base (as demo-nested ships)
    from fwd2bot_index.training.demo.nested_export import export_sharing_base, nested_card

    export_sharing_base(work / "compressor-nested" / "model", tmp_path / "nested-out", base=f"../{out.name}/base")
    shared = Fwd2Bot.from_pretrained(str(tmp_path / "nested-out"), device="cpu")
    assert shared.config.nested_budgets == [4, 8, 16, 32] and not (tmp_path / "nested-out" / "base").exists()
    card = nested_card(results)
    assert "| 4 | " in card and "| 16 | " in card and "--model demo-nested --tokens 8" in card
    row8 = next(line for line in card.splitlines() if line.startswith("| 8 | "))
    assert not row8.endswith("| - | - |")  # beside the separately trained K=8
    assert "Questions about something the image does not hold" in card and "the demo model " in card


def test_claims_table_replaces_only_between_markers():
    block = "NEW"
    text = f"a\n{demo_recipe.CLAIMS_START}\nold\n{demo_recipe.CLAIMS_END}\nb\n"
    out = demo_recipe._replace_between_markers(text, block, "## heading")
    assert out == f"a\n{demo_recipe.CLAIMS_START}\nNEW\n{demo_recipe.CLAIMS_END}\nb\n"
    assert demo_recipe._replace_between_markers("", block, "## h").startswith("## h\n\n")


def test_hard_negative_loss_prefers_the_true_caption():
    import torch

    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    texts = ["a", "b", "c"]
    scale = torch.tensor(np.log(20.0))
    aligned = demo_recipe.info_nce_with_negatives(image, image.clone(), -image[:1], scale, texts, ["not a"])
    confused = demo_recipe.info_nce_with_negatives(image, image.clone(), image[:1].clone(), scale, texts, ["not a"])
    assert aligned < confused  # a negative that looks like the image is penalised
    # a "negative" whose text is the row's own caption is masked, not counted against it
    masked = demo_recipe.info_nce_with_negatives(image, image.clone(), image[:1].clone(), scale, texts, ["a"])
    assert masked < confused


def test_a_caption_true_of_another_image_is_not_its_negative():
    """"a blue square" of image 1 is true of image 0 too: with ``also_true`` that pair leaves the loss in
    both directions, so their similarity (moved alone, through a dimension only they use) changes nothing."""
    import torch

    torch.manual_seed(1)
    image, text = torch.randn(3, 8), torch.randn(3, 8)
    image[:, 7], text[:, 7] = 0.0, 0.0
    image[0, 7] = 1.0  # only image 0 and caption 1 use dimension 7: it moves sim(image 0, caption 1) alone
    texts, scale = ["x", "a blue square", "z"], torch.tensor(0.0)
    also = torch.zeros(3, 3, dtype=torch.bool)
    also[0, 1] = True

    def losses(**kw):
        out = []
        for similarity in (0.0, 4.0):
            moved = text.clone()
            moved[1, 7] = similarity
            out.append(float(demo_recipe.info_nce_with_negatives(image, moved, None, scale, texts, **kw)))
        return out

    plain, masked = losses(), losses(also_true=also)
    assert plain[1] > plain[0] + 0.1  # unmasked, looking like another image's caption costs
    assert masked[0] == pytest.approx(masked[1], abs=1e-6)  # masked, it is not a negative at all
    both = losses(also_true=also, multi_positive=True)
    assert both[1] < both[0] - 0.1  # as a positive, looking like it is rewarded
    # with nothing else true, the multi-positive loss is plain InfoNCE, hard negatives included
    negative = torch.randn(1, 8)
    plain_one = demo_recipe.info_nce_with_negatives(image, text, negative, scale, texts, ["not x"])
    multi_one = demo_recipe.info_nce_with_negatives(image, text, negative, scale, texts, ["not x"], multi_positive=True)
    assert float(multi_one) == pytest.approx(float(plain_one), rel=1e-6)


def test_cell_weights_cover_the_grid():
    w = demo_recipe.cell_weights(64, 8)
    assert w.shape == (9, 64)
    assert np.allclose(w.sum(dim=1).numpy(), 1.0)
    assert w[0, 0] == w[0].max() and w[8, 63] == w[8].max()  # corners belong to the corner cells


def test_demo_card_carries_parseable_hub_metadata():
    """The shipped card starts with Hugging Face model-card YAML whose eval results are the measured claims."""
    import yaml

    card = (demo_model_path() / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n")
    meta = yaml.safe_load(card[4:card.index("\n---\n", 4)])
    assert meta["license"] == "mit" and meta["library_name"] == "fwd2bot-index" and "demo" in meta["tags"]
    results = meta["model-index"][0]["results"]
    assert {r["task"]["type"] for r in results} == {"visual-question-answering", "text-to-image-retrieval"}
    assert all(0 <= r["metrics"][0]["value"] <= 100 for r in results)


def test_experimental_variants_are_valid_settings_and_their_rows_say_which():
    from fwd2bot_index.training import TrainConfig
    from fwd2bot_index.training.demo.report import CLAIMS_VARIANTS, _rows, _variant_list

    for name, spec in demo_recipe.VARIANTS.items():  # every variant's knobs are settings the trainer accepts
        TrainConfig(model="m", data=["d"], num_summary_tokens=spec["k"], nested=list(spec.get("nested", ())) or None,
                    autoregressive_weight=spec["ar"], distill_weight=4.0 * spec.get("distill", 1.0),
                    distill_fade_from=spec.get("distill_fade_from", 1.0),
                    distill_layout=spec.get("distill_layout", "row-major"),
                    image_readout=spec.get("image_readout", "mean"), text_readout=spec.get("text_readout", "last")).validate()
    assert set(CLAIMS_VARIANTS) < set(demo_recipe.VARIANTS)
    results = {"num_summary_tokens": 16, "budgets": [16], "visual_tokens": 64,
               "variants": {"k32": {"num_summary_tokens": 32, "nested_budgets": []},
                            "nested-c2f": {"num_summary_tokens": 32, "nested_budgets": [4, 32]}}}
    labels = {name: label for label, name, _, _ in _rows(results)}
    assert labels["fwd2bot-k32"] == "Fwd2Bot summary tokens, K=32"
    assert labels["fwd2bot-nested-c2f"].endswith("all 32 tokens (nested-c2f)")
    assert labels["fwd2bot-nested-c2f@4"].endswith("first 4 tokens (nested-c2f)")
    stages = {"k8": {"absent_share": 0.5}, "k16": {"absent_share": 0.5},
              "k16-contrastive": {"autoregressive_weight": 0.0, "absent_share": 0.0}, "k16-fade": {"absent_share": 0.5}}
    card = _variant_list(stages)  # the card says what each one changes
    assert card.startswith("k16, k16-contrastive (no autoregressive loss and no distillation), k16-fade (the ")
    assert card.endswith(", k8")
    # a compressor kept from before the questions about missing objects says so (its stage has no such share)
    card = _variant_list({**stages, "nested": {}, "k16-no-absent": {"absent_share": 0.0}})
    assert "nested (no questions about missing objects)" in card
    assert "k16-no-absent (no questions about missing objects)," in card
    # ... and one kept from a shorter recipe says how long it trained; a variant whose length is its change does not
    card = _variant_list({"k16": {"steps": 1400}, "k8": {"steps": 700}, "k32": {"steps": 1400},
                          "k16-short": {"steps": 700}})
    assert card == "k16, k16-short (half the steps), k32, k8 (700 steps)"
    # ... and one kept from a recipe with other heads says which readouts and negatives it trained with
    mixer = {"image_readout": "mixer", "text_readout": "mixer", "hard_categories": ["swap_att", "swap_obj"]}
    card = _variant_list({"k16": mixer, "k8": {}, "k32": mixer})
    assert card == "k16, k32, k8 (mean / last readouts, all seven kinds of hard negatives)"
    assert "k8 (mixer / mixer readouts, swap_att and swap_obj only hard negatives)" in _variant_list({"k16": {}, "k8": mixer})
