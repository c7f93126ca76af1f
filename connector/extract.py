"""Read users from the warehouse, in chunks, through SQLAlchemy Core.

Only the mapped, identity and cursor columns are selected, and the database's hash of the
mapped ones where it has one (``rowhash.in_database``). With a cursor column, only
rows at or past the watermark are read (``>=``: rows that share the boundary value are
read again and cost nothing, since the diff finds them unchanged).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import sqlalchemy as sa
from pandas._libs import lib  # read_sql's own row-to-column conversion
from pandas.core.internals.construction import convert_object_array
from sqlalchemy.engine import Engine

from connector import db, rowhash
from connector.config import Config, SyncSpec


def source(engine: Engine, cfg: Config, spec: SyncSpec) -> sa.FromClause:
    """The sync's source as a selectable: a reflected table or the SQL file as a subquery."""
    sql = cfg.sql_text(spec)
    if sql is None:
        schema, _, name = spec.source.table.rpartition(".")
        return sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=engine)
    sql = sql.strip().rstrip(";")
    with engine.connect() as c:
        cols = list(c.execute(sa.text(f"SELECT * FROM ({sql}) src WHERE 1 = 0")).keys())
    return sa.text(sql).columns(*[sa.column(c) for c in cols]).subquery("src")


def needed_columns(spec: SyncSpec) -> list[str]:
    cols = list(spec.identity_columns.values())
    if spec.cursor:
        cols.append(spec.cursor)
    cols += [a.column for a in spec.mapping]
    return list(dict.fromkeys(cols))


def keyed(src: sa.FromClause, spec: SyncSpec) -> bool:
    """Whether users can be read back by identity cheaply: a table an identity column leads
    an index of (a SQL file's query would run again for every batch of identities)."""
    if not isinstance(src, sa.Table):
        return False
    ids = {c.lower() for c in spec.identity_columns.values()}
    keys = [src.primary_key, *src.indexes, *(c for c in src.constraints if isinstance(c, sa.UniqueConstraint))]
    return any(k.columns and next(iter(k.columns)).name.lower() in ids for k in keys)


def read(
    engine: Engine,
    src: sa.FromClause,
    spec: SyncSpec,
    *,
    since: Any = None,
    window: tuple[Any, Any] | None = None,
    identities: Sequence[dict[str, Any]] | None = None,
    chunk_size: int | None = None,
    keys_only: bool = False,
) -> Iterator[pd.DataFrame]:
    """Yield DataFrames of at most ``chunk_size`` rows.

    ``since``: cursor watermark (``cursor >= since``); ``window``: [start, end) on the
    cursor (backfills); ``identities``: read exactly these users (dicts of identity
    column -> value) instead of a scan; ``keys_only``: the identity and cursor columns and
    the database's row hash, without the mapped columns.
    """
    names = needed_columns(spec)
    hashed = rowhash.in_database(engine, [src.c[a.column] for a in spec.mapping])
    if keys_only:
        names = [c for c in names if c in spec.identity_columns.values() or c == spec.cursor]
    cols = [src.c[c] for c in names] + ([hashed] if hashed is not None else [])
    base = sa.select(*cols)
    if spec.cursor is not None:
        cur = src.c[spec.cursor]
        if since is not None:
            base = base.where(cur >= _bind(cur, since, engine.dialect.name))
        if window is not None:
            start, end = window
            if start is not None:
                base = base.where(cur >= _bind(cur, start, engine.dialect.name))
            if end is not None:
                base = base.where(cur < _bind(cur, end, engine.dialect.name))
    size = chunk_size or spec.chunk_size
    if identities is None:
        by_driver = keys_only and (engine.dialect.name, engine.dialect.driver) in _DRIVER_CURSORS
        yield from (_driver_chunks if by_driver else _chunks)(engine, base, size)
        return
    id_cols = list(spec.identity_columns.values())
    for i in range(0, len(identities), 500):
        part = identities[i : i + 500]
        if len(id_cols) == 1:
            cond = src.c[id_cols[0]].in_([p[id_cols[0]] for p in part])
        else:
            cond = sa.tuple_(*[src.c[c] for c in id_cols]).in_([tuple(p[c] for c in id_cols) for p in part])
        yield from _chunks(engine, base.where(cond), size)


T = TypeVar("T")


def ahead(chunks: Iterator[T], engine: Engine) -> Iterator[T]:
    """``chunks``, each next one read on a worker thread while the caller works on this one
    (as they are, where a thread's connection would not see ``engine``'s database).

    The driver waits for the database without holding the GIL, so reading and planning
    overlap. The iterator is only ever advanced (and closed) on that one thread, so the
    connection it holds stays on the thread that opened it.
    """
    if not db.threads_share(engine):
        yield from chunks
        return
    with ThreadPoolExecutor(1, thread_name_prefix="usersync-read") as pool:
        try:
            pending = pool.submit(next, chunks, None)
            while (chunk := pending.result()) is not None:
                pending = pool.submit(next, chunks, None)
                yield chunk
        finally:
            pool.submit(getattr(chunks, "close", lambda: None)).result()


def _chunks(engine: Engine, query: sa.Select, size: int) -> Iterator[pd.DataFrame]:
    """What ``pd.read_sql(query, chunksize=size, coerce_float=False)`` yields, the same pandas
    conversion of each column, except that an integer column with a NULL stays integers."""
    with engine.connect() as conn:
        _pin(conn)
        result = conn.execution_options(stream_results=True, yield_per=size).execute(query)
        names, empty = list(result.keys()), True
        for rows in result.partitions(size):
            empty = False
            yield _frame(names, list(lib.to_object_array_tuples(rows).T))
        if empty:  # as read_sql: one frame, with the columns
            yield pd.DataFrame({n: pd.Series(dtype=object) for n in names})


_DRIVER_CURSORS = {("sqlite", "pysqlite"), ("postgresql", "psycopg2"), ("postgresql", "psycopg")}  # that stream


def _driver_chunks(engine: Engine, query: sa.Select, size: int) -> Iterator[pd.DataFrame]:
    """``_chunks`` of a few columns, from the driver's own (server-side on PostgreSQL) cursor:
    at two or three columns, SQLAlchemy's rows and pandas' parsing of them would be a large
    part of the work. Each column's type still converts its values."""
    dialect = engine.dialect
    cols = list(query.selected_columns)
    convert = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in cols]
    with engine.connect() as conn:
        _pin(conn)
        raw = conn.connection
        cursor = raw.cursor(name="usersync_scan") if dialect.name == "postgresql" else raw.cursor()
        with contextlib.closing(cursor):
            db.driver_execute(conn, cursor, query)
            while rows := cursor.fetchmany(size):
                content = []
                for i, f in enumerate(convert):
                    content.append(array := np.empty(len(rows), dtype=object))
                    array[:] = [f(r[i]) for r in rows] if f else [r[i] for r in rows]
                yield _frame([c.name for c in cols], content)


def _frame(names: list[str], content: list[np.ndarray]) -> pd.DataFrame:
    """Columns of driver values (object arrays) converted as ``pd.read_sql`` converts them
    (pandas' own function), but an integer column with a NULL as Int64: pandas makes it
    float64, which rounds every value past 2^53 — an identity among them, so another user's.
    Integers past 64 bits stay Python ints (objects), NUMERIC's Decimals stay Decimals."""
    arrays = convert_object_array(content, dtype=None, coerce_float=False)
    for i, array in enumerate(arrays):
        if array.dtype.kind == "f" and pd.api.types.infer_dtype(content[i], skipna=True) == "integer":
            try:
                arrays[i] = pd.array(content[i], dtype="Int64")
            except (OverflowError, TypeError):
                arrays[i] = content[i]
    return pd.DataFrame(dict(zip(names, arrays)), copy=False)


def _pin(conn: sa.Connection) -> None:
    if conn.dialect.name == "postgresql":  # floats' text in full (rowhash.in_database)
        conn.execute(sa.text("SET LOCAL extra_float_digits = 3"))


def _bind(col: sa.ColumnElement, value: Any, dialect: str) -> Any:
    """Compare like with like: a datetime watermark against a column that holds text (a text
    column, or any datetime column on SQLite) as 'YYYY-MM-DD HH:MM:SS'. Whole seconds: rows
    written without a fraction ('12:05:00', as most tools write them) are not below
    '12:05:00.000000', so a row that shares the watermark's second is always read again."""
    if isinstance(value, dt.datetime):
        try:
            python_type = col.type.python_type
        except NotImplementedError:
            python_type = None
        if python_type is str or (python_type is dt.datetime and dialect == "sqlite"):
            if value.tzinfo is not None:
                value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
            return sa.literal(value.strftime("%Y-%m-%d %H:%M:%S"), sa.String())
        if python_type is dt.datetime and value.tzinfo is not None and not getattr(col.type, "timezone", False):
            return value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value
