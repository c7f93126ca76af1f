"""MoEngage: what its docs fix (``seeds/moengage-track-user.txt``, VENDORS.md §4) — endpoints, limits,
error codes and attribute types. The rules around them: README.md beside this file."""

from __future__ import annotations

from typing import Any

from connector.vendors.base import Limit
from connector.wire import Coercer

DATA_CENTERS = {dc: f"https://api-0{dc}.moengage.com" for dc in range(1, 7)}
DEFAULT_DC = 1
TRACK_PATH = "/v1/customer/{workspace_id}"
BULK_PATH = "/v1/transition/{workspace_id}"
APIS = ("track", "bulk")
TRACK_MAX_BYTES = 128 * 1024  # one track-user body (413 beyond)
BULK_MAX_BYTES = 100 * 1024  # one transition body (413 beyond)
BULK_MAX_USERS = 200  # our own cap per transition call
# users a minute, across all API requests [doc: the Bulk Import reference; see the module's docs]
LIMITS = {"track": Limit(10_000, 60.0, "users"), "bulk": Limit(10_000, 60.0, "users")}
MAX_CHARS = 512  # longer string values are truncated by MoEngage: refuse them instead
MAX_ITEMS = 50  # array attributes
MAX_NAME_CHARS = 200
MAX_CUSTOM_ATTRIBUTES = 256
DATETIME = "%Y-%m-%dT%H:%M:%SZ"  # YYYY-MM-DDTHH:mm:ssZ, UTC; anything else is stored as a string
IDENTITY_FIELDS = ("customer_id",)
BLOCKED_NAMES = {"id", "_id", ""}
RESERVED_PREFIX = "moe_"
# [doc] "reserved keys such as status, user_id, source"; customer_id would shadow the identity [inferred]
RESERVED_NAMES = {"status", "user_id", "source", "customer_id"}
# customer_id values MoEngage refuses (compared case-insensitively, stripped) [doc]
RESERVED_IDS = {"unknown", "guest", "null", "0", "1", "-1", "true", "false", "none", "na", "n/a", "empty",
                "(empty)", ""}
TYPES = {
    "string": Coercer("string", max_chars=MAX_CHARS),
    "number": Coercer("double"),
    "double": Coercer("double"),
    "long": Coercer("long"),
    "integer": Coercer("long"),
    "boolean": Coercer("boolean"),
    "datetime": Coercer("datetime", fmt=DATETIME),
    "date": Coercer("date", fmt="%Y-%m-%d"),
    "array": Coercer("list", item="string", max_items=MAX_ITEMS),
    "array<string>": Coercer("list", item="string", max_items=MAX_ITEMS),
    "array<number>": Coercer("list", item="double", max_items=MAX_ITEMS),
    "array<long>": Coercer("list", item="long", max_items=MAX_ITEMS),
}
PERMANENT = {400, 409}  # this payload will not be accepted: reject the user(s) (as any other 4xx)
STOP = {401, 403}  # credentials / workspace: nothing can succeed
SUCCESS = "success"


def name_problem(name: str) -> str | None:
    """Why MoEngage would refuse ``name`` as a user attribute name (None when fine)."""
    if name in BLOCKED_NAMES:
        return f"{name!r} is blocked by MoEngage as an attribute name"
    if name.lower().startswith(RESERVED_PREFIX):
        return f"{name!r}: the 'moe_' prefix is reserved for MoEngage's own attributes"
    if name.lower() in RESERVED_NAMES:
        return f"{name!r} is a reserved MoEngage key ({', '.join(sorted(RESERVED_NAMES))})"
    if len(name) > MAX_NAME_CHARS:
        return f"attribute names are at most {MAX_NAME_CHARS} characters"
    return None


def id_problem(customer_id: Any) -> str | None:
    """Why MoEngage would refuse this customer_id (None when fine)."""
    text = "" if customer_id is None else str(customer_id)
    if text.strip().lower() in RESERVED_IDS:
        return f"customer_id {text!r} is a reserved value MoEngage refuses"
    return None
