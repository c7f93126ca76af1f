"""The blast-radius guard, end to end: an implausibly large change (too many known users
changed, or an attribute NULLed for too many) stops the run before anything is sent, says
why, and goes ahead only with --allow-large-change."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from connector import state
from vendor_cases.dfinery import DFINERY_MAPPING, dfinery_sync
from warehouse import cli, make_users, run, T0, table, update_users, user_row, write_config

N = 20
LATER = T0 + dt.timedelta(hours=1)
GUARD = {"max_changed_fraction": 0.5, "max_nulled_fraction": 0.3, "min_users": 10}


@pytest.fixture
def synced(db_url, dfinery, tmp_path):
    """N users delivered once; the plan column may be NULLed (null: send)."""
    mapping = [dict(m, null="send") if m["column"] == "plan" else m for m in DFINERY_MAPPING]
    make_users(db_url, [user_row(i) for i in range(N)]).dispose()
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [dfinery_sync(dfinery.url, guard=GUARD, mapping=mapping)])
    assert run(cfg, "dfinery_users").users_delivered == N
    return cfg, db_url


def frozen(url: str) -> tuple:
    """What a blocked run must leave as it was."""
    return (sorted((r["user_key"], r["payload"]) for r in table(url, state.snapshot)),
            [r["watermark"] for r in table(url, state.cursors)], table(url, state.plan))


def change(url: str, users: range, **values) -> None:
    update_users(url, {f"u{i:05d}": {**values, "updated_at": LATER} for i in users})


def test_too_many_changed_stops_before_sending_until_overridden(synced, dfinery):
    cfg, url = synced
    change(url, range(11), plan="churned")  # 11 of 20 known users: 55% > 50%
    sent, before = len(dfinery.emulator.log), frozen(url)
    for _ in range(2):  # not a one-off: it stays blocked until someone says otherwise
        s = run(cfg, "dfinery_users")
        assert (s.status, s.ok, s.requests) == ("blocked", False, 0)
        assert "11 of 20 known users changed (55% > max_changed_fraction 50%)" in s.error
        assert "--allow-large-change" in s.error
        assert len(dfinery.emulator.log) == sent and frozen(url) == before
    assert [r["status"] for r in table(url, state.runs)][-2:] == ["blocked", "blocked"]

    s = run(cfg, "dfinery_users", allow_large_change=True)
    assert (s.status, s.users_delivered, s.requests) == ("success", 11, 11)
    assert {dfinery.emulator.state()[f"u{i:05d}"]["membership"] for i in range(11)} == {"churned"}


def test_at_the_threshold_the_run_goes_ahead(synced, dfinery):
    cfg, url = synced
    change(url, range(10), plan="churned")  # exactly 50%: not over the threshold
    s = run(cfg, "dfinery_users")
    assert (s.status, s.users_delivered) == ("success", 10)


def test_mass_null_stops_the_cli_run_and_the_override_sends_it(synced, dfinery):
    cfg, url = synced
    change(url, range(7), plan=None)  # 7 of 20 NULLed (35% > 30%), while only 35% changed
    sent, before = len(dfinery.emulator.log), frozen(url)

    p = cli("plan", "dfinery_users", "--config", str(cfg))
    assert p.returncode == 0 and "blast-radius guard would stop this run" in p.stdout
    assert "attribute 'membership' became NULL for 7 of 20 known users" in p.stdout

    r = cli("run", "dfinery_users", "--config", str(cfg), "--json")
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "blocked"
    assert len(dfinery.emulator.log) == sent and frozen(url) == before
    assert "became NULL for 7 of 20" in table(url, state.runs)[-1]["error"]

    r = cli("run", "dfinery_users", "--config", str(cfg), "--json", "--allow-large-change")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["users_delivered"] == 7
    assert [dfinery.emulator.state()[f"u{i:05d}"]["membership"] for i in range(7)] == [None] * 7
