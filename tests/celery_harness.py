"""Scale-out on a real distributed executor: Airflow on Celery (``connector/airflow/celery_deploy.py``:
api-server, scheduler, dag-processor, two Celery workers, Redis, a PostgreSQL metadata database),
a Jiguang emulator in its own process (``crash_harness.VendorProcess``: it counts its one-second
window and answers 429 past 100 requests), a PostgreSQL warehouse of 20,000 users, 4 shards.

Shared by ``tests/test_celery.py`` (which asserts) and ``scripts/celery_figures.py`` (which
reports). Each step returns what it measured; the comparison of vendor and warehouse is
``crash_harness.World.check``'s.

Jiguang because it is one user a request at a documented 100 requests a second (so 20,000 users
are 200 s of pushing: long enough to measure a rate and to kill a worker in the middle) and has
an ``accumulate`` rule (``points``), where a request applied twice would show.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from warehouse import T0, USERS, fresh_database as _fresh_database, write_config
from crash_harness import SCENARIOS, World
from connector import state
from connector.airflow.celery_deploy import Deployment
from connector.vendors.jiguang import settings as jiguang

N_USERS = 20_000
SHARDS = 4
LIMIT = jiguang.LIMIT.count  # requests in one window, as Jiguang documents it (the emulator's window)
WINDOW = jiguang.LIMIT.window
POSTGRES = os.environ.get("USERSYNC_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
# the killed sync: a fifth of the users change (4,000: ~40 s of pushing, enough to kill a
# worker mid-push and see the survivor finish, and short enough for CI)
KILLED_SHARE = 0.2
# the tasks' retries, quick: a plan that finds the sync locked tries again every 3 s (for up to
# 6 min), a push whose worker died is retried 1 s after Airflow noticed
KNOBS = {"USERSYNC_LOCK_RETRIES": "120", "USERSYNC_LOCK_RETRY_DELAY": "3", "USERSYNC_PUSH_RETRY_DELAY": "1"}


class ScaleOut:
    """The world (warehouse, emulator process, syncs.yaml) and the deployment running it."""

    def __init__(self, workdir: Path, users: int = N_USERS):
        self.scenario = SCENARIOS["jiguang"]
        self.workdir = Path(workdir)
        self.db_url, self._drop = _fresh_database(POSTGRES)
        self.world = World(self.scenario, workdir, db_url=self.db_url, users=users)
        # the vendor runs on machines of its own, not on the client's CPUs: here it shares two
        # cores with a dozen Airflow processes, and a vendor process waiting for the CPU would
        # see requests arrive bunched that were sent evenly (root only; else as it is). Linux
        # keeps a nice value per thread: each of them, and the threads they start inherit it.
        pid = self.world.vendor.proc.pid
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), -10)
        except (PermissionError, FileNotFoundError):
            pass
        # the world's own config is tuned for quick crash loops (8-row chunks, a 1 s lock
        # timeout); this one is a sync as a user would write it, over 4 shards
        sync = self.scenario.sync(self.world.vendor.url, shards=SHARDS)
        write_config(self.world.cfg, self.world.url, [sync])
        self.dag_id = f"usersync__{self.world.name}"
        self.deployment = Deployment(workdir / "airflow", self.world.cfg, port=0,
                                     database=f"usersync_airflow_{uuid.uuid4().hex[:8]}", drop_database=True,
                                     quick_failover=True, env={**self.scenario.env, **KNOBS})
        self.scheduled: str | None = None  # the run the scheduler made when the DAG was unpaused

    def start(self) -> ScaleOut:
        self.deployment.start()
        self.deployment.wait_dag(self.dag_id)
        return self

    def close(self) -> None:
        try:
            self.deployment.stop()
        finally:
            self.world.close()
            self._drop()

    # -- the three steps -------------------------------------------------------------------
    def first_sync(self) -> dict[str, Any]:
        """Unpause the DAG: the scheduler makes its scheduled run, the first sync of every user."""
        t0 = time.time()
        self.deployment.api("PATCH", f"dags/{self.dag_id}", json={"is_paused": False})
        runs: list = []

        def made() -> bool:
            runs[:] = self.deployment.api("GET", f"dags/{self.dag_id}/dagRuns")["dag_runs"]
            return bool(runs)

        _until(made, 120, "the scheduled run")
        self.scheduled = runs[0]["dag_run_id"]
        outcome = self.deployment.wait_run(self.dag_id, self.scheduled)
        return {"dag_run": outcome, **self.run_figures(self.scheduled, t0), "check": dict(self.world.check())}

    def killed_sync(self, changed: float = KILLED_SHARE, at: float = 0.25) -> dict[str, Any]:
        """A ``changed`` share of the users change (points grow, lists gain an item, plans move);
        a manual run; the worker that sent the first batch is SIGKILLed, with its task processes,
        once it has sent ``at`` of its share. Airflow notices the dead tasks by their heartbeat
        and retries them on the other worker. A next run then re-sends what was left in doubt."""
        self.world.mutate(changed)
        t0 = time.time()
        run_id = self.trigger()
        sync_run = self._sync_run(run_id)
        victim, sent = None, 0
        while victim is None or sent < at * self._changed(sync_run) / len(self.deployment.workers):
            rows = self._batches(sync_run)
            victim = victim or (rows[0]["worker"] if rows else None)
            sent = sum(r["worker"] == victim for r in rows)
            time.sleep(0.2)
        killed_at = time.time()
        self.deployment.kill_worker(victim)
        outcome = self.deployment.wait_run(self.dag_id, run_id)
        figures = self.run_figures(run_id, t0)
        tries = self.tries(run_id)
        retried = {k: v for k, v in tries.items() if len(v) > 1}
        after = [r for r in self._batches(sync_run) if r["sent_at"].timestamp() > killed_at]
        first_retry = min((r["sent_at"].timestamp() for r in after if not r["task"].endswith("try 1")), default=None)
        follow = self.trigger()  # the next run: what the kill left in doubt goes again (at most once)
        follow_outcome = self.deployment.wait_run(self.dag_id, follow)
        return {"dag_run": outcome, **figures, "victim": victim, "killed_after_s": round(killed_at - t0, 1),
                "victim_batches_before_kill": sent, "tries": tries, "retried": retried,
                "workers_after_kill": sorted({r["worker"] for r in after}),
                "retry_started_s_after_kill": round(first_retry - killed_at, 1) if first_retry else None,
                "in_doubt": self._in_doubt(sync_run), "follow_up_run": follow_outcome,
                "check": dict(self.world.check())}

    def overlapping_runs(self, users: int = 400) -> dict[str, Any]:
        """A scheduled run, a manual run and a backfill of the sync, started together.

        Each has something to push whatever the order: the scheduled run (its own, cleared, so
        the scheduler runs it again: the next one would be due at midnight) the ``users`` whose
        plan changed since; the manual run a full resync of ``users`` others; the backfill (one
        day of the cursor) a full resync of ``users`` more. Airflow's max_active_runs keeps the
        first two apart; nothing in Airflow keeps the backfill from the others, only the lock.
        """
        rows = self.world.rows
        changed, manual, backfill = rows[:users], rows[users:2 * users], rows[2 * users:3 * users]
        eng = sa.create_engine(self.db_url)
        when = T0 + dt.timedelta(hours=self.world.round + 1)
        with eng.begin() as c:
            for row in changed:
                row["plan"], row["updated_at"] = "vip" if row["plan"] != "vip" else "free", when
                c.execute(USERS.update().where(USERS.c.user_id == row["user_id"])
                          .values(plan=row["plan"], updated_at=when))
        eng.dispose()
        before = self._last_sync_run()
        t0 = time.time()
        api = self.deployment.api
        api("POST", f"dags/{self.dag_id}/clearTaskInstances",
            json={"dag_run_id": self.scheduled, "dry_run": False, "only_failed": False, "reset_dag_runs": True})
        # user ids are values of the sync's identity column (Jiguang's cuid: numeric_id)
        m = self.trigger({"mode": "full", "user_ids": [str(r["numeric_id"]) for r in manual]})
        day = T0.replace(hour=0).strftime("%Y-%m-%dT%H:%M:%SZ")
        backfill_id = api("POST", "backfills", json={"dag_id": self.dag_id, "from_date": day, "to_date": day,
                                           "max_active_runs": 1, "reprocess_behavior": "none",
                                           "dag_run_conf": {"mode": "full",
                                                            "user_ids": [str(r["numeric_id"]) for r in backfill]}})["id"]
        started = time.time() - t0
        _until(lambda: self._backfill_run(backfill_id) is not None, 120, "the backfill's run")
        dag_runs = {"scheduled": self.scheduled, "manual": m, "backfill": self._backfill_run(backfill_id)}
        outcomes = {k: self.deployment.wait_run(self.dag_id, v) for k, v in dag_runs.items()}
        spans, refused = {}, 0
        r = state.runs
        with self.world.state.connect() as c:
            done = c.execute(sa.select(r.c.run_id, r.c.trigger, r.c.status, r.c.error)
                             .where(r.c.run_id > before)).all()
        for run_id, trigger, status, error in done:
            if status == "skipped" and "locked by run" in (error or ""):
                refused += 1
            sent = [row["sent_at"] for row in self._batches(run_id)]
            if sent:
                kind = next(k for k, v in dag_runs.items() if trigger == f"airflow:{v}")
                spans[kind] = (min(sent), max(sent), len(sent))
        return {"dag_runs": outcomes, "started_within_s": round(started, 2), "spans": spans,
                "plans_refused_by_the_lock": refused, "wall_s": round(time.time() - t0, 1),
                "check": dict(self.world.check())}

    # -- what happened ---------------------------------------------------------------------
    def trigger(self, conf: dict | None = None) -> str:
        return self.deployment.api("POST", f"dags/{self.dag_id}/dagRuns",
                                   json={"logical_date": None, "conf": conf or {}})["dag_run_id"]

    def run_figures(self, dag_run: str, t0: float) -> dict[str, Any]:
        """A DAG run's push as sync_batches and the vendor saw it."""
        sync_run = self._sync_run(dag_run)
        rows = self._batches(sync_run)
        start, end = min(r["sent_at"] for r in rows).timestamp(), max(r["sent_at"] for r in rows).timestamp()
        arrived = [q["at"] for q in requests.get(self.world.vendor.url + "/_emulator/requests", timeout=120).json()
                   if start - 1 <= q["at"] <= end + 5]
        arrived.sort()
        # what the vendor and sync_batches saw, kept beside the deployment's logs for a post-mortem
        (self.workdir / f"run-{sync_run}.json").write_text(json.dumps(
            {"arrived": arrived, "batches": rows}, default=str))
        r = state.get_run(self.world.state, sync_run)
        dr = self.deployment.api("GET", f"dags/{self.dag_id}/dagRuns/{dag_run}")
        wall = _ts(dr["end_date"]) - t0
        spread = Counter()
        for row in rows:
            spread[row["worker"]] += row["users"]
        return {
            "users": r["users_changed"], "delivered": r["users_delivered"], "status": r["status"],
            "shards": len({row["shard"] for row in rows}), "workers": dict(spread),
            "shards_by_worker": {w: sorted({row["shard"] for row in rows if row["worker"] == w}) for w in spread},
            "requests_at_vendor": len(arrived), "attempts": sum(row["attempts"] for row in rows),
            # retried attempts (the emulator injects no other faults: each was a 429) and final 429s;
            # a dead try's in-doubt rows record no attempt
            "throttled": sum(max(row["attempts"] - 1, 0) + (row["http_status"] == 429) for row in rows),
            # start to answer, as the pushes saw it: the 10 ms the emulator adds, and waiting for a CPU
            "latency_p50_ms": _quantile([row["latency_ms"] for row in rows if row["latency_ms"]], 0.5),
            "latency_p99_ms": _quantile([row["latency_ms"] for row in rows if row["latency_ms"]], 0.99),
            "push_s": round(arrived[-1] - arrived[0], 1),
            "rate": round((len(arrived) - 1) / (arrived[-1] - arrived[0]), 2),
            "rate_vs_limit": round((len(arrived) - 1) / (arrived[-1] - arrived[0]) / LIMIT, 3),
            "peak_sliding_window": peak(arrived, WINDOW), "peak_fixed_window": peak_fixed(arrived, WINDOW),
            "limit": LIMIT, "wall_s": round(wall, 1),
        }

    def tries(self, dag_run: str) -> dict[int, list[tuple[int, str, str]]]:
        """{map index: [(try, hostname, state), ...]} of the run's push tasks, every try
        (Airflow keeps the earlier ones in task_instance_history)."""
        out: dict[int, list] = {}
        eng = self.deployment.metadata()
        with eng.connect() as c:
            for table in ("task_instance_history", "task_instance"):
                for m, t, host, st in c.execute(sa.text(
                        f"SELECT map_index, try_number, hostname, state FROM {table} "
                        "WHERE dag_id = :d AND run_id = :r AND task_id = 'push'"), {"d": self.dag_id, "r": dag_run}):
                    out.setdefault(m, []).append((t, host, st))
        eng.dispose()
        return {m: sorted(set(v)) for m, v in sorted(out.items())}

    def _sync_run(self, dag_run: str, timeout: float = 300) -> int:
        """The usersync run (sync_runs) that a DAG run's plan began and kept (not a skipped try)."""
        r = state.runs
        found: list = []

        def began() -> bool:
            with self.world.state.connect() as c:
                found[:] = c.execute(sa.select(r.c.run_id).where(
                    r.c.trigger == f"airflow:{dag_run}", r.c.status != "skipped")).scalars().all()
            return bool(found)

        _until(began, timeout, f"the sync run of {dag_run}")
        return found[-1]

    def _batches(self, sync_run: int) -> list[dict[str, Any]]:
        b = state.batches
        with self.world.state.connect() as c:
            return [dict(r) for r in c.execute(sa.select(b).where(b.c.run_id == sync_run)
                                                .order_by(b.c.batch_id)).mappings()]

    def _changed(self, sync_run: int) -> int:
        """The run's changed users, once its plan has counted them."""
        _until(lambda: state.get_run(self.world.state, sync_run)["users_changed"] > 0, 300, "the plan")
        return state.get_run(self.world.state, sync_run)["users_changed"]

    def _in_doubt(self, sync_run: int) -> int:
        """Users the run flagged in doubt (the settle of a dead try writes them as in_doubt batches)."""
        b = state.batches
        with self.world.state.connect() as c:
            return c.execute(sa.select(sa.func.coalesce(sa.func.sum(b.c.users), 0)).where(
                b.c.run_id == sync_run, b.c.outcome == "in_doubt")).scalar()

    def _last_sync_run(self) -> int:
        with self.world.state.connect() as c:
            return c.execute(sa.select(sa.func.max(state.runs.c.run_id))).scalar() or 0

    def _backfill_run(self, backfill_id: int) -> str | None:
        runs = self.deployment.api("GET", f"dags/{self.dag_id}/dagRuns", params={"run_type": "backfill"})["dag_runs"]
        return next((r["dag_run_id"] for r in runs if r.get("backfill_id", backfill_id) == backfill_id), None)


def peak(times: list[float], window: float) -> int:
    """The most arrivals in any sliding window of ``window`` seconds."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def peak_fixed(times: list[float], window: float) -> int:
    """The most arrivals in one window of the vendor's kind: fixed, each starting at the first
    request after the previous one ended (as the emulator counts)."""
    best, start, count = 0, None, 0
    for t in times:
        if start is None or t - start >= window:
            start, count = t, 0
        count += 1
        best = max(best, count)
    return best


def _quantile(values: list[float], q: float) -> float | None:
    return round(sorted(values)[int(q * (len(values) - 1))], 1) if values else None


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waiting for {what}: not within {timeout:.0f} s")
        time.sleep(0.5)
