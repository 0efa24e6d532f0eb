"""Runners and reports end to end, with a deterministic stand-in encoder (real arithmetic, no model).

The stand-in only exercises the plumbing (reading, batching, pairing, scoring, writing); metric
correctness is tested on hand-computed matrices in test_eval_metrics.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fwd2bot_index.eval import (
    SUGARCREPE_CATEGORIES,
    QARecord,
    read_captions_jsonl,
    read_karpathy_json,
    read_qa_jsonl,
    read_sugarcrepe,
    retrieval_recall,
    run_qa,
    run_retrieval,
    run_sugarcrepe,
    write_report,
)
from fwd2bot_index.eval.standin import HashedBagOfWords

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey", "teal"]
SHAPES = ["circle", "square", "triangle"]
OFFICIAL_PAIRS = {
    "add_att": 692, "add_obj": 2062, "replace_att": 788, "replace_obj": 1652,
    "replace_rel": 1406, "swap_att": 666, "swap_obj": 245,
}


# The first records of each official file, vendored with their MIT licence (tests/data/sugarcrepe/SOURCE.md),
# so a public clone runs these tests; swap_obj's sample keeps upstream's gap at key "109".
SUGARCREPE_SAMPLE = Path(__file__).resolve().parent / "data" / "sugarcrepe"
SAMPLE_PAIRS = {c: 48 for c in OFFICIAL_PAIRS} | {"swap_obj": 120}


def _real_sugarcrepe() -> Path:
    return SUGARCREPE_SAMPLE


# ---------------------------------------------------------------------------- retrieval


@pytest.fixture()
def rendered_flickr(tmp_path: Path) -> tuple[Path, Path, HashedBagOfWords]:
    """A Karpathy-format Flickr30k file whose images are rendered from their own captions."""
    enc = HashedBagOfWords(dim=512, band_width=1)  # wide enough that no two colour words share a bucket
    entries = []
    for i, color in enumerate(COLORS):
        shape = SHAPES[i % 3]
        raws = [f"A {color} {shape}.", f"The {shape} is {color}.", f"Something {color}."][: 2 + i % 2]
        split = "train" if i == 5 else "test"
        entries.append({"filename": f"{100 + i}.jpg", "split": split, "imgid": i,
                        "sentences": [{"raw": r, "tokens": r.split()} for r in raws]})
        (tmp_path / "img").mkdir(exist_ok=True)
        enc.render(raws).save(tmp_path / "img" / f"{100 + i}.jpg", format="PNG")  # lossless under a .jpg name
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return path, tmp_path / "img", enc


def test_run_retrieval_lines_up_images_and_captions(rendered_flickr) -> None:
    path, images, enc = rendered_flickr
    rs = read_karpathy_json(path, images)
    result = run_retrieval(enc, rs, batch_size=2, show_progress=False)  # several encode calls per side
    assert result["n_images"] == 11 and result["n_captions"] == rs.n_captions and result["dataset"] == "flickr30k"
    # Reference: the same encoder on in-memory renders, scored directly.
    sim = enc.encode_texts(rs.captions) @ enc.encode_images([Image.open(p) for p in rs.image_paths]).embeddings.T
    assert result["recall"] == retrieval_recall(sim, rs.caption_to_image)
    # Each colour word appears in one image only, so every query finds its own image first.
    assert result["recall"]["t2i"][1] == 1.0 and result["recall"]["i2t"][1] == 1.0


def test_run_retrieval_detects_misaligned_gallery(rendered_flickr, tmp_path: Path) -> None:
    path, images, enc = rendered_flickr
    rs = read_karpathy_json(path, images)
    # Swap two image files on disk: their captions must now miss at 1.
    a, b = rs.image_paths[0], rs.image_paths[1]
    tmp = tmp_path / "swap.tmp"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    result = run_retrieval(enc, rs, batch_size=4, show_progress=False)
    misses = sum(1 for i in rs.caption_to_image if i in (0, 1))
    assert result["recall"]["t2i"][1] == pytest.approx(1 - misses / rs.n_captions)


class _ArrayModel:
    """Returns plain arrays from encode_images and can be told to misbehave."""

    def __init__(self, image_dim: int = 8, text_dim: int = 8, bad_rows: bool = False) -> None:
        self.image_dim, self.text_dim, self.bad_rows = image_dim, text_dim, bad_rows

    def encode_images(self, images, batch_size=32, show_progress=False):
        rows = [np.asarray(img, dtype=np.float32).mean(axis=(0, 1)).tolist() * 8 for img in images]
        out = np.asarray(rows, dtype=np.float32)[:, : self.image_dim] + 1.0
        return out[:-1] if self.bad_rows else out

    def encode_texts(self, texts, batch_size=32, show_progress=False):
        return np.stack([np.full(self.text_dim, len(t) + 1.0, dtype=np.float32) for t in texts])


def test_runner_accepts_plain_arrays_and_rejects_bad_shapes(rendered_flickr) -> None:
    path, images, _ = rendered_flickr
    rs = read_karpathy_json(path, images, limit=3)
    assert run_retrieval(_ArrayModel(), rs, show_progress=False)["n_images"] == 3
    with pytest.raises(ValueError, match=r"encode_images returned shape \(2, 8\), expected \(3, D\)"):
        run_retrieval(_ArrayModel(bad_rows=True), rs, show_progress=False)
    with pytest.raises(ValueError, match="not one space"):
        run_retrieval(_ArrayModel(text_dim=5), rs, show_progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        run_retrieval(_ArrayModel(), rs, batch_size=0, show_progress=False)


# ---------------------------------------------------------------------------- SugarCrepe


def test_real_sugarcrepe_files_read_completely() -> None:
    data = read_sugarcrepe(_real_sugarcrepe())
    assert {name: len(c.pairs) for name, c in data.items()} == SAMPLE_PAIRS
    first = data["swap_obj"].pairs[0]
    assert first.image.name.endswith(".jpg") and first.caption != first.negative_caption


def _render_stand_ins(folder: Path, enc: HashedBagOfWords, data, use_negative: bool = False) -> None:
    """One image per file name, painted from every true (or negative) caption it has in ``data``."""
    texts: dict[str, list[str]] = {}
    for category in data.values():
        for p in category.pairs:
            texts.setdefault(p.image.name, []).append(p.negative_caption if use_negative else p.caption)
    folder.mkdir(parents=True, exist_ok=True)
    for name, captions in texts.items():
        enc.render(captions).save(folder / name, format="PNG")


def _reference_accuracy(enc: HashedBagOfWords, data, images: Path) -> dict[str, float]:
    """Scores computed here directly from the stand-in's vectors, without the runner."""
    out = {}
    for name, category in data.items():
        img = enc.encode_images([Image.open(images / p.image.name) for p in category.pairs]).embeddings
        pos = np.sum(img * enc.encode_texts([p.caption for p in category.pairs]), axis=1)
        neg = np.sum(img * enc.encode_texts([p.negative_caption for p in category.pairs]), axis=1)
        out[name] = float(np.mean(pos > neg))
    return out


def test_run_sugarcrepe_on_real_files_with_stand_in_images(tmp_path: Path) -> None:
    folder = _real_sugarcrepe()
    enc = HashedBagOfWords(dim=256, band_width=1, height=4)
    limit = 40
    data = read_sugarcrepe(folder, limit=limit)
    images = tmp_path / "val2017"
    _render_stand_ins(images, enc, data)
    result = run_sugarcrepe(enc, folder, images, limit=limit, batch_size=8, show_progress=False)
    assert result["n_pairs"] == {c: limit for c in SUGARCREPE_CATEGORIES}
    assert result["n_images"] == len({p.image.name for c in data.values() for p in c.pairs})
    reference = _reference_accuracy(enc, data, images)
    for name in SUGARCREPE_CATEGORIES:
        assert result["accuracy"][name] == pytest.approx(reference[name], abs=1 / limit + 1e-9), name
    # Images painted from the true captions: replace/add negatives lose; a bag of words cannot see swaps
    # (identical word counts tie, and ties are wrong), so swap stays far lower.
    assert result["accuracy"]["Replace"] > 0.8 and result["accuracy"]["Add"] > 0.8
    assert result["accuracy"]["Swap"] < result["accuracy"]["Replace"] - 0.3
    # Painted from the negatives instead, the true captions must lose: proves pos/neg orientation.
    flipped = tmp_path / "flipped"
    _render_stand_ins(flipped, enc, data, use_negative=True)
    assert run_sugarcrepe(enc, folder, flipped, limit=limit, show_progress=False)["accuracy"]["Replace"] < 0.2


def test_run_sugarcrepe_missing_images(tmp_path: Path) -> None:
    folder = _real_sugarcrepe()
    enc = HashedBagOfWords()
    data = read_sugarcrepe(folder, categories=["swap_obj"], limit=5)
    _render_stand_ins(tmp_path / "img", enc, data)
    first = data["swap_obj"].pairs[0].image.name
    (tmp_path / "img" / first).unlink()
    with pytest.raises(FileNotFoundError, match=r"swap_obj\.json: record '0': image not found"):
        run_sugarcrepe(enc, folder, tmp_path / "img", categories=["swap_obj"], limit=5, show_progress=False)
    result = run_sugarcrepe(enc, folder, tmp_path / "img", categories=["swap_obj"], limit=5, skip_missing=True,
                            show_progress=False)
    # The limit picks the first 5 records; the pairs using the deleted image are skipped and counted.
    uses_first = sum(p.image.name == first for p in data["swap_obj"].pairs)
    assert result["skipped_missing"] == {"swap_obj": uses_first}
    assert result["n_pairs"] == {"swap_obj": 5 - uses_first}
    assert set(result["accuracy"]) == {"swap_obj"}


# ---------------------------------------------------------------------------- QA


@pytest.fixture()
def colour_qa(tmp_path: Path) -> Path:
    rgb = {"red": (220, 10, 10), "green": (10, 200, 10), "blue": (10, 10, 230)}
    rows = []
    for i, (name, value) in enumerate(rgb.items()):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), value).save(tmp_path / "images" / f"{i:06d}.png")
        gold = "yellow" if name == "blue" else name  # one wrong gold answer
        rows.append({"image": f"images/{i:06d}.png", "question": "What colour?", "answer": gold, "type": "color"})
    rows.append({"image": "images/000000.png", "question": "How many shapes?", "answer": "one", "type": "count"})
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _look(image: Path, question: str) -> str:
    """Answers from the pixels: the dominant channel for colour, always '1 shape' for counting."""
    if question.startswith("How many"):
        return "1 shape"
    mean = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    return f"It is {['red', 'green', 'blue'][int(mean.argmax())]}."


def test_run_qa_scores_by_type(colour_qa: Path) -> None:
    result = run_qa(_look, read_qa_jsonl(colour_qa), show_progress=False)
    assert result["n"] == 4
    assert result["exact_match"] == 0.0
    assert result["contains"] == 0.75  # red, green and "one" == "1"; blue vs gold yellow fails
    assert result["by_type"] == {"color": {"n": 3, "exact_match": 0.0, "contains": pytest.approx(2 / 3)},
                                 "count": {"n": 1, "exact_match": 0.0, "contains": 1.0}}
    assert result["predictions"][0]["prediction"] == "It is red."
    terse = run_qa(lambda img, q: _look(img, q).removeprefix("It is "), read_qa_jsonl(colour_qa), limit=3,
                   show_progress=False, keep_predictions=False)
    assert terse["exact_match"] == pytest.approx(2 / 3) and "predictions" not in terse


def test_run_qa_names_the_failing_record(tmp_path: Path) -> None:
    def broken(image: Path, question: str) -> str:
        raise RuntimeError("out of tokens")

    record = QARecord(tmp_path / "x.png", "Why?", ("because",))
    with pytest.raises(RuntimeError, match=r"x\.png.*'Why\?' failed: out of tokens"):
        run_qa(broken, [record], show_progress=False)


# ---------------------------------------------------------------------------- reports


def test_write_report_produces_json_markdown_and_plots(rendered_flickr, tmp_path: Path) -> None:
    path, images, enc = rendered_flickr
    retrieval = run_retrieval(enc, read_karpathy_json(path, images), show_progress=False)
    sugarcrepe = {
        "benchmark": "sugarcrepe", "limit": None,
        "n_pairs": dict(OFFICIAL_PAIRS), "skipped_missing": {c: 0 for c in OFFICIAL_PAIRS},
        "accuracy": {**{c: np.float64(0.5 + 0.05 * i) for i, c in enumerate(SUGARCREPE_CATEGORIES)},
                     "Replace": 0.55, "Swap": 0.675, "Add": 0.78},
    }
    sweep = [
        {"strategy": s, "stored_tokens": t, "recall": {"t2i": {1: 0.2 + r}, "i2t": {1: 0.3 + r}}, "qa": {"exact_match": r}}
        for s, base in (("pool", 0.0), ("fwd2bot", 0.1)) for t, r in ((4, base + 0.1), (16, base + 0.2), (64, base + 0.3))
    ]
    out = tmp_path / "report"
    written = write_report(
        {"settings": {"model": "stand-in", "batch_size": 32, "images_dir": images}, "retrieval": retrieval,
         "sugarcrepe": sugarcrepe, "sweep": sweep},
        out,
    )
    assert set(written) == {"results.json", "report.md", "sugarcrepe_accuracy.png", "recall_vs_stored_tokens.png"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["retrieval"]["recall"]["t2i"]["1"] == retrieval["recall"]["t2i"][1]
    assert saved["settings"]["images_dir"] == str(images) and saved["sugarcrepe"]["accuracy"]["swap_obj"] == 0.65
    md = (out / "report.md").read_text()
    assert "| ours | 100.0 |" in md
    assert "| CLIP ViT-L/14 (published) | 67.3 | – | – | 87.2 |" in md and "| E5-V (8B) (published) | 79.5 |" in md
    assert "Not directly comparable" in md  # 11 images, not the 1,000-image test split
    assert "| replace-obj | 1652 | 50.0 | 94.1 |" in md and "| **Swap** (micro-avg) | 911 | 67.5 | – |" in md
    assert "Radford et al., 2021" in md and "Hsieh et al., 2023" in md and "Jiang et al., 2024" in md
    assert "| fwd2bot | 64 | 60.0 | 70.0 | 40.0 |" in md
    for png in ("sugarcrepe_accuracy.png", "recall_vs_stored_tokens.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and len(set(im.convert("L").getdata())) > 10


def test_write_report_for_qa_only_and_bad_sweep(colour_qa: Path, tmp_path: Path) -> None:
    qa = run_qa(_look, read_qa_jsonl(colour_qa), show_progress=False)
    written = write_report({"qa": {"demo": qa}}, tmp_path / "qa")
    assert set(written) == {"results.json", "report.md"}
    md = (tmp_path / "qa" / "report.md").read_text()
    assert "## Question answering: demo" in md and "| all | 4 | 0.0 | 75.0 |" in md and "published" not in md
    with pytest.raises(ValueError, match=r"sweep\[0\] needs 'strategy' and 'stored_tokens'"):
        write_report({"sweep": [{"recall": {}}]}, tmp_path / "bad")


def test_demo_layout_retrieval(tmp_path: Path) -> None:
    enc = HashedBagOfWords()
    (tmp_path / "images").mkdir()
    rows = []
    for i, color in enumerate(COLORS[:4]):
        enc.render(f"a {color} square").save(tmp_path / "images" / f"{i:06d}.png")
        rows.append({"image": f"images/{i:06d}.png", "captions": [f"a {color} square"], "split": "test"})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_retrieval(enc, read_captions_jsonl(tmp_path / "captions.jsonl"), show_progress=False)
    assert result["recall"]["t2i"][1] == 1.0 and result["recall"]["i2t"][1] == 1.0


def test_truncated_gallery_image_fails_naming_the_file(rendered_flickr) -> None:
    from fwd2bot_index.imaging import ImageDecodeError

    path, images, enc = rendered_flickr
    rs = read_karpathy_json(path, images, limit=4)
    victim = rs.image_paths[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=victim.name):
        run_retrieval(enc, rs, show_progress=False)
