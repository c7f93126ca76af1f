"""A mapping change reaches every user, and only what it touches is sent (issue 21).

Real warehouses (SQLite / PostgreSQL / MariaDB), the real engine, each vendor's emulator over
HTTP on loopback. What the vendor should hold is written out by the vendor's own test module,
from the warehouse rows, independently of the engine; what was sent is read from the
emulator's request log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from vendor_cases import engagelab as el_, jiguang as jg_, moengage as moe_, tencent_im as tim_
from vendor_cases.dfinery import DFINERY_MAPPING, dfinery_sync, expected_profile
from warehouse import T0, make_users, run, table, update_users, user_row, write_config
from connector import cli, config, engine, mapping, state
from connector.vendors import emulator
from connector.config import ConfigError
from connector.vendors.dfinery import emulator as dfinery
from connector.vendors.engagelab import emulator as engagelab
from connector.vendors.jiguang import emulator as jiguang
from connector.vendors.moengage import emulator as moengage
from connector.vendors.tencent_im import emulator as tencent_im

N = 30


def rows_(n: int = N, **over) -> list[dict]:
    # distinct cursor values, so an incremental run reads only the last user again (cursor >= watermark);
    # points > 0: an increase from nothing to 0 sends nothing
    return [user_row(i, points=i * 10 + 5, updated_at=T0 + dt.timedelta(seconds=i), **over) for i in range(n)]


# -- the five vendors, as one table --------------------------------------------------------------
@dataclasses.dataclass
class Case:
    vendor: str
    name: str  # the sync's name
    mapping: list[dict]  # the full mapping; the test starts without ``added``
    added: str  # an attribute added to the mapping once everyone was delivered
    env: dict[str, str]
    sync: Callable[[str, list[dict]], dict]  # (emulator url, mapping) -> the sync's YAML
    emulator: Callable[[], emulator.Emulator]  # with every attribute of ``mapping`` registered
    expected: Callable[[int, dict], tuple[Any, dict]]  # row i -> (vendor's key, what it holds)
    requests: Callable[[list[dict]], list[list[tuple[Any, dict]]]]  # log -> per write request: (key, attributes)
    packed: bool  # many users a request
    held: Callable[[Any], dict] = lambda emu: emu.state()


def _over(sync: dict, mapping_: list[dict]) -> dict:
    return {**sync, "mapping": mapping_}


CASES = [
    Case("dfinery", "dfinery_users", DFINERY_MAPPING, "orders", {"TEST_DFINERY_TOKEN": "tok-secret-123"},
         lambda url, m: dfinery_sync(url, mapping=m),
         lambda: dfinery.Emulator(service_id="svc-1", access_token="tok-secret-123",
                                  properties={m["attribute"]: m["type"] for m in DFINERY_MAPPING}),
         lambda i, r: (r["user_id"], expected_profile(r)),
         lambda log: [[(r["body"]["identity"]["external_id"], r["body"]["user_properties"])] for r in log],
         packed=False),
    Case("jiguang", "jiguang_users", jg_.MAPPING, "points", {"TEST_JIGUANG_SECRET": jg_.SECRET},
         lambda url, m: _over(jg_.jiguang_sync(url), m),
         lambda: jiguang.Emulator(project_id="proj-7", project_secret=jg_.SECRET,
                                  attributes={m["attribute"]: {"type": m["type"], "rule": m.get("rule", "set")}
                                              for m in jg_.MAPPING}),
         lambda i, r: (str(jg_.cuid(i)), jg_.expected(r)),
         lambda log: [[(str(r["body"]["cuid"]), r["body"]["data"])] for r in log],
         packed=False),
    Case("engagelab", "el_users", el_.MAPPING, "points",
         {"TEST_EL_KEY": el_.KEY, "TEST_EL_SECRET": el_.SECRET},
         lambda url, m: _over(el_.el_sync(url), m),
         lambda: engagelab.Emulator(api_key=el_.KEY, api_secret=el_.SECRET,
                                    properties={m["attribute"]: m["type"] for m in el_.MAPPING}),
         lambda i, r: (el_.euid(i), el_.expected(r)),
         lambda log: [[(r["body"]["euid"], r["body"]["properties"])] for r in log],
         packed=False, held=el_.held),
    Case("tencent_im", "tencent_users", tim_.MAPPING, "note", {"TEST_TENCENT_KEY": tim_.KEY},
         lambda url, m: _over(tim_.tencent_sync(url), m),
         lambda: tencent_im.Emulator(sdkappid=tim_.APPID, secret_key=tim_.KEY, identifier=tim_.ADMIN,
                                     attr_names=list(tim_.NAMES)),
         lambda i, r: (r["user_id"], tim_.expected(r)),
         lambda log: [[(u["To_Account"], u["Attrs"]) for u in r["body"]["UserAttrs"]]
                      for r in log if r["path"] == tencent_im.SET_ATTR],
         packed=True),
    Case("moengage", "moengage_users", moe_.MAPPING, "note", {"TEST_MOENGAGE_KEY": moe_.KEY},
         lambda url, m: moe_.moengage_sync(url, api="bulk", mapping=m),
         lambda: moengage.Emulator(workspace_id=moe_.WORKSPACE, api_key=moe_.KEY),
         lambda i, r: (r["user_id"], moe_.expected(r)),
         lambda log: [[(e["customer_id"], e["attributes"]) for e in r["body"]["elements"]] for r in log],
         packed=True),
]


@pytest.fixture(params=CASES, ids=[c.vendor for c in CASES])
def case(request, monkeypatch):
    c: Case = request.param
    for k, v in c.env.items():
        monkeypatch.setenv(k, v)
    with emulator.Running(c.emulator()) as running:
        yield c, running


def without(mapping_: list[dict], attribute: str) -> list[dict]:
    return [m for m in mapping_ if m["attribute"] != attribute]


def remembered(url: str, sync: str) -> dict[str, dict]:
    return {r["attribute"]: r for r in table(url, state.mappings, state.mappings.c.sync == sync)}


def last_run(url: str) -> dict:
    return max(table(url, state.runs), key=lambda r: r["run_id"])


@pytest.mark.parametrize("cursor", ["updated_at", None], ids=["cursor", "full_scan"])
def test_an_added_attribute_reaches_every_user_and_only_it_is_sent(db_url, case, tmp_path, cursor):
    c, emu = case
    rows = rows_()
    make_users(db_url, rows)

    def config_(mapping_):
        return write_config(tmp_path / "syncs.yaml", db_url, [{**c.sync(emu.url, mapping_), "cursor": cursor}])

    first = run(config_(without(c.mapping, c.added)), c.name)
    assert (first.status, first.users_delivered) == ("success", N)
    want = dict(c.expected(i, r) for i, r in enumerate(rows))
    assert c.held(emu.emulator) == {k: {a: v for a, v in p.items() if a != c.added} for k, p in want.items()}
    assert set(remembered(db_url, c.name)) == {m["attribute"] for m in c.mapping} - {c.added}
    log_before = len(emu.emulator.log)

    added = run(config_(c.mapping), c.name)
    requests = c.requests(emu.emulator.log[log_before:])
    got = [who for req in requests for who in req]
    # exactly the users whose new attribute has a value, each once, carrying only it; for an
    # increase (Jiguang's accumulate, EngageLab's increase) that is its whole value, sent once
    to_send = {k: {c.added: p[c.added]} for k, p in want.items() if c.added in p}
    assert len(got) == len({k for k, _ in got}) == len(to_send)
    assert dict(got) == to_send
    if c.packed:
        assert len(requests) == math.ceil(len(to_send) / 100)
    else:
        assert all(len(req) == 1 for req in requests)
    assert (added.status, added.users_read, added.users_delivered, added.requests) == (
        "success", N, len(to_send), len(requests))
    assert c.held(emu.emulator) == want  # the vendor equals the warehouse: an increase is not counted twice
    recorded = last_run(db_url)
    assert json.loads(recorded["mapping_change"])["added"] == [c.added]
    assert recorded["mode"] == "incremental"
    assert remembered(db_url, c.name)[c.added]["since_run"] == added.run_id
    if cursor:  # the watermark advanced as usual
        assert table(db_url, state.cursors)[0]["run_id"] == added.run_id

    again = run(config_(c.mapping), c.name)
    assert again.requests == 0 and c.requests(emu.emulator.log[log_before:]) == requests
    assert again.users_read == (1 if cursor else N)  # incremental again: the cursor is back
    assert last_run(db_url)["mapping_change"] is None


def _dfinery_config(tmp_path, url, base_url, mapping_, **over):
    return write_config(tmp_path / "syncs.yaml", url, [dfinery_sync(base_url, mapping=mapping_, **over)])


def _retyped(mapping_, attribute, **spec):
    return [{**m, **spec} if m["attribute"] == attribute else m for m in mapping_]


def test_a_retype_sends_the_new_representation_to_the_users_whose_wire_value_changed(db_url, dfinery, tmp_path):
    """Datetime -> String at DFINERY: the new text to every user that has a value; nothing to NULL ones."""
    rows = rows_()
    for r in rows[::5]:
        r["signup_at"] = None
    make_users(db_url, rows)
    run(_dfinery_config(tmp_path, db_url, dfinery.url, DFINERY_MAPPING), "dfinery_users")
    n = len(dfinery.emulator.log)
    dfinery.emulator.properties["signup_at"] = "string"  # retyped in the console too
    cfg = _dfinery_config(tmp_path, db_url, dfinery.url, _retyped(DFINERY_MAPPING, "signup_at", type="String"))
    s = run(cfg, "dfinery_users")
    sent = {r["body"]["identity"]["external_id"]: r["body"]["user_properties"] for r in dfinery.emulator.log[n:]}
    assert sent == {r["user_id"]: {"signup_at": r["signup_at"].strftime("%Y-%m-%d %H:%M:%S")}
                    for r in rows if r["signup_at"] is not None}
    assert s.status == "success" and s.requests == len(sent) == N - len(rows[::5])
    assert json.loads(last_run(db_url)["mapping_change"])["changed"] == {"signup_at": ["type", "wire"]}
    assert run(cfg, "dfinery_users").requests == 0


def test_a_retype_equal_in_python_but_not_on_the_wire_is_sent(sqlite_url, dfinery, tmp_path):
    """Boolean -> Long: True == 1 in Python, but DFINERY held true and must now hold 1."""
    rows = rows_()
    make_users(sqlite_url, rows)
    run(_dfinery_config(tmp_path, sqlite_url, dfinery.url, DFINERY_MAPPING), "dfinery_users")
    n = len(dfinery.emulator.log)
    dfinery.emulator.properties["subscribed"] = "long"
    s = run(_dfinery_config(tmp_path, sqlite_url, dfinery.url, _retyped(DFINERY_MAPPING, "subscribed", type="Long")),
            "dfinery_users")
    sent = {r["body"]["identity"]["external_id"]: r["body"]["user_properties"] for r in dfinery.emulator.log[n:]}
    assert sent == {r["user_id"]: {"subscribed": int(r["subscribed"])} for r in rows}
    assert s.status == "success"
    held = dfinery.emulator.state()
    assert all(type(held[r["user_id"]]["subscribed"]) is int for r in rows)


def test_a_retype_at_tencent_reaches_only_the_users_whose_text_changed(db_url, tmp_path, monkeypatch):
    """Double -> String at Tencent: 5.0 becomes "5"; 1.25 stays "1.25", so those users get nothing."""
    monkeypatch.setenv("TEST_TENCENT_KEY", tim_.KEY)
    rows = rows_()
    make_users(db_url, rows)
    emu = tencent_im.Emulator(sdkappid=tim_.APPID, secret_key=tim_.KEY, identifier=tim_.ADMIN,
                              attr_names=list(tim_.NAMES))
    with emulator.Running(emu) as running:
        def cfg(m):
            return write_config(tmp_path / "syncs.yaml", db_url, [_over(tim_.tencent_sync(running.url), m)])

        run(cfg(tim_.MAPPING), "tencent_users")
        n = len(emu.log)
        s = run(cfg(_retyped(tim_.MAPPING, "ltv", type="String")), "tencent_users")
        sets = [r for r in emu.log[n:] if r["path"] == tencent_im.SET_ATTR]
        sent = {u["To_Account"]: u["Attrs"] for r in sets for u in r["body"]["UserAttrs"]}
        whole = [r for r in rows if float(r["ltv"]).is_integer()]
        assert 0 < len(whole) < N
        assert sent == {r["user_id"]: {"ltv": str(int(r["ltv"]))} for r in whole}
        assert (s.status, s.requests, s.users_delivered) == ("success", 1, len(whole))
        assert emu.state() == {r["user_id"]: {**tim_.expected(r), "ltv": format(r["ltv"], "g")} for r in rows}


def test_a_removed_attribute_sends_nothing_and_leaves_the_snapshot(db_url, dfinery, tmp_path):
    rows = rows_()
    make_users(db_url, rows)
    run(_dfinery_config(tmp_path, db_url, dfinery.url, DFINERY_MAPPING), "dfinery_users")
    n, held = len(dfinery.emulator.log), dfinery.emulator.state()
    cfg = _dfinery_config(tmp_path, db_url, dfinery.url, without(DFINERY_MAPPING, "interests"))
    s = run(cfg, "dfinery_users")
    assert (s.status, s.users_read, s.requests) == ("success", N, 0) and len(dfinery.emulator.log) == n
    assert dfinery.emulator.state() == held  # not deleted at the vendor by default
    payloads = [json.loads(r["payload"]) for r in table(db_url, state.snapshot)]
    assert len(payloads) == N and not any("interests" in p for p in payloads)
    assert json.loads(last_run(db_url)["mapping_change"])["removed"] == ["interests"]
    assert "interests" not in remembered(db_url, "dfinery_users")
    assert run(cfg, "dfinery_users").requests == 0


def test_a_removed_attribute_is_unset_where_the_sync_asks_and_the_vendor_can(sqlite_url, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_EL_KEY", el_.KEY)
    monkeypatch.setenv("TEST_EL_SECRET", el_.SECRET)
    rows = rows_()
    for r in rows[::3]:
        r["note"] = None
    make_users(sqlite_url, rows)
    emu = engagelab.Emulator(api_key=el_.KEY, api_secret=el_.SECRET,
                             properties={m["attribute"]: m["type"] for m in el_.MAPPING})
    with emulator.Running(emu) as running:
        def cfg(m, **over):
            return write_config(tmp_path / "syncs.yaml", sqlite_url, [{**_over(el_.el_sync(running.url), m), **over}])

        run(cfg(el_.MAPPING), "el_users")
        n = len(emu.log)
        s = run(cfg(without(el_.MAPPING, "note"), unset_removed=["note"]), "el_users")
        assert sorted(el_.sent(emu, n)) == sorted((el_.euid(i), "delete", {"note": True})
                                                  for i, r in enumerate(rows) if r["note"] is not None)
        assert s.status == "success"
        assert el_.held(emu) == {el_.euid(i): {a: v for a, v in el_.expected(r).items() if a != "note"}
                                 for i, r in enumerate(rows)}
        assert run(cfg(without(el_.MAPPING, "note"), unset_removed=["note"]), "el_users").requests == 0


@pytest.mark.parametrize("sync,words", [
    (lambda: dfinery_sync("http://127.0.0.1:9", unset_removed=["gone"]), "dfinery has no way to unset"),
    (lambda: {**el_.el_sync("http://127.0.0.1:9"), "unset_removed": ["note"]}, "'note' is still mapped"),
], ids=["vendor_cannot_unset", "still_mapped"])
def test_unset_removed_is_validated_per_vendor(tmp_path, monkeypatch, sync, words):
    for k in ("TEST_DFINERY_TOKEN", "TEST_EL_KEY", "TEST_EL_SECRET"):
        monkeypatch.setenv(k, "t")
    cfg = write_config(tmp_path / "syncs.yaml", "sqlite://", [sync()])
    with pytest.raises(ConfigError) as e:
        config.load(cfg)
    assert e.value.field == "unset_removed" and words in e.value.message


def test_vendor_limits_stop_a_new_attribute_before_any_request(tmp_path, monkeypatch):
    """Tencent's ten registered names and MoEngage's reserved names: refused when the config is read."""
    monkeypatch.setenv("TEST_TENCENT_KEY", tim_.KEY)
    monkeypatch.setenv("TEST_MOENGAGE_KEY", moe_.KEY)
    extra = [{"column": "note", "attribute": f"extra{i}", "type": "String"} for i in range(4)]
    cfg = write_config(tmp_path / "a.yaml", "sqlite://", [_over(tim_.tencent_sync("http://127.0.0.1:9"),
                                                                 tim_.MAPPING + extra)])
    with pytest.raises(ConfigError, match="at most 10"):
        config.load(cfg)
    cfg = write_config(tmp_path / "b.yaml", "sqlite://", [moe_.moengage_sync(
        "http://127.0.0.1:9", mapping=moe_.MAPPING + [{"column": "note", "attribute": "status", "type": "String"}])])
    with pytest.raises(ConfigError, match="reserved MoEngage key"):
        config.load(cfg)


def test_an_attribute_tencent_has_not_registered_fails_the_backfill_before_any_write(sqlite_url, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_TENCENT_KEY", tim_.KEY)
    make_users(sqlite_url, rows_())
    names = [n for n in tim_.NAMES if n != "note"]
    emu = tencent_im.Emulator(sdkappid=tim_.APPID, secret_key=tim_.KEY, identifier=tim_.ADMIN, attr_names=names)
    with emulator.Running(emu) as running:
        def cfg(m):
            return write_config(tmp_path / "syncs.yaml", sqlite_url, [_over(tim_.tencent_sync(running.url), m)])

        run(cfg(without(tim_.MAPPING, "note")), "tencent_users")
        n = len(emu.log)
        with pytest.raises(ConfigError, match="'note' is not registered"):
            run(cfg(tim_.MAPPING), "tencent_users")
        assert [r["path"] for r in emu.log[n:]] == [tencent_im.GET_ATTR_NAME]
        assert "note" not in remembered(sqlite_url, "tencent_users")  # the next run backfills it again
        emu.attr_names = list(tim_.NAMES)  # registered in the console
        s = run(cfg(tim_.MAPPING), "tencent_users")
        assert (s.status, s.users_delivered) == ("success", N)
        assert "note" in remembered(sqlite_url, "tencent_users")


def test_a_stopped_backfill_is_continued_by_the_next_run(db_url, dfinery, tmp_path):
    """The vendor refuses the run part-way: the next run, still backfilling, sends the new attribute
    to exactly the users the first did not reach."""
    rows = rows_()
    make_users(db_url, rows)
    base = without(DFINERY_MAPPING, "orders")
    run(_dfinery_config(tmp_path, db_url, dfinery.url, base), "dfinery_users")
    n = len(dfinery.emulator.log)
    dfinery.emulator.add_fault("code", code="40201", match='"u00012"')  # an invalid token: the run stops
    cfg = _dfinery_config(tmp_path, db_url, dfinery.url, DFINERY_MAPPING, vendor={
        **dfinery_sync(dfinery.url)["vendor"], "concurrency": 1})
    stopped = run(cfg, "dfinery_users")
    assert stopped.status == "failed" and 0 < stopped.users_delivered < N
    first = {r["body"]["identity"]["external_id"] for r in dfinery.emulator.log[n:]} - {"u00012"}
    assert "orders" not in remembered(db_url, "dfinery_users")
    m = len(dfinery.emulator.log)
    done = run(cfg, "dfinery_users")
    second = [r["body"] for r in dfinery.emulator.log[m:]]
    assert {b["identity"]["external_id"] for b in second} == {r["user_id"] for r in rows} - first
    assert all(list(b["user_properties"]) == ["orders"] for b in second)
    assert done.status == "success" and remembered(db_url, "dfinery_users")["orders"]["since_run"] == done.run_id
    assert dfinery.emulator.state() == {r["user_id"]: expected_profile(r) for r in rows}


def test_a_partial_backfill_remembers_the_mapping_and_retries_the_failed_user(db_url, dfinery, tmp_path):
    rows = rows_()
    make_users(db_url, rows)
    run(_dfinery_config(tmp_path, db_url, dfinery.url, without(DFINERY_MAPPING, "orders")), "dfinery_users")
    dfinery.emulator.add_fault("code", code="40000", match='"u00005"')  # this user is refused once
    cfg = _dfinery_config(tmp_path, db_url, dfinery.url, DFINERY_MAPPING)
    partial = run(cfg, "dfinery_users")
    assert (partial.status, partial.users_delivered, partial.users_rejected) == ("partial", N - 1, 1)
    assert "orders" in remembered(db_url, "dfinery_users")  # the failed user is in sync_failures, re-read
    m = len(dfinery.emulator.log)
    retried = run(cfg, "dfinery_users")
    assert retried.status == "success" and last_run(db_url)["mapping_change"] is None
    assert [(r["body"]["identity"]["external_id"], r["body"]["user_properties"])
            for r in dfinery.emulator.log[m:]] == [("u00005", {"orders": rows[5]["orders"]})]
    assert dfinery.emulator.state() == {r["user_id"]: expected_profile(r) for r in rows}


def test_the_guard_lets_an_added_attribute_through_but_stops_one_that_nulls_users(db_url, dfinery, tmp_path):
    rows = rows_(120)
    for r in rows[::2]:
        r["points"] = None
    make_users(db_url, rows)
    guard = {"min_users": 10}
    run(_dfinery_config(tmp_path, db_url, dfinery.url, without(DFINERY_MAPPING, "orders"), guard=guard),
        "dfinery_users")
    # every user changes, but by the mapping: deliberate, no --allow-large-change needed
    added = run(_dfinery_config(tmp_path, db_url, dfinery.url, DFINERY_MAPPING, guard=guard), "dfinery_users")
    assert (added.status, added.users_delivered) == ("success", 120)
    # orders now comes from a column NULL for half the users: that still stops the run
    n = len(dfinery.emulator.log)
    cfg = _dfinery_config(tmp_path, db_url, dfinery.url, _retyped(DFINERY_MAPPING, "orders", column="points"),
                          guard=guard)
    blocked = run(cfg, "dfinery_users")
    assert blocked.status == "blocked" and len(dfinery.emulator.log) == n
    assert "'orders' would become NULL because of the mapping change (column changed) for 60 of 120" in blocked.error
    assert remembered(db_url, "dfinery_users")["orders"]["since_run"] == added.run_id
    forced = run(cfg, "dfinery_users", allow_large_change=True)
    assert forced.status == "success" and json.loads(remembered(db_url, "dfinery_users")["orders"]["spec"])[
        "column"] == "points"


def test_plan_shows_the_mapping_difference_before_anything_is_sent(sqlite_url, dfinery, tmp_path, capsys):
    rows = rows_()
    make_users(sqlite_url, rows)
    run(_dfinery_config(tmp_path, sqlite_url, dfinery.url, without(DFINERY_MAPPING, "orders")), "dfinery_users")
    n = len(dfinery.emulator.log)
    changed = [m for m in _retyped(DFINERY_MAPPING, "signup_at", type="String") if m["attribute"] != "interests"]
    cfg = _dfinery_config(tmp_path, sqlite_url, dfinery.url, changed)
    capsys.readouterr()
    assert cli.main(["plan", "dfinery_users", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "mapping changed since run 1" in out
    assert f"  added    orders: {sum(r['orders'] is not None for r in rows)} user(s) to send" in out
    assert f"  changed  signup_at (type, wire): {N} user(s) to send" in out
    assert f"  removed  interests: no longer synced; the vendor keeps its values ({N} user(s) held it)" in out
    assert len(dfinery.emulator.log) == n and set(remembered(sqlite_url, "dfinery_users")) == {
        m["attribute"] for m in DFINERY_MAPPING} - {"orders"}
    dfinery.emulator.properties["signup_at"] = "string"
    run(cfg, "dfinery_users")
    capsys.readouterr()
    cli.main(["status", "--config", str(cfg)])
    assert "mapping backfill: added orders; changed signup_at; removed interests" in capsys.readouterr().out


def test_the_dags_docs_show_the_mapping_and_where_its_last_change_is(tmp_path, monkeypatch):
    from connector.airflow import dags

    monkeypatch.setenv("TEST_DFINERY_TOKEN", "t")
    path = write_config(tmp_path / "syncs.yaml", "sqlite://", [dfinery_sync("http://127.0.0.1:9")])
    spec = config.load(path)[0].syncs[0]
    doc = dags.doc_md(spec, path)
    assert f"Mapping `{mapping.digest(spec)}`" in doc and "logged by the `plan` task" in doc
    assert all(f"| `{m['column']}` | `{m['attribute']}` | {m['type']} |" in doc for m in DFINERY_MAPPING)
    other = config.load(write_config(tmp_path / "b.yaml", "sqlite://", [dfinery_sync(
        "http://127.0.0.1:9", mapping=_retyped(DFINERY_MAPPING, "signup_at", type="String"))]))[0].syncs[0]
    assert mapping.digest(other) != mapping.digest(spec)


def test_airflow_shards_push_the_backfill_plan(sqlite_url, dfinery, tmp_path):
    """The plan task plans the backfill, each mapped push sends its shard, finalize remembers the mapping."""
    from connector.airflow import tasks

    rows = rows_()
    make_users(sqlite_url, rows)
    run(_dfinery_config(tmp_path, sqlite_url, dfinery.url, without(DFINERY_MAPPING, "orders")), "dfinery_users")
    n = len(dfinery.emulator.log)
    cfg = str(_dfinery_config(tmp_path, sqlite_url, dfinery.url, DFINERY_MAPPING, shards=3))
    planned = tasks.plan(cfg, "dfinery_users", {}, "manual__1", "manual", (None, None))
    assert planned["mapping_change"] == "added orders" and planned["users_read"] == N
    assert len(planned["shards"]) == 3
    pushed = [tasks.push(cfg, "dfinery_users", job) for job in planned["shards"]]
    assert sum(p["delivered"] for p in pushed) == N
    assert "orders" not in remembered(sqlite_url, "dfinery_users")  # not before finalize
    summary = tasks.finalize(cfg, "dfinery_users", planned)
    assert summary["status"] == "success"
    assert sorted((r["body"]["identity"]["external_id"], r["body"]["user_properties"])
                  for r in dfinery.emulator.log[n:]) == sorted((r["user_id"], {"orders": r["orders"]}) for r in rows)
    assert remembered(sqlite_url, "dfinery_users")["orders"]["since_run"] == planned["run_id"]
