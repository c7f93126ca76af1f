"""Push at each vendor's declared limit: the demo warehouse, the demo syncs, an emulator 50 ms away.

The sustained rate is requests as they arrived at the emulator on the sync's data path (or
users from ``sync_batches`` for MoEngage bulk, whose limit counts users), against the limit
in that unit. It is measured from the push's second request on: the lookups before the
push (Tencent's registered names) and the first request, which goes alone by design until it
is answered, are the run's start, not its sustained rate. Throttling is counted by the emulator.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from connector import config, demo, demo_run, engine, state
from connector.vendors import dfinery, engagelab, jiguang, moengage, tencent_im

LATENCY = 0.05
# vendor -> (declared limit a second, its unit, users for a full run: about 70 s, past a 60 s window)
LIMITS = {
    "dfinery": (dfinery.RATE_PER_MINUTE / 60, "requests", 12_000),
    "jiguang": (jiguang.QPS, "requests", 4_000),
    "tencent_im": (tencent_im.RATE_PER_SECOND, "requests", 150_000),
    "moengage": (moengage.BULK_USERS_PER_MINUTE / 60, "users", 72_000),
    "engagelab": (engagelab.RATE_LIMIT, "requests", 1_500),
}


def measure(vendor: str, workdir: Path, scale: float) -> dict:
    limit, unit, users = LIMITS[vendor]
    users = max(int(users * scale), 100)
    directory = workdir / f"push_{vendor}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "warehouse.db").unlink(missing_ok=True)
    path = demo_run.write_config(directory)
    demo.build_warehouse(f"sqlite:///{directory / 'warehouse.db'}", users=users)
    server = subprocess.Popen([sys.executable, "-m", "bench.serve", vendor, str(LATENCY), str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        os.environ[f"{vendor.upper()}_BASE_URL"] = server.stdout.readline().strip()
        cfg, _ = config.load(path)
        name = f"{vendor}_users"
        sync = engine.open_sync(cfg, name)
        run_id = engine.begin(sync, mode="incremental", trigger="bench")
        engine.plan(sync, run_id)
        t0 = time.perf_counter()
        result = engine.push(sync, run_id)
        seconds = time.perf_counter() - t0
        summary = engine.finalize(sync, run_id)
    finally:
        server.stdin.close()
        emulated = json.loads(server.stdout.readline() or "{}")
        server.wait(30)
    b = state.batches
    with state.make_engine(cfg.state_url).connect() as c:
        rows = c.execute(sa.select(b.c.sent_at, b.c.users, b.c.attempts).where(b.c.run_id == run_id)
                         .order_by(b.c.sent_at)).all()
    if unit == "users":  # users a second, from the batches (one request each)
        rate = _steady([_utc(r.sent_at).timestamp() for r in rows], [r.users for r in rows])
    else:  # requests a second, as they arrived at the vendor on its busiest path (the data)
        paths = collections.Counter(path for path, _ in emulated["arrivals"])
        data = sorted(at for path, at in emulated["arrivals"] if path == paths.most_common(1)[0][0])
        rate = _steady(data, [1] * len(data))
    out = {"users": users, "delivered": summary.users_delivered, "requests": result.requests,
           "seconds": round(seconds, 2), "rate": round(rate, 2), "unit": f"{unit}/s", "limit": limit,
           "fraction_of_limit": round(rate / limit, 4), "throttled": emulated.get("throttled"),
           "retried_batches": sum(1 for r in rows if r.attempts > 1), "status": summary.status}
    if vendor == "tencent_im":
        out["batch_fill"] = round(sum(r.users for r in rows) / (len(rows) * tencent_im.MAX_USERS), 4)
    return out


def _steady(times: list[float], amounts: list[int]) -> float:
    """What arrived after the second request, over the time since it (from the second: the
    first goes alone, and the burst starts when it is answered); 0 with fewer than three
    requests (a tiny run: nothing sustained to measure)."""
    if len(times) < 3:
        return 0.0
    return sum(amounts[2:]) / max(times[-1] - times[1], 1e-9)


def _utc(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]))))
