"""The diff's first pass: a 64-bit hash of each user's *source* row.

Hashing the values as read (not their coerced wire form) lets a plan coerce only the
users whose hash moved: unchanged users cost one hash and one comparison. The mapping's
fingerprint (each attribute's column, name, rule and wire type) is folded in, so a
changed mapping or format moves every hash once and the second pass decides.

Where the database can, it renders the row itself (``in_database``): PostgreSQL hashes the
row's text (``hashtextextended``), SQLite returns it as one JSON text, hashed here. A full
scan then reads just identities and that one value per row, and re-reads by identity only
the users whose hash moved: turning every cell into Python is skipped for the users that
did not change. The text is exact (floats in full: PostgreSQL's ``extra_float_digits`` is
pinned by the reader, SQLite's REAL columns are quoted), so a changed value moves it.
Elsewhere (MySQL/MariaDB, other dialects) the rows are hashed here, a column at a time.

A value hashed here hashes the same whatever dtype its chunk arrived as: 5 and 5.0 alike (an
integer column arrives as int64 or, with NULLs, Int64; a float column holding whole numbers
hashes as they do), NULL apart from every text (also 'None'), booleans
as the text 'True'/'False' (as an object column of them is hashed), Python dates and
datetimes as the datetime64 they equal. A column that comes
as another dtype in another run (datetime64 in one, objects in the next) can only move a
hash, never hide a change: the second pass, against the delivered payload, decides.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import sqlalchemy as sa
from pandas.core.util.hashing import combine_hash_arrays

# v2: integers are read exactly (they were read through float64 where a column had a NULL, so
# values past 2^53 reached the vendor rounded, and the diff never saw it): every row hash
# moves once, and that one full diff re-sends exactly the values the vendor holds wrong.
KEY = "usersync-rows-v2"
COLUMN = "usersync_row_hash"  # the label of the in-database hash in a read's frame
_MAX_EXACT = 2.0**53  # past this a float no longer holds every integer
_SAMPLE = 1000  # values looked at to judge whether a text column is mostly distinct


def _texts(values) -> np.ndarray:
    """The hash of each value's text (``str()`` of what is not text yet)."""
    values = np.asarray(values, dtype=object)
    try:
        return pd.util.hash_array(values, hash_key=KEY, categorize=False)
    except ValueError:  # lists, which numpy will not turn into text for pandas
        return pd.util.hash_array(np.array([str(v) for v in values], dtype=object), hash_key=KEY, categorize=False)


NULL, TRUE, FALSE = _texts(["\x00usersync:null", "True", "False"])


def hashes_in(engine: sa.Engine) -> bool:
    """Whether this warehouse hashes its rows itself (``in_database``)."""
    dialect = engine.dialect
    if dialect.name == "postgresql":
        if dialect.server_version_info is None:  # known once connected
            engine.connect().close()
        return dialect.server_version_info >= (11,)  # hashtextextended
    return dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 38)  # JSON built in


def in_database(engine: sa.Engine, columns: list[sa.ColumnElement]) -> sa.Label | None:
    """The expression a read selects (as ``COLUMN``) for its rows' hash, or None where the
    rows are hashed here. Its value only ever moves when a column's does (a changed server
    setting such as ``TimeZone`` can move it too, which costs a re-read, never a change)."""
    if not hashes_in(engine):
        return None
    if engine.dialect.name == "postgresql":
        return sa.func.hashtextextended(sa.cast(sa.func.ROW(*columns), sa.Text), 0).label(COLUMN)
    # SQLite: as a BLOB, so bytes, never decoded (a BLOB cast to text need not be UTF-8)
    return sa.cast(sa.func.json_array(*(_sqlite_exact(c) for c in columns)), sa.LargeBinary).label(COLUMN)


def _sqlite_exact(col: sa.ColumnElement) -> sa.ColumnElement:
    """A cell as JSON takes it whole: SQLite's own text of a REAL has 15 digits, so a column
    declared to hold reals (or of unknown type) is quoted (exact); others go as text (a BLOB,
    which JSON refuses, too). Left: a REAL of more than 15 digits in an INTEGER, DATE or
    BOOLEAN column (SQLite lets any column hold any type) is hashed at 15 digits."""
    if isinstance(col.type, (sa.Float, sa.Numeric, sa.types.NullType)):
        return sa.func.quote(col)
    return sa.cast(col, sa.Text)


def row_hashes(frame: pd.DataFrame, columns: list[str], fingerprint: str) -> np.ndarray:
    """One signed 64-bit hash per row of ``frame`` over ``columns`` (in order) and ``fingerprint``;
    over the database's hash where the frame has it (``COLUMN``)."""
    n = len(frame)
    salt = np.full(n, _texts([fingerprint])[0], dtype=np.uint64)
    if COLUMN in frame:
        hashed = [salt, _database(frame[COLUMN])]
    else:
        hashed = [salt, *(column_hashes(frame[c]) for c in columns)]
    return combine_hash_arrays(iter(hashed), len(hashed)).view(np.int64)


def _database(s: pd.Series) -> np.ndarray:
    if pd.api.types.is_integer_dtype(s.dtype):  # PostgreSQL's hash
        return s.to_numpy(dtype=np.int64).view(np.uint64)
    return _texts(s.to_numpy(dtype=object))  # SQLite's JSON, as bytes


def column_hashes(s: pd.Series) -> np.ndarray:
    dtype = s.dtype
    if pd.api.types.is_bool_dtype(dtype):
        out = np.where(s.fillna(False).to_numpy(dtype=bool), TRUE, FALSE)
    elif pd.api.types.is_integer_dtype(dtype):
        out = pd.util.hash_array(s.fillna(0).to_numpy(dtype=np.int64))
    elif pd.api.types.is_float_dtype(dtype):
        out = _floats(s.to_numpy(dtype=np.float64, na_value=np.nan))
    elif pd.api.types.is_datetime64_any_dtype(dtype):
        if getattr(dtype, "tz", None) is not None:
            s = s.dt.tz_convert("UTC").dt.tz_localize(None)
        micros = s.to_numpy(dtype="datetime64[us]").view(np.int64)
        out = pd.util.hash_array(micros) ^ np.uint64(0x5DA7E)  # apart from the integer of the same value
    else:  # text, or objects: str() of each distinct value
        values = s.to_numpy(dtype=object)
        if dtype == object and pd.api.types.infer_dtype(values, skipna=True) in ("date", "datetime"):
            try:  # Python dates and datetimes (a driver's DATE): as the datetime64 they equal
                return column_hashes(pd.Series(pd.to_datetime(values, utc=True)))
            except (ValueError, OverflowError):  # out of datetime64's range: their text
                pass
        return _objects(values)
    out[s.isna().to_numpy()] = NULL
    return out


def _objects(values: np.ndarray) -> np.ndarray:
    codes = uniques = None
    try:  # few distinct values (plans, countries): hash each distinct one; judged on a sample
        sample = values[:: max(1, len(values) // _SAMPLE)]  # spread over the chunk, which may be sorted
        if len(pd.unique(sample)) * 2 <= len(sample):
            codes, uniques = pd.factorize(values)  # NULLs (None, NaN, NA) get code -1
    except TypeError:  # lists or dicts (JSON, arrays): their text
        pass
    if codes is None or len(uniques) * 2 > len(values):  # mostly distinct (ids, emails): hash each
        out = _texts(values)
        out[pd.isna(values)] = NULL
        return out
    return np.append(_texts(uniques), NULL)[codes]  # code -1: NULL


def _floats(x: np.ndarray) -> np.ndarray:
    """Whole floats hash as the integer they equal; others by their bits (-0.0 as 0.0)."""
    whole = np.isfinite(x) & (np.abs(x) < _MAX_EXACT)
    whole[whole] = x[whole] == np.trunc(x[whole])
    out = pd.util.hash_array(x)
    if whole.any():
        out[whole] = pd.util.hash_array(x[whole].astype(np.int64))
    return out
