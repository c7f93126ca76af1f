"""Coercion of warehouse columns to a vendor's wire types, a whole column at a time.

Each :class:`Coercer` turns a pandas Series into (values, errors): ``values`` holds the
wire value of every row (``NA`` where the source is NULL or the row is bad) and
``errors`` a reason string for the rows that cannot be coerced — those users are set
aside, the others go on. Lists are held as canonical JSON text so that every wire
value is a hashable scalar; :func:`decode` turns them back into lists for the payload.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pandas as pd

KINDS = ("string", "long", "double", "boolean", "datetime", "date", "list")
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


@dataclasses.dataclass(frozen=True)
class Coercer:
    """How one vendor type is written on the wire.

    ``fmt`` is a strftime pattern for datetime/date; ``%3f`` stands for milliseconds.
    ``item`` is the element kind of a list. Limits are checked here so that an
    oversize value rejects its user before anything is sent.
    """

    kind: str
    fmt: str | None = None
    item: str = "string"
    max_chars: int | None = None
    max_bytes: int | None = None
    max_items: int | None = None
    bool_as_int: bool = False

    @property
    def numeric(self) -> bool:
        return self.kind in ("long", "double")

    def __call__(self, s: pd.Series, label: str) -> tuple[pd.Series, pd.Series]:
        values, bad = getattr(self, "_" + self.kind)(s)
        errors = pd.Series(None, index=s.index, dtype=object)
        if bad.any():
            errors[bad] = [f"{label}: {_show(v)} is not a valid {self.kind}" for v in s[bad]]
        values = values.where(~bad)
        if self.kind in ("string", "datetime", "date", "list") and (self.max_chars or self.max_bytes):
            size_bad = self._oversize(values)
            if size_bad.any():
                errors[size_bad] = [f"{label}: value too long ({_show(v)})" for v in values[size_bad]]
                values = values.where(~size_bad)
        return values, errors

    # -- one method per kind: (values, bad mask) ---------------------------------------
    def _string(self, s):
        if _is_text(s):  # already text: nothing to convert, nothing nested
            return s.astype(object).where(s.notna()), pd.Series(False, index=s.index)
        # only an object column can hold lists (a datetime column's map would come back as datetimes)
        nested = (s.map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray))).astype(bool) if s.dtype == object
                  else pd.Series(False, index=s.index))
        present = s.notna() & ~nested
        if pd.api.types.is_float_dtype(s):  # 1.0 -> "1" reads as the warehouse meant it
            text = s.map(lambda v: format(v, "g") if pd.notna(v) else None)
        elif pd.api.types.is_bool_dtype(s):
            text = s.map(lambda v: ("true" if v else "false") if pd.notna(v) else None)
        else:
            text = s.where(present).map(lambda v: v if isinstance(v, str) or v is None or v is pd.NA else str(v))
        return text.astype(object).where(present), nested.astype(bool)

    def _number(self, s):
        present = s.notna()
        if s.dtype == object or pd.api.types.is_string_dtype(s):
            obj = s.astype(object)
            scalar = obj.map(lambda v: not isinstance(v, (list, tuple, dict, np.ndarray)))
            num = pd.to_numeric(obj.where(scalar), errors="coerce")
        else:
            num = pd.to_numeric(s, errors="coerce")
        num = num.astype("float64") if not pd.api.types.is_integer_dtype(num) else num
        bad = present & (num.isna() | ~np.isfinite(num.astype("float64")))
        return num, bad

    def _long(self, s):
        if pd.api.types.is_bool_dtype(s):
            s = s.astype("Int64")
        num, bad = self._number(s)
        if not pd.api.types.is_integer_dtype(num):
            frac = num.notna() & ~bad & (num.astype("float64") % 1 != 0)
            bad = bad | frac
            num = num.where(~bad).round()
        too_big = num.notna() & (num.astype("float64").abs() > 2**63 - 1)
        bad = bad | too_big
        return num.where(~bad).astype("Int64"), bad

    def _double(self, s):
        num, bad = self._number(s)
        return num.where(~bad).astype("Float64"), bad

    def _boolean(self, s):
        present = s.notna()
        if pd.api.types.is_bool_dtype(s):
            out = s.astype("boolean")
        else:
            out = _each_distinct(s, _to_bool, _is_text(s) or _kind(s) == "boolean").astype("boolean")
        bad = present & out.isna()
        return (out.astype("Int64") if self.bool_as_int else out), bad

    def _datetime(self, s):
        present = s.notna()
        parsed = _to_datetime(s)
        bad = present & parsed.isna()
        return _format(parsed, self.fmt or "%Y-%m-%dT%H:%M:%SZ"), bad

    def _date(self, s):
        present = s.notna()
        parsed = _to_datetime(s)
        bad = present & parsed.isna()
        return _format(parsed, self.fmt or "%Y-%m-%d"), bad

    def _list(self, s):
        out = _each_distinct(s.astype(object), self._one_list, _is_text(s))
        bad = out.map(lambda v: isinstance(v, _Bad))
        return out.where(~bad), bad

    def _one_list(self, v: Any) -> Any:
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
        if self.max_items is not None and len(v) > self.max_items:
            return _Bad()
        try:
            items = [_ITEM[self.item](x) for x in v]
        except (TypeError, ValueError):
            return _Bad()
        return json.dumps(items, ensure_ascii=False, separators=(",", ":"))

    def _oversize(self, values: pd.Series) -> pd.Series:
        text = values.astype(object)
        mask = pd.Series(False, index=values.index)
        present = text.notna()
        if self.max_chars:
            mask |= present & text.map(lambda v: isinstance(v, str) and len(v) > self.max_chars)
        if self.max_bytes:
            mask |= present & text.map(lambda v: isinstance(v, str) and len(v.encode()) > self.max_bytes)
        return mask.astype(bool)


class _Bad:
    """Marks a list cell that could not be coerced."""


def _long_item(x: Any) -> int:
    if isinstance(x, bool) or x is None:
        raise ValueError(x)
    f = float(x)
    if not math.isfinite(f) or f % 1:
        raise ValueError(x)
    return int(f)


def _double_item(x: Any) -> float:
    if isinstance(x, bool) or x is None:
        raise ValueError(x)
    f = float(x)
    if not math.isfinite(f):
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


def _is_text(s: pd.Series) -> bool:
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
    text = repr(v)
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
