"""Collection identity across versions (issue 22, item 1): a collection written before ids gets one on
its first writable open, crash-safely; a manifest and catalog restored from before ids take the id
their shards carry; between collections from before ids, the other one's shard (which carries no id)
is still not imported over a sound catalog. Real FAISS and SQLite, no model.

The fixtures and helpers are the damage suite's part two (loaded by path: pytest runs with
``--import-mode=importlib``, so test modules are not importable by name).
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path

from fwd2bot_index.collection import Collection

_spec = importlib.util.spec_from_file_location("_damage_part_two",
                                               Path(__file__).with_name("test_collection_damage_parts.py"))
_two = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_two)
world = _two.world  # the module fixture: golden (18 images), twin (same model), other (another model)
BATCHES, add, copy_of, foreign_only_shard, manifest, shards, twin_hashes = (
    _two.BATCHES, _two.add, _two.copy_of, _two.foreign_only_shard, _two.manifest, _two.shards, _two.twin_hashes)


def test_a_collection_from_before_ids_gets_one_on_first_writable_open(world, tmp_path, monkeypatch):
    """Migration: a collection written before ids (none in manifest, catalog, shards, state): a
    read-only open changes nothing; the first writable open writes the id into the catalog, then the
    manifest and the state, and new shards carry it; old shards (no id) are never called foreign."""
    import fwd2bot_index.collection.creating as creating

    root, golden, _, _ = world
    folder = tmp_path / "legacy"
    monkeypatch.setattr(creating, "new_id", lambda: "")  # what create wrote before ids
    with Collection.create(folder, manifest()) as col:
        for nums in BATCHES:
            add(col, root, nums)
    monkeypatch.undo()
    assert "collection_id" not in json.loads((folder / "index.state.json").read_text())
    with Collection.open(folder) as col:
        assert col.verify().ok and not col.manifest.collection_id and not col.catalog.collection_id()
    assert not json.loads((folder / "manifest.json").read_text())["collection_id"]
    with Collection.open(folder, writable=True) as col:
        cid = col.manifest.collection_id
        assert cid and col.catalog.collection_id() == cid
        add(col, root, [40])  # new shards carry it
    assert json.loads((folder / "manifest.json").read_text())["collection_id"] == cid
    assert json.loads((folder / "index.state.json").read_text())["collection_id"] == cid
    with Collection.open(folder) as col:
        report = col.verify()
        assert report.ok and not report.foreign_shards, report.problems
        assert col.tokens.schema_of(col.get(19).shard)["identity"]["collection_id"] == cid


def _legacy(folder: Path, root: Path, batches, salt: str, monkeypatch) -> None:
    """A collection as written before ids (one shard: compacted before any id existed)."""
    import fwd2bot_index.collection.creating as creating

    monkeypatch.setattr(creating, "new_id", lambda: "")  # what create wrote before ids
    with Collection.create(folder, manifest()) as col:
        for nums in batches:
            add(col, root, nums, salt=salt)
        col.compact()
    monkeypatch.undo()


def test_between_collections_from_before_ids_a_foreign_shard_is_not_imported(world, tmp_path, monkeypatch):
    """Both collections predate ids, so the other one's shard carries none. Once this one has an id,
    a shard without one that its ledger never recorded cannot be its own: kept aside, not imported
    over the sound catalog. A catalog that lost its rows is still rebuilt from its own legacy shards."""
    root = world[0]
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _legacy(ours, root, BATCHES, "", monkeypatch)
    _legacy(theirs, root / "twin-photos", [range(200, 206)], "twin", monkeypatch)
    with Collection.open(ours, writable=True) as col:  # the migration: the catalog gets an id, the shard keeps none
        assert col.manifest.collection_id and len(shards(ours)) == 1
        assert not col.tokens.schema_of(shards(ours)[0].name)["identity"].get("collection_id")
    emptied = copy_of(ours, tmp_path / "emptied")
    foreign_only_shard(ours, theirs, None)
    with Collection.open(ours) as col:
        report = col.verify()
        assert not report.ok and any("carries no collection id and this catalog never recorded it" in p
                                     for p in report.problems)
    assert Collection.recover(ours) == []  # the catalog is sound: kept
    with Collection.open(ours, writable=True) as col:
        fixed = col.repair()
        assert not twin_hashes(col) and len(col) == 9
        assert any("cannot be shown to belong to this collection: never imported" in a for a in fixed.actions)
    db = sqlite3.connect(emptied / "catalog.sqlite")
    with db:
        db.execute("DELETE FROM images")
    db.close()
    assert any("rebuilt catalog.sqlite" in a for a in Collection.recover(emptied))
    with Collection.open(emptied, writable=True) as col:
        assert len(col) == 18 and col.repair().ok


def test_the_id_survives_a_kill_or_a_restore_from_before_ids(world, tmp_path):
    """A kill between the catalog's id and the manifest's (simulated: the catalog has it, the manifest
    not) is finished by the next writable open; a manifest and catalog restored from before ids take
    the id the shards carry (a fresh id would turn every shard foreign)."""
    root, golden, _, _ = world
    folder = copy_of(golden, tmp_path / "col")
    with Collection.open(folder) as col:
        cid = col.manifest.collection_id
    strip_ids(folder, keep_catalog=True)  # killed after the catalog's commit, before the manifest
    with Collection.open(folder, writable=True) as col:
        assert col.manifest.collection_id == cid and col.verify().ok
    strip_ids(folder)
    with Collection.open(folder, writable=True) as col:
        assert col.manifest.collection_id == cid and col.catalog.collection_id() == cid and col.verify().ok


def strip_ids(folder: Path, keep_catalog: bool = False) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    data.pop("collection_id", None)
    (folder / "manifest.json").write_text(json.dumps(data))
    state = json.loads((folder / "index.state.json").read_text())
    state.pop("collection_id", None)
    (folder / "index.state.json").write_text(json.dumps(state))
    if not keep_catalog:
        db = sqlite3.connect(folder / "catalog.sqlite")
        db.execute("DELETE FROM meta WHERE key='collection_id'")
        db.commit()
        db.close()
