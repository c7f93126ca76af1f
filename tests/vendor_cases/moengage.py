"""MoEngage's test world: the sync over the users table of ``warehouse`` and what MoEngage should hold."""

from __future__ import annotations

import json

from warehouse import users_sync

WORKSPACE, KEY = "WS1TEST", "key-secret-123"
MAPPING = [
    {"column": "plan", "attribute": "membership", "type": "String"},
    {"column": "ltv", "attribute": "ltv", "type": "Number"},
    {"column": "orders", "attribute": "orders", "type": "Long"},
    {"column": "subscribed", "attribute": "subscribed", "type": "Boolean"},
    {"column": "signup_at", "attribute": "signup_at", "type": "Datetime", "rule": "once"},
    {"column": "birthday", "attribute": "birthday", "type": "Date"},
    {"column": "interests", "attribute": "interests", "type": "Array"},
    {"column": "note", "attribute": "note", "type": "String"},
]


def moengage_sync(base_url: str, api: str = "track", mapping=None, **over) -> dict:
    return users_sync("moengage_users", {"customer_id": "user_id"},
                      {"type": "moengage", "base_url": base_url, "settings": {"workspace_id": WORKSPACE, "api": api},
                       "credentials": {"api_key": "${TEST_MOENGAGE_KEY}"}}, mapping or MAPPING, **over)


def expected(row: dict) -> dict:
    """The warehouse row as MoEngage should hold it — written out independently of the engine."""
    return {
        "membership": row["plan"], "ltv": float(row["ltv"]), "orders": row["orders"], "subscribed": row["subscribed"],
        "signup_at": row["signup_at"].strftime("%Y-%m-%dT%H:%M:%SZ"), "birthday": row["birthday"].isoformat(),
        "interests": json.loads(row["interests"]), "note": row["note"],
    }
