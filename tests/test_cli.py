"""The CLI as a user runs it: a real subprocess, real exit codes, real output."""

from __future__ import annotations

import json

import pytest

from connector import state

from vendor_cases.dfinery import dfinery_sync
from warehouse import ROOT, cli, make_users, table, user_row, write_config


@pytest.fixture
def cfg(sqlite_url, dfinery, tmp_path):
    make_users(sqlite_url, [user_row(i) for i in range(12)])
    return write_config(tmp_path / "syncs.yaml", sqlite_url, [dfinery_sync(dfinery.url)])


def test_run_json_status_and_plan(cfg, dfinery):
    p = cli("plan", "dfinery_users", "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    assert "12 to send" in p.stdout and "membership" in p.stdout and "sample POST" in p.stdout
    assert dfinery.emulator.log == []  # plan sends nothing

    r = cli("run", "dfinery_users", "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary) == {"run_id", "sync", "vendor", "status", "users_read", "users_changed", "users_delivered",
                            "users_rejected", "users_failed", "requests"}
    assert (summary["status"], summary["users_delivered"], summary["requests"]) == ("success", 12, 12)

    again = cli("run", "--all", "--config", str(cfg))
    assert again.returncode == 0 and "changed 0" in again.stdout.splitlines()[-1]

    s = cli("status", "--config", str(cfg))
    assert s.returncode == 0 and "dfinery_users" in s.stdout and "delivered 12" in s.stdout
    for out in (p, r, again, s):
        assert "tok-secret-123" not in out.stdout + out.stderr


def test_partial_beyond_tolerance_exits_non_zero(cfg, dfinery):
    del dfinery.emulator.properties["ltv"]
    r = cli("run", "dfinery_users", "--config", str(cfg))
    assert r.returncode == 1 and "partial" in r.stdout.splitlines()[-1]
    s = cli("status", "dfinery_users", "--config", str(cfg))
    assert "recent failures" in s.stdout and "not registered" in s.stdout


def test_config_error_exit_code_and_message(cfg, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("column: plan", "column: plan_name"))
    r = cli("run", "dfinery_users", "--config", str(bad))
    assert r.returncode == 2
    assert f"{bad}: sync 'dfinery_users': mapping[0].column: unknown column 'plan_name'" in r.stderr


def test_locked_sync_refuses_with_a_clear_message(cfg, sqlite_url):
    eng = state.connect(sqlite_url)
    state.acquire_lock(eng, "dfinery_users", run_id=999)
    r = cli("run", "dfinery_users", "--config", str(cfg))
    assert r.returncode == 3 and "locked by run 999" in r.stderr


def test_a_window_on_a_sync_without_cursor_is_a_config_error(sqlite_url, dfinery, tmp_path):
    """Without a cursor there is nothing to apply --since to: refused before anything is
    recorded or sent (it used to read and send everyone, recorded as a backfill)."""
    make_users(sqlite_url, [user_row(i) for i in range(3)])
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [dfinery_sync(dfinery.url, cursor=None)])
    r = cli("run", "dfinery_users", "--config", str(cfg), "--since", "2100-01-01")
    assert r.returncode == 2, r.stderr
    assert f"{cfg}: sync 'dfinery_users': cursor: no cursor column: a date-time window" in r.stderr
    assert dfinery.emulator.log == [] and table(sqlite_url, state.runs) == []
    assert cli("run", "dfinery_users", "--config", str(cfg)).returncode == 0  # without the window, it runs
    assert len(dfinery.emulator.log) == 3


def test_help_lists_commands_and_examples():
    h = cli("--help")
    assert h.returncode == 0
    for word in ("run", "plan", "status", "emulators", "demo", "examples:"):
        assert word in h.stdout
    rh = cli("run", "--help")
    assert "--full-refresh" in rh.stdout and "--json" in rh.stdout and "Exit 0" in rh.stdout


def test_sql_ddl_files_match_the_table_definitions():
    for dialect in ("sqlite", "postgresql", "mysql"):
        assert (ROOT / "sql" / f"sync_tables.{dialect}.sql").read_text() == state.ddl(dialect), (
            f"sql/sync_tables.{dialect}.sql is stale: run `make ddl`")
