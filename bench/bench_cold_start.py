"""Cold start: wall time of one `f2b search` (and `f2b ask`) process on the demo model, alone and beside a running server.

Each row is a fresh process timed from spawn to exit (what a user waits for at the shell):

- ``f2b search --local`` (no server): for the demo model the query is embedded by the lean numpy path
  (``model/lean.py``: the same embedding, no torch, transformers or peft imported); issue 23's goal is
  <= 2 s on a quiet machine;
- ``f2b search --local`` with ``F2B_LEAN=0``: the process imports torch, transformers and peft, loads
  the model, embeds one query and searches (what any other model costs);
- ``f2b search`` while ``f2b serve`` of the same collection runs: the process finds the server's
  record, asks it over loopback HTTP and prints; no torch is imported;
- ``f2b ask`` the same two ways (``--local`` loads the model; beside the server, the server answers);
- ``f2b info`` (no model) and bare ``import torch`` / ``import transformers, peft`` as references for
  what the imports alone cost on this machine.

The goal of issue 14 is <= 1.5 s for `f2b search` on the demo model beside a server, issue 23's <= 2 s
without one, both on a quiet machine.

    python bench/bench_cold_start.py              # 5 runs per row
    python bench/bench_cold_start.py --quick      # 2 runs per row
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

GOAL_S = 1.5
COLD_GOAL_S = 2.0  # issue 23: no server running
QUERY = "a red circle at the top left"
QUESTION = "what color is the circle?"


def _f2b(*args: str) -> list[str]:
    return [sys.executable, "-m", "fwd2bot_index.cli", *args]


def _wall(cmd: list[str], env: dict[str, str], runs: int) -> list[float]:
    """Seconds from spawn to exit of ``cmd``, ``runs`` times; a failing command stops the benchmark."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return times


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"f2b serve exited early: {log.read_text()[-500:]}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:  # noqa: S310 - loopback
                if json.loads(r.read()).get("status") == "ready":
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("f2b serve did not become ready in time")


def measure(runs: int, workdir: Path) -> dict:
    from fwd2bot_index.api.testing import free_port

    env = {**os.environ, "XDG_RUNTIME_DIR": str(workdir / "run")}  # a private server registry
    (workdir / "run").mkdir(exist_ok=True)
    coll = workdir / "coll"
    subprocess.run(_f2b("demo-data", str(workdir / "d"), "--n", "24"), env=env, check=True, capture_output=True)
    subprocess.run(_f2b("index", str(workdir / "d" / "images"), "-c", str(coll), "--device", "cpu"), env=env,
                   check=True, capture_output=True)
    rows = {}
    C.log("timing bare imports ...")
    rows["import torch"] = _wall([sys.executable, "-c", "import torch"], env, runs)
    rows["import transformers, peft"] = _wall([sys.executable, "-c", "import torch, transformers, peft"], env, runs)
    C.log("timing f2b info and f2b search --local ...")
    rows["f2b info (no model)"] = _wall(_f2b("info", "-c", str(coll)), env, runs)
    search_local = _f2b("search", QUERY, "-c", str(coll), "-k", "5", "--local", "--device", "cpu")
    rows["f2b search --local, no server (lean query path)"] = _wall(search_local, env, runs)
    rows["f2b search --local (loads the model)"] = _wall(search_local, {**env, "F2B_LEAN": "0"}, runs)
    ask = _f2b("ask", "1", QUESTION, "-c", str(coll), "--max-new-tokens", "8")
    rows["f2b ask --local (loads the model)"] = _wall(ask + ["--local", "--device", "cpu"], env, runs)
    port = free_port()
    # one torch thread: a single short query gains nothing from two, and on a shared machine OpenMP
    # barriers waiting for a descheduled sibling thread make it several times slower
    server = subprocess.Popen(_f2b("serve", "-c", str(coll), "--port", str(port), "--device", "cpu", "--threads", "1"),
                              env=env, stdout=subprocess.DEVNULL, stderr=(workdir / "serve.log").open("w"))
    try:
        _wait_ready(f"http://127.0.0.1:{port}", server, workdir / "serve.log")
        C.log("timing f2b search beside a running f2b serve ...")
        probe = subprocess.run(_f2b("search", QUERY, "-c", str(coll), "-k", "5"), env=env, capture_output=True,
                               text=True, timeout=120)
        if "answered by the running f2b serve" not in probe.stderr:
            raise SystemExit(f"the search did not go through the server: {probe.stderr[-500:]}")
        _wall(_f2b("search", QUERY, "-c", str(coll), "-k", "5"), env, 2)  # warm the server's first queries
        rows["f2b search, f2b serve running"] = _wall(_f2b("search", QUERY, "-c", str(coll), "-k", "5"), env, runs)
        probe = subprocess.run(ask, env=env, capture_output=True, text=True, timeout=120)
        if "answered by the running f2b serve" not in probe.stderr:
            raise SystemExit(f"the question did not go through the server: {probe.stderr[-500:]}")
        rows["f2b ask, f2b serve running"] = _wall(ask, env, runs)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {name: {"median_s": C.median(t), "min_s": min(t), "runs": t} for name, t in rows.items()}


def main() -> None:
    p = C.parser(__doc__, "cold_start")
    args = p.parse_args()
    C.set_threads(args.threads)
    runs = 2 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="f2b-cold-") as tmp:
        rows = measure(runs, Path(tmp))
    local = rows["f2b search --local (loads the model)"]["median_s"]
    lean = rows["f2b search --local, no server (lean query path)"]["median_s"]
    served = rows["f2b search, f2b serve running"]["median_s"]
    table = C.md_table(["process", "median s", "min s", "runs"],
                       [[name, C.fmt(r["median_s"]), C.fmt(r["min_s"]), len(r["runs"])] for name, r in rows.items()])
    goals = [C.goal("cold start", f"`f2b search` on the demo model <= {GOAL_S} s", f"{served:.2f} s with f2b serve "
                    f"running ({local / served:.1f}x faster than {local:.2f} s loading the model)", served <= GOAL_S,
                    "the machine must be quiet for the absolute figure; the ratio holds either way"),
             C.goal("cold start, no server", f"`f2b search` on the demo model, no server, <= {COLD_GOAL_S} s",
                    f"{lean:.2f} s with the lean query path ({local / lean:.1f}x faster than {local:.2f} s loading "
                    "the model)", lean <= COLD_GOAL_S, "the machine must be quiet for the absolute figure")]
    asked_local, asked = rows["f2b ask --local (loads the model)"]["median_s"], rows["f2b ask, f2b serve running"]["median_s"]
    print(f"{C.machine_line(C.machine())}\n\n{table}\n\nWith `f2b serve` of the collection running, `f2b search` "
          f"takes {served:.2f} s instead of {local:.2f} s ({local / served:.1f}x). Goal <= {GOAL_S} s: "
          f"{C.verdict(served <= GOAL_S)}. With no server, the lean query path takes {lean:.2f} s (goal <= "
          f"{COLD_GOAL_S} s: {C.verdict(lean <= COLD_GOAL_S)}). `f2b ask` (8 new tokens at most) takes {asked:.2f} s instead of "
          f"{asked_local:.2f} s ({asked_local / asked:.1f}x).")
    C.write_json(args.json, {"rows": rows, "ratio": local / served, "goals": goals, "machine": C.machine()})


if __name__ == "__main__":
    main()
