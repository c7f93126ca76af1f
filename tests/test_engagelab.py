"""EngageLab MA end to end: a real warehouse (SQLite / PostgreSQL / MariaDB), the real engine,
the emulator over HTTP on loopback. Expected vendor state is written out here, from the
warehouse rows, independently of the engine."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest

from connector import config, state
from connector.config import ConfigError
from connector.vendors import emulator
from connector.vendors.engagelab import client, emulator as engagelab

from vendor_cases.engagelab import KEY, LATER, MAPPING, N, SECRET, el_sync, euid, expected, held, rows_, sent
from warehouse import T0, make_users, run, table, update_users, write_config


@pytest.fixture
def el(monkeypatch):
    monkeypatch.setenv("TEST_EL_KEY", KEY)
    monkeypatch.setenv("TEST_EL_SECRET", SECRET)
    emu = engagelab.Emulator(api_key=KEY, api_secret=SECRET, properties={m["attribute"]: m["type"] for m in MAPPING})
    with emulator.Running(emu) as running:
        yield running


@pytest.fixture
def setup(db_url, el, tmp_path):
    rows = rows_()
    make_users(db_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [el_sync(el.url)])
    return cfg, rows, db_url


def kinds(row: dict) -> int:
    """Requests a new user costs: set, increase, and add when it has interests."""
    return 3 if json.loads(row["interests"]) else 2


def test_first_run_delivers_everyone_exactly(setup, el):
    cfg, rows, url = setup
    s = run(cfg, "el_users")
    want = sum(kinds(r) for r in rows)
    assert (s.status, s.users_read, s.users_changed, s.users_delivered, s.requests) == ("success", N, N, N, want)
    assert held(el.emulator) == {euid(i): expected(r) for i, r in enumerate(rows)}
    req = el.emulator.log[0]
    assert req["path"] == "/v1/user/property"
    assert base64.b64decode(req["headers"]["authorization"].split()[1]).decode() == f"{KEY}:{SECRET}"
    assert set(req["body"]) == {"euid", "type", "properties"} and isinstance(req["body"]["euid"], int)
    # per user: the idempotent set first, then increase, then the list add
    assert [t for _, t, _ in sent(el.emulator, who=euid(1))] == ["set", "increase", "add"]
    assert sent(el.emulator, who=euid(1))[1][2] == {"points": 15}
    assert isinstance(sent(el.emulator, who=euid(4))[0][2]["ltv"], int)  # 5.0 goes out as 5
    assert len(table(url, state.snapshot)) == N


def test_no_change_sends_nothing_and_changes_send_only_changed_attributes(setup, el):
    cfg, rows, url = setup
    run(cfg, "el_users")
    n = len(el.emulator.log)
    again = run(cfg, "el_users")
    assert again.requests == 0 and len(el.emulator.log) == n and again.status == "success"
    update_users(url, {
        "u00001": {"plan": "enterprise", "updated_at": LATER},
        "u00002": {"ltv": 999.5, "orders": 6, "updated_at": LATER},
        "u00003": {"note": "only a mapped string", "updated_at": LATER},
        "u00004": {"updated_at": LATER},  # nothing mapped changed
    })
    third = run(cfg, "el_users")
    assert third.requests == 3 and third.users_delivered == 3
    assert sorted(sent(el.emulator, n)) == [
        (euid(1), "set", {"membership": "enterprise"}), (euid(2), "set", {"ltv": 999.5, "orders": 6}),
        (euid(3), "set", {"note": "only a mapped string"})]
    assert held(el.emulator)[euid(2)]["ltv"] == 999.5


def test_increase_ends_at_the_warehouse_value_without_double_counting(setup, el):
    cfg, rows, url = setup
    update_users(url, {"u00007": {"points": 10}})
    run(cfg, "el_users")
    for i, points in enumerate([25, 40, 40, 32]):
        update_users(url, {"u00007": {"points": points, "updated_at": LATER + dt.timedelta(minutes=i)}})
        run(cfg, "el_users")
    increases = [p["points"] for _, t, p in sent(el.emulator, who=euid(7)) if t == "increase"]
    assert increases == [10, 15, 15, -8]
    assert held(el.emulator)[euid(7)]["points"] == 32


def test_list_add_remove_and_append_only_adds(setup, el):
    cfg, rows, url = setup
    run(cfg, "el_users")
    n = len(el.emulator.log)
    assert json.loads(rows[2]["interests"]) == ["music", "travel"]
    update_users(url, {"u00002": {"interests": json.dumps(["travel", "chess"]), "updated_at": LATER}})
    run(cfg, "el_users")
    # remove before add, so an attribute is acknowledged only with its last part
    assert sent(el.emulator, n) == [(euid(2), "remove", {"interests": ["music"]}),
                                    (euid(2), "add", {"interests": ["chess"], "interests_seen": ["chess"]})]
    got = held(el.emulator)[euid(2)]
    assert got["interests"] == ["chess", "travel"]
    assert got["interests_seen"] == ["chess", "music", "travel"]  # append never removes
    assert run(cfg, "el_users").requests == 0


def test_null_unsets_with_delete_and_once_is_never_resent(setup, el):
    cfg, rows, url = setup
    run(cfg, "el_users")
    n = len(el.emulator.log)
    update_users(url, {"u00005": {"note": None, "signup_at": T0, "updated_at": LATER}})
    s = run(cfg, "el_users")
    assert s.users_delivered == 1
    assert sent(el.emulator, n) == [(euid(5), "delete", {"note": True})]  # signup_at is once-only
    assert "note" not in held(el.emulator)[euid(5)]
    assert held(el.emulator)[euid(5)]["signup_at"] == rows[5]["signup_at"].strftime("%Y-%m-%d %H:%M:%S")
    update_users(url, {"u00005": {"note": "back", "updated_at": LATER + dt.timedelta(minutes=1)}})
    run(cfg, "el_users")
    assert held(el.emulator)[euid(5)]["note"] == "back"


def test_an_empty_string_is_never_sent(setup, el):
    cfg, rows, url = setup
    update_users(url, {"u00006": {"note": ""}})
    s = run(cfg, "el_users")
    assert s.users_delivered == N and s.users_rejected == 1 and s.status == "partial"
    f = table(url, state.failures)
    assert [(x["user_key"], x["attribute"], x["error_class"]) for x in f] == [("1000006", "note", "invalid")]
    assert "note" in f[0]["message"] and "55103" in f[0]["message"]
    assert el.emulator.state()[euid(6)] == expected({**rows[6], "note": None})  # all but the empty note
    assert not any(v in ("", []) for r in el.emulator.log for v in r["body"]["properties"].values())
    # made NULL in the source, the NULL policy (unset) applies and the user goes through
    update_users(url, {"u00006": {"note": None, "updated_at": LATER}})
    s2 = run(cfg, "el_users")
    assert s2.status == "success" and held(el.emulator)[euid(6)] == expected({**rows[6], "note": None})


def test_unregistered_property_is_rejected_with_the_vendors_code(setup, el):
    cfg, rows, url = setup
    del el.emulator.properties["orders"]
    s = run(cfg, "el_users")
    assert s.users_rejected == N and s.users_delivered == 0 and not s.ok
    f = table(url, state.failures)[0]
    assert f["code"] == "55102" and "orders" in f["message"] and "not registered" in f["message"]


def test_server_errors_are_retried_with_attempts_recorded(setup, el):
    cfg, rows, url = setup
    el.emulator.add_fault("code", code=500, times=2, match=f'"euid": {euid(3)},')
    el.emulator.add_fault("status", status=503, body="upstream down", match=f'"euid": {euid(4)},')
    s = run(cfg, "el_users")
    want = sum(kinds(r) for r in rows)
    assert s.status == "success" and s.users_delivered == N and s.requests == want + 3
    batches = {b["first_user"]: b for b in table(url, state.batches)}
    assert batches["1000003"]["attempts"] == 2 + kinds(rows[3]) and batches["1000003"]["outcome"] == "delivered"
    assert batches["1000004"]["attempts"] == 1 + kinds(rows[4])
    assert batches["1000001"]["attempts"] == kinds(rows[1]) and batches["1000001"]["vendor_code"] == "0"
    assert held(el.emulator) == {euid(i): expected(r) for i, r in enumerate(rows)}


def test_bad_secret_stops_the_run_at_once(setup, el, monkeypatch):
    cfg, rows, url = setup
    monkeypatch.setenv("TEST_EL_SECRET", "wrong-secret")
    s = run(cfg, "el_users")
    assert s.status == "failed" and not s.ok and "40050" in s.error
    assert len(el.emulator.log) == 1  # the first request goes alone; nothing follows a refusal
    assert el.emulator.state() == {} and table(url, state.snapshot) == []
    assert "wrong-secret" not in s.error


@pytest.mark.parametrize("failing", ["increase", "add", "lost-increase"])
def test_a_failed_part_is_redone_next_run_without_double_increase(setup, el, failing):
    """One run carries set + increase + add for a user and one part fails."""
    cfg, rows, url = setup
    run(cfg, "el_users")
    r = rows[2]
    assert json.loads(r["interests"]) == ["music", "travel"] and r["points"] == 25
    update_users(url, {"u00002": {"plan": "gold", "points": 40, "interests": json.dumps(["music", "travel", "chess"]),
                                  "updated_at": LATER}})
    if failing == "lost-increase":  # applied by the vendor, but the answer never arrives
        el.emulator.add_fault("lost", match=f'"euid": {euid(2)}, "type": "increase"')
    else:
        el.emulator.add_fault("code", code=55004, match=f'"euid": {euid(2)}, "type": "{failing}"')
    n = len(el.emulator.log)
    s = run(cfg, "el_users")
    assert s.status == "partial" and s.users_delivered == 0
    assert [t for _, t, _ in sent(el.emulator, n)] == (["set", "increase"] if failing != "add" else
                                                        ["set", "increase", "add"])
    f = table(url, state.failures)[0]
    assert f["error_class"] == ("in_doubt" if failing == "lost-increase" else "rejected")
    assert held(el.emulator)[euid(2)]["membership"] == "gold"  # the acknowledged part stays applied

    m = len(el.emulator.log)
    s2 = run(cfg, "el_users")
    assert s2.status == "success" and s2.users_delivered == 1
    after = sent(el.emulator, m)
    assert all(t != "set" for _, t, _ in after)  # the acknowledged set is not re-sent
    want = {**r, "plan": "gold", "points": 40, "interests": json.dumps(["music", "travel", "chess"])}
    assert held(el.emulator)[euid(2)] == expected(want)  # points 40: never double-counted
    applied = [p["points"] for _, t, p in sent(el.emulator, n) if t == "increase"]
    assert applied == ([15] if failing == "add" else [15, 15] if failing == "increase" else [15])
    assert run(cfg, "el_users").requests == 0


def test_a_list_change_whose_add_fails_after_its_remove_is_redone(setup, el):
    """remove acknowledged, add refused: the attribute is not taken as delivered, so both go again."""
    cfg, rows, url = setup
    run(cfg, "el_users")
    update_users(url, {"u00002": {"interests": json.dumps(["travel", "chess"]), "updated_at": LATER}})
    el.emulator.add_fault("code", code=55004, match=f'"euid": {euid(2)}, "type": "add"')
    assert run(cfg, "el_users").status == "partial"
    assert held(el.emulator)[euid(2)]["interests"] == ["travel"]  # half applied
    assert run(cfg, "el_users").status == "success"
    got = held(el.emulator)[euid(2)]
    assert got["interests"] == ["chess", "travel"] and got["interests_seen"] == ["chess", "music", "travel"]
    assert run(cfg, "el_users").requests == 0


def test_throttling_waits_and_delivers(sqlite_url, el, tmp_path):
    rows = rows_(6)
    make_users(sqlite_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [el_sync(el.url)])
    el.emulator.add_fault("throttle", delay=0.2, match=f'"euid": {euid(2)},')
    s = run(cfg, "el_users")
    assert s.status == "success" and s.users_delivered == 6
    b = [x for x in table(sqlite_url, state.batches) if x["first_user"] == "1000002"][0]
    assert b["attempts"] == 1 + kinds(rows[2])
    assert held(el.emulator) == {euid(i): expected(r) for i, r in enumerate(rows)}


def test_emulator_rate_limit_is_enforced_and_honoured(sqlite_url, tmp_path, monkeypatch):
    """A vendor limit of 10 a second: paced under it nothing is refused; unpaced, 429s are waited out."""
    monkeypatch.setenv("TEST_EL_KEY", KEY)
    monkeypatch.setenv("TEST_EL_SECRET", SECRET)
    rows = rows_(12)
    make_users(sqlite_url, rows)
    sync = el_sync("http://placeholder", mapping=MAPPING[:1])
    emu = engagelab.Emulator(api_key=KEY, api_secret=SECRET, properties={"membership": "STRING"}, rate_limit=10)
    with emulator.Running(emu) as running:
        sync["vendor"].update(base_url=running.url, rate_limit=9)
        cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [sync])
        paced = run(cfg, "el_users")
        assert paced.status == "success" and paced.requests == 12 and len(emu.log) == 12
        emu.reset()
        sync["vendor"].update(rate_limit=1000)
        write_config(tmp_path / "syncs.yaml", sqlite_url, [sync])
        burst = run(cfg, "el_users", full_refresh=True)
    assert burst.status == "success" and burst.users_delivered == 12 and burst.requests > 12
    assert held(emu) == {euid(i): {"membership": r["plan"]} for i, r in enumerate(rows)}


def test_region_picks_the_host_and_base_url_overrides():
    creds = {"api_key": "k", "api_secret": "s"}
    assert client.Client(None, creds, {}).base_url == "https://ma-api.engagelab.com"
    assert client.Client(None, creds, {"region": "virginia"}).base_url == "https://ma-api-usva.engagelab.com"
    assert client.Client("http://127.0.0.1:9/", creds, {"region": "virginia"}).base_url == "http://127.0.0.1:9"


def test_config_refuses_what_engagelab_cannot_do(sqlite_url, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_EL_KEY", KEY)
    monkeypatch.setenv("TEST_EL_SECRET", SECRET)
    path = tmp_path / "syncs.yaml"
    cases = [
        ({"vendor": {**el_sync("")["vendor"], "settings": {"region": "mars"}}}, "vendor.settings.region"),
        ({"mapping": [{"column": "note", "attribute": "note", "type": "STRING", "null": "send"}]}, "mapping[0].null"),
        ({"mapping": [{"column": "plan", "attribute": "p", "type": "STRING", "rule": "increase"}]}, "mapping[0].rule"),
        ({"identity": {"user_id": "user_id"}}, "identity.user_id"),
    ]
    for over, field in cases:
        write_config(path, sqlite_url, [el_sync("http://127.0.0.1:9", **over)])
        with pytest.raises(ConfigError) as e:
            config.load(path)
        assert e.value.field == field, e.value


def test_emulator_from_specs_accepts_the_syncs_credentials(sqlite_url, tmp_path, monkeypatch):
    """``emulator(specs)`` (what `usersync emulators` serves) registers what the syncs map."""
    monkeypatch.setenv("TEST_EL_KEY", KEY)
    monkeypatch.setenv("TEST_EL_SECRET", SECRET)
    rows = rows_(5)
    make_users(sqlite_url, rows)
    path = write_config(tmp_path / "syncs.yaml", sqlite_url, [el_sync("http://placeholder")])
    cfg, _ = config.load(path)
    with emulator.Running(engagelab.emulator(cfg.syncs)) as running:
        write_config(path, sqlite_url, [el_sync(running.url)])
        s = run(path, "el_users")
        assert s.status == "success"
        assert held(running.emulator) == {euid(i): expected(r) for i, r in enumerate(rows)}
