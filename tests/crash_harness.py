"""Crash harness: SIGKILL real ``usersync run`` processes, rerun, compare vendor and warehouse.

Shared by ``tests/test_crash.py`` and ``scripts/reliability.py`` (:func:`crash_figures`,
:func:`reliability_figures`). The vendor emulator runs in its own process (``python
tests/crash_harness.py serve ...``, port 0, URL on stdout), so what it holds survives the run
under test being killed; the harness reads it through ``/_emulator/state``. Each round changes
about half the users in the warehouse (points grow, lists gain an item, sets change), starts a
run that is killed at a named crash point (``USERSYNC_CRASH_AT``) or after a random delay,
reruns to completion (taking over the dead run's lock), and compares every user:

- ``double_applied``: an increment/append landed twice (vendor above the warehouse);
- ``users_lost``: something the warehouse has that the vendor lacks, not flagged;
- ``in_doubt_short``: an increment/append that was in flight when the run died and never
  arrived — the price of at-most-once, flagged as ``in_doubt`` in sync_batches/sync_failures.

What the vendor should hold is derived from the sync's own mapping (:func:`expected`): each
mapped column's warehouse value in the vendor type's wire form (:func:`wire`), and per rule —
``set``: the current value; ``increase``: the current value (the sum of every delta sent,
starting from nothing); ``append``: the items added over time (the harness only ever adds
fresh items, so: the current list); ``list``: the current list; ``once``: the first value
(the harness never changes a ``once`` column). NULL with ``null: skip`` leaves the attribute
absent (the harness never NULLs a value once set). The failure classes themselves (stalls,
values that go back, first starts, integer edges) are in ``tests/failure_classes.py``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import json
import math
import os
import random
import re
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

from vendor_cases import CASES, jiguang as jg_case  # noqa: E402
from warehouse import T0, USERS, make_users, user_row, write_config  # noqa: E402

from connector import state, vendors  # noqa: E402

PYTHON = sys.executable
ROOT = HERE.parent
POINTS = ("extract_chunk", "plan_staged", "after_commit", "before_send", "vendor_answered", "before_finalize")
ONCE = ("plan_staged", "before_finalize")  # reached once per run
LOCK_TIMEOUT = 1.0  # seconds: a killed run's lock is taken over quickly


@dataclasses.dataclass
class Scenario:
    vendor: str
    sync: Callable[..., dict]  # base URL -> sync dict (credentials as ${ENV})
    env: dict[str, str]  # the secrets
    key: Callable[[dict], str] | None = None  # warehouse row -> the vendor's user key (default: the identity column)
    expected: Callable[[dict], dict] | None = None  # warehouse row -> what the vendor holds (default: from the mapping)
    first_points: Callable[[int], int] = lambda i: i * 10
    users: int = 30  # a world's default size: enough users for several requests a run

    def mapping(self) -> list[dict]:
        return self.sync("")["mapping"]

    def user_key(self, row: dict, sync: dict | None = None) -> str | None:
        if self.key and sync is None:
            return self.key(row)
        value = row[identity_column(sync or self.sync(""))]
        return None if value is None else str(value)

    def want(self, row: dict, mapping: list[dict] | None = None) -> dict:
        if self.expected and mapping is None:
            return self.expected(row)
        return expected(self.vendor, mapping or self.mapping(), row)

    def rules(self, mapping: list[dict] | None = None) -> dict[str, str]:
        """attribute -> the engine rule (set / increase / append / list / once)."""
        return {a["attribute"]: vendors.get(self.vendor).rules[a.get("rule", "set")] for a in mapping or self.mapping()}


def identity_column(sync: dict) -> str:
    ident = sync["identity"]
    return next(iter(ident.values())) if isinstance(ident, dict) else ident if isinstance(ident, str) else ident[0]


# -- what the vendor should hold ----------------------------------------------------------
def wire(vendor: str, type_: str, value: Any) -> Any:
    """A warehouse value as the vendor stores it, for the vendor type ``type_``.

    Only the type's declared facts are read from the vendor module (its kind, date format,
    booleans as 0/1); the conversion is written out here, independently of connector.coerce.
    Integers stay Python ints (exact at any size, in a double type too), floats keep every digit:
    a value the vendor cannot hold exactly must be set aside, never rounded (issue 16 §3)."""
    c = vendors.get(vendor).types[type_.lower()]
    if c.kind == "list":
        return json.loads(value) if isinstance(value, str) else list(value)
    if c.kind in ("datetime", "date"):
        if not isinstance(value, dt.datetime):
            value = dt.datetime.combine(value, dt.time())
        fmt = c.fmt.replace("%3f", f"{value.microsecond // 1000:03d}")
        out: Any = value.strftime(fmt)
    elif c.kind == "boolean":
        out = int(bool(value)) if c.bool_as_int else bool(value)
    elif c.kind == "long":
        out = int(value)
    elif c.kind == "double":  # a JSON number holds any integer exactly: expect the integer itself
        out = value if isinstance(value, int) and not isinstance(value, bool) else float(value)
    else:
        out = str(value)
    if vendor == "tencent_im":  # Tencent holds strings only
        out = {bool: lambda b: "true" if b else "false", float: repr}.get(type(out), str)(out)
    return out


def expected(vendor: str, mapping: list[dict], row: dict) -> dict:
    """What the vendor should hold for one warehouse row, from the mapping's rules (module docstring)."""
    rules = vendors.get(vendor).rules
    out = {}
    for a in mapping:
        value = row[a["column"]]
        if value is None:
            continue  # null: skip (the harness never NULLs a value the vendor holds)
        out[a["attribute"]] = wire(vendor, a["type"], value)
        if rules[a.get("rule", "set")] in ("increase", "append", "list") and not out[a["attribute"]]:
            del out[a["attribute"]]  # nothing to add: never sent
    return out


def compare(rule: str, want: Any, got: Any) -> tuple[Any, bool]:
    """(what is missing at the vendor, was something applied twice) for an increase / append / list.

    Increases are compared exactly for integers and to 4 ulps for floats (the vendor's own
    float additions); the vendor above the warehouse by half a unit or more is a double."""
    if rule == "increase":
        w, g = want or 0, got or 0
        if isinstance(w, float) or isinstance(g, float):
            if abs(w - g) <= 4 * math.ulp(max(abs(w), abs(g))):
                return 0, False
        return (0, True) if g - w >= 0.5 else (w - g, False)
    have, need = Counter(got or []), Counter(want or [])
    return sorted((need - have).elements()), bool(have - need)


SCENARIOS = {name: Scenario(case.vendor, case.sync, case.env, first_points=case.first_points, users=case.users)
             for name, case in CASES.items()}


class VendorProcess:
    """One vendor emulator in a subprocess, registered and keyed for one sync.

    A run can be told apart at the emulator by its base URL: ``url_for(tag)`` is the URL with
    a ``/_run/<tag>`` prefix, which the emulator strips, recording ``tag`` with the request
    (:meth:`sent`)."""

    def __init__(self, sync: dict, env: dict[str, str], latency: float = 0.0):
        spec = _with_env(sync, env)
        self.proc = subprocess.Popen([PYTHON, __file__, "serve", json.dumps(spec), str(latency)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"emulator did not start: {self.url!r}")

    def url_for(self, tag: str) -> str:
        return f"{self.url}/_run/{tag}"

    def state(self) -> dict[str, Any]:
        return requests.get(self.url + "/_emulator/state", timeout=30).json()

    def sent(self, tag: str, after: float = 0.0) -> int:
        """Requests received from runs with this URL tag at or after ``after`` (epoch seconds)."""
        return requests.get(f"{self.url}/_harness/sent", params={"tag": tag, "after": after}, timeout=30).json()["n"]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


TAG = "x-harness-run"
_TAGGED = re.compile(r"^/_run/([^/]+)(/.*)$")


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
    from connector import config
    from connector.vendors import emulator

    # No cyclic garbage collector in the vendor's process: it keeps every request it saw, and a
    # full collection over that log (50 ms for 20,000 of them idle, 250 ms on two busy cores)
    # holds the GIL, so the requests that came in meanwhile are stamped, and counted against
    # the window, as arriving all at once. Reference counting frees what a request leaves.
    gc.disable()

    spec = config.SyncSpec.model_validate(json.loads(spec_json))
    emu = vendors.emulator_module(spec.vendor.type).emulator([spec])
    emu.latency = float(latency)
    routed, arrived = emu.handle, {}

    def handle(req, *more):  # /_run/<tag>/path -> /path, the tag kept in the logged headers
        if req.path == "/_harness/sent":  # how many requests a tag sent since a moment
            at = arrived.get(req.query["tag"], [])
            return 200, {"n": sum(1 for t in at if t >= float(req.query["after"]))}, {}
        m = _TAGGED.match(req.path)
        if m:
            req.headers[TAG], req.path = m.group(1), m.group(2)
            arrived.setdefault(m.group(1), []).append(time.time())
        return routed(req, *more)

    emu.handle = handle
    running = emulator.Running(emu)
    print(running.url, flush=True)
    emulator.wait()


def gate(gate_file: str, *argv: str) -> None:
    """``python tests/crash_harness.py gate FILE usersync-args...``: import the CLI, say so
    (FILE.<pid>), wait for FILE to exist, then run — so that several runs start at one moment."""
    from connector import cli

    Path(f"{gate_file}.{os.getpid()}").touch()
    while not os.path.exists(gate_file):
        time.sleep(0.005)
    raise SystemExit(cli.main(list(argv)))


class World:
    """A warehouse, a vendor emulator process and a syncs.yaml for one scenario.

    ``db_url``: the warehouse (and state) database, default SQLite in ``workdir``;
    ``state_url``: a separate state database; ``cursor=False``: a full-scan sync (every run
    reads every row); ``table``/``rows``: another warehouse table than conftest's users."""

    def __init__(self, scenario: Scenario, workdir: Path, db_url: str | None = None, users: int | None = None,
                 latency: float = 0.01, lock_timeout: float = LOCK_TIMEOUT, seed: int = 0, *,
                 cursor: bool = True, state_url: str | None = None, table: sa.Table = USERS,
                 rows: list[dict] | None = None, sync_over: dict | None = None):
        self.scenario, self.rng, self.workdir = scenario, random.Random(seed), workdir
        self.url = db_url or f"sqlite:///{workdir / 'warehouse.db'}"
        self.state_url = state_url
        self.table = table
        self.rows = rows if rows is not None else [user_row(i, points=scenario.first_points(i)) for i in range(users or scenario.users)]
        eng = sa.create_engine(self.url)
        table.drop(eng, checkfirst=True)
        table.create(eng)
        with eng.begin() as c:
            c.execute(table.insert(), self.rows)
        eng.dispose()
        self.sync_dict = scenario.sync("http://unused", lock_timeout=lock_timeout, chunk_size=8, **(sync_over or {}))
        if not cursor:
            self.sync_dict.pop("cursor", None)
        self.sync_dict["vendor"] = {**self.sync_dict["vendor"], "concurrency": 4}
        self.name = self.sync_dict["name"]
        self.vendor = VendorProcess(self.sync_dict, scenario.env, latency)
        self.configs: dict[str, Path] = {}
        self.cfg = self.config_for("main")
        self.env = {**os.environ, **scenario.env, "PYTHONPATH": str(ROOT)}
        self.state = state.make_engine(state_url or self.url)
        self.round = self.batches_seen = 0
        self.forgiven: dict[tuple[str, str], Any] = {}  # (user, attribute) -> accepted in-doubt gap

    def close(self) -> None:
        self.vendor.stop()
        self.state.dispose()

    def config_for(self, tag: str) -> Path:
        """The syncs.yaml whose vendor URL carries ``tag`` (see VendorProcess)."""
        if tag not in self.configs:
            sync = {**self.sync_dict, "vendor": {**self.sync_dict["vendor"], "base_url": self.vendor.url_for(tag)}}
            self.configs[tag] = write_config(self.workdir / f"syncs.{self.name}.{tag}.yaml", self.url, [sync],
                                             self.state_url)
        return self.configs[tag]

    # -- runs ------------------------------------------------------------------------------
    def start(self, crash_at: str | None = None, tag: str = "main", gate: str | None = None) -> subprocess.Popen:
        env = {**self.env, "USERSYNC_CRASH_AT": crash_at} if crash_at else self.env
        args = ["run", self.name, "--config", str(self.config_for(tag)), "--json", "--allow-large-change"]
        cmd = [PYTHON, __file__, "gate", gate, *args] if gate else [PYTHON, "-m", "connector", *args]
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, crash_at: str | None = None, tag: str = "main") -> subprocess.CompletedProcess:
        p = self.start(crash_at, tag)
        out, err = p.communicate(timeout=300)
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
        p.communicate(timeout=300)
        return killed

    def complete(self, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
        """Rerun until a run completes: a killed run's lock is taken over after lock_timeout."""
        for _ in range(40):
            done = self.run()
            if done.returncode != 3:
                assert done.returncode in ok, done.stderr[-3000:]
                return done
            assert "locked by run" in done.stderr, done.stderr[-2000:]
            time.sleep(LOCK_TIMEOUT / 2)
        raise AssertionError("the sync stayed locked")

    def _last_run(self) -> int | None:
        r = state.runs
        try:
            with self.state.connect() as c:
                return c.execute(sa.select(sa.func.max(r.c.run_id)).where(r.c.sync == self.name)).scalar()
        except sa.exc.DBAPIError:  # the sync tables not created yet
            return None

    # -- the warehouse ---------------------------------------------------------------------
    def write(self, changes: dict[str, dict[str, Any]]) -> None:
        """Apply ``{user_id: {column: value}}`` to the warehouse and to ``self.rows``."""
        by_id = {r["user_id"]: r for r in self.rows}
        eng = sa.create_engine(self.url)
        with eng.begin() as c:
            for user_id, values in changes.items():
                by_id[user_id].update(values)
                c.execute(self.table.update().where(self.table.c.user_id == user_id).values(**values))
        eng.dispose()

    def mutate(self, share: float = 0.5) -> dict[str, dict[str, Any]]:
        """About ``share`` of the users change: points grow, lists gain an item, plan and the flag
        move. Returns what each changed user had before (see :meth:`go_back`)."""
        self.round += 1
        when = T0 + dt.timedelta(hours=self.round)
        changes, before = {}, {}
        for row in self.rows:
            if self.rng.random() < 1 - share:
                continue
            before[row["user_id"]] = {k: row[k] for k in ("points", "plan", "subscribed", "orders")}
            changes[row["user_id"]] = {
                "points": row["points"] + self.rng.randint(1, 50),
                "interests": json.dumps(json.loads(row["interests"]) + [f"t{self.round}"]),
                "plan": self.rng.choice([p for p in ("free", "pro", "enterprise", "vip") if p != row["plan"]]),
                "subscribed": not row["subscribed"], "orders": row["orders"] + 1, "updated_at": when}
        self.write(changes)
        return before

    def go_back(self, before: dict[str, dict[str, Any]]) -> None:
        """The values ``mutate`` changed go back to what they were (a flag untoggled, a plan
        refunded, points given back) — a later update, so the cursor sees it. Lists keep
        their items (an append attribute cannot take an item back)."""
        self.round += 1
        when = T0 + dt.timedelta(hours=self.round)
        self.write({u: {**old, "updated_at": when} for u, old in before.items()})

    # -- the comparison --------------------------------------------------------------------
    def check(self) -> Counter:
        """Compare every user at the vendor with the warehouse (see the module docstring).

        Also counts ``set_aside`` (a user the vendor lacks or differs on, with an open
        invalid/rejected failure naming the reason: exact-or-set-aside) and ``misaddressed``
        (a user key the vendor holds that no warehouse row has: an identity that changed)."""
        held = {str(k): v for k, v in self.vendor.state().items()}
        flagged = self._in_doubt_users()
        aside = self._set_aside()
        mapping = self.sync_dict["mapping"]
        rules = self.scenario.rules(mapping)
        out = Counter(users=len(self.rows))
        keys = set()
        for row in self.rows:
            key = self.scenario.user_key(row, self.sync_dict)
            if key is None:  # no identity: can only be set aside
                continue
            keys.add(key)
            want, got = self.scenario.want(row, mapping), held.get(key, {})
            lost = double = short = False
            for attr in set(want) | set(got):
                w, g = want.get(attr), got.get(attr)
                if rules[attr] not in ("increase", "append", "list"):
                    lost |= w != g
                    continue
                gap, twice = compare(rules[attr], w, g)
                if twice:
                    double = True
                elif gap != self.forgiven.get((key, attr), type(gap)()):
                    if key in flagged:
                        short = True
                        self.forgiven[(key, attr)] = gap
                    else:
                        lost = True
            if lost and key in aside:
                out["set_aside"] += 1
                lost = False
            out["users_lost"] += lost
            out["double_applied"] += double
            out["in_doubt_short"] += short
        out["misaddressed"] += len(set(held) - keys)
        return out

    def _in_doubt_users(self) -> set[str]:
        """Users flagged in doubt since the last check (the settle names them in its batch row)."""
        b, r = state.batches, state.runs
        with self.state.connect() as c:
            rows = c.execute(sa.select(b.c.batch_id, b.c.outcome, b.c.vendor_message).where(
                b.c.batch_id > self.batches_seen,
                b.c.run_id.in_(sa.select(r.c.run_id).where(r.c.sync == self.name)))).all()
        self.batches_seen = max([self.batches_seen, *(r[0] for r in rows)])
        return {k for _, outcome, text in rows if outcome == "in_doubt" for k in text.rsplit(": ", 1)[-1].split(", ")}

    def _set_aside(self) -> set[str]:
        f = state.failures
        with self.state.connect() as c:
            return set(c.execute(sa.select(f.c.user_key).where(
                f.c.sync == self.name, f.c.error_class.in_(["invalid", "rejected"]))).scalars())


def crash_round(world: World, point: str | None = None, nth: int = 1, delay: float | None = None,
                back: bool = False) -> Counter:
    """Change the warehouse, kill a run (named point, or ``delay`` s after it began), rerun, compare.

    ``back``: between the kill and the rerun the changed values go back to what they were —
    the vendor may hold the new ones from the killed run, and only a rerun that knows it
    may have sent them puts the vendor right."""
    before = world.mutate()
    if point:
        killed = world.run(f"{point}:{nth}").returncode == -signal.SIGKILL
    else:
        killed = world.kill_after(delay or 0.0)
    if back:
        world.go_back(before)
    world.complete()
    return world.check() + Counter(kill_points_tried=1, killed=killed)


def crash_figures(iterations: int | None = None, seed: int = 7) -> dict[str, Any]:
    """Run every vendor scenario (SQLite) through the named points and random kills; the totals.

    ``iterations`` random kills per vendor (default ``USERSYNC_CRASH_ITERATIONS`` or 4); the
    named points are each tried once per vendor, at a random occurrence. The failure classes
    over SQLite and PostgreSQL, cursor and full-scan syncs: ``failure_classes.figures``."""
    n = iterations if iterations is not None else int(os.environ.get("USERSYNC_CRASH_ITERATIONS", "4"))
    rng = random.Random(seed)
    total: Counter = Counter()
    t0 = time.monotonic()
    for scenario in SCENARIOS.values():
        with tempfile.TemporaryDirectory() as tmp:
            world = World(scenario, Path(tmp), seed=rng.randrange(1 << 30))
            try:
                world.complete()
                span = work_seconds(world)
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
    from connector import config, engine
    from connector.vendors import emulator
    from connector.vendors.jiguang import emulator as jiguang

    out: dict[str, Any] = {"users": users}
    for label, rule in (("with_intent", "accumulate"), ("without_intent", "overwrite")):
        mapping = [{**m, "rule": rule if m["attribute"] == "points" else m.get("rule", "set")}
                   for m in jg_case.MAPPING if m["attribute"] != "interests"]
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/w.db"
            make_users(url, [user_row(i) for i in range(users)]).dispose()
            emu = jiguang.Emulator(project_id="proj-7", project_secret=jg_case.SECRET, rate_limit=None,
                                   attributes={m["attribute"]: {"type": m["type"], "rule": m["rule"]} for m in mapping})
            os.environ["TEST_JIGUANG_SECRET"] = jg_case.SECRET
            with emulator.Running(emu) as running:
                sync = jg_case.jiguang_sync(running.url, mapping=mapping)
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


def work_seconds(world: World) -> float:
    """How long the last run took from its sync_runs row to its end: where random kills land."""
    r = state.runs
    with world.state.connect() as c:
        start, end = c.execute(sa.select(r.c.started_at, r.c.finished_at).where(r.c.sync == world.name)
                               .order_by(r.c.run_id.desc()).limit(1)).one()
    return max((end - start).total_seconds(), 0.2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(*sys.argv[2:4])
    elif sys.argv[1:2] == ["gate"]:
        gate(*sys.argv[2:])
    else:
        print(json.dumps(crash_figures()))
