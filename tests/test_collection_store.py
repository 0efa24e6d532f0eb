"""The Collection facade on real folders: incremental plans, dedup, prune, search, readers, repair."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fwd2bot_index.collection import (
    Collection,
    CollectionExistsError,
    CollectionMismatchError,
    CollectionNotFoundError,
    CollectionReadOnlyError,
    FileStat,
    Manifest,
    NewImage,
)

REPO = Path(__file__).resolve().parents[1]
D, T, H = 16, 4, 8


def manifest(**kw) -> Manifest:
    base = dict(model_name="demo", model_fingerprint="fp-demo", strategy={"embed": "prompt", "tokens": "pool", "budget": T},
                embed_dim=D, token_count=T, token_dim=H)
    return Manifest(**{**base, **kw})


def emb(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(size=D).astype(np.float32)


def tok(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).normal(size=(T, H)).astype(np.float32)


def item(i: int, **meta) -> NewImage:
    return NewImage(f"/data/{i}.jpg", f"hash{i}", 100 + i, 1.0, {"i": i, **meta})


def add(col: Collection, nums: list[int], **meta) -> list[int]:
    return col.add_batch([item(i, **meta) for i in nums], np.stack([emb(i) for i in nums]),
                         np.stack([tok(i) for i in nums]))


@pytest.fixture
def col(tmp_path):
    c = Collection.create(tmp_path / ".f2b", manifest())
    yield c
    c.close()


def write(path: Path, data: bytes) -> FileStat:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return FileStat.of(path)


# ----------------------------------------------------------------------------- open / create


def test_create_open_and_their_errors(tmp_path):
    folder = tmp_path / ".f2b"
    with pytest.raises(CollectionNotFoundError, match="no collection at"):
        Collection.open(folder)
    with Collection.create(folder, manifest()) as c:
        add(c, [1, 2])
    names = {p.name for p in folder.iterdir()}
    assert {"manifest.json", "catalog.sqlite", "tokens", "index.faiss", "index.state.json", "lock"} <= names
    with pytest.raises(CollectionExistsError, match="--reindex"):
        Collection.create(folder, manifest())
    with Collection.open(folder) as ro:
        assert len(ro) == 2 and not ro.writable
        with pytest.raises(CollectionReadOnlyError, match="writable=True"):
            add(ro, [3])
    with Collection.create(folder, manifest(model_fingerprint="fp-new"), overwrite=True) as c:
        assert len(c) == 0 and c.manifest.model_fingerprint == "fp-new"
        assert not list((folder / "tokens").glob("*.arrow"))


def test_check_compatible_from_the_collection(col):
    col.check_compatible("fp-demo", {"embed": "prompt", "tokens": "pool", "budget": T})
    with pytest.raises(CollectionMismatchError, match=r"f2b index --reindex --collection .*\.f2b"):
        col.check_compatible("fp-other", None, model_name="other")


def test_two_writers_share_a_collection_and_a_held_lock_excludes(col):
    from fwd2bot_index.collection import CollectionLockedError

    other = Collection.open(col.path, writable=True)  # the lock is held only while writing
    add(col, [1])
    add(other, [2])  # catches up with col's batch first, then commits its own
    add(col, [3])
    assert sorted(h.metadata["i"] for h in col.search(emb(2), k=5)) == [1, 2, 3]
    assert other.search(emb(3), k=1)[0].metadata["i"] == 3
    other.close()
    with Collection.open(col.path, writable=True, hold_lock=True) as holder:
        with pytest.raises(CollectionLockedError, match="being written by another process"):
            Collection.open(col.path, writable=True, lock_timeout=0.2)
        with Collection.open(col.path) as reader:
            assert len(reader) == 3
        add(holder, [4])
    assert col.verify().ok and len(col) == 4


# ------------------------------------------------------------------------ adding and dedup


def test_identical_content_is_one_image_with_several_paths(col):
    a = NewImage("/data/a.jpg", "same", 10, 1.0, {"i": 1})
    b = NewImage("/data/copy/a.jpg", "same", 10, 2.0, {"i": 1})
    ids = col.add_batch([a, b], np.stack([emb(1), emb(1)]), np.stack([tok(1), tok(1)]))
    assert ids[0] == ids[1] and len(col) == 1 and len(col.index) == 1
    assert col.add_path_alias("/data/third.jpg", "same", 10, 3.0) == ids[0]
    assert col.add_path_alias("/data/x.jpg", "unknown-hash", 1, 1.0) is None
    record = col.get(ids[0])
    assert record.paths == ("/data/a.jpg", "/data/copy/a.jpg", "/data/third.jpg")
    # the same content in a later batch is again an alias, not a second image
    again = col.add_batch([NewImage("/data/fourth.jpg", "same", 10, 4.0)], emb(1)[None], tok(1)[None])
    assert again == ids[:1] and len(col) == 1 and col.verify().ok
    hits = col.search(emb(1), k=5)
    assert [h.path for h in hits] == ["/data/a.jpg"]


def test_batch_validation_stores_nothing_on_bad_input(col):
    add(col, [1])
    with pytest.raises(ValueError, match=r"embeddings have shape \(1, 3\), expected \(1, 16\)"):
        col.add_batch([item(2)], np.ones((1, 3)), tok(2)[None])
    with pytest.raises(ValueError, match=r"tokens have shape"):
        col.add_batch([item(2)], emb(2)[None], np.ones((1, T + 1, H)))
    bad = emb(3).copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="/data/3.jpg: its embedding or tokens contain NaN"):
        col.add_batch([item(2), item(3)], np.stack([emb(2), bad]), np.stack([tok(2), tok(3)]))
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        col.add_batch([NewImage("/d/o.jpg", "h", 1, 1.0, {"x": object()})], emb(4)[None], tok(4)[None])
    assert len(col) == 1 and len(list((col.path / "tokens").glob("*.arrow"))) == 1 and col.verify().ok


def test_tokens_and_embeddings_come_back(col):
    ids = add(col, [1, 2, 3])
    assert np.abs(col.get_tokens(ids[1]) - tok(2)).max() < 0.01
    assert col.get_tokens_batch([ids[2], ids[0]]).shape == (2, T, H)
    e = col.embedding(ids[0])
    assert np.allclose(e, emb(1) / np.linalg.norm(emb(1)), atol=1e-6)
    assert col.resolve(ids[1]).path == "/data/2.jpg" and col.resolve(str(ids[1])).id == ids[1]
    assert col.resolve("/data/3.jpg").id == ids[2]
    with pytest.raises(KeyError, match="no image with id 999"):
        col.resolve(999)
    with pytest.raises(KeyError, match="is not indexed"):
        col.resolve("/data/none.jpg")
    assert [r.id for r in col.list_images(1, 5)] == ids[1:]


def test_int8_collection_is_smaller_and_close(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(16, T, 512)).astype(np.float32)
    items = [item(i) for i in range(16)]
    sizes = {}
    for dtype in ("fp16", "int8"):
        with Collection.create(tmp_path / dtype, manifest(token_dim=512, token_dtype=dtype)) as c:
            ids = c.add_batch(items, np.stack([emb(i) for i in range(16)]), tokens)
            err = np.abs(c.get_tokens(ids[3]) - tokens[3]).max()
            assert err < (0.01 if dtype == "fp16" else 0.03)
            sizes[dtype] = c.info()["tokens_bytes_per_image"]
    assert sizes["int8"] < 0.6 * sizes["fp16"]


# ----------------------------------------------------------------------- incremental plans


def test_plan_sorts_files_for_an_incremental_run(col, tmp_path):
    photos = tmp_path / "photos"
    a = write(photos / "a.jpg", b"AAA")
    b = write(photos / "b.jpg", b"BBB")
    c = write(photos / "c.jpg", b"CCC")
    bad = write(photos / "bad.jpg", b"broken")
    to_encode, done, dups = col.plan([a, b, c, bad])
    assert [f.path for f in to_encode] == [a.path, b.path, c.path, bad.path] and not done and not dups
    assert to_encode[0].hash == hashlib.sha256(b"AAA").hexdigest()
    enc = {f.path: f for f in to_encode}
    col.add_batch([NewImage(f.path, f.hash, f.size, f.mtime) for f in (enc[a.path], enc[b.path])],
                  np.stack([emb(1), emb(2)]), np.stack([tok(1), tok(2)]))
    col.record_failure(bad.path, bad.size, bad.mtime, "truncated image data")
    copy = write(photos / "sub" / "a-copy.jpg", b"AAA")
    twin1, twin2 = write(photos / "t1.jpg", b"TWIN"), write(photos / "t2.jpg", b"TWIN")
    plan = col.plan([a, b, c, bad, copy, twin1, twin2, str(photos / "c.jpg")])
    assert [f.path for f in plan.to_encode] == [c.path, twin1.path]
    assert [(f.path, i) for f, i in plan.already_indexed] == [(a.path, 1), (b.path, 2)]
    assert [f.path for f in plan.duplicates] == [copy.path, twin2.path, c.path]
    assert plan.failed_unchanged == [(bad, "truncated image data")]
    # a failed file is retried once it changes
    os.utime(bad.path, (1, 12345))
    assert [f.path for f in col.plan([FileStat.of(bad.path)]).to_encode] == [bad.path]
    missing = FileStat(str(photos / "gone.jpg"), 1, 1.0)
    assert col.plan([missing]).unreadable[0][1].startswith("cannot read the file")
    assert col.failures()[0]["reason"] == "truncated image data"


def test_changed_content_replaces_the_old_image(col, tmp_path):
    f = write(tmp_path / "p.jpg", b"v1")
    (first,) = col.plan([f]).to_encode
    [old_id] = col.add_batch([NewImage(f.path, first.hash, f.size, f.mtime)], emb(1)[None], tok(1)[None])
    os.utime(f.path, (1, 999))
    f2 = write(tmp_path / "p.jpg", b"version 2")
    (second,) = col.plan([f2]).to_encode
    [new_id] = col.add_batch([NewImage(f2.path, second.hash, f2.size, f2.mtime)], emb(2)[None], tok(2)[None])
    assert new_id != old_id and col.get(old_id) is None and len(col) == 1
    assert [h.id for h in col.search(emb(1), k=5)] == [new_id]
    assert col.verify().ok and len(list((col.path / "tokens").glob("*.arrow"))) == 1  # old shard dropped


def test_failure_of_a_previously_indexed_path_removes_its_image(col):
    [image_id] = add(col, [1])
    assert col.path_status("/data/1.jpg")["status"] == "indexed" and col.path_status("/data/1.jpg")["id"] == image_id
    col.record_failure("/data/1.jpg", 5, 9.0, "truncated image data (the file is incomplete; re-copy it)")
    assert col.get(image_id) is None and len(col.index) == 0 and col.verify().ok
    assert col.failures()[0]["path"] == "/data/1.jpg"
    status = col.path_status("/data/1.jpg")
    assert status["status"] == "failed" and status["reason"].startswith("truncated")
    assert col.path_status("/data/other.jpg") == {"path": "/data/other.jpg", "status": "unknown"}


def test_moved_file_is_relinked_by_hash_not_re_encoded(col, tmp_path):
    f = write(tmp_path / "old" / "x.jpg", b"content")
    (new,) = col.plan([f]).to_encode
    [image_id] = col.add_batch([NewImage(f.path, new.hash, f.size, f.mtime)], emb(1)[None], tok(1)[None])
    moved = tmp_path / "new" / "x.jpg"
    moved.parent.mkdir()
    os.rename(f.path, moved)
    plan = col.plan([FileStat.of(moved)])
    assert not plan.to_encode and [d.path for d in plan.duplicates] == [str(moved)]
    d = plan.duplicates[0]
    assert col.add_path_alias(d.path, d.hash, d.size, d.mtime) == image_id
    result = col.prune(roots=[tmp_path])
    assert result == {"paths": [f.path], "images": []}
    assert col.get(image_id).paths == (str(moved),) and col.verify().ok


def test_prune_by_scan_and_by_existence(col, tmp_path):
    files = [write(tmp_path / "ph" / f"{i}.jpg", bytes([i])) for i in range(4)]
    plan = col.plan(files)
    col.add_batch([NewImage(f.path, f.hash, f.size, f.mtime) for f in plan.to_encode],
                  np.stack([emb(i) for i in range(4)]), np.stack([tok(i) for i in range(4)]))
    col.add_path_alias(str(tmp_path / "elsewhere" / "0.jpg"), plan.to_encode[0].hash, 1, 1.0)
    col.record_failure(str(tmp_path / "ph" / "broken.jpg"), 1, 1.0, "not an image file")
    # a scan of ph/ that no longer sees 1.jpg: only paths under ph/ are considered
    result = col.prune(existing_paths=[files[0].path, files[2].path, files[3].path], roots=[tmp_path / "ph"])
    assert sorted(result["paths"]) == sorted([files[1].path, str(tmp_path / "ph" / "broken.jpg")])
    assert len(result["images"]) == 1 and len(col) == 3 and not col.failures()
    # existence check: 0.jpg vanishes but its content lives on at elsewhere/0.jpg (not on disk either)
    os.remove(files[0].path)
    os.remove(files[2].path)
    result = col.prune(roots=[tmp_path / "ph"])
    assert sorted(result["paths"]) == sorted([files[0].path, files[2].path]) and len(result["images"]) == 1
    assert len(col) == 2 and col.verify().ok


# -------------------------------------------------------------------------------- searching


@pytest.mark.parametrize("backend,options", [("faiss", {"kind": "hnsw"}), ("qdrant-edge", {}), ("qdrant-local", {})])
def test_search_is_the_same_on_every_backend(backend, options, tmp_path):
    nums = list(range(40))
    results = {}
    for name, opts in (("reference", {"kind": "flat"}), (backend, options)):
        real = "faiss" if name == "reference" else name
        with Collection.create(tmp_path / name, manifest(), backend=real, backend_options=opts) as c:
            add(c, nums[:20], camera="A")
            add(c, nums[20:], camera="B")
            q = np.stack([emb(3) + 0.5 * emb(100), emb(30)])
            results[name] = [h for row in c.search_batch(q, k=8) for h in row]
            results[name + "/f"] = c.search(emb(3), k=5, filter={"camera": "B"})
    for key in ("", "/f"):
        ref, got = results["reference" + key], results[backend + key]
        assert [h.path for h in ref] == [h.path for h in got]
        assert np.allclose([h.score for h in ref], [h.score for h in got], atol=1e-5)
    assert all(int(h.path[6:-4]) >= 20 for h in results["reference/f"])


def test_pagination_threshold_filters_and_more_like_this(col):
    ids = add(col, list(range(30)), camera="A")
    add(col, list(range(30, 40)), camera="B")
    q = emb(5)
    top = col.search(q, k=12)
    assert top[0].id == ids[5] and top[0].score == pytest.approx(1.0, abs=1e-5)
    pages = col.search(q, k=4) + col.search(q, k=4, offset=4) + col.search(q, k=4, offset=8)
    assert [h.id for h in pages] == [h.id for h in top]
    assert all(h.score >= 0.2 for h in col.search(q, k=40, min_score=0.2))
    assert len(col.search(q, k=40, min_score=0.2)) < 40
    assert {h.metadata["camera"] for h in col.search(q, k=40, filter={"camera": "B"})} == {"B"}
    assert [h.metadata["i"] for h in col.search(q, k=3, filter={"i>=": 10, "i<": 13})] != []
    assert all(10 <= h.metadata["i"] < 13 for h in col.search(q, k=10, filter={"i>=": 10, "i<": 13}))
    assert col.search(q, k=5, filter={"camera": "nobody"}) == []
    similar = col.similar(ids[5], k=3)
    assert ids[5] not in [h.id for h in similar] and len(similar) == 3
    assert similar[0].id == top[1].id
    assert col.search(q, k=0) == []
    with pytest.raises(ValueError, match="stores 16-d embeddings"):
        col.search(np.ones(7))
    with pytest.raises(ValueError, match="use search_batch"):
        col.search(np.ones((2, D)))


def test_removal_hides_images_everywhere(col):
    ids = add(col, list(range(10)))
    assert col.remove([ids[0], ids[1], 12345]) == [ids[0], ids[1]]
    assert ids[0] not in [h.id for h in col.search(emb(0), k=10)]
    assert col.remove_paths(["/data/2.jpg"]) == [ids[2]]
    assert len(col) == 7 and len(col.index) == 7 and col.verify().ok


def test_qdrant_server_backend_through_the_shared_client_code(tmp_path):
    # No server can run here: ":memory:" gives qdrant-client's in-process engine behind the same
    # class. It forgets everything on close, so reopening exercises the rebuild from the token store.
    opts = {"url": ":memory:", "collection_name": "photos"}
    with Collection.create(tmp_path / "c", manifest(), backend="qdrant-server", backend_options=opts) as c:
        add(c, list(range(15)))
        assert c.search(emb(4), k=1)[0].path == "/data/4.jpg"
    assert Manifest.load(tmp_path / "c").backend_options == opts
    with Collection.open(tmp_path / "c", writable=True) as again:
        assert len(again.index) == 15 and again.verify().ok
        assert again.search(emb(9), k=1)[0].path == "/data/9.jpg"


def test_ivfpq_scores_are_rescored_exactly(tmp_path):
    opts = {"kind": "ivfpq", "train_min": 300, "ivf_nlist": 4, "pq_nbits": 4}
    with Collection.create(tmp_path / "c", manifest(), backend_options=opts) as c:
        ids = add(c, list(range(400)))
        assert c.index.describe()["structure"] == "ivfpq"
        q = emb(7)
        hits = c.search(q, k=5)
        qn = q / np.linalg.norm(q)
        for h in hits:
            e = emb(h.metadata["i"])
            assert h.score == pytest.approx(float(qn @ (e / np.linalg.norm(e))), abs=1e-5)
        assert hits[0].id == ids[7]


# ------------------------------------------------------------------------- readers & health


def test_reader_sees_commits_the_writer_has_not_saved(col):
    add(col, [1, 2])
    col.save()
    reader = Collection.open(col.path)
    try:
        assert reader.search(emb(1), k=1)[0].path == "/data/1.jpg"
        [new_id] = add(col, [3])           # committed, index not saved yet
        col.remove([col.resolve("/data/1.jpg").id])
        assert reader.search(emb(3), k=1)[0].id == new_id
        assert "/data/1.jpg" not in [h.path for h in reader.search(emb(1), k=5)]
        col.save()
        add(col, [4])
        assert reader.search(emb(4), k=1)[0].path == "/data/4.jpg"
        assert reader.verify().ok
    finally:
        reader.close()


def test_reader_of_a_held_qdrant_edge_index_searches_exactly(tmp_path):
    with Collection.create(tmp_path / "c", manifest(), backend="qdrant-edge") as writer:
        add(writer, [1, 2, 3])
        with Collection.open(writer.path) as reader:  # the engine is locked by the writer
            assert reader.index.backend == "exact"
            assert reader.search(emb(2), k=1)[0].path == "/data/2.jpg"


def test_lost_index_is_rebuilt_on_open(col):
    add(col, list(range(12)))
    col.close()
    (col.path / "index.faiss").unlink()
    with Collection.open(col.path, writable=True) as again:
        assert len(again.index) == 12 and again.verify().ok
    (col.path / "index.faiss").write_bytes(b"not faiss at all")
    with Collection.open(col.path, writable=True) as again:
        assert len(again.index) == 12 and again.search(emb(4), k=1)[0].path == "/data/4.jpg"


def test_verify_and_repair_after_a_lost_shard(col, tmp_path):
    files = [NewImage(write(tmp_path / f"{i}.jpg", b"x%d" % i).path, f"hash{i}", 2, 1.0) for i in (1, 2)]
    col.add_batch(files, np.stack([emb(1), emb(2)]), np.stack([tok(1), tok(2)]))
    add(col, [3, 4])  # their files (/data/3.jpg, /data/4.jpg) do not exist
    shards = sorted((col.path / "tokens").glob("*.arrow"))
    shards[0].unlink()
    col.tokens.close()
    report = col.verify()
    assert not report.ok and len(report.missing_shards) == 1 and len(report.bad_rows) == 2
    assert any("missing" in p for p in report.problems)
    after = col.repair()
    assert after.ok and len(col) == 2
    assert any("re-encoded by the next f2b index" in a for a in after.actions)
    # the forgotten images' files are new again for the next indexing run
    assert [f.path for f in col.plan([files[0].path]).to_encode] == [files[0].path]
    # data gone and no file to re-encode from: kept and reported, never silently forgotten
    shards = sorted((col.path / "tokens").glob("*.arrow"))
    shards[0].unlink()
    col.tokens.close()
    after = col.repair()
    assert not after.ok and len(col) == 2 and any("files are gone; kept" in a for a in after.actions)
    col.remove(col.catalog.ids().tolist())  # the user decides
    assert col.verify().ok and len(col) == 0


def test_verify_finds_index_drift(col):
    ids = add(col, [1, 2, 3])
    col.index.remove([ids[0]])
    col.index.add(np.array([999], np.int64), np.eye(1, D, dtype=np.float32))
    report = col.verify()
    assert report.missing_in_index == [ids[0]] and report.extra_in_index == [999] and not report.ok
    assert col.repair().ok and sorted(col.index.ids().tolist()) == ids


def test_compact_rewrites_sparse_shards(col):
    first = add(col, list(range(10)))
    second = add(col, list(range(10, 20)))
    col.remove(first[:8])
    result = col.compact()
    assert result["rewritten"] == 2 and result["written"] == 1
    assert len(list((col.path / "tokens").glob("*.arrow"))) == 1
    for i, image_id in zip(range(8, 20), first[8:] + second):
        assert np.abs(col.get_tokens(image_id) - tok(i)).max() < 0.01
    assert col.verify().ok


def test_change_backend_keeps_results(col):
    add(col, list(range(25)))
    def ranked():
        hits = col.search(emb(3), k=6)
        return [h.id for h in hits], np.array([h.score for h in hits])

    ids, scores = ranked()
    col.change_backend("qdrant-edge")
    assert not (col.path / "index.faiss").exists() and Manifest.load(col.path).backend == "qdrant-edge"
    ids2, scores2 = ranked()
    assert ids2 == ids and np.allclose(scores2, scores, atol=1e-5)
    col.change_backend("faiss", {"kind": "hnsw"})
    assert not (col.path / "qdrant-edge").exists() and col.index.describe()["structure"] == "hnsw"
    ids3, scores3 = ranked()
    assert ids3 == ids and np.allclose(scores3, scores, atol=1e-5)
    col.close()
    with Collection.open(col.path) as again:
        assert again.manifest.backend_options == {"kind": "hnsw"} and again.verify().ok


def test_info_and_export(col, tmp_path):
    add(col, list(range(8)))
    info = col.info()
    assert info["indexed"] == 8 and info["backend"] == "faiss" and info["failed"] == 0
    payload = T * H * 2 + D * 4  # fp16 tokens + float32 embedding per image
    assert payload < info["tokens_bytes_per_image"] < payload + 2048
    assert info["bytes_per_image"] == pytest.approx(info["tokens_bytes_per_image"] + info["index_bytes_per_image"], abs=0.2)
    out = tmp_path / "out.parquet"
    assert col.export_parquet(out) == 8
    table = pq.read_table(out)
    assert table.num_rows == 8 and sorted(table.column("path").to_pylist())[0] == "/data/0.jpg"
    assert np.array(table.column("tokens")[0].as_py()).shape == (T, H)


def test_collection_and_imaging_never_import_torch():
    code = ("import sys; import fwd2bot_index.collection, fwd2bot_index.imaging; "
            "from fwd2bot_index.collection import Collection, FaissIndex, QdrantEdgeIndex; "
            "import fwd2bot_index.collection.faiss_index, fwd2bot_index.collection.qdrant_index; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
