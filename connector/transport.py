"""HTTP transport: one pooled ``requests`` session, a shared rate limiter, timeouts.

Retries are decided by the vendor's verdict (the body's code, not the HTTP status),
so the retry loop lives in ``connector.push``; urllib3's own retries are off, which
keeps every attempt visible and counted in ``sync_batches``.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from connector.vendors.base import Request


class RateLimiter:
    """A pacer shared by all workers, with a pause for vendor back-off.

    Each caller reserves the next start slot, ``1 / rate`` after the previous one, and
    sleeps until it: starts are evenly spaced, so over any window of T seconds at most
    ``1 + rate * T`` requests start, and a worker that wakes late delays only itself
    (a token bucket capped at one token would lose that time for everyone). A vendor's
    fixed window of L requests per T seconds therefore holds at a rate a few percent
    under L / T (the margin covers the extra start and arrival jitter), and the
    sustained rate is that rate.
    """

    def __init__(self, rate: float):
        self.rate = rate
        self._next = 0.0  # the next free start slot (monotonic clock)
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                slot = max(self._next, self._paused_until, now)
                self._next = slot + 1 / self.rate
            if slot > now:
                time.sleep(slot - now)
            with self._lock:
                if slot >= self._paused_until:  # no back-off ordered since the slot was taken
                    return

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` (the vendor said: slow down)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)
            self._next = self._paused_until


class Transport:
    def __init__(self, *, concurrency: int, timeout: tuple[float, float], verify: bool, user_agent: str):
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=concurrency, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = user_agent
        self.session.verify = verify
        self.timeout = timeout
        self._settings: dict[tuple[str, str], dict] = {}  # (scheme, host) -> proxies, verify, cert, stream

    def send(self, req: Request) -> requests.Response:
        """What ``Session.request`` does, but the environment (proxies, CA bundle) is read once
        per host rather than per request (a millisecond each, at 100 requests a second)."""
        prepared = self.session.prepare_request(requests.Request(req.method, req.url, params=req.params,
                                                                 json=req.json, headers=req.headers))
        return self.session.send(prepared, timeout=self.timeout, allow_redirects=True, **self._environment(prepared.url))

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
