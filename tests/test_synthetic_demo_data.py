"""write_demo_data: the on-disk layout of ARCHITECTURE.md ("demo-data layout"), on real files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from fwd2bot_index.synthetic import CATEGORIES, HELD_OUT_PAIRS, Scene, assign_splits, write_demo_data

REAL_SUGARCREPE = Path(__file__).resolve().parent / "data" / "sugarcrepe"  # vendored sample, see SOURCE.md


def read_sugarcrepe(path: Path) -> list[dict[str, str]]:
    """Read a SugarCrepe file the way an evaluator reads the official ones: a JSON object keyed by
    integers written as strings ("0", "1", ...; the official files skip some) whose values hold the
    string fields filename, caption and negative_caption."""
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert all(key.isdigit() for key in data)
    rows = [data[key] for key in sorted(data, key=int)]
    for row in rows:
        assert set(row) == {"filename", "caption", "negative_caption"}
        assert all(isinstance(v, str) and v for v in row.values())
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    calls = []
    manifest = write_demo_data(out, n=60, seed=3, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (1, 60) and calls[-1] == (60, 60) and len(calls) == 60
    return out, manifest


def test_layout_and_manifest(demo: tuple[Path, dict]) -> None:
    out, manifest = demo
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"{i:06d}.png" for i in range(60)]
    assert manifest["splits"] == {"train": 48, "test": 6, "test_unseen": 6}
    assert json.loads((out / "demo_data.json").read_text()) == manifest
    assert not list(out.rglob("*.tmp")) and not (out / ".demo_data_incomplete").exists()
    with Image.open(out / "images" / "000000.png") as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_captions_jsonl(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    rows = _read_jsonl(out / "captions.jsonl")
    assert [r["image"] for r in rows] == [f"images/{i:06d}.png" for i in range(60)]
    assert [r["split"] for r in rows] == assign_splits(60)
    for r in rows:
        assert set(r) == {"image", "captions", "split"}
        assert (out / r["image"]).is_file()
        assert len(r["captions"]) >= 3 and all(isinstance(c, str) for c in r["captions"])
    firsts = [r["captions"][0] for r in rows]
    assert len(set(firsts)) == len(firsts)


def test_scenes_jsonl_rebuilds_the_images_and_captions(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    captions = {r["image"]: r for r in _read_jsonl(out / "captions.jsonl")}
    for rec in _read_jsonl(out / "scenes.jsonl")[:15]:
        scene = Scene.from_dict(rec["scene"])
        assert scene.captions() == captions[rec["image"]]["captions"]
        assert scene.split == captions[rec["image"]]["split"]
        with Image.open(out / rec["image"]) as im:
            assert im.tobytes() == scene.render(64).tobytes()
        pairs = {(o.color, o.shape) for o in scene.objects}
        assert bool(pairs & HELD_OUT_PAIRS) == (scene.split == "test_unseen")


def test_qa_jsonl(demo: tuple[Path, dict]) -> None:
    out, manifest = demo
    rows = _read_jsonl(out / "qa.jsonl")
    assert len(rows) == manifest["qa"] >= 60 * 6
    scenes = {r["image"]: Scene.from_dict(r["scene"]) for r in _read_jsonl(out / "scenes.jsonl")}
    for r in rows:
        assert set(r) == {"image", "question", "answer", "type"}
        assert (out / r["image"]).is_file()
    assert {r["type"] for r in rows} == {"color", "shape", "count", "position", "existence", "relation"}
    assert rows[:8] == [{"image": "images/000000.png", **q} for q in scenes["images/000000.png"].qa()]


def test_reader_accepts_the_official_files() -> None:
    for category in CATEGORIES:
        assert read_sugarcrepe(REAL_SUGARCREPE / f"{category}.json")


def test_sugarcrepe_files(demo: tuple[Path, dict]) -> None:
    out, manifest = demo
    splits = {r["image"]: r["split"] for r in _read_jsonl(out / "captions.jsonl")}
    scenes = {r["image"]: Scene.from_dict(r["scene"]) for r in _read_jsonl(out / "scenes.jsonl")}
    assert sorted(p.name for p in (out / "sugarcrepe").iterdir()) == sorted(f"{c}.json" for c in CATEGORIES)
    for category in CATEGORIES:
        rows = read_sugarcrepe(out / "sugarcrepe" / f"{category}.json")
        keys = list(json.loads((out / "sugarcrepe" / f"{category}.json").read_text()))
        assert keys == [str(k) for k in range(len(keys))]  # ours have no gaps
        assert len(rows) == manifest["sugarcrepe"][category] > 0
        for row in rows:
            assert (out / "images" / row["filename"]).is_file()
            image = f"images/{row['filename']}"
            assert splits[image] in ("test", "test_unseen")  # an evaluation set: no training scenes
            assert scenes[image].check(row["caption"]) and not scenes[image].check(row["negative_caption"])


def test_hard_negatives_jsonl_covers_every_split(demo: tuple[Path, dict]) -> None:
    out, manifest = demo
    rows = _read_jsonl(out / "hard_negatives.jsonl")
    assert len(rows) == manifest["hard_negatives"]
    assert {r["split"] for r in rows} == {"train", "test", "test_unseen"}
    assert {r["category"] for r in rows} == set(CATEGORIES)


def test_rerun_is_byte_identical_and_a_smaller_rerun_drops_stale_images(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_demo_data(a, n=25, seed=1)
    write_demo_data(b, n=25, seed=1)
    first = _digests(a)
    assert first == _digests(b)
    write_demo_data(a, n=25, seed=1)
    assert _digests(a) == first
    write_demo_data(a, n=10, seed=1)
    assert sorted(p.name for p in (a / "images").iterdir()) == [f"{i:06d}.png" for i in range(10)]
    assert len(_read_jsonl(a / "captions.jsonl")) == 10
    write_demo_data(b, n=25, seed=2)
    assert _digests(b) != first


def test_interrupted_run_leaves_no_table_pretending_to_be_complete(tmp_path: Path) -> None:
    write_demo_data(tmp_path, n=12, seed=0)

    def stop(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_demo_data(tmp_path, n=12, seed=9, progress=stop)
    assert not (tmp_path / "demo_data.json").exists()
    assert (tmp_path / ".demo_data_incomplete").exists()
    assert not (tmp_path / "captions.jsonl").exists() and not (tmp_path / "qa.jsonl").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    manifest = write_demo_data(tmp_path, n=12, seed=9)
    assert manifest["seed"] == 9 and (tmp_path / "demo_data.json").exists()
    assert not (tmp_path / ".demo_data_incomplete").exists()


def test_foreign_files_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "000050.png").write_bytes(b"someone else's")
    (tmp_path / "notes.txt").write_text("keep me")
    write_demo_data(tmp_path, n=5, seed=0)
    assert (tmp_path / "images" / "000050.png").read_bytes() == b"someone else's"
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_image_size_128_and_swapped_images(tmp_path: Path) -> None:
    manifest = write_demo_data(tmp_path, n=10, seed=4, image_size=128, swapped=True)
    with Image.open(tmp_path / "images" / "000003.png") as im:
        assert im.size == (128, 128)
    rows = _read_jsonl(tmp_path / "swapped.jsonl")
    assert len(rows) == manifest["swapped"] > 0
    scenes = {r["image"]: Scene.from_dict(r["scene"]) for r in _read_jsonl(tmp_path / "scenes.jsonl")}
    for r in rows:
        with Image.open(tmp_path / r["swapped_image"]) as im:
            assert im.size == (128, 128)
        scene = scenes[r["image"]]
        assert r["caption"] == scene.caption and not scene.check(r["negative_caption"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must"),
        ({"n": 3, "image_size": 16}, "image_size"),
        ({"n": 3, "seed": -1}, "seed"),
        ({"n": 3, "sugarcrepe_splits": ("dev",)}, "sugarcrepe_splits"),
        ({"n": 3, "split_fractions": (1.0, 0.0)}, "split fractions"),
    ],
)
def test_bad_arguments_are_refused_before_writing(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_demo_data(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_file_in_place_of_the_folder_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.write_text("not a folder")
    with pytest.raises(ValueError, match="not a folder"):
        write_demo_data(target, n=2)
    assert target.read_text() == "not a folder"
