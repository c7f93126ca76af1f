"""The task callables: the engine's steps, one Airflow task each (plan -> push per shard -> finalize).

Only small dicts travel through XCom (run id, shard numbers, counts); the plan itself is
staged in the state database. Everything heavy is imported inside the functions, so the
DAG folder parses without pandas, SQLAlchemy engines or the network.

No overlap: ``engine.begin`` (in the plan task) takes the sync's lock in ``sync_locks`` and
``finalize`` releases it, so a scheduled run, a manual run and a backfill of one sync never
push at the same time, whatever Airflow counts. The loser's plan task fails with the
holder's run id and is retried (:func:`lock_retries` times, :func:`lock_retry_delay` apart): it
waits its turn, and fails for good with the same message when the holder outlasts it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from typing import Any

log = logging.getLogger("usersync.airflow")



def lock_retries() -> int:
    """How often a run that finds its sync locked tries again (``USERSYNC_LOCK_RETRIES``, default 12)."""
    return int(os.environ.get("USERSYNC_LOCK_RETRIES", "12"))


def lock_retry_delay() -> float:
    """Seconds between those tries (``USERSYNC_LOCK_RETRY_DELAY``, default 300: an hour in all)."""
    return float(os.environ.get("USERSYNC_LOCK_RETRY_DELAY", "300"))


def push_retries() -> int:
    """How often a push task that died is tried again (``USERSYNC_PUSH_RETRIES``, default 2): its
    worker lost, killed, or the state database out of reach. The retry settles what the dead try
    had in flight (at most once: in doubt, never re-sent) and sends the rest of its shard. A
    vendor's refusal is not retried (nothing more can succeed)."""
    return int(os.environ.get("USERSYNC_PUSH_RETRIES", "2"))


def push_retry_delay() -> float:
    """Seconds before that retry (``USERSYNC_PUSH_RETRY_DELAY``, default 30)."""
    return float(os.environ.get("USERSYNC_PUSH_RETRY_DELAY", "30"))


def sender(ti) -> tuple[str, str]:
    """(worker, task) of a running task instance, as ``sync_batches`` records them: the hostname
    Airflow records for it (``[core] hostname_callable``) and ``dag_id.task_id[map_index] try n``."""
    return ti.hostname or socket.gethostname(), f"{ti.dag_id}.{ti.task_id}[{ti.map_index}] try {ti.try_number}"


def pool_slots() -> int:
    """Pushes at once per vendor credential (``USERSYNC_POOL_SLOTS``, default 4): the size of its pool."""
    return max(int(os.environ.get("USERSYNC_POOL_SLOTS", "4")), 1)


def share(sync, run_id: int):
    """This push task's share of the credential's limit (``engine.share``): the pool (one per
    credential) runs at most :func:`pool_slots` pushes at once, and the credential is shared
    when another sync in the file maps to the same pool. When a shard finishes, the others
    take up its part, a window later."""
    from connector import engine
    from connector.airflow.dags import pool_name

    mine = pool_name(sync.spec)
    shared = any(pool_name(s) == mine for s in sync.cfg.syncs if s.name != sync.spec.name)
    return engine.share(sync, run_id, pool_slots(), shared=shared)


class SyncLocked(Exception):
    """Another run of this sync holds the lock: retried (the run waits its turn)."""


def fail(message: str) -> Exception:
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(message)


def open_sync(config_path: str, name: str):
    """The sync, its config re-read and validated in the worker (not at parse time)."""
    from connector import config, engine
    from connector.config import ConfigError

    try:
        cfg, bad = config.load(config_path, strict=False)
        if name in bad:
            raise bad[name]
        return engine.open_sync(cfg, name)
    except ConfigError as e:
        raise fail(str(e)) from None


def parse_when(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    value = dt.datetime.fromisoformat(text.strip().replace(" ", "T"))
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _plain(value: Any) -> dt.datetime | None:
    """A pendulum DateTime as a plain aware datetime (database drivers know that one)."""
    if value is None:
        return None
    return dt.datetime.fromtimestamp(value.timestamp(), tz=dt.timezone.utc)


def window_of(params: dict[str, Any], run_type: str, interval: tuple[Any, Any]) -> tuple | None:
    """The cursor window: the form's, else a backfill run's data interval, else none."""
    start, end = parse_when(params.get("window_start")), parse_when(params.get("window_end"))
    if start and end and start >= end:
        raise fail(f"window_start {start.isoformat()} must be before window_end {end.isoformat()}")
    if start or end:
        return (start, end)
    if run_type == "backfill" and interval[0] is not None:
        start, end = _plain(interval[0]), _plain(interval[1])
        if start == end:
            raise fail("this backfill run has an empty data interval; the DAG's schedule must be a cron "
                        "data-interval schedule")
        return (start, end)
    return None


def options(params: dict[str, Any], run_id: str, run_type: str, interval: tuple[Any, Any]):
    """The run's ``engine.Options`` from the trigger form and the DAG run."""
    from connector import engine

    return engine.Options(full_refresh=params.get("mode") == "full", dry_run=bool(params.get("dry_run")),
                          window=window_of(params, run_type, interval), user_ids=params.get("user_ids") or None,
                          allow_large_change=bool(params.get("allow_large_change")), trigger=f"airflow:{run_id}")


GUARD_OVERRIDE = "trigger again with 'Override the blast-radius guard' ticked if this change is intended"


def plan(config_path: str, name: str, params: dict[str, Any], run_id: str, run_type: str,
         interval: tuple[Any, Any]) -> dict[str, Any]:
    """``engine.start``; returns the shards to push (and the outcome when there is none to push)."""
    from connector import engine, state
    from connector.config import ConfigError

    sync = open_sync(config_path, name)
    opts = options(params, run_id, run_type, interval)
    try:
        # not bound to this process: the lock outlives the plan task (pushes, finalize)
        started = engine.start(sync, opts, bound=False, guard_override=GUARD_OVERRIDE)
    except ConfigError as e:
        raise fail(str(e)) from None
    except state.Locked as e:
        raise SyncLocked(f"{e}. Another run of '{name}' is syncing; this run waits for it "
                         f"(retried up to {lock_retries()} times, {lock_retry_delay():g} s apart).") from None
    except state.LeaseLost as e:  # another run holds the sync now: nothing more is recorded
        raise fail(f"planning stopped: {e}") from None
    except BaseException as e:  # recorded as failed by engine.start
        raise fail(f"planning failed: {type(e).__name__}: {e}") from e
    p, run = started.plan, started.run_id
    shards = [] if started.outcome else engine.shards(sync, run)
    log.info("run %s: read %s, changed %s, %s shard(s) to push%s", run, p.users_read, p.users_changed,
             len(shards), f" - {started.error}" if started.error else "")
    window = opts.window
    return {"run_id": run, "shards": [{"run_id": run, "shard": s} for s in shards], "outcome": started.outcome,
            "error": started.error, "users_read": p.users_read, "users_changed": p.users_changed,
            "mapping_change": p.mapping.describe() if p.mapping else None,
            "window": [w.isoformat() if w else None for w in window] if window else None}


def push(config_path: str, name: str, job: dict[str, int], by: tuple[str, str | None] | None = None) -> dict[str, Any]:
    """Push one shard of the staged plan; its rate is a share of the credential's limit.
    ``by``: the (worker, task) its sync_batches rows record (see :func:`sender`).

    Each push task holds its own lease on the run's lock row (shared by the run's tasks):
    a worker that stalls past ``lock_timeout`` while another run takes the sync over starts
    no request and commits nothing once it resumes, and the task fails (not retried)."""
    from connector import engine, state
    from connector.cli import superseded

    sync = open_sync(config_path, name)
    if by:
        sync.worker, sync.task = by
    try:
        r = engine.push(sync, job["run_id"], shard=job["shard"], share=share(sync, job["run_id"]))
    except state.LeaseLost as e:
        raise fail(f"shard {job['shard']} stopped: {superseded(e)}") from None
    out = {"shard": job["shard"], "delivered": r.delivered, "rejected": r.rejected, "failed": r.failed,
           "requests": r.requests}
    log.info("run %s shard %s: %s", job["run_id"], job["shard"], out)
    if r.stopped:
        raise fail(f"shard {job['shard']}: the vendor refused the run, nothing more can succeed: {r.stopped}")
    return out


def finalize(config_path: str, name: str, planned: dict[str, Any] | None) -> dict[str, Any]:
    """The run's summary in sync_runs; fails when the run is not acceptable (so it is never green)."""
    from connector import engine, state

    if not planned or planned.get("run_id") is None:
        raise fail("the plan task did not finish (see its log): nothing was pushed")
    sync = open_sync(config_path, name)
    from connector.airflow.links import run_url

    try:
        s = engine.finalize(sync, planned["run_id"], status=planned.get("outcome"), error=planned.get("error"))
    except state.LeaseLost as e:
        raise fail(f"not finalized: {e}; the run holding the lock settled this one") from None
    log.info("%s; details: %s", s.line(), run_url(name, s.run_id))
    if not s.ok:
        raise fail(s.line())
    return s.as_json()
