"""Manifest, writer lock, catalog and token store on real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fwd2bot_index.collection import (
    Catalog,
    CollectionFormatError,
    CollectionLockedError,
    CollectionMismatchError,
    CollectionNotFoundError,
    FilterError,
    Manifest,
    TokenStore,
    WriterLock,
    parse_filter,
)
from fwd2bot_index.collection.tokens import dequantize_int8, quantize_int8

REPO = Path(__file__).resolve().parents[1]


def manifest(**kw) -> Manifest:
    base = dict(model_name="demo", model_fingerprint="f" * 64, strategy={"embed": "prompt", "tokens": "pool", "budget": 4},
                embed_dim=8, token_count=4, token_dim=6)
    return Manifest(**{**base, **kw})


# ---------------------------------------------------------------------------------- manifest


def test_manifest_roundtrip_is_atomic_and_drops_secrets(tmp_path):
    m = manifest(backend="qdrant-server", backend_options={"url": "http://q:6333", "api_key": "s3cret"})
    path = m.save(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))
    text = path.read_text()
    assert "s3cret" not in text and json.loads(text)["backend_options"] == {"url": "http://q:6333"}
    loaded = Manifest.load(tmp_path)
    assert loaded.model_fingerprint == m.model_fingerprint and loaded.backend == "qdrant-server"


def test_manifest_errors(tmp_path):
    with pytest.raises(CollectionNotFoundError, match="no collection at"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest().model_dump(), "format_version": 99}))
    with pytest.raises(CollectionFormatError, match="upgrade fwd2bot-index"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CollectionFormatError, match="unreadable"):
        Manifest.load(tmp_path)
    with pytest.raises(ValueError):
        manifest(token_dtype="fp8")


def test_mismatch_message_names_both_models_and_the_fixes():
    m = manifest(model_name="demo", model_fingerprint="aaaaaaaaaaaa1111")
    m.check_compatible("aaaaaaaaaaaa1111", {"embed": "prompt", "tokens": "pool", "budget": 4})
    with pytest.raises(CollectionMismatchError) as err:
        m.check_compatible("bbbbbbbbbbbb2222", {"embed": "fwd2bot", "tokens": "fwd2bot", "budget": 32},
                           model_name="llava-1.5-7b", collection="/photos/.f2b")
    text = str(err.value)
    assert "model 'demo' (fingerprint aaaaaaaaaaaa" in text and "model 'llava-1.5-7b' (fingerprint bbbbbbbbbbbb" in text
    assert "--collection NEW_FOLDER" in text and "f2b index --reindex --collection /photos/.f2b" in text
    with pytest.raises(CollectionMismatchError, match="budget=8"):
        m.check_compatible("aaaaaaaaaaaa1111", {"embed": "prompt", "tokens": "pool", "budget": 8})


# -------------------------------------------------------------------------------------- lock

_HOLDER = textwrap.dedent("""
    import sys, time
    from fwd2bot_index.collection import WriterLock
    lock = WriterLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def _spawn_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_contention_names_the_pid_and_survives_kill_9(tmp_path):
    proc = _spawn_holder(tmp_path)
    try:
        with pytest.raises(CollectionLockedError) as err:
            WriterLock(tmp_path).acquire()
        assert f"is being written by another process (pid {proc.pid})" in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the lock file is still there, but the kernel dropped the flock with the process
    assert (tmp_path / "lock").exists()
    with WriterLock(tmp_path) as lock:
        assert lock.held


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with WriterLock(tmp_path):
        with pytest.raises(CollectionLockedError):
            WriterLock(tmp_path).acquire()
    WriterLock(tmp_path).acquire().release()


# ----------------------------------------------------------------------------------- catalog


@pytest.fixture
def catalog(tmp_path):
    cat = Catalog(tmp_path / "catalog.sqlite")
    metas = [{"camera_make": "Canon", "width": 4000, "date_taken": "2021-05-01T10:00:00"},
             {"camera_make": "Nikon", "width": 1200, "date_taken": "2019-01-01T00:00:00", "flash": True},
             {"width": 640}]
    with cat.transaction():
        for i, meta in enumerate(metas):
            image_id = cat.insert_image(f"h{i}", 100 + i, json.dumps(meta), "s.arrow", i)
            cat.set_path(f"/p/{i}.jpg", image_id, 100 + i, 1.5)
    yield cat
    cat.close()


def test_catalog_ids_are_never_reused(catalog):
    with catalog.transaction():
        catalog.delete_images([3])
        new = catalog.insert_image("h9", 1, "{}", "s.arrow", 9)
    assert new == 4


def test_catalog_filters(catalog):
    assert catalog.filter_ids({"camera_make": "Canon"}) == {1}
    assert catalog.filter_ids({"width>=": 1200}) == {1, 2}
    assert catalog.filter_ids({"width": {"gt": 700, "lte": 1200}}) == {2}
    assert catalog.filter_ids({"date_taken>=": "2020-01-01"}) == {1}
    assert catalog.filter_ids({"camera_make": ["Canon", "Nikon"]}) == {1, 2}
    assert catalog.filter_ids({"camera_make": None}) == {3}
    assert catalog.filter_ids({"camera_make!=": None}) == {1, 2}
    assert catalog.filter_ids({"flash": True}) == {2}
    assert catalog.filter_ids({"path": "/p/[01].jpg"}) == {1, 2}
    assert catalog.filter_ids({"camera_make": "Leica"}) == set()
    with pytest.raises(FilterError, match="invalid filter key"):
        catalog.filter_ids({"a'); DROP TABLE images; --": 1})
    with pytest.raises(FilterError, match="unknown operator"):
        catalog.filter_ids({"width": {"about": 3}})


def test_standard_metadata_filters_use_an_index(catalog):
    from fwd2bot_index.collection.filters import _compile_filter

    where, params = _compile_filter({"camera_make": "Canon", "date_taken>=": "2020"})
    plan = catalog._db.execute(f"EXPLAIN QUERY PLAN SELECT id FROM images WHERE {where}", params).fetchall()
    assert "USING INDEX meta_" in " ".join(str(row) for row in plan)


def test_parse_filter_expressions():
    assert parse_filter(["camera_make=Canon", "width>=1000", "gps_lat<-10.5", "flash=true", "model!=null"]) == {
        "camera_make": "Canon", "width>=": 1000, "gps_lat<": -10.5, "flash": True, "model!=": None}
    with pytest.raises(FilterError, match="KEY=VALUE"):
        parse_filter(["just words"])


def test_catalog_paths_failures_and_states(catalog):
    with catalog.transaction():
        catalog.record_failure("/p/bad.jpg", 5, 2.0, "truncated")
        catalog.set_path("/p/copy.jpg", 1, 100, 1.5)  # a second path of image 1
    states = catalog.path_states(["/p/0.jpg", "/p/bad.jpg", "/p/new.jpg"])
    assert states == {"/p/0.jpg": ("indexed", 100, 1.5, 1), "/p/bad.jpg": ("failed", 5, 2.0, "truncated")}
    assert catalog.image(1).paths == ("/p/0.jpg", "/p/copy.jpg")
    with catalog.transaction():
        touched = catalog.delete_paths(["/p/0.jpg"])
    assert touched == {1} and catalog.pathless([1]) == []  # still reachable through the copy
    with catalog.transaction():
        old = catalog.record_failure("/p/copy.jpg", 100, 9.0, "now broken")
    assert old == 1 and catalog.pathless([1]) == [1]
    assert catalog.counts() == {"images": 3, "paths": 2, "failed": 2, "pathless_images": 1}


def test_catalog_transaction_rolls_back(catalog):
    with pytest.raises(RuntimeError):
        with catalog.transaction():
            catalog.insert_image("hx", 1, "{}", "s.arrow", 7)
            raise RuntimeError("boom")
    assert catalog.id_by_hash("hx") is None


def test_readonly_catalog_refuses_writes(catalog, tmp_path):
    ro = Catalog(tmp_path / "catalog.sqlite", readonly=True)
    assert ro.counts()["images"] == 3
    with pytest.raises(Exception):
        with ro.transaction():
            ro.insert_image("hz", 1, "{}", "s", 0)
    ro.close()


# ------------------------------------------------------------------------------- token store


def test_token_store_fp16_roundtrip_and_ids(tmp_path):
    rng = np.random.default_rng(0)
    store = TokenStore(tmp_path / "tokens", 4, 6, 8, "fp16")
    tok = rng.normal(size=(3, 4, 6)).astype(np.float32)
    emb = rng.normal(size=(3, 8)).astype(np.float32)
    name = store.write_shard(np.array([10, 11, 12]), emb, tok)
    assert store.list_shards() == [name] and not store.temp_files()
    got = store.read_tokens([(name, 2), (name, 0)])
    assert got.dtype == np.float32 and np.allclose(got, tok[[2, 0]], atol=2e-3)
    assert np.array_equal(store.read_embeddings([(name, 1)]), emb[[1]])  # float32 kept exactly
    assert store.shard_ids(name).tolist() == [10, 11, 12]


def test_int8_quantisation_per_token():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 64)).astype(np.float32) * np.array([1, 10, 0.01, 0])[None, :, None]
    q, s = quantize_int8(x)
    assert q.dtype == np.int8 and s.shape == (2, 4)
    err = np.abs(dequantize_int8(q, s) - x).max(axis=-1)
    assert (err <= s / 2 + 1e-7).all()  # within half a step of each token's own scale


def test_token_store_int8_with_locator_and_export(tmp_path):
    rng = np.random.default_rng(2)
    where: dict[int, tuple[str, int]] = {}

    def locate(ids):
        keys = sorted(where) if ids is None else ids
        return [(i, *where[i]) for i in keys if i in where]

    store = TokenStore(tmp_path / "tokens", 4, 6, 8, "int8", locate)
    tok = rng.normal(size=(2, 4, 6)).astype(np.float32)
    emb = rng.normal(size=(2, 8)).astype(np.float32)
    name = store.write_shard(np.array([5, 6]), emb, tok)
    where.update({5: (name, 0), 6: (name, 1)})
    assert np.abs(store.get_tokens(6) - tok[1]).max() < 0.05
    assert np.array_equal(store.get_embeddings([6, 5]), emb[[1, 0]])
    assert [ids.tolist() for ids, _ in store.iter_embeddings(batch_size=1)] == [[5], [6]]
    with pytest.raises(KeyError, match="no image with id 7"):
        store.get_tokens(7)
    out = tmp_path / "export.parquet"
    n = store.export_parquet(out, [(5, "/a.jpg", "h5", "{}", name, 0), (6, "/b.jpg", "h6", '{"w": 1}', name, 1)])
    table = pq.read_table(out)
    assert n == 2 and table.column_names == ["id", "path", "hash", "metadata", "embedding", "tokens"]
    row = table.slice(1, 1).to_pylist()[0]
    assert row["path"] == "/b.jpg" and np.allclose(row["embedding"], emb[1])
    assert np.abs(np.array(row["tokens"], dtype=np.float32) - tok[1]).max() < 0.05


def test_token_store_deletes_only_what_it_is_told(tmp_path):
    # "Unreferenced, so delete" is the catalog's decision (its shard ledger), never the store's.
    store = TokenStore(tmp_path / "tokens", 1, 2, 2)
    keep = store.write_shard(np.array([1]), np.ones((1, 2)), np.ones((1, 1, 2)))
    doomed = store.write_shard(np.array([2]), np.ones((1, 2)), np.ones((1, 1, 2)))
    (tmp_path / "tokens" / ".tmp-123-x.arrow").write_bytes(b"half a shard")
    assert store.remove_temp_files() == 1 and not store.temp_files()
    assert store.delete_shards([doomed]) == [doomed]
    assert store.list_shards() == [keep]


def test_shard_checksum_and_row_checks_catch_flipped_bytes(tmp_path):
    store = TokenStore(tmp_path / "tokens", 1, 2, 2)
    name = store.write_shard(np.array([1, 2]), np.ones((2, 2)), np.ones((2, 1, 2)),
                             describe=[{"hash": f"h{i}", "size": 1, "metadata": "{}", "paths": [[f"/p{i}", 1, 1.0]]}
                                       for i in (1, 2)])
    digest = store.checksum(name)
    path = tmp_path / "tokens" / name
    data = bytearray(path.read_bytes())
    pos = data.index(np.float16(1).tobytes() * 2)  # the second row's tokens come after the first's
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = TokenStore(tmp_path / "tokens", 1, 2, 2, expected=lambda n: digest)
    with pytest.raises(CollectionFormatError, match="checksum recorded at commit"):
        fresh.read_tokens([(name, 0)])
    assert fresh.good_rows(name).tolist() == [False, True]
    assert [r["hash"] for r in fresh.describe_rows(name)] == ["h1", "h2"]


def test_damaged_shard_is_a_clear_error(tmp_path):
    store = TokenStore(tmp_path / "tokens", 1, 2, 2)
    name = store.write_shard(np.array([1]), np.ones((1, 2)), np.ones((1, 1, 2)))
    (tmp_path / "tokens" / name).write_bytes(b"garbage" * 10)
    fresh = TokenStore(tmp_path / "tokens", 1, 2, 2)
    with pytest.raises(CollectionFormatError, match="unreadable"):
        fresh.read_tokens([(name, 0)])
