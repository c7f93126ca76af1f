"""Tencent Cloud IM end to end: a real warehouse (SQLite / PostgreSQL / MariaDB), the real
engine, the emulator over HTTP on loopback."""

from __future__ import annotations

import base64
import datetime as dt
import gc
import hashlib
import hmac
import json
import time
import zlib

import pytest
import requests

from connector import push, state
from connector.config import ConfigError
from connector.vendors import emulator
from connector.vendors.tencent_im import client, settings as vendor, usersig
from connector.vendors.tencent_im.emulator import Emulator

from vendor_cases.tencent_im import ADMIN, APPID, KEY, NAMES, expected, tencent_sync
from warehouse import T0, make_users, run, table, update_users, user_row, write_config


N = 40
@pytest.fixture
def tencent(monkeypatch):
    monkeypatch.setenv("TEST_TENCENT_KEY", KEY)
    emu = Emulator(sdkappid=APPID, secret_key=KEY, identifier=ADMIN, attr_names=list(NAMES))
    with emulator.Running(emu) as running:
        yield running


def sets(emu) -> list[dict]:
    return [r for r in emu.log if r["path"] == vendor.SET_ATTR]


def sig_doc(sig: str) -> dict:
    """Decode a UserSig and check its HMAC, following VENDORS.md §3 step by step."""
    raw = base64.b64decode(sig.replace("*", "+").replace("-", "/").replace("_", "="))
    doc = json.loads(zlib.decompress(raw))
    content = (f"TLS.identifier:{doc['TLS.identifier']}\nTLS.sdkappid:{doc['TLS.sdkappid']}\n"
               f"TLS.time:{doc['TLS.time']}\nTLS.expire:{doc['TLS.expire']}\n")
    mac = base64.b64encode(hmac.new(KEY.encode(), content.encode(), hashlib.sha256).digest()).decode()
    assert doc["TLS.sig"] == mac and doc["TLS.ver"] == "2.0"
    return doc


@pytest.fixture
def setup(db_url, tencent, tmp_path):
    rows = [user_row(i) for i in range(N)]
    make_users(db_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [tencent_sync(tencent.url)])
    return cfg, rows, db_url


def test_first_run_delivers_everyone_exactly(setup, tencent):
    cfg, rows, url = setup
    s = run(cfg, "tencent_users")
    assert (s.status, s.users_read, s.users_changed, s.users_delivered, s.requests) == ("success", N, N, N, 1)
    assert tencent.emulator.state() == {r["user_id"]: expected(r) for r in rows}
    log = tencent.emulator.log
    assert [r["path"] for r in log] == [vendor.GET_ATTR_NAME, vendor.SET_ATTR]
    assert log[0]["body"] == {}
    for r in log:
        q = r["query"]
        assert set(q) == {"usersig", "identifier", "sdkappid", "random", "contenttype"}
        assert (q["identifier"], q["sdkappid"], q["contenttype"]) == (ADMIN, APPID, "json")
        assert 0 <= int(q["random"]) < 2**32
        doc = sig_doc(q["usersig"])
        assert (doc["TLS.identifier"], str(doc["TLS.sdkappid"])) == (ADMIN, APPID)
        assert doc["TLS.time"] + doc["TLS.expire"] > time.time() + 3600
    assert log[0]["query"]["usersig"] == log[1]["query"]["usersig"]  # cached, not remade per request
    assert log[0]["query"]["random"] != log[1]["query"]["random"]  # fresh per request
    body = log[1]["body"]
    assert set(body) == {"UserAttrs"} and len(body["UserAttrs"]) == N
    assert all(set(u) == {"To_Account", "Attrs"} and all(isinstance(v, str) for v in u["Attrs"].values())
               for u in body["UserAttrs"])
    assert len(table(url, state.snapshot)) == N
    assert [b["users"] for b in table(url, state.batches)] == [N]
    # the emulator serves what it holds
    got = requests.post(tencent.url + vendor.GET_ATTR, params=log[1]["query"] | {"random": "7"},
                        json={"To_Account": ["u00001", "nobody"]}).json()
    assert got["ActionStatus"] == "OK"
    assert got["UserAttrs"] == [{"To_Account": "u00001", "Attrs": expected(rows[1])},
                                {"To_Account": "nobody", "Attrs": {}}]


def test_no_change_sends_nothing_and_changes_send_only_changed_attributes(setup, tencent):
    cfg, rows, url = setup
    run(cfg, "tencent_users")
    before = len(sets(tencent.emulator))
    second = run(cfg, "tencent_users")
    assert second.requests == 0 and len(sets(tencent.emulator)) == before and second.status == "success"

    later = T0 + dt.timedelta(hours=1)
    update_users(url, {
        "u00001": {"plan": "enterprise", "updated_at": later},
        "u00002": {"ltv": 999.5, "orders": 6, "updated_at": later},
        "u00003": {"subscribed": True, "birthday": dt.date(2000, 2, 29), "updated_at": later},
        "u00004": {"interests": json.dumps(["chess"]), "updated_at": later},  # unmapped column only
    })
    third = run(cfg, "tencent_users")
    new = sets(tencent.emulator)[before:]
    assert third.requests == 1 and len(new) == 1
    by_user = {u["To_Account"]: u["Attrs"] for u in new[0]["body"]["UserAttrs"]}
    assert by_user == {"u00001": {"plan": "enterprise"}, "u00002": {"ltv": "999.5", "orders": "6"},
                       "u00003": {"subscribed": "true", "birthday": "2000-02-29"}}
    rows[1]["plan"], rows[2]["ltv"], rows[2]["orders"] = "enterprise", 999.5, 6
    rows[3]["subscribed"], rows[3]["birthday"] = True, dt.date(2000, 2, 29)
    assert tencent.emulator.state() == {r["user_id"]: expected(r) for r in rows}


def test_once_attribute_is_never_sent_again(setup, tencent):
    cfg, rows, url = setup
    run(cfg, "tencent_users")
    for step in range(2):
        later = T0 + dt.timedelta(hours=step + 1)
        update_users(url, {"u00005": {"signup_at": T0 + dt.timedelta(days=step + 1), "plan": f"p{step}",
                                      "updated_at": later}})
        n = len(sets(tencent.emulator))
        s = run(cfg, "tencent_users")
        assert s.users_delivered == 1
        (req,) = sets(tencent.emulator)[n:]
        assert req["body"]["UserAttrs"] == [{"To_Account": "u00005", "Attrs": {"plan": f"p{step}"}}]
    held = tencent.emulator.state()["u00005"]
    assert held["signup_at"] == expected(rows[5])["signup_at"] and held["plan"] == "p1"


def test_requests_are_packed_full(sqlite_url, tencent, tmp_path):
    make_users(sqlite_url, [user_row(i) for i in range(250)])
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [tencent_sync(tencent.url)])
    s = run(cfg, "tencent_users")
    assert s.status == "success" and s.users_delivered == 250 and s.requests == 3
    sizes = sorted((len(r["body"]["UserAttrs"]) for r in sets(tencent.emulator)), reverse=True)
    assert sizes == [100, 100, 50]
    assert sum(sizes) / (len(sizes) * 100) >= 250 / 300  # as full as 250 users allow: ceil(250/100) requests
    assert len(tencent.emulator.state()) == 250


def test_a_push_of_several_chunks_delivers_everyone_and_leaves_nothing_frozen(sqlite_url, tencent, tmp_path):
    # more users than one read of the plan: the push keeps them out of the collector's sight
    # while they are in flight (gc.freeze), and must give every object back when it ends
    n = push.READ_CHUNK * 2 + 150
    make_users(sqlite_url, [user_row(i) for i in range(n)])
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [tencent_sync(tencent.url)])
    frozen = gc.get_freeze_count()
    s = run(cfg, "tencent_users")
    assert (s.status, s.users_delivered, s.requests) == ("success", n, -(-n // 100))
    assert gc.get_freeze_count() == frozen == 0
    assert len(tencent.emulator.state()) == n


def test_oversize_value_sets_that_attribute_aside_alone(db_url, tencent, tmp_path):
    rows = [user_row(i) for i in range(8)]
    rows[3]["note"] = "é" * 26  # 26 characters, 52 bytes: over the 50-byte limit
    rows[4]["note"] = "é" * 25  # exactly 50 bytes: fine
    make_users(db_url, rows)
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [tencent_sync(tencent.url)])
    s = run(cfg, "tencent_users")
    assert (s.status, s.users_delivered, s.users_rejected, s.requests) == ("partial", 8, 1, 1)
    (f,) = table(db_url, state.failures)
    assert (f["user_key"], f["attribute"], f["error_class"]) == ("u00003", "note", "invalid")
    assert "note" in f["message"]
    held = {r["user_id"]: expected(r) for r in rows}
    del held["u00003"]["note"]  # the rest of that user delivered
    assert tencent.emulator.state() == held


def test_unregistered_attribute_fails_before_any_write(setup, tencent):
    cfg, rows, url = setup
    tencent.emulator.attr_names.remove("birthday")
    with pytest.raises(ConfigError, match="'birthday' is not registered") as e:
        run(cfg, "tencent_users")
    assert e.value.field == "mapping[5].attribute"
    assert [r["path"] for r in tencent.emulator.log] == [vendor.GET_ATTR_NAME]
    (r,) = table(url, state.runs)
    assert r["status"] == "failed" and "birthday" in r["error"]
    assert tencent.emulator.state() == {} and table(url, state.snapshot) == []


def test_usersig_is_remade_after_an_injected_70001(setup, tencent):
    cfg, rows, url = setup
    tencent.emulator.add_fault("code", code=70001, match='"UserAttrs"')
    s = run(cfg, "tencent_users")
    assert s.status == "success" and s.users_delivered == N and s.requests == 2
    first, second = (r["query"]["usersig"] for r in sets(tencent.emulator))
    assert first != second and sig_doc(second)["TLS.time"] > sig_doc(first)["TLS.time"]
    (b,) = table(url, state.batches)
    assert (b["attempts"], b["outcome"], b["vendor_code"]) == (2, "delivered", "0")
    assert tencent.emulator.state() == {r["user_id"]: expected(r) for r in rows}


def test_invalidated_sig_is_remade_once_then_the_run_stops(setup, tencent):
    cfg, rows, url = setup
    run(cfg, "tencent_users")
    tencent.emulator.add_fault("code", code=70052, match="{}")  # the names read: the body is {}
    update_users(url, {"u00001": {"plan": "x", "updated_at": T0 + dt.timedelta(hours=1)}})
    s = run(cfg, "tencent_users")  # prepare is refused (70052), remakes the sig and goes on
    assert s.status == "success" and tencent.emulator.state()["u00001"]["plan"] == "x"
    assert [r["path"] for r in tencent.emulator.log[-3:]] == [vendor.GET_ATTR_NAME, vendor.GET_ATTR_NAME,
                                                               vendor.SET_ATTR]
    # refused twice in a row (expired again right after being remade): stop, don't loop
    update_users(url, {"u00002": {"plan": "y", "updated_at": T0 + dt.timedelta(hours=2)}})
    tencent.emulator.add_fault("code", code=70001, times=2, match='"UserAttrs"')
    n = len(sets(tencent.emulator))
    s = run(cfg, "tencent_users")
    assert s.status == "failed" and "70001" in s.error and "refused again" in s.error
    assert len(sets(tencent.emulator)) - n == 2  # the refused write and its one retry with a new sig
    assert tencent.emulator.state()["u00002"]["plan"] != "y"


def test_per_account_error_rejects_that_account_only_and_it_is_retried(setup, tencent):
    cfg, rows, url = setup
    tencent.emulator.accounts = {r["user_id"] for r in rows} - {"u00007"}  # u00007 not imported yet
    s = run(cfg, "tencent_users")
    assert (s.status, s.users_delivered, s.users_rejected) == ("partial", N - 1, 1)
    (f,) = table(url, state.failures)
    assert (f["user_key"], f["error_class"], f["code"], f["message"]) == ("u00007", "rejected", "70107",
                                                                          "account does not exist")
    assert table(url, state.batches)[0]["outcome"] == "partial"
    assert "u00007" not in tencent.emulator.state()
    tencent.emulator.accounts.add("u00007")
    s2 = run(cfg, "tencent_users")
    assert s2.status == "success" and s2.users_delivered == 1
    assert tencent.emulator.state() == {r["user_id"]: expected(r) for r in rows}
    assert table(url, state.failures) == []


def test_permanent_batch_error_is_split_to_the_bad_user(setup, tencent):
    cfg, rows, url = setup
    tencent.emulator.add_fault("code", code=90033, times=6, match='"u00005"')
    s = run(cfg, "tencent_users")
    assert (s.status, s.users_delivered, s.users_rejected) == ("partial", N - 1, 1)
    # 40 -> 20 -> 10 -> 5 -> 2 -> 1 refused (6), halves without u00005 delivered (5)
    reqs = sets(tencent.emulator)
    assert len(reqs) == 11 and not tencent.emulator.faults
    solo = [r for r in reqs if [u["To_Account"] for u in r["body"]["UserAttrs"]] == ["u00005"]]
    assert len(solo) == 1
    (f,) = table(url, state.failures)
    assert (f["user_key"], f["error_class"], f["code"]) == ("u00005", "rejected", "90033")
    outcomes = sorted(b["outcome"] for b in table(url, state.batches))
    assert outcomes == ["delivered"] * 5 + ["rejected"] + ["split"] * 5
    assert tencent.emulator.state() == {r["user_id"]: expected(r) for r in rows if r["user_id"] != "u00005"}
    s2 = run(cfg, "tencent_users")  # retried next run
    assert s2.status == "success" and tencent.emulator.state()["u00005"] == expected(rows[5])


def test_retryable_errors_are_retried_with_attempts_recorded(setup, tencent):
    cfg, rows, url = setup
    tencent.emulator.add_fault("code", code=91000, times=2, match='"UserAttrs"')
    tencent.emulator.add_fault("throttle", match='"UserAttrs"')  # 60007: waits the 1-s window
    s = run(cfg, "tencent_users")
    assert s.status == "success" and s.users_delivered == N and s.requests == 4
    arrived = [r["at"] for r in sets(tencent.emulator)]
    assert arrived[3] - arrived[2] >= 0.9  # the throttled third attempt: the next waited Tencent's window
    (b,) = table(url, state.batches)
    assert (b["attempts"], b["outcome"]) == (4, "delivered")
    codes = [sent["query"]["random"] for sent in sets(tencent.emulator)]
    assert len(set(codes)) == 4  # a fresh random on every attempt
    assert tencent.emulator.state() == {r["user_id"]: expected(r) for r in rows}


def test_bad_secret_key_stops_the_run_at_once(setup, tencent, monkeypatch):
    cfg, rows, url = setup
    monkeypatch.setenv("TEST_TENCENT_KEY", "wrong-key")
    with pytest.raises(ConfigError, match="70009") as e:
        run(cfg, "tencent_users")
    assert e.value.field == "vendor.credentials.secret_key" and "wrong-key" not in str(e.value)
    assert len(tencent.emulator.log) == 1  # one request, then nothing
    (r,) = table(url, state.runs)
    assert r["status"] == "failed" and "70009" in r["error"]
    assert tencent.emulator.state() == {} and table(url, state.snapshot) == []


def test_admin_refusal_mid_push_stops_after_one_write(sqlite_url, tencent, tmp_path):
    make_users(sqlite_url, [user_row(i) for i in range(150)])
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [tencent_sync(tencent.url)])
    tencent.emulator.add_fault("code", code=90009, match='"UserAttrs"')
    s = run(cfg, "tencent_users")
    assert s.status == "failed" and "90009" in s.error and "admin" in s.error
    assert len(sets(tencent.emulator)) == 1  # the first write goes alone; nothing follows a STOP
    assert tencent.emulator.state() == {} and table(sqlite_url, state.snapshot) == []


# -- the emulator's own rules, over HTTP -----------------------------------------------------
def test_emulator_checks_usersig_and_url(tencent):
    now = int(time.time())

    def call(sig=None, body=None, path=vendor.GET_ATTR_NAME, **q):
        params = {"usersig": sig or usersig.make_usersig(APPID, KEY, ADMIN), "identifier": ADMIN,
                  "sdkappid": APPID, "random": "4294967295", "contenttype": "json", **q}
        answer = requests.post(tencent.url + path, params=params, json={} if body is None else body)
        assert answer.status_code == 200
        return answer.json()

    assert call() == {"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0,
                      "AttrNames": {str(i): n for i, n in enumerate(NAMES)}}
    assert call(usersig.make_usersig(APPID, KEY, ADMIN, expire=60, now=now - 120))["ErrorCode"] == 70001
    assert call(usersig.make_usersig(APPID, "other-key", ADMIN))["ErrorCode"] == 70009
    assert call("not-a-sig")["ErrorCode"] == 70003
    assert call(usersig.make_usersig(APPID, KEY, "someone"))["ErrorCode"] == 70013
    assert call(usersig.make_usersig(APPID, KEY, "someone"), identifier="someone")["ErrorCode"] == 90009
    assert call(usersig.make_usersig("1400999999", KEY, ADMIN))["ErrorCode"] == 70014
    assert call(random="4294967296")["ErrorCode"] == 60002
    assert call(random="-1")["ErrorCode"] == 60002
    assert call(contenttype="xml")["ErrorCode"] == 60002
    assert call(random="x") == {"ActionStatus": "FAIL", "ErrorCode": 60002,
                                "ErrorInfo": "random must be a 32-bit unsigned integer"}
    def users(n, **attrs):
        return {"UserAttrs": [{"To_Account": f"a{i}", "Attrs": attrs or {"plan": "x"}} for i in range(n)]}

    assert call(body=users(101), path=vendor.SET_ATTR)["ErrorCode"] == 90018
    assert call(body=users(1, vip="1"), path=vendor.SET_ATTR)["ErrorCode"] == 90033
    assert call(body=users(1, plan="x" * 51), path=vendor.SET_ATTR)["ErrorCode"] == 90033
    assert call(body=users(1, plan=5), path=vendor.SET_ATTR)["ErrorCode"] == 90001
    assert tencent.emulator.state() == {}
    assert call(body=users(100), path=vendor.SET_ATTR)["ErrorCode"] == 0
    assert len(tencent.emulator.state()) == 100
    tencent.emulator.revoke()  # every sig made up to this second is invalidated
    assert call(usersig.make_usersig(APPID, KEY, ADMIN, now=now - 10))["ErrorCode"] == 70052
    assert call(usersig.make_usersig(APPID, KEY, ADMIN, now=int(time.time()) + 1))["ErrorCode"] == 0


def test_emulator_enforces_its_rate_limit(tencent):
    tencent.emulator.rate_limit = 5
    sig = usersig.make_usersig(APPID, KEY, ADMIN)
    codes = [requests.post(tencent.url + vendor.GET_ATTR_NAME, json={}, params={
        "usersig": sig, "identifier": ADMIN, "sdkappid": APPID, "random": str(i), "contenttype": "json",
    }).json()["ErrorCode"] for i in range(6)]
    assert codes == [0] * 5 + [60007]


# -- configuration ----------------------------------------------------------------------------
def test_region_picks_the_host_and_base_url_overrides_it():
    c = client.Client(None, {"secret_key": KEY}, {"sdkappid": APPID, "identifier": ADMIN, "region": "singapore"})
    assert c.base_url == "https://adminapisgp.im.qcloud.com"
    assert client.Client(None, {"secret_key": KEY}, {"region": "adminapiger.im.qcloud.com"}).base_url == \
        "https://adminapiger.im.qcloud.com"
    assert client.Client(None, {"secret_key": KEY}, {}).base_url == "https://console.tim.qq.com"
    assert client.Client("http://127.0.0.1:9/", {"secret_key": KEY}, {"region": "seoul"}).base_url == \
        "http://127.0.0.1:9"


@pytest.mark.parametrize("change, message", [
    ({"vendor": {"type": "tencent_im", "settings": {"sdkappid": APPID, "identifier": ADMIN, "region": "mars"},
                 "credentials": {"secret_key": "${TEST_TENCENT_KEY}"}}}, "unknown region 'mars'"),
    ({"vendor": {"type": "tencent_im", "settings": {"identifier": ADMIN},
                 "credentials": {"secret_key": "${TEST_TENCENT_KEY}"}}}, "sdkappid: missing"),
    ({"mapping": [{"column": "plan", "attribute": f"a{i}", "type": "String"} for i in range(11)]}, "at most 10"),
    ({"mapping": [{"column": "interests", "attribute": "i", "type": "Array"}]}, "not a tencent_im type"),
    ({"mapping": [{"column": "points", "attribute": "p", "type": "Long", "rule": "increase"}]},
     "not a tencent_im rule"),
])
def test_config_is_checked_before_anything_runs(tmp_path, sqlite_url, monkeypatch, change, message):
    monkeypatch.setenv("TEST_TENCENT_KEY", KEY)
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [tencent_sync("http://127.0.0.1:9", **change)])
    with pytest.raises(ConfigError, match=message):
        run(cfg, "tencent_users")
