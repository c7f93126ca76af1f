"""Shared fixtures: real databases (SQLite always; PostgreSQL / MariaDB when their URLs
are set), a typed users table, syncs.yaml files, and emulators on loopback."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from connector import config, emulator, engine, state

SERVERS = {
    "postgresql": os.environ.get("USERSYNC_TEST_POSTGRES_URL"),
    "mysql": os.environ.get("USERSYNC_TEST_MYSQL_URL"),
}


def _fresh_database(server_url: str) -> tuple[str, callable]:
    """Create a uniquely named database on a server; return its URL and a dropper."""
    url = sa.make_url(server_url)
    name = f"usersync_t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with admin.connect() as c:
            if url.get_backend_name() == "postgresql":
                c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                c.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()

    return url.set(database=name).render_as_string(hide_password=False), drop


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
    url, drop = _fresh_database(SERVERS[request.param])
    yield url
    drop()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'warehouse.db'}"


# -- a typed users table that works on every backend ------------------------------------
USERS = sa.Table(
    "users", sa.MetaData(),
    sa.Column("user_id", sa.String(40), primary_key=True),
    sa.Column("numeric_id", sa.BigInteger, nullable=False),
    sa.Column("plan", sa.String(20)),
    sa.Column("ltv", sa.Float),
    sa.Column("orders", sa.Integer),
    sa.Column("points", sa.Integer),
    sa.Column("subscribed", sa.Boolean),
    sa.Column("signup_at", sa.DateTime),
    sa.Column("birthday", sa.Date),
    sa.Column("interests", sa.Text),
    sa.Column("note", sa.Text),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)
T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


def user_row(i: int, **over: Any) -> dict[str, Any]:
    row = {
        "user_id": f"u{i:05d}", "numeric_id": 1_000_000 + i, "plan": ["free", "pro", "enterprise"][i % 3],
        "ltv": round(i * 1.25, 2), "orders": i % 7, "points": i * 10, "subscribed": i % 2 == 0,
        "signup_at": T0 - dt.timedelta(days=i, seconds=i), "birthday": dt.date(1990, 1, 1) + dt.timedelta(days=i),
        "interests": json.dumps(["music", "travel"][: i % 3]), "note": f"note {i}", "updated_at": T0,
    }
    row.update(over)
    return row


def make_users(url: str, rows: list[dict[str, Any]]) -> sa.Engine:
    eng = sa.create_engine(url)
    USERS.drop(eng, checkfirst=True)
    USERS.create(eng)
    with eng.begin() as c:
        c.execute(USERS.insert(), rows)
    return eng


def update_users(url: str, changes: dict[str, dict[str, Any]]) -> None:
    eng = sa.create_engine(url)
    with eng.begin() as c:
        for user_id, values in changes.items():
            c.execute(USERS.update().where(USERS.c.user_id == user_id).values(**values))
    eng.dispose()


# -- syncs.yaml ---------------------------------------------------------------------------
DFINERY_MAPPING = [
    {"column": "plan", "attribute": "membership", "type": "String"},
    {"column": "ltv", "attribute": "ltv", "type": "Double"},
    {"column": "orders", "attribute": "orders", "type": "Long"},
    {"column": "subscribed", "attribute": "subscribed", "type": "Boolean"},
    {"column": "signup_at", "attribute": "signup_at", "type": "Datetime"},
    {"column": "birthday", "attribute": "birthday", "type": "Date"},
    {"column": "interests", "attribute": "interests", "type": "Array"},
]


def write_config(path: Path, warehouse: str, syncs: list[dict[str, Any]], state_url: str | None = None) -> Path:
    doc: dict[str, Any] = {"warehouse": warehouse, "syncs": syncs}
    if state_url:
        doc["state"] = state_url
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def dfinery_sync(base_url: str, **over: Any) -> dict[str, Any]:
    sync = {
        "name": "dfinery_users",
        "source": {"table": "users"},
        "identity": {"external_id": "user_id"},
        "cursor": "updated_at",
        "vendor": {"type": "dfinery", "base_url": base_url, "settings": {"service_id": "svc-1"},
                   "credentials": {"access_token": "${TEST_DFINERY_TOKEN}"}, "backoff": 0.01},
        "mapping": DFINERY_MAPPING,
    }
    sync.update(over)
    return copy.deepcopy(sync)


@pytest.fixture
def dfinery(monkeypatch):
    """A DFINERY emulator on loopback with the test mapping registered."""
    from connector.vendors import dfinery as vendor

    monkeypatch.setenv("TEST_DFINERY_TOKEN", "tok-secret-123")
    emu = vendor.Emulator(service_id="svc-1", access_token="tok-secret-123",
                          properties={m["attribute"]: m["type"] for m in DFINERY_MAPPING})
    with emulator.Running(emu) as running:
        yield running


def run(cfg_path: Path, name: str, **kw: Any) -> engine.Summary:
    cfg, _ = config.load(cfg_path)
    return engine.run(cfg, name, engine.Options(**kw))


def table(url: str, t: sa.Table, *where) -> list[dict[str, Any]]:
    eng = state.make_engine(url)
    with eng.connect() as c:
        rows = [dict(r) for r in c.execute(sa.select(t).where(*where)).mappings()]
    eng.dispose()
    return rows
