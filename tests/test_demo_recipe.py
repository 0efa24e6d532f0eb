"""The demo recipe's parts: fresh-scene streams, the blind prior, multi-turn pass-2 sequences, and
stages that continue exactly where a killed run stopped."""

from __future__ import annotations

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
from fwd2bot_index.training.demo.turns import multi_turn_loss, scene_turns  # noqa: E402


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


def test_multi_turn_loss_scores_only_answers_with_their_weights(tiny_base):
    from fwd2bot_index.model import Fwd2Bot

    model = Fwd2Bot.from_pretrained(str(tiny_base), device="cpu", dtype="fp32")
    visual = torch.randn(2, model.backbone.num_image_tokens, model.backbone.hidden_size) * 0.02
    qa = [("what color is the circle?", "red"), ("how many objects are there?", "3")]
    rng = np.random.default_rng(0)
    turns = scene_turns(["a red circle"], qa, rng, "Describe the image.", caption_share=1.0, caption_weight=0.5)
    assert sorted(t[1] for t in turns) == ["3", "a red circle", "red"]
    assert {t[2] for t in turns if t[1] == "a red circle"} == {0.5}
    one = multi_turn_loss(model, visual[:1], [[("what color is the circle?", "red", 1.0)]], "full")
    single = model.pass2_loss(visual[:1], ["what color is the circle?"], ["red"], kind="full")
    assert torch.allclose(one, single, atol=1e-5)  # turn 1 is exactly the single-turn layout answering uses
    # a weight-0 turn contributes nothing; later turns change the loss
    zero = multi_turn_loss(model, visual[:1], [[("what color is the circle?", "red", 1.0), ("how many?", "3", 0.0)]],
                           "full")
    assert torch.allclose(zero, single, atol=1e-5)
    two = multi_turn_loss(model, visual[:1], [[("what color is the circle?", "red", 1.0), ("how many?", "3", 1.0)]],
                          "full")
    assert not torch.allclose(two, single)


def test_base_stage_resumes_bit_exactly_after_an_interruption(tiny_base, tmp_path):
    args = dict(seed=0, steps=4, batch=3, lr=1e-3, check_every=2, caption_share=0.5, caption_weight=0.5, n_monitor=2)
    whole = train_base(tiny_base, tmp_path / "whole", say=lambda m: None, **args)

    class Killed(Exception):
        pass

    def die_after_first_checkpoint(message: str) -> None:
        if message.startswith("base step 2/"):
            raise Killed

    with pytest.raises(Killed):
        train_base(tiny_base, tmp_path / "cut", say=die_after_first_checkpoint, **args)
    said = []
    resumed = train_base(tiny_base, tmp_path / "cut", say=said.append, **args)
    assert any("resuming at step 2" in m for m in said)
    assert resumed["steps"] == whole["steps"] == 4
    assert resumed["history"] == whole["history"]  # the logged loss and the monitor too, not only the weights
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
