"""The overlapped index pipeline (issue 16): the writer thread commits batch i while the model encodes
batch i+1. It must give exactly what committing batch by batch gives, keep every batch committed
before an error or a Ctrl-C, and never commit anything twice or out of order."""

from __future__ import annotations

import errno
import gc
import sys
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from fwd2bot_index.collection import Collection, CollectionError, NewImage
from fwd2bot_index.imaging import image_metadata, load_image
from fwd2bot_index.model.tiny import TinySpec, random_images, save_tiny_llava
from fwd2bot_index.service import IndexInterrupted, ImageService, IndexReport, _Committer, open_service
from fwd2bot_index.synthetic import write_demo_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, BATCH = 14, 4  # four batches, the last one short


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny64", TinySpec(image_size=64), seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """N demo images, one exact copy of the first (a duplicate) and one broken file."""
    root = tmp_path_factory.mktemp("d")
    write_demo_data(root, n=N, seed=7)
    images = root / "images"
    first = sorted(images.glob("*.png"))[0]
    (images / "zz_copy.png").write_bytes(first.read_bytes())
    (images / "000003_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    return images


@pytest.fixture
def fresh(tmp_path, model_dir):
    svc = open_service(tmp_path / "c", model=str(model_dir), device="cpu", create=True)
    yield svc
    svc.close()


def _rows(coll: Collection, out) -> dict:
    coll.export_parquet(out)
    table = pq.read_table(out).sort_by("id").to_pydict()
    return {"id": table["id"], "path": table["path"], "hash": table["hash"], "metadata": table["metadata"],
            "embedding": np.asarray(table["embedding"], np.float32), "tokens": np.asarray(table["tokens"], np.float32)}


def test_overlapped_pipeline_gives_what_batch_by_batch_commits_give(tmp_path, folder, fresh, model_dir):
    report = fresh.index([folder], batch_size=BATCH)
    assert (report.indexed, report.duplicates, len(report.failed)) == (N, 1, 1)
    assert report.commit_seconds > 0 and report.encode_seconds > 0
    assert set(report.to_dict()["timings"]) == {"check", "decode_wait", "encode", "commit", "commit_wait", "finish"}

    # the reference: plan, decode, encode and commit one batch at a time, inline, in plan order
    with open_service(tmp_path / "ref", model=str(model_dir), device="cpu", create=True) as ref:
        coll = ref.collection
        plan = coll.plan([str(p) for p in sorted(folder.iterdir())])
        good = []
        for stat in plan.to_encode:
            try:
                good.append((stat, load_image(stat.path)))
            except Exception:  # noqa: BLE001  (the broken file)
                continue
        for start in range(0, len(good), BATCH):
            part = good[start:start + BATCH]
            enc = ref.model.encode_images([im for _, im in part], batch_size=BATCH, strategy=ref.strategy)
            coll.add_batch([NewImage(s.path, s.hash, s.size, s.mtime, image_metadata(s.path)) for s, _ in part],
                           enc.embeddings, enc.tokens)
        for stat in plan.duplicates:
            coll.add_path_alias(stat.path, stat.hash, stat.size, stat.mtime)
        want = _rows(coll, tmp_path / "ref.parquet")
    got = _rows(fresh.collection, tmp_path / "got.parquet")
    assert got["id"] == want["id"] and got["path"] == want["path"] and got["hash"] == want["hash"]
    assert got["metadata"] == want["metadata"]
    assert np.allclose(got["embedding"], want["embedding"], atol=1e-5)
    assert np.allclose(got["tokens"], want["tokens"], atol=1e-3)  # stored as fp16
    assert fresh.collection.verify().ok


def test_disk_full_while_committing_a_batch_keeps_the_earlier_ones(tmp_path, folder, fresh):
    tokens = fresh.collection.tokens
    real, calls, intervals, frozen = tokens.write_shard, [], [], []

    def third_fails(*args, **kwargs):
        calls.append(1)
        intervals.append(sys.getswitchinterval())
        frozen.append(gc.get_freeze_count())
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    tokens.write_shard = third_fails
    with pytest.raises(CollectionError) as caught:
        fresh.index([folder], batch_size=BATCH)
    message = str(caught.value)
    assert "\n" not in message and "disk" in message.lower(), message
    assert len(calls) == 3  # the writer stopped at the failing batch: nothing after it was even tried
    assert max(intervals) < sys.getswitchinterval()  # the model got the GIL back quickly while they ran
    assert min(frozen) > 0 and gc.get_freeze_count() == 0  # long-lived objects out of the GC's way, then back
    coll = fresh.collection
    assert len(coll) == 2 * BATCH and coll.verify().ok
    tokens.write_shard = real
    again = fresh.index([folder], batch_size=BATCH)  # the rerun adds the rest, each image once
    assert again.indexed == N - 2 * BATCH and again.unchanged == 2 * BATCH
    assert len(coll) == N and coll.verify().ok
    # every file once: the copy as a second path of its twin, the broken file as a recorded failure
    assert sorted(coll.catalog.all_paths()) == sorted(str(p) for p in folder.iterdir())


def test_ctrl_c_while_encoding_keeps_every_committed_batch(tmp_path, folder, fresh):
    model = fresh.model
    real, calls = model.encode_images, []

    def third_is_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    model.encode_images = third_is_interrupted
    before = sys.getswitchinterval()
    try:
        with pytest.raises(IndexInterrupted) as caught:
            fresh.index([folder], batch_size=BATCH)
    finally:
        del model.encode_images
    report = caught.value.report
    assert sys.getswitchinterval() == before  # the quick GIL hand-off ends with the run, interrupted or not
    assert report.interrupted and report.indexed == 2 * BATCH  # the batch queued at the interrupt is committed too
    assert len(fresh.collection) == 2 * BATCH and fresh.collection.verify().ok
    again = fresh.index([folder], batch_size=BATCH)
    assert again.indexed == N - 2 * BATCH and len(fresh.collection) == N


def test_writer_stops_at_its_first_error_and_hands_it_to_the_caller():
    done, gate = [], threading.Event()
    boom = OSError(errno.EIO, "Input/output error")

    def job(n):
        if n == 0:
            gate.wait(5)
        if n == 1:
            raise boom
        done.append(n)

    committer = _Committer(IndexReport(), depth=1)
    committer.submit(job, 0)
    committer.submit(job, 1)  # waits in the queue while job 0 holds the writer
    gate.set()
    try:
        committer.submit(job, 2)  # queued before or refused after job 1 failed: never run either way
    except OSError as exc:
        assert exc is boom
    with pytest.raises(OSError) as caught:
        committer.close()
    assert caught.value is boom and done == [0]


def test_demo_world_check_runs_beside_the_encoder(tmp_path, model_dir):
    """The first images of a `demo` collection are tested in the decode pool: photos are counted as foreign."""
    write_demo_data(tmp_path / "d", n=5, seed=3)
    for i, im in enumerate(random_images(3, seed=2, size=(64, 64))):
        im.save(tmp_path / "d" / "images" / f"noise_{i}.png")
    with open_service(tmp_path / "c", model=str(model_dir), device="cpu", create=True) as svc:
        demo = ImageService(svc.collection, "demo", model=svc.model)  # the check is for the `demo` model
        report = demo.index([tmp_path / "d" / "images"], batch_size=BATCH)
    assert report.indexed == 8 and report.world_checked == 8 and report.world_foreign == 3  # all 8 checked


def test_a_heap_the_process_froze_itself_stays_frozen(tmp_path, folder, fresh):
    """A server freezes its heap once its model loaded; an index run in it must not thaw that."""
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        fresh.index([folder], batch_size=BATCH)
        assert gc.get_freeze_count() > 0.9 * before > 0  # not thawed (a few frozen objects died by refcount)
    finally:
        gc.unfreeze()
