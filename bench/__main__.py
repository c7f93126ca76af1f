"""``python -m bench [--quick | --tiny] [--out DIR]``: run every benchmark, write the results.

Sizes (full / --quick / --tiny): the plan runs on 1M / 100k / 2k users with 1% changed;
the commit compares 1M with 100k users (10% of those sizes in the other modes) with the
same changed users (1 in 10 of the small table's ids; the big table's commit of 1 in 100
of its users is measured too, as ``commit_big_spread``); the scale run plans 10M / 1M / 5k users on PostgreSQL.
The push runs for every vendor (MoEngage in both APIs) at each added latency (50, 200, 500 ms
and a long tail; --tiny: 50 ms only), about 12 s / 5 s / a hundred users each; for a vendor
whose window is a minute, the long-tail run lasts 70 s / 10 s, past one window, so its peak
window is measured. The bare read, the full plan and the incremental plan run three rounds
(one with --tiny) and count by their median round. ``--push-only`` runs the push phase alone and
keeps the other figures of the results already in ``--out`` (each part says when it ran).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from bench import push, report, warehouse

HERE = Path(__file__).resolve().parent
SIZES = {  # users, small users, scale users, push seconds (short, a minute's window), rounds of the plan phases
    "full": (1_000_000, 100_000, 10_000_000, (12, 70), 3),
    "quick": (100_000, 10_000, 1_000_000, (5, 10), 3),
    "tiny": (2_000, 200, 5_000, (0, 0), 1),
}
LONG = "lognormal"  # the latency at which a vendor with a minute's window runs past one window
PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
SYNC = "bench_users"
PROFILE: Path | None = None
RUN = uuid.uuid4().hex[:8]  # database names of this run: runs at once (a test's smoke run) never collide


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_const", const="quick", dest="mode", help="a scaled-down run")
    ap.add_argument("--tiny", action="store_const", const="tiny", dest="mode", help="seconds: the tests' smoke run")
    ap.add_argument("--out", type=Path, default=HERE, help="where results.{json,md,png} go (default: bench/)")
    ap.add_argument("--postgres", default=os.environ.get("USERSYNC_BENCH_POSTGRES_URL", PG_URL),
                    help="a PostgreSQL server URL ('' to skip PostgreSQL)")
    ap.add_argument("--vendors", default=",".join(push.VENDORS), help="vendors whose push to measure")
    ap.add_argument("--latencies", default=",".join(push.LATENCIES), help="added latencies of the push")
    ap.add_argument("--push-only", action="store_true", help="only the push; keep the other results in --out")
    ap.add_argument("--profile", type=Path, help="write a pyinstrument report of each plan phase here")
    ap.add_argument("--readme", action="store_true", help="also rewrite the figures in README.md's PERFORMANCE")
    args = ap.parse_args(argv)
    global PROFILE
    PROFILE = args.profile
    mode = args.mode or "full"
    users, small, scale, (short, long), rounds = SIZES[mode]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="usersync-bench-"))
    started, load = time.time(), os.getloadavg()
    raw: dict = {"mode": mode, "users": users, "small_users": small, "scale_users": scale, "databases": {}}
    if args.push_only:
        raw = json.loads((args.out / "results.json").read_text())["raw"]
    else:
        servers = {"sqlite": None}
        if args.postgres and _reachable(args.postgres):
            servers["postgresql"] = args.postgres
        for db, server in servers.items():
            raw["databases"][db] = database(db, server, work, users, small, rounds)
        if "postgresql" in servers:
            raw["scale"] = scaled(args.postgres, work, small, scale)
    latencies = [x for x in args.latencies.split(",") if x] if mode != "tiny" else ["50ms"]
    vendors = [v for v in args.vendors.split(",") if v]
    pushed, push_started, push_load = {v: {} for v in vendors}, time.time(), os.getloadavg()
    for latency in latencies:  # vendors interleaved with latencies: a change of load spreads over all
        for vendor in vendors:
            seconds = long if latency == LONG and push.limit(vendor).window >= 60 else short
            busy = round(os.getloadavg()[0], 2)  # the machine is shared: what else ran, run by run
            pushed[vendor][latency] = {**_child("bench.push", vendor, str(work), str(seconds), latency), "load": busy}
            print(f"  push {vendor:<15} {latency:<10} {json.dumps(pushed[vendor][latency])}", flush=True)
    raw["push"] = pushed
    raw["push_machine"] = {**_machine(push_started, push_load), "mode": mode}
    if not args.push_only:
        raw["machine"] = _machine(started, load)
    results = report.summarize(raw)
    report.write(results, args.out)
    if args.readme:
        report.readme(results, HERE.parent / "README.md")
    print(report.table(results))
    return 0


def _machine(started: float, load) -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load,
            "load_after": os.getloadavg(), "minutes": round((time.time() - started) / 60, 1),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def database(db: str, server: str | None, work: Path, users: int, small: int, rounds: int = 1) -> dict:
    """Plan vs bare read, incremental vs full scan, and the commit at two sizes, on one database.

    The bare read, the full plan and the incremental plan run ``rounds`` times, one after
    the other in each round (a planned run is closed unpushed: every round plans the same
    changes); each counts by its median round, and keeps every round's seconds. One round
    on a shared machine is a lottery: the incremental plan took 0.63 to 2.0 s, same code, same data."""
    out: dict = {}
    big = _fresh(db, server, work, "big")
    _prepare(big, users, work)
    full, incremental = warehouse.sync(SYNC, cursor=False), warehouse.sync(SYNC, cursor=True)
    runs = [{"read": _phase("read", big, full, work), "plan": _phase("plan", big, full, work),
             "incremental": _phase("plan", big, incremental, work)} for _ in range(rounds)]
    for name in ("read", "plan", "incremental"):
        ordered = sorted((r[name] for r in runs), key=lambda r: r["seconds"])
        out[name] = {**ordered[len(ordered) // 2], "rounds": [round(r[name]["seconds"], 3) for r in runs]}
    # the commit: 1 in 100 of the big table (as planned above), then the small table's own
    # changed users (1 in 10 of its ids) changed in the big one too
    out["commit_big_spread"] = _phase("commit", big, incremental, work)
    warehouse.change(big, every=100 * small // users, below=small, at=warehouse.CHANGED + dt.timedelta(days=1))
    out["commit_big"] = _phase("commit", big, incremental, work)
    little = _fresh(db, server, work, "small")
    _prepare(little, small, work, every=100 * small // users)
    out["commit_small"] = _phase("commit", little, incremental, work)
    for url in (big, little):
        _drop(db, server, url)
    return out


def scaled(server: str, work: Path, template: int, users: int) -> dict:
    """10M users on PostgreSQL: ``template`` users seeded by a real run, the rest copies of
    them under new ids, their snapshot rows copied in SQL."""
    url = _fresh("postgresql", server, work, "scale")
    spec = warehouse.sync(SYNC, cursor=True)
    warehouse.create(url, template)
    _phase("seed", url, spec, work)
    warehouse.append(url, template, users, template)
    _phase("snapshot_copy", url, spec, work, template=template)
    warehouse.change(url)
    out = {"plan": _phase("plan", url, warehouse.sync(SYNC, cursor=False), work)}
    _drop("postgresql", server, url)
    return out


def _prepare(url: str, users: int, work: Path, every: int = 100) -> None:
    """The warehouse, a first run that delivered everyone, then a day with 1 in ``every`` changed."""
    warehouse.create(url, users)
    _phase("seed", url, warehouse.sync(SYNC, cursor=True), work)
    warehouse.change(url, every=every)


def _phase(name: str, url: str, spec: dict, work: Path, **kw) -> dict:
    if PROFILE and name == "plan":
        PROFILE.mkdir(parents=True, exist_ok=True)
        kw["profile"] = str(PROFILE / f"plan-{url.rsplit('/', 1)[-1]}-{'cursor' in spec}-{time.time():.0f}.html")
    out = _child("bench.phase", json.dumps({"phase": name, "url": url, "spec": spec, "workdir": str(work), **kw}))
    print(f"  {name:<13} {url.rsplit('/', 1)[-1]:<28} {json.dumps(out)}", flush=True)
    return out


def _child(module: str, *args: str) -> dict:
    """Run a measurement in a fresh interpreter; its last stdout line is JSON."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode:
        raise RuntimeError(f"{module} {args[0][:80]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fresh(db: str, server: str | None, work: Path, label: str) -> str:
    if db == "sqlite":
        path = work / f"{label}.db"
        path.unlink(missing_ok=True)
        return f"sqlite:///{path}"
    name = f"usersync_bench_{RUN}_{label}"
    with _admin(server) as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    return sa.make_url(server).set(database=name).render_as_string(hide_password=False)


def _drop(db: str, server: str | None, url_or_name: str) -> None:
    if db != "postgresql":
        return
    name = url_or_name.rsplit("/", 1)[-1]
    with _admin(server) as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def _admin(server: str):
    return sa.create_engine(server, isolation_level="AUTOCOMMIT").connect()


def _reachable(url: str) -> bool:
    try:
        with _admin(url):
            return True
    except sa.exc.OperationalError:
        print(f"PostgreSQL at {url} is not reachable: PostgreSQL left out", file=sys.stderr)
        return False


if __name__ == "__main__":
    sys.exit(main())
