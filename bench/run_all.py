"""Run every benchmark and regenerate BENCHMARKS.md (`make bench`).

Each figure's script runs in its own process with the same options (``--quick`` for a CI-sized run);
its Markdown output, exit status, timing, machine and goal checks are kept per section in
``bench/results/section-<key>.json``. BENCHMARKS.md is then assembled from the section files, so
``--only search`` re-measures one figure and keeps the others (each section carries its own command
and date).

    .venv/bin/python bench/run_all.py --quick        # a couple of minutes
    .venv/bin/python bench/run_all.py                # full sizes, bounded (about half an hour on 2 cores)
    .venv/bin/python bench/run_all.py --only search,gpu
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BENCH = Path(__file__).resolve().parent
NOT_MEASURABLE = 3  # a script's exit status for "this machine cannot measure it" (bench_gpu.py without CUDA)


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    script: str
    json_name: str | None  # the script's own results file (None: it writes none)
    threads_flag: str | None = "--threads"  # how the script takes a thread count (None: only through the env)
    own_json_flag: bool = True


SECTIONS = [
    Section("answer", "1. Lazy answering: time to first token from stored summary tokens vs the stock path",
            "bench_answer.py", "answer.json"),
    Section("storage", "2. Storage per image, and the quality each setting keeps", "bench_storage.py", "storage.json"),
    Section("encode", "3. Encoding: pass-1 throughput and end-to-end `f2b index`", "bench_encode.py", "encode.json"),
    Section("search", "4. Search backends at 10k, 100k and 1M vectors", "bench_search.py", "search.json"),
    Section("service", "5. REST service: concurrent search over loopback HTTP", "bench_service.py", "service.json",
            threads_flag="--torch-threads"),
    Section("gpu", "6. GPU: pass-1 throughput and model FLOP utilization, LLaVA-1.5-7B shape", "bench_gpu.py",
            "gpu.json"),
    Section("training", "Training throughput: staged compression (LLaVolta) on vs off", "bench_training.py", None,
            own_json_flag=False),
    Section("cold", "Cold start: one `f2b search` or `f2b ask` process, alone and beside a running `f2b serve`",
            "bench_cold_start.py", "cold_start.json"),
    Section("verify", "Verified search: verify@20 through the server vs the embedding search alone",
            "bench_verify.py", "verify.json"),
    Section("nested", "Nested budgets: bytes per image per budget, and `f2b migrate --tokens k` vs re-encoding",
            "bench_nested.py", "nested.json"),
    Section("memory", "Image decoding memory: peak RSS of the worst shapes under the limits vs the stated bound, "
            "and of a whole `f2b index` run under its in-flight budget",
            "bench_memory.py", "memory.json"),
]
KEYS = [s.key for s in SECTIONS]


def command(section: Section, quick: bool, threads: int | None, results: Path) -> list[str]:
    """The exact command line for one section (relative paths, as a user would type it)."""
    cmd = [".venv/bin/python" if Path(C.ROOT / ".venv/bin/python").exists() else "python",
           f"bench/{section.script}"]
    if quick:
        cmd.append("--quick")
    if threads and section.threads_flag:
        cmd += [section.threads_flag, str(threads)]
    if section.json_name and section.own_json_flag:
        cmd += ["--json", _rel(results / section.json_name)]
    return cmd


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(C.ROOT))
    except ValueError:
        return str(path)


def run_section(section: Section, quick: bool, threads: int | None, results: Path, timeout: float) -> dict:
    """Run one script; record what it printed, its status and how long it took.

    With ``threads`` every child (and its own children, e.g. the REST server) gets OMP_NUM_THREADS, so
    scripts without a ``--threads`` option run pinned too."""
    cmd = command(section, quick, threads, results)
    shown = " ".join(shlex.quote(c) for c in cmd)
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if not section.threads_flag:
            shown = f"OMP_NUM_THREADS={threads} {shown}"
    info = C.machine()
    info["threads"] = threads or None
    C.log(f"== {section.key}: {shown}")
    started = time.perf_counter()
    run = [sys.executable] + cmd[1:]
    try:
        done = subprocess.run(run, cwd=str(C.ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout, env=env)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, (exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or "")
        err = f"stopped after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    C.log(f"   exit {rc} after {seconds:.0f} s")
    goals: list[dict] = []
    if section.json_name and rc == 0:
        path = results / section.json_name
        if path.exists():
            data = json.loads(path.read_text())
            goals = data.get("goals", []) if isinstance(data, dict) else []
    record = {"key": section.key, "title": section.title, "command": shown, "date": info["date"], "machine": info,
              "seconds": seconds, "rc": rc, "stdout": out, "stderr_tail": "\n".join((err or "").splitlines()[-15:]),
              "goals": goals}
    C.write_json(results / f"section-{section.key}.json", record)
    return record


def section_body(record: dict) -> str:
    """The Markdown of one section from its record (a kept section's text as it was)."""
    if "kept" in record:
        return record["kept"]
    head = [f"## {record['title']}", "",
            f"- Command: `{record['command']}`",
            f"- Date: {record['date']}; took {record['seconds']:.0f} s",
            f"- Machine: {C.machine_line(record['machine'])}", ""]
    rc = record["rc"]
    if record["key"] == "gpu" and rc == NOT_MEASURABLE:
        body = ["**Not measured: no GPU in this session.** The script refuses to run without CUDA:", "",
                "> " + (record["stderr_tail"].strip().splitlines() or ["no CUDA device"])[-1], "",
                "On a machine with a GPU: `python bench/bench_gpu.py` (batch sizes 1, 8, 32; a random "
                "LLaVA-1.5-7B-shaped model in bf16, pass-1 images/s and MFU against the card's dense bf16 peak)."]
    elif rc != 0:
        body = [f"**This run failed (exit {rc}).** Last lines of its error output:", "", "```",
                record["stderr_tail"].strip() or "(none)", "```"]
        if record["stdout"].strip():
            body += ["", "Partial output:", "", record["stdout"].strip()]
    else:
        body = [record["stdout"].strip()]
    return "\n".join(head + body) + "\n"


def goals_table(records: list[dict]) -> str:
    rows = []
    for record in records:
        if record["key"] == "gpu" and record["rc"] == NOT_MEASURABLE:
            rows.append(["6", "pass-1 throughput and MFU on a GPU", "not measured: no GPU in this session",
                         C.verdict(None), ""])
            continue
        if record["rc"] != 0 and record["goals"] == []:
            if record["key"] in ("answer", "storage", "encode", "search"):
                rows.append([record["title"].split(".")[0], record["title"], f"run failed (exit {record['rc']})",
                             "**FAILED**", ""])
            continue
        for g in record["goals"]:
            rows.append([g["figure"], g["goal"], g["measured"], C.verdict(g["met"]), g.get("why", "")])
    if not rows:
        return "(no goal checks recorded)"
    return C.md_table(["figure", "goal", "measured", "verdict", "why, where missed"], rows)


def document(records: list[dict], quick: bool) -> str:
    """The whole BENCHMARKS.md."""
    by_key = {r["key"]: r for r in records}
    ordered = [by_key[k] for k in KEYS if k in by_key]
    machines = {m for r in ordered for m in _machines(r.get("machine_line") or C.machine_line(r["machine"], load=False))}
    missed = [g for r in ordered for g in r["goals"] if g.get("met") is False]
    lines = [
        "# Benchmarks",
        "",
        "Regenerate with `make bench` (= `.venv/bin/python bench/run_all.py`; `--quick` for a smoke-sized run, "
        "`--only KEY,...` to re-measure some sections and keep the others). Every headline figure is a ratio "
        "measured side by side in the same run on the same machine, so that load from other processes hits both "
        "sides alike. Each section names the command that produced it, the date and the machine. Raw results: "
        "`bench/results/*.json` (not committed).",
        "",
        "Machine(s): " + "; ".join(sorted(machines)) if machines else "",
        "",
        "## Goals",
        "",
        goals_table(ordered),
        "",
    ]
    if quick or any("--quick" in r["command"] for r in ordered):
        lines += ["Some sections below come from `--quick` runs (small sizes, few repeats); see each command.", ""]
    for record in ordered:
        lines.append(section_body(record))
    lines += ["## Closing notes", ""]
    if missed:
        lines += ["Goals missed in this run, and why:", ""]
        lines += [f"- Figure {g['figure']}, {g['goal']}: {g['measured']}. {_sentence(g.get('why') or '')}".rstrip()
                  for g in missed]
    else:
        lines.append("No measured goal was missed in this run.")
    lines += ["", "Not measured here: " + ("figure 6 (no GPU in this session)."
                                         if by_key.get("gpu", {}).get("rc") == NOT_MEASURABLE else "nothing.")]
    return "\n".join(lines).rstrip() + "\n"


def _sentence(text: str) -> str:
    """Capitalized and ending with a full stop, for the closing notes."""
    text = text.strip()
    if not text:
        return ""
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


#: the goal rows' "figure" labels each section's script writes (to keep a section's rows with its text)
FIGURES = {"answer": ("1",), "storage": ("2",), "encode": ("3",), "search": ("4",), "service": ("5",), "gpu": ("6",),
           "training": ("training",), "cold": ("cold start", "cold start, no server"), "verify": ("verify latency",),
           "nested": ("nested",), "memory": ("decode memory",)}


def _machines(line: str) -> list[str]:
    """The machines of a ``Machine(s):`` line, one each (a machine's own text holds "; " too, so entries are
    split where the next one starts). Kept sections carry the whole line: joined again unsplit, every
    ``--only`` run repeated each machine once more."""
    return [m for m in re.split(r"; (?=\d+ CPU cores? )", line) if m]


def kept_records(document_text: str) -> dict[str, dict]:
    """Sections of an existing BENCHMARKS.md as records, for sections with no record in the results folder
    (a fresh checkout has none: ``--only KEY`` must not drop what the document already says). A kept record
    holds its section's Markdown verbatim and its rows of the Goals table."""
    rows = [line.split(" | ") for line in document_text.splitlines()
            if line.startswith("| ") and not line.startswith(("| figure |", "|---"))]
    verdicts = {"met": True, "**MISSED**": False, "not measured": None}
    machines = next((line[len("Machine(s): "):] for line in document_text.splitlines()
                     if line.startswith("Machine(s): ")), "")
    out = {}
    for section in SECTIONS:
        head = f"## {section.title}\n"
        start = document_text.find(head)
        if start == -1:
            continue
        end = min([i for i in (document_text.find("\n## ", start + len(head)),) if i != -1] or [len(document_text)])
        goals = [{"figure": r[0][2:], "goal": r[1], "measured": r[2], "met": verdicts.get(r[3]),
                  "why": r[4].rstrip(" |") if len(r) > 4 else ""}
                 for r in rows if len(r) >= 4 and r[0][2:] in FIGURES[section.key] and r[3] in verdicts]
        text = document_text[start:end].rstrip() + "\n"
        rc = NOT_MEASURABLE if section.key == "gpu" and "**Not measured" in text else 0
        out[section.key] = {"key": section.key, "title": section.title, "kept": text, "command": "",
                            "machine_line": machines, "goals": goals, "rc": rc}
    return out


def load_records(results: Path, previous: Path | None = None) -> list[dict]:
    """Each section's newest record; a section never run into ``results`` keeps its text from ``previous``."""
    kept = kept_records(previous.read_text()) if previous is not None and previous.is_file() else {}
    out = []
    for key in KEYS:
        path = results / f"section-{key}.json"
        if path.exists():
            out.append(json.loads(path.read_text()))
        elif key in kept:
            out.append(kept[key])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every script in its --quick mode")
    p.add_argument("--only", help=f"comma-separated sections to run: {', '.join(KEYS)} (others are kept)")
    p.add_argument("--threads", type=int, help="pin torch/FAISS threads in the scripts that take --threads")
    p.add_argument("--results", type=Path, default=C.RESULTS_DIR, help="where section records go")
    p.add_argument("--output", type=Path, default=C.ROOT / "BENCHMARKS.md")
    p.add_argument("--timeout", type=float, help="seconds per script (default 600 quick, 3600 full)")
    p.add_argument("--assemble-only", action="store_true", help="rebuild the document from stored sections")
    args = p.parse_args(argv)
    keys = KEYS if not args.only else [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(keys) - set(KEYS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(KEYS)}")
    timeout = args.timeout or (600.0 if args.quick else 3600.0)
    failed = []
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.assemble_only:
        for section in SECTIONS:
            if section.key not in keys:
                continue
            if not (BENCH / section.script).exists():
                C.log(f"== {section.key}: bench/{section.script} is missing; section skipped")
                continue
            record = run_section(section, args.quick, args.threads, args.results, timeout)
            if record["rc"] not in (0, NOT_MEASURABLE if section.key == "gpu" else 0):
                failed.append(section.key)
    records = load_records(args.results, args.output)
    args.output.write_text(document(records, args.quick))
    C.log(f"wrote {args.output}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
