"""A vendor emulator in its own process (so it never competes with the client for the GIL).

``python -m bench.serve VENDOR LATENCY CONFIG`` prints the emulator's URL, serves until its
standard input closes, then prints a JSON line: requests received (each request's path and
arrival time) and throttled answers.
"""

from __future__ import annotations

import json
import sys

from connector import config, emulator, vendors


def main(vendor: str, latency: float, path: str) -> None:
    cfg, _ = config.load(path)
    emu = vendors.module(vendor).emulator([s for s in cfg.syncs if s.vendor.type == vendor])
    emu.latency = latency
    throttled = 0
    answer = emu.throttled

    def counted(*args, **kw):
        nonlocal throttled
        throttled += 1
        return answer(*args, **kw)

    emu.throttled = counted
    with emulator.Running(emu) as running:
        print(running.url, flush=True)
        sys.stdin.read()
    print(json.dumps({"requests": len(emu.log), "throttled": throttled,
                      "arrivals": [(r["path"], r["at"]) for r in emu.log]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
