"""The diff's first pass: a 64-bit hash of each user's *source* row, a column at a time.

Hashing the values as read (not their coerced wire form) lets a plan coerce only the
users whose hash moved: unchanged users cost one hash and one comparison. The mapping's
fingerprint (each attribute's column, name, rule and wire type) is folded in, so a
changed mapping or format moves every hash once and the second pass decides.

A value hashes the same whatever dtype its chunk arrived as: 5 and 5.0 alike (integer
columns with NULLs come as floats), NULL apart from every text (also 'None'), booleans
as the text 'True'/'False' (as an object column of them is hashed), Python dates and
datetimes as the datetime64 they equal. A column that comes
as another dtype in another run (datetime64 in one, objects in the next) can only move a
hash, never hide a change: the second pass, against the delivered payload, decides.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pandas.core.util.hashing import combine_hash_arrays

KEY = "usersync-rows-v1"
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


def row_hashes(frame: pd.DataFrame, columns: list[str], fingerprint: str) -> np.ndarray:
    """One signed 64-bit hash per row of ``frame`` over ``columns`` (in order) and ``fingerprint``."""
    n = len(frame)
    salt = np.full(n, _texts([fingerprint])[0], dtype=np.uint64)
    hashed = [salt, *(column_hashes(frame[c]) for c in columns)]
    return combine_hash_arrays(iter(hashed), len(hashed)).view(np.int64)


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
