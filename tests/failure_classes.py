"""The failure classes of issue 16, each tried at random with real processes and real signals.

Shared by ``tests/test_crash.py`` (a small sample, fixed seed, in ``make test``) and
``scripts/reliability.py`` (the full loops: :func:`figures`). Every class ends in
``World.check`` (``crash_harness``): the vendor's state against what the warehouse and the
mapping's rules say it should hold, counting users lost, applied twice, short but flagged
``in_doubt``, set aside with a reason, and misaddressed.

- ``kill``: SIGKILL at a named crash point (``USERSYNC_CRASH_AT``) or after a random delay,
  every vendor, SQLite and PostgreSQL, cursor and full-scan syncs (:func:`kill_world`).
- ``back``: the same kill, then the changed values go back to what they were before the rerun
  (a flag untoggled, a plan refunded, points given back): the vendor may hold the new values
  from the killed run, and a snapshot that never learned of them sees "no change".
- ``stall``: SIGSTOP a run mid-push, wait past ``lock_timeout``, let a new run take the sync
  over, SIGCONT the stalled one — after the new holder finished or while it is mid-push —
  and count at the emulator what the stalled run sent after it resumed (:func:`stall_round`).
- ``first_start``: six different syncs started at one moment on a fresh state database
  (after their imports, released by one file): none may crash (:func:`first_start_round`).
- ``edge``: integers 2^53+1, 2^63-1, -2^63 in a BIGINT value column and large identities in
  a BIGINT identity column, both with NULLs, and increments of 17 significant digits
  (:func:`edge_world`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import signal
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from warehouse import SERVERS, T0, fresh_database as _fresh_database
from crash_harness import LOCK_TIMEOUT, ONCE, POINTS, SCENARIOS, World, crash_round, work_seconds


@contextlib.contextmanager
def database(kind: str, workdir: Path, name: str = "warehouse") -> Iterator[str]:
    """A fresh database: a SQLite file in ``workdir``, or a new database on the PostgreSQL server."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / (name + '.db')}"
        return
    url, drop = _fresh_database(SERVERS[kind])
    try:
        yield url
    finally:
        drop()


def backends() -> list[str]:
    return ["sqlite"] + (["postgresql"] if SERVERS["postgresql"] else [])


# -- kill / back ---------------------------------------------------------------------------
def kill_world(scenario: str, kind: str, cursor: bool, rng: random.Random, points=POINTS, delays: int = 1,
               backs: int = 2) -> dict[str, Counter]:
    """One world: every named point in ``points`` (a random occurrence), ``delays`` random-delay
    kills, then ``backs`` kills whose changes go back before the rerun. {"kill": .., "back": ..}."""
    out = {"kill": Counter(), "back": Counter()}
    with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp)) as url:
        world = World(SCENARIOS[scenario], Path(tmp), db_url=url, cursor=cursor, seed=rng.randrange(1 << 30))
        try:
            world.complete()
            span = work_seconds(world)
            for point in points:
                out["kill"] += crash_round(world, point, 1 if point in ONCE else rng.randint(1, 4))
            for _ in range(delays):
                out["kill"] += crash_round(world, delay=rng.uniform(0, span))
            for _ in range(backs):
                point = rng.choice(("vendor_answered", "after_commit", None))
                out["back"] += crash_round(world, point, rng.randint(1, 4), delay=rng.uniform(0, span), back=True)
        finally:
            world.close()
    return out


# -- stall -----------------------------------------------------------------------------------
def stall_round(world: World, mid_push: bool, rng: random.Random) -> Counter:
    """Stop a pushing run past its lease, let another take over, resume the stopped one (after
    the new holder finished, or while it is mid-push), rerun, compare.

    ``sent_after_resume``: the requests the stalled run started after SIGCONT — it no longer
    held the sync, so the goal is 0."""
    world.mutate()
    stalled, taker = f"a{world.round}", f"b{world.round}"
    a = world.start(tag=stalled)
    k = rng.randint(1, 4)
    while world.vendor.sent(stalled) < k and a.poll() is None:
        time.sleep(0.005)
    if a.poll() is not None:  # done before it could be stopped
        a.communicate()
        world.complete()
        return world.check() + Counter(stall_missed=1)
    a.send_signal(signal.SIGSTOP)
    try:
        time.sleep(LOCK_TIMEOUT * 1.5)  # the stopped run's heartbeat is now older than lock_timeout
        for _ in range(40):
            begun = time.time()
            b = world.start(tag=taker)
            while mid_push and world.vendor.sent(taker, begun) < 1 and b.poll() is None:
                time.sleep(0.005)
            if mid_push and b.poll() is None:
                break
            b.communicate(timeout=300)  # done (after-mode), or refused: A's lock looked alive still
            if b.returncode != 3:
                break
            time.sleep(LOCK_TIMEOUT / 2)
        holder_pushing = b.poll() is None
        resumed = time.time()
    finally:
        a.send_signal(signal.SIGCONT)
    a.communicate(timeout=300)
    if b.returncode is None:
        b.communicate(timeout=300)
    after = world.vendor.sent(stalled, resumed)
    world.complete()
    return world.check() + Counter(stalls=1, sent_after_resume=after, stalled_runs_that_sent=after > 0,
                                   resumed_while_holder_pushed=holder_pushing and mid_push)


def stall_world(scenario: str, kind: str, rounds: int, rng: random.Random) -> Counter:
    out = Counter()
    with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp)) as url:
        world = World(SCENARIOS[scenario], Path(tmp), db_url=url, users=60, latency=0.03,
                      seed=rng.randrange(1 << 30))
        try:
            world.complete()
            for i in range(rounds):
                out += stall_round(world, mid_push=i % 2 == 0, rng=rng)
        finally:
            world.close()
    return out


# -- first starts --------------------------------------------------------------------------
def first_start_round(kind: str, workdir: Path, users: int = 12) -> Counter:
    """Six syncs (every scenario) on one fresh state database, released at one moment."""
    out = Counter()
    with database(kind, workdir, "state") as state_url:
        worlds = []
        try:
            for name in SCENARIOS:
                (workdir / name).mkdir()
                worlds.append(World(SCENARIOS[name], workdir / name, users=users, state_url=state_url))
            gate = workdir / "gate"
            procs = [w.start(gate=str(gate)) for w in worlds]
            while len(list(workdir.glob("gate.*"))) < len(procs) and all(p.poll() is None for p in procs):
                time.sleep(0.01)
            gate.touch()
            crashes = []
            for w, p in zip(worlds, procs):
                _, err = p.communicate(timeout=300)
                if p.returncode != 0:
                    said = [line for line in err.splitlines()
                            if "Error" in line and not line.lstrip().startswith("(Background")] or [""]
                    crashes.append(f"{w.name}: exit {p.returncode}: {said[-1].strip()[:300]}")
            out += Counter(first_starts=len(procs), crashed=len(crashes))
            for w in worlds:
                w.complete()  # the crashed ones deliver on their rerun
                out += w.check()
            out["messages"] = crashes  # type: ignore[assignment]
        finally:
            for w in worlds:
                w.close()
    return out


# -- integer edges, 17-digit floats ------------------------------------------------------------
EDGE = sa.Table(
    "edge_users", sa.MetaData(),
    sa.Column("user_id", sa.String(40), primary_key=True),
    sa.Column("cid", sa.BigInteger, nullable=False),  # a plain numeric identity (no NULL, small)
    sa.Column("numeric_id", sa.BigInteger),  # a large numeric identity, with a NULL in the column
    sa.Column("big", sa.BigInteger),  # large integer values, with NULLs in the column
    sa.Column("amount", sa.Float),  # 17 significant digits; an increment where the vendor has one
    sa.Column("label", sa.String(40)),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)
IDS = [9100000000000007919, 2**63 - 1, 2**53 + 1, 1234567890123456789, None, 1_000_001, 1_000_002, 1_000_003]
BIG = [2**53 + 1, 2**63 - 1, -(2**63), 1234567890123456789, 7, None, 2**53 + 3, None]
AMOUNT = [1234.5678901234567, 0.30000000000000004, 98765.43210987654, 3.1415926535897931, 2.7182818284590451,
          1.0000000000000002, 123456.78901234567, 0.12345678901234568]
# the second delivery: every amount moves by a 17-digit increment, the big values shift (none goes NULL:
# with null: skip the vendor would keep the old one, and the expectation is the warehouse's value)
AMOUNT_2 = [a + d for a, d in zip(AMOUNT, [1.2345678901234567, 7.0000000000000009, 0.33333333333333331, 100.0,
                                            0.1, 9876.5432109876543, 0.011111111111111112, 5.5511151231257827e-17])]
BIG_2 = [2**63 - 1, 2**53 + 1, -(2**63) + 1, 1234567890123456788, -7, None, 2**53 + 5, 9007199254740993]
# vendor -> (identity field, its numeric?, type names for long / double / string, the increment rule or None)
EDGE_VENDORS = {
    "jiguang": ("cuid", True, ("Long", "Number", "String"), "accumulate"),
    "engagelab": ("euid", True, ("NUMBER", "NUMBER", "STRING"), "increase"),
    "dfinery": ("external_id", False, ("Long", "Double", "String"), None),
    "tencent_im": ("To_Account", False, ("Long", "Double", "String"), None),
    "moengage": ("customer_id", False, ("Long", "Number", "String"), None),
}
EDGE_PARTS = ("values", "identities", "floats")


def edge_parts(vendor: str) -> tuple[str, ...]:
    return EDGE_PARTS if EDGE_VENDORS[vendor][1] else ("values", "floats")  # text identities cannot overflow


def edge_rows() -> list[dict[str, Any]]:
    return [{"user_id": f"e{i:03d}", "cid": 2_000_000 + i, "numeric_id": IDS[i], "big": BIG[i], "amount": AMOUNT[i],
             "label": f"label {i}", "updated_at": T0} for i in range(len(IDS))]


def edge_sync(vendor: str, part: str) -> dict[str, Any]:
    """The sync's overrides for one part: which identity column, which value column and rule."""
    field, numeric, (long_, double, string), increment = EDGE_VENDORS[vendor]
    column = {"values": "big", "identities": "label", "floats": "amount"}[part]
    type_ = {"values": long_, "identities": string, "floats": double}[part]
    rule = increment if part == "floats" and increment else "set" if vendor != "jiguang" else "overwrite"
    ident = "numeric_id" if part == "identities" else "cid" if numeric else "user_id"
    return {"source": {"table": "edge_users"}, "identity": {field: ident},
            "mapping": [{"column": column, "attribute": column, "type": type_, "rule": rule}]}


def edge_world(vendor: str, kind: str, part: str) -> Counter:
    """Deliver the edge rows, move every amount by a 17-digit increment and shift the big
    values, deliver again; compare exactly after each delivery. ``runs_crashed``: a run
    that ended in a traceback (every user of it is then lost too)."""
    out = Counter()
    with tempfile.TemporaryDirectory() as tmp, database(kind, Path(tmp)) as url:
        world = World(SCENARIOS[vendor], Path(tmp), db_url=url, table=EDGE, rows=edge_rows(),
                      sync_over=edge_sync(vendor, part))
        try:
            for step in (1, 2):
                if step == 2:
                    world.write({r["user_id"]: {"amount": AMOUNT_2[i], "big": BIG_2[i], "updated_at": T0 + dt.timedelta(hours=1)}
                                 for i, r in enumerate(world.rows)})
                done = world.complete(ok=(0, 1))  # a NULL identity is set aside: a partial run
                out["runs_crashed"] += "Traceback" in done.stderr
                out += world.check()
        finally:
            world.close()
    column = {"values": BIG + BIG_2, "identities": IDS, "floats": AMOUNT + AMOUNT_2}[part]
    return Counter(values_tried=sum(v is not None for v in column)) + out


# -- the figures ---------------------------------------------------------------------------------
CLASSES = ("kill", "back", "stall", "first_start", "edge", *(f"edge_{p}" for p in EDGE_PARTS))


def _job(cls: str, label: str, seed: int) -> tuple[str, str, dict[str, Counter], float, str | None]:
    """One world of one class (run in a worker process): (class, label, {class: counts}, seconds, error)."""
    rng, t0 = random.Random(seed), time.monotonic()
    try:
        if cls == "kill":
            name, kind, mode, sample = label.split("/")
            got = kill_world(name, kind, mode == "cursor", rng, points=rng.sample(POINTS, 1) if sample == "sample"
                             else POINTS, backs=1 if sample == "sample" else 2)
        elif cls == "stall":
            name, kind, rounds = label.split("/")
            got = {"stall": stall_world(name, kind, int(rounds), rng)}
        elif cls == "first_start":
            with tempfile.TemporaryDirectory() as tmp:
                got = {"first_start": first_start_round(label.split("#")[0], Path(tmp))}
        else:
            vendor, kind, part = label.split("/")
            c = edge_world(vendor, kind, part)
            got = {"edge": c, f"edge_{part}": c}
        return cls, label, got, time.monotonic() - t0, None
    except Exception as e:  # one broken world must not hide the others' figures
        traceback.print_exc()
        return cls, label, {}, time.monotonic() - t0, f"{label}: {type(e).__name__}: {str(e)[-400:]}"


def jobs(sample: bool, seed: int) -> list[tuple[str, str, int]]:
    """Every world to try: kill (and back) for 6 scenarios x backends x {cursor, full-scan},
    each world 6 named kills + 1 random kill + 2 kills whose values go back (216 kill points
    with PostgreSQL); stalls on 3 vendors x backends, 4 each (24); 3 rounds of 6 first starts
    per backend; the edge values on all five vendors and backends. ``sample``: a few of each."""
    rng = random.Random(seed)
    out = []
    for kind in backends():
        for mode in (("cursor",) if sample else ("cursor", "full-scan")):
            out += [("kill", f"{name}/{kind}/{mode}/{'sample' if sample else 'full'}", rng.randrange(1 << 30))
                    for name in SCENARIOS]
        out += [("stall", f"{name}/{kind}/{2 if sample else 4}", rng.randrange(1 << 30))
                for name in ("jiguang", "engagelab", "dfinery")]
        out += [("first_start", f"{kind}#{i}", rng.randrange(1 << 30)) for i in range(1 if sample else 3)]
        out += [("edge", f"{vendor}/{kind}/{part}", 0) for vendor in EDGE_VENDORS for part in edge_parts(vendor)]
    return out


def figures(sample: bool = False, seed: int = 16, workers: int = 1, log=print) -> dict[str, Any]:
    """Every class over every vendor, SQLite and PostgreSQL (when its URL is set): see :func:`jobs`.
    ``workers`` > 1 runs that many worlds at once (each has its own processes and databases)."""
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.monotonic()
    counts = {cls: Counter() for cls in CLASSES}
    seconds, errors, examples = Counter(), {}, {}
    todo = jobs(sample, seed)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for cls, label, got, took, error in pool.map(_job, *zip(*todo)):
            seconds[cls] += took
            if error:
                errors.setdefault(cls, []).append(error)
            for c, counter in got.items():
                counter = Counter(counter)
                examples.setdefault(c, []).extend(counter.pop("messages", []))
                counts[c].update(counter)
            log(f"  {cls} {label} ({took:.0f} s): {error or {c: dict(v) for c, v in got.items()}}")
    out: dict[str, Any] = {}
    for cls in CLASSES:
        out[cls] = {**dict(sorted(counts[cls].items())), "errors": errors.get(cls, []),
                    "examples": examples.get(cls, [])[:6], "seconds": round(seconds[cls.split("_")[0]
                                                                              if cls.startswith("edge") else cls], 1)}
    out["back"]["seconds"] = None  # the back rounds run in the kill worlds: their time is in kill's
    # the back class kills too: both count towards the kill points tried
    out["kill_points_tried"] = counts["kill"]["kill_points_tried"] + counts["back"]["kill_points_tried"]
    out["backends"], out["scenarios"], out["seed"], out["workers"] = backends(), list(SCENARIOS), seed, workers
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(figures(sample="--sample" in sys.argv, workers=int(os.environ.get("USERSYNC_CRASH_WORKERS", "1"))),
                     indent=1, default=str))
