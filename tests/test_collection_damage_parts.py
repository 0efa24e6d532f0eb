"""The damage suite, part two (issue 22): foreign parts, parts of the wrong file-system kind, paths
whose files swapped content, a lost manifest, and collections from before collection ids.

Each case is run the way an operator meets it: ``verify`` on a read-only open, ``verify --repair``
(``Collection.recover`` then ``repair``), and a writable open with a search (the server's path). The
checks are the issue's: nothing that exists is lost (every image is back with its own tokens, or its
file exists so the next ``f2b index`` re-encodes it, or it is kept and reported), nothing foreign is
adopted (no image of the other collection, its files kept aside in ``damaged/``), nothing harmful is
called ok, every message is one line. Real FAISS and SQLite, no model, no torch.

``F2B_DAMAGE_TABLE_PARTS=path`` writes the case x command -> outcome table as Markdown.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fwd2bot_index.collection import Collection, CollectionError

# The first part's helpers (pytest runs with --import-mode=importlib: tests are not importable by name).
_spec = importlib.util.spec_from_file_location("_damage_part_one", Path(__file__).with_name("test_collection_damage.py"))
_one = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_one)
BATCHES, add, check_images_kept, emb, manifest, one_line, photo, summarize, tok = (
    _one.BATCHES, _one.add, _one.check_images_kept, _one.emb, _one.manifest, _one.one_line, _one.photo, _one.summarize,
    _one.tok)

TABLE: dict[tuple[str, str], str] = {}
COMMANDS = ["verify", "repair", "serve"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``golden``: 18 images in 3 shards. ``twin``: another collection of the *same* model (its parts
    are well-formed here in every way but their id). ``other``: a collection of another model."""
    root = tmp_path_factory.mktemp("parts")
    golden = root / "golden"
    with Collection.create(golden, manifest()) as col:
        for nums in BATCHES:
            add(col, root, nums)
    twin = root / "twin"
    with Collection.create(twin, manifest()) as col:
        add(col, root / "twin-photos", range(200, 206), salt="twin")
    other = root / "other"
    with Collection.create(other, manifest("fp-other")) as col:
        add(col, root / "elsewhere", range(100, 104), salt="x")
    return root, golden, twin, other


def copy_of(golden: Path, folder: Path, compact: bool = False) -> Path:
    shutil.copytree(golden, folder)
    if compact:
        with Collection.open(folder, writable=True) as col:
            col.compact()
    return folder


def shards(folder: Path) -> list[Path]:
    return sorted((folder / "tokens").glob("*.arrow"))


def twin_hashes(col: Collection) -> list[str]:
    return [r.hash for r in col.list_images(0, 1000) if r.hash.startswith("twin") or r.hash.startswith("x")]


# ------------------------------------------------------------------------------------ damage cases


def foreign_index(folder: Path, twin: Path, other: Path) -> None:
    """Another collection's index.faiss + index.state.json copied in (the state vouches for the file)."""
    for name in ("index.faiss", "index.state.json"):
        shutil.copyfile(twin / name, folder / name)


def foreign_only_shard(folder: Path, twin: Path, other: Path) -> None:
    """After compaction one shard holds everything; it is replaced by another collection's shard."""
    (only,) = shards(folder)
    only.unlink()
    theirs = shards(twin)[0]
    shutil.copyfile(theirs, folder / "tokens" / theirs.name)


def foreign_shard_same_name(folder: Path, twin: Path, other: Path) -> None:
    """Another collection's shard copied over ours under our shard's name."""
    shutil.copyfile(shards(twin)[0], shards(folder)[0])


def foreign_catalog(folder: Path, twin: Path, other: Path) -> None:
    for suffix in ("-wal", "-shm"):
        (folder / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    shutil.copyfile(twin / "catalog.sqlite", folder / "catalog.sqlite")


def foreign_manifest(folder: Path, twin: Path, other: Path) -> None:
    shutil.copyfile(twin / "manifest.json", folder / "manifest.json")


def tokens_as_file(folder: Path, twin: Path, other: Path) -> None:
    shutil.rmtree(folder / "tokens")
    (folder / "tokens").write_bytes(b"not a folder")


def lock_as_folder(folder: Path, twin: Path, other: Path) -> None:
    (folder / "lock").unlink(missing_ok=True)
    (folder / "lock").mkdir()


def index_as_folder(folder: Path, twin: Path, other: Path) -> None:
    (folder / "index.faiss").unlink()
    (folder / "index.faiss").mkdir()
    (folder / "index.faiss" / "x").write_bytes(b"kept")


def state_as_folder(folder: Path, twin: Path, other: Path) -> None:
    (folder / "index.state.json").unlink()
    (folder / "index.state.json").mkdir()


def catalog_as_folder(folder: Path, twin: Path, other: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (folder / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    (folder / "catalog.sqlite").mkdir()


def manifest_as_folder(folder: Path, twin: Path, other: Path) -> None:
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").mkdir()


def shard_as_folder(folder: Path, twin: Path, other: Path) -> None:
    last = shards(folder)[-1]
    last.unlink()
    last.mkdir()


def damaged_as_file(folder: Path, twin: Path, other: Path) -> None:
    (folder / "damaged").write_bytes(b"a file where the set-aside folder goes")
    shards(folder)[0].write_bytes(b"truncated")  # repair has something to set aside


def journal_as_folder(folder: Path, twin: Path, other: Path) -> None:
    (folder / "shrink.json").mkdir()


def truncated_index(folder: Path, twin: Path, other: Path) -> None:
    """Plain damage to a derived part: repair keeps the old file aside (it used to delete it)."""
    data = (folder / "index.faiss").read_bytes()
    (folder / "index.faiss").write_bytes(data[: len(data) // 2])


def manifest_deleted(folder: Path, twin: Path, other: Path) -> None:
    (folder / "manifest.json").unlink()


CASES = {
    "foreign index": (foreign_index, False, set()),
    "foreign only shard": (foreign_only_shard, True, set(range(18))),
    "foreign shard, same name": (foreign_shard_same_name, False, set(BATCHES[0])),
    "foreign catalog": (foreign_catalog, False, set()),
    "foreign manifest": (foreign_manifest, False, set()),
    "tokens/ as a file": (tokens_as_file, False, set(range(18))),
    "lock as a folder": (lock_as_folder, False, set()),
    "index.faiss as a folder": (index_as_folder, False, set()),
    "index.state.json as a folder": (state_as_folder, False, set()),
    "catalog.sqlite as a folder": (catalog_as_folder, False, set()),
    "manifest.json as a folder": (manifest_as_folder, False, set()),
    "a shard as a folder": (shard_as_folder, False, set(BATCHES[-1])),
    "damaged/ as a file": (damaged_as_file, False, set(BATCHES[0])),
    "shrink.json as a folder": (journal_as_folder, False, set()),
    "index.faiss truncated": (truncated_index, False, set()),
    "manifest deleted": (manifest_deleted, False, set()),
}


def run(command: str, folder: Path) -> tuple[str, dict]:
    facts: dict = {}
    try:
        if command == "verify":
            with Collection.open(folder) as col:
                report = col.verify()
                facts["hit"] = col.search(emb(4), k=1)[0].metadata.get("i") if len(col) else None
            for p in report.problems:
                one_line(p)
            facts["ok"] = report.ok
            return ("ok" if report.ok else "not ok: " + "; ".join(_short(p, folder) for p in report.problems[:2])), facts
        if command == "repair":
            actions = Collection.recover(folder)
            with Collection.open(folder, writable=True) as col:
                report = col.repair()
            for line in actions + report.actions + report.problems:
                one_line(line)
            facts["ok"], facts["actions"] = report.ok, actions + report.actions
            return summarize_parts(actions + report.actions, report.ok), facts
        with Collection.open(folder, writable=True) as col:
            facts["hit"] = col.search(emb(4), k=1)[0].metadata.get("i") if len(col) else None
        return "done", facts
    except CollectionError as exc:
        facts["refused"] = one_line(str(exc))
        return "refused: " + _short(str(exc), folder), facts


def _short(text: str, folder: Path) -> str:
    """A problem in a few words for the table: its first clause, paths relative to the collection."""
    text = text.replace(str(folder) + "/", "").split(";")[0]
    return text.split(" (its collection id")[0].split(" (")[0] if "(" in text else text


def summarize_parts(actions: list[str], ok: bool) -> str:
    """The repair's actions in a few words for the table."""
    import re

    tags = [t for t in summarize(actions, True).split(", ")
            if t and t != "index rebuilt" and "to re-encode" not in t and "kept and reported" not in t]
    for phrase, tag in (("are re-encoded by the next", "to re-encode (files exist)"),
                        ("files are gone; kept", "kept and reported (no file)")):
        n = sum(int(re.search(r": (\d+) image", a).group(1)) for a in actions if phrase in a)
        if n:
            tags.append(f"{n} {tag}")
    for a in actions:
        if a.startswith("the vector index:"):
            tags.append("index set aside")
        elif "belongs to another collection: never imported" in a or "another collection's file" in a:
            tags.append("foreign shard set aside")
        elif "set aside as damaged/" in a or "was not a folder" in a:
            tags.append(a.split(" is a ")[0].split(" was ")[0].rsplit("/", 1)[-1] + " set aside")
        elif a.startswith("token shard") and "the damaged file is kept as" in a:
            tags.append("damaged shard set aside")
    return ", ".join(dict.fromkeys(tags)) + ("; ok" if ok else "; not ok: kept images reported")


def check_after_repair(folder: Path, root: Path, risk: set[int]) -> None:
    """The repair path: nothing existing lost, nothing foreign adopted, the result verified."""
    Collection.recover(folder)
    with Collection.open(folder, writable=True) as col:
        report = col.repair()
        assert not twin_hashes(col), "another collection's images were adopted"
        rows = check_images_kept(col, report, root, risk, list(range(18)))
        assert set(rows) <= set(range(18))
        assert col.verify().ok == report.ok
        cid = col.manifest.collection_id
        assert cid and col.catalog.collection_id() == cid
        assert json.loads((folder / "index.state.json").read_text())["collection_id"] == cid


@pytest.mark.parametrize("case", list(CASES))
def test_foreign_and_odd_parts(world, tmp_path, case):
    root, golden, twin, other = world
    make, compact, risk = CASES[case]
    base = copy_of(golden, tmp_path / "base", compact)
    before = sorted(p.name for p in (base / "tokens").iterdir())
    for command in COMMANDS:
        folder = tmp_path / command
        shutil.copytree(base, folder)
        make(folder, twin, other)
        outcome, facts = run(command, folder)
        TABLE[(case, command)] = outcome
        if command == "verify":
            assert not facts.get("ok"), f"{case}: verify called it ok"
            if "hit" in facts:  # a read-only search never serves another collection's ranking
                assert facts["hit"] in (4, None) or 4 in risk
        if command == "serve" and "hit" in facts and 4 not in risk:
            assert facts["hit"] == 4
        check_after_repair(folder, root, risk)
        kept = list((folder / "damaged").rglob("*")) if (folder / "damaged").is_dir() else []
        if (case.startswith("foreign") and case not in ("foreign manifest", "foreign catalog")) or "index" in case:
            assert kept, f"{case}: the foreign or damaged part was not kept aside"
    assert sorted(p.name for p in (base / "tokens").iterdir()) == before


def test_a_foreign_index_is_never_searched_and_is_kept(world, tmp_path):
    """The issue's case: verify said ok and search returned the other collection's ranking."""
    root, golden, twin, _ = world
    folder = copy_of(golden, tmp_path / "col")
    foreign_index(folder, twin, None)
    with Collection.open(folder) as col:
        report = col.verify()
        assert not report.ok and any("index.state.json" in p and "another collection" in p for p in report.problems)
        for i in (0, 4, 17):
            assert col.search(emb(i), k=1)[0].metadata["i"] == i  # exact search from this collection's shards
    with Collection.open(folder, writable=True) as col:
        assert col.verify().ok and col.search(emb(9), k=1)[0].metadata["i"] == 9
    kept = sorted(p.name.split(".foreign-")[0] for p in (folder / "damaged").iterdir())
    assert kept == ["index.faiss", "index.state.json"]


@pytest.mark.parametrize("backend", ["qdrant-edge", "qdrant-local"])
def test_a_foreign_qdrant_index_is_set_aside_not_searched(world, tmp_path, backend):
    """Qdrant engines keep no checksum we can record; the state's collection id still tells another
    collection's Qdrant folder (copied in with its state) from this one's."""
    root, golden, twin, _ = world
    folder, theirs = copy_of(golden, tmp_path / "col"), copy_of(twin, tmp_path / "twin")
    for col_path in (folder, theirs):
        with Collection.open(col_path, writable=True) as col:
            col.change_backend(backend)
    shutil.rmtree(folder / backend)
    shutil.copytree(theirs / backend, folder / backend)
    shutil.copyfile(theirs / "index.state.json", folder / "index.state.json")
    with Collection.open(folder) as col:
        report = col.verify()
        assert not report.ok and any("another collection" in p for p in report.problems)
        assert col.search(emb(4), k=1)[0].metadata["i"] == 4
    Collection.recover(folder)
    with Collection.open(folder, writable=True) as col:
        fixed = col.repair()
        assert fixed.ok and any("set aside as damaged/" in a for a in fixed.actions), fixed.actions
        assert col.search(emb(9), k=1)[0].metadata["i"] == 9 and not twin_hashes(col)
    assert any(p.name.startswith(backend) for p in (folder / "damaged").iterdir())


def test_a_foreign_only_shard_is_never_imported_over_a_sound_catalog(world, tmp_path):
    """The issue's case: repair set the sound catalog aside and imported the other collection's images."""
    root, golden, twin, _ = world
    folder = copy_of(golden, tmp_path / "col", compact=True)
    foreign_only_shard(folder, twin, None)
    with Collection.open(folder) as col:
        report = col.verify()
        assert not report.ok and len(report.foreign_shards) == 1 and len(report.missing_shards) == 1
    assert Collection.recover(folder) == []  # the catalog is sound: kept
    with Collection.open(folder, writable=True) as col:
        fixed = col.repair()
        assert not twin_hashes(col) and len(col) == 9  # the 9 whose files are gone: kept and reported
        assert any("belongs to another collection: never imported" in a for a in fixed.actions)
        assert len(col.plan([photo(root, i) for i in range(0, 18, 2)]).to_encode) == 9
    assert len(list((folder / "damaged").glob("*.arrow"))) == 1
    with Collection.open(folder, writable=True) as col:  # a second repair imports nothing either
        col.repair()
        assert len(col) == 9 and not twin_hashes(col)


def test_a_foreign_catalog_or_manifest_is_refused_and_rebuilt(world, tmp_path):
    root, golden, twin, _ = world
    for damage, part in ((foreign_catalog, "catalog.sqlite"), (foreign_manifest, "manifest.json")):
        folder = copy_of(golden, tmp_path / part)
        damage(folder, twin, None)
        for writable in (False, True):
            with pytest.raises(CollectionError, match=f"{part} belongs to another collection") as err:
                Collection.open(folder, writable=writable)
            one_line(str(err.value))
        actions = Collection.recover(folder)
        assert any(f"rebuilt {part}" in a for a in actions), actions
        with Collection.open(folder, writable=True) as col:
            assert len(col) == 18 and col.verify().ok and not twin_hashes(col)


def test_a_foreign_catalog_beside_a_lost_manifest_does_not_decide_the_id(world, tmp_path):
    """The only part left that names an id is another collection's catalog: this collection's shards
    outvote it, so both are rebuilt from them and nothing of the other collection comes in."""
    root, golden, twin, _ = world
    folder = copy_of(golden, tmp_path / "col")
    foreign_catalog(folder, twin, None)
    (folder / "manifest.json").unlink()
    with Collection.open(golden) as col:
        cid = col.manifest.collection_id
    actions = Collection.recover(folder)
    assert any("rebuilt manifest.json" in a for a in actions) and any("rebuilt catalog.sqlite" in a for a in actions)
    with Collection.open(folder, writable=True) as col:
        assert col.manifest.collection_id == cid and len(col) == 18 and not twin_hashes(col) and col.verify().ok


def test_odd_parts_are_one_line_at_the_cli_and_repair_fixes_them(world, tmp_path):
    """``f2b verify`` / ``remove`` / ``verify --repair`` as a user runs them: one line, no traceback."""
    from typer.testing import CliRunner

    from fwd2bot_index.cli.main import app

    root, golden, twin, other = world
    runner = CliRunner()
    for damage, word in ((tokens_as_file, "tokens is a file where a folder should be"),
                         (lock_as_folder, "lock is a folder where a file should be")):
        folder = copy_of(golden, tmp_path / damage.__name__)
        damage(folder, twin, other)
        refused = runner.invoke(app, ["remove", "3", "--collection", str(folder)])
        lines = [line for line in refused.output.splitlines() if line.strip()]
        assert refused.exit_code == 1 and len(lines) == 1 and word in lines[0], refused.output
        assert "f2b verify --repair" in lines[0] and "Traceback" not in refused.output
        checked = runner.invoke(app, ["verify", "--collection", str(folder)])
        assert checked.exit_code == 1 and word in checked.output and "Traceback" not in checked.output
        repaired = runner.invoke(app, ["verify", "--repair", "--collection", str(folder)])
        assert "Traceback" not in repaired.output and "set aside as damaged/" in repaired.output, repaired.output
        assert any(p.name.startswith(("tokens.odd", "lock.odd")) for p in (folder / "damaged").iterdir())
        done = runner.invoke(app, ["remove", "3", "--collection", str(folder)])
        assert done.exit_code == 0, done.output


def test_a_lost_manifest_suggests_what_works(world, tmp_path):
    """The issue's case: verify suggested ``f2b index``, which then refused. Every command now names
    ``f2b verify --repair``, and that works."""
    from typer.testing import CliRunner

    from fwd2bot_index.cli.main import app

    root, golden, _, _ = world
    folder = copy_of(golden, tmp_path / "col")
    (folder / "manifest.json").unlink()
    runner = CliRunner()
    for args in (["verify"], ["info"], ["remove", "3"], ["index", str(root / "photos")]):
        result = runner.invoke(app, [*args, "--collection", str(folder)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert "f2b verify --repair" in lines[0] and "f2b index" not in lines[0], lines[0]
    repaired = runner.invoke(app, ["verify", "--repair", "--collection", str(folder)])
    assert repaired.exit_code == 0 and "rebuilt manifest.json" in repaired.output, repaired.output
    with Collection.open(folder) as col:
        assert len(col) == 18 and col.verify().ok
    # no shard left to rebuild it from (an empty collection): verify and repair say to restore or start over
    empty = tmp_path / "empty"
    Collection.create(empty, manifest()).close()
    (empty / "manifest.json").unlink()
    for args in (["verify"], ["verify", "--repair"]):
        result = runner.invoke(app, [*args, "--collection", str(empty)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and "--reindex" in lines[0], result.output
    from PIL import Image

    from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava

    model = save_tiny_llava(tmp_path / "m", TinySpec(image_size=64), seed=0)
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (64, 64), (9, 99, 199)).save(tmp_path / "pics" / "a.png")
    started = runner.invoke(app, ["index", str(tmp_path / "pics"), "--collection", str(empty), "--reindex",
                                  "--model", str(model), "--device", "cpu"])
    assert started.exit_code == 0, started.output  # the suggested command works
    with Collection.open(empty) as col:
        assert len(col) == 1 and col.verify().ok


@pytest.fixture(scope="module", autouse=True)
def _parts_table():
    yield
    target = os.environ.get("F2B_DAMAGE_TABLE_PARTS")
    if target and TABLE:
        lines = ["| case | " + " | ".join(COMMANDS) + " |", "|" + "---|" * (1 + len(COMMANDS))]
        for case in CASES:
            lines.append(f"| {case} | " + " | ".join(TABLE.get((case, c), "") for c in COMMANDS) + " |")
        Path(target).write_text("\n".join(lines) + "\n")


def test_reindex_over_parts_of_the_wrong_kind_sets_them_aside_and_starts_over(world, tmp_path, caplog):
    """``f2b index --reindex`` deleted the parts with ``unlink``/``rmtree``: a folder named manifest.json or
    catalog.sqlite was a traceback (IsADirectoryError), a file named tokens another (FileExistsError), and a
    folder named index.faiss was deleted with what it held. Now each odd part is set aside in ``damaged/``
    as ``verify --repair`` does (its content kept), one line says so, and the new collection is made."""
    from PIL import Image
    from typer.testing import CliRunner

    from fwd2bot_index.cli.main import app
    from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava

    root, golden, twin, other = world
    model = save_tiny_llava(tmp_path / "m", TinySpec(image_size=64), seed=0)
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (64, 64), (9, 99, 199)).save(tmp_path / "pics" / "a.png")
    runner = CliRunner()
    for damage, part in ((manifest_as_folder, "manifest.json"), (catalog_as_folder, "catalog.sqlite"),
                         (tokens_as_file, "tokens"), (index_as_folder, "index.faiss")):
        folder = copy_of(golden, tmp_path / damage.__name__)
        damage(folder, twin, other)
        odd = folder / part
        if odd.is_dir():
            (odd / "kept.txt").write_bytes(b"someone's data")
        content = sorted(p.name for p in odd.iterdir()) if odd.is_dir() else odd.read_bytes()
        caplog.clear()
        result = runner.invoke(app, ["index", str(tmp_path / "pics"), "--collection", str(folder), "--reindex",
                                     "--model", str(model), "--device", "cpu"])
        assert result.exit_code == 0 and "Traceback" not in result.output, (part, result.output)
        said = [r.getMessage() for r in caplog.records if "set aside as damaged/" in r.getMessage()]
        assert len(said) == 1 and f"{part} is a " in said[0] and "\n" not in said[0], caplog.text  # on stderr
        kept = [p for p in (folder / "damaged").iterdir() if p.name.startswith(f"{part}.odd")]
        assert len(kept) == 1, list((folder / "damaged").iterdir())
        assert (sorted(p.name for p in kept[0].iterdir()) if kept[0].is_dir() else kept[0].read_bytes()) == content
        if kept[0].is_dir() and "kept.txt" in content:
            assert (kept[0] / "kept.txt").read_bytes() == b"someone's data"
        with Collection.open(folder) as col:
            assert len(col) == 1 and col.verify().ok


def test_a_new_collection_is_not_made_over_a_part_of_the_wrong_kind(tmp_path):
    """Without --reindex the folder holds no collection: a file named ``tokens`` there is someone's, so
    ``create`` refuses in one line and leaves it as it was (it used to raise FileExistsError)."""
    from fwd2bot_index.collection import CollectionFormatError

    folder = tmp_path / "col"
    folder.mkdir()
    (folder / "tokens").write_bytes(b"my notes")
    with pytest.raises(CollectionFormatError) as refused:
        Collection.create(folder, manifest())
    text = str(refused.value)
    assert "\n" not in text and "tokens is a file where a folder should be" in text and "--collection" in text
    assert (folder / "tokens").read_bytes() == b"my notes" and not (folder / "manifest.json").exists()


def test_verify_reports_what_damaged_holds_without_failing(world, tmp_path):
    """What repair (or a writable open, or --reindex) sets aside goes to ``damaged/`` and was never
    mentioned again. ``f2b verify`` now says what it holds (entries, bytes) and that it may be deleted once
    the user is satisfied, in text and --json; a collection whose parts agree still exits 0."""
    from typer.testing import CliRunner

    from fwd2bot_index.cli.main import app

    root, golden, twin, other = world
    runner = CliRunner()
    clean = runner.invoke(app, ["verify", "--json", "--collection", str(golden)])
    assert clean.exit_code == 0 and json.loads(clean.stdout)["set_aside"] is None, clean.output
    assert "damaged" not in runner.invoke(app, ["verify", "--collection", str(golden)]).output
    folder = copy_of(golden, tmp_path / "col")
    sizes = {name: (folder / name).stat().st_size for name in ("index.faiss", "index.state.json")}
    truncated_index(folder, twin, other)
    sizes["index.faiss"] //= 2
    repaired = runner.invoke(app, ["verify", "--repair", "--collection", str(folder)])
    assert repaired.exit_code == 0 and "set aside as damaged/" in repaired.output, repaired.output
    text = runner.invoke(app, ["verify", "--collection", str(folder)])
    lines = [line for line in text.output.splitlines() if line.strip()]
    assert text.exit_code == 0 and lines[0].startswith("ok:"), text.output
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and f"{folder / 'damaged'} holds 2 thing(s) set aside" in notes[0], text.output
    assert "delete" in notes[0] and "satisfied" in notes[0]
    data = json.loads(runner.invoke(app, ["verify", "--json", "--collection", str(folder)]).stdout)
    assert data["ok"] and data["set_aside"] == {"path": str(folder / "damaged"), "entries": 2,
                                                "bytes": sum(sizes.values())}, data["set_aside"]
    assert data["notes"] == [notes[0][len("note: "):]]
    # a problem elsewhere still fails verify, and the note is still there
    (folder / "lock").unlink()
    (folder / "lock").mkdir()
    failing = runner.invoke(app, ["verify", "--collection", str(folder)])
    assert failing.exit_code == 1 and "note: " in failing.output, failing.output
