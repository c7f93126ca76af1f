"""Jiguang's test world: the sync over the users table of ``warehouse`` and what Jiguang should hold."""

from __future__ import annotations

import json

from warehouse import users_sync

SECRET = "sec-ret-jg-42"
MAPPING = [
    {"column": "plan", "attribute": "membership", "type": "String", "rule": "overwrite"},
    {"column": "ltv", "attribute": "ltv", "type": "Number"},
    {"column": "orders", "attribute": "orders", "type": "Long", "rule": "set"},
    {"column": "points", "attribute": "points", "type": "Long", "rule": "accumulate"},
    {"column": "subscribed", "attribute": "subscribed", "type": "Boolean"},
    {"column": "signup_at", "attribute": "signup_at", "type": "Datetime", "rule": "once"},
    {"column": "birthday", "attribute": "birthday", "type": "Datetime"},
    {"column": "interests", "attribute": "interests", "type": "List", "rule": "append"},
]
CONSOLE = {"membership": "overwrite", "ltv": "overwrite", "orders": "overwrite", "points": "accumulate",
           "subscribed": "overwrite", "signup_at": "once", "birthday": "overwrite", "interests": "append"}


def cuid(i: int) -> int:
    return 1_000_000 + i


def expected(row: dict) -> dict:
    """The warehouse row as Jiguang should hold it — written out independently of the engine.

    A zero accumulate and an empty append list are never sent (nothing to add)."""
    out = {"membership": row["plan"], "ltv": float(row["ltv"]), "orders": row["orders"],
           "subscribed": 1 if row["subscribed"] else 0,
           "signup_at": row["signup_at"].strftime("%Y-%m-%d %H:%M:%S"),
           "birthday": row["birthday"].strftime("%Y-%m-%d") + " 00:00:00"}
    if row["points"]:
        out["points"] = row["points"]
    if json.loads(row["interests"]):
        out["interests"] = json.loads(row["interests"])
    return out


def jiguang_sync(base_url: str, **over) -> dict:
    return users_sync("jiguang_users", {"cuid": "numeric_id"},
                      {"type": "jiguang", "base_url": base_url, "settings": {"project_id": "proj-7"},
                       "credentials": {"project_secret": "${TEST_JIGUANG_SECRET}"}}, MAPPING, **over)
