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

__all__ = ["RemoteError", "RemoteHit", "RemoteHits", "announce", "find_server", "remote_ask", "remote_image", "remote_search", "runtime_dir"]

TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 300.0  # an answer waits for the model queue and generates up to max_new_tokens


class RemoteError(Exception):
    """The running server refused the request (a 4xx problem): its detail is the whole story."""


class RemoteHit(NamedTuple):
    id: int
    path: str
    score: float
    relevance: float | None = None


class RemoteHits(list):
    """The server's hits, with how many a verified search cut (``dropped``, from the response body)."""

    dropped: int = 0


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
    sweep_dead_records()
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


def sweep_dead_records() -> int:
    """Remove the records of servers that died without removing their own (``kill -9``, a crash), for
    every collection: returns how many went. Run when a server starts, so the folder does not fill up."""
    gone = 0
    for path in runtime_dir().glob("server-*.json"):
        try:
            os.kill(int(json.loads(path.read_text())["pid"]), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                path.unlink()
                gone += 1
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable or not ours to judge: left alone
    return gone


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


def _open(url: str, body: dict | None = None, timeout: float = TIMEOUT_S, accept: str = "application/json") -> Any:
    headers = {"Accept": accept}
    key = os.environ.get("F2B_API_KEY")
    if key:
        headers["X-API-Key"] = key
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the loopback URL the server wrote


def _call(url: str, body: dict | None = None) -> Any:
    with _open(url, body) as response:
        return json.loads(response.read())


def _same_collection(record: dict[str, Any]) -> bool:
    info = _call(f"{record['url']}/v1/collection")
    return Path(str(info.get("collection") or info.get("path") or "")).resolve() == Path(record["collection"])


def _refused(exc: urllib.error.HTTPError, what: str) -> None:
    """Raise ``RemoteError`` when the request itself is wrong (a 4xx other than auth or busy); return
    otherwise (a key is needed, or the server is busy or loading: the caller works locally instead)."""
    if 400 <= exc.code < 500 and exc.code not in (401, 403, 408, 429):
        try:
            detail = json.loads(exc.read()).get("detail")
        except (OSError, ValueError, AttributeError):
            detail = None
        raise RemoteError(detail or f"the server refused the {what} ({exc.code})") from None


def remote_search(record: dict[str, Any], body: dict[str, Any]) -> list[RemoteHit] | None:
    """Search through the server; None when it cannot answer (not ready, busy, gone, another collection)."""
    try:
        if not _same_collection(record):
            return None
        found = _call(f"{record['url']}/v1/search", body)
        hits = RemoteHits(RemoteHit(int(h["id"]), str(h["path"]), float(h["score"]),
                                    None if h.get("relevance") is None else float(h["relevance"]))
                          for h in found["results"])
        hits.dropped = int(found.get("dropped") or 0)
    except urllib.error.HTTPError as exc:
        _refused(exc, "search")
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hits


def remote_ask(record: dict[str, Any], image_id: int, question: str, max_new_tokens: int,
               stream: bool = False) -> str | Iterator[str] | None:
    """The server's answer (``stream``: an iterator of text pieces, read from its server-sent events);
    None when it cannot answer, decided before the first piece arrives."""
    body = {"question": question, "max_new_tokens": max_new_tokens, "stream": stream}
    try:
        if not _same_collection(record):
            return None
        response = _open(f"{record['url']}/v1/images/{image_id}/ask", body, timeout=ANSWER_TIMEOUT_S,
                         accept="text/event-stream" if stream else "application/json")
    except urllib.error.HTTPError as exc:
        _refused(exc, "question")
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not stream:
        with response:
            try:
                return str(json.loads(response.read())["answer"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return _events(response)


def remote_image(record: dict[str, Any], image_id: int) -> dict[str, Any] | None:
    """The server's record of one image (id, path, paths, metadata...), or None when it cannot say."""
    try:
        return _call(f"{record['url']}/v1/images/{image_id}")
    except urllib.error.HTTPError as exc:
        _refused(exc, "image lookup")
        return None
    except (OSError, ValueError):
        return None


def _events(response: Any) -> Iterator[str]:
    """Text pieces from an answer's server-sent events (``token`` ... ``done``, or ``error``)."""
    with response:
        event = None
        for raw in response:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event is not None:
                data = json.loads(line[5:])
                if event == "token":
                    yield str(data.get("text", ""))
                elif event == "error":
                    raise RemoteError(str(data.get("detail") or "the server could not answer"))
                elif event == "done":
                    return
                event = None
        raise RemoteError("the server closed the answer stream before it was done")
