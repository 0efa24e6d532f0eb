"""Issue 22, items 3 and 4: paths whose files no longer hold their recorded content, and ``remove`` as
one transaction (SIGKILL inside it, and right after its commit).

The swapped-paths case: two catalog rows with their paths swapped. When sizes and times agree it is
silent to every cheap check (only ``verify --deep`` re-hashes); when they differ, ``index`` re-hashes
both files and used to link them one at a time, which deleted one image as an orphan and recorded the
other file as failed on every later run. No model: the collection API, real FAISS and SQLite.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fwd2bot_index.collection import Collection, Manifest, NewImage
from fwd2bot_index.collection.removing import HOLD_ENV
from fwd2bot_index.collection.tokens import file_sha256

D, T, H = 8, 2, 4


def vec(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(size=D).astype(np.float32)


def make(folder: Path, photos: Path, n: int, same_size: bool = True) -> list[Path]:
    """A collection of ``n`` small files with real content hashes; returns their paths (image i+1)."""
    photos.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = photos / f"{i}.jpg"
        p.write_bytes((b"photo %03d" % i) if same_size else b"photo " + b"x" * (i + 1))
        os.utime(p, (1_000_000, 1_000_000))
        paths.append(p)
    m = Manifest(model_name="demo", model_fingerprint="fp", strategy={"embed": "prompt", "tokens": "pool"},
                 embed_dim=D, token_count=T, token_dim=H)
    with Collection.create(folder, m) as col:
        items = [NewImage(str(p), file_sha256(p), p.stat().st_size, p.stat().st_mtime, {"i": i})
                 for i, p in enumerate(paths)]
        col.add_batch(items, np.stack([vec(i) for i in range(n)]), np.ones((n, T, H), np.float32) * 0.5)
    return paths


def swap_paths(folder: Path, a: Path, b: Path) -> None:
    """Swap the path column of two catalog rows (size and mtime stay with their rows)."""
    db = sqlite3.connect(folder / "catalog.sqlite")
    with db:
        db.execute("UPDATE paths SET path='tmp' WHERE path=?", (str(a),))
        db.execute("UPDATE paths SET path=? WHERE path=?", (str(a), str(b)))
        db.execute("UPDATE paths SET path=? WHERE path='tmp'", (str(b),))
    db.close()


def test_swapped_paths_are_silent_to_cheap_checks_named_by_deep_and_relinked(tmp_path):
    folder = tmp_path / "col"
    a, b, *_ = make(folder, tmp_path / "photos", 4)
    swap_paths(folder, a, b)
    with Collection.open(folder) as col:
        assert col.verify().ok  # sizes and times agree: nothing cheap can see it
        report = col.verify(deep=True)
        assert not report.ok and sorted((m["path"], m["id"], m["found"]) for m in report.mismatched_paths) == \
            [(str(a), 2, 1), (str(b), 1, 2)]
        assert all("\n" not in p and "verify --deep --repair" in p for p in report.problems)
    with Collection.open(folder, writable=True) as col:
        fixed = col.repair(deep=True)
        assert fixed.ok, fixed.problems
        assert any("re-linked 2 path(s)" in line for line in fixed.actions)
        assert col.resolve(str(a)).id == 1 and col.resolve(str(b)).id == 2 and len(col) == 4
        assert col.search(vec(0), k=1)[0].path == str(a)  # results show each image under its own file


def test_f2b_verify_deep_names_and_repairs_swapped_paths(tmp_path):
    from typer.testing import CliRunner

    from fwd2bot_index.cli.main import app

    folder = tmp_path / "col"
    a, b, *_ = make(folder, tmp_path / "photos", 4)
    swap_paths(folder, a, b)
    runner = CliRunner()
    assert runner.invoke(app, ["verify", "-c", str(folder)]).exit_code == 0
    deep = runner.invoke(app, ["verify", "--deep", "-c", str(folder)])
    assert deep.exit_code == 1 and f"{a} is recorded as image 2 but now holds image 1's content" in deep.output
    fixed = runner.invoke(app, ["verify", "--deep", "--repair", "-c", str(folder)])
    assert fixed.exit_code == 0 and "repaired: re-linked 2 path(s)" in fixed.output, fixed.output
    assert runner.invoke(app, ["verify", "--deep", "-c", str(folder)]).exit_code == 0


def test_index_relinks_swapped_files_in_one_commit_instead_of_failing_one(tmp_path):
    """Sizes differ: the plan re-hashes both files and finds each holds the other row's image. Linked
    together nothing is orphaned, nothing is recorded as failed, nothing needs encoding."""
    folder = tmp_path / "col"
    a, b, *_ = make(folder, tmp_path / "photos", 4, same_size=False)
    swap_paths(folder, a, b)
    with Collection.open(folder, writable=True) as col:
        plan = col.plan([a, b])
        assert not plan.to_encode and sorted(f.path for f in plan.duplicates) == sorted([str(a), str(b)])
        linked = dict(zip((f.path for f in plan.duplicates), col.add_path_aliases(plan.duplicates)))
        assert linked == {str(a): 1, str(b): 2}
        assert len(col) == 4 and not col.failures() and col.verify(deep=True).ok
        assert col.resolve(str(a)).id == 1 and col.resolve(str(b)).id == 2
        again = col.plan([a, b])
        assert len(again.already_indexed) == 2 and not again.failed_unchanged


def test_a_file_with_new_content_and_old_times_is_re_encoded_after_deep_repair(tmp_path):
    """Content no image has, size and mtime restored: deep repair marks the path changed, and the next
    index plans it for encoding (its old image then goes like any overwritten file's)."""
    folder = tmp_path / "col"
    a, *_ = make(folder, tmp_path / "photos", 3)
    a.write_bytes(b"photo 999")
    os.utime(a, (1_000_000, 1_000_000))
    with Collection.open(folder, writable=True) as col:
        assert not col.plan([a]).to_encode  # unchanged to the cheap check
        report = col.repair(deep=True)
        assert any("next f2b index re-encodes them" in line for line in report.actions)
        assert [f.path for f in col.plan([a]).to_encode] == [str(a)] and len(col) == 3


def test_a_file_written_between_hashing_and_relinking_is_re_read_not_relinked(tmp_path):
    """``verify --deep --repair`` hashes every file, then re-links: a file written in between used to be
    linked to the image found at hashing time *with its new size and mtime*, so no later index re-hashed
    it and the catalog said it held content it did not. The two phases are called directly, the file
    rewritten between them: it is marked changed and the next index re-encodes it; the unchanged file of
    the swap is re-linked."""
    from fwd2bot_index.collection.paths_check import path_mismatches, relink

    folder = tmp_path / "col"
    a, b, *_ = make(folder, tmp_path / "photos", 4)
    swap_paths(folder, a, b)
    with Collection.open(folder, writable=True) as col:
        found = path_mismatches(col.catalog)
        assert sorted((m["path"], m["found"]) for m in found) == [(str(a), 1), (str(b), 2)]
        a.write_bytes(b"photo 777")  # new content, same size; its mtime is now
        with col._writing():
            actions = relink(col, found)
        assert [f.path for f in col.plan([a]).to_encode] == [str(a)]  # re-read, and new content: encoded
        assert any("1 path(s) changed while they were checked" in line for line in actions), actions
        assert col.resolve(str(b)).id == 2  # unchanged since hashing: re-linked
        assert all(m["size"] == 9 and m["mtime"] == 1_000_000 for m in found)  # the stat from before hashing
        assert col.resolve(str(a)).id == 2 and 1 not in col.catalog.ids().tolist()  # image 1's only file was overwritten


def test_a_file_written_while_it_is_hashed_is_not_relinked(tmp_path, monkeypatch):
    """The stat is taken *before* hashing: a write that lands while the file is read (here: right after
    the real hash has read it) leaves the file with a stat other than the one carried, so it is not
    re-linked. A stat taken after hashing would carry the new stat with the old content's image."""
    from fwd2bot_index.collection import paths_check

    folder = tmp_path / "col"
    a, b, *_ = make(folder, tmp_path / "photos", 4)
    swap_paths(folder, a, b)
    real = paths_check.file_sha256

    def written_meanwhile(path):
        digest = real(path)
        if path == str(a):
            a.write_bytes(b"photo 777")  # lands as the hash finishes: the digest is of the old content
        return digest

    monkeypatch.setattr(paths_check, "file_sha256", written_meanwhile)
    with Collection.open(folder, writable=True) as col:
        found = paths_check.path_mismatches(col.catalog)
        monkeypatch.setattr(paths_check, "file_sha256", real)
        assert sorted((m["path"], m["found"]) for m in found) == [(str(a), 1), (str(b), 2)]
        with col._writing():
            actions = paths_check.relink(col, found)
        assert any("1 path(s) changed while they were checked" in line for line in actions), actions
        assert col.resolve(str(b)).id == 2
        assert [f.path for f in col.plan([a]).to_encode] == [str(a)]


# ------------------------------------------------------------------------------------ atomic remove


def _remove_in_child(folder: Path, refs: list[str], hold: str | None, marker: Path) -> subprocess.Popen:
    """``f2b remove`` in a subprocess; with ``hold``, it stops at that step (the removal hook) and
    writes ``marker``; the caller kills it there. Nothing is timed: the child waits for its kill."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if hold:
        env[HOLD_ENV] = f"{hold}:{marker}"
    return subprocess.Popen([sys.executable, "-m", "fwd2bot_index.cli", "remove", *refs, "--collection", str(folder)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_at_marker(proc: subprocess.Popen, marker: Path) -> None:
    deadline = time.time() + 120  # a bound for a loaded machine, not a timing assertion
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate(timeout=30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("hold", ["before-commit", "after-commit"])
def test_sigkill_during_remove_removes_all_or_none_and_a_rerun_finishes(tmp_path, hold):
    folder = tmp_path / "col"
    paths = make(folder, tmp_path / "photos", 40)
    refs = [str(i) for i in range(1, 31)] + [str(paths[35])]  # 30 ids and one path: 31 images
    marker = tmp_path / "held"
    _kill_at_marker(_remove_in_child(folder, refs, hold, marker), marker)
    expect = 40 if hold == "before-commit" else 9  # all or nothing, never part
    with Collection.open(folder) as col:
        assert len(col) == expect
    with Collection.open(folder, writable=True) as col:  # the index catches up with the commit
        assert len(col) == expect and col.verify().ok and len(col.index) == expect
    rerun = _remove_in_child(folder, refs, None, marker)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    said = out.count("already removed")
    assert said == (0 if hold == "before-commit" else 31), out  # the rerun says what was left to do
    with Collection.open(folder) as col:
        assert len(col) == 9 and col.verify().ok
        assert sorted(r.metadata["i"] for r in col.list_images(0, 100)) == [30, 31, 32, 33, 34, 36, 37, 38, 39]


# ------------------------------------------------------------------------------------ through f2b index


def test_f2b_index_after_files_swapped_or_renamed_over_fails_nothing(tmp_path):
    """As a user meets it (tiny model): two files swap names; then a file is renamed and a new picture
    takes its old name. Every later run: nothing failed, nothing re-encoded that was stored, each
    path shows its own content."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from fwd2bot_index.cli.main import app
    from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava

    model = save_tiny_llava(tmp_path / "m", TinySpec(image_size=64), seed=0)
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(64, 64), (80, 48), (48, 80), (72, 72)]):
        Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)).save(images / f"{i}.png")
    coll = tmp_path / "c"
    runner = CliRunner()
    args = ["index", str(images), "-c", str(coll), "-m", str(model), "--device", "cpu", "--json"]

    def index() -> dict:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def check() -> None:
        with Collection.open(coll) as col:
            for p in images.iterdir():
                assert col.resolve(str(p)).hash == file_sha256(p), p
            assert not col.failures() and col.verify(deep=True).ok

    assert index()["indexed"] == 4
    (images / "0.png").rename(images / "tmp.png")
    (images / "1.png").rename(images / "0.png")
    (images / "tmp.png").rename(images / "1.png")
    swapped = index()
    assert swapped["indexed"] == 0 and swapped["failed"] == [], swapped
    check()
    (images / "2.png").rename(images / "renamed.png")
    Image.new("RGB", (56, 56), (1, 2, 3)).save(images / "2.png")  # a new picture under the old name
    renamed = index()
    assert renamed["indexed"] == 1 and renamed["failed"] == [], renamed
    check()
    with Collection.open(coll) as col:
        assert len(col) == 5 and index()["failed"] == []
