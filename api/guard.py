"""Browser attacks on a server without an API key: DNS rebinding (Host) and cross-site writes (Origin).

A page on ``https://evil.example`` can make the victim's browser send requests to
``http://127.0.0.1:8000``. Two defences, both on by default:

- **Host allow-list.** A rebinding page reaches the server under its own name
  (``Host: rebind.evil.example``), so only the names this server is meant to be reached by are
  answered: the loopback names, the address it binds, and names given with ``--allowed-host``
  (a reverse proxy's public name, or ``*.example.org``; ``*`` turns the check off). A Host that is
  an IP address is always answered: a browser sends one only to a page loaded from that very
  address, which no other site can rebind (so a server bound to 0.0.0.0 works by IP on a LAN).
  ``/healthz`` and ``/readyz`` answer any Host (they reveal nothing). A request with more than one
  Host header is refused everywhere (400): the allow-list and a proxy might read different ones.
- **Origin check** on every state-changing request (any method but GET, HEAD, OPTIONS): a browser
  names the page's origin in ``Origin``; it must be this server itself (same host and port as the
  ``Host`` header), a name given with ``--allowed-host``, or a configured CORS origin. Requests
  without ``Origin`` (curl, scripts, the CLI) are not browser cross-site requests and pass.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from .middleware import send_problem

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _name(host: str) -> str:
    """A host name or address, lower-case, without brackets or trailing dot."""
    return host.strip().strip("[]").rstrip(".").lower()


def split_host(value: str) -> tuple[str, int | None]:
    """``'Example.org:8000'`` -> ``('example.org', 8000)``; ``'[::1]:80'`` -> ``('::1', 80)``."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:  # a bare name, or a bare IPv6 address
        host, port = value, ""
    return _name(host), (int(port) if port.isdigit() else None)


def default_hosts(bind: str | None) -> list[str]:
    """The names a server bound to ``bind`` answers to without ``--allowed-host``."""
    names = list(LOOPBACK_NAMES)
    if bind and _name(bind) not in names and _name(bind) not in ("0.0.0.0", "::"):
        names.append(_name(bind))
    return names


class HostOriginMiddleware:
    """Refuse requests for other host names (400) and cross-site state-changing requests (403)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str], extra_hosts: Sequence[str] = (),
                 cors_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts or "*" in extra_hosts
        self.hosts = [_name(h) for h in [*allowed_hosts, *extra_hosts] if h != "*"]
        self.extra = [_name(h) for h in extra_hosts if h != "*"]  # named by the operator: trusted origins too
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope.get("headers", [])
        if sum(1 for k, _ in raw if k.lower() == b"host") > 1:
            # RFC 9112 (3.2): 400 for more than one Host. Which one counts is ambiguous (a proxy may route by
            # the first while the allow-list saw the last): a foreign name first passed as 127.0.0.1.
            await send_problem(send, scope, 400, "the request has more than one Host header; send exactly one",
                               "duplicate-host")
            return
        if scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
        host_header = headers.get("host", "")
        if host_header and not self.any_host:
            host, _ = split_host(host_header)
            if not (_is_ip(host) or _matches(host, self.hosts)):
                await send_problem(send, scope, 400, (
                    f"this server does not answer to the host name {host!r} (it answers to "
                    f"{', '.join(self.hosts)}); if that name is yours (a reverse proxy, a LAN name), start the "
                    f"server with --allowed-host {host}"), "host-not-allowed")
                return
        origin = headers.get("origin")
        if origin is not None and scope.get("method", "GET") not in SAFE_METHODS:
            if not self._origin_ok(origin, host_header):
                await send_problem(send, scope, 403, (
                    f"a {scope.get('method')} request from the web page at {origin!r} was refused: this server "
                    "accepts changes only from its own page, from names given with --allowed-host, or from "
                    "configured CORS origins"), "cross-origin-refused")
                return
        await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host_header: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins:
            return True
        parts = urlsplit(origin)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            return False  # "null" (sandboxed frames, file:// pages) and anything odd
        try:
            origin_port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError:
            return False
        o_host = _name(parts.hostname)
        if _matches(o_host, self.extra):
            return True
        if not host_header:
            return False
        host, port = split_host(host_header)
        # No port in Host means the default port of the scheme the browser used (behind a TLS proxy
        # that is the origin's scheme, not this server's).
        return o_host == host and origin_port == (port or DEFAULT_PORTS[parts.scheme])


@functools.lru_cache(maxsize=256)  # parsing an address cost ~90 us per request; a few hosts repeat
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _matches(host: str, allowed: Sequence[str]) -> bool:
    for pattern in allowed:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False
