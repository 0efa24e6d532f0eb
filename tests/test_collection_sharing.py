"""One collection, many processes: the writer lock is held only while writing.

A real second process plays the server: it opens the collection writable and keeps it open, searching
and adding on command. The test process meanwhile indexes batches into the same folder (what
``f2b index`` does beside ``f2b serve``): both writers' batches land, each sees the other's images at
its next search without reopening, and the collection verifies clean.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from fwd2bot_index.collection import Collection, Manifest, NewImage

REPO = Path(__file__).resolve().parents[1]
D, T, H = 16, 4, 8

SERVER = textwrap.dedent("""
    import sys
    import numpy as np
    from fwd2bot_index.collection import Collection, NewImage

    D, T, H = 16, 4, 8
    emb = lambda i: np.random.default_rng(i).normal(size=D).astype(np.float32)
    tok = lambda i: np.random.default_rng(1000 + i).normal(size=(T, H)).astype(np.float32)
    col = Collection.open(sys.argv[1], writable=True)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "search":
            hit = col.search(emb(int(args[0])), k=1)
            print(hit[0].metadata["i"] if hit else -1, len(col), flush=True)
        elif cmd == "add":
            nums = list(range(int(args[0]), int(args[1])))
            for n in nums:  # one batch per image: many short writes interleave with the other writer's
                col.add_batch([NewImage(f"/srv/{n}.jpg", f"h{n}", 1, 1.0, {"i": n})], emb(n)[None], tok(n)[None])
            print("added", len(col), flush=True)
        elif cmd == "quit":
            break
    col.close()
    print("closed", flush=True)
""")


def emb(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(size=D).astype(np.float32)


def tok(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).normal(size=(T, H)).astype(np.float32)


def add(col: Collection, nums) -> None:
    col.add_batch([NewImage(f"/cli/{n}.jpg", f"h{n}", 1, 1.0, {"i": n}) for n in nums],
                  np.stack([emb(n) for n in nums]), np.stack([tok(n) for n in nums]))


class Server:
    def __init__(self, folder: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(folder)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        assert self.read() == "ready"

    def read(self) -> str:
        line = self.proc.stdout.readline().strip()
        assert line, self.proc.stderr.read()
        return line

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def ask(self, line: str) -> str:
        self.send(line)
        return self.read()

    def close(self) -> None:
        self.send("quit")
        assert self.read() == "closed"
        self.proc.wait(timeout=60)


def test_index_beside_a_server_process(tmp_path):
    folder = tmp_path / ".f2b"
    m = Manifest(model_name="demo", model_fingerprint="fp", strategy={"embed": "prompt"}, embed_dim=D,
                 token_count=T, token_dim=H)
    with Collection.create(folder, m) as col:
        add(col, range(0, 5))
    server = Server(folder)  # holds the collection open, writable, for its whole life
    try:
        assert server.ask("search 3") == "3 5"
        with Collection.open(folder, writable=True, lock_timeout=30) as indexer:  # f2b index beside it
            add(indexer, range(5, 10))
            assert server.ask("search 7") == "7 10"  # found at the next search, no restart
            server.send("add 100 140")  # the server uploads while the indexer keeps writing
            for start in range(10, 50, 4):
                add(indexer, range(start, start + 4))
            assert server.read().startswith("added ")
            assert indexer.search(emb(120), k=1)[0].metadata["i"] == 120  # and the indexer sees the uploads
        assert server.ask("search 45").split()[0] == "45"
        assert server.ask("search 139") == "139 90"
    finally:
        server.close()
    with Collection.open(folder, writable=True) as col:
        report = col.verify()
        assert report.ok, report.problems
        nums = sorted(r.metadata["i"] for r in col.list_images(0, 1000))
        assert nums == list(range(50)) + list(range(100, 140))
        for n in (0, 9, 49, 100, 139):
            hit = col.search(emb(n), k=1)[0]
            assert hit.metadata["i"] == n and np.abs(col.get_tokens(hit.id) - tok(n)).max() < 0.01


def test_f2b_index_beside_f2b_serve(tmp_path, tiny_llava_dir):
    """End to end with the tiny model: `f2b serve` in its own process, `f2b index` and an upload beside it."""
    import time

    import httpx
    from typer.testing import CliRunner

    from fwd2bot_index.api.testing import free_port
    from fwd2bot_index.cli.main import app
    from fwd2bot_index.synthetic import write_demo_data

    write_demo_data(tmp_path / "a", n=6, seed=1)
    write_demo_data(tmp_path / "b", n=6, seed=2)
    coll = tmp_path / "c"
    runner = CliRunner()
    index = ["-c", str(coll), "-m", str(tiny_llava_dir), "--device", "cpu"]
    assert runner.invoke(app, ["index", str(tmp_path / "a" / "images"), *index]).exit_code == 0
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fwd2bot_index.cli", "serve", *index, "--port", str(port)],
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(600):  # wait for the server process to listen (bounded)
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.1)
            info = client.get("/v1/collection").json()
            assert info["writable"] is True and info["indexed"] == 6
            added = runner.invoke(app, ["index", str(tmp_path / "b" / "images"), *index])  # the server is up
            assert added.exit_code == 0, added.output
            assert client.get("/v1/collection").json()["indexed"] == 12  # seen at its next request
            assert client.get("/v1/images/12").status_code == 200  # ids 7-12 came from the second run
            hits = client.post("/v1/search", json={"like": 12, "k": 3}).json()["results"]
            assert len(hits) == 3
            from PIL import Image

            Image.new("RGB", (40, 32), (10, 200, 90)).save(tmp_path / "upload.png")
            up = client.post("/v1/images", files={"file": ("u.png", (tmp_path / "upload.png").read_bytes(), "image/png")})
            assert up.status_code == 201, up.text
            assert client.get("/v1/collection").json()["indexed"] == 13
            again = runner.invoke(app, ["verify", "-c", str(coll)])
            assert again.exit_code == 0, again.output
    finally:
        server.terminate()
        server.wait(timeout=60)
    with Collection.open(coll) as col:
        assert len(col) == 13 and col.verify().ok
