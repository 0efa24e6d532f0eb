"""The Qwen2-VL family (Qwen2-VL, Qwen2.5-VL) on tiny random models built from the real config classes,
saved as hub-like folders and reloaded through the ordinary loader (HF_HUB_OFFLINE=1, no torchvision)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app
from fwd2bot_index.model import CheckpointMismatchError, Fwd2Bot, StrategyError, load_backbone
from fwd2bot_index.model.parts import ProcessorParts
from fwd2bot_index.model.qwen2vl import Qwen2VLBackbone, stored_grid, stride_grid
from fwd2bot_index.model.tiny import TinyQwenSpec, random_images, save_tiny_qwen2vl

# Qwen2.5-VL's folder gets its own template (no system turn), saved the newer way (chat_template.jinja)
OTHER_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in c %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SIZES = [(56, 56), (140, 84), (300, 200)]  # merged grids 2x2, 3x5 (odd), 6x9 (resized down to max_pixels)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    made = {
        "qwen2_vl": save_tiny_qwen2vl(root / "qwen2vl", TinyQwenSpec(version="2"), seed=0),
        "qwen2_5_vl": save_tiny_qwen2vl(root / "qwen25vl", TinyQwenSpec(version="2.5"), seed=1,
                                        chat_template=OTHER_TEMPLATE, template_file="chat_template.jinja"),
    }
    # the older hub layout of preprocessor_config.json: top-level min_pixels / max_pixels, no "size"
    pre = made["qwen2_5_vl"] / "preprocessor_config.json"
    data = json.loads(pre.read_text())
    size = data.pop("size")
    data.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"], processor_class="Qwen2VLProcessor")
    pre.write_text(json.dumps(data))
    return made


@pytest.fixture(scope="module")
def stock(folders):
    return {family: Fwd2Bot.from_pretrained(str(path), device="cpu", dtype="fp32") for family, path in folders.items()}


def _images():
    return [random_images(1, seed=i, size=size)[0] for i, size in enumerate(SIZES)]


def _compressor(model: Fwd2Bot) -> Fwd2Bot:
    fresh = Fwd2Bot.create(model.backbone, num_summary_tokens=6, embed_dim=32, lora_r=4, seed=0)
    with torch.no_grad():  # LoRA B starts at zero; give both adapters weight so they matter
        for name, p in fresh.peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    fresh.config.trained_steps = 1
    return fresh


@pytest.fixture(scope="module")
def trained(stock):
    return {family: _compressor(model) for family, model in stock.items()}


FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_through_the_ordinary_loader(stock, folders, family):
    model = stock[family]
    assert isinstance(model.backbone, Qwen2VLBackbone) and model.backbone.family == family
    assert isinstance(model.backbone.processor, ProcessorParts)
    pre = json.loads((folders[family] / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"  # as a hub folder names it
    parts = model.backbone.chat("<image>\nSummary above image in one word:")
    assert parts.before.endswith("<|vision_start|>") and parts.after.startswith("<|vision_end|>Summary")
    assert ("You are a helpful assistant" in parts.before) == (family == "qwen2_vl")  # each folder's own template
    assert model.default_strategy.name == "prompt+pool@16"
    assert model.image_options == {"min_pixels": 56 * 56, "max_pixels": 224 * 224}  # read from either layout


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_sizes_in_one_batch_equal_one_by_one(stock, trained, family):
    images = _images()
    grids = stock[family].visual_tokens(stock[family].backbone.pixel_values(images)).grids
    assert grids == [(2, 2), (3, 5), (6, 9)]
    for model, strategy in ((stock[family], "pool@16"), (trained[family], "fwd2bot")):
        batch = model.encode_images(images, batch_size=3, strategy=strategy)
        alone = [model.encode_images([image], strategy=strategy) for image in images]
        np.testing.assert_allclose(batch.embeddings, np.concatenate([a.embeddings for a in alone]), atol=2e-5)
        np.testing.assert_allclose(batch.tokens, np.concatenate([a.tokens for a in alone]), atol=2e-5)
        assert len({tuple(e) for e in np.round(batch.embeddings, 4)}) == 3  # the images differ


def test_prompt_embedding_equals_transformers_own_mrope_forward(stock):
    """Our layout of a prompt (chat parts + grid positions) gives what transformers' own forward gives for
    the same prompt written with <|image_pad|> ids (its get_rope_index builds the 3-D positions)."""
    model = stock["qwen2_vl"]
    bb = model.backbone
    image = _images()[1]
    ours = model.encode_images([image], strategy="prompt+pool@4").embeddings[0]
    pixels = bb.pixel_values([image])
    n = int(pixels.grid_thw.prod()) // 4
    parts = bb.chat(model.config.image_embed_prompt)
    pad = bb.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = bb.token_ids(parts.before) + [pad] * n + bb.token_ids(parts.after)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = bb.hf.model(input_ids=input_ids, pixel_values=pixels.pixel_values, image_grid_thw=pixels.grid_thw,
                          mm_token_type_ids=(input_ids == pad).int(), attention_mask=torch.ones_like(input_ids))
    theirs = torch.nn.functional.normalize(out.last_hidden_state[0, -1], dim=-1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_pool_budget_is_fixed_whatever_the_size(stock):
    model = stock["qwen2_vl"]
    images = _images()
    for budget in (16, 6, 1):
        enc = model.encode_images(images, strategy=f"pool@{budget}")
        assert enc.tokens.shape == (3, budget, 64) and model.token_shape(enc.strategy) == (budget, 64)
    assert stored_grid(16) == (4, 4) and stored_grid(6) == (2, 3) and stored_grid(7) == (1, 7)
    # LLaVolta's stride s keeps about N/s tokens, on a grid: 6x9 / 2 -> 27 = 3x9; 3x5 / 2 -> 7 fits no grid -> 2x3
    assert stride_grid(6, 9, 2) == (3, 9) and stride_grid(3, 5, 2) == (2, 3) and stride_grid(2, 2, 8) == (1, 1)
    visual = model.visual_tokens(model.backbone.pixel_values(images[:2]))
    pooled = model.backbone.pool_to_budget(visual, 4)
    small, odd = visual.tokens  # 2x2 grid: kept as is; 3x5 grid -> 2x2 with windows of rows {0,1},{1,2}
    torch.testing.assert_close(pooled[0], small)
    grid = odd.reshape(3, 5, -1)
    torch.testing.assert_close(pooled[1][0], grid[0:2, 0:3].reshape(-1, 64).mean(0))
    torch.testing.assert_close(pooled[1][3], grid[1:3, 2:5].reshape(-1, 64).mean(0))
    one = model.backbone.pool_to_budget(visual, 16)  # smaller grid than the budget: cells repeat
    assert one.shape == (2, 16, 64) and torch.equal(one[0, 0], small[0]) and torch.equal(one[0, 1], small[0])


def test_visual_token_count_matches_the_processor(stock):
    from fwd2bot_index.model.qwen2vl import visual_token_count

    model = stock["qwen2_vl"]
    low, high = model.backbone.pixel_bounds
    grids = model.visual_tokens(model.backbone.pixel_values(_images())).grids
    assert [visual_token_count(w, h, low, high) for w, h in SIZES] == [h * w for h, w in grids]
    assert visual_token_count(640, 480) == 391 and visual_token_count(4032, 3024) == 1230  # README table


def test_full_is_refused_clearly(stock):
    with pytest.raises(StrategyError, match="different number of visual tokens.*pool@N"):
        stock["qwen2_vl"].encode_images(_images()[:1], strategy="full")


@pytest.mark.parametrize("family", FAMILIES)
def test_pass2_reads_the_stored_tokens(trained, family):
    model = trained[family]
    enc = model.encode_images(_images(), strategy="fwd2bot")
    assert enc.tokens.shape == (3, 6, 64)  # K summary tokens whatever the image size
    stored = torch.from_numpy(enc.tokens[1])
    embeds, mask = model.pass2_inputs([stored], ["what color is it?"], "fwd2bot")
    before = model.backbone.chat(model.config.answer_prompt.format(question="?")).before
    start = len(model.backbone.token_ids(before, bos=True))
    with torch.no_grad():
        torch.testing.assert_close(embeds[0, start:start + 6], model.compressor.pass2_projection(stored))
    answer = model.answer(enc.tokens[1], "what color is it?", max_new_tokens=4)
    assert answer == model.answer_batch([enc.tokens[0], enc.tokens[1]], ["a", "what color is it?"], 4)[1]
    with torch.no_grad():
        a = model.pass2_loss(stored[None], ["what color?"], ["red"])
        b = model.pass2_loss(torch.from_numpy(enc.tokens[2])[None], ["what color?"], ["red"])
    assert float(a) != pytest.approx(float(b), abs=1e-6)


def test_pass2_lays_pooled_tokens_on_their_grid_as_transformers_would(stock):
    """Pooled tokens in pass 2 get the 3-D positions transformers' get_rope_index gives an image whose merged
    grid is the pooled grid; rows are left-padded, and batched answers equal one-by-one answers."""
    model = stock["qwen2_vl"]
    bb = model.backbone
    enc = model.encode_images(_images()[:2], strategy="pool@6")  # pooled grid 2x3
    questions = ["what color?", "how many shapes are in the picture?"]
    embeds, mask, positions = model._pass2_batch([torch.from_numpy(t) for t in enc.tokens], questions, "pool")
    pad = bb.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows = []
    for question in questions:
        parts = bb.chat(model.config.answer_prompt.format(question=question))
        rows.append(bb.token_ids(parts.before) + [pad] * 6 + bb.token_ids(parts.after))
    input_ids = torch.tensor([[bb.tokenizer.pad_token_id] * (mask.shape[1] - len(r)) + r for r in rows])
    assert torch.equal((input_ids != bb.tokenizer.pad_token_id).long(), mask)
    expected, _ = bb.hf.model.get_rope_index(input_ids, (input_ids == pad).int(),
                                             image_grid_thw=torch.tensor([[1, 4, 6]] * 2), attention_mask=mask)
    assert torch.equal(positions, expected)
    assert bb.stored_positions(mask, [(3, 6), (3, 6)], "fwd2bot") is None  # summary tokens: text positions
    # generation uses these positions and continues from the last one (checked against a plain forward)
    one = slice(1, 2)
    out = bb.hf.generate(inputs_embeds=embeds[one], attention_mask=mask[one], position_ids=positions[:, one],
                         max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=bb.tokenizer.pad_token_id)
    with torch.no_grad():
        first = out.sequences[:, :1]
        grown = torch.cat([embeds[one], bb.embed_ids(first[0].tolist())[None]], 1)
        grown_mask = torch.cat([mask[one], torch.ones_like(first)], 1)
        grown_pos = torch.cat([positions[:, one], positions[:, one, -1:] + 1], -1)
        logits = bb.logits(bb.run_decoder(grown, grown_mask, positions=grown_pos)[:, -1])
    torch.testing.assert_close(logits, out.scores[1], atol=1e-5, rtol=1e-5)
    alone = [model.answer(t, q, max_new_tokens=5, kind="pool") for t, q in zip(enc.tokens, questions)]
    assert model.answer_batch(list(enc.tokens), questions, max_new_tokens=5, kind="pool") == alone
    assert "".join(model.answer(enc.tokens[1], questions[1], max_new_tokens=5, stream=True, kind="pool")) == alone[1]


def test_checkpoint_round_trip_records_the_family(trained, folders, tmp_path):
    model = trained["qwen2_5_vl"]
    model.save_pretrained(str(tmp_path / "ckpt"))
    config = json.loads((tmp_path / "ckpt" / "fwd2bot_config.json").read_text())
    assert config["base_family"] == "qwen2_5_vl" and config["base_model"] == str(folders["qwen2_5_vl"])
    assert config["base_signature"]["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    loaded = Fwd2Bot.from_pretrained(str(tmp_path / "ckpt"), device="cpu", dtype="fp32")
    assert loaded.backbone.family == "qwen2_5_vl" and loaded.default_strategy.name == "fwd2bot"
    images = _images()
    a, b = model.encode_images(images), loaded.encode_images(images)
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
    np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-5)
    with pytest.raises(CheckpointMismatchError, match="another base model"):
        Fwd2Bot.from_pretrained(str(tmp_path / "ckpt"), device="cpu", base=str(folders["qwen2_vl"]))


def test_unsupported_pixel_options_on_llava_are_refused(tiny_llava_dir):
    with pytest.raises(ValueError, match="dynamic-resolution"):
        load_backbone(str(tiny_llava_dir), device="cpu", max_pixels=100_000)


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_index_search_ask(folders, family, tmp_path):
    runner = CliRunner()
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(_images() + random_images(1, seed=9, size=(64, 200))):
        image.save(photos / f"{i}.png")
    coll = str(tmp_path / "coll")
    result = runner.invoke(app, ["index", str(photos), "--collection", coll, "--model", str(folders[family]),
                                 "--device", "cpu", "--strategy", "pool@6", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "coll" / "manifest.json").read_text())
    assert manifest["token_count"] == 6 and manifest["token_dim"] == 64
    result = runner.invoke(app, ["search", "a red circle", "--collection", coll, "-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 4 and len({h["id"] for h in hits}) == 4
    result = runner.invoke(app, ["ask", str(hits[0]["id"]), "what color is it?", "--collection", coll])
    assert result.exit_code == 0, result.output
    refused = runner.invoke(app, ["index", str(photos), "--collection", str(tmp_path / "c2"), "--model",
                                  str(folders[family]), "--device", "cpu", "--strategy", "full"])
    assert refused.exit_code == 1 and "pool@N" in refused.output and not (tmp_path / "c2").exists()


def test_pixel_bounds_are_options_the_collection_records(folders, tiny_llava_dir, tmp_path):
    from fwd2bot_index.service import open_service

    runner = CliRunner()
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(_images()):
        image.save(photos / f"{i}.png")
    coll = tmp_path / "coll"
    args = ["index", str(photos), "--collection", str(coll), "--device", "cpu"]
    result = runner.invoke(app, args + ["--model", str(folders["qwen2_vl"]), "--min-pixels", "784",
                                        "--max-pixels", "6272"])
    assert result.exit_code == 0, result.output
    assert json.loads((coll / "manifest.json").read_text())["image_options"] == {"min_pixels": 784, "max_pixels": 6272}
    with open_service(coll, device="cpu", dtype="fp32") as service:  # reopened with the recorded bounds
        model = service.model
        assert model.image_options == {"min_pixels": 784, "max_pixels": 6272}
        grids = model.visual_tokens(model.backbone.pixel_values(_images())).grids
        assert grids == [(2, 2), (2, 3), (2, 3)]  # 784 px per token: at most 8 tokens (3x5 and 6x9 by default)
    other = runner.invoke(app, args + ["--max-pixels", "50176"])
    assert other.exit_code == 1 and "image options" in other.output and "--reindex" in other.output
    llava = runner.invoke(app, ["index", str(photos), "--collection", str(tmp_path / "l"), "--device", "cpu",
                                "--model", str(tiny_llava_dir), "--max-pixels", "6272"])
    assert llava.exit_code == 1 and "dynamic-resolution" in llava.output and not (tmp_path / "l").exists()
    swapped = runner.invoke(app, args[:3] + [str(tmp_path / "s"), "--model", str(folders["qwen2_vl"]),
                                             "--max-pixels", "100"])
    assert swapped.exit_code == 1 and "larger than max_pixels" in swapped.output


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Eight images of four sizes with one caption each, as a JSONL pairs file."""
    root = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(8):
        image = random_images(1, seed=100 + i, size=SIZES[i % 3] if i < 6 else (84, 84))[0]
        image.save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "captions": [f"picture number {i}"]})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


def _train_config(folder, pairs, out, **overrides):
    from fwd2bot_index.training import TrainConfig

    settings = dict(model=str(folder), data=[str(pairs)], output_dir=str(out), num_summary_tokens=4, embed_dim=32,
                    lora_r=4, lr=1e-3, batch_size=4, max_steps=4, checkpoint_every=2, eval_split="none", seed=0)
    return TrainConfig(**{**settings, **overrides})


def test_training_steps_change_both_adapters_and_resume(folders, pairs, tmp_path):
    from safetensors.torch import load_file

    from fwd2bot_index.training import Trainer, run_training

    trainer = Trainer(_train_config(folders["qwen2_vl"], pairs, tmp_path / "g", pool_schedule="0.5:2,0.5:1"),
                      progress=False)
    hf = trainer.model.backbone.hf
    lora = {n: p for n, p in hf.named_parameters() if "lora_" in n}
    assert any(".pass1." in n for n in lora) and any(".pass2." in n for n in lora)
    before = {n: p.detach().clone() for n, p in lora.items()}
    tokens = trainer.model.compressor.summary_tokens.detach().clone()
    strides = [trainer.train_step()["pool_stride"] for _ in range(2)]  # lora_A moves from step 2 (B starts at 0)
    assert strides == [2, 2]
    for adapter in ("pass1", "pass2"):
        for kind in ("lora_A", "lora_B"):
            names = [n for n in lora if f"{kind}.{adapter}." in n]
            assert names and all(not torch.equal(lora[n].detach(), before[n]) for n in names), (adapter, kind)
    assert not torch.equal(trainer.model.compressor.summary_tokens.detach(), tokens)

    config = _train_config(folders["qwen2_5_vl"], pairs, tmp_path / "a")
    run_training(config, progress=False)
    out = tmp_path / "b"
    first = run_training(_train_config(folders["qwen2_5_vl"], pairs, out, max_steps=4), progress=False)
    import shutil  # as if killed after the step-2 checkpoint: the final model and step 4 are gone

    shutil.rmtree(first.model_dir)
    shutil.rmtree(out / "checkpoints" / "step-00000004", ignore_errors=True)
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    resumed = run_training(_train_config(folders["qwen2_5_vl"], pairs, out, resume=True), progress=False)
    assert resumed.resumed_from.endswith("step-00000002") and resumed.steps == 4
    a = load_file(str(tmp_path / "a" / "model" / "compressor.safetensors"))
    b = load_file(str(out / "model" / "compressor.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    model = Fwd2Bot.from_pretrained(str(out / "model"), device="cpu", dtype="fp32")
    assert model.config.base_family == "qwen2_5_vl" and model.default_strategy.name == "fwd2bot"
    assert model.encode_images(_images()).tokens.shape == (3, 4, 64)


def test_base_pretraining_with_staged_pooling_trains_the_merger(folders, pairs, tmp_path):
    from safetensors.torch import load_file

    from fwd2bot_index.training import run_training

    config = _train_config(folders["qwen2_vl"], pairs, tmp_path / "p", objective="pretrain", max_steps=2,
                           checkpoint_every=0, pool_schedule="0.5:2,0.5:1")
    result = run_training(config, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pool_stride"] for r in rows if r["kind"] == "train"] == [2, 1]
    merger = "visual.merger.mlp.0.weight"  # as saved (the hub layout)
    before = load_file(str(folders["qwen2_vl"] / "model.safetensors"))[merger]
    after = load_file(str(tmp_path / "p" / "model" / "model.safetensors"))[merger]
    assert not torch.equal(before, after)
    again = Fwd2Bot.from_pretrained(result.model_dir, device="cpu", dtype="fp32")  # a Qwen2-VL folder again
    assert again.backbone.family == "qwen2_vl" and again.encode_images(_images()).tokens.shape == (3, 16, 64)


def test_cli_train_on_a_qwen25_folder(folders, pairs, tmp_path):
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(app, ["train", "--data", str(pairs), "--model", str(folders["qwen2_5_vl"]), "-o",
                                      str(out), "-K", "4", "--embed-dim", "32", "--lora-r", "4", "-b", "4",
                                      "--max-steps", "2", "--pool-schedule", "llavolta", "--max-pixels", "6272",
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and report["last"]["pool_stride"] in (1, 2, 8)
    config = json.loads((out / "model" / "fwd2bot_config.json").read_text())
    assert config["base_family"] == "qwen2_5_vl" and config["trained_steps"] == 2
    trained_with = {"min_pixels": 3136, "max_pixels": 6272}
    assert config["image_options"] == trained_with  # loading defaults to the bounds it was trained with
    assert Fwd2Bot.from_pretrained(str(out / "model"), device="cpu").image_options == trained_with
    wider = Fwd2Bot.from_pretrained(str(out / "model"), device="cpu", max_pixels=50176)
    assert wider.image_options == {"min_pixels": 3136, "max_pixels": 50176}


def test_cli_eval_retrieval_on_a_qwen_folder(folders, pairs, tmp_path):
    rows = [{**json.loads(line), "split": "test"} for line in pairs.read_text().splitlines()]
    annotations = tmp_path / "captions.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["eval", "retrieval", "--annotations", str(annotations), "--images", str(pairs.parent),
                                      "-m", str(folders["qwen2_vl"]), "-s", "pool@4", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    (run,) = json.loads(result.stdout)["retrieval"]
    assert run["n_images"] == 8 and 0 <= run["recall"]["t2i"]["1"] <= 1


def test_pooled_distillation_trains_on_grids_of_any_size_and_refuses_coarse_to_fine(folders, pairs, tmp_path):
    from fwd2bot_index.training import Trainer, TrainingError

    trainer = Trainer(_train_config(folders["qwen2_vl"], pairs, tmp_path / "d", distill_weight=1.0), progress=False)
    metrics = trainer.train_step()  # each image pooled on its own grid to the same K cells
    assert metrics["distill"] > 0
    with pytest.raises(TrainingError, match="coarse-to-fine needs one fixed visual-token grid"):
        Trainer(_train_config(folders["qwen2_vl"], pairs, tmp_path / "e", num_summary_tokens=8, nested=[4, 8],
                              distill_weight=1.0, distill_layout="coarse-to-fine"), progress=False)
