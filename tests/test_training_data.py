"""Training data readers: every format, clear errors for malformed records, unreadable images counted."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from fwd2bot_index.training.data import (
    DataFormatError,
    ImageLoader,
    read_dataset,
    split_samples,
)


def _png(path, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_pairs_relative_paths_and_grouping(tmp_path):
    _png(tmp_path / "img" / "a.png")
    data = _lines(tmp_path / "pairs.jsonl", [
        {"image": "img/a.png", "captions": ["a red square", "red"]},
        {"image": "img/a.png", "caption": "a square"},  # a second row of the same image adds a caption
        {"image_path": "img/b.png", "text": "b"},
    ])
    samples = read_dataset(data)
    assert [s.image for s in samples] == [tmp_path / "img" / "a.png", tmp_path / "img" / "b.png"]
    assert samples[0].captions == ["a red square", "red", "a square"]
    assert samples[1].captions == ["b"]


def test_bad_json_line_names_file_and_line(tmp_path):
    data = _lines(tmp_path / "pairs.jsonl", [{"image": "a.png", "caption": "x"}, "", '{"image": "b.png", "capt'])
    with pytest.raises(DataFormatError) as err:
        read_dataset(data)
    assert f"{data}:3" in str(err.value) and "not valid JSON" in str(err.value)


def test_missing_field_names_file_line_and_field(tmp_path):
    data = _lines(tmp_path / "pairs.jsonl", [{"image": "a.png", "caption": "x"}, {"image": "b.png", "label": 3}])
    with pytest.raises(DataFormatError) as err:
        read_dataset(data)
    text = str(err.value)
    assert f"{data}:2" in text and "no caption" in text and "label" in text
    data = _lines(tmp_path / "p2.jsonl", [{"caption": "x"}])
    with pytest.raises(DataFormatError, match=r"p2.jsonl:1: no image path"):
        read_dataset(data)
    data = _lines(tmp_path / "p3.jsonl", [{"image": "a.png", "captions": ["ok", 5]}])
    with pytest.raises(DataFormatError, match=r"p3.jsonl:1: field 'captions'.*list of strings"):
        read_dataset(data)


def test_csv_rows_group_by_image_and_errors_name_line(tmp_path):
    data = tmp_path / "pairs.csv"
    data.write_text('image,caption\na.png,first\nb.png,"with, comma"\na.png,second\n')
    samples = read_dataset(data)
    assert [s.captions for s in samples] == [["first", "second"], ["with, comma"]]
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\na.png,x\nb.png,\n")
    with pytest.raises(DataFormatError, match=r"bad.csv:3: no caption"):
        read_dataset(bad)
    extra = tmp_path / "extra.csv"
    extra.write_text("image,caption\na.png,x,oops\n")
    with pytest.raises(DataFormatError, match=r"extra.csv:2: more cells"):
        read_dataset(extra)


def test_parquet_with_caption_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"file_name": ["x/a.png", "x/b.png"], "captions": [["one", "uno"], ["two"]],
                      "split": ["train", "val"]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    samples = read_dataset(tmp_path / "pairs.parquet")
    assert samples[0].captions == ["one", "uno"] and samples[0].image == tmp_path / "x" / "a.png"
    train, held = split_samples(samples)
    assert [s.captions[0] for s in train] == ["one"] and [s.captions[0] for s in held] == ["two"]
    pq.write_table(pa.table({"file_name": ["a.png"], "score": [1.0]}), tmp_path / "bad.parquet")
    with pytest.raises(DataFormatError, match=r"bad.parquet \(row 0\): no caption"):
        read_dataset(tmp_path / "bad.parquet")


def test_llava_instruction_json(tmp_path):
    records = [
        {"id": "1", "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": "A dog on a couch."},
            {"from": "human", "value": "What color is the dog?"},
            {"from": "gpt", "value": "Brown."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records, indent=1))
    samples = read_dataset(tmp_path / "llava.json", image_root=tmp_path / "images")
    assert len(samples) == 1  # the text-only record has nothing to compress
    assert samples[0].image == tmp_path / "images" / "coco" / "1.jpg"
    assert samples[0].qa == [("Describe the image briefly.", "A dog on a couch."), ("What color is the dog?", "Brown.")]
    assert samples[0].captions == ["A dog on a couch."]
    records[0]["conversations"][1]["from"] = "human"
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(DataFormatError, match=r"bad.json \(record 0\): conversation turns 0/1 must be 'human' then 'gpt'"):
        read_dataset(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('[{"image": "a.png",\n "conversations": [}]')
    with pytest.raises(DataFormatError, match=r"broken.json:2: not valid JSON"):
        read_dataset(tmp_path / "broken.json")


def test_demo_folder_merges_captions_and_qa_and_holds_out_test(tmp_path):
    _lines(tmp_path / "captions.jsonl", [
        {"image": "images/000000.png", "captions": ["a red circle", "red"], "split": "train"},
        {"image": "images/000001.png", "captions": ["a blue star"], "split": "test"},
        {"image": "images/000002.png", "captions": ["a pink ring"], "split": "test_unseen"},
    ])
    _lines(tmp_path / "qa.jsonl", [
        {"image": "images/000000.png", "question": "What color is the circle?", "answer": "red", "type": "color"},
    ])
    samples = read_dataset(tmp_path)
    assert samples[0].qa == [("What color is the circle?", "red")]
    train, held = split_samples(samples)
    assert [s.captions[0] for s in train] == ["a red circle"]  # test_unseen never trains
    assert [s.captions[0] for s in held] == ["a blue star"]
    _lines(tmp_path / "qa.jsonl", [{"image": "images/000000.png", "question": "Q?"}])
    with pytest.raises(DataFormatError, match=r"qa.jsonl:1: missing or non-text field\(s\) answer"):
        read_dataset(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no captions.jsonl"):
        read_dataset(tmp_path / "empty")


def test_synthetic_world_folder_reads(tmp_path):
    synthetic = pytest.importorskip("fwd2bot_index.synthetic")
    synthetic.write_demo_data(tmp_path / "demo", n=20, seed=0, image_size=32)
    samples = read_dataset(tmp_path / "demo")
    assert len(samples) == 20 and all(s.captions and s.qa for s in samples)
    train, held = split_samples(samples)
    assert train and held and {s.split for s in train} == {"train"} and {s.split for s in held} == {"test"}
    loader = ImageLoader()
    assert loader.load(train[0]).size == (32, 32) and not loader.skipped


def test_hash_split_is_stable_and_disjoint(tmp_path):
    rows = [{"image": f"{i}.png", "caption": f"c{i}"} for i in range(200)]
    samples = read_dataset(_lines(tmp_path / "p.jsonl", rows))
    train, held = split_samples(samples, eval_fraction=0.1)
    again_train, again_held = split_samples(samples, eval_fraction=0.1)
    assert [s.key for s in held] == [s.key for s in again_held] and 5 <= len(held) <= 40
    assert not {s.key for s in train} & {s.key for s in held} and len(train) + len(held) == 200
    assert split_samples(samples, eval_split="none")[1] == []
    with pytest.raises(DataFormatError, match="no records of split 'val'"):
        split_samples(samples, eval_split="val")


def test_unknown_format_and_missing_path(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataFormatError, match="unknown data format '.txt'"):
        read_dataset(tmp_path / "data.txt")
    with pytest.raises(DataFormatError, match="no such file"):
        read_dataset(tmp_path / "nope.jsonl")


def test_image_loader_skips_and_counts_missing_and_corrupt(tmp_path):
    good = _png(tmp_path / "good.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    (tmp_path / "text.png").write_text("not an image")
    rows = [{"image": n, "caption": n} for n in ("good.png", "missing.png", "truncated.png", "text.png")]
    samples = read_dataset(_lines(tmp_path / "p.jsonl", rows))
    loader = ImageLoader()
    loaded = [loader.load(s) for s in samples]
    assert loaded[0] is not None and loaded[1:] == [None, None, None]
    assert loader.skipped[str(tmp_path / "missing.png")] == "missing"
    assert loader.skipped[str(truncated)].startswith("undecodable")
    assert loader.load(samples[2]) is None and len(loader.skipped) == 3  # counted once
    assert "skipped 3 unreadable image(s)" in loader.report()
