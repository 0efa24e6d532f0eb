"""The demo recipe's parts: fresh-scene streams, the blind prior, branched pass-2 sequences, the base
stage's plateau schedule and stop rule, and stages that continue exactly where a killed run stopped."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fwd2bot_index.synthetic.generate import in_test_bucket  # noqa: E402
from fwd2bot_index.synthetic.world import HELD_OUT_PAIRS  # noqa: E402
from fwd2bot_index.training.demo import QUICK, blind_prior, question_template  # noqa: E402
from fwd2bot_index.training.demo.base import train_base  # noqa: E402
from fwd2bot_index.training.demo.recipe import build_base  # noqa: E402
from fwd2bot_index.training.demo.scenes import train_scenes  # noqa: E402
from fwd2bot_index.training.demo.turns import branch_mask, branched_turn_loss, scene_turns  # noqa: E402
from fwd2bot_index.training.schedule import PerTypeStopRule, PlateauLR  # noqa: E402


def test_fresh_training_scenes_are_seeded_and_never_evaluation_scenes():
    a, b = train_scenes(0, "base", 5, 40), train_scenes(0, "base", 5, 40)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.caption for s in a] != [s.caption for s in train_scenes(0, "base", 6, 40)]
    for scene in a + train_scenes(0, "warmup", 5, 40):
        assert not in_test_bucket(scene.caption) and not ({o.pair for o in scene.objects} & set(HELD_OUT_PAIRS))


def test_question_templates_and_the_blind_prior():
    assert question_template("what color is the object at the top left?") == "what color is the object at the _?"
    assert question_template("how many red objects are there?") == "how many _ objects are there?"
    assert question_template("is the red circle left of the blue star?") == "is the _ _ left of the _ _?"
    prior = blind_prior(200)
    assert prior["how many objects are there?"] in {"2", "3", "4"}
    assert set(prior.values()) >= {"yes", "no"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "base-init"
    hf, processor = build_base(QUICK, 0, torch.device("cpu"))
    hf.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_branch_mask_lets_a_turn_see_the_prefix_and_itself_only():
    segments = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    allowed = branch_mask(segments)[0, 0]
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]
    assert allowed[5].tolist() == [True, True, False, False, True, True, False]  # never branch 1
    assert allowed[1].tolist() == [True, True, False, False, False, False, False]  # causal in the prefix
    assert allowed[6].tolist() == [False] * 6 + [True]  # padding sees itself only (no empty softmax row)


def test_branched_turns_score_each_answer_as_a_single_question_would(tiny_base):
    from fwd2bot_index.model import Fwd2Bot

    model = Fwd2Bot.from_pretrained(str(tiny_base), device="cpu", dtype="fp32")
    visual = torch.randn(2, model.backbone.num_image_tokens, model.backbone.hidden_size) * 0.02
    qa = [("what color is the circle?", "red"), ("how many objects are there?", "3")]
    rng = np.random.default_rng(0)
    turns = scene_turns(["a red circle"], qa, rng, "Describe the image.", caption_share=1.0, caption_weight=0.5,
                        weights=[2.0, 1.0])
    assert [t[1] for t in turns] == ["red", "3", "a red circle"]
    assert [t[2] for t in turns] == [2.0, 1.0, 0.5]
    eos = model.backbone.tokenizer.eos_token_id
    n_red = len(model.backbone.token_ids(" red")) + 1
    n_three = len(model.backbone.token_ids(" 3")) + 1
    red = model.pass2_loss(visual[:1], [qa[0][0]], ["red"], kind="full")
    three = model.pass2_loss(visual[:1], [qa[1][0]], ["3"], kind="full")
    both = branched_turn_loss(model, [visual[0]], [[(qa[0][0], "red", 2.0), (qa[1][0], "3", 1.0)]], "full")
    expected = (2.0 * red * n_red + three * n_three) / (2.0 * n_red + n_three)
    assert eos is not None and torch.allclose(both, expected, atol=1e-5)
    # a later branch cannot see an earlier one: the first answer's loss does not change with a neighbour
    alone = branched_turn_loss(model, [visual[0]], [[(qa[0][0], "red", 1.0)]], "full")
    with_zero = branched_turn_loss(model, [visual[0]], [[(qa[1][0], "3", 0.0), (qa[0][0], "red", 1.0)]], "full")
    assert torch.allclose(alone, with_zero, atol=1e-5) and torch.allclose(alone, red, atol=1e-5)
    # items with different stored lengths share a batch (pooled forms) and keep their own losses
    mixed = branched_turn_loss(model, [visual[0], visual[1, :16]], [[(qa[0][0], "red", 1.0)]] * 2, "full")
    short = model.pass2_loss(visual[1:2, :16], [qa[0][0]], ["red"], kind="full")
    assert torch.allclose(mixed, (red + short) / 2, atol=1e-5)


def test_plateau_schedule_keeps_the_rate_while_the_score_rises_and_cuts_it_on_a_plateau():
    schedule = PlateauLR(warmup=4, patience=2, factor=0.5, min_ratio=0.25)
    assert [schedule.multiplier(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert not any(schedule.observe(x) for x in (0.5, 0.6, 0.7))  # rising: constant rate
    assert schedule.multiplier(100) == 1.0
    assert [schedule.observe(x) for x in (0.7, 0.702)] == [False, True]  # two checks without a rise: halve
    assert schedule.multiplier(100) == 0.5 and schedule.cuts == 1
    assert not schedule.observe(0.8)  # crossing the plateau resets the patience
    assert [schedule.observe(0.8) for _ in range(2)] == [False, True] and schedule.multiplier(0) == 0.25 / 4
    assert not schedule.exhausted
    assert [schedule.observe(0.8) for _ in range(2)] == [False, False] and schedule.exhausted  # floor: no more cuts
    again = PlateauLR(warmup=4, patience=2, factor=0.5, min_ratio=0.25)
    again.load_state_dict(schedule.state_dict())
    assert again == schedule


def test_stop_rule_waits_for_every_type_not_the_mean():
    rule = PerTypeStopRule(floor=0.9, types=("color", "relation"), max_steps=100, max_seconds=60)
    assert rule.reason({"color": 1.0, "relation": 0.5, "qa": 0.95}, 10, 1.0) is None  # the mean is no excuse
    assert rule.weakest({"color": 1.0, "relation": 0.5}) == ("relation", 0.5)
    assert rule.reason({"color": 0.95, "relation": 0.9}, 10, 1.0) == "floor reached"
    assert rule.reason(None, 100, 1.0) == "step budget"
    assert rule.reason(None, 10, 61.0) == "time budget"
    tired = PlateauLR(patience=1, min_ratio=1.0)
    tired.observe(0.5), tired.observe(0.5)
    assert rule.reason({"color": 0.5, "relation": 0.5}, 10, 1.0, tired) == "plateau"
    with pytest.raises(ValueError, match="none of the tracked types"):
        rule.weakest({"qa": 0.5})


def test_base_stage_resumes_bit_exactly_after_an_interruption(tiny_base, tmp_path):
    from fwd2bot_index.synthetic.qa import QA_TYPES

    def args():  # the schedule is stateful: each run gets its own, as the recipe builds one per stage
        return dict(seed=0, batch=3, lr=1e-3, check_every=2, caption_share=0.5, caption_weight=0.5, n_monitor=2,
                    schedule=PlateauLR(warmup=2, patience=1), stop=PerTypeStopRule(types=QA_TYPES, max_steps=6),
                    type_weights={"relation": 2.0}, llm_init_std=0.088)

    whole = train_base(tiny_base, tmp_path / "whole", say=lambda m: None, **args())

    class Killed(Exception):
        pass

    def die_after_first_checkpoint(message: str) -> None:
        if message.startswith("base step 4:"):
            raise Killed

    with pytest.raises(Killed):
        train_base(tiny_base, tmp_path / "cut", say=die_after_first_checkpoint, **args())
    said = []
    resumed = train_base(tiny_base, tmp_path / "cut", say=said.append, **args())
    assert any("resuming at step 4" in m for m in said)
    assert resumed["steps"] == whole["steps"] == 6 and whole["stopped_by"] == "step budget"
    assert [r["step"] for r in whole["history"]] == [2, 4, 6]
    assert all({"qa", "relation", "existence", "lr"} <= set(r) for r in whole["history"])  # per-type curves
    curves = [json.loads(line) for line in (tmp_path / "cut" / "curves.jsonl").read_text().splitlines()]
    assert curves == resumed["history"]  # the curve file holds each check once, also across the kill
    assert resumed["history"] == whole["history"]  # the logged loss and the monitor too, not only the weights
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_base_finish_restarts_the_rate_and_keeps_the_runs_weights_optimizer_step_and_curve(tiny_base, tmp_path):
    from fwd2bot_index.synthetic.qa import QA_TYPES
    from fwd2bot_index.training.demo.base import restart_state
    from fwd2bot_index.training.demo.stage_state import load_stage_state, save_stage_state

    def args(max_steps):
        return dict(seed=0, batch=3, lr=1e-3, check_every=2, caption_share=0.5, caption_weight=0.5, n_monitor=2,
                    schedule=PlateauLR(warmup=2, patience=1), stop=PerTypeStopRule(types=QA_TYPES, max_steps=max_steps),
                    type_weights={"relation": 2.0}, llm_init_std=0.088)

    run = train_base(tiny_base, tmp_path / "run", say=lambda m: None, **args(6))
    before = load_stage_state(tmp_path / "run" / "state.pt")
    before["schedule_scale"] = 0.25  # as if the run had cut its rate twice
    save_stage_state(tmp_path / "run" / "state.pt", {k: v for k, v in before.items() if k != "history"},
                     before["history"])
    restart_state(tmp_path / "run", tmp_path / "finish")
    started = load_stage_state(tmp_path / "finish" / "state.pt")
    assert started["step"] == 6 and started["schedule_scale"] == 1.0 and started["schedule_cuts"] == 0
    assert started["history"] == run["history"]
    assert all(torch.equal(started["model"][k], before["model"][k]) for k in before["model"])
    restart_state(tmp_path / "run", tmp_path / "finish")  # a rerun keeps the finish's own state
    restart_state(tmp_path / "run", tmp_path / "kept", fresh_rate=False)  # the experiment's plain continuation
    assert load_stage_state(tmp_path / "kept" / "state.pt")["schedule_scale"] == 0.25
    said = []
    finish = train_base(tmp_path / "run" / "model", tmp_path / "finish", say=said.append,
                        **(args(10) | {"llm_init_std": None}), pooled_share=())
    assert any("resuming at step 6" in m for m in said)
    assert finish["steps"] == 10 and finish["pooled_share"] == []
    assert [r["step"] for r in finish["history"]] == [2, 4, 6, 8, 10]
    assert finish["history"][3]["lr"] == pytest.approx(1e-3)  # the full rate again at step 8
    with pytest.raises(FileNotFoundError, match="not a base run"):
        restart_state(tmp_path / "nothing", tmp_path / "other")


def test_verify_turns_ask_verified_searchs_own_question():
    from fwd2bot_index.model.config import VERIFY_PROMPT
    from fwd2bot_index.model.relevance import verify_question
    from fwd2bot_index.training.demo.compressor import verify_turns

    turns = verify_turns(VERIFY_PROMPT, "a red circle above a blue star.", "a blue circle above a red star")
    assert turns == [(verify_question(VERIFY_PROMPT, "a red circle above a blue star."), "yes", 1.0),
                     ("is there a blue circle above a red star?", "no", 1.0)]


@pytest.mark.parametrize("argv, said", [
    (["--export-nested", "nested-c2f"], "needs --from-json"),  # was silently ignored
    (["--export-nested", "nested-c2f", "--from-json", "r.json"], "needs --from-json"),  # no --work-dir
    (["--export-nested", "k8", "--from-json", "r.json", "--work-dir", "w"], "k8: not a nested compressor"),
    (["--export-nested", "nope", "--from-json", "r.json", "--work-dir", "w"], "nope: not a nested compressor"),
])
def test_export_nested_is_refused_unless_it_can_export_a_nested_compressor(argv, said, capsys):
    """A plain variant would overwrite the shipped demo-nested with a model that cannot take --tokens; the
    refusal comes from the parser, before any results file is read or folder written."""
    from fwd2bot_index.training import demo_recipe

    with pytest.raises(SystemExit) as stop:
        demo_recipe.main(argv)
    assert stop.value.code == 2 and said in capsys.readouterr().err


def test_object_queries_name_every_composition_and_exactly_the_images_holding_it(tmp_path):
    """The relevance behind the claims' object-query row is read from the scenes, not guessed."""
    from fwd2bot_index.synthetic import write_demo_data
    from fwd2bot_index.training.demo.measure import object_queries

    write_demo_data(tmp_path, n=24, seed=3, image_size=32)
    rows = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    paths = [tmp_path / r["image"] for r in rows[:10]]
    queries, relevant = object_queries(tmp_path, paths)
    held = [{(o["color"], o["shape"]) for o in r["scene"]["objects"]} for r in rows[:10]]
    assert relevant.shape == (len(queries), 10) and relevant.any(axis=1).all()
    assert len(queries) == len(set().union(*held))  # every composition in these images, none other
    for query, row in zip(queries, relevant):
        _, color, shape = query.split(" ")
        assert list(row) == [(color, shape) in h for h in held]

    # "a blue square at the bottom right": relevant exactly where that object sits in that cell
    from fwd2bot_index.synthetic import POSITIONS

    placed_queries, placed = object_queries(tmp_path, paths, placed=True)
    at = [{(o["color"], o["shape"], POSITIONS[o["cell"]]) for o in r["scene"]["objects"]} for r in rows[:10]]
    assert len(placed_queries) == len(set().union(*at)) > len(queries) and placed.any(axis=1).all()
    for query, row in zip(placed_queries, placed):
        _, color, shape, _at, _the, *where = query.split(" ")
        assert list(row) == [(color, shape, " ".join(where)) in h for h in at]


def _training_world(tmp_path, model_dir, n: int, seed: int, batch: int):
    """A small demo-data training world in ``tmp_path / 'd'`` and a one-step compressor config over it."""
    from fwd2bot_index.synthetic import write_demo_data
    from fwd2bot_index.training import TrainConfig

    write_demo_data(tmp_path / "d", n=n, seed=seed, image_size=32, split_fractions=(0.9, 0.1, 0.0),
                    sugarcrepe_splits=())
    return TrainConfig(model=str(model_dir), data=[str(tmp_path / "d")], output_dir=str(tmp_path / "out"),
                       objective="fwd2bot", num_summary_tokens=4, embed_dim=32, lora_r=8, batch_size=batch,
                       max_steps=1, eval_split="none", seed=0, device="cpu", dtype="fp32")


def test_object_captions_name_an_object_of_their_image_and_are_masked_where_true(tmp_path, tiny_llava_dir):
    """k16-objects' batches: with object_share 1 every contrastive caption is "a <colour> <shape>" of an
    object its image holds, and the loss mask marks exactly the other images that hold it too."""
    from fwd2bot_index.training.demo.compressor import (HardNegativeTrainer, hard_negative_pairs, object_query,
                                                        scene_objects)

    config = _training_world(tmp_path, tiny_llava_dir, n=40, seed=5, batch=12)
    objects = scene_objects(tmp_path / "d")
    trainer = HardNegativeTrainer(config, hard_negative_pairs(tmp_path / "d"), 0.5, objects=objects,
                                  object_share=1.0, progress=False)
    batch = trainer.next_batch()
    held = [{object_query(o) for o in objects[s]} for s in trainer.batch_sources]
    assert all(caption in names for caption, names in zip(batch.captions, held))
    expected = [[caption in names for caption in batch.captions] for names in held]
    assert trainer._object_matches(trainer.batch_sources, batch.captions).tolist() == expected and any(expected[i][j] for i in range(12) for j in range(12) if i != j)
    assert torch.isfinite(trainer.batch_losses(batch)["contrastive"])
    trainer.multi_positive = True  # k16-objects-mp: the same batch, those pairs as positives
    assert torch.isfinite(trainer.batch_losses(batch)["contrastive"])
    with pytest.raises(ValueError, match="scene_objects"):
        HardNegativeTrainer(config, {}, 0.5, object_share=0.3, progress=False)

    # k16-placed: objects with their place; some phrases say where ("... at the bottom right"), the rest only
    # what, and an image holding the object elsewhere is no match of a placed phrase
    placed = scene_objects(tmp_path / "d", placed=True)
    trainer = HardNegativeTrainer(config, hard_negative_pairs(tmp_path / "d"), 0.5, objects=placed, object_share=1.0,
                                  multi_positive=True, placed_share=0.5, progress=False)
    batch = trainer.next_batch()
    at = [{object_query(o) for o in placed[s]} for s in trainer.batch_sources]
    short = [{object_query(o[:2]) for o in placed[s]} for s in trainer.batch_sources]
    assert all(c in a or c in b for c, a, b in zip(batch.captions, at, short))
    assert any(" at the " in c for c in batch.captions) and any(" at the " not in c for c in batch.captions)
    expected = [[c in a or c in b for c in batch.captions] for a, b in zip(at, short)]
    assert trainer._object_matches(trainer.batch_sources, batch.captions).tolist() == expected
    assert torch.isfinite(trainer.batch_losses(batch)["contrastive"])


def test_absent_referent_questions_name_only_what_the_scene_lacks():
    """"what color is the square?" is asked only of scenes without a square, answered "there is no square"."""
    from fwd2bot_index.synthetic import generate_scenes
    from fwd2bot_index.synthetic.qa import ABSENT_TEMPLATES, absent_question, absent_questions

    scenes = generate_scenes(60, seed=4, split="train")
    seen_kinds = set()
    for scene in scenes:
        shapes, colors = {o.shape for o in scene.objects}, {o.color for o in scene.objects}
        cells, pairs = {o.position for o in scene.objects}, {o.pair for o in scene.objects}
        rng = np.random.default_rng(0)
        for q in [absent_question(scene, rng) for _ in range(6)] + absent_questions(scene):
            seen_kinds.add(q["template"])
            assert q["type"] == "absent" and q["answer"].startswith("there is no ")
            referent = q["answer"][len("there is no "):]
            if q["template"] == "color_of_shape":
                assert referent not in shapes and q["question"] == f"what color is the {referent}?"
            elif q["template"] == "shape_of_color":
                assert referent.removesuffix(" object") not in colors
            elif q["template"] in ("color_at_cell", "shape_at_cell"):
                assert referent.removeprefix("object at the ") not in cells
            else:
                pair = tuple(referent.split(" "))
                assert pair not in pairs and pair not in HELD_OUT_PAIRS  # a training scene: no held-out pair
        two = absent_questions(scene)
        assert two == absent_questions(scene) and len({q["template"] for q in two}) == 2  # stable, two templates
    assert seen_kinds == set(ABSENT_TEMPLATES)


def test_absent_questions_join_a_share_of_the_pass2_turns(tmp_path, tiny_llava_dir):
    """absent_share 1: every image's turns end with one question about something its scene lacks."""
    from fwd2bot_index.training.demo.compressor import HardNegativeTrainer, hard_negative_pairs, scenes_by_image

    config = _training_world(tmp_path, tiny_llava_dir, n=30, seed=6, batch=8)
    scenes = scenes_by_image(tmp_path / "d")
    trainer = HardNegativeTrainer(config, hard_negative_pairs(tmp_path / "d"), 0.5, scenes=scenes, absent_share=1.0,
                                  progress=False)
    batch = trainer.next_batch()
    for source, turns in zip(trainer.batch_sources, trainer._turns):
        question, answer, _ = turns[-1]
        assert answer.startswith("there is no ")
        assert sum(t[1].startswith("there is no ") for t in turns) == 1
        held = {o.shape for o in scenes[source].objects} | {o.color for o in scenes[source].objects}
        assert not (question.startswith("what color is the ") and " at the " not in question
                    and question.removeprefix("what color is the ").rstrip("?") in held)
    assert torch.isfinite(trainer.batch_losses(batch)["autoregressive"])
    # share 0 (or no scenes): exactly the turns of the recipe before these questions, same draws
    plain = HardNegativeTrainer(config, hard_negative_pairs(tmp_path / "d"), 0.5, progress=False)
    plain.next_batch()
    assert not any(t[1].startswith("there is no ") for turns in plain._turns for t in turns)
    zero = HardNegativeTrainer(config, hard_negative_pairs(tmp_path / "d"), 0.5, scenes=scenes, absent_share=0.0,
                               progress=False)
    zero.next_batch()
    assert zero._turns == plain._turns and [t[:-1] for t in trainer._turns] == plain._turns
    with pytest.raises(ValueError, match="scenes_by_image"):
        HardNegativeTrainer(config, {}, 0.5, absent_share=0.5, progress=False)
    with pytest.raises(ValueError, match="scenes_by_image"):  # scenes of another folder: no image has one
        HardNegativeTrainer(config, {}, 0.5, scenes={"elsewhere.png": scenes[next(iter(scenes))]}, absent_share=0.5,
                            progress=False)


def test_absent_scores_count_right_answers_and_denials_of_present_objects(tmp_path):
    from fwd2bot_index.synthetic import write_demo_data
    from fwd2bot_index.training.demo.measure import absent_records, absent_scores

    write_demo_data(tmp_path, n=12, seed=2, image_size=32)
    rows = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    paths = [tmp_path / r["image"] for r in rows[:5]]
    records = absent_records(tmp_path, paths)
    assert len(records) == 10 and [r["owner"] for r in records] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    answers = [r["answer"] for r in records]
    answers[0] = "red"  # one colour named for a missing shape
    answers[1] = "there is no blue blob"  # wrong, but it did say the thing is missing
    world = [{"type": "color", "answer": "red"}, {"type": "existence", "answer": "yes"},
             {"type": "existence", "answer": "no"}, {"type": "count", "answer": "0"}, {"type": "count", "answer": "2"}]
    said = ["red", "there is no red circle", "there is no red circle", "there is no circle", "2"]
    scores = absent_scores(answers, records, (said, world))
    assert scores["n"] == 10 and scores["exact_match"] == pytest.approx(0.8)
    assert scores["misses_answered_as_present"] == pytest.approx(0.5)
    # "there is no ..." for a missing thing (existence "no", count "0") is no denial; for a present one it is
    assert scores["n_present"] == 3 and scores["denies_present"] == pytest.approx(1 / 3)
    assert sum(scores["n_by_template"].values()) == 10
    assert scores["by_template"][records[0]["template"]] < 1.0


def test_mixer_variant_trains_its_readouts_on_swap_kind_negatives_only(tmp_path, tiny_llava_dir):
    """k16-mixer's batches: every hard negative is a swap of its caption (same words, other binding), and the
    contrastive loss reaches the two token mixers, which a fresh compressor with these readouts holds."""
    import json
    from dataclasses import replace

    from fwd2bot_index.training.demo.compressor import MIXER_READOUTS, VARIANTS, HardNegativeTrainer, hard_negative_pairs

    assert VARIANTS["k16-mixer"]["ar"] > 0 and VARIANTS["k16-mixer-contrastive"]["ar"] == 0
    config = replace(_training_world(tmp_path, tiny_llava_dir, n=40, seed=7, batch=12),
                     image_readout="mixer", text_readout="mixer")
    pairs = hard_negative_pairs(tmp_path / "d", MIXER_READOUTS["hard_categories"])
    rows = [json.loads(line) for line in (tmp_path / "d" / "hard_negatives.jsonl").read_text().splitlines()]
    swaps = {(r["caption"], r["negative_caption"]) for r in rows if r["category"] in ("swap_att", "swap_obj")}
    assert pairs and {p for ps in pairs.values() for p in ps} == {
        (r["caption"], r["negative_caption"]) for r in rows if r["split"] == "train"} & swaps
    trainer = HardNegativeTrainer(config, pairs, 1.0, progress=False)
    batch = trainer.next_batch()
    negatives = [n for n in trainer._negatives if n is not None]
    assert negatives and all(sorted(c.replace(",", " ").split()) == sorted(n.replace(",", " ").split())
                             for c, n in zip(batch.captions, trainer._negatives) if n is not None)
    mixers = trainer.model.compressor.image_mixer, trainer.model.compressor.text_mixer
    assert all(m is not None for m in mixers)
    loss = trainer.batch_losses(batch)["contrastive"]
    loss.backward()
    for mixer in mixers:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())


def test_head_refit_trains_the_heads_alone_and_lowers_their_loss(tmp_path, tiny_llava_dir):
    """Stage 2b on a fresh mixer compressor: the contrastive loss on the frozen features falls, the heads and
    readouts move, and pass 1's summary tokens and pass 2 (adapters, projection) stay exactly as they were."""
    from fwd2bot_index.model import Fwd2Bot
    from fwd2bot_index.training.demo.heads import refit_heads, summary_tokens, training_rows

    _training_world(tmp_path, tiny_llava_dir, n=40, seed=8, batch=8)
    model = Fwd2Bot.create(Fwd2Bot.from_pretrained(str(tiny_llava_dir), device="cpu", dtype="fp32").backbone,
                           num_summary_tokens=4, embed_dim=16, lora_r=4, image_readout="mixer", text_readout="mixer")
    model.config.trained_steps = 1
    before = {k: v.clone() for k, v in model.compressor.state_dict().items()}
    adapters = {k: v.clone() for k, v in model.peft.state_dict().items() if "lora_" in k}
    paths = [r["image"] for r in training_rows(tmp_path / "d", 6)]
    tokens = summary_tokens(model, paths)
    result = refit_heads(model, tmp_path / "d", n_images=24, steps=40, batch=12, lr=3e-3, hard_share=0.5)
    assert result["images"] == 24 and result["loss_curve"][-1] < result["loss_curve"][0]
    after = model.compressor.state_dict()
    for name in ("summary_tokens", "pass2_projection.weight", "pass2_projection.bias"):
        assert torch.equal(after[name], before[name])
    assert all(torch.equal(v, adapters[k]) for k, v in model.peft.state_dict().items() if k in adapters)
    for prefix in ("image_head.", "text_head.", "image_mixer.", "text_mixer."):
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith(prefix))
    assert torch.equal(summary_tokens(model, paths), tokens)
    assert not model.compressor.image_mixer.training  # left in eval mode, as loaded models are

    # a compressor trained with the paper's readouts gets fresh mixer heads; what it stores stays
    plain = Fwd2Bot.create(Fwd2Bot.from_pretrained(str(tiny_llava_dir), device="cpu", dtype="fp32").backbone,
                           num_summary_tokens=4, embed_dim=16, lora_r=4)
    plain.config.trained_steps = 1
    kept = {k: v.clone() for k, v in plain.compressor.state_dict().items() if not k.startswith(("image_", "text_"))}
    result = refit_heads(plain, tmp_path / "d", n_images=24, steps=40, batch=12, lr=3e-3, hard_share=0.5,
                         readouts=("mixer", "mixer"))
    assert result["fresh_heads"] and (plain.config.image_readout, plain.config.text_readout) == ("mixer", "mixer")
    assert plain.compressor.image_mixer is not None and plain.compressor.text_mixer is not None
    assert result["loss_curve"][-1] < result["loss_curve"][0]
    assert all(torch.equal(plain.compressor.state_dict()[k], v) for k, v in kept.items() if k != "logit_scale")
    plain.save_pretrained(str(tmp_path / "refitted"))
    again = Fwd2Bot.from_pretrained(str(tmp_path / "refitted"), device="cpu", dtype="fp32")
    texts = ["a red circle", "two blue squares"]
    assert torch.allclose(torch.as_tensor(again.encode_texts(texts)), torch.as_tensor(plain.encode_texts(texts)), atol=1e-5)
