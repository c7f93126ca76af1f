"""What the runs did, read from the sync tables: the one query layer under ``usersync status``
and the Airflow "Syncs" pages (``connector.airflow.ui``).

Plain rows (dicts) out, nothing rendered here. Read-only: nothing is created or written, so
a page open on a state database never changes it; a database without the sync tables yet
reads as "no runs". Every per-run query is also bounded by its sync, so a caller allowed to
read one sync cannot reach another sync's rows through a run id.
"""

from __future__ import annotations

import collections
import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from connector import db, state

FAILURE_CLASSES = ("invalid", "rejected", "retryable", "in_doubt")
BATCH_COLUMNS = ("batch_id", "shard", "users", "first_user", "attributes", "http_status", "vendor_code",
                 "vendor_message", "attempts", "latency_ms", "outcome", "sent_at")
FAILURE_COLUMNS = ("user_key", "attribute", "error_class", "code", "message", "attempts", "first_seen", "last_seen", "run_id")


def has_tables(eng: Engine) -> bool:
    return sa.inspect(eng).has_table(state.runs.name)


def recent_runs(eng: Engine, sync: str | None = None, limit: int = 10, offset: int = 0) -> list[dict[str, Any]]:
    """The latest runs (newest first), of one sync or all."""
    r = state.runs
    q = sa.select(r).order_by(r.c.run_id.desc()).limit(limit).offset(offset)
    if sync:
        q = q.where(r.c.sync == sync)
    with eng.connect() as c:
        return [_run(row) for row in c.execute(q).mappings()]


def count_runs(eng: Engine, sync: str) -> int:
    r = state.runs
    with eng.connect() as c:
        return c.execute(sa.select(sa.func.count()).where(r.c.sync == sync)).scalar_one()


def get_run(eng: Engine, sync: str, run_id: int) -> dict[str, Any] | None:
    """One run of this sync (None: no such run, or it belongs to another sync)."""
    r = state.runs
    with eng.connect() as c:
        row = c.execute(sa.select(r).where(r.c.run_id == run_id, r.c.sync == sync)).mappings().first()
    return _run(row) if row else None


def run_of_dag_run(eng: Engine, sync: str, dag_run_id: str) -> int | None:
    """The sync run an Airflow DAG run recorded (its plan task's ``airflow:<run id>`` trigger).
    A plan retried while the sync was locked leaves ``skipped`` runs: the one that went on wins."""
    r = state.runs
    q = (sa.select(r.c.run_id).where(r.c.sync == sync, r.c.trigger == f"airflow:{dag_run_id}"[:250])
         .order_by((r.c.status == "skipped").asc(), r.c.run_id.desc()).limit(1))
    with eng.connect() as c:
        return c.execute(q).scalar()


def batch_outcomes(eng: Engine, run_id: int) -> list[tuple[str, int, int]]:
    """(outcome, batches, attempts) of a run's batches."""
    b = state.batches
    with eng.connect() as c:
        return [tuple(x) for x in c.execute(sa.select(b.c.outcome, sa.func.count(), sa.func.sum(b.c.attempts))
                                              .where(b.c.run_id == run_id).group_by(b.c.outcome))]


def recent_failures(eng: Engine, sync: str | None = None, limit: int = 5) -> list[dict[str, Any]]:
    """The users failing most recently (newest first), of one sync or all."""
    f = state.failures
    q = sa.select(f.c.sync, f.c.user_key, f.c.attribute, f.c.error_class, f.c.code, f.c.message).order_by(
        f.c.last_seen.desc()).limit(limit)
    if sync:
        q = q.where(f.c.sync == sync)
    with eng.connect() as c:
        return [dict(row) for row in c.execute(q).mappings()]


def overview(eng: Engine, sync: str) -> dict[str, Any]:
    """A sync at a glance: its last run, users in the snapshot, open failures, watermark."""
    if not has_tables(eng):
        return {"last_run": None, "snapshot_users": 0, "open_failures": 0, "watermark": None}
    s, f, cur = state.snapshot, state.failures, state.cursors
    with eng.connect() as c:
        users = c.execute(sa.select(sa.func.count()).where(s.c.sync == sync)).scalar_one()
        failing = c.execute(sa.select(sa.func.count()).where(f.c.sync == sync)).scalar_one()
        raw = c.execute(sa.select(cur.c.watermark).where(cur.c.sync == sync)).scalar()
    last = recent_runs(eng, sync, limit=1)
    return {"last_run": last[0] if last else None, "snapshot_users": users, "open_failures": failing,
            "watermark": state.show_watermark(state.decode_watermark(raw))}


def batches(eng: Engine, sync: str, run_id: int, limit: int = 50, offset: int = 0) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a run's batches, oldest first. The table is reflected, so columns a
    newer schema adds (e.g. the worker that sent a batch) are shown when present."""
    b = sa.Table(state.batches.name, sa.MetaData(), autoload_with=eng)
    columns = [c for c in BATCH_COLUMNS if c in b.c] + [c.name for c in b.c if c.name.startswith("worker")]
    q = (sa.select(*(b.c[c] for c in columns)).where(b.c.run_id == run_id, b.c.sync == sync)
         .order_by(b.c.batch_id).limit(limit).offset(offset))
    with eng.connect() as c:
        return columns, [dict(row) for row in c.execute(q).mappings()]


def count_batches(eng: Engine, sync: str, run_id: int) -> int:
    b = state.batches
    with eng.connect() as c:
        return c.execute(sa.select(sa.func.count()).where(b.c.run_id == run_id, b.c.sync == sync)).scalar_one()


def _failure_filter(sync: str, run_id: int, error_class: str | None, code: str | None) -> list:
    f = state.failures
    where = [f.c.sync == sync, f.c.run_id == run_id]
    if error_class:
        where.append(f.c.error_class == error_class)
    if code:
        where.append(f.c.code == code)
    return where


def failures(eng: Engine, sync: str, run_id: int, *, error_class: str | None = None, code: str | None = None,
             limit: int | None = 50, offset: int = 0) -> list[dict[str, Any]]:
    """The users still failing as of this run (``sync_failures`` keeps a user's latest failure
    until it is delivered), ordered by user key; ``limit`` None: all of them."""
    f = state.failures
    q = (sa.select(*(f.c[c] for c in FAILURE_COLUMNS)).where(*_failure_filter(sync, run_id, error_class, code))
         .order_by(f.c.user_key, f.c.attribute).offset(offset))
    if limit is not None:
        q = q.limit(limit)
    with eng.connect() as c:
        return [dict(row) for row in c.execute(q).mappings()]


def count_failures(eng: Engine, sync: str, run_id: int, *, error_class: str | None = None,
                   code: str | None = None) -> int:
    with eng.connect() as c:
        return c.execute(sa.select(sa.func.count()).select_from(state.failures)
                         .where(*_failure_filter(sync, run_id, error_class, code))).scalar_one()


def failure_codes(eng: Engine, sync: str, run_id: int) -> dict[str, list[str]]:
    """The classes and codes present among a run's failures (for the filters)."""
    f = state.failures
    with eng.connect() as c:
        rows = c.execute(sa.select(f.c.error_class, f.c.code).distinct().where(f.c.sync == sync, f.c.run_id == run_id))
        pairs = list(rows)
    return {"classes": sorted({k for k, _ in pairs}), "codes": sorted({c for _, c in pairs if c})}


def dry_run_plan(eng: Engine, run_id: int, samples: int = 5) -> dict[str, Any]:
    """A dry run's staged plan (dry runs keep their ``sync_plan`` rows): changes per
    attribute and a few users' operations. Read in key order, a page at a time."""
    p = state.plan
    per_attribute: collections.Counter[str] = collections.Counter()
    sample, users, after = [], 0, None
    with eng.connect() as c:
        while True:
            q = sa.select(p.c.user_key, p.c.identity, p.c.ops).where(p.c.run_id == run_id)
            q = q.where(p.c.user_key > after) if after is not None else q
            rows = c.execute(q.order_by(p.c.user_key).limit(5000)).all()
            if not rows:
                break
            for key, identity, ops in rows:
                ops = db.loads(ops)
                users += 1
                per_attribute.update(attr for attr, *_ in ops)
                if len(sample) < samples:
                    sample.append({"user_key": key, "identity": db.loads(identity),
                                   "ops": [{"attribute": a, "op": o, "value": v} for a, o, v in ops]})
            after = rows[-1][0]
    return {"users": users, "per_attribute": per_attribute.most_common(), "samples": sample}


def trigger_kind(trigger: str) -> str:
    """What started a run: scheduled / manual / backfill / asset (Airflow DAG runs, by their
    run id's prefix), cli, or the trigger itself."""
    if trigger.startswith("airflow:"):
        kind = trigger[8:].split("__", 1)[0]
        return {"asset_triggered": "asset", "dataset_triggered": "asset"}.get(kind, kind)
    return "cli" if trigger == "cli" or trigger.startswith("cli:") else trigger


def _run(row) -> dict[str, Any]:
    run = dict(row)
    run["trigger_kind"] = trigger_kind(run["trigger"])
    raw = run.get("watermark_to")  # stored typed ({"t": ..., "v": ...}); shown as the value
    run["watermark_next"] = state.show_watermark(state.decode_watermark(raw)) if raw else None
    start, end = run.get("started_at"), run.get("finished_at")
    run["duration_s"] = round((_aware(end) - _aware(start)).total_seconds(), 1) if start and end else None
    return run


def _aware(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)
