"""Progress of a long run: a live line on a terminal, a log line every 10 s otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("usersync.progress")


class Progress:
    def __init__(self, label: str, stream=None, interval: float | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.started = time.monotonic()
        self._last = 0.0
        self.counts = {"rows": 0, "planned": 0, "requests": 0, "delivered": 0, "failed": 0}

    def update(self, rows: int = 0, **absolute: int) -> None:
        self.counts["rows"] += rows
        self.counts.update(absolute)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._show()

    def text(self) -> str:
        c = self.counts
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return (f"{self.label}: read {c['rows']:,} rows, planned {c['planned']:,} users, "
                f"sent {c['requests']:,} requests ({c['requests'] / elapsed:,.0f}/s), "
                f"delivered {c['delivered']:,}, failed {c['failed']:,}, {elapsed:,.0f}s")

    def _show(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.text())
            self.stream.flush()
        else:
            log.info(self.text())

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
