"""Push at each vendor's declared limit: the demo warehouse, the demo syncs, an emulator far away.

The emulator adds a latency to every answer: a fixed 50, 200 or 500 ms, or a long tail
(lognormal, median 150 ms, p99 about 1 s). The sustained rate is what arrived at the emulator
on the sync's data path, in the limit's unit (requests; users for MoEngage, whose limit counts
users), against the limit. It is measured from the first request that arrived while another
was being answered (or, when none ever did, the second): the lookups before the push
(Tencent's registered names) and the first batch, which goes alone by design until it is
answered (for EngageLab, its users' several requests one after the other), are the run's
start, not its sustained rate. It ends with the last user's first request: what arrives
after it is the run's end, the later requests of EngageLab's last users, each a latency
after the one before (half a second per type at 500 ms, whatever the run's length; the
whole run's rate is ``run_fraction_of_limit``). The peak window is the most
that arrived in any window of the vendor's length (sliding), over its limit; throttling is
counted by the emulator.

``python -m bench.push VENDOR DIR SECONDS [LATENCY]`` runs one push of about SECONDS at the
limit (0: a hundred users) and prints its figures as JSON.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from connector import config, demo, demo_run, engine, vendors

# added latency: name -> (median seconds, lognormal shape; 0 is a fixed latency).
# p99 = median x exp(2.326 x shape): 0.15 x exp(2.326 x 0.816) = 1.0 s.
LATENCIES = {"50ms": (0.05, 0.0), "200ms": (0.2, 0.0), "500ms": (0.5, 0.0), "lognormal": (0.15, 0.816)}
# bench name -> (vendor type, the demo sync's API setting if not its own, demo users a second at the
# limit: one a request but Tencent's 100; EngageLab's demo users take ~2.7 requests each)
VENDORS = {
    "dfinery": ("dfinery", None, 162),
    "jiguang": ("jiguang", None, 97),
    "tencent_im": ("tencent_im", None, 9_700),
    "moengage_bulk": ("moengage", None, 162),
    "moengage_track": ("moengage", "track", 162),
    "engagelab": ("engagelab", None, 35),
}


def limit(vendor: str):
    kind, api, _ = VENDORS[vendor]
    return vendors.get(kind).limit_for({"api": api or "bulk"})


def measure(vendor: str, workdir: Path, seconds: float, latency: str = "50ms") -> dict:
    kind, api, per_second = VENDORS[vendor]
    lim = limit(vendor)
    users = max(int(per_second * seconds), 100)
    directory = workdir / f"push_{vendor}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "warehouse.db").unlink(missing_ok=True)
    path = demo_run.write_config(directory)
    if api:
        path.write_text(path.read_text().replace("api: bulk}", f"api: {api}}}"))
    demo.build_warehouse(f"sqlite:///{directory / 'warehouse.db'}", users=users)
    median, sigma = LATENCIES[latency]
    server = subprocess.Popen([sys.executable, "-m", "bench.serve", kind, str(median), str(path), str(sigma)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        os.environ[f"{kind.upper()}_BASE_URL"] = server.stdout.readline().strip()
        cfg, _ = config.load(path)
        sync = engine.open_sync(cfg, f"{kind}_users")
        run_id = engine.begin(sync, mode="incremental", trigger="bench")
        engine.plan(sync, run_id)
        t0 = time.perf_counter()
        result = engine.push(sync, run_id)
        took = time.perf_counter() - t0
        summary = engine.finalize(sync, run_id)
    finally:
        server.stdin.close()
        emulated = json.loads(server.stdout.readline() or "{}")
        server.wait(30)
    # the vendor's busiest path is the data; what each arrival counts: 1, or its users
    paths = collections.Counter(arrival[0] for arrival in emulated["arrivals"])
    busiest = paths.most_common(1)[0][0]
    arrivals = sorted((at, cost, user) for path, at, cost, user in emulated["arrivals"] if path == busiest)
    data = [(at, cost) for at, cost, _ in arrivals]
    times, amounts = [at for at, _ in data], [cost for _, cost in data]
    rate = _steady(times, amounts, emulated.get("overlap"), _last_start(arrivals))
    whole = _steady(times, amounts, emulated.get("overlap"))
    return {"users": users, "latency": latency, "delivered": summary.users_delivered, "requests": result.requests,
            "seconds": round(took, 2), "rate": round(rate, 2), "unit": f"{lim.unit}/s", "limit": lim.per_second,
            "fraction_of_limit": round(rate / lim.per_second, 4),
            "run_fraction_of_limit": round(whole / lim.per_second, 4), "window": lim.window,
            "peak_window": round(peak(data, lim.window) / lim.count, 4), "throttled": emulated.get("throttled"),
            "status": summary.status,
            **({"batch_fill": round(summary.users_delivered / (result.requests * 100), 4)}
               if vendor == "tencent_im" and result.requests else {})}


def _steady(times: list[float], amounts: list[float], since: float | None = None, last: int | None = None) -> float:
    """What arrived from the first arrival at ``since`` or after (default: the second) up to
    arrival ``last`` (default: the last), over that time: each arrival counts for the time until
    the next one, so the last counts for none (one of MoEngage's 200-user batches over a 12 s
    run weighs 0.03 of the rate either way). 0 with fewer than three requests (a tiny run:
    nothing sustained to measure)."""
    if len(times) < 3:
        return 0.0
    first = next((i for i, at in enumerate(times) if at >= since), 1) if since is not None else 1
    first = min(max(first, 1), len(times) - 2)
    last = len(times) - 1 if last is None else min(max(last, first + 1), len(times) - 1)
    return sum(amounts[first:last]) / max(times[last] - times[first], 1e-9)


def _last_start(arrivals: list[tuple[float, float, str | None]]) -> int:
    """The index of the last arrival that was its user's first (one that names no user is its
    batch's only request)."""
    seen: set[str] = set()
    last = len(arrivals) - 1
    for i, (_, _, user) in enumerate(arrivals):
        if user is None or user not in seen:
            last = i
            if user is not None:
                seen.add(user)
    return last


def peak(arrivals: list[tuple[float, float]], window: float) -> float:
    """The most that arrived in any sliding window of ``window`` seconds (``arrivals`` sorted)."""
    best = held = 0.0
    first = 0
    for at, cost in arrivals:
        held += cost
        while arrivals[first][0] <= at - window:
            held -= arrivals[first][1]
            first += 1
        best = max(best, held)
    return best


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), *sys.argv[4:5])))
