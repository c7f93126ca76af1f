"""The first-pass row hash: equal values hash equal whatever dtype a chunk arrived as,
and every real difference moves the hash."""

import datetime as dt

import numpy as np
import pandas as pd

from connector.rowhash import column_hashes, row_hashes


def same(a, b) -> bool:
    return bool((column_hashes(pd.Series(a)) == column_hashes(pd.Series(b))).all())


def test_a_chunk_with_nulls_hashes_its_values_like_a_chunk_without():
    assert same(pd.Series([5, 7], dtype="int64"), pd.Series([5.0, 7.0], dtype="float64"))
    assert same(pd.Series([5, 7], dtype="int64"), pd.Series([5, 7], dtype="Int64"))
    assert same(pd.Series([True, False]), pd.Series([True, False], dtype=object))
    assert same(pd.Series([True, False]), pd.Series(["True", "False"], dtype=object))
    assert same(pd.Series(["a", "b"], dtype=object), pd.Series(["a", "b"], dtype="string"))
    when = [dt.datetime(2025, 1, 1, 12, 30), dt.datetime(2025, 2, 1)]
    assert same(pd.Series(pd.to_datetime(when)), pd.Series(pd.to_datetime(when)).dt.tz_localize("UTC"))
    assert same(pd.Series([0.0]), pd.Series([-0.0]))
    # a driver's DATE comes as Python dates: hashed as the datetime64 they equal
    days = [dt.date(1990, 5, 17), None, dt.date(2001, 1, 1)]
    assert same(pd.Series(days, dtype=object), pd.Series(pd.to_datetime(days)))
    assert same(pd.Series(when, dtype=object), pd.Series(pd.to_datetime(when)))
    # dates past datetime64's range still hash, by their text, and apart
    far = pd.Series([dt.date(1, 1, 1), dt.date(9999, 12, 31), None], dtype=object)
    assert len(set(column_hashes(far))) == 3


def test_null_is_apart_from_every_text_and_number():
    nulls = column_hashes(pd.Series([None, np.nan, pd.NA], dtype=object))
    assert len(set(nulls)) == 1
    for other in (["None"], ["nan"], [""], [0], [0.0], [False]):
        assert not same([None], other), other
    assert same(pd.Series([1.0, None]), pd.Series([1, None], dtype="Int64"))


def test_every_difference_moves_the_hash():
    pairs = [(["a"], ["b"]), ([1], [2]), ([1.5], [1.25]), ([2**60], [2**60 + 1]), ([True], [False]),
             ([dt.datetime(2025, 1, 1)], [dt.datetime(2025, 1, 1, 0, 0, 1)]), ([[1, 2]], [[2, 1]]),
             ([dt.date(2025, 1, 1)], [dt.date(2025, 1, 2)]),
             ([{"a": 1}], [{"a": 2}])]
    for a, b in pairs:
        assert not same(a, b), (a, b)


def test_row_hash_covers_every_column_in_order_and_the_fingerprint():
    frame = pd.DataFrame({"x": ["a", "b"], "y": ["b", "a"]})
    h = row_hashes(frame, ["x", "y"], "mapping-1")
    assert h.dtype == np.int64 and h[0] != h[1]
    assert (row_hashes(frame, ["x", "y"], "mapping-1") == h).all()
    assert (row_hashes(frame, ["y", "x"], "mapping-1") != h).all()
    assert (row_hashes(frame, ["x", "y"], "mapping-2") != h).all()
    assert (row_hashes(frame, ["x"], "mapping-1") != h).all()
