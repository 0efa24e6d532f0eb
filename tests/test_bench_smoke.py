"""Smoke test of the benchmark scripts: each runs its --quick mode at tiny sizes and must print
well-formed Markdown tables and write its JSON results. No timing is asserted (a shared CI machine
makes any threshold flaky); what is checked is what could silently break: the tables, the
measurements that have an exact answer (flat search has recall 1.0, ratios are computed from the
rows printed), the GPU figure's refusal on a CPU, and the assembly of BENCHMARKS.md."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    """Import a bench script as a module (bench/ is a folder of scripts, not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(autouse=True)
def keep_threads():
    """The scripts pin threads (``--threads 1`` here); give the rest of the session its own setting back."""
    import os

    import torch

    import faiss

    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    saved, saved_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield
    torch.set_num_threads(saved)
    faiss.omp_set_num_threads(saved_faiss)
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def tables(markdown: str) -> list[list[list[str]]]:
    """Every Markdown table in ``markdown`` as rows of cells; asserts each is well formed."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
            continue
        if current:
            found.append(current)
            current = []
    parsed = []
    for block in found:
        assert len(block) >= 3, f"a table needs a header, a separator and a row:\n{block}"
        cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row.strip()[1:-1])] for row in block]
        width = len(cells[0])
        assert all(set(c) <= set("-:") and c for c in cells[1]), f"bad separator row: {block[1]}"
        assert all(len(r) == width for r in cells), f"ragged table:\n" + "\n".join(block)
        parsed.append([cells[0]] + cells[2:])
    return parsed


def run(module, argv: list[str], capsys) -> tuple[str, dict]:
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    json_path = Path(argv[argv.index("--json") + 1])
    return out, json.loads(json_path.read_text())


def test_search_quick_tiny(bench, tmp_path, capsys):
    out, data = run(bench("bench_search"), ["--quick", "--sizes", "1000", "--queries", "20", "--threads", "1",
                                            "--backends", "faiss-default,qdrant-edge,qdrant-local",
                                            "--json", str(tmp_path / "s.json")], capsys)
    (table,) = tables(out)
    assert table[0][:3] == ["vectors", "backend", "structure"]
    rows = {r["backend"]: r for r in data["rows"]}
    assert set(rows) == {"faiss-default", "qdrant-edge", "qdrant-local"}
    assert all(r.get("error") is None for r in rows.values()), rows
    assert rows["faiss-default"]["structure"] == "flat"  # below the auto threshold the default is exact
    assert rows["faiss-default"]["recall_at_10"] == 1.0
    assert rows["qdrant-local"]["recall_at_10"] == 1.0  # brute force
    assert all(0 <= r["recall_at_10"] <= 1 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows.values())
    assert data["goals"][0]["met"] is None  # 1,000 vectors is not the 1M goal: not judged


def test_search_data_is_clustered(bench):
    import numpy as np

    search = bench("bench_search")
    data, centers, basis = search.clustered_vectors(2000, 32, 10, seed=0)
    assert np.allclose(np.linalg.norm(data, axis=1), 1, atol=1e-5)
    nearest_center = (data @ centers.T).max(axis=1)
    assert nearest_center.mean() > 0.8  # points sit near a center, unlike uniform noise
    q = search.queries_near(centers, basis, 50, seed=0)
    assert not (q[:, None, :] == data[None, :, :]).all(-1).any()  # queries are not in the data


def test_answer_quick_tiny(bench, tmp_path, capsys):
    out, data = run(bench("bench_answer"), ["--quick", "--smoke", "--models", "llava15", "--pairs", "2",
                                            "--max-new-tokens", "3", "--threads", "1",
                                            "--json", str(tmp_path / "a.json")], capsys)
    (table,) = tables(out)
    assert [r[1].split(":")[0].split(",")[0] for r in table[1:]] == [
        "stock", "stock tokens", "fwd2bot", "fwd2bot (the product's path)"]
    (row,) = data["rows"]
    assert row["stock"]["prefill_tokens"] > row["fwd2bot"]["prefill_tokens"]  # K=8 < 16 visual tokens
    assert row["stock_lean"]["prefill_tokens"] == row["stock"]["prefill_tokens"]
    assert row["ttft_ratio"] == pytest.approx(row["stock"]["ttft_ms"] / row["fwd2bot"]["ttft_ms"])
    assert row["ttft_ratio_same_loop"] == pytest.approx(row["stock_lean"]["ttft_ms"] / row["fwd2bot"]["ttft_ms"])
    assert 1 <= row["fwd2bot"]["tokens"] <= 3


def test_storage_quick_tiny(bench, tmp_path, capsys):
    out, data = run(bench("bench_storage"), ["--quick", "--smoke", "--images", "10", "--qa-limit", "3",
                                             "--settings", "fwd2bot:fp16,fwd2bot:int8,full:fp16", "--quality", "on",
                                             "--threads", "1", "--json", str(tmp_path / "st.json")], capsys)
    found = tables(out)
    assert len(found) == 3  # LLaVA-7B computed, demo measured, retrieval vectors
    seven = {r["item"]: r for r in data["llava7b"]}
    assert seven["summary K=32, fp16"]["ratio_vs_full"] == pytest.approx(18.0)
    settings = {(r["strategy"], r["token_dtype"]): r for r in data["demo"]["settings"]}
    fp16, int8 = settings[("fwd2bot", "fp16")], settings[("fwd2bot", "int8")]
    assert int8["token_store_bytes_per_image"] < fp16["token_store_bytes_per_image"]  # measured on disk
    assert all(0 <= r["qa_exact"] <= 100 for r in settings.values())


def test_storage_goal_says_how_far_chance_alone_moves_a_missed_qa_gap(bench):
    """A 2.3-point gap over 300 questions is within sampling error: the missed goal says so, by the numbers."""
    storage = bench("bench_storage")
    full = {"strategy": "prompt+full", "token_dtype": "fp16", "qa_exact": 90.67, "qa_loss_points": 0.0,
            "ratio_stored": 1.0, "qa_n": 300}
    ours = {"strategy": "fwd2bot", "token_dtype": "int8", "qa_exact": 88.33, "qa_loss_points": 2.33,
            "ratio_stored": 6.0, "qa_n": 300}
    seven = [{"item": "summary K=32, fp16", "ratio_vs_full": 18.0}, {"item": "summary K=32, int8", "ratio_vs_full": 36.0}]
    goal = storage.goals(seven, {"settings": [full, ours]}, True, "")[1]
    se = 100 * ((0.8833 * 0.1167 + 0.9067 * 0.0933) / 300) ** 0.5  # 2.5 points
    assert goal["met"] is False and f"at 300 questions is {se:.1f} points" in goal["why"]


def test_encode_quick_tiny(bench, tmp_path, capsys):
    out, data = run(bench("bench_encode"), ["--quick", "--smoke", "--models", "demo", "--images", "8", "--threads", "1",
                                            "--json", str(tmp_path / "e.json")], capsys)
    sweep, e2e = tables(out)
    assert [r[0] for r in sweep[1:]] == ["1", "4", "16", "32"]
    (row,) = data["e2e"]
    assert row["ratio"] == pytest.approx(row["rounds"][0]["index"] / row["rounds"][0]["model_only"])


def test_gpu_refuses_on_cpu(bench, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal path does not apply")
    gpu = bench("bench_gpu")
    assert gpu.main(["--quick", "--json", str(tmp_path / "g.json")]) == gpu.NO_GPU_EXIT
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0 and gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0


def test_gpu_script_smoke_on_cpu(bench, tmp_path, capsys):
    """The GPU figure's code path (pass-1 rates, TTFT, a training step) on a tiny geometry on the CPU."""
    gpu = bench("bench_gpu")
    assert gpu.main(["--smoke", "--quick", "--batches", "2", "--repeats", "1", "--threads", "1",
                     "--json", str(tmp_path / "g.json")]) == 0
    data = json.loads((tmp_path / "g.json").read_text())["result"]
    assert data["ttft"]["stock_ms"] > 0 and data["ttft"]["fwd2bot_ms"] > 0
    (step,) = data["training"]
    assert step["batch"] == 2 and step["step_s"] > 0 and step["trainable_parameters"] > 0
    assert "Training step" in capsys.readouterr().out


def test_run_all_assembles_document(bench, tmp_path):
    run_all = bench("run_all")
    common = bench("_common")
    machine = common.machine()
    ok = {"key": "answer", "title": run_all.SECTIONS[0].title, "command": "python bench/bench_answer.py --quick",
          "date": machine["date"], "machine": machine, "seconds": 1.0, "rc": 0,
          "stdout": "| a | b |\n|---|---|\n| 1 | 2 |\n", "stderr_tail": "",
          "goals": [common.goal("1", "ttft >= 10x", "6.0x", False, "prefill ratio bound")]}
    gpu = {**ok, "key": "gpu", "title": run_all.SECTIONS[5].title, "rc": run_all.NOT_MEASURABLE, "stdout": "",
           "stderr_tail": "figure 6 needs a CUDA GPU", "goals": []}
    broken = {**ok, "key": "search", "title": run_all.SECTIONS[3].title, "rc": 1, "stdout": "",
              "stderr_tail": "Traceback: boom", "goals": []}
    doc = run_all.document([gpu, broken, ok], quick=True)
    assert doc.index("## 1.") < doc.index("## 4.") < doc.index("## 6.")  # figure order, not run order
    assert "not measured: no GPU in this session" in doc
    assert "**MISSED**" in doc and "Prefill ratio bound." in doc.split("## Closing notes")[1]
    assert "failed (exit 1)" in doc and "boom" in doc
    for table in tables(doc):
        assert table


def test_run_all_keeps_sections_it_has_no_record_of(bench, tmp_path):
    """A fresh checkout has no bench/results: re-measuring one section keeps every other section's text and
    goal rows from the existing BENCHMARKS.md (it used to drop them)."""
    run_all, common = bench("run_all"), bench("_common")
    machine = common.machine()
    record = {"key": "answer", "title": run_all.SECTIONS[0].title, "command": "python bench/bench_answer.py",
              "date": machine["date"], "machine": machine, "seconds": 1.0, "rc": 0, "stdout": "old answer table\n",
              "stderr_tail": "", "goals": [common.goal("1", "ttft >= 10x", "9.5x", False, "prefill bound")]}
    cold = {**record, "key": "cold", "title": run_all.SECTIONS[7].title, "stdout": "first cold table\n",
            "goals": [common.goal("cold start", "search <= 1.5 s", "0.2 s", True)]}
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(run_all.document([record, cold], quick=False))
    before = out.read_text()
    assert run_all.main(["--assemble-only", "--results", str(tmp_path / "none"), "--output", str(out)]) == 0
    assert out.read_text() == before  # nothing recorded: the document is reproduced as it was
    results = tmp_path / "r"
    results.mkdir()
    common.write_json(results / "section-cold.json", {**cold, "stdout": "second cold table\n",
                                                       "goals": [common.goal("cold start", "search <= 1.5 s", "0.3 s", True)]})
    assert run_all.main(["--assemble-only", "--results", str(results), "--output", str(out)]) == 0
    after = out.read_text()
    assert "old answer table" in after and "second cold table" in after and "first cold table" not in after
    assert "| 1 | ttft >= 10x | 9.5x | **MISSED** | prefill bound |" in after and "| 0.3 s |" in after


def test_run_all_gpu_section_end_to_end(bench, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    run_all = bench("run_all")
    out = tmp_path / "BENCHMARKS.md"
    assert run_all.main(["--quick", "--only", "gpu", "--results", str(tmp_path / "r"), "--output", str(out)]) == 0
    record = json.loads((tmp_path / "r" / "section-gpu.json").read_text())
    assert record["rc"] == run_all.NOT_MEASURABLE and "bench/bench_gpu.py --quick" in record["command"]
    assert "Not measured: no GPU in this session" in out.read_text()


def test_search_case_variants_reuse_one_index(bench, tmp_path):
    """Variants (threads=1, other ef_search) search the same built index: recall moves, build is not redone."""
    import numpy as np

    search = bench("bench_search")
    bench("_common").set_threads(1)
    data, centers, basis = search.clustered_vectors(1500, 32, 20, seed=1)
    queries = search.queries_near(centers, basis, 30, seed=1)
    for name, array in (("data", data), ("queries", queries), ("truth", search.exact_topk(data, queries, 10))):
        np.save(tmp_path / f"{name}.npy", array)
    spec = {"n": 1500, "backend": "faiss-hnsw", "data": str(tmp_path / "data.npy"),
            "queries": str(tmp_path / "queries.npy"), "truth": str(tmp_path / "truth.npy"), "tmp": str(tmp_path),
            "one_thread_too": True, "ef_search_variants": [16, 256]}
    row = search.run_case(spec)
    assert [v["variant"] for v in row["variants"]] == ["threads=1", "ef_search=16", "ef_search=256",
                                                      "ef_search=16, threads=1", "ef_search=256, threads=1"]
    by = {v["variant"]: v for v in row["variants"]}
    assert by["ef_search=256"]["recall_at_10"] >= by["ef_search=16"]["recall_at_10"]
    assert row["structure"] == "hnsw" and row["build_s"] > 0


def test_service_tiny(bench, tmp_path, capsys):
    """Two real servers on loopback, 20 images, levels 1 and 4: the table, texts per call per level, and
    both goal checks (judged, with a 'why' wherever missed) in the JSON that run_all reads."""
    out, data = run(bench("bench_service"), ["--images", "20", "--levels", "1,4", "--requests", "16",
                                             "--torch-threads", "1", "--json", str(tmp_path / "svc.json")], capsys)
    (table,) = tables(out)
    assert table[0][:3] == ["query", "concurrency", "max queue"] and "texts per model call" in table[0]
    rows = data["rows"]
    assert all(r["errors"] == 0 and r["qps"] > 0 for r in rows)
    text = [r for r in rows if r["kind"] == "text"]
    assert all(r["texts_per_call"] >= 1 and r["model_calls"] >= 1 for r in text)
    assert {r["concurrency"] for r in rows if r.get("round") is not None} == {1, 4}
    goals = data["goals"]
    assert [g["figure"] for g in goals] == ["5", "5"] and "4 clients >= 1.5x" in goals[0]["goal"]
    assert all(isinstance(g["met"], bool) and (g["met"] or g["why"]) for g in goals)


def test_service_like_goal_says_why_missed_when_its_cpu_time_did_not_tick(bench):
    """A short run on a loaded machine can miss the like goal with 0 CPU ms per request measured (the process
    clock did not tick): the goal still says why, without dividing by that 0."""
    def row(kind, level, qps):
        return {"round": 0, "kind": kind, "concurrency": level, "qps": qps, "max_queue": level, "server_cpu_ms": 0.0,
                "client_cpu_ms": 0.0, "texts_per_call": 1.0, "model_calls": 1}

    goals = bench("bench_service").goals([row("text", 1, 100.0), row("text", 4, 120.0), row("like", 1, 100.0),
                                          row("like", 4, 110.0)])
    assert [g["met"] for g in goals] == [False, False]  # 1.2x of 1.5x; 110 QPS of 3 x 538
    assert all("too little CPU time to measure" in g["why"] for g in goals)


def test_nested_quick_tiny(bench, tmp_path, capsys):
    out, data = run(bench("bench_nested"), ["--quick", "--smoke", "--images", "12", "--threads", "1",
                                            "--json", str(tmp_path / "nested.json")], capsys)
    (table,) = tables(out)
    assert [int(r[0]) for r in table[1:]] == [8, 4]  # K first, then each smaller budget of the set
    rows = {r["tokens"]: r for r in data["rows"]}
    assert rows[4]["tokens_bytes_per_image"] < rows[8]["tokens_bytes_per_image"]
    assert rows[4]["speedup"] == pytest.approx(rows[4]["reencode_s"] / rows[4]["migrate_s"])
    assert data["goals"][0]["met"] in (True, False)


def test_memory_hostile_cases_are_refused_cheaply(bench, tmp_path):
    rows = bench("bench_memory").measure(quick=True, workdir=tmp_path, first=3)
    assert [r["outcome"].startswith("refused") for r in rows] == [True, True, True]
    assert all(r["above_baseline"] < 32 * 2**20 for r in rows)
    assert "memory" in bench("run_all").KEYS


def test_memory_index_runs_with_and_without_the_budget(bench, tmp_path):
    """The whole-run measurement (quick: 12 small solid-colour PNGs, 4 images' worth of budget) indexes
    every image in both of its fresh processes and reports their peaks."""
    runs = bench("bench_memory").measure_index(quick=True, workdir=tmp_path)
    assert [r["budget"] is None for r in runs] == [False, True]
    assert all(r["indexed"] == r["images"] == 12 and r["failed"] == 0 and r["above_baseline"] > 0 for r in runs)


def test_machines_line_does_not_grow_with_each_only_run(bench):
    run_all = bench("run_all")
    a = "2 CPU cores (AMD EPYC), 23.5 GiB RAM, no GPU; torch 2.13.0+cpu, numpy 2.4.6"
    b = "2 CPU cores (Intel(R) Xeon(R) Processor), 23.5 GiB RAM, no GPU; torch 2.13.0+cpu, numpy 2.4.6"
    assert run_all._machines(f"{a}; {b}; {b}; {a}") == [a, b, b, a]
    assert set(run_all._machines(f"{a}; {b}; {b}")) == {a, b}


def test_every_bench_script_the_code_names_exists():
    """Docstrings and messages point readers at the script that measures a claim; a name that does not exist
    (``image_shape`` named ``bench/bench_shapes.py``; the script is ``bench/bench_memory.py``) sends them nowhere."""
    repo = BENCH.parent
    named = {}
    for top in ("fwd2bot_index", "cli", "api", "eval", "bench"):
        for path in (repo / top).rglob("*.py"):
            for name in re.findall(r"\bbench/([A-Za-z0-9_]+\.py)", path.read_text(encoding="utf-8")):
                named.setdefault(name, path.relative_to(repo).as_posix())
    assert "bench_memory.py" in named
    missing = {f"bench/{name}": where for name, where in named.items() if not (BENCH / name).is_file()}
    assert not missing, missing
