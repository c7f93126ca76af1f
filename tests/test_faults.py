"""Every fault class the emulators inject, against every vendor (the matrix is in
``fault_harness``): the run completes, every user is delivered or recorded as failed with
its reason, and what failed is delivered by the retry or by the next run — never twice."""

from __future__ import annotations

import pytest

import fault_harness as h
from connector import vendors
from connector.vendors.tencent_im import settings as tencent_im


@pytest.mark.parametrize(("vendor", "fault"), h.cells(), ids=[f"{v}-{f}" for v, f in h.cells()])
def test_fault_matrix(vendor, fault, tmp_path, monkeypatch):
    o = h.run_case(vendor, fault, tmp_path, monkeypatch.setenv)
    # the faulty run ends, with nobody unaccounted for and nothing applied twice
    assert o.first["lost"] == [] and o.first["wrong"] == []
    assert o.statuses[0] in (("success",) if fault == "slow" else ("partial",))
    if fault == "slow":
        parts = 2 if vendor == "engagelab" else 1  # its set and its increase
        assert o.first["failed"] == {} and o.a_attempts == parts  # slow, but no retry
    else:
        # A met the fault once: delivered by the retry, in the same run
        in_errorlist = vendor == "tencent_im" and fault == "partial_success"  # A's request succeeded at once
        assert o.a in o.first["delivered"] and o.a_attempts >= (1 if in_errorlist else 2)
        # B met it on every attempt: recorded as failed (with the users of its request), with the reason
        assert o.b not in o.first["delivered"]
        cls, code, message = o.b_failure
        assert cls in ("retryable", "in_doubt", "rejected") and code and message
    if fault in ("throttle_code", "throttle_429_reset"):
        # the retry waited as long as the vendor asked: its reset header (never longer than the
        # vendor's window, which is all a window limit can ask), or Tencent's 1-s window
        window = vendors.get(vendor).limit.window
        asked = tencent_im.LIMIT.window if vendor == "tencent_im" or fault == "throttle_code" \
            else min(h.THROTTLE_RESET, window)
        assert o.gap >= asked - 0.1
    # the next, healthy run delivers the rest: everyone held exactly as acknowledged
    assert o.statuses[1] == "success"
    assert len(o.second["delivered"]) == o.users and o.second["failed"] == {} and o.second["wrong"] == []


def test_engagelab_parts_keep_what_was_acknowledged(tmp_path, monkeypatch):
    """A change of two requests whose second fails: the first part's attributes are kept,
    the increase is sent next run exactly once."""
    case = h.setup("engagelab", tmp_path, monkeypatch.setenv, **h.OVERRIDES["engagelab", "partial_success"])
    try:
        h.inject_partial(case)
        case.run()
        _, _, b = h.users_for("engagelab")
        euid = int(case.keys[b])
        assert "points" not in case.emu.state()[euid] and "membership" in case.emu.state()[euid]
        sent = len(case.emu.log)
        h.heal(case, "partial_success")
        assert case.run().status == "success"
        again = [r["body"] for r in case.emu.log[sent:]]  # B's increase, and nothing of A again
        assert again == [{"euid": euid, "type": "increase", "properties": {"points": b * 10 + 5}}]
        assert case.emu.state()[euid]["points"] == b * 10 + 5
    finally:
        case.running.stop()

