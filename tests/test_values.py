"""Exact or set aside (issue 16 §3, §4, §6), end to end: real warehouses (SQLite, PostgreSQL,
MariaDB), the real engine, the vendors' emulators over HTTP on loopback.

- Integers arrive exact up to the vendor type's range, NULLs in the column or not, in values
  and in identities (2^53+1, 2^63-1, -2^63); what the type cannot hold is set aside with a
  reason, never rounded. Increments of 17 significant digits arrive exact.
- A value the vendor documents it can never take (an empty text at Jiguang, one over 50
  bytes at Tencent) sets aside that attribute only: the user's others are delivered, the
  failure is kept in ``sync_failures`` with its reason, and it is not sent, nor counted
  against a run again, until its source value changes. A no-change run sends nothing and
  exits 0. ``on_invalid: user`` sets the whole user aside instead.
- ``null: unset`` removes the attribute at Tencent (``im_remove_attr``) and EngageLab.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa

import fault_harness as h
from connector import config, engine, state
from connector.vendors import emulator
from connector.vendors.engagelab import emulator as engagelab
from connector.vendors.jiguang import emulator as jiguang
from warehouse import update_users, write_config

TOP, BOTTOM, PAST_DOUBLE = 2**63 - 1, -(2**63), 2**53 + 1
T0 = dt.datetime(2026, 1, 1, 12, 0, 0)  # as conftest's users table
LATER = [T0 + dt.timedelta(hours=h) for h in (1, 2, 3)]  # updated_at of later changes
INTS = sa.Table(
    "ints", sa.MetaData(),
    sa.Column("cuid", sa.BigInteger, index=True),  # an index an identity leads: the first pass reads by key
    sa.Column("big", sa.BigInteger),
    sa.Column("huge", sa.Numeric(30, 0)),
    sa.Column("note", sa.String(40)),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)
# cuid -> (big, huge); one NULL in each column (and a row with no identity at all)
ROWS = {9100000000000007919: (PAST_DOUBLE, None), TOP: (TOP, None), PAST_DOUBLE: (BOTTOM, None),
        7: (None, 10**20), None: (5, None)}


def _ints(url: str) -> None:
    eng = sa.create_engine(url)
    INTS.create(eng)
    with eng.begin() as c:
        c.execute(INTS.insert(), [{"cuid": k, "big": b, "huge": g, "note": f"n{i}", "updated_at": T0}
                                  for i, (k, (b, g)) in enumerate(ROWS.items())])
    eng.dispose()


def _set(url: str, cuid: int, **values) -> None:
    eng = sa.create_engine(url)
    with eng.begin() as c:
        c.execute(INTS.update().where(INTS.c.cuid == cuid).values(**values))
    eng.dispose()


def _run(cfg_path, name: str) -> engine.Summary:
    cfg, _ = config.load(cfg_path)
    return engine.run(cfg, name)


def _failures(url: str) -> dict[tuple[str, str], str]:
    eng = state.make_engine(url)
    with eng.connect() as c:
        rows = c.execute(sa.select(state.failures.c.user_key, state.failures.c.attribute, state.failures.c.message))
        out = {(k, a): m for k, a, m in rows}
    eng.dispose()
    return out


def _writes(emu, since: int = 0) -> list[dict]:
    """The requests that write (not Tencent's read of its registered names before a push)."""
    return [r for r in emu.log[since:] if not r["path"].endswith("im_get_attr_name")]


def test_integer_edge_values_and_identities_arrive_exact(db_url, tmp_path, monkeypatch):
    """Jiguang (Long values, a long CUID) and EngageLab (a long euid, NUMBER: a double) from one
    table whose BIGINT columns each hold a NULL. Full scans (no cursor): the second run goes by
    the first pass, which reads identities alone, then re-reads the moved users by identity."""
    monkeypatch.setenv("T_JG_SECRET", "jg-secret")
    monkeypatch.setenv("T_EL_KEY", "el-key")
    monkeypatch.setenv("T_EL_SECRET", "el-secret")
    _ints(db_url)
    jg = emulator.Running(jiguang.Emulator(project_id="p1", project_secret="jg-secret", attributes={
        "big": {"type": "Long"}, "huge": {"type": "Long"}, "note": {"type": "String"}}))
    el = emulator.Running(engagelab.Emulator(api_key="el-key", api_secret="el-secret",
                                             properties={"big": "NUMBER", "note": "STRING"}))
    try:
        cfg = write_config(tmp_path / "syncs.yaml", db_url, [
            {"name": "jg", "source": {"table": "ints"}, "identity": {"cuid": "cuid"},
             "vendor": {"type": "jiguang", "base_url": jg.url, "settings": {"project_id": "p1"},
                        "credentials": {"project_secret": "${T_JG_SECRET}"}, "backoff": 0.01},
             "mapping": [{"column": "big", "attribute": "big", "type": "Long"},
                         {"column": "huge", "attribute": "huge", "type": "Long"},
                         {"column": "note", "attribute": "note", "type": "String"}]},
            {"name": "el", "source": {"table": "ints"}, "identity": {"euid": "cuid"},
             "vendor": {"type": "engagelab", "base_url": el.url, "backoff": 0.01,
                        "credentials": {"api_key": "${T_EL_KEY}", "api_secret": "${T_EL_SECRET}"}},
             "mapping": [{"column": "big", "attribute": "big", "type": "NUMBER"},
                         {"column": "note", "attribute": "note", "type": "STRING"}]}])
        _run(cfg, "jg"), _run(cfg, "el")
        # every value exact, each on its own user; 10^20 is no Long: set aside, its user's note delivered
        assert jg.emulator.state() == {"9100000000000007919": {"big": PAST_DOUBLE, "note": "n0"},
                                       str(TOP): {"big": TOP, "note": "n1"},
                                       str(PAST_DOUBLE): {"big": BOTTOM, "note": "n2"}, "7": {"note": "n3"}}
        # NUMBER is a double: what it holds exactly arrives (-2^63 is a power of two), the rest is set aside
        assert el.emulator.state() == {9100000000000007919: {"note": "n0"}, TOP: {"note": "n1"},
                                       PAST_DOUBLE: {"big": float(BOTTOM), "note": "n2"}, 7: {"note": "n3"}}
        failures = _failures(db_url)
        assert "a Long holds -2^63 to 2^63-1" in failures[("7", "huge")]
        assert "a Double holds integers exactly only up to 2^53" in failures[("9100000000000007919", "big")]
        assert "a Double holds integers exactly only up to 2^53" in failures[(str(TOP), "big")]

        # one value moves by one: found by the first pass, re-read by its exact identity. 2^53+2 has
        # a double: EngageLab gets it now, and forgets that the value before was set aside
        _set(db_url, 9100000000000007919, big=PAST_DOUBLE + 1, updated_at=T0 + dt.timedelta(hours=1))
        sent = len(jg.emulator.log), len(el.emulator.log)
        assert _run(cfg, "jg").status == _run(cfg, "el").status == "success"
        assert [r["body"] for r in jg.emulator.log[sent[0]:]] == [
            {"cuid": 9100000000000007919, "data": {"big": PAST_DOUBLE + 1}}]
        assert [r["body"] for r in el.emulator.log[sent[1]:]] == [
            {"euid": 9100000000000007919, "type": "set", "properties": {"big": float(PAST_DOUBLE + 1)}}]
        del failures[("9100000000000007919", "big")]

        # nothing changed: nothing sent, and what was set aside before does not fail the run again
        for name, emu in (("jg", jg), ("el", el)):
            sent = len(emu.emulator.log)
            s = _run(cfg, name)
            assert (s.ok, s.status, s.requests, len(emu.emulator.log)) == (True, "success", 0, sent), name
        assert _failures(db_url).keys() == failures.keys()  # still open, for `usersync status`
    finally:
        jg.stop()
        el.stop()


def test_float_increments_arrive_exact(tmp_path, monkeypatch):
    """Jiguang accumulate: the difference of the two values as their JSON says, all 17 digits."""
    case = h.setup("jiguang", tmp_path, monkeypatch.setenv)
    try:
        spec = h.sync_dict("jiguang", case.running.url)
        spec["mapping"] = [{"column": "ltv", "attribute": "ltv", "type": "Number", "rule": "accumulate"}]
        case.emu.attributes["ltv"] = {"type": "number", "rule": "accumulate"}
        write_config(case.cfg_path, case.url, [spec])
        update_users(case.url, {"u00001": {"ltv": 1234.5678901234567, "updated_at": LATER[0]}})
        assert case.run().ok
        assert case.held()[case.keys[1]]["ltv"] == 1234.5678901234567  # was 1234.567890123
        update_users(case.url, {"u00001": {"ltv": 1234.6789012345678, "updated_at": LATER[1]}})
        sent = len(case.emu.log)
        assert case.run().ok
        (request,) = case.emu.log[sent:]
        # the two values' difference as written, not the doubles' (0.11101111111111095), nor cut (0.111011111)
        assert request["body"]["data"] == {"ltv": 0.1110111111111}
        assert case.held()[case.keys[1]]["ltv"] == 1234.5678901234567 + 0.1110111111111
    finally:
        case.running.stop()


# vendor, mapped attribute, a value it can never take (SQL), the reason said, a value it can
REFUSED = [
    ("jiguang", "membership", "plan", "", "empty value (Jiguang refuses empty values: 40009)", "pro"),
    ("tencent_im", "membership", "plan", "x" * 51, "membership: value too long", "pro"),
    ("engagelab", "membership", "plan", "", "empty value (EngageLab refuses empty values: 55103)", "pro"),
    ("moengage", "membership", "plan", "x" * 513, "membership: value too long", "pro"),
]


@pytest.mark.parametrize("vendor, attribute, column, bad, reason, good", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_refused_value_sets_aside_its_attribute_until_it_changes(vendor, attribute, column, bad, reason, good,
                                                                   tmp_path, monkeypatch):
    case = h.setup(vendor, tmp_path, monkeypatch.setenv)
    try:
        assert case.run().ok
        key, before = case.keys[3], case.held()[case.keys[3]]
        update_users(case.url, {"u00003": {column: bad, "ltv": 99.5, "updated_at": LATER[0]}})
        s = case.run()
        held = case.held()[key]
        assert held[attribute] == before[attribute] and str(held["ltv"]) == "99.5"  # the rest of the user delivered
        assert s.users_rejected == 1 and s.status == "partial"
        assert reason in _failures(case.url)[(key, attribute)]
        assert not any(json.dumps({attribute: bad})[1:-1] in json.dumps(r["body"]) for r in case.emu.log)  # never sent

        for later in (LATER[1], None):  # another column moves, then nothing: the value is not counted again
            if later:
                update_users(case.url, {"u00003": {"ltv": 7.25, "updated_at": later}})
            sent = len(case.emu.log)
            s = case.run()
            assert (s.ok, s.status, s.users_rejected) == (True, "success", 0)
            assert len(_writes(case.emu, sent)) == (1 if later else 0)
            assert (key, attribute) in _failures(case.url)
        assert str(case.held()[key]["ltv"]) == "7.25" and case.held()[key][attribute] == before[attribute]

        update_users(case.url, {"u00003": {column: good, "updated_at": LATER[2]}})  # fixed: sent, once
        sent = len(case.emu.log)
        s = case.run()
        assert s.ok and s.status == "success" and len(_writes(case.emu, sent)) == 1
        assert case.held()[key][attribute] == good and (key, attribute) not in _failures(case.url)
    finally:
        case.running.stop()


def test_on_invalid_user_sets_the_whole_user_aside(tmp_path, monkeypatch):
    case = h.setup("jiguang", tmp_path, monkeypatch.setenv)
    try:
        spec = dict(h.sync_dict("jiguang", case.running.url), on_invalid="user")
        write_config(case.cfg_path, case.url, [spec])
        update_users(case.url, {"u00003": {"plan": ""}})
        s = case.run()
        assert case.keys[3] not in case.held() and len(case.held()) == len(case.keys) - 1
        assert "40009" in _failures(case.url)[(case.keys[3], "")] and s.users_rejected == 1
        sent = len(case.emu.log)
        s = case.run()  # the user is read again (a failed user is), unchanged: not counted, not sent
        assert (s.ok, s.status, s.users_rejected, len(case.emu.log)) == (True, "success", 0, sent)
    finally:
        case.running.stop()


def test_an_empty_list_is_null_and_unset_removes_it_at_engagelab(tmp_path, monkeypatch):
    case = h.setup("engagelab", tmp_path, monkeypatch.setenv)
    try:
        spec = h.sync_dict("engagelab", case.running.url)
        spec["mapping"].append({"column": "interests", "attribute": "interests", "type": "LIST", "null": "unset"})
        case.emu.properties["interests"] = "LIST"
        write_config(case.cfg_path, case.url, [spec])
        update_users(case.url, {"u00002": {"interests": '["music"]'}})
        assert case.run().ok
        assert case.held()[case.keys[2]]["interests"] == ["music"]
        update_users(case.url, {"u00002": {"interests": "[]", "updated_at": LATER[0]}})
        s = case.run()
        assert s.ok and s.status == "success" and "interests" not in case.held()[case.keys[2]]
        assert case.emu.log[-1]["body"] == {"euid": int(case.keys[2]), "type": "delete",
                                            "properties": {"interests": True}}
    finally:
        case.running.stop()


def test_tencent_null_unset_removes_the_attribute(tmp_path, monkeypatch):
    case = h.setup("tencent_im", tmp_path, monkeypatch.setenv)
    try:
        spec = h.sync_dict("tencent_im", case.running.url)
        spec["mapping"][0]["null"] = "unset"  # plan -> membership
        write_config(case.cfg_path, case.url, [spec])
        assert case.run().ok
        # u00002 only NULLs it; u00003 NULLs it and changes another value (a set and a remove)
        update_users(case.url, {"u00002": {"plan": None, "updated_at": LATER[0]},
                                "u00003": {"plan": None, "ltv": 0.5, "updated_at": LATER[0]}})
        sent = len(case.emu.log)
        s = case.run()
        assert s.ok and s.status == "success" and s.users_delivered == 2
        held = case.held()
        assert "membership" not in held[case.keys[2]] and "membership" not in held[case.keys[3]]
        assert held[case.keys[3]]["ltv"] == "0.5" and held[case.keys[4]]["membership"] == "pro"
        paths = sorted(r["path"].rsplit("/", 1)[-1] for r in _writes(case.emu, sent))
        assert paths == ["im_remove_attr", "im_remove_attr", "im_set_attr"]
        sent = len(case.emu.log)
        assert case.run().ok and len(case.emu.log) == sent  # and nothing more to do
    finally:
        case.running.stop()
