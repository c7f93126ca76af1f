"""Tencent IM's test world: the sync over the users table of ``warehouse`` and what Tencent should hold."""

from __future__ import annotations

from warehouse import users_sync

APPID, ADMIN, KEY = "1400123456", "administrator", "s3cret-app-key"
MAPPING = [
    {"column": "plan", "attribute": "plan", "type": "String"},
    {"column": "ltv", "attribute": "ltv", "type": "Double"},
    {"column": "orders", "attribute": "orders", "type": "Long"},
    {"column": "subscribed", "attribute": "subscribed", "type": "Boolean"},
    {"column": "signup_at", "attribute": "signup_at", "type": "Datetime", "rule": "once"},
    {"column": "birthday", "attribute": "birthday", "type": "Date"},
    {"column": "note", "attribute": "note", "type": "String"},
]
NAMES = [m["attribute"] for m in MAPPING]


def tencent_sync(base_url: str, **over) -> dict:
    return users_sync("tencent_users", {"To_Account": "user_id"},
                      {"type": "tencent_im", "base_url": base_url,
                       "settings": {"sdkappid": APPID, "identifier": ADMIN, "region": "singapore"},
                       "credentials": {"secret_key": "${TEST_TENCENT_KEY}"}}, MAPPING, **over)


def expected(row: dict) -> dict:
    """The warehouse row as Tencent should hold it (all strings) — written out independently."""
    return {
        "plan": row["plan"], "ltv": repr(float(row["ltv"])), "orders": str(row["orders"]),
        "subscribed": "true" if row["subscribed"] else "false",
        "signup_at": row["signup_at"].strftime("%Y-%m-%dT%H:%M:%SZ"),
        "birthday": row["birthday"].isoformat(), "note": row["note"],
    }
