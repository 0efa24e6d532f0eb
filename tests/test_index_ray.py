"""Issue 15, item 1: `f2b index --ray` decodes and encodes on a Ray cluster (started here, on loopback)
and commits in the driver: the same collection as a local run, failures recorded, a rerun adds nothing,
a killed driver resumes without duplicates."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fwd2bot_index.cli.main import app
from fwd2bot_index.indexing import HOLD_ENV
from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
from fwd2bot_index.service import open_service
from fwd2bot_index.synthetic import write_demo_data

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("m") / "tiny64", TinySpec(image_size=64), seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """12 demo images and one file that only looks like a PNG."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root, n=12, seed=5)
    (root / "images" / "000005_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    return root / "images"


def _index(images: Path, coll: Path, model_dir: Path, *extra: str):
    result = runner.invoke(app, ["index", str(images), "-c", str(coll), "-m", str(model_dir), "--device", "cpu",
                                 "--batch-size", "4", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def _rows(coll: Path, tmp: Path) -> dict:
    with open_service(coll) as svc:  # no model load: export reads the stored form
        svc.export(tmp)
    table = pq.read_table(tmp).sort_by("id").to_pydict()
    return {"id": table["id"], "path": table["path"], "hash": table["hash"], "metadata": table["metadata"],
            "embedding": np.asarray(table["embedding"], np.float32), "tokens": np.asarray(table["tokens"], np.float32)}


def test_ray_local_indexes_what_a_local_run_does(tmp_path, images, model_dir):
    local, _ = _index(images, tmp_path / "local", model_dir)
    # the workers under a budget of less than one image (each encodes its batch one image at a time): the same
    ray_report, stderr = _index(images, tmp_path / "ray", model_dir, "--ray", "local", "--max-inflight-mb", "0.01")
    assert "ray: 2 model replica(s)" in stderr or "ray: 1 model replica(s)" in stderr, stderr
    assert "indexing" in stderr  # the progress bar, as in a local run
    for report in (local, ray_report):
        assert report["indexed"] == 12 and report["scanned"] == 13
        assert [f["path"] for f in report["failed"]] == [str(images / "000005_broken.png")]
    assert ray_report["failed"] == local["failed"]
    mine, theirs = _rows(tmp_path / "local", tmp_path / "l.parquet"), _rows(tmp_path / "ray", tmp_path / "r.parquet")
    assert mine["id"] == theirs["id"] and mine["path"] == theirs["path"] and mine["hash"] == theirs["hash"]
    assert mine["metadata"] == theirs["metadata"]
    assert np.allclose(mine["embedding"], theirs["embedding"], atol=1e-5)
    assert np.allclose(mine["tokens"], theirs["tokens"], atol=1e-3)  # stored as fp16
    again, _ = _index(images, tmp_path / "ray", model_dir, "--ray", "local")
    assert again["indexed"] == 0 and again["unchanged"] == 12 and not again["failed"]
    assert [f["path"] for f in again["still_failing"]] == [str(images / "000005_broken.png")]
    assert _rows(tmp_path / "ray", tmp_path / "r2.parquet")["id"] == mine["id"]


def test_bad_ray_option_is_one_line_before_anything_loads(tmp_path, images, monkeypatch):
    bad = runner.invoke(app, ["index", str(images), "-c", str(tmp_path / "c"), "--ray", "not an address"])
    assert bad.exit_code == 2 and bad.output.startswith("error: --ray 'not an address'"), bad.output
    assert len(bad.output.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    missing = runner.invoke(app, ["index", str(images), "-c", str(tmp_path / "c"), "--ray", "local"])
    assert missing.exit_code == 2 and "pip install 'fwd2bot-index[ray]'" in missing.output, missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


# The hold hook stops the run after its first commit whatever the count, so a dozen images (12 batches of 1)
# leave the kill mid-run as surely as 60 did; the rerun then encodes 11 images, not 59 (~9 s less here).
N_KILLED = 12


def test_killed_ray_driver_resumes_without_duplicates(tmp_path, model_dir):
    """SIGKILL the driver of `--ray local` after its first committed batch: its Ray processes go with it,
    and the same command then finishes the folder with every image exactly once."""
    import psutil

    write_demo_data(tmp_path / "d", n=N_KILLED, seed=7)
    coll = tmp_path / "c"
    cmd = [sys.executable, "-m", "fwd2bot_index.cli", "index", str(tmp_path / "d" / "images"), "-c", str(coll),
           "-m", str(model_dir), "--batch-size", "1", "--device", "cpu", "--ray", "local", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    marker = tmp_path / "held"
    # the indexing hook holds the run after its first commit (no race with the machine's speed: on a loaded
    # machine a fixed wait once killed the driver before anything was committed)
    proc = subprocess.Popen(cmd, env={**env, HOLD_ENV: str(marker)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ray_processes: list = []
    try:
        deadline = time.time() + 600  # a generous bound for a loaded machine, not a timing assertion
        while time.time() < deadline and proc.poll() is None and not marker.exists():
            ray_processes = _descendants(proc.pid) or ray_processes
            time.sleep(0.05)
        ray_processes = _descendants(proc.pid) or ray_processes
        assert marker.exists(), f"the run never reached its first commit (exit code {proc.poll()})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # the cluster's core (gcs_server, raylet, the model workers) dies with its driver; Ray's helper agents
        # (ray::DashboardAgent, ray::RuntimeEnvAgent) were seen to outlive it by more than 30 s: killed here
        agents = [p for p in ray_processes if _name(p).startswith(("ray::Dashboard", "ray::RuntimeEnv"))]
        core = _still_running([p for p in ray_processes if p not in agents], timeout=30)
        for leftover in core + agents:  # never leave a cluster behind (ids seen as the driver's descendants)
            with contextlib.suppress(psutil.Error):
                leftover.kill()
    assert ray_processes and not core, f"Ray processes outlived their driver: {core}"
    with open_service(coll) as svc:
        committed = svc.info()["indexed"]
    assert 0 < committed < N_KILLED, committed  # killed mid-run, with some batches kept
    # the same command again, in this process: what is checked is the collection it leaves, not a process
    # (a fresh interpreter importing torch and loading the model in the driver cost ~8 s more here)
    rerun = runner.invoke(app, cmd[3:])
    assert rerun.exit_code == 0, rerun.output
    report = json.loads(rerun.stdout)
    assert report["unchanged"] == committed and report["indexed"] == N_KILLED - committed
    rows = _rows(coll, tmp_path / "x.parquet")
    assert len(rows["id"]) == len(set(rows["hash"])) == N_KILLED and len(set(rows["path"])) == N_KILLED


def _descendants(pid: int) -> list:
    import psutil

    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def _still_running(processes: list, timeout: float) -> list:
    """Those of ``processes`` that have not exited (a zombie waiting for its reaper counts as exited)."""
    import psutil

    deadline = time.time() + timeout
    while True:
        alive = []
        for p in processes:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def _name(process) -> str:
    import psutil

    with contextlib.suppress(psutil.Error):
        return process.name()
    return ""
