"""``sync_snapshot``: what each user was last delivered, one row a user of a sync.

The invariant: a user's row moves only for what the vendor acknowledged (the push's
writes, :func:`snapshot_from_plan`: to exactly what the plan staged), or, for attributes
whose fate is unknown, to :data:`UNKNOWN`, so that the next run re-sends them. The plan
reads it to diff (:func:`snapshot_rows`, :func:`snapshot_hashes`); ``row_hash`` is the hash
of the mapped source row, 0 when the row must be diffed again.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Engine

from connector.db import among, chunked, driver_execute, dumps, now
from connector.state.schema import SYNC, TS, plan, snapshot

# The snapshot value of an attribute whose value at the vendor is unknown: a request carrying
# it may have left, and no answer was recorded (the run died or lost its lock, or the answer
# was ambiguous). No wire value is a JSON object, so the next diff finds it changed and
# re-sends the warehouse's value, whatever the warehouse did meanwhile.
UNKNOWN = {"usersync": "unconfirmed"}


def snapshot_rows(engine: Engine, sync: str, keys: Iterable[str]) -> dict[str, tuple[int, str]]:
    """Some users' (row hash, last delivered payload as JSON), by key: a thousand keys a
    query (PostgreSQL: ``= ANY(array)``, one parameter); from a database server, on two
    connections at once. The server's index and page lookups are most of the time, and each
    connection is served by a process of its own. SQLite's work is this process's: one connection."""
    chunks = list(chunked(list(keys), 1000))
    if len(chunks) < 2 or engine.dialect.name == "sqlite":
        return _snapshot_rows(engine, sync, chunks)
    with ThreadPoolExecutor(2, thread_name_prefix="usersync-snapshot") as pool:
        out, other = pool.map(_snapshot_rows, [engine] * 2, [sync] * 2, [chunks[0::2], chunks[1::2]])
    return out | other


def _snapshot_rows(engine: Engine, sync: str, chunks: list[list[str]]) -> dict[str, tuple[int, str]]:
    """``snapshot_rows`` on one connection, from the driver's own cursor."""
    out: dict[str, tuple[int, str]] = {}
    s = snapshot
    with engine.connect() as c, contextlib.closing(c.connection.cursor()) as cursor:
        for chunk in chunks:
            driver_execute(c, cursor, sa.select(s.c.user_key, s.c.row_hash, s.c.payload).where(
                s.c.sync == sync, among(c, s.c.user_key, chunk)))
            out.update((k, (h, p)) for k, h, p in cursor.fetchall())
    return out


def snapshot_hashes(engine: Engine, sync: str, batch: int = 100_000) -> Iterator[tuple[list[str], list[int]]]:
    """Every (user keys, row hashes) of a sync, ``batch`` users at a time.

    Fetched in key order, a page a query, from the driver's own cursor: a million users are
    two million cells, and a SQLAlchemy row (or a DataFrame) around each would cost more
    than the fetch itself.
    """
    s, after = snapshot, None
    with engine.connect() as c, contextlib.closing(c.connection.cursor()) as cursor:
        while True:
            q = sa.select(s.c.user_key, s.c.row_hash).where(s.c.sync == sync)
            q = q.where(s.c.user_key > after) if after is not None else q
            driver_execute(c, cursor, q.order_by(s.c.user_key).limit(batch))
            rows = cursor.fetchall()
            if not rows:
                return
            yield [r[0] for r in rows], [r[1] for r in rows]  # not zip(*rows), which makes an iterator a row
            after = rows[-1][0]


def upsert_snapshot(conn: sa.Connection, sync: str, run_id: int | None,
                    rows: list[tuple[str, dict[str, Any] | str, int]]) -> None:
    """Write delivered payloads (a payload given as text is its JSON already, as staged).

    One upsert statement where the dialect has one (SQLite, PostgreSQL, MySQL/MariaDB);
    elsewhere delete then insert, portable across dialects.
    """
    if not rows:
        return
    ts = now()
    values = [{"sync": sync, "user_key": k, "payload": p if isinstance(p, str) else dumps(p), "row_hash": h,
               "run_id": run_id, "updated_at": ts} for k, p, h in rows]
    stmt = _snapshot_upsert(conn.dialect.name)
    if stmt is None:
        for chunk in chunked([k for k, _, _ in rows], 500):
            conn.execute(snapshot.delete().where(snapshot.c.sync == sync, snapshot.c.user_key.in_(chunk)))
        stmt = snapshot.insert()
    conn.execute(stmt, values)


def snapshot_from_plan(conn: sa.Connection, sync: str, run_id: int, keys: list[str]) -> None:
    """Delivered users: their staged payload and row hash become their snapshot, copied
    from ``sync_plan`` by the database: only the keys go through Python, under the GIL the
    push's senders need."""
    stmt, ts = _from_plan(conn.dialect.name), now()
    for chunk in chunked(keys, 500):
        params = {"sync": sync, "run_id": run_id, "keys": chunk, "ts": ts}
        if _snapshot_upsert(conn.dialect.name) is None:  # no upsert: delete, then insert
            conn.execute(snapshot.delete().where(snapshot.c.sync == sync, snapshot.c.user_key.in_(chunk)))
        conn.execute(stmt, params)


_UPSERTED = ("payload", "row_hash", "run_id", "updated_at")


@functools.cache
def _from_plan(dialect: str):
    """INSERT (or overwrite) INTO sync_snapshot SELECT the plan rows of :keys (run :run_id)."""
    ts = sa.bindparam("ts", type_=TS)
    rows = sa.select(sa.bindparam("sync", type_=SYNC), plan.c.user_key, plan.c.payload, plan.c.row_hash,
                     plan.c.run_id, ts).where(plan.c.run_id == sa.bindparam("run_id"),
                                              plan.c.user_key.in_(sa.bindparam("keys", expanding=True)))
    columns = ["sync", "user_key", *_UPSERTED]
    if dialect == "sqlite":
        return snapshot.insert().prefix_with("OR REPLACE").from_select(columns, rows)
    if dialect == "postgresql":
        ins = postgresql.insert(snapshot).from_select(columns, rows)
        return ins.on_conflict_do_update(index_elements=[snapshot.c.sync, snapshot.c.user_key],
                                         set_={c: ins.excluded[c] for c in _UPSERTED})
    if dialect in ("mysql", "mariadb"):  # the plan's columns by name: MySQL has no row alias for a SELECT
        return mysql.insert(snapshot).from_select(columns, rows).on_duplicate_key_update(
            payload=plan.c.payload, row_hash=plan.c.row_hash, run_id=plan.c.run_id, updated_at=ts)
    return snapshot.insert().from_select(columns, rows)  # no upsert (see _snapshot_upsert): after a DELETE


@functools.cache
def _snapshot_upsert(dialect: str):
    """The dialect's insert-or-overwrite of a snapshot row (None: it has none we use)."""
    if dialect == "sqlite":  # REPLACE: the old row is deleted, the new one inserted
        return snapshot.insert().prefix_with("OR REPLACE")
    if dialect == "postgresql":
        ins = postgresql.insert(snapshot)
        return ins.on_conflict_do_update(index_elements=[snapshot.c.sync, snapshot.c.user_key],
                                         set_={c: ins.excluded[c] for c in _UPSERTED})
    if dialect in ("mysql", "mariadb"):
        ins = mysql.insert(snapshot)
        return ins.on_duplicate_key_update({c: ins.inserted[c] for c in _UPSERTED})
    return None
