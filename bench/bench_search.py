"""Figure 4, search: FAISS flat / HNSW / IVF-PQ, Qdrant Edge and Qdrant local mode at 10k-1M vectors.

The collection's own index classes (``fwd2bot_index.collection``: ``FaissIndex``, ``QdrantEdgeIndex``,
``QdrantLocalIndex``) are built over clustered data (not uniform noise, on which recall means nothing):
``--clusters`` Gaussian clusters of unit-norm 256-d vectors whose within-cluster spread has a decaying
spectrum (a few strong directions, as real embeddings have), queries drawn near the clusters but not in
the data. Per backend and size: build time (add everything, then ``save``: for Qdrant Edge that is where
its HNSW is built), index bytes on disk and RSS growth of the building process, p50/p99 latency of
single queries (how the service searches), QPS one query at a time and in one batch, and recall@10
against exact search (FAISS ``IndexFlatIP``).

Each (backend, size) runs in its own child process with a time limit, so a build that cannot finish in
bounded time on this machine is reported as such instead of stalling the run.

    python bench/bench_search.py --quick            # 2k and 10k vectors
    python bench/bench_search.py                    # 10k, 100k, 1M (Qdrant local mode up to 100k)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "search"
BACKENDS = ("faiss-default", "faiss-flat", "faiss-hnsw", "faiss-ivfpq", "qdrant-edge", "qdrant-local")
LABELS = {"faiss-default": "FAISS default (kind=auto)", "faiss-flat": "FAISS flat", "faiss-hnsw": "FAISS HNSW",
          "faiss-ivfpq": "FAISS IVF-PQ", "qdrant-edge": "Qdrant Edge", "qdrant-local": "Qdrant local mode"}
K = 10
WARMUP = 10
GOAL_P50_MS, GOAL_RECALL = 2.0, 0.95
# From this size FaissIndex lets a single query use every OpenMP thread (its _threads_for rule), so
# the same index is also timed with its ``threads=1`` option.
ONE_THREAD_FROM = 200_000


# -- data ------------------------------------------------------------------------------------------
def clustered_vectors(n: int, dim: int, clusters: int, seed: int, spread: float = 0.35,
                      chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, centers, noise basis): unit vectors = normalize(center + spread * noise).

    The noise lives in a random rotation with per-direction scale 1/sqrt(i+1), normalized so the whole
    noise vector has expected norm ``spread`` (relative to unit-norm centers).
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scales = 1.0 / np.sqrt(np.arange(1, dim + 1))
    scales *= spread / np.sqrt((scales ** 2).sum())
    basis = (scales[:, None] * rotation.T).astype(np.float32)  # (dim, dim): row i = direction i * scale i
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = rng.integers(0, clusters, m)
        block = centers[labels] + rng.standard_normal((m, dim), dtype=np.float32) @ basis
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + m] = block
    return out, centers, basis


def queries_near(centers: np.ndarray, basis: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Fresh points of the same distribution (never in the data): realistic queries near clusters."""
    rng = np.random.default_rng(seed + 1_000_003)
    q = centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, centers.shape[1]), dtype=np.float32) @ basis
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ground truth ids by exact inner product (FAISS IndexFlatIP, batched)."""
    import faiss

    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    _, ids = index.search(queries, k)
    return ids


# -- one case, in a child process --------------------------------------------------------------------
def make_index(backend: str, folder: Path, dim: int, n: int, ivf_nlist: int | None) -> Any:
    from fwd2bot_index.collection import FaissIndex, QdrantEdgeIndex, QdrantLocalIndex

    if backend.startswith("faiss-"):
        kind = {"faiss-default": "auto", "faiss-flat": "flat", "faiss-hnsw": "hnsw", "faiss-ivfpq": "ivfpq"}[backend]
        options = {"ivf_nlist": ivf_nlist} if kind == "ivfpq" and ivf_nlist else {}
        return FaissIndex(folder / "index.faiss", dim, kind=kind, **options)
    if backend == "qdrant-edge":
        return QdrantEdgeIndex(folder / "qdrant-edge", dim)
    if backend == "qdrant-local":
        return QdrantLocalIndex(":memory:", dim)  # brute force either way; a path adds pickling only
    raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


def run_case(spec: dict) -> dict:
    """Build one index over the first ``n`` vectors and measure it (runs in a child process)."""
    import warnings

    warnings.filterwarnings("ignore")  # qdrant local mode warns past 20k points; that is the point
    n, backend = spec["n"], spec["backend"]
    data = np.ascontiguousarray(np.load(spec["data"], mmap_mode="r")[:n])
    queries = np.load(spec["queries"])[: spec.get("max_queries") or None]
    truth = np.load(spec["truth"])[: len(queries)]
    ids = np.arange(n, dtype=np.int64)
    folder = Path(tempfile.mkdtemp(prefix="f2b-bench-search-", dir=spec.get("tmp")))
    rss0 = C.rss_bytes()
    t0 = time.perf_counter()
    index = make_index(backend, folder, data.shape[1], n, spec.get("ivf_nlist"))
    index.add(ids, data)
    t_add = time.perf_counter() - t0
    index.save()
    build = time.perf_counter() - t0
    rss1 = C.rss_bytes()
    del data
    measured = measure_queries(index, queries, truth)
    measured["variants"] = []
    if backend.startswith("faiss-") and spec.get("one_thread_too"):
        index.threads = 1  # the backend's own ``threads`` option, as backend_options={"threads": 1} sets it
        measured["variants"].append({"variant": "threads=1", **measure_queries(index, queries, truth),
                                     "note": "the same index, searched with the backend option `threads=1`"})
        index.threads = None
    if index.describe().get("structure") == "hnsw":
        shipped = index.threads
        for threads in ([None, 1] if spec.get("one_thread_too") else [shipped]):
            for ef in spec.get("ef_search_variants") or []:
                index.ef_search, index.threads = ef, threads  # backend options ef_search / threads
                name = f"ef_search={ef}" + (", threads=1" if threads == 1 and shipped != 1 else "")
                options = f"ef_search={ef}" + (", threads=1" if threads == 1 else "")
                measured["variants"].append({"variant": name, **measure_queries(index, queries, truth),
                                             "note": f"the same index, searched with the backend options `{options}`"})
    describe = index.describe()
    disk = index.bytes_on_disk()
    index.close()
    return {"backend": backend, "n": n, "structure": describe.get("structure", backend),
            "describe": describe, "build_s": build, "add_s": t_add, "index_bytes": disk,
            "rss_delta_bytes": rss1 - rss0, **measured}


def measure_queries(index: Any, queries: np.ndarray, truth: np.ndarray) -> dict:
    """Single-query latency percentiles, QPS one at a time and batched, recall@10 against ``truth``."""
    for q in queries[:WARMUP]:
        index.search(q[None, :], K)
    latencies, found = [], []
    for q in queries:
        s = time.perf_counter()
        hits = index.search(q[None, :], K)[0]
        latencies.append(time.perf_counter() - s)
        found.append([i for i, _ in hits])
    s = time.perf_counter()
    index.search(queries, K)
    batch_s = time.perf_counter() - s
    recall = float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth)]))
    return {"p50_ms": 1000 * C.percentile(latencies, 50), "p99_ms": 1000 * C.percentile(latencies, 99),
            "qps": len(latencies) / sum(latencies), "batch_qps": len(queries) / batch_s, "recall_at_10": recall,
            "queries": len(queries)}


def spawn_case(spec: dict, timeout: float) -> dict:
    """Run ``run_case`` in a child process; a timeout or crash becomes a row that says so."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(spec)]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**_blank(spec), "error": f"did not finish within {timeout:.0f} s on this machine"}
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {**_blank(spec), "error": f"failed (exit {done.returncode}): {tail[0][:200]}"}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - started
    return row


def _blank(spec: dict) -> dict:
    return {"backend": spec["backend"], "n": spec["n"], "structure": None, "build_s": None, "index_bytes": None,
            "rss_delta_bytes": None, "p50_ms": None, "p99_ms": None, "qps": None, "batch_qps": None,
            "recall_at_10": None}


# -- the run -------------------------------------------------------------------------------------------
def plan(sizes: list[int], backends: list[str], local_max: int) -> list[tuple[int, str]]:
    """Cases in order; Qdrant local mode (brute force in Python) only up to ``local_max``."""
    return [(n, b) for n in sizes for b in backends if not (b == "qdrant-local" and n > local_max)]


def _auto_threshold() -> int:
    from fwd2bot_index.collection import FaissIndex

    return int(FaissIndex(None, 4, kind="auto").auto_threshold)


def default_structure(n: int) -> str:
    """Which structure ``FaissIndex(kind='auto')`` holds at ``n`` vectors (its own rule)."""
    return "hnsw" if n >= _auto_threshold() else "flat"


def render(rows: list[dict], meta: dict) -> str:
    headers = ["vectors", "backend", "structure", "build s", "index MiB", "RSS +MiB", "p50 ms", "p99 ms",
               "QPS (1 query)", "QPS (batch)", "recall@10", "note"]
    table = []
    for r in rows:
        mib = (lambda b: None if b is None else b / 2**20)
        label = LABELS[r["backend"]] + (f", {r['variant']}" if r.get("variant") else "")
        table.append([r["n"], label, r.get("structure"), r.get("build_s"), mib(r.get("index_bytes")),
                      mib(r.get("rss_delta_bytes")), r.get("p50_ms"), r.get("p99_ms"), r.get("qps"),
                      r.get("batch_qps"), r.get("recall_at_10"), r.get("error") or r.get("note", "")])
    lines = [
        f"Data: {meta['clusters']:,} Gaussian clusters of unit-norm {meta['dim']}-d vectors (within-cluster spread "
        f"{meta['spread']} with a decaying spectrum), {meta['queries']} queries drawn near the clusters (not in the "
        f"data); recall@10 against exact inner-product search. Latency: one query per call after {WARMUP} warm-up "
        "queries, the way the service searches; QPS (1 query) = queries / summed latency; QPS (batch) = all "
        "queries in one call. Build = add all vectors + `save()` (Qdrant Edge builds its HNSW graph in `optimize` "
        "at save). Product settings unless noted: FAISS `kind=auto` is exact flat below "
        f"{meta['auto_threshold']:,} vectors and HNSW (M=32, efConstruction=40, efSearch=128) from there; IVF-PQ "
        "nlist=4*sqrt(n), 64 sub-quantizers x 8 bits, nprobe=16 (scores from PQ codes; the collection re-scores "
        "the hits exactly, which does not change the set); Qdrant Edge defaults (HNSW m=16, ef_construct=100, "
        "hnsw_ef=128); Qdrant local mode is brute force in Python. Each case runs in its own process with a "
        f"{meta['case_timeout']:.0f} s limit.",
        "",
        C.md_table(headers, table),
    ]
    return "\n".join(lines)


def check_goal(rows: list[dict], top: int) -> dict:
    default = next((r for r in rows if r["backend"] == "faiss-default" and r["n"] == top and not r.get("variant")),
                   None)
    one = next((r for r in rows if r["backend"] == "faiss-default" and r["n"] == top
                and r.get("variant") == "threads=1"), None)
    tuned = [r for r in rows if r["backend"] == "faiss-default" and r["n"] == top
             and str(r.get("variant", "")).startswith("ef_search=")]
    # the recommendation is the cheapest setting that meets both halves of the goal
    label = f"{top:,} vectors"
    if default is None or default.get("p50_ms") is None:
        why = default.get("error", "not run") if default else "not run"
        return C.goal("4", f"default index at 1M: p50 <= {GOAL_P50_MS} ms, recall@10 >= {GOAL_RECALL}",
                      f"{label}: {why}", None if default is None else False, why)
    met = default["p50_ms"] <= GOAL_P50_MS and default["recall_at_10"] >= GOAL_RECALL
    measured = (f"{label}, default = FAISS {default['structure']}: p50 {default['p50_ms']:.2f} ms, "
                f"recall@10 {default['recall_at_10']:.3f}")
    why = ""
    if not met:
        parts = []
        if default["p50_ms"] > GOAL_P50_MS:
            parts.append(f"p50 {default['p50_ms']:.2f} ms > {GOAL_P50_MS} ms")
        if default["recall_at_10"] < GOAL_RECALL:
            parts.append(f"recall@10 {default['recall_at_10']:.3f} < {GOAL_RECALL}")
        why = "; ".join(parts)
        if one is not None and default["p50_ms"] > GOAL_P50_MS and one["p50_ms"] <= GOAL_P50_MS:
            why += (f". The same index searched with its `threads=1` option: p50 {one['p50_ms']:.2f} ms. For a "
                    f"single query FaissIndex uses every OpenMP thread from {ONE_THREAD_FROM:,} vectors on; HNSW "
                    "searches one query on one thread anyway, and on a shared machine the other OpenMP workers' "
                    "barrier waits cost more than the search")
        good = [r for r in tuned if r["p50_ms"] <= GOAL_P50_MS and r["recall_at_10"] >= GOAL_RECALL]
        if default["recall_at_10"] < GOAL_RECALL:
            if good:
                best = min(good, key=lambda r: r["p50_ms"])
                why += (f". The same graph searched with `{best['variant']}` meets both: recall@10 "
                        f"{best['recall_at_10']:.3f} at p50 {best['p50_ms']:.2f} ms (p99 {best['p99_ms']:.2f} ms); "
                        "the shipped ef_search=128 (with efConstruction=40) is a little low for 1M clustered vectors")
            elif tuned:
                why += ". Raising ef_search on the same graph: " + ", ".join(
                    f"{r['variant']} recall@10 {r['recall_at_10']:.3f} p50 {r['p50_ms']:.2f} ms" for r in tuned)
    scope = "" if top >= 1_000_000 else f" (largest size in this run is {label}, not 1M)"
    return C.goal("4", f"default index at 1M: p50 <= {GOAL_P50_MS} ms, recall@10 >= {GOAL_RECALL}",
                  measured + scope, met if top >= 1_000_000 else None, why)


def main(argv: list[str] | None = None) -> int:
    p = C.parser(__doc__, NAME)
    p.add_argument("--sizes", help="comma-separated vector counts (default 10000,100000,1000000; quick 2000,10000)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, from: " + ", ".join(BACKENDS))
    p.add_argument("--queries", type=int, help="queries per case (default 500; quick 100)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.35, help="within-cluster noise norm relative to the centers")
    p.add_argument("--local-max", type=int, default=100_000, help="largest size for Qdrant local mode")
    p.add_argument("--local-queries", type=int, default=200,
                   help="queries for Qdrant local mode (brute force in Python: ~0.2 s each at 100k)")
    p.add_argument("--ivf-nlist-1m", type=int, default=1024,
                   help="IVF lists at >= 1M vectors (the product's 4*sqrt(n) = 4,000 trains for too long on 2 cores); "
                        "0 keeps the product default")
    p.add_argument("--ef-search-variants", type=lambda t: [int(x) for x in t.split(",") if x], default=[256, 512],
                   help="from 200k vectors, also search every HNSW index with these ef_search values "
                        "(default: %(default)s; empty to skip)")
    p.add_argument("--case-timeout", type=float, help="seconds per (backend, size) (default 600; quick 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case as a child process
    args = p.parse_args(argv)
    C.set_threads(args.threads)
    if args.case:  # child mode
        print(json.dumps(run_case(json.loads(args.case)), default=float))
        return 0
    sizes = [int(s) for s in (args.sizes or ("2000,10000" if args.quick else "10000,100000,1000000")).split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        p.error(f"unknown backend(s) {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    nq = args.queries or (100 if args.quick else 500)
    timeout = args.case_timeout or (120.0 if args.quick else 600.0)
    info = C.machine(("torch", "faiss", "numpy", "qdrant_client"))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="f2b-bench-search-") as tmp:
        work = Path(tmp)
        C.log(f"search: generating {max(sizes):,} clustered {args.dim}-d vectors ...")
        data, centers, basis = clustered_vectors(max(sizes), args.dim, args.clusters, args.seed, args.spread)
        queries = queries_near(centers, basis, nq, args.seed)
        np.save(work / "data.npy", data)
        np.save(work / "queries.npy", queries)
        for n in sizes:
            truth_path = work / f"truth-{n}.npy"
            np.save(truth_path, exact_topk(data[:n], queries, K))
        del data
        for n, backend in plan(sizes, backends, args.local_max):
            if backend == "faiss-default":
                pass
            elif backend.replace("faiss-", "") == default_structure(n) and "faiss-default" in backends:
                continue  # the default row already is this structure at this size
            spec = {"n": n, "backend": backend, "data": str(work / "data.npy"), "queries": str(work / "queries.npy"),
                    "truth": str(work / f"truth-{n}.npy"), "tmp": tmp,
                    "ivf_nlist": args.ivf_nlist_1m if n >= 1_000_000 and args.ivf_nlist_1m else None,
                    "max_queries": args.local_queries if backend == "qdrant-local" else None,
                    "one_thread_too": n >= ONE_THREAD_FROM and not args.threads,
                    "ef_search_variants": args.ef_search_variants if n >= ONE_THREAD_FROM else []}
            C.log(f"search: {LABELS[backend]} at {n:,} ...")
            row = spawn_case(spec, timeout)
            if spec["ivf_nlist"] and backend == "faiss-ivfpq":
                row["note"] = f"nlist={spec['ivf_nlist']} (product default {int(4 * n ** 0.5):,})"
            if backend == "faiss-ivfpq" and row.get("structure") == "flat":
                row["note"] = "below train_min (10,000) the IVF-PQ kind keeps an exact flat index"
            if backend == "faiss-default" and row.get("structure"):
                row["note"] = f"the collection's default at this size ({row['structure']})"
            rows.append(row)
            for variant in row.pop("variants", None) or []:
                rows.append({**row, **variant, "build_s": None, "index_bytes": None, "rss_delta_bytes": None})
            C.log(f"  -> {json.dumps({k: row.get(k) for k in ('build_s', 'p50_ms', 'recall_at_10', 'error')}, default=str)}")
    meta = {"dim": args.dim, "clusters": args.clusters, "spread": args.spread, "queries": nq, "k": K,
            "case_timeout": timeout, "auto_threshold": _auto_threshold(), "sizes": sizes}
    goals = [check_goal(rows, max(sizes))]
    text = render(rows, meta)
    print(text)
    C.write_json(args.json, {"figure": 4, "name": NAME, "machine": info, "meta": meta, "rows": rows, "goals": goals,
                             "markdown": text})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
