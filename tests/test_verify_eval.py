"""The verified-search measurement (``fwd2bot_index.evaluation.verified``), its nonsense queries, the
calibration fit, `f2b eval verify` and the latency bench, on tiny random models and small demo worlds."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app as cli
from fwd2bot_index.evaluation.verified import fit_calibration, measure_verification, report_lines, verified_ranks
from fwd2bot_index.synthetic import write_demo_data
from fwd2bot_index.synthetic.generate import generate_scenes
from fwd2bot_index.synthetic.language import holds, parse_caption
from fwd2bot_index.synthetic.nonsense import KINDS, nonsense_queries

from .test_bench_smoke import keep_threads  # noqa: F401  (autouse: the bench pins threads; restored after)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify-world")
    write_demo_data(folder, n=24, seed=1000, split_fractions=(0.0, 0.5, 0.5))
    return folder


def test_nonsense_queries_hold_in_no_gallery_scene():
    scenes = generate_scenes(60, seed=3, split="test")
    queries = nonsense_queries(scenes, n_per_kind=20, seed=1)
    assert {k for k, _ in queries} == set(KINDS) and len(queries) == 60
    for kind, query in queries:
        if kind != "count":  # counts past four are outside the world's grammar: no scene has that many
            assert not any(holds(s, parse_caption(query)) for s in scenes), query
        else:
            assert query.split()[0] in ("five", "six", "seven", "eight", "nine")
    assert nonsense_queries(scenes, 20, seed=1) == queries  # deterministic
    with pytest.raises(ValueError, match="unknown nonsense kinds"):
        nonsense_queries(scenes, 2, kinds=["colour"])


def test_verified_ranks_rerank_only_the_top():
    sim = np.array([[0.9, 0.8, 0.7, 0.1]])  # embedding order 0, 1, 2, 3; the owner is image 2
    top = np.array([[0, 1, 2]])
    relevance = np.array([[0.1, 0.2, 0.9]])
    assert verified_ranks(sim, relevance, top, np.array([2]), 3).tolist() == [0]
    assert verified_ranks(sim, relevance, top, np.array([2]), 2).tolist() == [2]  # beyond the verified two
    assert verified_ranks(sim, relevance, top, np.array([3]), 3).tolist() == [3]


def test_fit_calibration_recovers_a_known_temperature_and_bias():
    rng = np.random.default_rng(0)
    margins = rng.normal(0, 3, 4000)
    p = 1 / (1 + np.exp(-(margins / 2.0 - 0.5)))  # the truth: T = 2, b = -0.5
    labels = rng.random(4000) < p
    fit = fit_calibration(margins[labels], margins[~labels])
    assert fit["temperature"] == pytest.approx(2.0, rel=0.15) and fit["bias"] == pytest.approx(-0.5, abs=0.15)
    assert fit["informative"]
    with pytest.raises(ValueError, match="both"):
        fit_calibration([1.0, 2.0], [])


def test_measure_verification_on_a_tiny_model(tiny_model, world):
    results = measure_verification(tiny_model, world, verify=(2, 5), n_nonsense=3, n_sugarcrepe=3, batch_size=8)
    for split in ("test", "test_unseen"):
        r = results["splits"][split]
        assert set(r["retrieval_t2i"]) == {"embedding", "verify@2", "verify@5"} and r["n_images"] == 12
        for recall in r["retrieval_t2i"].values():
            assert all(0 <= recall[k] <= 1 for k in (1, 5, 10))
        assert r["retrieval_t2i"]["verify@5"][5] == r["retrieval_t2i"]["embedding"][5]  # the top 5 only re-ordered
        assert 0 <= r["true_queries"]["cut"] <= 1 and r["nonsense_rejected"]["n"] == 9
    assert set(results["hard_negatives"]) and all(0 <= v["relevance"] <= 1 for v in results["hard_negatives"].values())
    assert "fitted_calibration" in results
    lines = report_lines(results)
    assert any("nonsense rejected" in line for line in lines) and json.dumps(results)


def test_f2b_eval_verify_writes_a_report(tiny_llava_dir, world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(cli, ["eval", "verify", "--data", str(world), "--model", str(tiny_llava_dir), "--verify", "3",
                                 "--nonsense", "2", "--sugarcrepe-limit", "2", "--gallery", "6", "--out", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "verify@3 R@1" in result.stdout and (out / "results.json").is_file() and (out / "report.md").is_file()
    bad = runner.invoke(cli, ["eval", "verify", "--data", str(world), "--min-relevance", "3"])
    assert bad.exit_code == 2 and "between 0 and 1" in bad.stderr


def test_bench_verify_smoke(tiny_llava_dir, tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        bench = importlib.import_module("bench_verify")
        assert bench.main(["--quick", "--threads", "1", "--model", str(tiny_llava_dir), "--images", "24",
                           "--queries", "3", "--json", str(tmp_path / "v.json")]) == 0
    finally:
        sys.path.remove(str(BENCH))
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["ratio"] > 0 and data["rows"]["verify@20 (HTTP)"]["n"] == 6
    assert "verify@20 (HTTP)" in capsys.readouterr().out
