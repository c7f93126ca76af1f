"""HTTP transport: one pooled ``requests`` session, a shared rate limiter, timeouts.

Retries are decided by the vendor's verdict (the body's code, not the HTTP status),
so the retry loop lives in ``connector.push``; urllib3's own retries are off, which
keeps every attempt visible and counted in ``sync_batches``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3 import connection, connectionpool

if TYPE_CHECKING:  # the transport only reads them: it does not depend on the vendors' package
    from connector.vendors.base import Limit, Request


# The one margin under every vendor limit: the limiter holds the vendor's count to windows
# (1 + MARGIN) times the vendor's. The vendor counts arrivals, not our starts, and what lies
# between (the last of the request's encoding, a thread waiting for the CPU, the network)
# varies: a window of the vendor's length then holds arrivals that started within a window
# that much longer, so its count holds while that jitter stays under MARGIN x window
# (30 ms for a one-second window, 1.8 s for a minute). The pace is 1 / (1 + MARGIN) = 0.971.
MARGIN = 0.03


class Start:
    """One request's start: counted against the window from the moment its slot was granted
    until a window after :meth:`left` says it went."""

    __slots__ = ("limiter", "at", "cost")

    def __init__(self, limiter: RateLimiter, at: float, cost: float):
        self.limiter, self.at, self.cost = limiter, at, cost

    def left(self) -> None:
        """The request has been written to the connection: the vendor counts it from about now."""
        self.limiter._left(self)


class RateLimiter:
    """The only thing that decides when a request starts: no window of ``(1 + MARGIN)`` times
    the vendor's length ever holds more departures than its budget, ``share x limit.count``.

    Two rules together. Even spacing: each caller reserves the next start slot,
    ``cost x window / budget`` after the previous one, and sleeps until it, so starts are
    spread across the window instead of spent at its beginning. A sliding log: when a caller
    wakes (late, perhaps: a thread gets the CPU when it gets it), it may start only if what
    the log holds plus its own cost fits the budget; else it waits until enough of it is
    ``window`` old. The log alone makes the guarantee, at any latency and concurrency: late
    wakers cannot bunch past it. The spacing keeps the log from being spent in bursts.

    What the log counts is what the vendor counts, departures: a start is held from its
    grant until it has left (:meth:`Start.left`), then for a window from the moment it left.
    Counted from its grant instead, a request whose thread got the CPU to write it tens of
    milliseconds late (a loaded machine) left a window of the vendor's length holding up to
    4 more than the limit. Invariant: a start is counted from its grant until a window after
    it left, so the grant that admitted the last of any window's departures counted every
    other one of them. A granted start must leave: ``Transport.send`` says so in any case
    (a request that failed before it was written counts from its failure); only a push that
    is stopping gives a start up unsent.

    ``cost`` is 1 a request, or the users a request carries when the limit counts users.
    ``share`` is this process's part of the limit (pushes of one credential running at once);
    it only grows while the push runs (see ``connector.push``), so the log stays exact.
    """

    def __init__(self, limit: Limit, share: float = 1.0):
        self.limit = limit
        self.window = limit.window * (1 + MARGIN)
        self._log: deque[Start] = deque()  # the last window's departures, in the order they left
        self._going: set[Start] = set()  # granted, not yet left
        self._used = 0.0  # the cost of both
        self._next = 0.0  # the next free start slot (monotonic clock)
        self._paused_until = 0.0
        self.pauses = 0  # how often the vendor said: slow down
        self._lock = threading.Lock()
        self._waited = threading.local()  # seconds this thread has waited here (see Senders)
        self.set_share(share)

    def set_share(self, share: float) -> None:
        with self._lock:
            self.share = share
            self.budget = self.limit.count * share
            self._spacing = self.window / self.budget  # seconds a unit of cost

    @property
    def rate(self) -> float:
        """The pace, in the limit's unit a second."""
        return self.budget / self.window

    def pace(self) -> float:
        """Requests a second at this pace: the rate over the mean cost of the recent starts."""
        with self._lock:
            starts = len(self._log) + len(self._going)
            cost = self._used / starts if starts else 1.0
        return self.rate / cost

    def acquire(self, users: int = 1) -> Start:
        """Wait for this request's start; ``users`` count when the limit counts users. The
        caller sends right after it (see :class:`Start`)."""
        cost = min(users if self.limit.unit == "users" else 1, self.budget)
        asked = time.monotonic()
        with self._lock:
            slot = self._reserve(cost, asked)
        while True:
            delay = slot - time.monotonic()
            if delay > 0:
                self._sleep(delay)
            with self._lock:
                now = time.monotonic()
                if now < self._paused_until:  # a back-off ordered since the slot was taken
                    slot = self._reserve(cost, now)
                    continue
                slot = self._room(cost, now)
                if slot <= now:
                    start = Start(self, now, cost)
                    self._going.add(start)
                    self._used += cost
                    self._waited.seconds = getattr(self._waited, "seconds", 0.0) + now - asked
                    return start

    def _left(self, start: Start) -> None:
        with self._lock:
            if start in self._going:  # once: a second word changes nothing
                self._going.remove(start)
                start.at = time.monotonic()
                self._log.append(start)

    _sleep = staticmethod(time.sleep)

    def waited(self) -> float:
        """Seconds the calling thread has waited for its starts, all told."""
        return getattr(self._waited, "seconds", 0.0)

    def _reserve(self, cost: float, now: float) -> float:
        slot = max(self._next, self._paused_until, now)
        self._next = slot + cost * self._spacing
        return slot

    def _room(self, cost: float, now: float) -> float:
        """When the log leaves room for ``cost`` (``now`` if it does). Starts not yet gone are
        never a window old: if they alone leave no room, look again in a window."""
        log, window = self._log, self.window
        while log and log[0].at <= now - window:
            self._used -= log.popleft().cost
        over = self._used + cost - self.budget
        if over <= 1e-9:
            return now
        for start in log:
            over -= start.cost
            if over <= 1e-9:
                return start.at + window
        return now + window

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` (the vendor said: slow down), at most a window."""
        with self._lock:
            self.pauses += 1
            self._paused_until = max(self._paused_until, time.monotonic() + min(seconds, self.limit.window))
            self._next = self._paused_until


# Senders: at most this many, whatever the latency (threads and connections are kept for
# each; 128 hold 97 requests a second at 1.3 s answers).
MAX_SENDERS = 128


class Senders:
    """How many senders may work at once: as many as the limiter's pace needs, no more
    (Little's law: at work = rate x time a request keeps its sender).

    That time is measured per job: from taking a sender to giving it back, less the time
    spent waiting for start slots — the answer, and the work around it (an intent written,
    the verdict read), not the pacing (counting it would feed back: more senders, longer
    waits, more senders). The target is the pace in requests a second times the 90th
    percentile of the last ``SAMPLE`` jobs' times, plus a quarter and two for the tail. It
    follows the answers both ways, and halves when the vendor throttles (the limiter pauses
    everyone: fewer then wait at the pause's end), growing back one sender per round of
    answers. ``maximum`` bounds it (``vendor.concurrency``, else :data:`MAX_SENDERS`), and
    sizes the pool of threads and connections.

    A pool of ``maximum`` threads runs the jobs; each holds a sender (:meth:`run`) for the
    whole job, so this count, not the pool, is how many are at work.
    """

    SAMPLE = 200
    HEADROOM, SPARE = 1.25, 2

    def __init__(self, limiter: RateLimiter, maximum: int, start: int = 4):
        self.limiter, self.maximum = limiter, maximum
        self.limit = min(start, maximum)
        self._ceiling = maximum  # lowered by throttling, regrown by answers
        self._pauses, self._grow = limiter.pauses, 0
        self._times: deque[float] = deque(maxlen=self.SAMPLE)
        self._busy = 0
        self._free = threading.Condition()

    def run(self, fn, *args):
        with self._free:
            while self._busy >= self.limit:
                self._free.wait()
            self._busy += 1
        began, waited = time.monotonic(), self.limiter.waited()
        try:
            return fn(*args)
        finally:
            self._times.append(time.monotonic() - began - (self.limiter.waited() - waited))
            with self._free:
                self._busy -= 1
                self._free.notify()

    def observe(self) -> None:
        """A job came back: follow the times of the last ones (called by one thread)."""
        if self.limiter.pauses != self._pauses:
            self._pauses = self.limiter.pauses
            self._ceiling, self._grow = max(1, self.limit // 2), 0
        elif self._ceiling < self.maximum:
            self._grow += 1
            if self._grow >= self._ceiling:
                self._ceiling, self._grow = self._ceiling + 1, 0
        times = sorted(self._times)
        if not times:
            return
        p90 = times[int(0.9 * (len(times) - 1))]
        need = math.ceil(self.limiter.pace() * p90 * self.HEADROOM) + self.SPARE
        limit = max(1, min(need, self._ceiling, self.maximum))
        if limit != self.limit:
            with self._free:
                self.limit = limit
                self._free.notify_all()


# What to call once the request this thread is sending has been written (see Transport.send).
_sending = threading.local()


def _written() -> None:
    left = getattr(_sending, "left", None)
    if left is not None:
        _sending.left = None
        left()


class _Reporting:
    def request(self, *args, **kwargs):
        super().request(*args, **kwargs)
        _written()


class _Connection(_Reporting, connection.HTTPConnection):
    pass


class _TLSConnection(_Reporting, connection.HTTPSConnection):
    pass


class _Pool(connectionpool.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(connectionpool.HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _Adapter(HTTPAdapter):
    """urllib3's pools, whose connections say when a request has been written."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}


class Transport:
    def __init__(self, *, concurrency: int, timeout: tuple[float, float], verify: bool, user_agent: str):
        self.session = requests.Session()
        # a connection kept for each sender there may be (opened as they are needed)
        adapter = _Adapter(pool_connections=1, pool_maxsize=concurrency, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = user_agent
        self.session.verify = verify
        self.timeout = timeout
        self._settings: dict[tuple[str, str], dict] = {}  # (scheme, host) -> proxies, verify, cert, stream

    def prepare(self, req: Request) -> requests.PreparedRequest:
        """The request encoded, ready to go: done before its start slot, so that what lies
        between the slot and the bytes leaving is as short as it can be."""
        return self.session.prepare_request(requests.Request(req.method, req.url, params=req.params,
                                                             json=req.json, headers=req.headers))

    def send(self, prepared: requests.PreparedRequest, left=None) -> requests.Response:
        """What ``Session.request`` does, but the environment (proxies, CA bundle) is read once
        per host rather than per request (a millisecond each, at 100 requests a second).
        ``left`` is called once the request has been written, before its answer is awaited;
        if it never was (a connection refused), when the send fails: it may have gone in part."""
        _sending.left = left
        try:
            return self.session.send(prepared, timeout=self.timeout, allow_redirects=True,
                                     **self._environment(prepared.url))
        finally:
            _written()

    def _environment(self, url: str) -> dict:
        origin = urlsplit(url)[:2]
        settings = self._settings.get(origin)
        if settings is None:
            # verify as the session's: its own setting would lose to REQUESTS_CA_BUNDLE (requests#3829)
            settings = self._settings[origin] = self.session.merge_environment_settings(
                url, {}, None, self.session.verify, None)
        return settings

    def close(self) -> None:
        self.session.close()
