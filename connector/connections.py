"""Credentials from Airflow Connections: through Airflow when it runs us, else ``AIRFLOW_CONN_*``.

A connection is returned as a plain dict: ``login``, ``password``, ``host``, ``extra`` (dict).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit


def get(conn_id: str) -> dict[str, Any]:
    env = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if env is not None:
        return parse(env)
    try:
        from airflow.sdk import Connection  # only inside an Airflow worker or with a metadata DB
    except ImportError:
        raise LookupError(f"connection {conn_id!r} not found (set AIRFLOW_CONN_{conn_id.upper()})") from None
    try:
        conn = Connection.get(conn_id)
    except Exception as e:  # Airflow raises its own not-found types
        raise LookupError(f"connection {conn_id!r} not found: {e}") from None
    return {"login": conn.login, "password": conn.password, "host": conn.host,
            "extra": conn.extra_dejson if hasattr(conn, "extra_dejson") else json.loads(conn.extra or "{}")}


def parse(text: str) -> dict[str, Any]:
    """An ``AIRFLOW_CONN_*`` value: Airflow's JSON form or its URI form."""
    text = text.strip()
    if text.startswith("{"):
        data = json.loads(text)
        extra = data.get("extra") or {}
        if isinstance(extra, str):
            extra = json.loads(extra)
        return {"login": data.get("login"), "password": data.get("password"), "host": data.get("host"),
                "extra": extra}
    u = urlsplit(text)
    return {"login": unquote(u.username) if u.username else None,
            "password": unquote(u.password) if u.password else None,
            "host": u.hostname, "extra": dict(parse_qsl(u.query))}
