"""Readers on fixtures written in the official formats: Karpathy JSON, CSV mirrors, JSONL, SugarCrepe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fwd2bot_index.eval import (
    EvalDataError,
    MissingImageError,
    load_retrieval_set,
    read_captions_csv,
    read_captions_jsonl,
    read_karpathy_json,
    read_qa_jsonl,
    read_sugarcrepe,
)


def _touch_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)


def _karpathy_entry(imgid: int, filename: str, split: str, raws: list[str], filepath: str | None) -> dict:
    entry = {
        "sentids": list(range(10 * imgid, 10 * imgid + len(raws))),
        "imgid": imgid,
        "sentences": [
            {"tokens": raw.lower().rstrip(".").split(), "raw": raw, "imgid": imgid, "sentid": 10 * imgid + j}
            for j, raw in enumerate(raws)
        ],
        "split": split,
        "filename": filename,
    }
    if filepath is not None:
        entry["filepath"] = filepath
        entry["cocoid"] = 1000 + imgid
    return entry


@pytest.fixture()
def coco_karpathy(tmp_path: Path) -> Path:
    """A tiny dataset_coco.json: two test images (one with 6 captions), one train, one restval."""
    images = [
        _karpathy_entry(0, "COCO_val2014_000000000001.jpg", "test", [f"A dog number {j}." for j in range(6)], "val2014"),
        _karpathy_entry(1, "COCO_train2014_000000000002.jpg", "train", ["A cat."], "train2014"),
        _karpathy_entry(2, "COCO_val2014_000000000003.jpg", "restval", ["A bird."], "val2014"),
        _karpathy_entry(3, "COCO_val2014_000000000004.jpg", "test", ["A red bus.", "A bus on a road."], "val2014"),
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    for entry in images:
        _touch_image(tmp_path / "coco" / entry["filepath"] / entry["filename"])
    return path


def test_karpathy_test_split_with_filepath(coco_karpathy: Path, tmp_path: Path) -> None:
    rs = read_karpathy_json(coco_karpathy, tmp_path / "coco")
    assert rs.name == "coco" and rs.split == "test"
    assert [p.relative_to(tmp_path / "coco").as_posix() for p in rs.image_paths] == [
        "val2014/COCO_val2014_000000000001.jpg",
        "val2014/COCO_val2014_000000000004.jpg",
    ]
    assert rs.caption_to_image.dtype == np.int64
    assert rs.caption_to_image.tolist() == [0] * 6 + [1, 1]
    assert rs.captions[-2:] == ["A red bus.", "A bus on a road."]
    assert rs.captions_of(1) == ["A red bus.", "A bus on a road."]


def test_karpathy_options(coco_karpathy: Path, tmp_path: Path) -> None:
    root = tmp_path / "coco"
    assert read_karpathy_json(coco_karpathy, root, split="restval").captions == ["A bird."]
    assert read_karpathy_json(coco_karpathy, root, split=None).n_images == 4
    assert read_karpathy_json(coco_karpathy, root, limit=1).n_images == 1
    five = read_karpathy_json(coco_karpathy, root, max_captions_per_image=5)
    assert five.caption_to_image.tolist() == [0] * 5 + [1, 1]
    assert load_retrieval_set(coco_karpathy, root).n_captions == 8


def test_karpathy_flickr_without_filepath(tmp_path: Path) -> None:
    path = tmp_path / "dataset_flickr30k.json"
    entries = [_karpathy_entry(i, f"{1000 + i}.jpg", "test", [f"cap {i} a", f"cap {i} b"], None) for i in range(3)]
    path.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    for e in entries:
        _touch_image(tmp_path / "flickr30k-images" / e["filename"])
    rs = read_karpathy_json(path, tmp_path / "flickr30k-images")
    assert rs.name == "flickr30k" and rs.n_images == 3 and rs.n_captions == 6
    assert rs.image_paths[2] == tmp_path / "flickr30k-images" / "1002.jpg"


def test_missing_image_error_names_file_record_and_image(coco_karpathy: Path, tmp_path: Path) -> None:
    victim = tmp_path / "coco" / "val2014" / "COCO_val2014_000000000004.jpg"
    victim.unlink()
    with pytest.raises(MissingImageError) as info:
        read_karpathy_json(coco_karpathy, tmp_path / "coco")
    message = str(info.value)
    assert "dataset_coco.json" in message and "images[3]" in message and victim.name in message
    assert "skip_missing" in message
    rs = read_karpathy_json(coco_karpathy, tmp_path / "coco", skip_missing=True)
    assert rs.n_images == 1 and rs.skipped_missing == 1 and rs.caption_to_image.tolist() == [0] * 6


def test_karpathy_malformed_records_name_file_and_record(tmp_path: Path) -> None:
    path = tmp_path / "dataset_flickr30k.json"
    entry = _karpathy_entry(0, "1.jpg", "test", ["ok", "fine"], None)
    del entry["sentences"][1]["raw"]
    path.write_text(json.dumps({"images": [entry]}))
    with pytest.raises(EvalDataError, match=r"dataset_flickr30k\.json: images\[0\]\.sentences\[1\]: \"raw\""):
        read_karpathy_json(path, tmp_path)
    path.write_text(json.dumps({"images": [{"filename": "1.jpg", "sentences": []}]}))
    with pytest.raises(EvalDataError, match=r"images\[0\]: \"split\""):
        read_karpathy_json(path, tmp_path)
    path.write_text('{"images": [\n{"filename": }]}')
    with pytest.raises(EvalDataError, match=r"dataset_flickr30k\.json: line 2"):
        read_karpathy_json(path, tmp_path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(EvalDataError, match="Karpathy"):
        read_karpathy_json(path, tmp_path)


# ---------------------------------------------------------------------------- CSV mirrors


def _images(root: Path, names: list[str]) -> None:
    for name in names:
        _touch_image(root / name)


def test_csv_with_json_list_column_and_split(tmp_path: Path) -> None:
    # The layout of the common Hugging Face Flickr30k mirror: raw is a JSON list string.
    path = tmp_path / "flickr_annotations_30k.csv"
    path.write_text(
        "raw,sentids,split,filename,img_id\n"
        '"[""Two dogs run."", ""Dogs, running on grass.""]","[0, 1]",test,1000.jpg,0\n'
        '"[""A cat sleeps.""]","[2]",train,1001.jpg,1\n'
        '"[""A red car."", ""A car, parked.""]","[3, 4]",test,1002.jpg,2\n'
    )
    _images(tmp_path / "images", ["1000.jpg", "1001.jpg", "1002.jpg"])
    rs = read_captions_csv(path, tmp_path / "images")
    assert [p.name for p in rs.image_paths] == ["1000.jpg", "1002.jpg"]
    assert rs.captions == ["Two dogs run.", "Dogs, running on grass.", "A red car.", "A car, parked."]
    assert rs.caption_to_image.tolist() == [0, 0, 1, 1]
    assert load_retrieval_set(path, tmp_path / "images", split="train").captions == ["A cat sleeps."]


def test_csv_several_rows_per_image_pipe_delimited(tmp_path: Path) -> None:
    # The Kaggle Flickr30k results.csv layout: '|' separated, padded headers, no split column.
    path = tmp_path / "results.csv"
    path.write_text(
        "image_name| comment_number| comment\n"
        "1000.jpg| 0| Two young guys outside .\n"
        "1000.jpg| 1| Two men in a yard .\n"
        "1001.jpg| 0| A child climbs stairs .\n"
    )
    _images(tmp_path, ["1000.jpg", "1001.jpg"])
    with pytest.raises(EvalDataError, match="split=None"):
        read_captions_csv(path)
    rs = read_captions_csv(path, split=None)
    assert rs.caption_to_image.tolist() == [0, 0, 1]
    assert rs.captions[1] == "Two men in a yard ."


def test_csv_numbered_caption_columns_and_python_lists(tmp_path: Path) -> None:
    path = tmp_path / "captions.csv"
    path.write_text(
        "file_name,caption_2,caption_0,caption_1,split\n"
        "a.png,third,first,second,test\n"
        "b.png,,only one,,test\n"
    )
    _images(tmp_path, ["a.png", "b.png"])
    rs = read_captions_csv(path)
    assert rs.captions == ["first", "second", "third", "only one"]
    assert rs.caption_to_image.tolist() == [0, 0, 0, 1]
    py = tmp_path / "py.csv"
    py.write_text('image,captions,split\na.png,"[\'a dog\', ""it\'s a cat""]",test\n')
    assert read_captions_csv(py).captions == ["a dog", "it's a cat"]


def test_csv_malformed_rows_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    _images(tmp_path, ["a.png", "b.png"])
    path.write_text("filename,caption,split\na.png,fine,test\nb.png,oops\n")
    with pytest.raises(EvalDataError, match=r"bad\.csv: line 3: 2 fields"):
        read_captions_csv(path)
    path.write_text("filename,caption,split\na.png,fine,test\nb.png,\"[unclosed, list]\",test\n")
    with pytest.raises(EvalDataError, match=r"bad\.csv: line 3: caption cell looks like a list"):
        read_captions_csv(path)
    path.write_text("filename,caption,split\na.png,x,test\na.png,y,train\n")
    with pytest.raises(EvalDataError, match=r"line 3: image 'a.png' is in split 'train' here but 'test' at line 2"):
        read_captions_csv(path, split=None)
    path.write_text("name,words\na.png,x\n")
    with pytest.raises(EvalDataError, match=r"header: cannot tell which column holds the image file names"):
        read_captions_csv(path, split=None)
    assert read_captions_csv(path, split=None, image_column="name", caption_columns="words").captions == ["x"]


def test_csv_missing_image_names_line(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("filename,caption,split\na.png,x,test\nghost.png,y,test\n")
    _images(tmp_path, ["a.png"])
    with pytest.raises(MissingImageError, match=r"c\.csv: line 3: image not found: .*ghost\.png"):
        read_captions_csv(path)
    assert read_captions_csv(path, skip_missing=True).skipped_missing == 1


# ---------------------------------------------------------------------------- demo-data JSONL


def test_jsonl_captions_and_qa(tmp_path: Path) -> None:
    _images(tmp_path / "images", ["000000.png", "000001.png"])
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"image": "images/000000.png", "captions": ["a red circle", "red round"], "split": "test"})
        + "\n\n"
        + json.dumps({"image": "images/000001.png", "captions": ["a blue square"], "split": "train"})
        + "\n"
    )
    rs = read_captions_jsonl(tmp_path / "captions.jsonl")
    assert rs.captions == ["a red circle", "red round"] and rs.image_paths == [tmp_path / "images" / "000000.png"]
    (tmp_path / "qa.jsonl").write_text(
        json.dumps({"image": "images/000000.png", "question": "What color?", "answer": "red", "type": "color"})
        + "\n"
        + json.dumps({"image": "images/gone.png", "question": "What?", "answer": ["x", "y"]})
        + "\n"
    )
    with pytest.raises(MissingImageError, match=r"qa\.jsonl: line 2"):
        read_qa_jsonl(tmp_path / "qa.jsonl")
    qa = read_qa_jsonl(tmp_path / "qa.jsonl", skip_missing=True)
    assert qa.skipped_missing == 1 and qa.records[0].answers == ("red",) and qa.records[0].type == "color"
    (tmp_path / "qa.jsonl").write_text('{"image": "images/000000.png", "question": ""}\n')
    with pytest.raises(EvalDataError, match=r"qa\.jsonl: line 1: \"question\""):
        read_qa_jsonl(tmp_path / "qa.jsonl")


def test_unknown_annotation_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown annotation format"):
        load_retrieval_set(tmp_path / "x.parquet")


# ---------------------------------------------------------------------------- SugarCrepe


def _write_sugarcrepe(folder: Path, name: str, records: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(records, indent=4))
    return path


def test_sugarcrepe_official_format(tmp_path: Path) -> None:
    records = {
        "0": {"filename": "000000222235.jpg", "caption": "A cat on a mat.", "negative_caption": "A mat on a cat."},
        "1": {"filename": "000000480021.jpg", "caption": "A man waves.", "negative_caption": "Men wave."},
        "3": {"filename": "000000222235.jpg", "caption": "A cat sits.", "negative_caption": "A sits cat."},
    }
    _write_sugarcrepe(tmp_path / "sc", "swap_obj", records)
    _images(tmp_path / "val2017", ["000000222235.jpg", "000000480021.jpg"])
    data = read_sugarcrepe(tmp_path / "sc", tmp_path / "val2017", categories=["Swap-Obj"])
    pairs = data["swap_obj"].pairs
    assert [p.key for p in pairs] == ["0", "1", "3"]
    assert pairs[2].image == tmp_path / "val2017" / "000000222235.jpg"
    assert pairs[1].negative_caption == "Men wave."
    assert len(read_sugarcrepe(tmp_path / "sc", categories=["swap_obj"], limit=2)["swap_obj"].pairs) == 2


def test_sugarcrepe_errors(tmp_path: Path) -> None:
    folder = tmp_path / "sc"
    _write_sugarcrepe(folder, "add_att", {"0": {"filename": "a.jpg", "caption": "x", "negative_caption": "y"},
                                          "7": {"filename": "b.jpg", "caption": "x"}})
    with pytest.raises(FileNotFoundError, match="replace_obj.json"):
        read_sugarcrepe(folder)
    with pytest.raises(ValueError, match="unknown SugarCrepe category 'add-color'"):
        read_sugarcrepe(folder, categories=["add-color"])
    with pytest.raises(EvalDataError, match=r"add_att\.json: record '7': 'negative_caption'"):
        read_sugarcrepe(folder, categories=["add_att"])
    _write_sugarcrepe(folder, "add_att", {"0": {"filename": "a.jpg", "caption": "x", "negative_caption": "y"}})
    with pytest.raises(MissingImageError, match=r"add_att\.json: record '0': image not found"):
        read_sugarcrepe(folder, tmp_path / "imgs", categories=["add_att"])
    skipped = read_sugarcrepe(folder, tmp_path / "imgs", categories=["add_att"], skip_missing=True)["add_att"]
    assert skipped.pairs == [] and skipped.skipped_missing == 1
    _write_sugarcrepe(folder, "add_att", [{"filename": "a.jpg"}])  # a list, not the keyed object
    with pytest.raises(EvalDataError, match="top level"):
        read_sugarcrepe(folder, categories=["add_att"])
