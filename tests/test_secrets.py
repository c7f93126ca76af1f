"""Credentials never show: not in logs (debug included), sync tables, exception messages or
``usersync status`` — for every vendor, through failures, refusals and an unreachable
vendor. And TLS certificates are verified unless a sync explicitly turns that off."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess

import pytest
import sqlalchemy as sa

import fault_harness as h
from connector import state
from vendor_cases.dfinery import dfinery_sync
from warehouse import cli, make_users, run, table, user_row, write_config


def credentials_seen(emu) -> set[str]:
    """Every credential-bearing value the vendor received: Basic tokens, headers, UserSigs."""
    seen = set()
    for r in emu.log:
        auth = r["headers"].get("authorization", "")
        seen.add(auth.removeprefix("Basic "))
        seen.add(r["headers"].get("access_token", ""))
        seen.add(r["query"].get("usersig", ""))
    return {s for s in seen if s}


def syncs_pages(name: str) -> list[str]:
    """Everything Airflow's Syncs page serves about a sync: each page, JSON answer and CSV
    (rendered as the routes render them; who may see them is tests/test_ui.py's part)."""
    import json

    from connector import report
    from connector.airflow import ui

    sync = ui.CATALOG.syncs()[name]
    eng = ui.CATALOG.engine(sync)
    listing, runs = ui.syncs_context(None, [sync]), ui.sync_context(sync, 1)
    out = [ui.render("syncs.html", base="", query={}, **listing), json.dumps(ui.jsonable(listing["rows"])),
           ui.render("sync.html", base="", query={}, **runs), json.dumps(ui.jsonable(runs["runs"]))]
    assert len(runs["runs"]) >= 3
    for run in runs["runs"]:
        ctx = ui.run_context(sync, run["run_id"])
        out += [ui.render("run.html", base="", query={}, **ctx), json.dumps(ui.jsonable(ctx)),
                ui.failures_csv(report.failures(eng, name, run["run_id"], limit=None))]
    return out


def outcome(case, **kw) -> str:
    """A run's summary line, or the exception it raised, as a user would read them."""
    try:
        return case.run(**kw).line()
    except Exception as e:  # noqa: BLE001 - what it says is what we check
        return f"{type(e).__name__}: {e} {e!r}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("vendor", list(h.VENDORS))
def test_credentials_never_leak(vendor, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    case = h.setup(vendor, tmp_path, monkeypatch.setenv)
    said: list[str] = []  # everything the tool said outside the log
    try:
        h.inject(case, "connection_reset")
        h.inject(case, "malformed_json")
        said.append(outcome(case))  # failures recorded with transport messages
        run_v = cli("-v", "run", case.name, "--config", str(case.cfg_path))  # debug logs of a real run
        said += [run_v.stdout, run_v.stderr]
        env, secret = next(iter(h.secret_env(vendor).items()))
        monkeypatch.setenv(env, secret + "-wrong")  # refused: the run stops with the vendor's words
        said.append(outcome(case, full_refresh=True))
        monkeypatch.setenv(env, secret)
        unreachable = h.sync_dict(vendor, f"http://127.0.0.1:{closed_port()}")
        write_config(case.cfg_path, case.url, [unreachable])
        said.append(outcome(case, full_refresh=True))
        status = cli("status", "--config", str(case.cfg_path))
        said += [status.stdout, status.stderr]
        assert "failed" in status.stdout
        monkeypatch.setenv("USERSYNC_CONFIG", str(case.cfg_path))
        said += syncs_pages(case.name)
    finally:
        case.running.stop()
    secrets = set(h.VENDORS[vendor]["credentials"].values()) | {secret + "-wrong"} | credentials_seen(case.emu)
    eng = state.make_engine(case.url)
    with eng.connect() as c:
        rows = [repr(list(r)) for t in state.metadata.sorted_tables for r in c.execute(sa.select(t))]
    eng.dispose()
    assert len(rows) > 10
    ours = [logging.Formatter().format(r) for r in caplog.records if not r.name.startswith("usersync.emulator")]
    haystack = "\n".join([*ours, *said, *rows])  # (the emulator's access log is the vendor's, not ours)
    assert "Read timed out" in haystack or "Connection" in haystack  # the failures were told
    for s in secrets:
        assert s not in haystack, f"a {vendor} credential leaked"
    assert "usersig=eJ" not in haystack  # not even the start of a UserSig (messages are cut at 300 chars)


@pytest.fixture
def https_dfinery(dfinery, tmp_path):
    """The DFINERY emulator behind TLS with a self-signed certificate (made by openssl)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    dfinery.server.socket = ctx.wrap_socket(dfinery.server.socket, server_side=True)
    return dfinery.url.replace("http://", "https://")


def test_tls_is_verified_unless_the_sync_turns_it_off(https_dfinery, dfinery, sqlite_url, tmp_path):
    make_users(sqlite_url, [user_row(i) for i in range(5)]).dispose()
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [dfinery_sync(https_dfinery)])
    s = run(cfg, "dfinery_users")
    # an untrusted certificate stops the run at its first request: nothing sent, nothing moved
    assert (s.status, s.requests, s.users_delivered) == ("failed", 1, 0)
    assert "TLS certificate not trusted" in s.error and "CERTIFICATE_VERIFY_FAILED" in s.error
    assert dfinery.emulator.log == [] and table(sqlite_url, state.snapshot) == []

    sync = dfinery_sync(https_dfinery)
    sync["vendor"]["verify_tls"] = False
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [sync])
    s = run(cfg, "dfinery_users")
    assert (s.status, s.users_delivered) == ("success", 5), s.error
    assert len(dfinery.emulator.state()) == 5
