"""Load on the REST service over loopback: p50/p99 latency and QPS at a few concurrency levels.

Starts ``f2b serve``'s own code path (``fwd2bot_index.api.serve``) in a subprocess on 127.0.0.1,
waits for readiness, then sends bounded bursts of searches with ``httpx.AsyncClient``: text queries
(model encode, batched by the server's model thread, then FAISS) and "more like this" queries (no
model). Requests beyond the server's model queue are refused with 503 at once: the table counts them
apart, with their own latency. ``--image-memory`` also sends concurrent searches by a large example
image and reports the server's peak RSS (the decode gate bounds it). Prints Markdown for BENCHMARKS.md.

    python bench/bench_service.py                  # 200-image demo collection, 200 requests per level
    python bench/bench_service.py --quick          # fewer levels and requests
    python bench/bench_service.py --collection .f2b --model demo
    python bench/bench_service.py --quick --image-memory 8 --megapixels 36

Only loopback addresses are used; every run is bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from fwd2bot_index.api.testing import demo_collection, free_port  # noqa: E402

HOST = "127.0.0.1"
MAX_REQUESTS = 5000
QUERIES = [f"a {size}{color} {shape}" for size in ("", "small ", "large ")
           for color in ("red", "blue", "green", "yellow", "purple")
           for shape in ("circle", "square", "triangle", "star")]


def start_server(collection: Path, model: str | None, port: int, threads: int | None,
                 max_queue: int = 64) -> subprocess.Popen:
    code = ("import sys; from fwd2bot_index.api import serve; "
            "serve(sys.argv[1], model=sys.argv[2] or None, host=sys.argv[3], port=int(sys.argv[4]), "
            "log_level='warning', writable=False, max_queue=int(sys.argv[5]))")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server process
    return subprocess.Popen([sys.executable, "-c", code, str(collection), model or "", HOST, str(port), str(max_queue)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


async def burst(url: str, kind: str, concurrency: int, total: int, ids: list[int]) -> dict:
    """``total`` requests with at most ``concurrency`` in flight; latency per request, QPS overall."""
    latencies: list[float] = []
    refused_latencies: list[float] = []
    errors = 0
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def one(n: int) -> None:
            nonlocal errors
            body = {"query": QUERIES[n % len(QUERIES)], "k": 10} if kind == "text" else {"like": ids[n % len(ids)], "k": 10}
            async with gate:
                t0 = time.perf_counter()
                try:
                    response = await client.post("/v1/search", json=body)
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0
                took = time.perf_counter() - t0
                if status == 503 and "retry-after" in response.headers:  # the queue was full: refused at once
                    refused_latencies.append(took)
                    return
                latencies.append(took)
                errors += status != 200

        await one(0)  # warm the connection and caches
        latencies.clear()
        refused_latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(total)))
        wall = time.perf_counter() - started
    return {"kind": kind, "concurrency": concurrency, "requests": total, "errors": errors,
            "refused": len(refused_latencies), "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99),
            "refused_p99_ms": _percentile(refused_latencies, 99), "qps": len(latencies) / wall}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (Linux VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def image_memory(url: str, pid: int, concurrency: int, megapixels: float) -> dict:
    """``concurrency`` searches at once by one large PNG; the server's RSS before and at peak."""
    import io

    from PIL import Image

    side = int((megapixels * 1e6) ** 0.5)
    out = io.BytesIO()
    picture = Image.new("RGB", (side, side), (240, 240, 240))
    picture.paste((200, 40, 40), (side // 4, side // 4, side // 2, side // 2))
    picture.save(out, format="PNG", compress_level=1)
    data = out.getvalue()
    before, peak_before = _rss_mb(pid), _peak_rss_mb(pid)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        responses = await asyncio.gather(*(client.post("/v1/search/image", files={"file": ("big.png", data, "image/png")},
                                                       data={"k": "3"}) for _ in range(concurrency)))
    return {"concurrency": concurrency, "megapixels": side * side / 1e6, "upload_mb": len(data) / 2**20,
            "statuses": sorted(r.status_code for r in responses), "rss_before_mb": before,
            "peak_before_mb": peak_before, "peak_rss_mb": _peak_rss_mb(pid)}


def search_histogram(url: str) -> dict[float, float]:
    """The server's own cumulative histogram of POST /v1/search times (bucket bound -> count)."""
    out: dict[float, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("f2b_http_request_duration_seconds_bucket") and 'route="/v1/search"' in line \
                and 'method="POST"' in line:
            bound = line.split('le="')[1].split('"')[0]
            out[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def server_p99_bound(before: dict[float, float], after: dict[float, float]) -> float:
    """The smallest bucket bound within which the server answered 99% of the requests between two snapshots."""
    counts = {b: after[b] - before.get(b, 0.0) for b in sorted(after)}
    total = counts.get(float("inf"), 0.0)
    return next((b for b, n in counts.items() if total and n >= 0.99 * total), float("nan"))


def batch_stats(url: str) -> tuple[float, float]:
    """Mean texts per model call and number of calls, from the server's own /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("f2b_model_text_batch_size_sum", "f2b_model_text_batch_size_count")):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    calls = values.get("f2b_model_text_batch_size_count", 0.0)
    return (values.get("f2b_model_text_batch_size_sum", 0.0) / calls if calls else 0.0), calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", help="an existing collection (default: build a demo one)")
    parser.add_argument("--model", help="its model (default: the collection's own)")
    parser.add_argument("--images", type=int, default=200, help="images in the demo collection")
    parser.add_argument("--requests", type=int, default=200, help="requests per level (at most %d)" % MAX_REQUESTS)
    parser.add_argument("--levels", default="1,8,32,200", help="concurrency levels, comma-separated")
    parser.add_argument("--quick", action="store_true", help="levels 1,32 and 100 requests")
    parser.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for the server (default: torch's own)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue (default 64)")
    parser.add_argument("--image-memory", type=int, default=0, metavar="N",
                        help="also send N concurrent searches by a large image and report the server's peak RSS")
    parser.add_argument("--megapixels", type=float, default=36.0, help="size of that image (default 36)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # other work on the machine
    levels = [1, 32] if args.quick else [int(x) for x in args.levels.split(",")]
    total = min(100 if args.quick else args.requests, MAX_REQUESTS)

    with tempfile.TemporaryDirectory(prefix="f2b-bench-") as tmp:
        if args.collection:
            collection, model = Path(args.collection), args.model
        else:
            t0 = time.perf_counter()
            demo = demo_collection(Path(tmp) / "demo", n=args.images, seed=0)
            collection, model = demo.collection, None
            print(f"built a {args.images}-image demo collection in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        port = free_port(HOST)
        url = f"http://{HOST}:{port}"
        proc = start_server(collection, model, port, args.torch_threads, args.max_queue)
        try:
            ready = wait_ready(url, proc)
            ids = [h["id"] for h in httpx.post(url + "/v1/search", json={"query": "shapes", "k": 50}).json()["results"]]
            rows = []
            for kind in ("text", "like"):
                for level in levels:
                    before = search_histogram(url)
                    rows.append(asyncio.run(burst(url, kind, level, max(total, level), ids)))
                    rows[-1]["server_p99_le_ms"] = 1000 * server_p99_bound(before, search_histogram(url))
                    print(f"  {kind} c={level}: p50 {rows[-1]['p50_ms']:.1f} ms, {rows[-1]['qps']:.0f} QPS",
                          file=sys.stderr)
            mean_batch, calls = batch_stats(url)
            memory = asyncio.run(image_memory(url, proc.pid, args.image_memory, args.megapixels)) \
                if args.image_memory else None
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    threads = args.torch_threads or "default"
    print(f"\n### REST service on loopback ({platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} before the run, "
          f"torch threads {threads}, max queue {args.max_queue})\n")
    print(f"Server: `fwd2bot_index.api.serve` (uvicorn, one process) in a subprocess on {HOST}; client: "
          f"httpx.AsyncClient in another process. Collection: {collection.name if args.collection else f'{args.images} demo images, tiny LLaVA, FAISS flat'}; "
          f"model ready {ready:.1f} s after start. `text` = text query (model encode + search), "
          f"`like` = more-like-this by id (no model). k = 10.\n")
    print("| query | concurrency | requests | errors | refused (503) | p50 ms | p99 ms | 503 p99 ms | server p99 <= ms "
          "| QPS served |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['refused']} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['refused_p99_ms']:.1f} | {r['server_p99_le_ms']:.0f} | "
              f"{r['qps']:.0f} |")
    print("\nLatencies (client side) are of served requests; refused ones (queue full) are answered 503 "
          "with Retry-After and timed apart. `server p99 <=` is the server's own histogram bucket (from receiving the "
          "request to its response head) that holds 99% of the searches: the rest of the client's time is spent "
          "before the server has the request (connections, the client's own CPU).")
    if memory:
        print(f"\nImage search memory: {memory['concurrency']} concurrent searches by a {memory['megapixels']:.1f} Mpx "
              f"PNG ({memory['upload_mb']:.1f} MiB): statuses {memory['statuses']}; server RSS "
              f"{memory['rss_before_mb']:.0f} MiB before (peak so far {memory['peak_before_mb']:.0f} MiB), peak "
              f"{memory['peak_rss_mb']:.0f} MiB after (decode gate: 2 at once).")
    print(f"\nText queries were encoded in {calls:.0f} model calls, {mean_batch:.1f} texts per call on average "
          "(concurrent queries are batched by the server's model thread).")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
