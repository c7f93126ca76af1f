"""EngageLab's test world: the sync over the users table of ``warehouse`` and what EngageLab should hold."""

from __future__ import annotations

import datetime as dt
import json

from warehouse import T0, user_row, users_sync

N = 24
KEY, SECRET = "el-key-1", "el-secret-xyz"
MAPPING = [
    {"column": "plan", "attribute": "membership", "type": "STRING"},
    {"column": "ltv", "attribute": "ltv", "type": "NUMBER"},
    {"column": "orders", "attribute": "orders", "type": "NUMBER"},
    {"column": "points", "attribute": "points", "type": "NUMBER", "rule": "increase"},
    {"column": "subscribed", "attribute": "subscribed", "type": "BOOL"},
    {"column": "signup_at", "attribute": "signup_at", "type": "DATETIME", "rule": "once"},
    {"column": "birthday", "attribute": "birthday", "type": "DATETIME"},
    {"column": "interests", "attribute": "interests", "type": "LIST", "rule": "list"},
    {"column": "interests", "attribute": "interests_seen", "type": "LIST", "rule": "append"},
    {"column": "note", "attribute": "note", "type": "STRING", "null": "unset"},
]
LATER = T0 + dt.timedelta(hours=1)


def euid(i: int) -> int:
    return 1_000_000 + i


def rows_(n: int = N) -> list[dict]:
    # points > 0 for everyone: an increase from nothing to 0 sends nothing
    return [user_row(i, points=i * 10 + 5) for i in range(n)]


def expected(row: dict, seen: list[str] | None = None) -> dict:
    """What EngageLab should hold for a warehouse row (it holds no empty value)."""
    out = {
        "membership": row["plan"], "ltv": float(row["ltv"]), "orders": row["orders"], "points": row["points"],
        "subscribed": bool(row["subscribed"]), "signup_at": row["signup_at"].strftime("%Y-%m-%d %H:%M:%S"),
        "birthday": row["birthday"].strftime("%Y-%m-%d 00:00:00"),
        "interests": sorted(json.loads(row["interests"])), "interests_seen": sorted(seen or json.loads(row["interests"])),
        "note": row["note"],
    }
    return {k: v for k, v in out.items() if v not in (None, [])}


def held(emu) -> dict:
    """The emulator's state with list order ignored (add appends at the end)."""
    return {u: {a: sorted(v) if isinstance(v, list) else v for a, v in p.items()} for u, p in emu.state().items()}


def sent(emu, start: int = 0, who: int | None = None) -> list[tuple[int, str, dict]]:
    return [(r["body"]["euid"], r["body"]["type"], r["body"]["properties"]) for r in emu.log[start:]
            if who is None or r["body"]["euid"] == who]


def el_sync(base_url: str, **over) -> dict:
    return users_sync("el_users", {"euid": "numeric_id"},
                      {"type": "engagelab", "base_url": base_url,
                       "credentials": {"api_key": "${TEST_EL_KEY}", "api_secret": "${TEST_EL_SECRET}"}}, MAPPING, **over)
