"""DFINERY — user profile API (``seeds/dfinery-user-profile.txt``, VENDORS.md §5).

``POST {base}/api/v1/user-profile?service_id=…`` with header ``access_token``; one profile
a call; body ``{"identity": {...}, "user_properties": {...}, "request_datetime": ISO UTC}``.
The body's ``code`` is the verdict, not the HTTP status. 10,000 requests a minute [doc]; the
unit of ``X-Rate-Limit-Reset`` is not documented, so every form is read (``wait_seconds``).

NULL (the mapping's ``null:``): ``skip`` (the value DFINERY has stays) or ``send`` (the
property is sent as JSON ``null``). The docs name no call that removes a property: no ``unset``.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any

import requests

from connector.coerce import Coercer
from connector.emulator import Emulator as _EmulatorBase
from connector.vendors.base import Change, Kind, Limit, Op, Request, Vendor, Verdict, json_body, wait_seconds

# -- settings: everything the docs fix -------------------------------------------------
BASE_URL = "https://openapi.dfinery.ai"
PATH = "/api/v1/user-profile"
LIMIT = Limit(10_000, 60.0)  # profile API: 10,000 requests a minute [doc]
IDENTITY_FIELDS = ("external_id", "phone_no", "email", "kakao_user_id", "line_user_id")
DATETIME = "%Y-%m-%dT%H:%M:%S.%3fZ"  # yyyy-MM-dd'T'HH:mm:ss.SSSZ, UTC
TYPES = {
    "string": Coercer("string"),
    "long": Coercer("long"),
    "double": Coercer("double"),
    "boolean": Coercer("boolean"),
    "datetime": Coercer("datetime", fmt=DATETIME),
    "date": Coercer("date", fmt="%Y-%m-%d"),
    "array": Coercer("list", item="string"),
    "array<string>": Coercer("list", item="string"),
    "array<long>": Coercer("list", item="long"),
    "array<double>": Coercer("list", item="double"),
}
OK = "20000"
PERMANENT = {"40000": "bad request", "40001": "bad request"}  # reject the user
STOP = {"40101": "invalid service id", "40201": "invalid access token"}  # nothing can succeed
THROTTLED = {"40401"}  # usage limit: wait for X-Rate-Limit-Reset, retry
TOO_MANY = {"40402", "40403"}  # too many in one request: split
RETRYABLE = {"50000"}


class Client(Vendor):
    name = "dfinery"
    types = TYPES
    rules = {"set": "set", "once": "once"}
    null_policies = frozenset({"skip", "send"})  # no delete call: NULL can only be sent as null
    max_users = 1
    limit = LIMIT
    default_base_url = BASE_URL
    identity_fields = IDENTITY_FIELDS
    credentials = ("access_token",)
    settings = ("service_id",)
    required_settings = ("service_id",)
    conn_fields = {"service_id": "login", "access_token": "password"}

    def request(self, batch: list[Change]) -> Request:
        (change,) = batch
        props = {attr: value for attr, op, value in change.ops if op.sets}
        now = dt.datetime.now(dt.timezone.utc)
        return Request(
            "POST", self.base_url + PATH, keys=(change.key,),
            params={"service_id": self.settings_["service_id"]},
            headers={"access_token": self.creds["access_token"], "Content-Type": "application/json"},
            json={"identity": {k: str(v) for k, v in change.identity.items()}, "user_properties": props,
                  "request_datetime": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"},
        )

    def verdict(self, request: Request, response: requests.Response) -> Verdict:
        body = json_body(response)
        wait = wait_seconds(response, "X-Rate-Limit-Reset", "Retry-After", cap=self.limit.window)
        if body is None:
            if response.status_code == 429:
                return Verdict(Kind.RETRY, "429", "rate limited", wait=wait or 1.0)
            return Verdict(Kind.RETRY, str(response.status_code), f"unreadable body: {response.text[:200]!r}",
                           ambiguous=True)
        code, message = str(body.get("code", "")), str(body.get("message", ""))
        if code == OK and body.get("status") is True:
            return Verdict(Kind.DELIVERED, code, message)
        if code in STOP:
            return Verdict(Kind.STOP, code, message or STOP[code])
        if code in THROTTLED or response.status_code == 429:
            return Verdict(Kind.RETRY, code, message, wait=wait or 1.0)
        if code in TOO_MANY:
            return Verdict(Kind.SPLIT, code, message)
        if code in PERMANENT or 400 <= response.status_code < 500:
            return Verdict(Kind.REJECTED, code or str(response.status_code), message)
        return Verdict(Kind.RETRY, code or str(response.status_code), message)


# -- emulator: the same rules, enforced ---------------------------------------------------
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

    def __init__(self, service_id: str = "demo-service", access_token: str = "demo-token",
                 properties: dict[str, str] | None = None, rate_limit: float = LIMIT.count,
                 reset_unit: str = "seconds"):
        self.profiles: dict[str, dict[str, Any]] = {}
        self.reset_unit = reset_unit
        super().__init__(rate_limit=rate_limit)
        self.service_id, self.access_token = service_id, access_token
        self.properties = {k: v.lower() for k, v in (properties or {}).items()}

    def reset(self) -> None:
        with self.lock:
            self.profiles = {}
        super().reset()

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
    if kind == "string":
        return isinstance(v, str)
    if kind == "long":  # a Java long
        return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63
    if kind == "double":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
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
