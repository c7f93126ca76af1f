"""Jiguang Operation Growth — set user attributes (``seeds/jiguang-growth-set-user-attributes.txt``,
VENDORS.md §2).

``PUT {base}/smartop/api/v1/user/attribute`` with Basic ``project_id:project_secret``; one
user a call; body ``{"cuid": <long>, "data": {name: value}}``; QPS ≤ 100. Booleans travel as
0/1, datetimes as ``yyyy-MM-dd HH:mm:ss``.

Every attribute carries a processing rule set in the Jiguang console — once only, overwrite,
accumulate, append — and the vendor applies it to whatever we send. So the mapping's
``rule:`` must name the console rule, and the request carries what that rule expects: the
engine's planner already turns a rule into ops (accumulate → the difference since the last
delivered value, append → the new items only, once → the first value, never again), and
``request`` just puts each op's value under ``data``. A full re-send of an accumulate
attribute would double-count.

NULL (the mapping's ``null:``): ``skip`` only — a value cannot be empty (40009) and there is
no call that removes an attribute, so a NULLed value stays at Jiguang as last sent. An empty
text is set aside while planning (never sent: 40009), an empty list counts as NULL.

The body's ``code`` is the verdict (0 = ok). The docs say nothing about rate limiting; we
follow Jiguang's JPush REST convention: HTTP 429 with code 2002 and ``X-Rate-Limit-Limit`` /
``-Remaining`` / ``-Reset`` headers (the emulator answers that way, the client waits for the
reset and retries).
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any

import requests

from connector.coerce import Coercer
from connector.emulator import Emulator as _EmulatorBase
from connector.vendors.base import Change, Kind, Limit, Op, Request, Vendor, Verdict, json_body, wait_seconds

# -- settings: everything the docs fix -------------------------------------------------
BASE_URL = "https://growth.jiguang.cn"
PATH = "/smartop/api/v1/user/attribute"
LIMIT = Limit(100, 1.0)  # QPS <= 100 [doc]
DATETIME = "%Y-%m-%d %H:%M:%S"  # yyyy-MM-dd HH:mm:ss
TYPES = {
    "string": Coercer("string"),
    "number": Coercer("double"),
    "long": Coercer("long"),
    "double": Coercer("double"),
    "boolean": Coercer("boolean", bool_as_int=True),  # only 0/1 are accepted
    "bool": Coercer("boolean", bool_as_int=True),
    "datetime": Coercer("datetime", fmt=DATETIME),
    "list": Coercer("list", item="string"),
}
# rule names a mapping may use (Jiguang's console names, plus the engine's) -> engine rule
RULES = {"once": "once", "overwrite": "set", "set": "set", "accumulate": "increase", "increase": "increase",
         "append": "append"}
# engine rule -> the console rule the emulator applies
CONSOLE_RULE = {"once": "once", "set": "overwrite", "increase": "accumulate", "append": "append"}
NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # attribute names: lowercase letters, digits, underscore
MAX_CUID = 2**63 - 1  # a Java long

OK = 0
STOP = {4009: "API authentication failed"}
REJECT = {  # permanent for this user's payload: recorded, retried next run
    40002: "invalid business parameter",
    40003: "invalid CUID (not in this project)",
    40007: "CUID is empty",
    40009: "user attribute value cannot be empty",
    40010: "user attribute does not exist",
}
RETRYABLE = {-1: "internal server error"}  # an explicit error: nothing was applied
THROTTLED = {2002: "API call frequency exceeds the limit"}  # JPush's code, with HTTP 429
_MISSING_ATTR = re.compile(r"\[([^\]]*)\]")


class Client(Vendor):
    name = "jiguang"
    types = TYPES
    rules = RULES
    null_policies = frozenset({"skip"})  # 40009: a value cannot be empty, and there is no delete
    empty_refused = "Jiguang refuses empty values: 40009"
    max_users = 1
    limit = LIMIT
    default_base_url = BASE_URL
    identity_fields = ("cuid",)
    credentials = ("project_secret",)
    settings = ("project_id",)
    required_settings = ("project_id",)
    conn_fields = {"project_id": "login", "project_secret": "password"}

    @classmethod
    def validate(cls, spec):
        for i, a in enumerate(spec.mapping):
            if not NAME.match(a.attribute):
                yield (f"mapping[{i}].attribute",
                       f"{a.attribute!r}: Jiguang attribute names are lowercase letters, digits and "
                       "underscores, starting with a letter")

    @classmethod
    def invalid(cls, change: Change) -> str | None:
        """A CUID must be a positive long; anything else would only earn 40003 for each call."""
        if _cuid(change.identity.get("cuid")) is None:
            return f"cuid {change.identity.get('cuid')!r} is not a numeric Jiguang CUID (a positive long)"
        return None

    def request(self, batch: list[Change]) -> Request:
        (change,) = batch
        data = {}
        for attr, op, value in change.ops:
            # the console rule applies the value: set -> the value, increase -> the delta,
            # append -> the new items (the planner computed each)
            if op not in (Op.SET, Op.ONCE, Op.INCREASE, Op.APPEND):
                raise ValueError(f"Jiguang cannot {op.value} attribute {attr!r}")
            data[attr] = value
        token = base64.b64encode(f"{self.settings_['project_id']}:{self.creds['project_secret']}".encode()).decode()
        return Request("PUT", self.base_url + PATH, keys=(change.key,),
                       headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
                       json={"cuid": _cuid(change.identity["cuid"]), "data": data})

    def verdict(self, request: Request, response: requests.Response) -> Verdict:
        body = json_body(response)
        wait = wait_seconds(response, "X-Rate-Limit-Reset", "Retry-After", cap=self.limit.window)
        if body is None or not isinstance(body.get("code"), int):
            if response.status_code == 429:
                return Verdict(Kind.RETRY, "429", "rate limited", wait=wait or 1.0)
            if response.status_code == 401:
                return Verdict(Kind.STOP, "401", "authentication failed")
            # no readable answer: it may have been applied (accumulate/append are then not re-sent)
            return Verdict(Kind.RETRY, str(response.status_code), f"unreadable body: {response.text[:200]!r}",
                           ambiguous=True)
        code, msg = body["code"], str(body.get("msg", ""))
        if code == OK:
            return Verdict(Kind.DELIVERED, "0", msg)
        if code in STOP:
            return Verdict(Kind.STOP, str(code), f"{msg or STOP[code]} (check project_id and project_secret)")
        if code in THROTTLED or response.status_code == 429:
            return Verdict(Kind.RETRY, str(code), msg or "rate limited", wait=wait or 1.0)
        if code in RETRYABLE:
            return Verdict(Kind.RETRY, str(code), msg or RETRYABLE[code])
        if code == 40010:
            m = _MISSING_ATTR.search(msg)
            name = m.group(1) if m else "?"
            return Verdict(Kind.REJECTED, str(code),
                           f"attribute '{name}' does not exist in the Jiguang project (create it first): {msg}")
        if code in REJECT:
            return Verdict(Kind.REJECTED, str(code), f"{REJECT[code]}: {msg}" if msg else REJECT[code])
        if response.status_code >= 500:
            return Verdict(Kind.RETRY, str(code), msg, ambiguous=True)
        return Verdict(Kind.REJECTED, str(code), msg or "unknown error code")


def _cuid(value: Any) -> int | None:
    """The CUID as an int, or None when it is not a positive long (bools, fractions, text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if isinstance(value, int) and 0 < value <= MAX_CUID:
        return value
    return None


# -- emulator: the same rules, enforced ---------------------------------------------------
def console_rule(rule: str) -> str:
    """The console rule (once/overwrite/accumulate/append) a mapping rule name stands for."""
    return CONSOLE_RULE[RULES[rule]]


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

    def __init__(self, project_id: str = "demo-project", project_secret: str = "demo-secret",
                 attributes: dict[str, dict[str, str]] | None = None, cuids=None, rate_limit: float = LIMIT.count):
        self.users: dict[int, dict[str, Any]] = {}
        super().__init__(rate_limit=rate_limit)
        self.project_id, self.project_secret = project_id, project_secret
        self.attributes = {k: {"type": v["type"].lower(), "rule": console_rule(v.get("rule", "overwrite"))}
                           for k, v in (attributes or {}).items()}
        self.cuids = set(cuids) if cuids is not None else None

    def reset(self) -> None:
        with self.lock:
            self.users = {}
        super().reset()

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
    if kind == "string":
        return isinstance(v, str)
    if kind == "long":  # a Java long
        return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63
    if kind == "double":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
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
