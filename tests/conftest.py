"""Shared fixtures: tiny random LLaVA models saved to disk and loaded through from_pretrained."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A stock-checkpoint folder: tiny CLIP vision + Llama text, random weights."""
    from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", TinySpec(), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """The same geometry with a Qwen2 text model."""
    from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny") / "qwen", TinySpec(text_family="qwen2"), seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_llava_dir):
    from fwd2bot_index.model import Fwd2Bot

    return Fwd2Bot.from_pretrained(str(tiny_llava_dir), device="cpu", dtype="fp32")


@pytest.fixture
def images():
    from fwd2bot_index.model.tiny import random_images

    return random_images(5)


# -------------------------------------------------------------- REST service tests (tests/test_api*.py)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A real collection: 40 synthetic demo images indexed with a tiny random LLaVA (built once)."""
    from fwd2bot_index.api.testing import demo_collection

    return demo_collection(tmp_path_factory.getbasetemp() / "api-demo", n=40, seed=0)


@pytest.fixture(scope="module")
def service(demo):
    """The shared demo collection, opened read-only, model loaded (writable copies share the model)."""
    from fwd2bot_index.service import open_service

    with open_service(collection=demo.collection, model=str(demo.model_dir)) as svc:
        svc.preload()
        yield svc


@pytest.fixture
def writable(demo, tmp_path, service):
    """A private writable copy of the demo collection with the already loaded model; closed after the test."""
    from fwd2bot_index.collection import Collection
    from fwd2bot_index.service import ImageService

    svc = ImageService(Collection.open(demo.copy(tmp_path / "collection"), writable=True), str(demo.model_dir),
                       model=service.model)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine OpenMP threads that
    spin against other processes make each step several times slower. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(autouse=True)
def thawed_gc():
    """`f2b serve` (``make_server``) freezes the heap once its model has loaded, for good in a server; in
    this test process the next test must start with the garbage collector as it was."""
    yield
    import gc

    gc.unfreeze()


@pytest.fixture(scope="session")
def write_shape_pairs():
    """A writer of tiny training sets: one 32 px image per (colour, circle/square) with one distinct caption
    each, as a JSONL pairs file under ``root``; returns the file's path."""
    import json

    from PIL import Image, ImageDraw

    def write(root, colors: dict) -> "os.PathLike":
        (root / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for color, rgb in colors.items():
            for shape in ("circle", "square"):
                image = Image.new("RGB", (32, 32), (128, 128, 128))
                draw = ImageDraw.Draw(image)
                (draw.ellipse if shape == "circle" else draw.rectangle)([6, 6, 26, 26], fill=rgb)
                name = f"images/{color}_{shape}.png"
                image.save(root / name)
                rows.append({"image": name, "captions": [f"a {color} {shape}"]})
        (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / "pairs.jsonl"

    return write


@pytest.fixture(scope="session")
def write_photo():
    """A writer of photo-like pictures (smooth colour fields plus sensor noise, not square): images from
    outside the demo model's shapes world."""
    import numpy as np
    from PIL import Image

    def write(path, size=(96, 64), seed=0):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0 : size[1], 0 : size[0]]
        base = np.stack([x * 2 + 40, y * 3 + 20, (x + y) + 60], -1) + rng.normal(0, 6, (size[1], size[0], 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path)
        return path

    return write


@pytest.fixture(scope="session")
def interrupt_after_first_commit():
    """Run an `f2b index` command line that holds after its first commit (the indexing test hook), send it
    SIGINT once it says so through its marker file, and return (exit code, stderr, images committed).
    Nothing races the run's end: the run cannot finish before the signal."""
    import signal
    import subprocess
    import time

    from fwd2bot_index.indexing import HOLD_ENV

    def run(cmd, marker, env=None):
        # The child gets SIGINT's default back: a pytest started in the background by a script (`cmd &`)
        # inherits an *ignored* SIGINT, its children too, and the run then holds until the guard below.
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {}), HOLD_ENV: str(marker)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + 300  # a generous bound for a loaded machine, not a timing assertion
            while not marker.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            assert marker.exists(), proc.communicate(timeout=60)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=300)  # a hang guard, not a timing check
        finally:
            if proc.poll() is None:
                proc.kill()
        return proc.returncode, stderr, int(marker.read_text())

    return run
