"""The sync tables: what was delivered, what each run and batch did, what failed.

SQLAlchemy Core only, so the same code runs on SQLite, PostgreSQL and MySQL/MariaDB.
``usersync ddl`` prints the DDL; ``sql/sync_tables.*.sql`` are that output.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import io
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Engine

metadata = sa.MetaData()
_KEY = sa.String(255)
_SYNC = sa.String(100)
_JSON = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
_TS = sa.DateTime(timezone=True)

runs = sa.Table(
    "sync_runs", metadata,
    sa.Column("run_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sync", _SYNC, nullable=False, index=True),
    sa.Column("vendor", sa.String(40), nullable=False),
    sa.Column("mode", sa.String(20), nullable=False),  # incremental / full / backfill / dry_run
    sa.Column("trigger", sa.String(250), nullable=False),  # cli / airflow:<dag run id>
    sa.Column("status", sa.String(20), nullable=False),  # running / success / partial / failed / blocked / dry_run / abandoned
    sa.Column("started_at", _TS, nullable=False),
    sa.Column("finished_at", _TS),
    sa.Column("users_read", sa.Integer, default=0),
    sa.Column("users_changed", sa.Integer, default=0),
    sa.Column("users_delivered", sa.Integer, default=0),
    sa.Column("users_rejected", sa.Integer, default=0),
    sa.Column("users_failed", sa.Integer, default=0),
    sa.Column("requests", sa.Integer, default=0),
    sa.Column("watermark_from", sa.String(100)),
    sa.Column("watermark_to", sa.String(100)),  # cursor value to commit when the run succeeds
    sa.Column("error", sa.Text),
)

batches = sa.Table(
    "sync_batches", metadata,
    sa.Column("batch_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, nullable=False, index=True),
    sa.Column("sync", _SYNC, nullable=False),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("users", sa.Integer, nullable=False),
    sa.Column("first_user", _KEY),
    sa.Column("attributes", sa.Text),  # comma-separated attribute names in the request
    sa.Column("http_status", sa.Integer),
    sa.Column("vendor_code", sa.String(40)),
    sa.Column("vendor_message", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Integer),
    sa.Column("outcome", sa.String(20), nullable=False),  # delivered / partial / rejected / failed / stopped
    sa.Column("sent_at", _TS, nullable=False),
    # who sent it, so the spread over workers shows: the host (on Airflow, the task instance's
    # hostname as Airflow records it) and the Airflow task (dag_id.task_id[map_index] try n; NULL for the CLI)
    sa.Column("worker", sa.String(250)),
    sa.Column("task", sa.String(250)),
)

snapshot = sa.Table(
    "sync_snapshot", metadata,
    sa.Column("sync", _SYNC, primary_key=True),
    sa.Column("user_key", _KEY, primary_key=True),
    sa.Column("payload", _JSON, nullable=False),  # attribute -> last delivered wire value
    sa.Column("row_hash", sa.BigInteger, nullable=False),  # hash of the mapped source row
    sa.Column("run_id", sa.Integer),
    sa.Column("updated_at", _TS, nullable=False),
)

failures = sa.Table(
    "sync_failures", metadata,
    sa.Column("sync", _SYNC, primary_key=True),
    sa.Column("user_key", _KEY, primary_key=True),
    sa.Column("identity", sa.Text, nullable=False),  # source identity columns, JSON
    sa.Column("run_id", sa.Integer),
    sa.Column("error_class", sa.String(20), nullable=False),  # invalid / rejected / retryable / in_doubt
    sa.Column("code", sa.String(40)),
    sa.Column("message", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=1),
    sa.Column("first_seen", _TS, nullable=False),
    sa.Column("last_seen", _TS, nullable=False),
)

plan = sa.Table(
    "sync_plan", metadata,
    sa.Column("run_id", sa.Integer, primary_key=True),
    sa.Column("user_key", _KEY, primary_key=True),
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("identity", sa.Text, nullable=False),  # vendor identity fields, JSON
    sa.Column("source_identity", sa.Text, nullable=False),  # source identity columns, JSON
    sa.Column("ops", _JSON, nullable=False),  # [[attribute, op, value], ...]
    sa.Column("payload", _JSON, nullable=False),  # snapshot payload once delivered
    sa.Column("row_hash", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # pending / sending (in flight) / delivered / failed
    sa.Column("in_flight", sa.Text),  # while sending: JSON list of the non-idempotent attributes that may land
    sa.Index("ix_sync_plan_shard", "run_id", "shard", "status"),
)

cursors = sa.Table(
    "sync_cursors", metadata,
    sa.Column("sync", _SYNC, primary_key=True),
    sa.Column("watermark", sa.String(100), nullable=False),  # JSON: {"t": type, "v": value}
    sa.Column("run_id", sa.Integer),
    sa.Column("updated_at", _TS, nullable=False),
)

locks = sa.Table(
    "sync_locks", metadata,
    sa.Column("sync", _SYNC, primary_key=True),
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("acquired_at", _TS, nullable=False),
    sa.Column("heartbeat_at", _TS, nullable=False),
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def connect(url: str) -> Engine:
    """An engine for the state database, with the sync tables created if missing."""
    engine = make_engine(url)
    create_tables(engine)
    return engine


def create_tables(engine: Engine) -> None:
    """Create the sync tables if missing; bring an older ``sync_plan`` up to date (add
    ``in_flight``; drop ``before``, now read from the snapshot when needed)."""
    metadata.create_all(engine)
    columns = {c["name"] for c in sa.inspect(engine).get_columns("sync_plan")}
    with engine.begin() as c:
        if "in_flight" not in columns:
            c.execute(sa.text("ALTER TABLE sync_plan ADD COLUMN in_flight TEXT"))
        if "before" in columns:
            c.execute(sa.text(f"ALTER TABLE sync_plan DROP COLUMN {engine.dialect.identifier_preparer.quote('before')}"))


def threads_share(engine: Engine) -> bool:
    """Whether a connection opened on another thread sees the same database (not so for an
    in-memory SQLite database, which SQLAlchemy keeps one per thread)."""
    return not (engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"))


def make_engine(url: str) -> Engine:
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith(("mysql", "mariadb")):
        # PostgreSQL's default isolation. Under InnoDB's REPEATABLE READ, the push's
        # INSERT ... SELECT from sync_plan would share-lock every plan row it scans, and
        # deadlock with a sender marking its own rows `sending`; READ COMMITTED reads them
        # as a consistent snapshot, without locks.
        kwargs["isolation_level"] = "READ COMMITTED"
    engine = sa.create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_conn, _):  # readers do not block the writer
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")
    return engine


def ddl(dialect: str) -> str:
    """CREATE TABLE statements for a dialect (sqlite, postgresql, mysql)."""
    from sqlalchemy.schema import CreateIndex, CreateTable

    eng = sa.create_mock_engine(f"{dialect}://", lambda *a, **k: None)
    out = []
    for table in metadata.sorted_tables:
        out.append(str(CreateTable(table).compile(dialect=eng.dialect)).strip() + ";")
        for index in sorted(table.indexes, key=lambda i: i.name):
            out.append(str(CreateIndex(index).compile(dialect=eng.dialect)).strip() + ";")
    return "\n\n".join(out) + "\n"


def plain(value: Any) -> Any:
    """numpy / pandas scalars as plain Python values (JSON and bind parameters)."""
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA:
        return None
    return value


def _encodable(value: Any) -> Any:
    """What msgspec has no JSON type for: numpy and pandas scalars as Python's, the rest (Decimal, ...) as text."""
    out = plain(value)
    return str(value) if out is value else out


_ENCODER = msgspec.json.Encoder(enc_hook=_encodable)


def dumps(value: Any) -> str:
    """Compact JSON (msgspec: a quarter of ``json.dumps``' time, text included; the plan writes five a user)."""
    return _ENCODER.encode(value).decode()


def loads(text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:  # NaN or Infinity, as Python's json wrote them: msgspec refuses
        return json.loads(text)


# -- runs ----------------------------------------------------------------------------
def start_run(engine: Engine, sync: str, vendor: str, mode: str, trigger: str) -> int:
    with engine.begin() as c:
        res = c.execute(runs.insert().values(sync=sync, vendor=vendor, mode=mode, trigger=trigger,
                                             status="running", started_at=now(), users_read=0,
                                             users_changed=0, users_delivered=0, users_rejected=0,
                                             users_failed=0, requests=0))
        return int(res.inserted_primary_key[0])


def update_run(engine: Engine, run_id: int, **values: Any) -> None:
    with engine.begin() as c:
        c.execute(runs.update().where(runs.c.run_id == run_id).values(**values))


def get_run(engine: Engine, run_id: int) -> dict[str, Any]:
    with engine.connect() as c:
        row = c.execute(sa.select(runs).where(runs.c.run_id == run_id)).mappings().one()
    return dict(row)


# -- plan ----------------------------------------------------------------------------
STAGED = ("run_id", "user_key", "shard", "identity", "source_identity", "ops", "payload", "row_hash", "status")


def stage(conn: sa.Connection, rows: list[tuple]) -> None:
    """Insert plan rows (tuples in ``STAGED`` order). PostgreSQL through psycopg2 takes
    them with COPY: a third of the multi-row INSERTs' time for the plan's wide JSON rows."""
    if not rows:
        return
    if conn.dialect.name == "sqlite":  # the driver's executemany of the tuples: a third of the time off
        conn.exec_driver_sql(f"INSERT INTO {plan.name} ({', '.join(STAGED)}) VALUES ({', '.join('?' * len(STAGED))})", rows)
        return
    if (conn.dialect.name, conn.dialect.driver) != ("postgresql", "psycopg2"):
        conn.execute(plan.insert(), [dict(zip(STAGED, r)) for r in rows])
        return
    text = "".join("\t".join(map(str, r)) + "\n" for r in rows)
    if text.count("\t") == len(rows) * (len(STAGED) - 1) and text.count("\n") == len(rows) and "\r" not in text:
        text = text.replace("\\", "\\\\")  # no value holds a separator (JSON escapes its own): only backslashes
    else:
        text = "".join("\t".join(map(_copy_text, r)) + "\n" for r in rows)
    with conn.connection.dbapi_connection.cursor() as cursor:
        cursor.copy_expert(f"COPY {plan.name} ({', '.join(STAGED)}) FROM STDIN", io.StringIO(text))


def _copy_text(value: Any) -> str:
    """A value in COPY's text format (none of the staged values is NULL)."""
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


# -- snapshot ------------------------------------------------------------------------
def snapshot_rows(engine: Engine, sync: str, keys: Iterable[str]) -> dict[str, tuple[int, str]]:
    """Some users' (row hash, last delivered payload as JSON), by key: a thousand keys a
    query (PostgreSQL: ``= ANY(array)``, one parameter); from a database server, on two
    connections at once. The server's index and page lookups are most of the time (10,000
    keys of 1M on PostgreSQL: 0.12 s of 0.2 s on one connection), and each connection is
    served by a process of its own. SQLite's work is this process's: one connection."""
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
                s.c.sync == sync, _among(c, s.c.user_key, chunk)))
            out.update((k, (h, p)) for k, h, p in cursor.fetchall())
    return out


def _among(conn: sa.Connection, column: sa.ColumnElement, values: list) -> sa.ColumnElement[bool]:
    if conn.dialect.name == "postgresql":
        return column == sa.any_(sa.bindparam(None, values, type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def staged_rows(conn: sa.Connection, sync: str, run_id: int, keys: list[str]) -> dict[str, tuple[dict, dict, dict]]:
    """Some users' (source identity, payload once delivered) as a run's plan staged them, and
    their snapshot payload now ({} for a new user). That is the payload the plan diffed
    against: a user's snapshot row changes only when its own outcome is recorded, once a run."""
    out = {}
    s = snapshot
    for chunk in chunked(keys, 500):
        q = (sa.select(plan.c.user_key, plan.c.source_identity, plan.c.payload, s.c.payload)
             .outerjoin(s, (s.c.sync == sync) & (s.c.user_key == plan.c.user_key))
             .where(plan.c.run_id == run_id, plan.c.user_key.in_(chunk)))
        out.update((k, (loads(i), loads(p), loads(b) if b is not None else {})) for k, i, p, b in conn.execute(q))
    return out


def driver_execute(conn: sa.Connection, cursor: Any, query: sa.Executable) -> None:
    """Run a Core query on the driver's own cursor, whose rows are plain tuples."""
    compiled = query.compile(conn, compile_kwargs={"render_postcompile": True})  # IN's list: one parameter a value
    params = compiled.construct_params()
    cursor.execute(str(compiled), [params[p] for p in compiled.positiontup or ()] if compiled.positional else params)


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
            yield [r[0] for r in rows], [r[1] for r in rows]  # 10x zip(*rows), which makes an iterator a row
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
    from ``sync_plan`` by the database (only the keys go through Python: a push records
    10,000 users a second at Tencent's limit)."""
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
    ts = sa.bindparam("ts", type_=_TS)
    rows = sa.select(sa.bindparam("sync", type_=_SYNC), plan.c.user_key, plan.c.payload, plan.c.row_hash,
                     plan.c.run_id, ts).where(plan.c.run_id == sa.bindparam("run_id"),
                                              plan.c.user_key.in_(sa.bindparam("keys", expanding=True)))
    columns = ["sync", "user_key", *_UPSERTED]
    if dialect == "sqlite":
        return snapshot.insert().prefix_with("OR REPLACE").from_select(columns, rows)
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql
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
        from sqlalchemy.dialects import postgresql
        ins = postgresql.insert(snapshot)
        return ins.on_conflict_do_update(index_elements=[snapshot.c.sync, snapshot.c.user_key],
                                         set_={c: ins.excluded[c] for c in _UPSERTED})
    if dialect in ("mysql", "mariadb"):
        ins = mysql.insert(snapshot)
        return ins.on_duplicate_key_update({c: ins.inserted[c] for c in _UPSERTED})
    return None


# -- failures ------------------------------------------------------------------------
def record_failures(conn: sa.Connection, sync: str, run_id: int,
                    rows: list[tuple[str, dict[str, Any], str, str | None, str]]) -> None:
    """(key, source identity, error class, code, message) — kept until delivered."""
    if not rows:
        return
    keys = [r[0] for r in rows]
    prior: dict[str, tuple[int, dt.datetime]] = {}
    for chunk in chunked(keys, 500):
        q = sa.select(failures.c.user_key, failures.c.attempts, failures.c.first_seen).where(
            failures.c.sync == sync, failures.c.user_key.in_(chunk))
        prior.update((k, (a, f)) for k, a, f in conn.execute(q))
        conn.execute(failures.delete().where(failures.c.sync == sync, failures.c.user_key.in_(chunk)))
    ts = now()
    conn.execute(failures.insert(), [
        {"sync": sync, "user_key": k, "identity": dumps(ident), "run_id": run_id, "error_class": cls,
         "code": code, "message": (msg or "")[:2000], "attempts": prior.get(k, (0, ts))[0] + 1,
         "first_seen": prior.get(k, (0, ts))[1], "last_seen": ts}
        for k, ident, cls, code, msg in rows])


def clear_failures(conn: sa.Connection, sync: str, keys: list[str], among: set[str] | None = None) -> None:
    """Delete the failure rows of ``keys``; ``among``: the keys known to have one (from
    :func:`failure_keys`; None: unknown), so that the others cost no DELETE."""
    if among is not None:
        keys = [k for k in keys if k in among]
    for chunk in chunked(keys, 500):
        conn.execute(failures.delete().where(failures.c.sync == sync, failures.c.user_key.in_(chunk)))


def failure_keys(engine: Engine, sync: str, most: int = 100_000) -> set[str] | None:
    """The keys of a sync's users with a failure row (None: more than ``most`` of them)."""
    with engine.connect() as c:
        keys = c.execute(sa.select(failures.c.user_key).where(failures.c.sync == sync).limit(most + 1)).scalars().all()
    return set(keys) if len(keys) <= most else None


def failed_identities(engine: Engine, sync: str) -> list[dict[str, Any]]:
    """Source identities of users whose last attempt failed: re-read every run."""
    with engine.connect() as c:
        rows = c.execute(sa.select(failures.c.identity).where(failures.c.sync == sync))
        return [ident for ident in (json.loads(i) for (i,) in rows) if ident]


# -- cursor --------------------------------------------------------------------------
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


# -- lock ----------------------------------------------------------------------------
class Locked(Exception):
    """Another run of the same sync holds the lock."""


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def acquire_lock(engine: Engine, sync: str, run_id: int, stale_after: float = 600.0) -> int | None:
    """Take the sync's lock for a run. Returns the run id of a stale holder taken over.

    Raises :class:`Locked` when a live run holds it. A holder whose heartbeat is older
    than ``stale_after`` seconds is presumed dead (killed process) and replaced.
    """
    ts = now()
    with engine.begin() as c:
        held = c.execute(sa.select(locks).where(locks.c.sync == sync)).mappings().first()
        if held is None:
            try:
                with c.begin_nested():
                    c.execute(locks.insert().values(sync=sync, run_id=run_id, owner=owner(),
                                                    acquired_at=ts, heartbeat_at=ts))
                return None
            except sa.exc.IntegrityError:
                held = c.execute(sa.select(locks).where(locks.c.sync == sync)).mappings().first()
        if held["run_id"] == run_id:
            return None
        beat = _aware(held["heartbeat_at"])
        if (ts - beat).total_seconds() < stale_after:
            raise Locked(f"sync '{sync}' is locked by run {held['run_id']} ({held['owner']}), "
                         f"last heartbeat {beat:%Y-%m-%d %H:%M:%S} UTC")
        res = c.execute(locks.update().where(locks.c.sync == sync, locks.c.run_id == held["run_id"])
                        .values(run_id=run_id, owner=owner(), acquired_at=ts, heartbeat_at=ts))
        if res.rowcount != 1:
            raise Locked(f"sync '{sync}' lock was taken by another run just now")
        c.execute(runs.update().where(runs.c.run_id == held["run_id"], runs.c.status == "running")
                  .values(status="abandoned", finished_at=ts, error=f"lock taken over by run {run_id}"))
        return int(held["run_id"])


def heartbeat(engine: Engine, sync: str, run_id: int) -> None:
    """Keep the run's lock alive; raise :class:`Locked` if another run took it over meanwhile."""
    with engine.begin() as c:
        res = c.execute(locks.update().where(locks.c.sync == sync, locks.c.run_id == run_id).values(heartbeat_at=now()))
    if res.rowcount != 1:
        raise Locked(f"sync '{sync}': run {run_id} lost its lock (no heartbeat for too long; taken over)")


class Heartbeat:
    """Calls :func:`heartbeat` at most every third of the lock timeout, so a live run is never taken for dead."""

    def __init__(self, engine: Engine, sync: str, run_id: int, lock_timeout: float):
        self.args, self.every = (engine, sync, run_id), min(30.0, lock_timeout / 3)
        self.last = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self.last > self.every:
            heartbeat(*self.args)
            self.last = time.monotonic()


def release_lock(engine: Engine, sync: str, run_id: int) -> None:
    with engine.begin() as c:
        c.execute(locks.delete().where(locks.c.sync == sync, locks.c.run_id == run_id))


def _aware(ts: dt.datetime) -> dt.datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


def chunked(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
