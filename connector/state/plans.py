"""``sync_plan``: a run's staged changes, one row a user, and the state machine they go through.

    pending ──(a push reads a chunk)──> out ──(a request with non-idempotent ops)──> sending
       ^                                 │                                             │
       └──(not sent after all, or a      ├──(the vendor acknowledged)──> delivered <───┤
           retried push of the run)──────┤                                             │
                                         └──(refused, failed, or settled)──> failed <──┘

- ``pending``: planned (:func:`stage`), nothing sent. Only these are read for sending.
- ``out``: handed to the senders (:func:`take`, in the transaction that reads them): a
  request carrying the user may have left. Nothing leaves without this mark.
- ``sending``: a write-ahead intent (:func:`intend`), committed just before a request
  carrying non-idempotent ops (increase, append, once) starts; ``in_flight`` names those
  attributes. They are never sent twice: a run that dies here has them count as applied.
- ``delivered`` / ``failed``: the answer recorded, with the snapshot (``snapshots``) and the
  failure rows (``failed``) in the same transaction.

Rows live as long as their run: ``finalize`` deletes them (:func:`drop`; a dry run's stay,
to be shown). A run that died leaves rows ``out`` or ``sending``: the next holder of the
sync's lock settles them exactly once (``push.settle_in_doubt``, in the fenced transaction
that then deletes them: :func:`dead_runs`), or a retried push task of the same run puts its
``out`` rows back to ``pending`` and sends them as planned. Every write is fenced (``lease``).
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import sqlalchemy as sa

from connector import db
from connector.state import history, schema

PENDING, OUT, SENDING, DELIVERED, FAILED = "pending", "out", "sending", "delivered", "failed"
IN_FLIGHT = (OUT, SENDING)  # a request carrying the user may have left, no answer recorded
UNSENT = (PENDING, *IN_FLIGHT)  # a shard with any of these still has work for a push


class PlanRow(NamedTuple):
    """A staged row, in ``sync_plan``'s column order (a tuple, as executemany and COPY take it)."""

    run_id: int
    user_key: str
    shard: int
    identity: str  # the vendor identity fields, JSON
    source_identity: str  # the source identity columns, JSON
    ops: str  # [[attribute, op, value], ...], JSON
    payload: str  # the user's snapshot payload once delivered, JSON
    row_hash: int
    status: str = PENDING


STAGED = PlanRow._fields




def stage(conn: sa.Connection, rows: list[PlanRow]) -> None:
    """Insert plan rows, ``pending``. PostgreSQL through psycopg2 takes them with COPY, the
    fastest way in for the plan's wide JSON rows."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":  # the driver's executemany of the tuples, without SQLAlchemy's per-row work
        conn.exec_driver_sql(f"INSERT INTO {schema.plan.name} ({', '.join(STAGED)}) VALUES ({', '.join('?' * len(STAGED))})", rows)
        return
    if (conn.dialect.name, conn.dialect.driver) != ("postgresql", "psycopg2"):
        conn.execute(schema.plan.insert(), [r._asdict() for r in rows])
        return
    text = "".join("\t".join(map(str, r)) + "\n" for r in rows)
    if text.count("\t") == len(rows) * (len(STAGED) - 1) and text.count("\n") == len(rows) and "\r" not in text:
        text = text.replace("\\", "\\\\")  # no value holds a separator (JSON escapes its own): only backslashes
    else:
        text = "".join("\t".join(map(_copy_text, r)) + "\n" for r in rows)
    with conn.connection.dbapi_connection.cursor() as cursor:
        cursor.copy_expert(f"COPY {schema.plan.name} ({', '.join(STAGED)}) FROM STDIN", io.StringIO(text))


def _copy_text(value: Any) -> str:
    """A value in COPY's text format (none of the staged values is NULL)."""
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def take(conn: sa.Connection, run_id: int, shard: int | None, after: str, limit: int,
         columns: tuple, *, out: bool) -> list:
    """The next ``limit`` pending rows of a run (a shard), by key past ``after``; with ``out``
    (a push, in a fenced transaction) marked ``out`` by the same transaction: one statement a
    chunk (a key range), before any of them can be sent."""
    p = schema.plan
    mine = [p.c.run_id == run_id, p.c.status == PENDING] + ([p.c.shard == shard] if shard is not None else [])
    rows = conn.execute(sa.select(*columns).where(*mine, p.c.user_key > after).order_by(p.c.user_key).limit(limit)).all()
    if rows and out:
        conn.execute(p.update().where(*mine, p.c.user_key > after, p.c.user_key <= rows[-1][0]).values(status=OUT))
    return rows


def mark(conn: sa.Connection, run_id: int, keys: list[str], status: str) -> None:
    p = schema.plan
    for chunk in db.chunked(keys, 500):
        conn.execute(p.update().where(p.c.run_id == run_id, p.c.user_key.in_(chunk)).values(status=status))


def intend(conn: sa.Connection, run_id: int, keys: list[str], attributes: frozenset[str]) -> None:
    """The write-ahead intent: these users ``sending``, ``attributes`` (non-idempotent) in flight."""
    p = schema.plan
    for chunk in db.chunked(keys, 500):
        conn.execute(p.update().where(p.c.run_id == run_id, p.c.user_key.in_(chunk))
                     .values(status=SENDING, in_flight=db.dumps(sorted(attributes))))


def in_flight(conn: sa.Connection, columns: tuple, *where) -> list:
    """(run id, status, in_flight, *columns) of the rows ``out`` or ``sending`` among ``where``,
    grouped by run, status and attributes in flight (as a settlement takes them)."""
    p = schema.plan
    return conn.execute(sa.select(p.c.run_id, p.c.status, p.c.in_flight, *columns)
                        .where(p.c.status.in_(IN_FLIGHT), *where)
                        .order_by(p.c.run_id, p.c.status, p.c.in_flight, p.c.user_key)).all()


def staged_rows(conn: sa.Connection, sync: str, run_id: int, keys: list[str]) -> dict[str, tuple[dict, dict, dict]]:
    """Some users' (source identity, payload once delivered) as a run's plan staged them, and
    their snapshot payload now ({} for a new user). That is the payload the plan diffed
    against: a user's snapshot row changes only when its own outcome is recorded, once a run."""
    out = {}
    s, p = schema.snapshot, schema.plan
    for chunk in db.chunked(keys, 500):
        q = (sa.select(p.c.user_key, p.c.source_identity, p.c.payload, s.c.payload)
             .outerjoin(s, (s.c.sync == sync) & (s.c.user_key == p.c.user_key))
             .where(p.c.run_id == run_id, p.c.user_key.in_(chunk)))
        out.update((k, (db.loads(i), db.loads(staged), db.loads(b) if b is not None else {}))
                   for k, i, staged, b in conn.execute(q))
    return out


def of_run(run_id: int, shard: int | None = None) -> list[sa.ColumnElement[bool]]:
    """The where clause of a run's rows (a shard's)."""
    p = schema.plan
    return [p.c.run_id == run_id] + ([p.c.shard == shard] if shard is not None else [])


def dead_runs(sync: str, run_id: int) -> sa.ColumnElement[bool]:
    """The rows of the sync's runs other than ``run_id`` that never finalized: with the lock
    held, a dead run's. (A finalized run deleted its own rows, a dry run excepted, so only
    those are looked at, not the deleted rows of every run since the last VACUUM.)"""
    r = schema.runs
    return schema.plan.c.run_id.in_(sa.select(r.c.run_id).where(
        r.c.sync == sync, r.c.run_id != run_id, r.c.status.notin_(history.FINALIZED)))


def drop(conn: sa.Connection, *where) -> int:
    """Delete plan rows (a finalized run's, a dead run's once settled, users set aside)."""
    return conn.execute(schema.plan.delete().where(*where)).rowcount


def drop_keys(conn: sa.Connection, run_id: int, keys: list[str]) -> int:
    p, n = schema.plan, 0
    for chunk in db.chunked(keys, 500):
        n += drop(conn, p.c.run_id == run_id, p.c.user_key.in_(chunk))
    return n


def counts(engine: sa.Engine, run_id: int) -> dict[str, int]:
    """A run's plan rows by status."""
    p = schema.plan
    with engine.connect() as c:
        return dict(c.execute(sa.select(p.c.status, sa.func.count()).where(p.c.run_id == run_id)
                              .group_by(p.c.status)).all())


def shards(engine: sa.Engine, run_id: int, statuses: tuple[str, ...] = (PENDING,)) -> list[int]:
    """The shards of a run with rows in one of ``statuses``."""
    p = schema.plan
    with engine.connect() as c:
        return sorted(c.execute(sa.select(p.c.shard).distinct()
                                .where(p.c.run_id == run_id, p.c.status.in_(statuses))).scalars())
