"""A synthetic warehouse of users x 20 typed attributes, generated column-wise with numpy.

Rows are a pure function of ``seq % template``, so a 10M-row table is the 1M-row template
repeated under new ids (which lets the scale run seed its snapshot in SQL). PostgreSQL is
loaded with COPY, SQLite with executemany in large transactions.
"""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

TABLE = "bench_users"
T0 = dt.datetime(2025, 1, 1)
SEEDED = T0 + dt.timedelta(days=1)  # the latest updated_at at generation
CHANGED = T0 + dt.timedelta(days=2)  # updated_at of the rows a "later run" sees changed
_STR = "VARCHAR(200)"
# column -> (SQL type, vendor type): 6 strings, 5 numbers, 4 datetimes/dates, 3 booleans, 2 lists
ATTRIBUTES = {
    "plan": (_STR, "String"), "country": (_STR, "String"), "city": (_STR, "String"),
    "email": (_STR, "String"), "first_name": (_STR, "String"), "note": ("TEXT", "String"),
    "orders": ("INTEGER", "Long"), "points": ("BIGINT", "Long"), "age": ("INTEGER", "Long"),
    "ltv": ("DOUBLE PRECISION", "Double"), "score": ("DOUBLE PRECISION", "Double"),
    "signup_at": ("TIMESTAMP", "Datetime"), "last_seen_at": ("TIMESTAMP", "Datetime"),
    "trial_end_at": ("TIMESTAMP", "Datetime"), "birthday": ("DATE", "Date"),
    "subscribed": ("BOOLEAN", "Boolean"), "push_opt_in": ("BOOLEAN", "Boolean"), "vip": ("BOOLEAN", "Boolean"),
    "interests": ("TEXT", "Array"), "tags": ("TEXT", "Array"),
}
COLUMNS = ["seq", "user_id", "updated_at", *ATTRIBUTES]
_PLANS = np.array(["free", "pro", "enterprise"], dtype=object)
_COUNTRIES = np.array(["KR", "JP", "US", "DE", "FR", "BR", "IN", "SG", "VN", "TH"], dtype=object)
_CITIES = np.array([f"City {i}" for i in range(50)], dtype=object)
_NAMES = np.array(["Min-jun", "Yuki", "Alex", "Maria", "Chen", "Aarav", "Lea", "Noah", "Sofia", "Kenji"], dtype=object)
_TOPICS = ["music", "travel", "sports", "gaming", "cooking", "tech", "books", "art"]
_LISTS = np.array(['["' + '","'.join(_TOPICS[j] for j in range(8) if i >> j & 1) + '"]' if i else "[]"
                   for i in range(256)], dtype=object)


def frame(start: int, stop: int, template: int) -> pd.DataFrame:
    """Rows ``start <= seq < stop``; attributes depend on ``seq % template`` only."""
    seq = np.arange(start, stop, dtype=np.int64)
    t = seq % template
    null = t % 10 == 7
    ts = pd.Timestamp(T0)

    def maybe(values):  # NULL for one user in ten
        s = pd.Series(values)
        return (s.astype("Int64") if pd.api.types.is_integer_dtype(s) else s).mask(null)

    return pd.DataFrame({
        "seq": seq,
        "user_id": pd.Series(seq).map("u{:09d}".format),
        "updated_at": pd.Timestamp(SEEDED) - pd.to_timedelta(t % 86_400, unit="s"),  # over the day before
        "plan": _PLANS[t % 3], "country": _COUNTRIES[t * 7 % 10], "city": maybe(_CITIES[t % 50]),
        "email": pd.Series(t).map("user{}@example.com".format), "first_name": _NAMES[t * 3 % 10],
        "note": maybe(pd.Series(t % 997).map("note {} ✓".format)),
        "orders": t % 50, "points": t * 37 % 100_000, "age": maybe(18 + t % 60),
        "ltv": (t % 100_000) * 1.25, "score": maybe(t * 13 % 1000 / 10),
        "signup_at": ts - pd.to_timedelta(t * 61, unit="s"),
        "last_seen_at": ts - pd.to_timedelta(t % 86_400, unit="s"),
        "trial_end_at": maybe(ts + pd.to_timedelta(t % 90, unit="D")),
        "birthday": (ts - pd.to_timedelta(7000 + t % 15_000, unit="D")).normalize(),
        "subscribed": t % 2 == 0, "push_opt_in": maybe(t % 3 == 0), "vip": t % 97 == 0,
        "interests": _LISTS[t % 256], "tags": maybe(_LISTS[t * 5 % 256]),
    })


def create(url: str, rows: int) -> None:
    """(Re)create the table with ``rows`` users, an index on the cursor column."""
    eng = sa.create_engine(url)
    cols = ", ".join(f"{c} {ATTRIBUTES[c][0]}" for c in ATTRIBUTES)
    with eng.begin() as c:
        c.execute(sa.text(f"DROP TABLE IF EXISTS {TABLE}"))
        c.execute(sa.text(f"CREATE TABLE {TABLE} (seq BIGINT NOT NULL, user_id VARCHAR(40) PRIMARY KEY, "
                          f"updated_at TIMESTAMP NOT NULL, {cols})"))
        c.execute(sa.text(f"CREATE INDEX ix_{TABLE}_updated ON {TABLE} (updated_at)"))
    eng.dispose()
    append(url, 0, rows, rows)


def append(url: str, start: int, stop: int, template: int, block: int = 500_000) -> None:
    """Add users ``start <= seq < stop``, copies of the first ``template`` users under new ids."""
    eng = sa.create_engine(url)
    for i in range(start, stop, block):
        df = frame(i, min(stop, i + block), template)
        if eng.dialect.name == "postgresql":
            _copy(eng, df)
        else:
            _insert(eng, df)
    if eng.dialect.name == "postgresql":
        with eng.begin() as c:
            c.execute(sa.text(f"ANALYZE {TABLE}"))
    eng.dispose()


def _copy(eng: sa.Engine, df: pd.DataFrame) -> None:
    buf = io.StringIO()
    df.to_csv(buf, index=False, header=False, date_format="%Y-%m-%d %H:%M:%S")
    buf.seek(0)
    raw = eng.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.copy_expert(f"COPY {TABLE} ({', '.join(COLUMNS)}) FROM STDIN WITH (FORMAT csv)", buf)
        raw.commit()
    finally:
        raw.close()


def _insert(eng: sa.Engine, df: pd.DataFrame) -> None:
    out = df.astype(object).where(df.notna(), None)
    for c in ("updated_at", "signup_at", "last_seen_at", "trial_end_at"):
        out[c] = df[c].dt.strftime("%Y-%m-%d %H:%M:%S").astype(object).where(df[c].notna(), None)
    out["birthday"] = df["birthday"].dt.strftime("%Y-%m-%d")
    for c in ("subscribed", "push_opt_in", "vip"):
        out[c] = df[c].map(lambda v: None if pd.isna(v) else int(v))
    sql = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    raw = eng.raw_connection()
    try:
        raw.cursor().executemany(sql, out.itertuples(index=False, name=None))
        raw.commit()
    finally:
        raw.close()


def change(url: str, every: int = 100, below: int | None = None, at: dt.datetime = CHANGED) -> int:
    """A later day (``at``): one user in ``every`` (of the first ``below``) gets new points,
    plan and last_seen_at."""
    eng = sa.create_engine(url)
    with eng.begin() as c:
        n = c.execute(sa.text(
            f"UPDATE {TABLE} SET points = points + 1, plan = 'pro', last_seen_at = :t, updated_at = :t "
            f"WHERE seq % {every} = 0" + (f" AND seq < {below}" if below else "")), {"t": at}).rowcount
    eng.dispose()
    return n


def sync(name: str, *, cursor: bool, base_url: str = "http://127.0.0.1:9", chunk_size: int = 50_000) -> dict[str, Any]:
    """A DFINERY sync of all 20 attributes (set, one 'once')."""
    mapping = [{"column": c, "attribute": c, "type": t} for c, (_, t) in ATTRIBUTES.items()]
    mapping[ATTRIBUTES_INDEX_ONCE]["rule"] = "once"
    return {
        "name": name, "source": {"table": TABLE}, "identity": {"external_id": "user_id"},
        **({"cursor": "updated_at"} if cursor else {}),
        "vendor": {"type": "dfinery", "base_url": base_url, "settings": {"service_id": "bench"},
                   "credentials": {"access_token": "${BENCH_DFINERY_TOKEN:-bench-token}"}},
        "mapping": mapping, "chunk_size": chunk_size,
        "guard": {"max_changed_fraction": 1.0, "max_nulled_fraction": 1.0},
    }


ATTRIBUTES_INDEX_ONCE = list(ATTRIBUTES).index("signup_at")
