"""What runs did and committed: ``sync_runs`` (a row a run: mode, status, counts, the cursor
and mapping it commits once it succeeds), ``sync_batches`` (a row a request), ``sync_cursors``
(the watermark a sync's next incremental run reads from) and ``sync_mappings`` (the mapping the
snapshot was delivered under).

A run's status is ``running`` until ``engine.finalize`` records one of :data:`FINALIZED` (or
``dry_run``); ``abandoned`` when another run took its lock over (``lease.acquire_lock``). The
cursor and the mapping move only in the fenced transaction that records a success or a partial
success: every planned user is then delivered or kept in ``sync_failures``.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from connector.db import aware, dumps, loads, now
from connector.state.schema import cursors, mappings, runs

FINALIZED = ("success", "partial", "failed", "blocked", "skipped")  # statuses whose runs left no plan rows


def start_run(engine: Engine, sync: str, vendor: str, mode: str, trigger: str) -> int:
    with engine.begin() as c:
        res = c.execute(runs.insert().values(sync=sync, vendor=vendor, mode=mode, trigger=trigger,
                                             status="running", started_at=now(), users_read=0,
                                             users_changed=0, users_delivered=0, users_rejected=0,
                                             users_failed=0, requests=0))
        return int(res.inserted_primary_key[0])


def update_run(engine: Engine, run_id: int, **values: Any) -> None:
    with engine.begin() as c:
        record_run(c, run_id, **values)


def record_run(conn: sa.Connection, run_id: int, **values: Any) -> None:
    """Set columns of a run's row in ``conn``'s transaction (a fenced one, for a running run)."""
    conn.execute(runs.update().where(runs.c.run_id == run_id).values(**values))


def get_run(engine: Engine, run_id: int) -> dict[str, Any]:
    with engine.connect() as c:
        row = c.execute(sa.select(runs).where(runs.c.run_id == run_id)).mappings().one()
    return dict(row)


def get_mapping(engine: Engine, sync: str) -> dict[str, tuple[dict[str, str], int | None, dt.datetime]]:
    """The mapping a sync last delivered under: attribute -> (spec, since run, since when)."""
    m = mappings
    with engine.connect() as c:
        rows = c.execute(sa.select(m.c.attribute, m.c.spec, m.c.since_run, m.c.updated_at).where(m.c.sync == sync))
        return {a: (loads(s), r, aware(t)) for a, s, r, t in rows}


def remember_mapping(conn: sa.Connection, sync: str, run_id: int, specs: dict[str, dict[str, str]]) -> None:
    """Record ``specs`` as the mapping delivered, once run ``run_id``'s deliveries are: an
    attribute whose spec did not change keeps the run (and time) since which it holds."""
    m, ts = mappings, now()
    kept = {a: (s, r, t) for a, s, r, t in conn.execute(
        sa.select(m.c.attribute, m.c.spec, m.c.since_run, m.c.updated_at).where(m.c.sync == sync))}
    conn.execute(m.delete().where(m.c.sync == sync))
    rows = []
    for attr, spec in specs.items():
        old = kept.get(attr)
        same = old is not None and loads(old[0]) == spec
        rows.append({"sync": sync, "attribute": attr, "spec": dumps(spec), "since_run": old[1] if same else run_id,
                     "updated_at": old[2] if same else ts})
    if rows:
        conn.execute(m.insert(), rows)


def encode_watermark(value: Any) -> str:
    """A cursor value as JSON text that keeps its type (datetimes stay datetimes)."""
    if isinstance(value, dt.datetime):
        return dumps({"t": "datetime", "v": value.isoformat()})
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    return dumps({"t": "value", "v": value})


def decode_watermark(raw: str | None) -> Any:
    if raw is None:
        return None
    w = json.loads(raw)
    return dt.datetime.fromisoformat(w["v"]) if w["t"] == "datetime" else w["v"]


def get_watermark(engine: Engine, sync: str) -> Any:
    with engine.connect() as c:
        return decode_watermark(c.execute(sa.select(cursors.c.watermark).where(cursors.c.sync == sync)).scalar())


def set_watermark(conn: sa.Connection, sync: str, value: Any, run_id: int) -> None:
    conn.execute(cursors.delete().where(cursors.c.sync == sync))
    conn.execute(cursors.insert().values(sync=sync, watermark=encode_watermark(value), run_id=run_id, updated_at=now()))


def show_watermark(value: Any) -> str | None:
    return None if value is None else str(value)[:100]
