"""Bad input: every entry of the catalogue (``bad_inputs``) ends with its specific error and costs
nobody else; and what a vendor makes of text, time zones and an attribute it never registered."""

from __future__ import annotations

import pytest

import fault_harness as h
from bad_inputs import BAD, CATALOGUE, sql_case, stopped
from connector import state



@pytest.mark.parametrize("bad", CATALOGUE, ids=[b.name for b in CATALOGUE])
def test_bad_input_has_a_specific_error_and_costs_nobody_else(bad, tmp_path, monkeypatch):
    said = bad.run(tmp_path, monkeypatch.setenv)
    assert bad.message in said.text
    assert said.lost == 0  # rows: everyone else delivered, the bad user not sent; runs: nothing sent
    assert "wh-pass" not in said.text


def test_time_zones_naive_is_utc_aware_is_converted(tmp_path, monkeypatch):
    case = sql_case("dfinery", tmp_path, monkeypatch.setenv, {}, BAD)
    (tmp_path / "users.sql").write_text(
        "SELECT user_id, plan, ltv, orders, subscribed, interests, updated_at, CASE user_id "
        "WHEN 'u00001' THEN '2026-01-01T12:00:00+09:00' WHEN 'u00002' THEN '2026-01-01 12:00:00' "
        "WHEN 'u00003' THEN '2026-01-01T12:00:00Z' ELSE '2025-06-30T23:30:00-02:00' END AS signup_at FROM users")
    try:
        assert case.run().status == "success"
        held = {k: v["signup_at"] for k, v in case.emu.state().items()}
        assert held["u00001"] == "2026-01-01T03:00:00.000Z" and held["u00000"] == "2025-07-01T01:30:00.000Z"
        assert held["u00002"] == held["u00003"] == "2026-01-01T12:00:00.000Z"
    finally:
        case.running.stop()


@pytest.mark.parametrize("vendor", ["dfinery", "tencent_im", "moengage", "jiguang", "engagelab"])
def test_emoji_and_non_ascii_text_arrive_intact(vendor, tmp_path, monkeypatch):
    text = "😀 café 東京 ñ"  # 20 bytes: within Tencent's 50
    case = sql_case(vendor, tmp_path, monkeypatch.setenv, {"plan": f"'{text}'"}, BAD)
    try:
        assert case.run().status == "success"
        assert case.held()[case.keys[3]]["membership"] == text
    finally:
        case.running.stop()


UNREGISTERED = {  # what each vendor says when an attribute was never registered in its console
    "dfinery": "user property 'ltv' is not registered",
    "engagelab": "'ltv' is not registered",
    "jiguang": "attribute 'ltv' does not exist in the Jiguang project",
    "tencent_im": "attribute 'ltv' is not registered in the app",
}


@pytest.mark.parametrize("vendor", list(UNREGISTERED))
def test_unregistered_attribute_is_named(vendor, tmp_path, monkeypatch):
    """(MoEngage creates an attribute on first sight: nothing to register.)"""
    case = h.setup(vendor, tmp_path, monkeypatch.setenv)
    emu = case.emu
    try:
        for registry in ("properties", "attributes"):
            getattr(emu, registry, {}).pop("ltv", None)
        if vendor == "tencent_im":
            emu.attr_names.remove("ltv")
        said = stopped(case, sent=0)
        failures = [r["message"] for r in case.rows(state.failures)]
        assert UNREGISTERED[vendor] in said.text + "\n".join(failures)
        assert all("ltv" not in attrs for attrs in emu.state().values())
    finally:
        case.running.stop()
