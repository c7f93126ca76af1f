"""The first pass's sorted key digests: found by the first 64 bits, confirmed by the second."""

import numpy as np
import pandas as pd

from connector import plan, state
from connector.plan import KeySet, Sorted, digest


def pairs(*values):
    return np.array(values, dtype=np.uint64).reshape(-1, 2)


def test_digests_found_with_their_values_and_strangers_not():
    keys = np.array([f"u{i}" for i in range(1000)], dtype=object)
    table = Sorted(digest(keys), np.arange(1000, dtype=np.int64))
    query = np.array(["u17", "nobody", "u999", "u0"], dtype=object)
    pos, found = table.find(digest(query))
    assert found.tolist() == [True, False, True, True]
    assert table.values[0][pos[found]].tolist() == [17, 999, 0]


def test_equal_first_halves_are_told_apart_by_the_second():
    # three digests share their first half (odds 2^-64 a pair in life; forced here)
    table = Sorted(pairs(7, 30, 5, 1, 7, 10, 7, 20, 9, 1), np.array([0, 1, 2, 3, 4]))
    assert table.ties
    pos, found = table.find(pairs(7, 20, 7, 10, 7, 30, 7, 99, 9, 1, 9, 2, 8, 1))
    assert found.tolist() == [True, True, True, False, True, False, False]
    assert table.values[0][pos[found]].tolist() == [3, 2, 0, 4]


def test_an_empty_table_finds_nothing():
    pos, found = Sorted(pairs()).find(pairs(1, 2))
    assert not found.any() and len(pos) == 1


def test_keyset_remembers_every_chunk_across_merges():
    seen = KeySet()
    chunks = [np.array([f"k{c}-{i}" for i in range(n)], dtype=object) for c, n in enumerate([5, 3, 8, 1, 13])]
    for chunk in chunks:
        seen.add(digest(chunk))
    assert len(seen) == 30 and len(seen.runs) < 5
    everyone = np.concatenate(chunks)
    assert seen.contains(digest(everyone)).all()
    assert not seen.contains(digest(np.array(["k0-5", "k9-0", ""], dtype=object))).any()
    # a key that shares only a first half with a known one is not known
    known = digest(everyone[:1])
    assert not seen.contains(pairs(known[0, 0], known[0, 1] ^ np.uint64(1))).any()


def test_a_full_scan_finds_the_snapshot_of_an_in_memory_state_database():
    """The snapshot loads on a thread only where a thread's connection sees the same database."""
    eng = state.connect("sqlite://")
    with eng.begin() as c:
        state.upsert_snapshot(c, "s", 1, [("u1", {"a": 1}, 42)])
    snap = plan.Snapshot(eng, "s", whole=True)
    keys = np.array(["u1", "u2"], dtype=object)
    known, hashes = snap.lookup(keys, digest(keys))
    assert known.tolist() == [True, False] and hashes.tolist() == [42, 0]


def test_a_datetime_identity_is_kept_as_the_text_its_key_was_built_from():
    ts = pd.Timestamp("2024-01-02 03:04:05", tz="UTC")
    kept = state.loads(state.dumps({"signed_up": plan.identity_value(ts)}))["signed_up"]
    assert kept == plan.key_of((ts,)) == "2024-01-02 03:04:05+00:00"
