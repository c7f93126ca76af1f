"""Vendor emulators: real HTTP servers on loopback that behave as the vendors' docs say.

This module is the shared machinery — serving, a request log, a rate-limit window and
fault injection. The window is the vendor's declared :class:`~connector.vendors.base.Limit`,
held as a sliding window (the strictest reading: a client that never overfills a sliding
window never overfills a fixed one), counted when a request arrives, as a vendor's gateway
counts it; the added ``latency`` then delays the answer. Each vendor's ``emulator.py``
defines an ``Emulator`` subclass with the vendor's own rules: routes, auth, body checks,
error codes and what it stores.

Never imported by a production run (it pulls in ``http.server``): only by the tests, the
demo, the bench and ``usersync emulators``.

Admin endpoints (for tests and for a person poking at ``usersync emulators``):

- ``GET  /_emulator/state``    what the vendor now holds (``Emulator.state()``)
- ``GET  /_emulator/requests`` every request received, in order
- ``POST /_emulator/faults``   queue faults: ``{"kind": ..., "times": n, ...}`` (see :class:`Fault`)
- ``POST /_emulator/reset``    forget everything received
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import logging
import math
import random
import socket
import ssl
import struct
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from connector import vendors
from connector.vendors.base import Limit

log = logging.getLogger("usersync.emulator")


def json_kind_ok(kind: str, v: Any) -> bool | None:
    """Whether ``v`` is a JSON value of a Java-typed vendor's ``string``, ``long`` or ``double``
    (DFINERY's and Jiguang's words for them); None for any other kind, which each vendor
    checks its own way."""
    if kind == "string":
        return isinstance(v, str)
    if kind == "long":  # a Java long
        return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63
    if kind == "double":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return None


@dataclasses.dataclass
class Fault:
    """One injected misbehaviour, used ``times`` times on requests whose body contains ``match``.

    kinds: ``status`` (HTTP ``status`` with ``body``), ``code`` (the vendor's error ``code``,
    as the vendor would answer it), ``throttle`` (the vendor's rate-limit answer), ``timeout``
    (no answer for ``delay`` seconds, then the connection drops), ``reset`` (drop the
    connection at once), ``malformed`` (200 with truncated JSON), ``slow`` (answer normally
    after ``delay`` seconds), ``lost`` (apply the request, then drop the connection: the
    vendor changed but the client never hears of it).
    """

    kind: str
    times: int = 1
    status: int = 500
    code: Any = None
    body: str = ""
    delay: float = 0.0
    match: str | None = None


class Emulator:
    """Base class: subclasses set ``routes`` ({(method, path): method name}) and implement them.

    A route method gets ``(req)`` — a :class:`Req` — and returns (status, body dict, headers).
    """

    name = "emulator"
    routes: dict[tuple[str, str], str] = {}
    limit: Limit | None = None  # the vendor's declared limit: its window and unit
    rate_limit: float | None = None  # what one window holds (default: limit.count; None: no limit)
    latency: float = 0.0  # seconds added to every answer (a real vendor is not on loopback): the median
    latency_sigma: float = 0.0  # > 0: each answer's latency is lognormal around that median, this shape
    stores: tuple[str, ...] = ()  # the attributes holding what the vendor holds: emptied by reset()

    def __init__(self, **settings: Any):
        self.lock = threading.RLock()
        self.settings = settings
        self.faults: deque[Fault] = deque()
        self.log: list[dict[str, Any]] = []
        self._arrived: list[float] = []  # the requests counted, by arrival (two windows back)
        self._costs: list[float] = []  # what each counts
        self.rate_limit = settings.get("rate_limit", self.limit.count if self.limit else None)
        self.reset()

    @property
    def rate_window(self) -> float:
        return self.limit.window if self.limit else 1.0

    # -- vendor hooks --------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything received and held (each of ``stores`` made empty again)."""
        with self.lock:
            for name in self.stores:
                setattr(self, name, type(getattr(self, name))())
            self.log.clear()
            self.faults.clear()
            self._arrived.clear()
            self._costs.clear()

    def state(self) -> Any:
        """What the vendor holds, as JSON-able data."""
        return {}

    def throttled(self, retry_after: float) -> tuple[int, dict[str, Any], dict[str, str]]:
        return 429, {"error": "rate limit"}, {"Retry-After": f"{retry_after:.0f}"}

    def error(self, code: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
        """The vendor's answer carrying an error code (for ``code`` faults)."""
        return 200, {"code": code, "message": "injected"}, {}

    def rate_headers(self, remaining: int, reset: float) -> dict[str, str]:
        return {}

    def cost(self, req: Req) -> float:
        """What this request counts against the window (the users it carries, for a limit in users)."""
        return 1

    # -- machinery -----------------------------------------------------------------
    def add_fault(self, kind: str, **kw: Any) -> None:
        with self.lock:
            self.faults.append(Fault(kind, **kw))

    def _take_fault(self, body: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.match is None or f.match in body:
                    f.times -= 1
                    if f.times <= 0:
                        self.faults.remove(f)
                    return f
        return None

    def _rate(self, cost: float = 1, now: float | None = None) -> tuple[bool, int, float]:
        """(allowed, remaining, seconds until the window has room again) for a request of this
        cost arriving ``now``: allowed when no window of ``rate_window`` seconds holding it
        holds more than ``rate_limit`` with it. A refused request is not counted.

        Requests are handled a little out of their order of arrival (each on its own thread),
        so one may arrive before some already counted: every window it falls in is checked,
        the one ending at it and those ending at the later arrivals within a window of it."""
        if not self.rate_limit:
            return True, 1 << 30, 0.0
        with self.lock:
            now = time.monotonic() if now is None else now
            window, times, costs = self.rate_window, self._arrived, self._costs
            old = bisect.bisect_right(times, max(now, times[-1] if times else now) - 2 * window)
            del times[:old], costs[:old]
            at = bisect.bisect_right(times, now)
            ends = [now] + times[at:bisect.bisect_left(times, now + window)]
            for end in ends:  # the windows (end - window, end] that hold this request
                first = bisect.bisect_right(times, end - window)
                over = sum(costs[first:bisect.bisect_right(times, end)]) + cost - self.rate_limit
                if over > 1e-9:
                    reset = window
                    for i in range(first, len(times)):  # room once enough of its oldest arrivals age out
                        over -= costs[i]
                        if over <= 1e-9:
                            reset = times[i] + window - now
                            break
                    return False, 0, max(reset, 0.0)
            times.insert(at, now)
            costs.insert(at, cost)
            first = bisect.bisect_right(times, now - window)
            held = sum(costs[first:at + 1])
            return True, int(self.rate_limit - held), times[first] + window - now

    def _latency(self) -> float:
        if self.latency_sigma and self.latency:
            return random.lognormvariate(math.log(self.latency), self.latency_sigma)
        return self.latency

    def handle(self, req: Req, arrived: float | None = None) -> tuple[int, Any, dict[str, str]] | None:
        """Route one request through faults, the rate limit and the vendor's handler, then
        hold the answer for the added latency.

        Returns None when the connection must be dropped without an answer. ``arrived``: when
        the request came in (monotonic clock; default now).
        """
        arrived = time.monotonic() if arrived is None else arrived
        at = time.time() - (time.monotonic() - arrived)
        with self.lock:
            self.log.append({"method": req.method, "path": req.path, "query": req.query,
                             "headers": req.headers, "body": req.json, "at": at, "cost": self.cost(req)})
        answer = self._answer(req, arrived)
        latency = self._latency()
        if latency:
            time.sleep(max(0.0, arrived + latency - time.monotonic()))
        return answer

    def _answer(self, req: Req, arrived: float) -> tuple[int, Any, dict[str, str]] | None:
        fault = self._take_fault(req.raw)
        if fault:
            if fault.kind in ("timeout", "slow"):
                time.sleep(fault.delay)
            if fault.kind in ("timeout", "reset"):
                return None
            if fault.kind == "status":
                return fault.status, fault.body, {}
            if fault.kind == "code":
                return self.error(fault.code)
            if fault.kind == "throttle":
                return self.throttled(fault.delay or 1.0)
            if fault.kind == "malformed":
                return 200, '{"code": 0, "mess', {}
        allowed, remaining, reset = self._rate(self.cost(req), arrived)
        if not allowed:
            status, body, headers = self.throttled(reset)
            return status, body, {**self.rate_headers(0, reset), **headers}
        route = self.routes.get((req.method, req.path))
        if route is None:
            return 404, {"error": f"no route {req.method} {req.path}"}, {}
        status, body, headers = getattr(self, route)(req)
        if fault and fault.kind == "lost":
            return None
        return status, body, {**self.rate_headers(remaining, reset), **headers}


@dataclasses.dataclass
class Req:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: str
    json: Any  # parsed body, or None when it is not JSON


# The kernel's receive time of a connection's bytes (Linux: SO_TIMESTAMPNS, not in Python's socket module).
_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)
_TIMESPEC = struct.Struct("@ll")


class _Received(io.RawIOBase):
    """A connection's bytes as they are read, each read noting when the kernel received them:
    a vendor's gateway counts a request when it arrives, not when this process's thread gets
    the CPU to parse it (on a loaded machine, tens of milliseconds later, which bunched the
    window's count by as much)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.at = sock, None  # at: time.time() of the last read's bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n, ancillary, _, _ = self.sock.recvmsg_into([buffer], socket.CMSG_SPACE(_TIMESPEC.size))
        for _, kind, data in ancillary:
            if kind == _TIMESTAMPNS and len(data) >= _TIMESPEC.size:
                seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                self.at = seconds + nanoseconds / 1e9
        return n


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go as two writes: without this, a 40 ms delayed-ACK stall
    server: _Server
    _received: _Received | None = None

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):  # its bytes must go through TLS: counted when parsed
            return
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, _TIMESTAMPNS, 1)
        except (OSError, TypeError):  # not Linux: counted when the head is parsed
            return
        self._received = _Received(self.connection)
        self.rfile = io.BufferedReader(self._received)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.server.emulator.name, *args)

    def _serve(self) -> None:
        # its head is read: counted from when its bytes arrived (else from now), before the body is parsed
        arrived = time.monotonic()
        if self._received is not None and self._received.at is not None:
            arrived -= max(0.0, time.time() - self._received.at)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        url = urlsplit(self.path)
        if url.path.startswith("/_emulator/"):
            return self._admin(url.path, raw)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        req = Req(self.command, url.path, dict(parse_qsl(url.query, keep_blank_values=True)),
                  {k.lower(): v for k, v in self.headers.items()}, raw, body)
        answer = self.server.emulator.handle(req, arrived)
        if answer is None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(*answer)

    def _admin(self, path: str, raw: str) -> None:
        emu = self.server.emulator
        if path == "/_emulator/state":
            return self._send(200, emu.state(), {})
        if path == "/_emulator/requests":
            with emu.lock:
                return self._send(200, list(emu.log), {})
        if path == "/_emulator/faults":
            spec = json.loads(raw or "{}")
            emu.add_fault(spec.pop("kind"), **spec)
            return self._send(200, {"ok": True}, {})
        if path == "/_emulator/reset":
            emu.reset()
            return self._send(200, {"ok": True}, {})
        self._send(404, {"error": "unknown admin path"}, {})

    def _send(self, status: int, body: Any, headers: dict[str, str]) -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, addr, emulator: Emulator):
        self.emulator = emulator
        super().__init__(addr, _Handler)


class Running:
    """An emulator serving on a background thread; ``url`` is its base URL."""

    def __init__(self, emulator: Emulator, host: str = "127.0.0.1", port: int = 0):
        self.emulator = emulator
        self.server = _Server((host, port), emulator)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"emulator-{emulator.name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_all(specs=(), host: str = "127.0.0.1", ports: bool = True) -> dict[str, Running]:
    """Start every vendor's emulator, registering what ``specs`` map for it.

    With ``ports`` each serves on its emulator module's fixed ``PORT``; else on a free port.
    """
    running = {}
    for name in vendors.names():
        mod = vendors.emulator_module(name)
        mine = [s for s in specs if s.vendor.type == name]
        running[name] = Running(mod.emulator(mine), host, mod.PORT if ports else 0)
    return running


def wait() -> None:
    """Block the calling thread until interrupted (the servers run on daemon threads)."""
    threading.Event().wait()
