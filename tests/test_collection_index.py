"""Vector index backends agree with each other and with exact search, on clustered data."""

from __future__ import annotations

import numpy as np
import pytest

from fwd2bot_index.collection.index import (
    ExactIndex,
    FaissIndex,
    QdrantEdgeIndex,
    QdrantLocalIndex,
    QdrantServerIndex,
    normalize,
    open_index,
)

D = 32


def clustered(n_clusters=20, per=25, seed=0):
    """Points around random unit centres (recall is only meaningful on data with structure)."""
    rng = np.random.default_rng(seed)
    centres = normalize(rng.normal(size=(n_clusters, D)))
    x = np.repeat(centres, per, axis=0) + 0.25 * rng.normal(size=(n_clusters * per, D)).astype(np.float32)
    nq = min(10, n_clusters)
    queries = normalize(centres[:nq] + 0.2 * rng.normal(size=(nq, D)).astype(np.float32))
    return np.arange(1, len(x) + 1, dtype=np.int64) * 7, normalize(x), queries


def make(kind, tmp_path, persistent=False):
    if kind == "flat":
        return FaissIndex(tmp_path / "flat.faiss", D, kind="flat")
    if kind == "hnsw":
        return FaissIndex(tmp_path / "hnsw.faiss", D, kind="hnsw")
    if kind == "edge":
        return QdrantEdgeIndex(tmp_path / "edge", D)
    if kind == "local":
        # qdrant-client local mode commits every point to its SQLite file (~10 ms each here), so
        # only the persistence test pays for a folder; the search code is the same.
        return QdrantLocalIndex(tmp_path / "local" if persistent else ":memory:", D)
    if kind == "server":
        return QdrantServerIndex(":memory:", D)
    return ExactIndex(D)


KINDS = ["flat", "hnsw", "edge", "local", "server", "exact"]


@pytest.fixture
def data():
    return clustered()


def _truth(ids, x, q, k, allowed=None):
    mask = np.ones(len(ids), bool) if allowed is None else np.isin(ids, list(allowed))
    scores = q @ x[mask].T
    order = np.argsort(-scores, axis=1)[:, :k]
    return [[(int(ids[mask][j]), float(scores[r, j])) for j in row] for r, row in enumerate(order)]


@pytest.mark.parametrize("kind", KINDS)
def test_backends_match_exact_top_k(kind, data, tmp_path):
    ids, x, q = data
    index = make(kind, tmp_path)
    try:
        index.add(ids[:300], x[:300])
        index.add(ids[300:], x[300:])
        assert len(index) == len(ids) and sorted(index.ids().tolist()) == sorted(ids.tolist())
        got = index.search(q, 10)
        for g, t in zip(got, _truth(ids, x, q, 10)):
            assert [i for i, _ in g] == [i for i, _ in t]
            assert np.allclose([s for _, s in g], [s for _, s in t], atol=1e-5)
    finally:
        index.close()


@pytest.mark.parametrize("kind", KINDS)
def test_backends_respect_allowed_ids(kind, data, tmp_path):
    ids, x, q = data
    index = make(kind, tmp_path)
    if isinstance(index, FaissIndex):
        index.small_filter = 0  # exercise the IDSelector path, not the brute-force shortcut
    try:
        index.add(ids, x)
        allowed = set(ids[::3].tolist())
        got = index.search(q, 5, allowed_ids=allowed)
        for g, t in zip(got, _truth(ids, x, q, 5, allowed)):
            assert [i for i, _ in g] == [i for i, _ in t]
        assert index.search(q[:1], 5, allowed_ids=set()) == [[]]
        few = {int(ids[0]), int(ids[400])}
        assert {i for i, _ in index.search(q[:1], 5, allowed_ids=few)[0]} == few
    finally:
        index.close()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "edge", "local"])
def test_remove_and_persist(kind, tmp_path):
    ids, x, q = clustered(n_clusters=6, per=10, seed=3)
    index = make(kind, tmp_path, persistent=True)
    index.add(ids, x)
    gone = ids[:20]
    index.remove(gone.tolist())
    index.save()
    index.close()
    again = make(kind, tmp_path, persistent=True)
    try:
        assert len(again) == len(ids) - 20
        assert not set(again.ids().tolist()) & set(gone.tolist())
        truth = _truth(ids[20:], x[20:], q, 5)
        assert [[i for i, _ in r] for r in again.search(q, 5)] == [[i for i, _ in r] for r in truth]
    finally:
        again.close()


def test_hnsw_tombstones_then_rebuild(data, tmp_path):
    ids, x, q = data
    index = FaissIndex(tmp_path / "h.faiss", D, kind="hnsw", tombstone_fraction=0.3)
    index.add(ids, x)
    index.remove(ids[:50].tolist())
    assert index.describe()["tombstones"] == 50 and len(index) == len(ids) - 50
    hits = {i for row in index.search(q, 50) for i, _ in row}
    assert not hits & set(ids[:50].tolist())
    index.save()
    reloaded = FaissIndex(tmp_path / "h.faiss", D, kind="hnsw", tombstone_fraction=0.3)
    assert reloaded.describe()["tombstones"] == 50 and len(reloaded) == len(ids) - 50
    reloaded.remove(ids[50:200].tolist())  # 200 of 500 > 30%: the graph is rebuilt without them
    assert reloaded.describe() == {"backend": "faiss", "kind": "hnsw", "structure": "hnsw",
                                   "vectors": 300, "tombstones": 0}
    truth = _truth(ids[200:], x[200:], q, 10)
    assert [[i for i, _ in r] for r in reloaded.search(q, 10)] == [[i for i, _ in r] for r in truth]


def test_auto_switches_from_flat_to_hnsw(data, tmp_path):
    ids, x, q = data
    index = FaissIndex(tmp_path / "a.faiss", D, kind="auto", auto_threshold=200)
    index.add(ids[:150], x[:150])
    assert index.describe()["structure"] == "flat"
    index.add(ids[150:], x[150:])
    assert index.describe()["structure"] == "hnsw" and len(index) == len(ids)
    truth = _truth(ids, x, q, 5)
    assert [[i for i, _ in r] for r in index.search(q, 5)] == [[i for i, _ in r] for r in truth]


def test_hnsw_search_breadth_grows_with_size_unless_set(data, tmp_path):
    ids, x, q = data
    index = FaissIndex(tmp_path / "e.faiss", D, kind="hnsw", ef_search_large_from=len(ids) // 2)
    index.add(ids[: len(ids) // 4], x[: len(ids) // 4])
    assert index.effective_ef_search == 128
    index.add(ids[len(ids) // 4:], x[len(ids) // 4:])
    assert index.effective_ef_search == 256  # large collections search wider by default (recall at 1M)
    index.save()
    assert FaissIndex(tmp_path / "e.faiss", D, kind="hnsw", ef_search_large_from=len(ids) // 2).effective_ef_search == 256
    assert FaissIndex(tmp_path / "e.faiss", D, kind="hnsw", ef_search=64).effective_ef_search == 64  # as given


def test_ivfpq_trains_and_deletes(tmp_path):
    ids, x, q = clustered(n_clusters=8, per=200, seed=1)
    index = FaissIndex(tmp_path / "i.faiss", D, kind="ivfpq", train_min=1000, ivf_nlist=8, nprobe=8)
    index.add(ids[:500], x[:500])
    assert index.describe()["structure"] == "flat" and index.exact_scores
    index.add(ids[500:], x[500:])
    assert index.describe()["structure"] == "ivfpq" and not index.exact_scores
    index.remove(ids[:10].tolist())
    assert len(index) == len(ids) - 10
    index.save()
    again = FaissIndex(tmp_path / "i.faiss", D, kind="ivfpq")
    assert len(again) == len(ids) - 10
    # PQ scores are approximate: the collection fetches 4x candidates and re-scores them exactly,
    # so what matters is that the true top 10 are among the top 40 candidates.
    got = again.search(q, 40)
    truth = _truth(ids[10:], x[10:], q, 10)
    recall = np.mean([len({i for i, _ in g} & {i for i, _ in t}) / 10 for g, t in zip(got, truth)])
    assert recall >= 0.8


def test_faiss_refuses_duplicate_ids(tmp_path):
    index = FaissIndex(None, 4)
    v = normalize(np.eye(4, dtype=np.float32))
    index.add(np.array([1, 2]), v[:2])
    with pytest.raises(ValueError, match="already in the FAISS index"):
        index.add(np.array([2]), v[2:3])


def test_open_index_factory_and_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown index backend"):
        open_index("milvus", tmp_path, D)
    with pytest.raises(ValueError, match="needs a url"):
        open_index("qdrant-server", tmp_path, D)
    index = open_index("qdrant-server", tmp_path, D, {"url": ":memory:", "collection_name": "x"})
    assert index.backend == "qdrant-server" and len(index) == 0
    with pytest.raises(ValueError, match="zero or not finite"):
        normalize(np.zeros((1, D)))
