"""Issue 23: `make demo` loads the model once. Its script indexes, then runs one `f2b serve` of the
collection that every search and ask goes through, and stops it at the end (no server left behind).
No timing is asserted: what is checked is that the model-loading commands went through the server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_script_goes_through_one_server_and_stops_it(tmp_path):
    bin_dir = Path(sys.executable).parent
    f2b = bin_dir / "f2b"
    env = {**os.environ, "F2B_DEMO_DIR": str(tmp_path / "demo"), "DEMO_N": "12", "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "F2B": str(f2b) if f2b.exists() else f"{sys.executable} -m fwd2bot_index.cli", "PY": sys.executable}
    (tmp_path / "run").mkdir()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "answers right:" in done.stdout and "indexed      12 images" in done.stdout
    assert done.stdout.count("(true: there is no ") == 2  # two questions about objects the scene lacks
    served = done.stderr.count("answered by the running f2b serve")
    asked = done.stdout.count("  Q: ")
    assert asked >= 1 and served == asked + 2, done.stderr[-2000:]  # both searches and every question
    registry = tmp_path / "run" / "f2b"
    assert not registry.exists() or not any(registry.iterdir()), "the demo's server is still announced"


def test_a_server_stopped_with_sigterm_removes_its_record_and_dead_ones_are_swept(tmp_path, monkeypatch):
    """`kill PID` (SIGTERM) lets `f2b serve` remove its announcement; records of servers killed with
    SIGKILL are swept when the next server starts."""
    import json
    import signal
    import time
    import urllib.request

    from fwd2bot_index.api.testing import demo_collection, free_port
    from fwd2bot_index.cli.remote import announce, runtime_dir

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    demo = demo_collection(tmp_path / "demo", n=6, seed=3)
    with announce(tmp_path / "elsewhere", "127.0.0.1", free_port()) as dead:
        payload = json.loads(dead.read_text())
    dead.write_text(json.dumps({**payload, "pid": 2 ** 22 + 4321}))  # beyond pid_max: a dead server
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fwd2bot_index.cli", "serve", "-c", str(demo.collection), "-m",
                             str(demo.model_dir), "--port", str(port), "--device", "cpu"],
                            env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300  # a bound for a loaded machine, not a timing assertion
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        records = sorted(p.name for p in runtime_dir().glob("server-*.json"))
        assert len(records) == 1 and not dead.exists(), records  # the dead one went, ours is there
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not list(runtime_dir().glob("server-*.json")), proc.stderr.read()[-2000:]
