"""Coercion of warehouse columns to a vendor's wire types, a whole column at a time.

:func:`column` turns a pandas Series into (values, errors) as a :class:`~connector.wire.Coercer`
says: ``values`` holds the wire value of every row (``NA`` where the source is NULL or the
row is bad) and ``errors`` a reason string for the rows that cannot be coerced — those users
are set aside, the others go on. Lists are held as canonical JSON text so that every wire
value is a hashable scalar; :func:`decode` turns them back into lists for the payload.

The only module that needs pandas and numpy for the vendors' types: a config is read, and
a DAG parsed, without them (``connector.wire`` holds the types as data).
"""

from __future__ import annotations

import decimal
import functools
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from connector.wire import Coercer

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


def column(c: Coercer, s: pd.Series, label: str) -> tuple[pd.Series, pd.Series]:
    """(values, errors) of one column written as ``c`` says (see the module's docs)."""
    values, bad, *why = _KINDS[c.kind](c, s)
    errors = pd.Series(None, index=s.index, dtype=object)
    if bad.any():
        notes = why[0][bad] if why else [None] * int(bad.sum())
        errors[bad] = [f"{label}: {_show(v)} is not a valid {c.kind}" + (f" ({n})" if isinstance(n, str) else "")
                       for v, n in zip(s[bad], notes)]
    values = values.where(~bad)
    if c.kind in ("string", "datetime", "date", "list") and (c.max_chars or c.max_bytes):
        size_bad = oversize(c, values)
        if size_bad.any():
            errors[size_bad] = [f"{label}: value too long ({_show(v)})" for v in values[size_bad]]
            values = values.where(~size_bad)
    return values, errors


# -- one function per kind: (values, bad mask) -------------------------------------
def _string(c: Coercer, s):
    if is_text(s):  # already text: nothing to convert, nothing nested
        return s.astype(object).where(s.notna()), pd.Series(False, index=s.index)
    # only an object column can hold lists (a datetime column's map would come back as datetimes)
    nested = (s.map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray))).astype(bool) if s.dtype == object
              else pd.Series(False, index=s.index))
    present = s.notna() & ~nested
    if pd.api.types.is_float_dtype(s):  # 1.0 -> "1" reads as the warehouse meant it; the rest in full
        text = s.map(lambda v: _float_text(v) if pd.notna(v) else None)
    elif pd.api.types.is_bool_dtype(s):
        text = s.map(lambda v: ("true" if v else "false") if pd.notna(v) else None)
    else:
        text = s.where(present).map(lambda v: v if isinstance(v, str) or v is None or v is pd.NA else str(v))
    return text.astype(object).where(present), nested.astype(bool)

# Numbers arrive exact or not at all: an integer is never taken through a float (past 2^53
# that rounds it to another integer), and a value the vendor type cannot hold exactly
# (beyond a Long's 64 bits, a fraction in a Long, an integer a Double cannot hold) is bad.
def _long(c: Coercer, s):
    if pd.api.types.is_bool_dtype(s):
        s = s.astype("Int64")
    if pd.api.types.is_integer_dtype(s):  # int64 / Int64: exact already
        try:
            return s.astype("Int64"), pd.Series(False, index=s.index)
        except (OverflowError, TypeError, ValueError):  # unsigned past 2^63: one by one
            pass
    elif pd.api.types.is_float_dtype(s):  # the warehouse's own doubles: whole ones within 64 bits
        x = s.to_numpy(dtype=np.float64, na_value=np.nan)
        present = ~np.isnan(x)
        with np.errstate(invalid="ignore"):
            ok = present & np.isfinite(x) & (x == np.trunc(x)) & (x >= -(2.0**63)) & (x < 2.0**63)
        out = pd.array(np.where(ok, x, 0).astype(np.int64), dtype="Int64")
        out[~ok] = pd.NA
        bad = pd.Series(present & ~ok, index=s.index)
        return pd.Series(out, index=s.index), bad, _notes(s, bad, _LONG_RANGE)
    return _exactly(s, _exact_long, "Int64")

def _double(c: Coercer, s):
    if pd.api.types.is_float_dtype(s):
        x = s.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = pd.Series(~np.isnan(x) & ~np.isfinite(x), index=s.index)
        return s.astype("Float64"), bad
    if pd.api.types.is_bool_dtype(s):
        s = s.astype("Int64")
    if pd.api.types.is_integer_dtype(s) and not pd.api.types.is_unsigned_integer_dtype(s):
        x = s.to_numpy(dtype=np.int64, na_value=0)
        big = (x > _MAX_EXACT) | (x < -_MAX_EXACT)  # (not abs: -2^63 has none in int64)
        if not big.any():
            return s.astype("Float64"), pd.Series(False, index=s.index)
    return _exactly(s, _exact_double, "Float64")

def _boolean(c: Coercer, s):
    present = s.notna()
    if pd.api.types.is_bool_dtype(s):
        out = s.astype("boolean")
    else:
        out = _each_distinct(s, _to_bool, is_text(s) or _kind(s) == "boolean").astype("boolean")
    bad = present & out.isna()
    return (out.astype("Int64") if c.bool_as_int else out), bad

def _datetime(c: Coercer, s):
    present = s.notna()
    parsed = _to_datetime(s)
    bad = present & parsed.isna()
    return _format(parsed, c.fmt or "%Y-%m-%dT%H:%M:%SZ"), bad

def _date(c: Coercer, s):
    present = s.notna()
    parsed = _to_datetime(s)
    bad = present & parsed.isna()
    return _format(parsed, c.fmt or "%Y-%m-%d"), bad

def _list(c: Coercer, s):
    out = _each_distinct(s.astype(object), functools.partial(_one_list, c), is_text(s))
    bad = out.map(lambda v: isinstance(v, _Bad))
    return out.where(~bad), bad

def _one_list(c: Coercer, v: Any) -> Any:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v) if v.strip() else []
        except ValueError:
            return _Bad()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        return _Bad()
    if c.max_items is not None and len(v) > c.max_items:
        return _Bad()
    try:
        items = [_ITEM[c.item](x) for x in v]
    except (TypeError, ValueError):
        return _Bad()
    return json.dumps(items, ensure_ascii=False, separators=(",", ":"))

def oversize(c: Coercer, values: pd.Series) -> pd.Series:
    text = values.astype(object)
    mask = pd.Series(False, index=values.index)
    present = text.notna()
    if c.max_chars:
        mask |= present & text.map(lambda v: isinstance(v, str) and len(v) > c.max_chars)
    if c.max_bytes:
        mask |= present & text.map(lambda v: isinstance(v, str) and len(v.encode()) > c.max_bytes)
    return mask.astype(bool)


_KINDS = {"string": _string, "long": _long, "double": _double, "boolean": _boolean, "datetime": _datetime,
          "date": _date, "list": _list}


def as_text(c: Coercer, values: pd.Series, errors: pd.Series, label: str) -> tuple[pd.Series, pd.Series]:
    """Numbers and booleans, coerced already, written as text (decimal; ``true``/``false``) for a
    vendor whose every value is a string: the snapshot then holds exactly the string the vendor
    holds, and ``c``'s size limit is checked on that string (an oversize value sets aside its
    user alone)."""
    if c.kind in ("long", "double", "boolean"):
        values = pd.Series([_text(v) for v in values.astype(object)], index=values.index, dtype=object)
        big = oversize(c, values)
        if big.any():
            errors[big] = [f"{label}: value too long ({v!r})" for v in values[big]]
            values = values.where(~big)
    return values, errors


def _text(v: Any) -> str | None:
    """A number or boolean as text: decimal, 'true'/'false'."""
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # shortest text that reads back as the same number
    return str(int(v))


class _Bad:
    """Marks a cell that could not be coerced (``note``: why, beyond "not a valid ...")."""

    def __init__(self, note: str | None = None):
        self.note = note


_MAX_EXACT = 2**53  # every integer up to this has a double; past it, not every one
_LONG_RANGE = "a Long holds -2^63 to 2^63-1"
_INEXACT = "a Double holds integers exactly only up to 2^53"
_NESTED = (list, tuple, dict, np.ndarray)


def _exact_long(v: Any) -> Any:
    """``v`` as a Python int, exactly; None for NULL; a _Bad when it is no integer within 64 bits."""
    if isinstance(v, _NESTED):
        return _Bad()
    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return None
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, str):
        text = v.strip()
        try:
            v = int(text)
        except ValueError:
            try:
                v = decimal.Decimal(text)
            except decimal.InvalidOperation:
                return _Bad()
    if isinstance(v, (int, np.integer)):
        n = int(v)
    elif isinstance(v, (float, np.floating)):
        if not math.isfinite(v) or not float(v).is_integer():
            return _Bad()
        n = int(v)
    elif isinstance(v, decimal.Decimal):
        if not v.is_finite() or v != v.to_integral_value():
            return _Bad()
        n = int(v)
    else:
        return _Bad()
    return n if -(2**63) <= n < 2**63 else _Bad(_LONG_RANGE)


def _exact_double(v: Any) -> Any:
    """``v`` as a float; None for NULL; a _Bad when it is not finite, or an integer no double
    holds exactly (a fraction goes to the nearest double: that is what a Double is)."""
    if isinstance(v, _NESTED):
        return _Bad()
    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return None
    if isinstance(v, str):
        text = v.strip()
        try:
            v = int(text)
        except ValueError:
            try:
                v = float(text)
            except ValueError:
                return _Bad()
    if isinstance(v, decimal.Decimal) and v.is_finite() and v == v.to_integral_value():
        v = int(v)
    if isinstance(v, (bool, np.bool_, int, np.integer)):
        f = float(int(v))
        return f if int(f) == int(v) else _Bad(_INEXACT)
    if isinstance(v, (float, np.floating, decimal.Decimal)):
        f = float(v)
        return f if math.isfinite(f) else _Bad()
    return _Bad()


def _exactly(s: pd.Series, convert, dtype: str):
    """(values, bad, notes) of a column converted value by value (once per distinct text)."""
    out = _each_distinct(s.astype(object), convert, is_text(s))
    bad = out.map(lambda v: isinstance(v, _Bad)).astype(bool)
    notes = out.map(lambda v: v.note if isinstance(v, _Bad) else None)
    values = pd.Series(pd.array([None if b else v for v, b in zip(out, bad)], dtype=dtype), index=s.index)
    return values, bad, notes


def _notes(s: pd.Series, bad: pd.Series, note: str) -> pd.Series:
    """``note`` for the bad values that are integers out of range, None for the rest."""
    x = s.to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        out_of_range = bad.to_numpy() & np.isfinite(x) & (x == np.trunc(x))
    return pd.Series(np.where(out_of_range, note, None), index=s.index, dtype=object)


def _float_text(v: float) -> str:
    """A double as text that reads back as the same number: whole ones as integers."""
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < _MAX_EXACT else repr(v)


def _long_item(x: Any) -> int:
    n = None if isinstance(x, (bool, np.bool_)) else _exact_long(x)
    if n is None or isinstance(n, _Bad):
        raise ValueError(x)
    return n


def _double_item(x: Any) -> float:
    f = None if isinstance(x, (bool, np.bool_)) else _exact_double(x)
    if f is None or isinstance(f, _Bad):
        raise ValueError(x)
    return f


def _string_item(x: Any) -> str:
    if x is None or isinstance(x, (list, dict)):
        raise ValueError(x)
    return str(x)


_ITEM = {"string": _string_item, "long": _long_item, "double": _double_item}


def _to_bool(v: Any) -> Any:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, float) and v in (0.0, 1.0):
        return bool(v)
    if isinstance(v, str):
        low = v.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    return None


def _to_datetime(s: pd.Series) -> pd.Series:
    """Parse to UTC timestamps; naive values are taken as UTC, bad ones become NaT."""
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        return s.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_dtype(s):
        return s.dt.tz_localize("UTC")
    if _kind(s) in ("string", "date", "datetime"):  # parse each distinct value once
        codes, uniques = pd.factorize(s)
        parsed = _parse_datetime(pd.Series(uniques.astype(object)))
        return pd.Series(parsed.array.take(codes, allow_fill=True), index=s.index)
    return _parse_datetime(s)


def _parse_datetime(s: pd.Series) -> pd.Series:
    obj = s.astype(object)
    ok = obj.map(lambda v: isinstance(v, (str, pd.Timestamp)) or hasattr(v, "isoformat"))
    with np.errstate(all="ignore"):
        try:
            return pd.to_datetime(obj.where(ok), errors="coerce", utc=True, format="mixed")
        except (ValueError, TypeError, OverflowError):
            return obj.map(_one_datetime)


def _one_datetime(v: Any) -> Any:
    try:
        return pd.to_datetime(v, utc=True)
    except (ValueError, TypeError, OverflowError):
        return pd.NaT


# strftime patterns that are numpy's ISO 8601 text at some unit, plus a suffix
_ISO = {"%Y-%m-%d": ("D", ""), "%Y-%m-%dT%H:%M:%SZ": ("s", "Z"), "%Y-%m-%dT%H:%M:%S.%3fZ": ("ms", "Z"),
        "%Y-%m-%dT%H:%M:%S": ("s", ""), "%Y-%m-%d %H:%M:%S": ("s", "")}


def _format(ts: pd.Series, fmt: str) -> pd.Series:
    present = ts.notna()
    if fmt in _ISO and present.any() and ts[present].dt.year.min() >= 1000:  # C speed, same text
        unit, suffix = _ISO[fmt]
        text = np.datetime_as_string(ts.dt.tz_localize(None).to_numpy().astype(f"datetime64[{unit}]"))
        if " " in fmt:
            text = np.strings.replace(text, "T", " ")
        return pd.Series(np.strings.add(text, suffix), index=ts.index, dtype=object).where(present)
    if "%3f" in fmt:
        head, tail = fmt.split("%3f", 1)
        ms = (ts.dt.microsecond // 1000).astype("Int64").astype(str).str.zfill(3)
        text = ts.dt.strftime(head) + ms + ts.dt.strftime(tail) if tail else ts.dt.strftime(head) + ms
    else:
        text = ts.dt.strftime(fmt)
    return text.astype(object).where(ts.notna())


def _kind(s: pd.Series) -> str:
    return pd.api.types.infer_dtype(s, skipna=True)


def is_text(s: pd.Series) -> bool:
    """Only str and NULLs (a text column, whatever its dtype)."""
    if isinstance(s.dtype, pd.StringDtype):
        return True
    return s.dtype == object and _kind(s) in ("string", "empty")


def _each_distinct(s: pd.Series, fn, one_kind: bool) -> pd.Series:
    """``s.map(fn)``, calling ``fn`` once per distinct value when the column holds one kind
    of value (text, flags: they repeat a lot; mixed kinds would merge 1 with True)."""
    if not one_kind:
        return s.map(fn)
    codes, uniques = pd.factorize(s)
    out = np.empty(len(uniques) + 1, dtype=object)
    out[:-1] = [fn(u) for u in uniques]
    out[-1] = fn(None)  # code -1: NULL
    return pd.Series(out[codes], index=s.index, dtype=object)


def _show(v: Any) -> str:
    text = repr(v.item() if isinstance(v, np.generic) else v)
    return text if len(text) <= 60 else text[:57] + "..."


def decode_column(coercer: Coercer, values: pd.Series) -> list[Any]:
    """:func:`decode` of a whole column of wire values (lists parsed once per distinct text)."""
    if coercer.kind == "list":
        return _each_distinct(values, lambda v: decode(coercer, v), True).tolist()
    return values.astype(object).where(values.notna(), None).tolist()  # nullable arrays give Python scalars


def decode(coercer: Coercer, value: Any) -> Any:
    """A wire value as it goes into JSON (lists back from their canonical text)."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if coercer.kind == "list":
        return json.loads(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
