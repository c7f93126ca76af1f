"""The contract every vendor keeps, end to end, for every case of ``vendor_cases.CASES``: a real
warehouse (SQLite / PostgreSQL / MariaDB), the real engine, the vendor's emulator over HTTP.

The first run leaves the vendor equal to the warehouse; a run with no change sends nothing,
and so does a change in a column the sync does not map; a user whose payload the vendor
refuses is recorded with the vendor's code and delivered by the next run; a transient error
is retried within the run. What a vendor does beyond this is in its own test file."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from connector import config, state, vendors
from connector.vendors import emulator
from vendor_cases import CASES, VendorCase, match
from warehouse import T0, make_users, run, table, update_users, user_row, write_config

LATER = T0 + dt.timedelta(hours=1)


def held(emu) -> dict[str, dict]:
    """What the vendor holds, by user key as text, lists order-free."""
    return {str(k): _unordered(v) for k, v in emu.state().items()}


def _unordered(attrs: dict) -> dict:
    return {a: sorted(v) if isinstance(v, list) else v for a, v in attrs.items()}


@pytest.fixture(params=list(CASES.values()), ids=list(CASES))
def world(request, db_url, tmp_path, monkeypatch):
    """(case, config path, warehouse rows, database URL, the emulator) for one vendor case."""
    case: VendorCase = request.param
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    rows = [user_row(i, points=case.first_points(i)) for i in range(case.users)]
    make_users(db_url, rows).dispose()
    path = write_config(tmp_path / "syncs.yaml", db_url, [case.sync("http://127.0.0.1:9")])
    emu = vendors.emulator_module(case.vendor).emulator(config.load(path)[0].syncs)
    with emulator.Running(emu) as running:
        write_config(path, db_url, [case.sync(running.url)])
        yield case, path, rows, db_url, emu


def name_of(path) -> str:
    return config.load(path)[0].syncs[0].name


def test_first_run_equals_the_warehouse_and_no_change_sends_nothing(world):
    case, path, rows, url, emu = world
    n, name = len(rows), name_of(path)
    s = run(path, name)
    assert (s.status, s.users_read, s.users_changed, s.users_delivered) == ("success", n, n, n)
    assert held(emu) == {case.key(r): _unordered(case.expected(r)) for r in rows}
    assert len(table(url, state.snapshot)) == n

    sent = len(emu.log)
    again = run(path, name)
    assert (again.status, again.requests, again.users_changed) == ("success", 0, 0) and len(emu.log) == sent

    # a change in a column the sync does not map reads those users, and sends nothing
    column = case.unmapped
    update_users(url, {r["user_id"]: {column: _other(r[column]), "updated_at": LATER} for r in rows[:3]})
    unmapped = run(path, name)
    assert (unmapped.status, unmapped.requests, unmapped.users_changed) == ("success", 0, 0)
    assert unmapped.users_read >= 3 and len(emu.log) == sent


def _other(value):
    return value + 1000 if isinstance(value, int) else f"{value}-changed"


def test_a_rejection_is_recorded_and_delivered_next_run(world):
    case, path, rows, url, emu = world
    if case.reject is None:
        pytest.skip(f"{case.name} has no per-user rejection (it answers 200 whatever it drops)")
    b, (code, message) = rows[7], case.reject
    # every request carrying B is refused (a batch of several is split until B goes alone)
    emu.add_fault("code", code=code, match=match(case.key(b)), times=100)
    s = run(path, name_of(path))
    assert s.status == "partial" and s.users_rejected == 1 and s.users_delivered == len(rows) - 1
    fails = table(url, state.failures)
    assert [(f["user_key"], f["error_class"], f["code"]) for f in fails] == [(case.key(b), "rejected", str(code))]
    assert fails[0]["message"] == message
    assert case.key(b) not in held(emu)

    emu.faults.clear()  # next run: the cursor has moved past B, but its failure brings it back
    s2 = run(path, name_of(path))
    assert (s2.status, s2.users_delivered) == ("success", 1)
    assert held(emu) == {case.key(r): _unordered(case.expected(r)) for r in rows}
    assert table(url, state.failures) == []


def test_retryable_errors_are_retried_within_the_run(world):
    case, path, rows, url, emu = world
    a = rows[3]
    emu.add_fault("code", code=case.retry, match=match(case.key(a)), times=2)
    s = run(path, name_of(path))
    assert (s.status, s.users_delivered, s.users_failed) == ("success", len(rows), 0)
    assert held(emu) == {case.key(r): _unordered(case.expected(r)) for r in rows}
    carried = [r for r in emu.log if match(case.key(a)) in json.dumps(r["body"])]
    assert len(carried) >= 3  # refused twice, then delivered
    assert max(b["attempts"] for b in table(url, state.batches)) >= 3
    assert table(url, state.failures) == []
