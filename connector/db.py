"""Database helpers that the warehouse reader and the sync tables both use: engines, the
driver's own cursor, the JSON codec of the sync tables' text columns, and batching.

No pandas or numpy is imported here: a value can only be one of theirs once they are loaded.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterator
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def aware(ts: dt.datetime) -> dt.datetime:
    """A timestamp read back as UTC (SQLite and MySQL return naive ones)."""
    return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)


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


def threads_share(engine: Engine) -> bool:
    """Whether a connection opened on another thread sees the same database (not so for an
    in-memory SQLite database, which SQLAlchemy keeps one per thread)."""
    return not (engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"))


def driver_execute(conn: sa.Connection, cursor: Any, query: sa.Executable) -> None:
    """Run a Core query on the driver's own cursor, whose rows are plain tuples."""
    compiled = query.compile(conn, compile_kwargs={"render_postcompile": True})  # IN's list: one parameter a value
    params = compiled.construct_params()
    cursor.execute(str(compiled), [params[p] for p in compiled.positiontup or ()] if compiled.positional else params)



def among(conn: sa.Connection, column: sa.ColumnElement, values: list) -> sa.ColumnElement[bool]:
    """``column IN values``; on PostgreSQL ``= ANY(array)``: one parameter, however many values."""
    if conn.dialect.name == "postgresql":
        return column == sa.any_(sa.bindparam(None, values, type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def chunked(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def plain(value: Any) -> Any:
    """numpy / pandas scalars as plain Python values (JSON and bind parameters)."""
    pd, np = sys.modules.get("pandas"), sys.modules.get("numpy")
    if pd is not None and isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    if np is not None and isinstance(value, np.generic):
        return value.item()
    if pd is not None and value is pd.NA:
        return None
    return value


def _encodable(value: Any) -> Any:
    """What msgspec has no JSON type for: numpy and pandas scalars as Python's, the rest (Decimal, ...) as text."""
    out = plain(value)
    return str(value) if out is value else out


_ENCODER = msgspec.json.Encoder(enc_hook=_encodable)


def dumps(value: Any) -> str:
    """Compact JSON, by msgspec (the plan writes five of these a user)."""
    return _ENCODER.encode(value).decode()


def loads(text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:  # NaN or Infinity, as Python's json wrote them: msgspec refuses
        return json.loads(text)
