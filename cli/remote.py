"""`f2b search` through a running `f2b serve` of the same collection: no torch, no model load.

Why: a fresh `f2b search` process spends seconds importing torch, transformers and peft and loading
the model before it embeds one short query (rclip's users name start-up as their top complaint).
`f2b serve` already holds the model, so while it runs, `f2b search` asks it over loopback HTTP and
answers in well under a second. `f2b serve` leaves a small record (pid, URL, collection path; never a
key) in a per-user runtime folder; `f2b search` uses it only when that process is alive and its
/v1/collection names the same folder, and falls back to loading the model itself on any doubt
(`--local` forces that). Standard library only, so this path imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, NamedTuple

__all__ = ["RemoteError", "RemoteHit", "announce", "find_server", "remote_search", "runtime_dir"]

TIMEOUT_S = 5.0


class RemoteError(Exception):
    """The running server refused the request (a 4xx problem): its detail is the whole story."""


class RemoteHit(NamedTuple):
    id: int
    path: str
    score: float


def runtime_dir() -> Path:
    """A folder only this user can read: $XDG_RUNTIME_DIR/f2b, else <tmp>/f2b-<uid>."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(base) / "f2b" if base else Path(tempfile.gettempdir()) / f"f2b-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _record_path(collection: Path) -> Path:
    key = hashlib.sha256(str(collection.resolve()).encode()).hexdigest()[:20]
    return runtime_dir() / f"server-{key}.json"


@contextlib.contextmanager
def announce(collection: Path, host: str, port: int) -> Iterator[Path]:
    """While the block runs, record that this process serves ``collection`` at host:port."""
    connect = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    netloc = f"[{connect}]:{port}" if ":" in connect else f"{connect}:{port}"
    record = _record_path(collection)
    payload = {"pid": os.getpid(), "url": f"http://{netloc}", "collection": str(collection.resolve())}
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, record)
    try:
        yield record
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(record.read_text()).get("pid") == os.getpid():
                record.unlink()


def find_server(collection: Path) -> dict[str, Any] | None:
    """The record of a live `f2b serve` of ``collection``, or None."""
    path = _record_path(collection)
    try:
        record = json.loads(path.read_text())
        os.kill(int(record["pid"]), 0)  # signal 0: is that process alive?
    except ProcessLookupError:  # a server killed before it could remove its record
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if record.get("collection") == str(collection.resolve()) else None


def _call(url: str, body: dict | None = None) -> Any:
    headers = {"Accept": "application/json"}
    key = os.environ.get("F2B_API_KEY")
    if key:
        headers["X-API-Key"] = key
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 - loopback URL we wrote
        return json.loads(response.read())


def remote_search(record: dict[str, Any], body: dict[str, Any]) -> list[RemoteHit] | None:
    """Search through the server; None when it cannot answer (not ready, busy, gone, another collection)."""
    url = record["url"]
    try:
        info = _call(f"{url}/v1/collection")
        if Path(str(info.get("collection") or info.get("path") or "")).resolve() != Path(record["collection"]):
            return None
        results = _call(f"{url}/v1/search", body)["results"]
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500 and exc.code not in (401, 403, 408, 429):  # the request itself is wrong
            try:
                detail = json.loads(exc.read()).get("detail")
            except (OSError, ValueError, AttributeError):
                detail = None
            raise RemoteError(detail or f"the server refused the search ({exc.code})") from None
        return None  # a key is needed, or it is busy or still loading: search here instead
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [RemoteHit(int(h["id"]), str(h["path"]), float(h["score"])) for h in results]
