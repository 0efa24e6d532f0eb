"""Shared helpers for the benchmark scripts: machine description, timing statistics, Markdown, JSON.

Every script prints Markdown (tables and notes) to stdout, progress to stderr, and writes its rows,
the machine and its goal checks to ``bench/results/<name>.json``; ``bench/run_all.py`` assembles
BENCHMARKS.md from them. Headline figures are ratios measured in the same process, interleaved, so
that load from other processes on a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # a missing optional library is reported as absent, not fatal
        return None
    return str(getattr(mod, "__version__", "?"))


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine(libraries: Sequence[str] = ("torch", "faiss", "transformers", "numpy")) -> dict[str, Any]:
    """What the numbers were measured on: cores, CPU, memory, library versions, load, date (UTC)."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "mem_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "threads": int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS", "").isdigit() else None,
        "nice": os.nice(0) if hasattr(os, "nice") else 0,
    }
    for name in libraries:
        info[name] = _version(name)
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    return info


def machine_line(info: dict[str, Any], load: bool = True) -> str:
    """One Markdown line describing the machine, for the top of each section (``load``: with the load
    average, threads and niceness of that run)."""
    libs = ", ".join(f"{k} {info[k]}" for k in ("torch", "faiss", "transformers", "numpy") if info.get(k))
    gpu = f", GPU {info['cuda']}" if info.get("cuda") else ", no GPU"
    threads = f"{info['threads']} thread(s) pinned" if info.get("threads") else "library-default threads"
    nice = f"; run at nice {info['nice']}" if info.get("nice") else ""
    if not load:
        return f"{info['nproc']} CPU cores ({info['cpu']}), {info.get('mem_gib')} GiB RAM{gpu}; {libs}"
    return (f"{info['nproc']} CPU cores ({info['cpu']}), {info.get('mem_gib')} GiB RAM{gpu}; {libs}; {threads}; "
            f"1-min load average {info.get('load_avg_1m')} at start (the machine is shared){nice}")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; q=50 is the median."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def fmt(value: Any, digits: int = 2) -> str:
    """Numbers for tables: fixed digits, thousands separators for large values, '-' for None."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells go through ``fmt`` and pipes are escaped."""
    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def goal(figure: str, text: str, measured: str, met: bool | None, why: str = "") -> dict[str, Any]:
    """A goal check for the summary at the top of BENCHMARKS.md (``met=None``: not measured)."""
    return {"figure": figure, "goal": text, "measured": measured, "met": met, "why": why}


def verdict(met: bool | None) -> str:
    return {True: "met", False: "**MISSED**", None: "not measured"}[met]


def parser(description: str, name: str) -> argparse.ArgumentParser:
    """The common options: ``--quick`` (CI-sized run) and ``--json`` (where results go)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / f"{name}.json",
                   help="write rows, machine and goal checks here (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and FAISS, here and in child processes (default: the libraries' "
                        "choice, one per core)")
    return p


def set_threads(n: int | None) -> None:
    """Pin torch / FAISS / OpenMP threads (inherited by child processes through OMP_NUM_THREADS).

    Why it matters here: on a small machine shared with other busy processes, OpenMP workers that wait
    at every barrier for a descheduled sibling make small models many times slower (measured: a 4-layer
    256-wide model encoded 58 images/s on 1 thread and 1 image/s on 2 while another process held a core).
    """
    if not n:
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(n)


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write results atomically (a killed run never leaves half a JSON file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable))
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays pure Markdown."""
    print(message, file=sys.stderr, flush=True)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux), 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
