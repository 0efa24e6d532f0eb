"""Load on the REST service over loopback: p50/p99 latency and QPS at a few concurrency levels.

Starts ``f2b serve``'s own code path (``fwd2bot_index.api.serve``) in a subprocess on 127.0.0.1,
waits for readiness, then sends bounded bursts of searches over keep-alive connections
(``Connection``): text queries (model encode, batched by the server's model thread, then FAISS) and
"more like this" queries (no model). Requests beyond the server's ``--max-queue`` are refused with
503 at once: the table counts them apart, with their own latency (the clients send again at once).
Per level it reports the texts the model encoded per call and the CPU time the server and the
client spent per request (the client shares the machine's cores with the server).

The goals (issue 16) are measured on a second server whose queue holds every client (it measures
what the server serves, not how fast it refuses): 1 client and the top level alternate in rounds,
and the ratios are medians of the per-round ratios. ``--image-memory`` also sends concurrent
searches by a large example image and reports the server's peak RSS (the decode gate bounds it).
Prints Markdown for BENCHMARKS.md; ``--json`` also writes rows and goal checks (``bench/run_all.py``).

    python bench/bench_service.py                  # 200-image demo collection, levels 1,8,32,200
    python bench/bench_service.py --quick          # levels 1,32,200 and fewer requests
    python bench/bench_service.py --collection .f2b --model demo
    python bench/bench_service.py --quick --image-memory 8 --megapixels 36
    python bench/bench_service.py --batch-wait-ms 0 # the server without the batching window

Only loopback addresses are used; every run is bounded in requests and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import httpx  # noqa: E402

from fwd2bot_index.api.testing import demo_collection, free_port  # noqa: E402

HOST = "127.0.0.1"
MAX_REQUESTS = 5000
GOAL_TEXT_RATIO = 1.5  # text QPS at 200 clients / at 1 client (issue 16)
GOAL_LIKE_RATIO = 3.0  # like QPS at 200 clients / the QPS measured before issue 16 ("several times")
ROUNDS = 3  # alternating rounds of 1 client and the top level for the goal ratios
LIKE_BEFORE_QPS = 538  # like searches at 200 clients, BENCHMARKS.md of 2026-11-29 21:33 UTC, this machine
QUERIES = [f"a {size}{color} {shape}" for size in ("", "small ", "large ")
           for color in ("red", "blue", "green", "yellow", "purple")
           for shape in ("circle", "square", "triangle", "star")]


def start_server(collection: Path, model: str | None, port: int, threads: int | None,
                 max_queue: int = 64, batch_wait_ms: float | None = None) -> subprocess.Popen:
    code = ("import sys; from fwd2bot_index.api import serve; "
            "serve(sys.argv[1], model=sys.argv[2] or None, host=sys.argv[3], port=int(sys.argv[4]), "
            "log_level='warning', writable=False, max_queue=int(sys.argv[5]), "
            "**({'batch_wait_ms': float(sys.argv[6])} if sys.argv[6] else {}))")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server process
    wait = "" if batch_wait_ms is None else str(batch_wait_ms)
    return subprocess.Popen([sys.executable, "-c", code, str(collection), model or "", HOST, str(port), str(max_queue),
                             wait], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


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


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON: a client far cheaper in CPU than httpx.

    The client shares the machine's cores with the server; httpx.AsyncClient spent 2-5 CPU ms per
    request at 200 connections here (more than the server itself), which would cap the measured
    throughput at the client's speed. This one only writes a request and reads status, headers and a
    Content-Length body (what uvicorn sends for JSON), reconnecting when the server closes.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: dict) -> tuple[int, dict[str, str], bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        data = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        payload = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, payload

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


async def burst(url: str, kind: str, concurrency: int, total: int, ids: list[int],
                warmed: Callable[[], Any] = lambda: None) -> dict:
    """``total`` requests over ``concurrency`` connections, each sending its next request when the last
    is answered (a closed loop); latency per request, QPS overall, the client's own CPU per request.
    ``warmed`` is called once every connection has answered one request, just before the clock starts."""
    latencies: list[float] = []
    refused_latencies: list[float] = []
    errors = 0
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    connections = [Connection(host, int(port)) for _ in range(concurrency)]
    counter = iter(range(total))

    async def one(conn: Connection, n: int) -> None:
        nonlocal errors
        body = {"query": QUERIES[n % len(QUERIES)], "k": 10} if kind == "text" else {"like": ids[n % len(ids)], "k": 10}
        t0 = time.perf_counter()
        try:
            status, headers, _ = await conn.post("/v1/search", body)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            await conn.close()
            status, headers = 0, {}
        took = time.perf_counter() - t0
        if status == 503 and "retry-after" in headers:  # the queue was full: refused at once
            refused_latencies.append(took)
            return
        latencies.append(took)
        errors += status != 200

    async def client(conn: Connection) -> None:
        for n in counter:
            await one(conn, n)

    try:
        for conn in connections:  # connect and warm every connection before the clock starts
            await one(conn, 0)
        latencies.clear()
        refused_latencies.clear()
        errors = 0
        warmed()
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client(conn) for conn in connections))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        for conn in connections:
            await conn.close()
    return {"kind": kind, "concurrency": concurrency, "requests": total, "errors": errors,
            "wall_s": wall, "client_cpu_ms": 1000 * cpu / total,
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
    """Texts encoded and model calls so far, from the server's own /metrics (f2b_model_text_batch_size)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("f2b_model_text_batch_size_sum", "f2b_model_text_batch_size_count")):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values.get("f2b_model_text_batch_size_sum", 0.0), values.get("f2b_model_text_batch_size_count", 0.0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, pid: int, kind: str, level: int, total: int, ids: list[int], max_queue: int) -> dict:
    """One burst, with the server's p99 bucket, texts per model call and CPU per request around it (from
    after the warm-up request of each connection, which runs one at a time)."""
    start: dict[str, Any] = {}

    def warmed() -> None:
        start.update(hist=search_histogram(url), batches=batch_stats(url), cpu=cpu_seconds(pid))

    row = asyncio.run(burst(url, kind, level, total, ids, warmed))
    cpu = cpu_seconds(pid) - start["cpu"]
    (texts, calls), (texts_after, calls_after) = start["batches"], batch_stats(url)
    row.update(max_queue=max_queue, server_p99_le_ms=1000 * server_p99_bound(start["hist"], search_histogram(url)),
               server_cpu_ms=1000 * cpu / row["requests"], model_calls=calls_after - calls,
               texts_per_call=(texts_after - texts) / (calls_after - calls) if calls_after > calls else float("nan"))
    print(f"  {kind} c={level} queue {max_queue}: p50 {row['p50_ms']:.1f} ms, {row['qps']:.0f} QPS, "
          f"{row['texts_per_call']:.1f} texts/call, server {row['server_cpu_ms']:.2f} CPU ms/request",
          file=sys.stderr)
    return row


def serve_and_measure(collection: Path, model: str | None, args: argparse.Namespace, max_queue: int,
                      plan: list[tuple[str, int]], total: int) -> tuple[list[dict], float]:
    """Start a server with this queue, run the (kind, level) bursts in order; the rows and the load time."""
    port = free_port(HOST)
    url = f"http://{HOST}:{port}"
    proc = start_server(collection, model, port, args.torch_threads, max_queue, args.batch_wait_ms)
    try:
        ready = wait_ready(url, proc)
        ids = [h["id"] for h in httpx.post(url + "/v1/search", json={"query": "shapes", "k": 50}).json()["results"]]
        rows = [measure(url, proc.pid, kind, level, max(total, 5 * level), ids, max_queue) for kind, level in plan]
    finally:
        stop_server(proc)
    return rows, ready


def goal_rows(rows: list[dict], kind: str, level: int) -> list[dict]:
    return [r for r in rows if r.get("round") is not None and r["kind"] == kind and r["concurrency"] == level]


def median_row(rounds: list[dict]) -> dict:
    """The round with the median QPS, labelled as such (for the table)."""
    ordered = sorted(rounds, key=lambda r: r["qps"])
    row = dict(ordered[len(ordered) // 2])
    row["label"] = f"{row['max_queue']} (median of {len(rounds)})"
    return row


def paired_ratio(rows: list[dict], kind: str, level: int, base: int) -> tuple[float, list[float]]:
    """Median over rounds of QPS at ``level`` / QPS at ``base``, each pair measured back to back."""
    top, one = goal_rows(rows, kind, level), goal_rows(rows, kind, base)
    ratios = [t["qps"] / o["qps"] for t, o in zip(sorted(top, key=lambda r: r["round"]),
                                                   sorted(one, key=lambda r: r["round"])) if o["qps"]]
    return (statistics.median(ratios) if ratios else float("nan")), ratios


def qps_ceiling(cpu_ms: float, cores: int = 1) -> str:
    """'about N QPS', the most ``cores`` can serve at ``cpu_ms`` CPU ms per request; a run too short for the
    process clock to tick (the smoke test's, on a loaded machine) measures 0 ms and gets no figure."""
    return f"about {1000 * cores / cpu_ms:.0f} QPS" if cpu_ms > 0 else "unknown: too little CPU time to measure"


def goals(rows: list[dict]) -> list[dict]:
    """Issue 16's service goals, from the interleaved rounds on the server whose queue holds every client:
    text QPS at the top level vs 1 client, and like QPS vs the figure measured before the issue."""
    out = []
    top = max(r["concurrency"] for r in rows)
    text_goal = f"text QPS at {top} clients >= {GOAL_TEXT_RATIO}x QPS at 1 client"
    many, one = goal_rows(rows, "text", top), goal_rows(rows, "text", 1)
    if many and one and top > 1:
        ratio, ratios = paired_ratio(rows, "text", top, 1)
        m, o = median_row(many), median_row(one)
        like_rows = goal_rows(rows, "like", top)
        like_cpu = median_row(like_rows)["server_cpu_ms"] if like_rows else float("nan")
        met = ratio >= GOAL_TEXT_RATIO
        cpu = m["server_cpu_ms"] + m["client_cpu_ms"]
        why = "" if met else (
            f"at {top} clients the server spent {m['server_cpu_ms']:.2f} CPU ms per request and the client "
            f"{m['client_cpu_ms']:.2f} on the same {os.cpu_count()} cores (a ceiling of "
            f"{qps_ceiling(cpu, os.cpu_count() or 1)} if nothing else ran) with {m['texts_per_call']:.1f} texts "
            f"per model call, against {o['server_cpu_ms']:.2f} + {o['client_cpu_ms']:.2f} CPU ms at 1 client; a like "
            f"search (the same HTTP, search and JSON, no model) cost the server {like_cpu:.2f} CPU ms at {top} clients: "
            "the rest is the batched model call and the hand-offs of one interpreter lock between the event loop "
            "and the model thread, which keep the loop's per-request work from spreading over both cores")
        out.append(C.goal("5", text_goal, f"{ratio:.2f}x (rounds {', '.join(f'{r:.2f}' for r in ratios)}; median "
                                          f"{m['qps']:.0f} vs {o['qps']:.0f} QPS, queue {m['max_queue']}, "
                                          f"{m['texts_per_call']:.1f} texts per call)", met, why))
    else:
        out.append(C.goal("5", text_goal, "not measured (needs levels 1 and more)", None))
    like = goal_rows(rows, "like", top)
    if like:
        m = median_row(like)
        ratio = m["qps"] / LIKE_BEFORE_QPS
        scale, _ = paired_ratio(rows, "like", top, 1)
        why = "" if ratio >= GOAL_LIKE_RATIO else (
            f"one event loop (one interpreter) serves every request: at {m['server_cpu_ms']:.2f} CPU ms per like "
            f"request it tops out at {qps_ceiling(m['server_cpu_ms'])} on a whole core, and this machine's "
            f"{os.cpu_count()} cores are shared with the client and other work; the earlier figure came from another "
            "run (other load)")
        out.append(C.goal("5", f"like QPS at {top} clients >= {GOAL_LIKE_RATIO:.0f}x the {LIKE_BEFORE_QPS} QPS "
                               "measured before issue 16", f"{ratio:.2f}x ({m['qps']:.0f} QPS; {scale:.2f}x its "
                                                           "1-client QPS in the same rounds)",
                          ratio >= GOAL_LIKE_RATIO, why))
    return out


def render(rows: list[dict], meta: dict) -> str:
    """The Markdown section: the table per level, notes, the image-memory line if measured."""
    lines = [f"### REST service on loopback ({platform.machine()}, {os.cpu_count()} CPUs, load average "
             f"{meta['load']:.1f} before the run, torch threads {meta['threads']}, max queue {meta['max_queue']}, "
             f"batch wait {meta['batch_wait']})", "",
             f"Server: `fwd2bot_index.api.serve` (uvicorn, one process) in a subprocess on {HOST}; client: one "
             "keep-alive connection per concurrent client (a minimal asyncio HTTP/1.1 client, see `Connection`) in "
             f"another process, each sending its next request when the last is answered. Collection: {meta['collection']}; model ready "
             f"{meta['ready']:.1f} s after start. `text` = text query (model encode + search), `like` = more-like-this "
             "by id (no model). k = 10.", ""]
    headers = ["query", "concurrency", "max queue", "requests", "errors", "refused (503)", "p50 ms", "p99 ms",
               "503 p99 ms", "server p99 <= ms", "QPS served", "texts per model call", "server CPU ms / request",
               "client CPU ms / request"]
    shown = [r for r in rows if r.get("round") is None]
    for kind, level in dict.fromkeys((r["kind"], r["concurrency"]) for r in rows if r.get("round") is not None):
        shown.append(median_row(goal_rows(rows, kind, level)))
    table = [[r["kind"], r["concurrency"], r.get("label", r["max_queue"]), r["requests"], r["errors"], r["refused"],
              f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['refused_p99_ms']:.1f}", f"{r['server_p99_le_ms']:.0f}",
              f"{r['qps']:.0f}", f"{r['texts_per_call']:.1f}" if r["kind"] == "text" else "-",
              f"{r['server_cpu_ms']:.2f}", f"{r['client_cpu_ms']:.2f}"] for r in shown]
    lines += [C.md_table(headers, table), "",
              "Latencies (client side) are of served requests; refused ones (queue full) are answered 503 with "
              "Retry-After and timed apart; QPS counts served requests over the burst's wall time. The goal rows "
              f"(queue marked 'median of {ROUNDS}') come from a second server whose queue holds every client, where 1 "
              "client and the top level alternate in rounds, so that other load on the machine hits both alike; the "
              "goal ratios are medians of the per-round ratios. "
              "`server p99 <=` is the server's own histogram bucket (from receiving the request to its response head) "
              "that holds 99% of the searches. CPU ms per request: the server process's user + system time (all "
              "threads) and the client's, over the burst, divided by the requests sent; both share the same cores.",
              ""]
    texts = sum(r["texts_per_call"] * r["model_calls"] for r in rows if r["kind"] == "text" and r["model_calls"])
    calls = sum(r["model_calls"] for r in rows if r["kind"] == "text")
    if calls:
        lines.append(f"Text queries were encoded in {calls:.0f} model calls, {texts / calls:.1f} texts per call on "
                     "average over all levels (per level in the table; the model thread batches concurrent queries).")
    memory = meta.get("memory")
    if memory:
        lines.append(f"\nImage search memory: {memory['concurrency']} concurrent searches by a "
                     f"{memory['megapixels']:.1f} Mpx PNG ({memory['upload_mb']:.1f} MiB): statuses {memory['statuses']}; "
                     f"server RSS {memory['rss_before_mb']:.0f} MiB before (peak so far {memory['peak_before_mb']:.0f} "
                     f"MiB), peak {memory['peak_rss_mb']:.0f} MiB after (decode gate: 2 at once).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collection", help="an existing collection (default: build a demo one)")
    parser.add_argument("--model", help="its model (default: the collection's own)")
    parser.add_argument("--images", type=int, default=200, help="images in the demo collection")
    parser.add_argument("--requests", type=int, default=400, help="requests per level (at most %d)" % MAX_REQUESTS)
    parser.add_argument("--levels", default="1,8,32,200", help="concurrency levels, comma-separated")
    parser.add_argument("--quick", action="store_true", help="levels 1,32,200 and 200 requests")
    parser.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for the server (default: torch's own)")
    parser.add_argument("--json", help="also write the rows and goal checks to this JSON file")
    parser.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue (default 64)")
    parser.add_argument("--batch-wait-ms", type=float, help="the server's --batch-wait-ms (default: the server's)")
    parser.add_argument("--image-memory", type=int, default=0, metavar="N",
                        help="also send N concurrent searches by a large image and report the server's peak RSS")
    parser.add_argument("--megapixels", type=float, default=36.0, help="size of that image (default 36)")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # other work on the machine
    levels = [1, 32, 200] if args.quick else [int(x) for x in args.levels.split(",")]
    total = min(200 if args.quick else args.requests, MAX_REQUESTS)

    with tempfile.TemporaryDirectory(prefix="f2b-bench-") as tmp:
        if args.collection:
            collection, model = Path(args.collection), args.model
        else:
            t0 = time.perf_counter()
            demo = demo_collection(Path(tmp) / "demo", n=args.images, seed=0)
            collection, model = demo.collection, None
            print(f"built a {args.images}-image demo collection in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        plan = [(kind, level) for kind in ("text", "like") for level in levels]
        rows, ready = serve_and_measure(collection, model, args, args.max_queue, plan, total)
        memory = None
        # The goals: 1 client and the top level alternating, on a server whose queue holds every client.
        top = max(levels)
        pairs = [(kind, level) for kind in ("text", "like") for _ in range(ROUNDS) for level in (1, top)]
        more, _ = serve_and_measure(collection, model, args, max(256, top), pairs, total)
        for n, row in enumerate(more):
            row["round"] = n // 2 % ROUNDS
        rows += more
        if args.image_memory:
            port = free_port(HOST)
            proc = start_server(collection, model, port, args.torch_threads, args.max_queue, args.batch_wait_ms)
            try:
                wait_ready(f"http://{HOST}:{port}", proc)
                memory = asyncio.run(image_memory(f"http://{HOST}:{port}", proc.pid, args.image_memory,
                                                  args.megapixels))
            finally:
                stop_server(proc)

    from fwd2bot_index.api.app import DEFAULT_BATCH_WAIT_MS

    wait = args.batch_wait_ms if args.batch_wait_ms is not None else DEFAULT_BATCH_WAIT_MS
    meta = {"load": load, "threads": args.torch_threads or "default", "max_queue": args.max_queue,
            "batch_wait": f"{wait:g} ms", "ready": ready, "memory": memory,
            "collection": collection.name if args.collection else f"{args.images} demo images, tiny LLaVA, FAISS flat"}
    text = render(rows, meta)
    checks = goals(rows)
    print(text)
    if args.json:
        C.write_json(Path(args.json), {"figure": 5, "name": "service", "machine": C.machine(), "rows": rows,
                                       "meta": meta, "goals": checks, "markdown": text})
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
