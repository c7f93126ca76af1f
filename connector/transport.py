"""HTTP transport: one pooled ``requests`` session, a shared rate limiter, timeouts.

Retries are decided by the vendor's verdict (the body's code, not the HTTP status),
so the retry loop lives in ``connector.push``; urllib3's own retries are off, which
keeps every attempt visible and counted in ``sync_batches``.
"""

from __future__ import annotations

import threading
import time

import requests
from requests.adapters import HTTPAdapter

from connector.vendors.base import Request


class RateLimiter:
    """A token bucket shared by all workers, with a pause for vendor back-off.

    ``rate`` tokens a second, at most ``burst`` saved up: over any window of T seconds
    at most ``burst + rate * T`` requests start, so a vendor's per-second or per-minute
    limit is never crossed when ``rate`` is at or under it.
    """

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, min(rate / 10, 10.0))
        self._tokens = self.burst
        self._last = time.monotonic()
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                wait = self._paused_until - now
                if wait <= 0 and self._tokens >= 1:
                    self._tokens -= 1
                    return
                if wait <= 0:
                    wait = (1 - self._tokens) / self.rate
            time.sleep(wait)

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` (the vendor said: slow down)."""
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)
            self._tokens = 0


class Transport:
    def __init__(self, *, concurrency: int, timeout: tuple[float, float], verify: bool, user_agent: str):
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=concurrency, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["User-Agent"] = user_agent
        self.session.verify = verify
        self.timeout = timeout

    def send(self, req: Request) -> requests.Response:
        # verify per request: a session's own setting loses to REQUESTS_CA_BUNDLE (requests#3829)
        return self.session.request(req.method, req.url, params=req.params, json=req.json,
                                    headers=req.headers, timeout=self.timeout, verify=self.session.verify)

    def close(self) -> None:
        self.session.close()
