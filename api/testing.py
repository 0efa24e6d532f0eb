"""Helpers for tests and benchmarks of the REST service: a small real collection, a live server.

``demo_collection`` builds (once per process and folder) a collection of synthetic demo images
indexed with a tiny random LLaVA; ``LiveServer`` runs an app with uvicorn on a free loopback port in
a background thread. Nothing here is mocked: the model, collection and server are the real ones.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_BUILT: dict[str, "DemoCollection"] = {}
_BUILD_LOCK = threading.Lock()


@dataclass(frozen=True)
class DemoCollection:
    """Where the pieces of a demo collection are."""

    collection: Path
    model_dir: Path
    data_dir: Path

    @property
    def images(self) -> list[Path]:
        return sorted((self.data_dir / "images").glob("*.png"))

    def copy(self, target: str | os.PathLike[str]) -> Path:
        """A private copy of the collection folder (for tests that write to it)."""
        target = Path(target)
        shutil.copytree(self.collection, target, ignore=shutil.ignore_patterns("lock"))
        return target


def demo_collection(folder: str | os.PathLike[str], n: int = 40, seed: int = 0) -> DemoCollection:
    """Build a tiny LLaVA, ``n`` demo images and an indexed collection under ``folder`` (cached)."""
    folder = Path(folder)
    key = f"{folder.resolve()}:{n}:{seed}"
    with _BUILD_LOCK:
        if key in _BUILT:
            return _BUILT[key]
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava
        from fwd2bot_index.service import open_service
        from fwd2bot_index.synthetic import write_demo_data

        built = DemoCollection(folder / "collection", folder / "tiny-llava", folder / "demo")
        if not _complete(built, n):  # a folder left by an earlier process is reused only when whole
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            save_tiny_llava(built.model_dir, TinySpec(), seed=seed)
            write_demo_data(built.data_dir, n=n, seed=seed)
            with open_service(collection=built.collection, model=str(built.model_dir), create=True) as service:
                report = service.index([built.data_dir / "images"])
            if report.indexed != n:
                raise RuntimeError(f"demo collection: indexed {report.indexed} of {n} images ({report.failed})")
        _BUILT[key] = built
        return built


def _complete(demo: DemoCollection, n: int) -> bool:
    from fwd2bot_index.collection import Collection

    if not (Collection.exists(demo.collection) and demo.model_dir.is_dir() and len(demo.images) == n):
        return False
    try:
        with Collection.open(demo.collection) as existing:
            return len(existing) == n
    except Exception:  # noqa: BLE001 - anything unreadable is rebuilt
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """Run an app with uvicorn on a loopback port in a thread: ``with LiveServer(app) as url: ...``.

    Pass ``server`` (a ``uvicorn.Server``, e.g. from ``make_server``) instead of ``app`` to run that.
    """

    def __init__(self, app: Any = None, host: str = "127.0.0.1", port: int | None = None, timeout: float = 60.0,
                 server: Any = None) -> None:
        from .server import is_loopback

        if server is not None:
            host, port = server.config.host, server.config.port
        if not is_loopback(host):
            raise ValueError(f"LiveServer only binds loopback addresses, not {host!r}")
        self.app, self.host, self.port, self.timeout = app, host, port or free_port(host), timeout
        self._server: Any = server
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        import uvicorn

        if self._server is None:
            config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning", lifespan="on",
                                    timeout_graceful_shutdown=5)
            self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="f2b-live-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll ``/readyz`` until the model has loaded."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.url} was not ready within {timeout:.0f} s")
