"""What every test world is made of: a typed users table that works on every backend, its
rows, a syncs.yaml, a run, a table's rows. A helper module (the test modules and harnesses
import it; conftest holds only fixtures)."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from connector import config, engine, state

ROOT = Path(__file__).resolve().parent.parent
SERVERS = {
    "postgresql": os.environ.get("USERSYNC_TEST_POSTGRES_URL"),
    "mysql": os.environ.get("USERSYNC_TEST_MYSQL_URL"),
}


def fresh_database(server_url: str) -> tuple[str, callable]:
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



def users_sync(name: str, identity: dict[str, str], vendor: dict[str, Any], mapping: list[dict], /,
               **over: Any) -> dict[str, Any]:
    """A sync of the users table by its cursor to ``vendor`` (type, base URL, settings,
    credentials), retrying quickly; ``over`` replaces whole keys. A copy: a test may change it."""
    sync = {"name": name, "source": {"table": "users"}, "identity": identity, "cursor": "updated_at",
            "vendor": {**vendor, "backoff": 0.01}, "mapping": mapping}
    sync.update(over)
    return copy.deepcopy(sync)


def write_config(path: Path, warehouse: str, syncs: list[dict[str, Any]], state_url: str | None = None) -> Path:
    doc: dict[str, Any] = {"warehouse": warehouse, "syncs": syncs}
    if state_url:
        doc["state"] = state_url
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(cfg_path: Path, name: str, **kw: Any) -> engine.Summary:
    cfg, _ = config.load(cfg_path)
    return engine.run(cfg, name, engine.Options(**kw))


def table(url: str, t: sa.Table, *where) -> list[dict[str, Any]]:
    eng = state.make_engine(url)
    with eng.connect() as c:
        rows = [dict(r) for r in c.execute(sa.select(t).where(*where)).mappings()]
    eng.dispose()
    return rows


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``usersync ARGS`` as a user runs it: a real process, its exit code and output."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "connector", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
