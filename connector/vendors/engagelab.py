"""EngageLab MA — set user attributes (``seeds/engagelab-ma-set-user-attributes.txt``, VENDORS.md §1).

``POST {base}/v1/user/property`` with ``Authorization: Basic base64(api_key:api_secret)``;
one user a call, addressed by ``euid`` (a long); body ``{"euid", "type", "properties"}``.
The operation ``type`` is per call, so one user's change with several kinds of op
(set + increase + list add, say) becomes several requests — *parts*, idempotent ones
first; the push sends them in order and keeps in the snapshot exactly what was
acknowledged. The body's ``code`` is the verdict (0 = success), not the HTTP status.

NULL (the mapping's ``null:``): ``skip`` (leave the value EngageLab has) or ``unset`` (type
``delete``: the attribute is removed). An empty value is refused (55103): an empty text is
set aside while planning (never sent), an empty list counts as NULL — so ``null: unset``
removes a list that became empty, ``skip`` leaves it.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import requests

from connector.coerce import Coercer
from connector.emulator import Emulator as _EmulatorBase
from connector.vendors.base import Change, Kind, Limit, Op, Request, Vendor, Verdict, json_body, wait_seconds

# -- settings: everything the docs fix -------------------------------------------------
REGIONS = {"singapore": "https://ma-api.engagelab.com", "virginia": "https://ma-api-usva.engagelab.com"}
DEFAULT_REGION = "singapore"
PATH = "/v1/user/property"
LIMIT = Limit(100, 1.0)  # requests a second: not published [inferred]; override with vendor.rate_limit
DATETIME = "%Y-%m-%d %H:%M:%S"  # yyyy-MM-dd HH:mm:ss (we send UTC)
TYPES = {
    "string": Coercer("string"),
    "number": Coercer("double"),  # integers and decimals; integral values go out as JSON integers
    "bool": Coercer("boolean"),
    "datetime": Coercer("datetime", fmt=DATETIME),
    "list": Coercer("list", item="string"),
}
# engine op -> the body's ``type``, in the order a change's parts are sent: idempotent
# first; ``remove`` before ``add`` so that an attribute with both is acknowledged only
# when its last part (the add) is, and a half-applied list change is simply redone.
OP_TYPES = {Op.SET: "set", Op.ONCE: "set", Op.UNSET: "delete", Op.REMOVE: "remove", Op.INCREASE: "increase", Op.APPEND: "add"}
# ``delete`` ignores the values, but an empty one is refused (55103) [inferred]: send a placeholder
DELETE_VALUE = True
OK = 0
STOP = {40050: "interface authentication failed", 50031: "invalid project", 50034: "project does not exist",
        50074: "API data source does not exist"}  # nothing can succeed: stop the run
PERMANENT = {40007: "euid is empty", 55004: "business parameters are invalid",
             55102: "invalid user attributes", 55103: "user attribute values cannot be empty"}  # reject the user


class Client(Vendor):
    name = "engagelab"
    types = TYPES
    rules = {"set": "set", "once": "once", "increase": "increase", "list": "list", "append": "append"}
    null_policies = frozenset({"skip", "unset"})  # a null value is an empty one (55103): NULL -> delete
    max_users = 1
    limit = LIMIT
    default_base_url = REGIONS[DEFAULT_REGION]
    identity_fields = ("euid",)
    credentials = ("api_key", "api_secret")
    settings = ("region",)
    conn_fields = {"api_key": "login", "api_secret": "password", "region": "extra.region"}

    def __init__(self, base_url, credentials, settings):
        region = str(settings.get("region") or DEFAULT_REGION).lower()
        super().__init__(base_url or REGIONS.get(region, REGIONS[DEFAULT_REGION]), credentials, settings)
        token = f"{self.creds['api_key']}:{self.creds['api_secret']}".encode()
        self._auth = "Basic " + base64.b64encode(token).decode()

    @classmethod
    def validate(cls, spec):
        region = spec.vendor.settings.get("region")
        if region is not None and str(region).lower() not in REGIONS:
            yield "vendor.settings.region", f"{region!r} is not an EngageLab region (expected: {', '.join(REGIONS)})"

    empty_refused = "EngageLab refuses empty values: 55103"

    @classmethod
    def invalid(cls, change: Change) -> str | None:
        if _euid(change.identity.get("euid")) is None:
            return f"euid must be a long (EngageLab's user id), got {change.identity.get('euid')!r}"
        return None

    def request(self, batch: list[Change]) -> Request | list[Request]:
        """One request per operation type the change needs (a list when more than one)."""
        (change,) = batch
        by_type: dict[str, dict[str, Any]] = {}
        for attr, op, value in sorted(change.ops, key=lambda o: list(OP_TYPES).index(o[1])):
            by_type.setdefault(OP_TYPES[op], {})[attr] = DELETE_VALUE if op is Op.UNSET else _wire(value)
        parts, kinds = [], list(by_type)
        for i, kind in enumerate(kinds):
            later = {a for k in kinds[i + 1:] for a in by_type[k]}
            parts.append(Request(
                "POST", self.base_url + PATH, keys=(change.key,),
                headers={"Authorization": self._auth, "Content-Type": "application/json"},
                json={"euid": _euid(change.identity["euid"]), "type": kind, "properties": by_type[kind]},
                # an attribute counts as delivered only with the last part that carries it
                attributes=tuple(a for a in by_type[kind] if a not in later)))
        return parts[0] if len(parts) == 1 else parts

    def verdict(self, request: Request, response: requests.Response) -> Verdict:
        body = json_body(response)
        status = response.status_code
        wait = wait_seconds(response, cap=self.limit.window)
        if body is None or not isinstance(body.get("code"), (int, str)):
            if status == 429:
                return Verdict(Kind.RETRY, "429", "rate limited", wait=wait or 1.0)
            if status in (401, 403):
                return Verdict(Kind.STOP, str(status), f"authentication refused (HTTP {status})")
            # a gateway may have passed the request on: it may have been applied
            return Verdict(Kind.RETRY, str(status), f"unreadable answer: {response.text[:200]!r}",
                           ambiguous=status != 503)
        try:
            code = int(body["code"])
        except (TypeError, ValueError):
            code = -1
        message = str(body.get("message") or "")
        if code == OK and status < 400:
            return Verdict(Kind.DELIVERED, str(code), message)
        if code in STOP:
            return Verdict(Kind.STOP, str(code), message or STOP[code])
        if status == 429:
            return Verdict(Kind.RETRY, str(code), message or "rate limited", wait=wait or 1.0)
        if status >= 500:
            return Verdict(Kind.RETRY, str(code), message)
        # every documented error is permanent for this payload
        return Verdict(Kind.REJECTED, str(code), message or PERMANENT.get(code, "refused"))


def _euid(value: Any) -> int | None:
    """The euid as a long, or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,19}", value.strip()):
        value = int(value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return value
    return None


def _wire(value: Any) -> Any:
    """NUMBERs without a fraction go out as JSON integers (12, not 12.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


# -- emulator: the same rules, enforced ---------------------------------------------------
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

    def __init__(self, api_key: str = "demo-key", api_secret: str = "demo-secret",
                 properties: dict[str, str] | None = None, rate_limit: float = LIMIT.count):
        self.users: dict[int, dict[str, Any]] = {}
        super().__init__(rate_limit=rate_limit)
        self.auth = "Basic " + base64.b64encode(f"{api_key}:{api_secret}".encode()).decode()
        self.properties = {k: v.upper() for k, v in (properties or {}).items()}

    def reset(self) -> None:
        with self.lock:
            self.users = {}
        super().reset()

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
