"""DFINERY's test world: the sync over the users table of ``warehouse`` and what DFINERY should hold."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from warehouse import users_sync

TOKEN = "tok-secret-123"
DFINERY_MAPPING = [
    {"column": "plan", "attribute": "membership", "type": "String"},
    {"column": "ltv", "attribute": "ltv", "type": "Double"},
    {"column": "orders", "attribute": "orders", "type": "Long"},
    {"column": "subscribed", "attribute": "subscribed", "type": "Boolean"},
    {"column": "signup_at", "attribute": "signup_at", "type": "Datetime"},
    {"column": "birthday", "attribute": "birthday", "type": "Date"},
    {"column": "interests", "attribute": "interests", "type": "Array"},
]



def dfinery_sync(base_url: str, **over: Any) -> dict[str, Any]:
    return users_sync("dfinery_users", {"external_id": "user_id"},
                      {"type": "dfinery", "base_url": base_url, "settings": {"service_id": "svc-1"},
                       "credentials": {"access_token": "${TEST_DFINERY_TOKEN}"}}, DFINERY_MAPPING, **over)



def expected_profile(row: dict) -> dict:
    """The warehouse row as DFINERY should hold it — written out independently of the engine."""
    signup = row["signup_at"].replace(tzinfo=dt.timezone.utc)
    return {
        "membership": row["plan"], "ltv": float(row["ltv"]), "orders": row["orders"], "subscribed": row["subscribed"],
        "signup_at": signup.strftime("%Y-%m-%dT%H:%M:%S.") + f"{signup.microsecond // 1000:03d}Z",
        "birthday": row["birthday"].isoformat(), "interests": json.loads(row["interests"]),
    }
