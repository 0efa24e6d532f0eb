"""The damage suite: every part of a collection, damaged every way, then every command.

Parts: catalog.sqlite, manifest.json, the first and the last token shard, index.faiss,
index.state.json. Damage: truncate to half, empty (0 bytes), zero every byte, delete, flip 64 bytes,
swap in another collection's copy of the part, and a plausible edit that keeps the file valid (catalog:
every image row deleted; manifest: embed_dim changed; shard: embeddings negated; index: an empty index
of the right kind; state: a wrong catalog version). Commands: verify (read-only), verify --repair (``Collection.recover``
then ``repair``), remove, index (a new batch) and the server's writable open plus a search.

After each, the suite checks what a careful operator would: no command calls a damaged collection ok
(unless the bytes that changed carried nothing, and the content is exactly what it was), every
message is one line, and after the repair path nothing whose data still exists is lost: each image
is back with its own tokens, or (its stored data damaged) its file exists so the next ``f2b index``
re-encodes it, or it is kept in the catalog and reported. No model and no torch: the collection API.

``F2B_DAMAGE_TABLE=path`` writes the damage x command -> outcome table as Markdown.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fwd2bot_index.collection import Collection, CollectionError, Manifest, NewImage

D, T, H = 16, 4, 8
BATCHES = [range(0, 6), range(6, 12), range(12, 18)]
PARTS = ["catalog", "manifest", "first shard", "last shard", "index", "state"]
KINDS = ["truncate", "empty", "zero", "delete", "flip", "swap", "edit"]
COMMANDS = ["verify", "repair", "remove", "index", "serve"]
TABLE: dict[tuple[str, str, str], str] = {}


def emb(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(size=D).astype(np.float32)


def tok(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).normal(size=(T, H)).astype(np.float32)


def manifest(fp: str = "fp-demo") -> Manifest:
    return Manifest(model_name="demo", model_fingerprint=fp, strategy={"embed": "prompt", "tokens": "pool"},
                    embed_dim=D, token_count=T, token_dim=H)


def photo(root: Path, i: int) -> str:
    """Even images have their file on disk (re-encodable); odd ones do not."""
    if i % 2:
        return str(root / "gone" / f"{i}.jpg")
    path = root / "photos" / f"{i}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"image %d" % i)
    return str(path)


def add(col: Collection, root: Path, nums, salt: str = "") -> list[int]:
    items = [NewImage(photo(root, i), f"{salt}hash{i}", 10 + i, 1.0, {"i": i}) for i in nums]
    return col.add_batch(items, np.stack([emb(i) for i in nums]), np.stack([tok(i) for i in nums]))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    golden = root / "golden"
    with Collection.create(golden, manifest()) as col:
        for nums in BATCHES:
            add(col, root, nums)
    other = root / "other"
    with Collection.create(other, manifest("fp-other")) as col:
        add(col, root / "elsewhere", range(100, 104), salt="x")
    return root, golden, other


def part_path(folder: Path, part: str) -> Path:
    shards = sorted((folder / "tokens").glob("*.arrow"))
    return {"catalog": folder / "catalog.sqlite", "manifest": folder / "manifest.json", "first shard": shards[0],
            "last shard": shards[-1], "index": folder / "index.faiss", "state": folder / "index.state.json"}[part]


def damage(folder: Path, other: Path, part: str, kind: str) -> None:
    path = part_path(folder, part)
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "zero":
        path.write_bytes(bytes(len(data)))
    elif kind == "delete":
        path.unlink()
    elif kind == "flip":
        rng = np.random.default_rng(7)
        buf = bytearray(data)
        for pos in rng.integers(len(buf) // 8, len(buf), size=64):
            buf[pos] ^= 0xFF
        path.write_bytes(bytes(buf))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "swap":  # the other collection's copy of the same part
        shutil.copyfile(part_path(other, part), path)
    else:
        edit(folder, part, path)


def edit(folder: Path, part: str, path: Path) -> None:
    """A change that leaves the file well-formed: only meaning-level checks can catch it."""
    import json
    import sqlite3

    if part == "catalog":
        db = sqlite3.connect(path)
        db.execute("DELETE FROM images")
        db.commit()
        db.close()
    elif part == "manifest":
        data = json.loads(path.read_text())
        data["embed_dim"] = 32
        path.write_text(json.dumps(data))
    elif part.endswith("shard"):
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.ipc as ipc

        with pa.memory_map(str(path)) as src:
            table = ipc.open_file(src).read_all()
        emb_col = table.column("embedding").combine_chunks()
        negated = pa.FixedSizeListArray.from_arrays(pc.negate(emb_col.values), D)
        table = table.set_column(table.schema.get_field_index("embedding"), "embedding", negated)
        with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    elif part == "index":
        import faiss

        faiss.write_index(faiss.IndexIDMap(faiss.IndexFlatIP(D)), str(path))
    else:
        data = json.loads(path.read_text())
        data["catalog_version"] = 12345
        path.write_text(json.dumps(data))


def at_risk(part: str, kind: str) -> set[int]:
    """Images whose stored data this damage may destroy."""
    if part == "first shard":
        return set(BATCHES[0])
    if part == "last shard":
        return set(BATCHES[-1])
    return set()


def one_line(text: str) -> str:
    assert "\n" not in text and text.strip(), repr(text)
    return text


def run(command: str, folder: Path, root: Path) -> tuple[str, dict]:
    """Run one command; returns (outcome for the table, facts for the checks)."""
    facts: dict = {}
    try:
        if command == "verify":
            with Collection.open(folder) as col:
                report = col.verify()
            for p in report.problems:
                one_line(p)
            facts["ok"] = report.ok
            return ("ok" if report.ok else f"not ok: {len(report.problems)} problem(s) named"), facts
        if command == "repair":
            actions = Collection.recover(folder)
            with Collection.open(folder, writable=True) as col:
                report = col.repair()
            for line in actions + report.actions + report.problems:
                one_line(line)
            facts["ok"] = report.ok
            return summarize(actions + report.actions, report.ok), facts
        with Collection.open(folder, writable=True) as col:
            if command == "remove":
                facts["removed"] = col.remove([3, 3])  # image 2 (ids start at 1)
                col.remove([3])  # idempotent: removing it again is fine
            elif command == "index":
                facts["added"] = add(col, root, [50])
            else:
                facts["hit"] = col.search(emb(4), k=1)[0].metadata["i"] if len(col) else None
        return "done", facts
    except CollectionError as exc:
        facts["refused"] = one_line(str(exc))
        return "refused: " + str(exc).split(";")[0].split(" (")[0].replace(str(folder), "…"), facts


def summarize(actions: list[str], ok: bool) -> str:
    """The repair's actions in a few words for the table."""
    tags = []
    for a in actions:
        if a.startswith("rebuilt manifest.json"):
            tags.append("manifest rebuilt from shards")
        elif a.startswith("rebuilt catalog.sqlite"):
            tags.append("catalog rebuilt: " + a.split(": ")[1].split(" (")[0])
        elif "intact image(s) into" in a:
            tags.append("salvaged " + a.split("copied ")[1].split(" ")[0])
        elif "are re-encoded by the next" in a:
            tags.append(a.split(": ")[1].split(" ")[0] + " to re-encode (files exist)")
        elif "files are gone; kept" in a:
            tags.append(a.split(": ")[1].split(" ")[0] + " kept and reported (no file)")
        elif a.startswith("imported"):
            tags.append(a.split(" image")[0])
    tags.append("index rebuilt")
    return ", ".join(tags) + ("" if ok else "; verify still not ok")


def intact(folder: Path, removed: set[int]) -> bool:
    """The collection content is exactly the original (harmless flips)."""
    try:
        with Collection.open(folder) as col:
            rows = col.list_images(0, 1000)
            nums = sorted(r.metadata["i"] for r in rows)
            if nums != [i for b in BATCHES for i in b if i not in removed]:
                return False
            return all(np.abs(col.get_tokens(r.id) - tok(r.metadata["i"])).max() < 0.01 for r in rows)
    except CollectionError:
        return False


def check_images_kept(col: Collection, report, root: Path, risk: set[int], images: list[int]) -> dict[int, Any]:
    """After a repair: each of ``images`` is back with its tokens and found by its embedding, or (only where
    ``risk`` allows) kept and reported, or gone with its file left to re-encode. Returns the rows by image."""
    rows = {r.metadata["i"]: r for r in col.list_images(0, 1000)}
    for i in images:
        if i in rows:
            row = rows[i]
            if i in risk and row.id in report.bad_rows:
                assert not report.ok  # kept, and reported
                continue
            assert np.abs(col.get_tokens(row.id) - tok(i)).max() < 0.01, i
            assert col.search(emb(i), k=1)[0].id == row.id
            continue
        assert i in risk, f"image {i} was lost though its data was intact"
        path = photo(root, i)
        assert os.path.exists(path) and [f.path for f in col.plan([path]).to_encode] == [path]
    return rows


def check_nothing_lost(folder: Path, root: Path, risk: set[int], removed: set[int]) -> None:
    """After the repair path: every image is back with its tokens, or re-encodable, or kept and reported."""
    Collection.recover(folder)
    with Collection.open(folder, writable=True) as col:
        report = col.repair()
        rows = check_images_kept(col, report, root, risk, [i for b in BATCHES for i in b if i not in removed])
        assert not set(rows) & removed
        # a damaged shard stays only while kept images still point at it (and verify says so)
        live = set(col.catalog.shard_live_rows())
        for p in col.path.glob("tokens/*.arrow"):
            assert p.name in live
            if p.name in report.damaged_shards or p.name in report.missing_shards:
                assert not report.ok


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("part", PARTS)
def test_damage_loses_nothing_and_is_never_ok(sources, tmp_path, part, kind):
    root, golden, other = sources
    for command in COMMANDS:
        folder = tmp_path / command
        shutil.copytree(golden, folder)
        damage(folder, other, part, kind)
        outcome, facts = run(command, folder, root)
        TABLE[(part, kind, command)] = outcome
        removed = {2} if facts.get("removed") else set()
        if command == "verify" and facts.get("ok"):
            assert intact(folder, removed), f"{part}/{kind}: damaged content passed verify"
        check_nothing_lost(folder, root, at_risk(part, kind), removed)


def test_a_collection_without_its_manifest_is_never_recreated_over(sources, tmp_path):
    """``f2b index`` on a folder whose manifest is gone would create a collection there: refused."""
    from fwd2bot_index.collection import CollectionExistsError

    root, golden, _ = sources
    folder = tmp_path / "col"
    shutil.copytree(golden, folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(CollectionExistsError, match="no manifest.json; run f2b verify --repair") as err:
        Collection.create(folder, manifest())
    one_line(str(err.value))
    assert len(list((folder / "tokens").glob("*.arrow"))) == 3 and (folder / "catalog.sqlite").exists()
    assert any("rebuilt manifest.json" in a for a in Collection.recover(folder))
    with Collection.open(folder, writable=True) as col:
        assert len(col) == 18 and col.verify().ok


def test_remove_of_already_removed_ids_succeeds(sources, tmp_path):
    root, golden, _ = sources
    folder = tmp_path / "col"
    shutil.copytree(golden, folder)
    with Collection.open(folder, writable=True) as col:
        assert col.remove([3]) == [3]
        assert col.remove([3, 999]) == []  # a retry after a crash: nothing left to do, no error
        assert col.verify().ok


def test_litter_is_cleaned_on_open(sources, tmp_path):
    root, golden, _ = sources
    folder = tmp_path / "col"
    shutil.copytree(golden, folder)
    (folder / f".tmp-{os.getpid()}-index.faiss").write_bytes(b"half an index")
    (folder / "tokens" / ".tmp-1-x.arrow").write_bytes(b"half a shard")
    (folder / "qdrant-edge").mkdir()  # a faiss -> qdrant-edge migration killed half way
    (folder / "qdrant-edge" / "segment").write_bytes(b"x")
    with Collection.open(folder) as reader:  # readers never delete anything
        assert (folder / "qdrant-edge").exists()
    with Collection.open(folder, writable=True) as col:
        assert col.verify().ok and len(col) == 18
    assert not list(folder.glob(".tmp-*")) and not list(folder.glob("tokens/.tmp-*"))
    assert not (folder / "qdrant-edge").exists()


def test_disk_full_during_a_batch_is_one_line_and_stores_nothing(sources, tmp_path, monkeypatch):
    """Fault injection: the shard write hits ENOSPC half way (as pyarrow reports it)."""
    import errno

    import pyarrow as pa

    root, golden, _ = sources
    folder = tmp_path / "col"
    shutil.copytree(golden, folder)
    real = pa.OSFile

    class Full:
        def __init__(self, path, mode):
            self._f = real(path, mode)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    with Collection.open(folder, writable=True) as col:
        monkeypatch.setattr(pa, "OSFile", Full)
        with pytest.raises(CollectionError, match="disk holding .* is full .* nothing of this batch was stored") as err:
            add(col, root, [60, 61])
        one_line(str(err.value))
        monkeypatch.setattr(pa, "OSFile", real)
        assert len(col) == 18 and not list(folder.glob("tokens/.tmp-*"))
        add(col, root, [60, 61])  # space is back: the same batch goes in
        assert len(col) == 20
    with Collection.open(folder) as col:
        assert col.verify().ok


def test_disk_full_while_saving_the_index_keeps_the_commits(sources, tmp_path, monkeypatch):
    """Fault injection on the index save: FAISS's writer, then the state file's atomic writer."""
    import errno

    import faiss

    root, golden, _ = sources
    folder = tmp_path / "col"
    shutil.copytree(golden, folder)
    col = Collection.open(folder, writable=True, save_every=1)
    real_write = faiss.write_index

    def full_faiss(index, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("Error in faiss::FileIOWriter: write error (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", full_faiss)
    with pytest.raises(CollectionError, match="full while writing the vector index: the images committed") as err:
        add(col, root, [70])
    one_line(str(err.value))
    monkeypatch.setattr(faiss, "write_index", real_write)
    real_replace = os.replace

    def full_replace(src, dst):
        if str(dst).endswith("index.state.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_replace)
    with pytest.raises(CollectionError, match="full while writing the vector index"):
        add(col, root, [71])
    monkeypatch.setattr(os, "replace", real_replace)
    assert not list(folder.glob(".tmp-*"))
    col.close()
    with Collection.open(folder, writable=True) as col:  # the commits are there; the index is made whole
        assert len(col) == 20 and col.verify().ok
        assert col.search(emb(71), k=1)[0].metadata["i"] == 71


def test_one_flipped_row_is_salvaged_and_the_rest_kept(sources, tmp_path):
    """Per-row checks: a flip inside one image's tokens costs that image only, not its whole shard."""
    root, golden, _ = sources
    folder = tmp_path / "col"
    shutil.copytree(golden, folder)
    with Collection.open(folder) as col:
        shard = col.get(5).shard  # image i=4 (id 5), whose file exists
        row = col.get(5).row
    path = folder / "tokens" / shard
    data = bytearray(path.read_bytes())
    needle = np.asarray(tok(4), np.float16).tobytes()[:16]
    data[data.index(needle) + 3] ^= 0x40
    path.write_bytes(bytes(data))
    with Collection.open(folder) as col:
        report = col.verify()
        assert not report.ok and report.damaged_shards == [shard] and report.bad_rows == [5]
        assert any(f"{shard} is damaged" in p and "1 affected: ids 5" in p for p in report.problems)
    with Collection.open(folder, writable=True) as col:
        fixed = col.repair()
        assert fixed.ok, fixed.problems
        assert any("copied 5 intact image(s)" in a for a in fixed.actions) and row == 4
        assert len(col) == 17 and col.get(5) is None  # its file exists: re-encoded by the next f2b index
        assert [f.path for f in col.plan([photo(root, 4)]).to_encode] == [photo(root, 4)]
        for i in (0, 1, 2, 3, 5):
            assert np.abs(col.get_tokens(i + 1) - tok(i)).max() < 0.01
    assert (folder / "damaged" / shard).exists()  # the damaged file is kept aside, not deleted


def test_the_only_shard_after_compaction_lost(sources, tmp_path):
    """The issue's case: compaction leaves one shard; it is truncated; repair used to forget all images."""
    root, golden, _ = sources
    folder = tmp_path / "col"
    shutil.copytree(golden, folder)
    with Collection.open(folder, writable=True) as col:
        assert col.compact()["written"] == 1 and col.verify().ok
    (only,) = (folder / "tokens").glob("*.arrow")
    only.write_bytes(only.read_bytes()[:100])
    with Collection.open(folder, writable=True) as col:
        fixed = col.repair()
        evens = [i for b in BATCHES for i in b if i % 2 == 0]
        assert len(col) == 9 and not fixed.ok  # the 9 without a file are kept, and reported
        assert any("9 image(s) lost their stored data; their files exist" in a for a in fixed.actions)
        plan = col.plan([photo(root, i) for i in evens])
        assert len(plan.to_encode) == 9  # the next f2b index restores the other 9 from their files


@pytest.fixture(scope="module", autouse=True)
def _damage_table():
    """After this file's tests: writes the damage x command table to $F2B_DAMAGE_TABLE when set
    (see the module docstring); not a test, so nothing is skipped when it is not asked for."""
    yield
    target = os.environ.get("F2B_DAMAGE_TABLE")
    if not target or not TABLE:
        return
    lines = ["| part | damage | " + " | ".join(COMMANDS) + " |", "|" + "---|" * (2 + len(COMMANDS))]
    for part in PARTS:
        for kind in KINDS:
            lines.append(f"| {part} | {kind} | " + " | ".join(TABLE.get((part, kind, c), "") for c in COMMANDS) + " |")
    Path(target).write_text("\n".join(lines) + "\n")


def test_the_cli_says_it_in_one_line_and_repairs(sources, tmp_path):
    """``f2b verify`` / ``verify --repair`` / ``remove`` on a damaged copy, as a user runs them (no model needed)."""
    from typer.testing import CliRunner

    from fwd2bot_index.cli.main import app

    root, golden, other = sources
    folder = tmp_path / "col"
    shutil.copytree(golden, folder)
    damage(folder, other, "catalog", "zero")
    runner = CliRunner()
    refused = runner.invoke(app, ["remove", "3", "--collection", str(folder)])
    assert refused.exit_code == 1
    message = refused.output.strip()
    assert "\n" not in message and "not a readable catalog" in message and "f2b verify --repair" in message
    assert len(list((folder / "tokens").glob("*.arrow"))) == 3  # nothing was deleted
    assert runner.invoke(app, ["verify", "--collection", str(folder)]).exit_code == 1
    repaired = runner.invoke(app, ["verify", "--repair", "--collection", str(folder)])
    assert repaired.exit_code == 0, repaired.output
    assert "repaired: rebuilt catalog.sqlite from 3 token shard(s): 18 image(s)" in repaired.output
    assert runner.invoke(app, ["verify", "--collection", str(folder)]).exit_code == 0
    for _ in range(2):  # the second time the image is already gone: still exit 0
        done = runner.invoke(app, ["remove", "3", "--collection", str(folder)])
        assert done.exit_code == 0, done.output
    assert "already removed" in done.output
    with Collection.open(folder) as col:
        assert len(col) == 17 and col.verify().ok


def test_a_shard_the_catalog_never_knew_is_imported_or_kept_aside(sources, tmp_path):
    """An unreferenced shard (a catalog restored from an older backup, a copied file) is never deleted:
    repair imports the images only it holds, and a shard that cannot describe itself is kept aside."""
    root, golden, other = sources
    folder = tmp_path / "col"
    shutil.copytree(golden, folder)
    with Collection.open(folder, writable=True) as col:
        last = col.get(18).shard
        col.catalog.forget_shards([last])
        with col.catalog.transaction():  # as if the catalog were a backup from before the last batch
            col.catalog.delete_images(range(13, 19))
            col.catalog.bump_version()
    foreign = next((other / "tokens").glob("*.arrow"))
    shutil.copyfile(foreign, folder / "tokens" / ("0" + foreign.name[1:]))  # ids 1-4, other content
    (folder / "tokens" / "00000000000000000001-ffffffff.arrow").write_bytes(b"not a shard")
    with Collection.open(folder, writable=True) as col:
        assert len(col) == 12 and len(list((folder / "tokens").glob("*.arrow"))) == 5  # nothing deleted on open
        report = col.verify()
        assert not report.ok and sum("not referenced by the catalog" in p for p in report.problems) == 2
        assert sum("belongs to another collection" in p for p in report.problems) == 1  # never imported
        fixed = col.repair()
        assert fixed.ok, fixed.problems
        assert len(col) == 18 and sorted(r.metadata["i"] for r in col.list_images(0, 100)) == list(range(18))
        assert sum("kept as" in a for a in fixed.actions) == 2  # the foreign shard and the garbage file
    assert len(list((folder / "damaged").glob("*.arrow"))) == 2
