"""`f2b index` holds a bounded number of decoded bytes (issue 22, loose end A): the batch being filled
is cut when its images' bytes reach half of ``max_inflight_bytes`` and the read-ahead stops reading at
the other half, so large photos make smaller batches instead of gigabytes in flight. Counted through
the decoded images themselves (weak references to every image ``load_image`` returns: alive = held
somewhere), not through timing; the model is a tiny random one, run for real."""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fwd2bot_index import indexing
from fwd2bot_index.image_shape import held_bytes
from fwd2bot_index.indexing import DEFAULT_MAX_INFLIGHT_BYTES, _prefetch
from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
from fwd2bot_index.service import ServiceError, open_service

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, SIDE = 40, 64
ONE = SIDE * SIDE * 4  # bytes Pillow holds for one decoded 64 x 64 RGB image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny64", TinySpec(image_size=64), seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, write_photo):
    """N photos of one size (distinct content) and one broken file among them."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(N):
        write_photo(root / f"{i:03d}.png", size=(SIDE, SIDE), seed=i)
    (root / "017_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    return root


class Held:
    """Every image the indexing pipeline decodes, weakly: the most alive at once is what it held."""

    def __init__(self, monkeypatch):
        self._refs: dict[int, weakref.ref] = {}  # a PIL image is unhashable (it defines ==): keyed by its ref's id
        self.most = 0
        self._lock = threading.Lock()
        real = indexing.load_image

        def gone(ref):
            with self._lock:
                del self._refs[id(ref)]

        def load_image(*args, **kwargs):
            image = real(*args, **kwargs)
            ref = weakref.ref(image, gone)
            with self._lock:
                self._refs[id(ref)] = ref
                self.most = max(self.most, len(self._refs))
            return image

        monkeypatch.setattr(indexing, "load_image", load_image)


def _index(tmp_path, name, model_dir, folder, monkeypatch, **kwargs):
    """Index ``folder`` into a new collection; (its rows, the most images alive, the model's batch sizes)."""
    held = Held(monkeypatch)
    with open_service(tmp_path / name, model=str(model_dir), device="cpu", create=True) as svc:
        model, batches = svc.model, []
        real = model.encode_images

        def encode_images(images, *args, **kw):  # the real model: only the batch sizes are noted
            batches.append(len(images))
            return real(images, *args, **kw)

        model.encode_images = encode_images
        try:
            report = svc.index([folder], batch_size=16, workers=4, **kwargs)
        finally:
            del model.encode_images
        assert (report.indexed, len(report.failed)) == (N, 1) and svc.collection.verify().ok
        svc.collection.export_parquet(tmp_path / f"{name}.parquet")
    table = pq.read_table(tmp_path / f"{name}.parquet").sort_by("id").to_pydict()
    rows = {"id": table["id"], "path": table["path"], "hash": table["hash"],
            "embedding": np.asarray(table["embedding"], np.float32), "tokens": np.asarray(table["tokens"], np.float32)}
    return rows, held.most, batches


def _same(got, want):
    assert got["id"] == want["id"] and got["path"] == want["path"] and got["hash"] == want["hash"]
    assert np.allclose(got["embedding"], want["embedding"], atol=1e-5)
    assert np.allclose(got["tokens"], want["tokens"], atol=1e-3)  # stored as fp16


def test_a_byte_budget_bounds_the_images_held_and_changes_no_result(tmp_path, model_dir, folder, monkeypatch):
    unbounded, most_unbounded, batches_unbounded = _index(tmp_path, "free", model_dir, folder, monkeypatch,
                                                          max_inflight_bytes=None)
    # counts only: a whole batch of 16 is alive while it is encoded (the read-ahead may hold more)
    assert batches_unbounded[:2] == [16, 16] and most_unbounded >= 16

    # 8 images' worth: 4 in the batch being filled, 4 read ahead, never more alive at once
    bounded, most, batches = _index(tmp_path, "eight", model_dir, folder, monkeypatch, max_inflight_bytes=8 * ONE)
    _same(bounded, unbounded)
    assert max(batches) == 4 and sum(batches) == N
    assert most <= 8

    # less than one image: each image goes through alone, and nothing else is held beside it
    alone, most, batches = _index(tmp_path, "tiny", model_dir, folder, monkeypatch, max_inflight_bytes=1000)
    _same(alone, unbounded)
    assert batches == [1] * N and most == 1


def test_the_budget_is_counted_in_what_pillow_holds():
    assert held_bytes(SIDE, SIDE, "RGB") == ONE  # RGB in 4 bytes a pixel, not 3
    assert held_bytes(10, 10, "L") == 100 and held_bytes(10, 10, "I;16") == 200 and held_bytes(10, 10, "RGBA") == 400
    assert DEFAULT_MAX_INFLIGHT_BYTES == 1 << 30


@pytest.mark.parametrize("sizes, budget, most_ahead", [
    ([10] * 30, 40, 3),  # like-sized results: 4 in flight (the budget's worth), 3 once one is taken
    ([10] * 30, 5, 0),  # smaller than one result: one at a time
    ([100, 10, 100, 10, 100], 40, 0),  # larger than the budget: each goes through alone (so do the ones after)
    ([10] * 30, None, 6),  # no budget: the count (depth 7) alone
])
def test_the_read_ahead_reads_no_further_than_its_budget(sizes, budget, most_ahead):
    """Jobs are read from the plan only when the next one fits: files read ahead of the consumer (read
    from ``jobs``, not yet taken) never pass the budget. Counted in the job stream, whatever the pool's
    speed: a job still running counts as large as the largest result so far."""
    read, taken, ahead = [], [], []

    def jobs():
        for i, n in enumerate(sizes):
            read.append(i)
            yield (i, n)

    with ThreadPoolExecutor(4) as pool:
        for i, _ in _prefetch(pool, jobs(), lambda i, n: (i, n), depth=7, max_bytes=budget, size=lambda r: r[1]):
            taken.append(i)
            ahead.append(len(read) - len(taken))  # read, not yet taken
    assert taken == list(range(len(sizes)))
    assert max(ahead) == most_ahead


@pytest.mark.parametrize("budget", [0, 40])
def test_nothing_is_read_ahead_before_a_size_is_known(budget):
    """Until one result is measured, a job still running counts as the whole budget: the plan is asked
    for the second file only once the first is decoded. The first job waits (up to a second) for the plan
    to be asked: a prefetcher that read ahead would be caught in the act, one that waits just takes longer."""
    release, finished, early = threading.Event(), threading.Event(), []

    def jobs():
        yield (0,)
        early.append(not finished.is_set())  # the second file asked for while the first is still decoding
        release.set()
        yield from ((i,) for i in range(1, 5))

    def fn(i):
        if i == 0:
            release.wait(1.0)
            finished.set()
        return i

    with ThreadPoolExecutor(4) as pool:
        taken = list(_prefetch(pool, jobs(), fn, depth=7, max_bytes=budget, size=lambda r: 10))
    assert taken == [0, 1, 2, 3, 4] and early == [False]


def test_a_budget_that_is_not_a_positive_number_is_refused(tmp_path, model_dir, folder):
    with open_service(tmp_path / "c", model=str(model_dir), device="cpu", create=True) as svc:
        for bad in (0, -1, True):
            with pytest.raises(ServiceError, match="max_inflight_bytes"):
                svc.index([folder], max_inflight_bytes=bad)
        assert len(svc.collection) == 0


def test_f2b_index_takes_the_budget_in_mib(tmp_path, model_dir, folder):
    from fwd2bot_index.cli.main import app

    runner = CliRunner()
    base = ["index", str(folder), "--model", str(model_dir), "--device", "cpu", "--json"]
    refused = runner.invoke(app, base + ["--collection", str(tmp_path / "a"), "--max-inflight-mb", "-1"])
    assert refused.exit_code == 2 and not (tmp_path / "a").exists()
    done = runner.invoke(app, base + ["--collection", str(tmp_path / "b"), "--max-inflight-mb", "0.05"])
    assert done.exit_code == 0, done.output
    assert '"indexed": 40' in done.stdout


def test_f2b_index_passes_its_budget_in_bytes(tmp_path, folder, monkeypatch):
    """0 MiB is no byte budget; any other value, however small, is a budget (never rounded down to none)."""
    from fwd2bot_index.cli.main import app
    from fwd2bot_index.service import ImageService

    seen = []

    def index(self, roots, **kwargs):  # what the command hands the facade, before any model is asked for
        seen.append(kwargs["max_inflight_bytes"])
        raise ServiceError("stop here")

    monkeypatch.setattr(ImageService, "index", index)
    for mib in ("0", "1e-9", "1024"):
        result = CliRunner().invoke(app, ["index", str(folder), "--collection", str(tmp_path / "c"), "--model",
                                          "demo", "--max-inflight-mb", mib])
        assert result.exit_code == 1 and "stop here" in result.output
    assert seen == [None, 1, 1 << 30]


def test_a_ray_replica_encodes_its_batch_in_parts_within_the_budget(tmp_path, model_dir, folder, monkeypatch):
    """`f2b index --ray`: each worker (``ray_index.Replica``, called here in-process) holds what a local run
    would: its batch goes to the model in parts within the budget, and comes back as one, unchanged."""
    from fwd2bot_index.ray_index import Replica

    with open_service(tmp_path / "c", model=str(model_dir), device="cpu", create=True) as svc:
        manifest = svc.collection.manifest
        chunk = svc.collection.plan([str(p) for p in sorted(folder.iterdir())]).to_encode[:19]  # one broken
    replica = Replica(str(model_dir), manifest, "cpu", "auto")
    real, batches = replica.model.encode_images, []

    def encode_images(images, *args, **kw):  # the real model: only the batch sizes are noted
        batches.append(len(images))
        return real(images, *args, **kw)

    replica.model.encode_images = encode_images
    runs = []
    for budget in (None, 8 * ONE):
        held, batches[:] = Held(monkeypatch), []
        out = replica.encode(chunk, {}, None, 0, max_inflight_bytes=budget)
        runs.append((out, held.most, list(batches)))
    (whole, most_whole, batches_whole), (parts, most, batches_parts) = runs
    assert batches_whole == [18] and most_whole >= 18
    assert max(batches_parts) == 4 and sum(batches_parts) == 18 and most <= 8
    assert [i.path for i in parts.items] == [i.path for i in whole.items] and len(parts.items) == 18
    assert [f.path for f in parts.failed] == [f.path for f in whole.failed] == [str(folder / "017_broken.png")]
    assert np.allclose(parts.embeddings, whole.embeddings, atol=1e-5)
    assert np.allclose(parts.tokens, whole.tokens, atol=1e-4)


def test_f2b_index_refuses_a_budget_that_is_not_finite(tmp_path, folder):
    """``--max-inflight-mb inf`` (or 1e400) passed click's ``min=0`` and crashed after the model loaded
    (``int(inf * 2**20)``: OverflowError): now one line, exit 2, before anything is loaded or created."""
    from fwd2bot_index.cli.main import app

    for bad in ("inf", "Infinity", "1e400", "nan"):  # (click itself refuses nan: below its min=0)
        result = CliRunner().invoke(app, ["index", str(folder), "--collection", str(tmp_path / "c"), "--model",
                                          "demo", "--max-inflight-mb", bad])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, (bad, result.output, result.exception)
        assert lines[0].startswith("error: --max-inflight-mb"), lines[0]
        assert "finite" in lines[0] or bad == "nan", lines[0]
        assert not (tmp_path / "c").exists()
