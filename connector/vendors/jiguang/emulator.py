"""The Jiguang Operation Growth emulator: the same rules as the client's, enforced by a strict stand-in on
loopback (for the tests, the demo, the bench and ``usersync emulators``; never a production run)."""

from __future__ import annotations

import base64
import math
import re
from typing import Any

from connector.vendors.emulator import Emulator as _EmulatorBase, json_kind_ok
from connector.vendors.jiguang.settings import (
    LIMIT, MAX_CUID, OK, PATH, REJECT, RETRYABLE, THROTTLED, TYPES, console_rule)

_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_STATUS = {4009: 401, -1: 500, 2002: 429}  # HTTP status of a code; the rest answer 400


class Emulator(_EmulatorBase):
    """Checks Basic auth, the body, registered attributes and their types, then APPLIES each
    attribute's console rule (overwrite sets, accumulate adds, append extends, once keeps the
    first value) to the user's stored attributes.

    Settings: ``project_id``, ``project_secret``, ``attributes`` ({name: {"type": one of
    TYPES, "rule": once|overwrite|accumulate|append}}), ``cuids`` (the project's known CUIDs;
    None accepts any positive long), ``rate_limit`` (requests a second, default 100).
    A request is validated whole before anything is applied.
    """

    name = "jiguang"
    routes = {("PUT", PATH): "set_attributes"}
    limit = LIMIT
    stores = ("users",)

    def __init__(self, project_id: str = "demo-project", project_secret: str = "demo-secret",
                 attributes: dict[str, dict[str, str]] | None = None, cuids=None, rate_limit: float = LIMIT.count):
        self.users: dict[int, dict[str, Any]] = {}
        super().__init__(rate_limit=rate_limit)
        self.project_id, self.project_secret = project_id, project_secret
        self.attributes = {k: {"type": v["type"].lower(), "rule": console_rule(v.get("rule", "overwrite"))}
                           for k, v in (attributes or {}).items()}
        self.cuids = set(cuids) if cuids is not None else None

    def state(self) -> dict[str, dict[str, Any]]:
        """{str(cuid): {attribute: value}} (string keys, as JSON has them)."""
        with self.lock:
            return {str(k): {a: list(v) if isinstance(v, list) else v for a, v in attrs.items()}
                    for k, attrs in self.users.items()}

    @staticmethod
    def answer(code: int, msg: str):
        return _STATUS.get(code, 200 if code == OK else 400), {"code": code, "msg": msg}, {}

    def error(self, code):
        code = int(code)
        msg = {**REJECT, **RETRYABLE, **THROTTLED, 4009: "API authentication failed"}.get(code, "injected error")
        if code == 40010:
            msg = "用户属性[injected]不存在"
        return self.answer(code, msg)

    def throttled(self, retry_after):
        return 429, {"code": 2002, "msg": THROTTLED[2002]}, {"X-Rate-Limit-Reset": str(max(1, math.ceil(retry_after)))}

    def rate_headers(self, remaining, reset):
        return {"X-Rate-Limit-Limit": str(int(self.rate_limit or 0)), "X-Rate-Limit-Remaining": str(remaining),
                "X-Rate-Limit-Reset": str(max(1, math.ceil(reset)))}

    def set_attributes(self, req):
        expected = "Basic " + base64.b64encode(f"{self.project_id}:{self.project_secret}".encode()).decode()
        if req.headers.get("authorization") != expected:
            return self.answer(4009, "API authentication failed")
        body = req.json
        if not isinstance(body, dict) or set(body) - {"cuid", "data"}:
            return self.answer(40002, "body must be {\"cuid\": <long>, \"data\": {...}}")
        cuid = body.get("cuid")
        if cuid is None or cuid == "":
            return self.answer(40007, "CUID is empty")
        if not isinstance(cuid, int) or isinstance(cuid, bool) or not 0 < cuid <= MAX_CUID:
            return self.answer(40003, f"invalid CUID {cuid!r}: must be a long")
        if self.cuids is not None and cuid not in self.cuids:
            return self.answer(40003, f"CUID {cuid} does not exist in this project")
        data = body.get("data")
        if not isinstance(data, dict) or not data:
            return self.answer(40002, "data must be a non-empty object")
        for name, value in data.items():
            spec = self.attributes.get(name)
            if spec is None:
                return self.answer(40010, f"用户属性[{name}]不存在")
            if value is None or value == "" or value == []:
                return self.answer(40009, f"user attribute [{name}] value cannot be empty")
            if not _type_ok(spec["type"], value):
                return self.answer(40002, f"user attribute [{name}] expects {spec['type']}, got {value!r}")
            if spec["rule"] == "accumulate" and not _type_ok("double", value):
                return self.answer(40002, f"accumulate attribute [{name}] needs a number, got {value!r}")
        with self.lock:
            held = self.users.setdefault(cuid, {})
            for name, value in data.items():
                rule = self.attributes[name]["rule"]
                if rule == "once":
                    held.setdefault(name, value)
                elif rule == "accumulate":
                    held[name] = held.get(name, 0) + value
                elif rule == "append":
                    held[name] = list(held.get(name, [])) + (value if isinstance(value, list) else [value])
                else:
                    held[name] = value
        return self.answer(OK, "ok")


def _type_ok(kind: str, v: Any) -> bool:
    coercer = TYPES.get(kind)
    kind = coercer.kind if coercer else kind
    plain = json_kind_ok(kind, v)
    if plain is not None:
        return plain
    if kind == "boolean":
        return isinstance(v, int) and not isinstance(v, bool) and v in (0, 1)
    if kind == "datetime":
        return isinstance(v, str) and bool(_DATETIME.match(v))
    if kind == "list":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    return False


PORT = 8603  # where `usersync emulators` serves it


def emulator(specs) -> Emulator:
    """An emulator with the attributes these syncs map registered (type and console rule),
    accepting their credentials."""
    attrs = {a.attribute: {"type": a.type, "rule": console_rule(a.rule)}
             for s in specs for a in s.mapping}
    kw = {}
    for s in specs:
        kw = {"project_id": s.vendor.settings.get("project_id", "demo-project"),
              "project_secret": s.vendor.credentials.get("project_secret", "demo-secret")}
    return Emulator(attributes=attrs, **kw)
