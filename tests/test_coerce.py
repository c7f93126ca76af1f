"""Coercion to wire types: good values converted, bad ones set aside with a reason."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from connector.coerce import Coercer, decode


def coerce(kind: str, values: list, **kw):
    out, errors = Coercer(kind, **kw)(pd.Series(values, dtype=object), "attr")
    return [decode(Coercer(kind, **kw), v) for v in out], [e if isinstance(e, str) else None for e in errors]


def test_long_accepts_integral_and_rejects_the_rest():
    vals, errs = coerce("long", [1, "2", 3.0, 2.5, "x", None, float("inf"), True, [1]])
    assert vals[:3] == [1, 2, 3] and vals[5] is None and vals[7] == 1
    assert [e is not None for e in errs] == [False, False, False, True, True, False, True, False, True]
    assert "attr: 2.5 is not a valid long" == errs[3]


def test_double_rejects_nan_and_inf_strings():
    vals, errs = coerce("double", [1.5, "2.25", "nan", "-inf", None])
    assert vals[:2] == [1.5, 2.25] and vals[4] is None
    assert errs[2] and errs[3] and not errs[4]


def test_boolean_words_and_numbers():
    vals, errs = coerce("boolean", [True, 0, "yes", "FALSE", "maybe", 2, None])
    assert vals[:4] == [True, False, True, False] and errs[4] and errs[5] and vals[6] is None
    ints, _ = coerce("boolean", [True, False], bool_as_int=True)
    assert ints == [1, 0]


def test_datetime_naive_is_utc_aware_is_converted_and_millis_kept():
    seoul = dt.timezone(dt.timedelta(hours=9))
    vals, errs = coerce("datetime", ["2026-03-01 10:00:00", dt.datetime(2026, 3, 1, 10, 0, 0, 123456, tzinfo=seoul),
                                     "2026-13-45", None], fmt="%Y-%m-%dT%H:%M:%S.%3fZ")
    assert vals[0] == "2026-03-01T10:00:00.000Z"
    assert vals[1] == "2026-03-01T01:00:00.123Z"
    assert errs[2] and vals[3] is None


def test_list_from_json_text_native_lists_and_arrays():
    vals, errs = coerce("list", ['["a","b"]', ["x", 1], np.array(["p"]), "[", "scalar", None, "[]"])
    assert vals[0] == ["a", "b"] and vals[1] == ["x", "1"] and vals[2] == ["p"] and vals[6] == []
    assert errs[3] and errs[4] and vals[5] is None
    longs, lerrs = coerce("list", ["[1, 2]", '["a"]'], item="long")
    assert longs[0] == [1, 2] and lerrs[1]


def test_string_limits_in_chars_and_bytes_and_no_nested_values():
    vals, errs = coerce("string", ["ok", "x" * 11, "한글한글", ["nested"], 12, 1.0], max_chars=10, max_bytes=10)
    assert vals[0] == "ok" and vals[4] == "12" and errs[1] and errs[2] and errs[3]
    assert vals[2] is None  # 12 bytes of UTF-8: over the limit, set aside
    emoji, eerrs = coerce("string", ["🎉 party"])
    assert emoji == ["🎉 party"] and eerrs == [None]
