"""The EngageLab MA emulator: the same rules as the client's, enforced by a strict stand-in on
loopback (for the tests, the demo, the bench and ``usersync emulators``; never a production run)."""

from __future__ import annotations

import base64
import re
from typing import Any

from connector.vendors.emulator import Emulator as _EmulatorBase
from connector.vendors.engagelab.settings import LIMIT, OK, PATH, PERMANENT, STOP

_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


class Emulator(_EmulatorBase):
    """Checks Basic auth, the euid, the type, registered properties and their types, empty values.

    Settings: ``api_key``, ``api_secret``, ``properties`` ({name: STRING|NUMBER|BOOL|DATETIME|LIST}
    as registered in the console), ``rate_limit`` (requests a second, default 100).
    Stores each user's properties by euid and applies each ``type`` exactly.
    """

    name = "engagelab"
    routes = {("POST", PATH): "user_property"}
    limit = LIMIT
    stores = ("users",)

    def __init__(self, api_key: str = "demo-key", api_secret: str = "demo-secret",
                 properties: dict[str, str] | None = None, rate_limit: float = LIMIT.count):
        self.users: dict[int, dict[str, Any]] = {}
        super().__init__(rate_limit=rate_limit)
        self.auth = "Basic " + base64.b64encode(f"{api_key}:{api_secret}".encode()).decode()
        self.properties = {k: v.upper() for k, v in (properties or {}).items()}

    def state(self) -> dict[int, dict[str, Any]]:
        with self.lock:
            return {k: {a: list(v) if isinstance(v, list) else v for a, v in p.items()} for k, p in self.users.items()}

    def error(self, code):
        code = int(code)
        status = 401 if code == 40050 else code if 500 <= code < 600 else 400
        return status, {"code": code, "message": PERMANENT.get(code) or STOP.get(code) or "injected error"}, {}

    def throttled(self, retry_after):
        return 429, {"code": 429, "message": "too many requests"}, {"Retry-After": f"{max(retry_after, 0.01):.2f}"}

    def user_property(self, req):
        def fail(code: int, message: str, status: int = 400):
            return status, {"code": code, "message": message}, {}

        if req.headers.get("authorization") != self.auth:
            return fail(40050, "Interface authentication failed", 401)
        body = req.json
        if not isinstance(body, dict):
            return fail(55004, "body is not a JSON object")
        euid, kind, props = body.get("euid"), body.get("type"), body.get("properties")
        if euid is None or euid == "":
            return fail(40007, "EUID is empty")
        if not isinstance(euid, int) or isinstance(euid, bool):
            return fail(55004, f"euid must be a long, got {euid!r}")
        if kind not in ("set", "increase", "add", "remove", "delete"):
            return fail(55004, f"unknown type {kind!r}")
        if not isinstance(props, dict) or not props:
            return fail(55004, "properties must be a non-empty object")
        for name, value in props.items():
            if name not in self.properties:
                return fail(55102, f"Invalid user attributes exist: '{name}' is not registered")
            if value is None or value == "" or value == []:
                return fail(55103, f"User property values cannot be empty: '{name}'")
            problem = _check(kind, self.properties[name], value)
            if problem:
                return fail(55102, f"Invalid user attributes exist: '{name}' {problem}")
        with self.lock:
            user = self.users.setdefault(euid, {})
            for name, value in props.items():
                _apply(user, kind, name, value)
        return 200, {"code": OK, "message": "success"}, {}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(kind: str, registered: str, v: Any) -> str | None:
    """Why ``v`` cannot go into a ``registered`` property with operation ``kind``, or None."""
    if kind == "delete":
        return None
    if kind == "increase":
        return None if registered == "NUMBER" and _is_number(v) else f"cannot increase a {registered} by {v!r}"
    if kind in ("add", "remove"):
        ok = registered == "LIST" and isinstance(v, list) and all(isinstance(x, str) for x in v)
        return None if ok else f"cannot {kind} {v!r} on a {registered}"
    ok = {"STRING": lambda: isinstance(v, str), "NUMBER": lambda: _is_number(v),
          "BOOL": lambda: isinstance(v, bool), "DATETIME": lambda: isinstance(v, str) and bool(_DATETIME.match(v)),
          "LIST": lambda: isinstance(v, list) and all(isinstance(x, str) for x in v)}.get(registered, lambda: False)()
    return None if ok else f"expects {registered}, got {v!r}"


def _apply(user: dict[str, Any], kind: str, name: str, value: Any) -> None:
    if kind == "set":
        user[name] = list(value) if isinstance(value, list) else value
    elif kind == "increase":
        user[name] = user.get(name, 0) + value
    elif kind == "add":
        user[name] = list(user.get(name) or []) + list(value)
    elif kind == "remove":
        user[name] = [x for x in user.get(name) or [] if x not in value]
    elif kind == "delete":
        user.pop(name, None)


PORT = 8602  # where `usersync emulators` serves it


def emulator(specs) -> Emulator:
    """An emulator with the attributes these syncs map registered, accepting their credentials."""
    props = {a.attribute: a.type.upper() for s in specs for a in s.mapping}
    kw = {}
    for s in specs:
        kw = {"api_key": s.vendor.credentials.get("api_key", "demo-key"),
              "api_secret": s.vendor.credentials.get("api_secret", "demo-secret")}
    return Emulator(properties=props, **kw)
