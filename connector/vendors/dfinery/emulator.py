"""The DFINERY emulator: the same rules as the client's, enforced by a strict stand-in on
loopback (for the tests, the demo, the bench and ``usersync emulators``; never a production run)."""

from __future__ import annotations

import re
import time
from typing import Any

from connector.vendors.dfinery.settings import IDENTITY_FIELDS, LIMIT, OK, PATH
from connector.vendors.emulator import Emulator as _EmulatorBase, json_kind_ok

_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,3})?Z$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class Emulator(_EmulatorBase):
    """Checks token, service id, body shape, registered properties and their types.

    Settings: ``service_id``, ``access_token``, ``properties`` ({name: type} as registered
    in the console), ``rate_limit`` (requests a minute, default 10,000), ``reset_unit`` (how
    ``X-Rate-Limit-Reset`` is written: ``seconds`` to wait, the default, or the window's end as an
    ``epoch`` time in seconds or ``epoch_ms``: the docs name the header, not its unit).
    """

    name = "dfinery"
    routes = {("POST", PATH): "user_profile"}
    limit = LIMIT
    stores = ("profiles",)

    def __init__(self, service_id: str = "demo-service", access_token: str = "demo-token",
                 properties: dict[str, str] | None = None, rate_limit: float = LIMIT.count,
                 reset_unit: str = "seconds"):
        self.profiles: dict[str, dict[str, Any]] = {}
        self.reset_unit = reset_unit
        super().__init__(rate_limit=rate_limit)
        self.service_id, self.access_token = service_id, access_token
        self.properties = {k: v.lower() for k, v in (properties or {}).items()}

    def state(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {k: dict(v) for k, v in self.profiles.items()}

    def error(self, code):
        status = {"40201": 401, "40101": 400, "40401": 429, "50000": 500}.get(str(code), 400)
        return status, {"status": False, "code": str(code), "message": "injected error", "data": False}, {}

    def throttled(self, retry_after):
        return (429, {"status": False, "code": "40401", "message": "usage limit exceeded", "data": False},
                self.rate_headers(0, retry_after))  # DFINERY sends its rate headers on every answer

    def rate_headers(self, remaining, reset):
        return {"X-Rate-Limit-Limit": str(int(self.rate_limit or 0)), "X-Rate-Limit-Remaining": str(remaining),
                "X-Rate-Limit-Reset": self._reset(reset)}

    def _reset(self, seconds: float) -> str:
        if self.reset_unit == "epoch":
            return f"{time.time() + seconds:.0f}"
        if self.reset_unit == "epoch_ms":
            return f"{(time.time() + seconds) * 1000:.0f}"
        return f"{seconds:.0f}"

    def user_profile(self, req):
        def fail(status: int, code: str, message: str):
            return status, {"status": False, "code": code, "message": message, "data": False}, {}

        if req.headers.get("access_token") != self.access_token:
            return fail(401, "40201", "invalid access token")
        if req.query.get("service_id") != self.service_id:
            return fail(400, "40101", "invalid service id")
        body = req.json
        if not isinstance(body, dict):
            return fail(400, "40000", "body is not a JSON object")
        identity, props = body.get("identity"), body.get("user_properties")
        if not isinstance(identity, dict) or not any(isinstance(identity.get(f), str) and identity.get(f)
                                                     for f in IDENTITY_FIELDS):
            return fail(400, "40000", "identity needs one of " + ", ".join(IDENTITY_FIELDS))
        if set(identity) - set(IDENTITY_FIELDS):
            return fail(400, "40000", f"unknown identity field(s): {sorted(set(identity) - set(IDENTITY_FIELDS))}")
        if not isinstance(props, dict):
            return fail(400, "40000", "user_properties must be an object")
        if not isinstance(body.get("request_datetime"), str) or not _ISO.match(body["request_datetime"]):
            return fail(400, "40000", "request_datetime must be ISO-8601 UTC")
        for name, value in props.items():
            if name not in self.properties:
                return fail(400, "40001", f"user property '{name}' is not registered")
            if value is not None and not _type_ok(self.properties[name], value):
                return fail(400, "40001", f"user property '{name}' expects {self.properties[name]}, got {value!r}")
        key = next(identity[f] for f in IDENTITY_FIELDS if identity.get(f))
        with self.lock:
            self.profiles.setdefault(key, {}).update(props)
        return 200, {"status": True, "code": OK, "message": "OK", "data": True}, {}


def _type_ok(kind: str, v: Any) -> bool:
    plain = json_kind_ok(kind, v)
    if plain is not None:
        return plain
    if kind == "boolean":
        return isinstance(v, bool)
    if kind == "datetime":
        return isinstance(v, str) and bool(_ISO.match(v))
    if kind == "date":
        return isinstance(v, str) and bool(_DATE.match(v))
    if kind.startswith("array"):
        item = kind[6:-1] if "<" in kind else "string"
        return isinstance(v, list) and all(_type_ok(item, x) for x in v)
    return False


PORT = 8601  # where `usersync emulators` serves it


def emulator(specs) -> Emulator:
    """An emulator with the attributes these syncs map registered, accepting their credentials."""
    props = {a.attribute: a.type for s in specs for a in s.mapping}
    kw = {}
    for s in specs:
        kw = {"service_id": s.vendor.settings.get("service_id", "demo-service"),
              "access_token": s.vendor.credentials.get("access_token", "demo-token")}
    return Emulator(properties=props, **kw)
