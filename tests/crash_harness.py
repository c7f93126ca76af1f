"""Crash harness: SIGKILL real ``usersync run`` processes, rerun, compare vendor and warehouse.

Shared by ``tests/test_crash.py`` and ``scripts/reliability.py`` (:func:`crash_figures`).
The vendor emulator runs in its own process (``python tests/crash_harness.py serve ...``,
port 0, URL on stdout), so what it holds survives the run under test being killed; the
harness reads it through ``/_emulator/state``. Each round changes about half the users in
the warehouse (points grow, lists gain an item, sets change), starts a run that is killed
at a named crash point (``USERSYNC_CRASH_AT``) or after a random delay, reruns to
completion (taking over the dead run's lock), and compares every user:

- ``double_applied``: an increment/append landed twice (vendor above the warehouse);
- ``users_lost``: something the warehouse has that the vendor lacks, not flagged;
- ``in_doubt_short``: an increment/append that was in flight when the run died and never
  arrived — the price of at-most-once, flagged as ``in_doubt`` in sync_batches/sync_failures.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import test_dfinery  # noqa: E402
import test_engagelab  # noqa: E402
import test_jiguang  # noqa: E402
from conftest import T0, USERS, dfinery_sync, make_users, user_row, write_config  # noqa: E402

from connector import state, vendors  # noqa: E402

PYTHON = sys.executable
ROOT = HERE.parent
POINTS = ("extract_chunk", "plan_staged", "after_commit", "before_send", "vendor_answered", "before_finalize")
ONCE = ("plan_staged", "before_finalize")  # reached once per run
LOCK_TIMEOUT = 1.0  # seconds: a killed run's lock is taken over quickly


@dataclasses.dataclass
class Scenario:
    vendor: str
    sync: Callable[[str], dict]  # base URL -> sync dict (credentials as ${ENV})
    env: dict[str, str]  # the secrets
    key: Callable[[dict], str]  # warehouse row -> the vendor's user key
    expected: Callable[[dict], dict]  # warehouse row -> what the vendor should hold
    first_points: Callable[[int], int] = lambda i: i * 10


SCENARIOS = {
    "jiguang": Scenario("jiguang", test_jiguang.jiguang_sync, {"TEST_JIGUANG_SECRET": test_jiguang.SECRET},
                        lambda r: str(r["numeric_id"]), test_jiguang.expected),
    "engagelab": Scenario("engagelab", test_engagelab.el_sync,
                          {"TEST_EL_KEY": test_engagelab.KEY, "TEST_EL_SECRET": test_engagelab.SECRET},
                          lambda r: str(r["numeric_id"]), test_engagelab.expected, lambda i: i * 10 + 5),
    "dfinery": Scenario("dfinery", dfinery_sync, {"TEST_DFINERY_TOKEN": "tok-secret-123"},
                        lambda r: r["user_id"], test_dfinery.expected_profile),
}


class VendorProcess:
    """One vendor emulator in a subprocess, registered and keyed for one sync."""

    def __init__(self, sync: dict, env: dict[str, str], latency: float = 0.0):
        spec = _with_env(sync, env)
        self.proc = subprocess.Popen([PYTHON, __file__, "serve", json.dumps(spec), str(latency)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"emulator did not start: {self.url!r}")

    def state(self) -> dict[str, Any]:
        return requests.get(self.url + "/_emulator/state", timeout=10).json()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _with_env(sync: dict, env: dict[str, str]) -> dict:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return json.loads(os.path.expandvars(json.dumps(sync)))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def serve(spec_json: str, latency: str) -> None:
    """``python tests/crash_harness.py serve SPEC LATENCY``: serve until killed."""
    from connector import config, emulator

    spec = config.SyncSpec.model_validate(json.loads(spec_json))
    emu = vendors.module(spec.vendor.type).emulator([spec])
    emu.latency = float(latency)
    running = emulator.Running(emu)
    print(running.url, flush=True)
    emulator.wait()


class World:
    """A warehouse, a vendor emulator process and a syncs.yaml for one scenario."""

    def __init__(self, scenario: Scenario, workdir: Path, db_url: str | None = None, users: int = 30,
                 latency: float = 0.01, lock_timeout: float = LOCK_TIMEOUT, seed: int = 0):
        self.scenario, self.rng = scenario, random.Random(seed)
        self.url = db_url or f"sqlite:///{workdir / 'warehouse.db'}"
        self.vendor = VendorProcess(scenario.sync("http://unused"), scenario.env, latency)
        self.rows = [user_row(i, points=scenario.first_points(i)) for i in range(users)]
        make_users(self.url, self.rows).dispose()
        self.name = scenario.sync("")["name"]
        sync = scenario.sync(self.vendor.url, lock_timeout=lock_timeout, chunk_size=8)
        sync["vendor"] = {**sync["vendor"], "concurrency": 4}
        self.cfg = write_config(workdir / "syncs.yaml", self.url, [sync])
        self.env = {**os.environ, **scenario.env, "PYTHONPATH": str(ROOT)}
        self.state = state.make_engine(self.url)
        self.round = self.batches_seen = 0
        self.forgiven: dict[tuple[str, str], Any] = {}  # (user, attribute) -> accepted in-doubt gap

    def close(self) -> None:
        self.vendor.stop()
        self.state.dispose()

    # -- runs ------------------------------------------------------------------------------
    def start(self, crash_at: str | None = None) -> subprocess.Popen:
        env = {**self.env, "USERSYNC_CRASH_AT": crash_at} if crash_at else self.env
        return subprocess.Popen([PYTHON, "-m", "connector", "run", self.name, "--config", str(self.cfg), "--json",
                                 "--allow-large-change"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, crash_at: str | None = None) -> subprocess.CompletedProcess:
        p = self.start(crash_at)
        out, err = p.communicate(timeout=120)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def kill_after(self, delay: float) -> bool:
        """Start a run, wait until it has begun (its sync_runs row), SIGKILL it ``delay`` s later.
        True when it was killed before it finished."""
        before = self._last_run()
        p = self.start()
        while self._last_run() == before and p.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
        p.communicate(timeout=120)
        return killed

    def complete(self) -> subprocess.CompletedProcess:
        """Rerun until a run completes: a killed run's lock is taken over after lock_timeout."""
        for _ in range(20):
            done = self.run()
            if done.returncode != 3:
                assert done.returncode == 0, done.stderr[-3000:]
                return done
            assert "locked by run" in done.stderr, done.stderr[-2000:]
            time.sleep(LOCK_TIMEOUT / 2)
        raise AssertionError("the sync stayed locked")

    def _last_run(self) -> int | None:
        with self.state.connect() as c:
            return c.execute(sa.select(sa.func.max(state.runs.c.run_id))).scalar()

    # -- the warehouse ---------------------------------------------------------------------
    def mutate(self) -> None:
        """About half the users change: points grow, lists gain an item, a set attribute moves."""
        self.round += 1
        when = T0 + dt.timedelta(hours=self.round)
        eng = sa.create_engine(self.url)
        with eng.begin() as c:
            for row in self.rows:
                if self.rng.random() < 0.5:
                    continue
                row["points"] += self.rng.randint(1, 50)
                row["interests"] = json.dumps(json.loads(row["interests"]) + [f"t{self.round}"])
                row["plan"] = self.rng.choice(["free", "pro", "enterprise", "vip"])
                row["updated_at"] = when
                c.execute(USERS.update().where(USERS.c.user_id == row["user_id"]).values(
                    points=row["points"], interests=row["interests"], plan=row["plan"], updated_at=when))
        eng.dispose()

    # -- the comparison --------------------------------------------------------------------
    def check(self) -> Counter:
        """Compare every user at the vendor with the warehouse (see the module docstring)."""
        held = self.vendor.state()
        flagged = self._in_doubt_users()
        rules = {a["attribute"]: vendors.get(self.scenario.vendor).rules[a.get("rule", "set")]
                 for a in self.scenario.sync("")["mapping"]}
        out = Counter(users=len(self.rows))
        for row in self.rows:
            key = self.scenario.key(row)
            want, got = self.scenario.expected(row), held.get(key, {})
            lost = double = short = False
            for attr in set(want) | set(got):
                w, g = want.get(attr), got.get(attr)
                if rules[attr] == "increase":  # (what is missing, was something applied twice)
                    gap, twice = (w or 0) - (g or 0), (g or 0) > (w or 0)
                elif rules[attr] in ("append", "list"):
                    gap, twice = sorted((Counter(w or []) - Counter(g or [])).elements()), bool(Counter(g or []) - Counter(w or []))
                else:
                    lost |= w != g
                    continue
                if twice:
                    double = True
                elif gap != self.forgiven.get((key, attr), type(gap)()):
                    if key in flagged:
                        short = True
                        self.forgiven[(key, attr)] = gap
                    else:
                        lost = True
            out["users_lost"] += lost
            out["double_applied"] += double
            out["in_doubt_short"] += short
        return out

    def _in_doubt_users(self) -> set[str]:
        """Users flagged in doubt since the last check (the settle names them in its batch row)."""
        b = state.batches
        with self.state.connect() as c:
            rows = c.execute(sa.select(b.c.batch_id, b.c.outcome, b.c.vendor_message)
                             .where(b.c.batch_id > self.batches_seen)).all()
        self.batches_seen = max([self.batches_seen, *(r[0] for r in rows)])
        return {k for _, outcome, text in rows if outcome == "in_doubt" for k in text.rsplit(": ", 1)[-1].split(", ")}


def crash_round(world: World, point: str | None = None, nth: int = 1, delay: float | None = None) -> Counter:
    """Change the warehouse, kill a run (named point, or ``delay`` s after it began), rerun, compare."""
    world.mutate()
    if point:
        killed = world.run(f"{point}:{nth}").returncode == -signal.SIGKILL
    else:
        killed = world.kill_after(delay or 0.0)
    world.complete()
    return world.check() + Counter(kill_points_tried=1, killed=killed)


def crash_figures(iterations: int | None = None, seed: int = 7) -> dict[str, Any]:
    """Run every vendor scenario through the named points and random kills; the totals.

    ``iterations`` random kills per vendor (default ``USERSYNC_CRASH_ITERATIONS`` or 4); the
    named points are each tried once per vendor, at a random occurrence.
    """
    n = iterations if iterations is not None else int(os.environ.get("USERSYNC_CRASH_ITERATIONS", "4"))
    rng = random.Random(seed)
    total: Counter = Counter()
    t0 = time.monotonic()
    for scenario in SCENARIOS.values():
        with tempfile.TemporaryDirectory() as tmp:
            world = World(scenario, Path(tmp), seed=rng.randrange(1 << 30))
            try:
                world.complete()
                span = _work_seconds(world)
                for point in POINTS:
                    total += crash_round(world, point, 1 if point in ONCE else rng.randint(1, 4))
                for _ in range(n):
                    total += crash_round(world, delay=rng.uniform(0, span))
                total["rounds_checked"] += world.round
            finally:
                world.close()
    return {"kill_points_tried": total["kill_points_tried"], "killed": total["killed"],
            "users_lost": total["users_lost"], "double_applied": total["double_applied"],
            "in_doubt_short": total["in_doubt_short"], "vendors": len(SCENARIOS),
            "users_checked": total["users"], "seconds": round(time.monotonic() - t0, 1)}


def intent_cost(users: int = 2000) -> dict[str, Any]:
    """What the write-ahead intent costs: one Jiguang first run of ``users`` users (one request
    each) with ``points`` mapped as accumulate, against the same run with it as overwrite."""
    from connector import config, emulator, engine
    from connector.vendors import jiguang

    out: dict[str, Any] = {"users": users}
    for label, rule in (("with_intent", "accumulate"), ("without_intent", "overwrite")):
        mapping = [{**m, "rule": rule if m["attribute"] == "points" else m.get("rule", "set")}
                   for m in test_jiguang.MAPPING if m["attribute"] != "interests"]
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/w.db"
            make_users(url, [user_row(i) for i in range(users)]).dispose()
            emu = jiguang.Emulator(project_id="proj-7", project_secret=test_jiguang.SECRET, rate_limit=None,
                                   attributes={m["attribute"]: {"type": m["type"], "rule": m["rule"]} for m in mapping})
            os.environ["TEST_JIGUANG_SECRET"] = test_jiguang.SECRET
            with emulator.Running(emu) as running:
                sync = test_jiguang.jiguang_sync(running.url, mapping=mapping)
                sync["vendor"] = {**sync["vendor"], "rate_limit": 100_000}
                cfg, _ = config.load(write_config(Path(tmp) / "syncs.yaml", url, [sync]))
                t0 = time.perf_counter()
                summary = engine.run(cfg, sync["name"])
                out[f"{label}_s"] = round(time.perf_counter() - t0, 2)
                assert summary.users_delivered == users, summary.line()
    out["intent_transactions"] = users  # one per request carrying an accumulate
    out["ms_per_intent"] = round((out["with_intent_s"] - out["without_intent_s"]) * 1000 / users, 3)
    out["overhead_pct"] = round(100 * (out["with_intent_s"] / out["without_intent_s"] - 1), 1)
    return out


def _work_seconds(world: World) -> float:
    """How long the last run took from its sync_runs row to its end: where random kills land."""
    r = state.runs
    with world.state.connect() as c:
        start, end = c.execute(sa.select(r.c.started_at, r.c.finished_at).order_by(r.c.run_id.desc()).limit(1)).one()
    return max((end - start).total_seconds(), 0.2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(*sys.argv[2:4])
    else:
        print(json.dumps(crash_figures()))
