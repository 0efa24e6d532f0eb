"""The side-experiment scripts behind docs/DEMO_MODEL.md's findings run, and refuse bad input in one line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _script(name: str):
    if str(EXPERIMENTS) not in sys.path:  # the scripts import their siblings (grid_rope), as when run directly
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_position_errors_scores_every_object_of_every_scene(tiny_model):
    from fwd2bot_index.training.demo.scenes import heldout_scenes

    scenes = heldout_scenes(0, 3)
    result = _script("position_errors").position_errors(tiny_model, scenes, batch=4)
    assert result["questions"] == sum(len(s.objects) for s in scenes)
    assert sum(v["questions"] for v in result["by_objects"].values()) == result["questions"]
    assert 0.0 <= result["exact"] <= min(result["row"], result["column"]) <= 1.0  # exact needs both right
    assert sum(result["confusions"].values()) <= round((1 - result["exact"]) * result["questions"])
    for split in ("by_same_row_objects", "by_objects_sharing_colour_or_shape"):
        assert sum(v["questions"] for v in result[split].values()) == result["questions"]
    assert 0.0 <= result["wrong_naming_another_objects_cell"] <= 1.0


@pytest.mark.parametrize("layout", ["mirror-columns", "mirror-rows", "transpose"])
def test_position_layouts_permute_a_grids_ids_and_keep_a_row_major_one(layout):
    offsets = _script("position_errors").layout_offsets(64, layout)
    assert sorted(offsets.tolist()) == list(range(64)) and offsets.tolist() != list(range(64))
    assert _script("position_errors").layout_offsets(64, "row-major").tolist() == list(range(64))


def test_a_position_layout_moves_only_the_visual_blocks_ids_and_is_undone(tiny_model):
    import torch

    script = _script("position_errors")
    tokens = [torch.zeros(4, tiny_model.backbone.config.text_config.hidden_size)] * 2
    _, mask, before = tiny_model._pass2_batch(tokens, ["where?", "where is it now?"], "full")
    with script.visual_layout(tiny_model, "mirror-rows"):
        _, _, moved = tiny_model._pass2_batch(tokens, ["where?", "where is it now?"], "full")
    _, _, after = tiny_model._pass2_batch(tokens, ["where?", "where is it now?"], "full")
    assert before is None and after is None  # a LLaVA lays stored tokens out consecutively
    consecutive = (mask.long().cumsum(-1) - 1).clamp(min=0)
    changed = (moved != consecutive) & mask.bool()
    assert changed.sum(dim=1).tolist() == [4, 4]  # the 2x2 block's ids, nothing else
    assert torch.equal(moved.sort(dim=1).values, consecutive.sort(dim=1).values)  # same ids, permuted


@pytest.mark.parametrize("args, message", [
    (["--run", "{tmp}/nothing", "--out", "{tmp}/out"], "has no state.pt"),
    (["--run", "{tmp}", "--out", "{tmp}/out", "--weight", "pos=3"], "expected TYPE=W"),
])
def test_base_continue_refuses_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        _script("base_continue").main([a.format(tmp=tmp_path) for a in args])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_object_phrases_reports_precision_and_how_alike_the_phrases_are(tmp_path, capsys):
    import json

    from fwd2bot_index.synthetic import write_demo_data

    write_demo_data(tmp_path, n=16, seed=2, split_fractions=(0.0, 1.0, 0.0), sugarcrepe_splits=())
    assert _script("object_phrases").main(["--data", str(tmp_path), "--model", "demo", "--limit", "8"]) == 0
    report = json.loads(capsys.readouterr().out)["demo"]
    assert report["images"] == 8 and report["queries"] > 0
    assert all(0.0 <= report[k] <= 1.0 for k in ("p@1", "p@5", "map")) and -1.0 <= report["phrase_cosine_mean"] <= 1.0


def test_grid_ids_give_visual_tokens_their_row_and_column_and_resume_text_after_the_grid():
    import torch

    ids = _script("grid_rope").grid_ids(torch.arange(12)[None], first=2, count=4)  # 2 text, 2x2 grid, 6 text
    assert ids[:, 0, :2].tolist() == [[0, 1]] * 3  # text before: the same id three times
    assert ids[:, 0, 2:6].tolist() == [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]]  # (t, row, column)
    assert ids[:, 0, 6:].tolist() == [[4, 5, 6, 7, 8, 9]] * 3  # text resumes at first + side
    with pytest.raises(ValueError, match="not a square grid"):
        _script("grid_rope").grid_ids(torch.arange(4)[None], first=0, count=6)


def test_grid_rope_leaves_text_before_the_grid_alone_and_moves_what_reads_the_grid(tiny_model):
    import torch

    decoder = tiny_model.backbone.decoder
    embeds = torch.randn(1, 12, tiny_model.backbone.config.text_config.hidden_size)
    mask, ids = torch.ones(1, 12, dtype=torch.long), torch.arange(12)[None]
    with torch.no_grad():
        plain = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        cos, _ = decoder.rotary_emb(embeds, ids)
        with _script("grid_rope").grid_rope(first=2, count=4):
            grid = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            grid_cos, _ = decoder.rotary_emb(embeds, ids)
        again = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    assert torch.allclose(plain[:, :3], grid[:, :3], atol=1e-5)  # text and the grid's first token: same ids
    assert torch.allclose(cos[:, :3], grid_cos[:, :3]) and not torch.allclose(cos[:, 3:], grid_cos[:, 3:])
    assert not torch.equal(plain[:, 3:], grid[:, 3:])  # what reads the grid sees other ids
    assert torch.equal(plain, again)  # undone on exit


def test_embedding_head_scores_the_shipped_and_fresh_heads_on_frozen_tokens(tmp_path, capsys):
    import json

    from fwd2bot_index.synthetic import write_demo_data

    write_demo_data(tmp_path, n=32, seed=2, split_fractions=(0.5, 0.25, 0.25))
    script = _script("embedding_head")
    args = ["--train", str(tmp_path), "--eval", str(tmp_path), "--model", "demo", "--n-train", "12",
            "--n-gallery", "6", "--n-pairs", "6", "--steps", "2", "--batch", "6", "--cache", str(tmp_path / "cache")]
    assert script.main(args + ["--heads", ",".join(script.HEADS) + ",mixer+mlp,mixer+mixer"]) == 0
    rows = json.loads(capsys.readouterr().out)["demo"]
    assert set(rows) == {"text_pair_distance", "shipped", *script.HEADS, "mixer+mlp", "mixer+mixer"}
    assert all(v >= 0.0 for v in rows.pop("text_pair_distance").values())
    assert script.main(args + ["--heads", "mean-linear"]) == 0  # the second run reads the cached features
    again = capsys.readouterr()
    assert "features from" in again.err and json.loads(again.out)["demo"]["shipped"] == rows["shipped"]
    assert script.main(args + ["--heads", "mean-linear", "--hard-categories", "swap_att"]) == 0  # fewer texts:
    again = capsys.readouterr()  # still read from the cache
    assert "features from" in again.err and json.loads(again.out)["demo"]["shipped"] == rows["shipped"]
    for row in rows.values():
        assert set(row["sugarcrepe"]) >= {"swap_att", "swap_obj"}
        assert all(0.0 <= v <= 100.0 for v in [*row["sugarcrepe"].values(), row["t2i_r1_test"], row["t2i_r1_test_unseen"]])


def test_embedding_heads_keep_the_embedding_shape_and_the_mlp_head_is_not_a_mean_of_linear_maps():
    import torch

    heads = _script("embedding_head").HEADS
    tokens = torch.randn(3, 4, 8)
    for make in heads.values():
        assert make(4, 8, 5)(tokens).shape == (3, 5)
    # a DeepSets head tells apart two token sets with the same mean (which a mean-linear head cannot)
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    torch.manual_seed(0)
    mlp, linear = heads["mlp-mean"](2, 2, 3), heads["mean-linear"](2, 2, 3)
    assert torch.allclose(linear(a), linear(b)) and not torch.allclose(mlp(a), mlp(b))


def test_embedding_head_refuses_an_unknown_head_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _script("embedding_head").main(["--train", str(tmp_path), "--eval", str(tmp_path), "--model", "demo",
                                        "--heads", "mean-linear,nope,mixer+nope"])
    assert stop.value.code == 2 and "unknown head(s) nope+linear, mixer+nope" in capsys.readouterr().err


def test_text_heads_read_left_padded_states_and_padding_changes_nothing():
    import torch

    script = _script("embedding_head")
    torch.manual_seed(0)
    states, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    padded = torch.cat([torch.zeros(2, 3, 8), states], dim=1)
    padded_mask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), mask], dim=1)
    for make in script.TEXT_HEADS.values():
        head = make(8, 6).eval()
        with torch.no_grad():
            assert torch.allclose(head(states, mask), head(padded, padded_mask), atol=1e-5)
