"""A vendor emulator in its own process (so it never competes with the client for the GIL).

Its cyclic garbage collector is off: the emulator keeps every request it received (the
arrival log, the users' attributes), so each full collection walks all of them and holds
every answer back meanwhile. At Tencent's 100 requests of 100 users a second that was 4
pauses of up to 0.13 s in a 15 s run: the client saw a p99 answer time of 134-158 ms
(63 ms with the collector off) for the 50 ms the benchmark adds, and its senders sat
waiting. The emulator's own pauses are not what this measures; the process lives one run.

``python -m bench.serve VENDOR LATENCY CONFIG [SIGMA]`` prints the emulator's URL, serves until
its standard input closes, then prints a JSON line: requests received (each request's path,
arrival time and what it counts against the limit), throttled answers, and when the first
request arrived while another was still being answered (``overlap``: the push's start is
over). Each arrival also names its user when the request carries one user's ops of one
type (EngageLab's ``euid``; else null): such a user's types go one after the other.
LATENCY is added to every answer; with SIGMA, it is the median of a lognormal latency of
that shape.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time

from connector import config, vendors

from connector.vendors import emulator


def main(vendor: str, latency: float, path: str, sigma: float = 0.0) -> None:
    gc.disable()
    cfg, _ = config.load(path)
    emu = vendors.emulator_module(vendor).emulator([s for s in cfg.syncs if s.vendor.type == vendor])
    emu.latency, emu.latency_sigma = latency, sigma
    throttled = 0
    answer = emu.throttled

    def counted(*args, **kw):
        nonlocal throttled
        throttled += 1
        return answer(*args, **kw)

    emu.throttled = counted
    handle, lock, answering, overlap = emu.handle, threading.Lock(), 0, None

    def handled(req, arrived):
        nonlocal answering, overlap
        with lock:
            answering += 1
            if answering > 1 and overlap is None:
                overlap = time.time() - (time.monotonic() - arrived)  # as the log's arrival times
        try:
            return handle(req, arrived)
        finally:
            with lock:
                answering -= 1

    emu.handle = handled
    with emulator.Running(emu) as running:
        print(running.url, flush=True)
        sys.stdin.read()
    print(json.dumps({"requests": len(emu.log), "throttled": throttled, "overlap": overlap,
                      "arrivals": [(r["path"], r["at"], r["cost"], _user(r["body"])) for r in emu.log]}), flush=True)


def _user(body) -> str | None:
    return str(body["euid"]) if isinstance(body, dict) and "euid" in body else None


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3], *map(float, sys.argv[4:5]))
