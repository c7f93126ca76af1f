"""Shared fixtures: real databases (SQLite always; PostgreSQL / MariaDB when their URLs
are set) and a DFINERY emulator on loopback. What the tests build worlds of (the users
table, syncs.yaml, runs) is the helper module ``warehouse``; the vendors' test worlds are
``vendor_cases``."""

from __future__ import annotations

import pytest

from connector.vendors import emulator
from vendor_cases.dfinery import DFINERY_MAPPING, TOKEN
from warehouse import SERVERS, fresh_database


def _db_params() -> list:
    params = [pytest.param("sqlite", id="sqlite")]
    for name, url in SERVERS.items():
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(not url, reason=f"no {name} URL set")))
    return params


@pytest.fixture(params=_db_params())
def db_url(request, tmp_path) -> str:
    """A fresh, empty database on each backend in turn."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'warehouse.db'}"
        return
    url, drop = fresh_database(SERVERS[request.param])
    yield url
    drop()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'warehouse.db'}"


@pytest.fixture
def dfinery(monkeypatch):
    """A DFINERY emulator on loopback with the test mapping registered."""
    from connector.vendors.dfinery import emulator as vendor

    monkeypatch.setenv("TEST_DFINERY_TOKEN", TOKEN)
    emu = vendor.Emulator(service_id="svc-1", access_token=TOKEN,
                          properties={m["attribute"]: m["type"] for m in DFINERY_MAPPING})
    with emulator.Running(emu) as running:
        yield running
