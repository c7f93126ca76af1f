"""MoEngage — track user and bulk transition APIs (``seeds/moengage-track-user.txt``, VENDORS.md §4).

Host ``https://api-0{dc}.moengage.com`` for data centers 1–6; Basic ``workspace_id:api_key``
plus header ``MOE-APPKEY: {workspace_id}``.

- track user (default, setting ``api: track``): ``POST /v1/customer/{workspace_id}``,
  ``{"type": "customer", "customer_id": …, "attributes": {…}}``, one user a call,
  body ≤ 128 KB.
- bulk (setting ``api: bulk``): ``POST /v1/transition/{workspace_id}``,
  ``{"type": "transition", "elements": [customer objects]}``, ≤ 100 KB a call. It always
  answers 200: a bad element is dropped silently, so per-user errors are invisible in this mode.

Rate limit, both APIs: **10,000 users a minute**, counted in users across all API requests
(the limiter counts each request as the users it carries). MoEngage's Bulk Import reference
says "Send a maximum of 10,000 users and 30,000 events per minute across all API requests"
(https://moengage-partner-guide.mintlify.app/api/bulk/bulk-import-users-and-events), and
VENDORS.md gives track user 10,000 user updates a minute. VENDORS.md's 60,000 users a minute
for bulk is not found in any MoEngage page we could search, so the stated 10,000 is the default;
a workspace granted more sets ``vendor.rate_limit`` (users a second: 1000 for 60,000 a minute).
Headers ``x-ratelimit-limit`` / ``-remaining`` / ``-reset`` describe the 60 s window.

``status`` is ``success`` or ``fail``; 400/409 reject, 401/403 stop the run, 413 splits,
429 waits for ``x-ratelimit-reset``, 5xx is retried. MoEngage has no increment or list
operation in these APIs: attributes are overwritten (``set``), or sent once (``once``).

NULL (the mapping's ``null:``): ``skip`` only — the docs give null no meaning and name no call
that removes an attribute, so a NULLed value stays at MoEngage as last sent. Values beyond its
limits (a string over 512 characters, which it would truncate; an array over 50 items) are set
aside while planning, never sent.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import requests

from connector.coerce import Coercer
from connector.emulator import Emulator as _EmulatorBase
from connector.vendors.base import Change, Kind, Limit, Op, Request, Vendor, Verdict, json_body, wait_seconds

# -- settings: everything the docs fix -------------------------------------------------
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


class Client(Vendor):
    name = "moengage"
    types = TYPES
    rules = {"set": "set", "once": "once"}
    null_policies = frozenset({"skip"})  # no documented delete, and null is not a documented value
    max_users = 1
    limit = LIMITS["track"]
    default_base_url = DATA_CENTERS[DEFAULT_DC]
    identity_fields = IDENTITY_FIELDS
    credentials = ("api_key",)
    settings = ("workspace_id", "data_center", "api", "update_existing_only")
    required_settings = ("workspace_id",)
    conn_fields = {"workspace_id": "login", "api_key": "password", "data_center": "extra.data_center",
                   "api": "extra.api"}

    def __init__(self, base_url, credentials, settings):
        dc = str(settings.get("data_center") or DEFAULT_DC)
        host = DATA_CENTERS.get(int(dc) if dc.isdigit() else DEFAULT_DC)
        super().__init__(base_url or host, credentials, settings)
        self.workspace_id = str(self.settings_.get("workspace_id", ""))
        self.bulk = self.settings_.get("api", "track") == "bulk"
        if self.bulk:
            self.max_users = BULK_MAX_USERS
        token = base64.b64encode(f"{self.workspace_id}:{self.creds.get('api_key', '')}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "MOE-APPKEY": self.workspace_id,
                        "Content-Type": "application/json"}

    @classmethod
    def limit_for(cls, settings):
        return LIMITS.get(settings.get("api", "track"), cls.limit)

    @classmethod
    def validate(cls, spec):
        s = spec.vendor.settings
        if "data_center" in s and str(s["data_center"]) not in {str(dc) for dc in DATA_CENTERS}:
            yield "vendor.settings.data_center", f"{s['data_center']!r} is not a MoEngage data center (1-6)"
        if s.get("api", "track") not in APIS:
            yield "vendor.settings.api", f"{s['api']!r} is not one of: {', '.join(APIS)}"
        if len(spec.mapping) > MAX_CUSTOM_ATTRIBUTES:
            yield "mapping", f"MoEngage takes at most {MAX_CUSTOM_ATTRIBUTES} custom attributes"
        for i, a in enumerate(spec.mapping):
            problem = name_problem(a.attribute)
            if problem:
                yield f"mapping[{i}].attribute", problem

    @classmethod
    def invalid(cls, change: Change) -> str | None:
        return id_problem(change.identity.get("customer_id"))

    # -- per batch ----------------------------------------------------------------------
    def customer(self, change: Change) -> dict[str, Any]:
        """One user as MoEngage's customer object (the track body and a bulk element)."""
        obj = {"type": "customer", "customer_id": str(change.identity["customer_id"]),
               "attributes": {attr: value for attr, op, value in change.ops if op.sets}}
        if "update_existing_only" in self.settings_:
            obj["update_existing_only"] = bool(self.settings_["update_existing_only"])
        return obj

    def batches(self, changes: list[Change]) -> Iterator[list[Change]]:
        """Bulk: pack users into calls under 100 KB (as ``requests`` encodes JSON); track: one each."""
        if not self.bulk:
            yield from super().batches(changes)
            return
        envelope = len(json.dumps({"type": "transition", "elements": []}))
        batch: list[Change] = []
        size = envelope
        for change in changes:
            item = len(json.dumps(self.customer(change))) + 2  # ", " between elements
            if batch and (size + item > BULK_MAX_BYTES or len(batch) >= self.max_users):
                yield batch
                batch, size = [], envelope
            batch.append(change)
            size += item
        if batch:
            yield batch

    def request(self, batch: list[Change]) -> Request:
        keys = tuple(c.key for c in batch)
        if self.bulk:
            return Request("POST", self.base_url + BULK_PATH.format(workspace_id=self.workspace_id), keys=keys,
                           headers=dict(self.headers),
                           json={"type": "transition", "elements": [self.customer(c) for c in batch]})
        (change,) = batch
        return Request("POST", self.base_url + TRACK_PATH.format(workspace_id=self.workspace_id), keys=keys,
                       headers=dict(self.headers), json=self.customer(change))

    def verdict(self, request: Request, response: requests.Response) -> Verdict:
        status = response.status_code
        body = json_body(response)
        error = (body or {}).get("error") if isinstance((body or {}).get("error"), dict) else {}
        code = str(status)  # MoEngage has no error codes beyond the status and error.type
        message = ": ".join(str(x) for x in (error.get("type"), error.get("message")) if x) or str(
            (body or {}).get("message") or "")
        if error.get("attribute"):
            message = f"{message} (attribute {error['attribute']!r})"
        if status == 200 and body is not None and body.get("status") == SUCCESS:
            return Verdict(Kind.DELIVERED, str(status), message)
        if status in STOP:
            return Verdict(Kind.STOP, code, message or "authentication failed")
        if status == 404:  # wrong data center / workspace in the path: no request can succeed
            return Verdict(Kind.STOP, code, message or f"no such endpoint: {request.url}")
        if status == 413:
            return Verdict(Kind.SPLIT, code, message or "request body too large")
        if status == 429:
            wait = wait_seconds(response, "x-ratelimit-reset", "Retry-After", cap=self.limit.window)
            return Verdict(Kind.RETRY, code, message or "rate limited", wait=wait or 1.0)
        if body is None or status >= 500:
            # 5xx or an answer we cannot read: it may have been applied (every op here is a set)
            return Verdict(Kind.RETRY, code, message or f"unreadable answer: {response.text[:200]!r}",
                           ambiguous=True)
        return Verdict(Kind.REJECTED, code, message or f"status {body.get('status')!r}")  # 400, 409, a 200 "fail"


# -- emulator: the same rules, enforced ---------------------------------------------------
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_LOOKS_LIKE_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]")


def _fail(status: int, kind: str, message: str, attribute: str | None = None):
    error = {"type": kind, "message": message, "request_id": f"emu-{time.monotonic_ns()}"}
    if attribute is not None:
        error["attribute"] = attribute
    return status, {"status": "fail", "error": error}, {}


_ACCEPTED = {"status": "success", "message": "Your request has been accepted and will be processed soon."}
_ERROR_KINDS = {400: "Bad Request", 401: "Authentication required", 403: "Forbidden", 409: "Conflict",
                413: "Request Entity Too Large", 429: "Rate Limit Exceeded", 500: "Internal Server Error"}


class Emulator(_EmulatorBase):
    """Checks auth, ``type``, body shapes, blocked names, reserved ids, sizes and the rate.

    Settings: ``workspace_id``, ``api_key``, ``rate_limit`` (users a minute across both APIs,
    default 10,000: a bulk call counts its elements), and the byte limits ``track_max_bytes`` / ``bulk_max_bytes``. ``customers`` holds the
    attributes received per customer_id, ``types`` the type MoEngage inferred per
    attribute (a datetime in the wrong format becomes a ``string`` attribute, value kept
    as sent), ``dropped`` the bulk elements it silently threw away.
    """

    name = "moengage"
    limit = LIMITS["bulk"]  # one budget for both APIs

    def __init__(self, workspace_id: str = "demo-workspace", api_key: str = "demo-key",
                 rate_limit: float = LIMITS["bulk"].count,
                 track_max_bytes: int = TRACK_MAX_BYTES, bulk_max_bytes: int = BULK_MAX_BYTES):
        self.customers: dict[str, dict[str, Any]] = {}
        self.types: dict[str, str] = {}
        self.dropped: list[tuple[Any, str]] = []
        super().__init__(rate_limit=rate_limit)
        self.workspace_id, self.api_key = workspace_id, api_key
        self.track_max_bytes, self.bulk_max_bytes = track_max_bytes, bulk_max_bytes
        self.routes = {("POST", TRACK_PATH.format(workspace_id=workspace_id)): "track",
                       ("POST", BULK_PATH.format(workspace_id=workspace_id)): "transition"}

    def reset(self) -> None:
        with self.lock:
            self.customers, self.types, self.dropped = {}, {}, []
        super().reset()

    def state(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {k: dict(v) for k, v in self.customers.items()}

    def error(self, code):
        status = int(code) if str(code).isdigit() else 400
        status_, body, _ = _fail(status, _ERROR_KINDS.get(status, "Error"), "injected error")
        headers = {"x-ratelimit-reset": "1"} if status == 429 else {}
        return status_, body, headers

    def throttled(self, retry_after):
        status, body, _ = _fail(429, "Rate Limit Exceeded", "too many requests")
        return status, body, {"x-ratelimit-reset": f"{max(retry_after, 0):.0f}"}

    def cost(self, req):
        body = req.json
        """The limit counts users: a bulk call counts the customers among its elements."""
        elements = body.get("elements") if req.path.startswith("/v1/transition/") and isinstance(body, dict) else None
        if isinstance(elements, list):
            return max(1, sum(1 for e in elements if isinstance(e, dict) and e.get("type") == "customer"))
        return 1

    def rate_headers(self, remaining, reset):
        return {"x-ratelimit-limit": str(int(self.rate_limit or 0)), "x-ratelimit-remaining": str(remaining),
                "x-ratelimit-reset": f"{reset:.0f}"}

    # -- checks shared by both APIs ---------------------------------------------------------
    def _auth(self, req):
        expected = "Basic " + base64.b64encode(f"{self.workspace_id}:{self.api_key}".encode()).decode()
        if req.headers.get("authorization") != expected:
            return _fail(401, "Authentication required", "invalid workspace id or API key")
        if req.headers.get("moe-appkey", self.workspace_id) != self.workspace_id:
            return _fail(401, "Authentication required", "MOE-APPKEY does not match the workspace")
        return None

    def _customer_problem(self, obj: Any) -> tuple[str, str | None] | None:
        """(message, attribute) when a customer object would be refused."""
        if not isinstance(obj, dict):
            return "customer object must be a JSON object", None
        if obj.get("type") != "customer":
            return f"type must be 'customer' (case-sensitive), got {obj.get('type')!r}", None
        cid = obj.get("customer_id")
        if not isinstance(cid, str) or id_problem(cid):
            return id_problem(cid) or "customer_id must be a string", None
        attrs = obj.get("attributes")
        if not isinstance(attrs, dict):
            return "attributes must be an object", None
        if "update_existing_only" in obj and not isinstance(obj["update_existing_only"], bool):
            return "update_existing_only must be a boolean", None
        for name, value in attrs.items():
            problem = name_problem(name)
            if problem:
                return problem, name
            if isinstance(value, list) and len(value) > MAX_ITEMS:
                return f"arrays hold at most {MAX_ITEMS} items", name
            if isinstance(value, dict):
                return "attribute values are strings, numbers, booleans, dates or arrays", name
        with self.lock:
            known = set(self.types)
        if len(known | set(attrs)) > MAX_CUSTOM_ATTRIBUTES:
            return f"more than {MAX_CUSTOM_ATTRIBUTES} custom attributes", None
        return None

    def _store(self, obj: dict[str, Any]) -> None:
        cid = obj["customer_id"]
        with self.lock:
            if obj.get("update_existing_only") and cid not in self.customers:
                return
            held = self.customers.setdefault(cid, {})
            for name, value in obj["attributes"].items():
                if isinstance(value, str):
                    value = value[:MAX_CHARS]  # the docs: longer values are truncated
                elif isinstance(value, list):
                    value = [v[:MAX_CHARS] if isinstance(v, str) else v for v in value]
                self.types.setdefault(name, _inferred_type(value))
                held[name] = value

    # -- routes ---------------------------------------------------------------------------------
    def track(self, req):
        denied = self._auth(req)
        if denied:
            return denied
        if len(req.raw.encode()) > self.track_max_bytes:
            return _fail(413, "Request Entity Too Large", f"body over {self.track_max_bytes} bytes")
        problem = self._customer_problem(req.json)
        if problem:
            return _fail(400, "Bad Request", *problem)
        self._store(req.json)
        return 200, dict(_ACCEPTED, request_id=f"emu-{time.monotonic_ns()}"), {}

    def transition(self, req):
        denied = self._auth(req)
        if denied:
            return denied
        if len(req.raw.encode()) > self.bulk_max_bytes:
            return _fail(413, "Request Entity Too Large", f"body over {self.bulk_max_bytes} bytes")
        body = req.json
        if not isinstance(body, dict) or body.get("type") != "transition" or not isinstance(body.get("elements"), list):
            return _fail(400, "Bad Request", "expected {\"type\": \"transition\", \"elements\": [...]}")
        for element in body["elements"]:
            problem = self._customer_problem(element)
            if problem:  # accepted all the same: the caller never hears of it
                with self.lock:
                    self.dropped.append((element, problem[0]))
                continue
            self._store(element)
        return 200, dict(_ACCEPTED, request_id=f"emu-{time.monotonic_ns()}"), {}


def _inferred_type(value: Any) -> str:
    """The type MoEngage gives an attribute from its first value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str) and (_DATETIME.match(value) or _DATE.match(value)):
        return "datetime"
    return "string"  # includes datetimes in any other format: kept as sent


PORT = 8605  # where `usersync emulators` serves it


def emulator(specs) -> Emulator:
    """An emulator accepting these syncs' credentials (MoEngage needs no attribute registration)."""
    kw = {}
    for s in specs:
        kw = {"workspace_id": str(s.vendor.settings.get("workspace_id", "demo-workspace")),
              "api_key": s.vendor.credentials.get("api_key", "demo-key")}
    return Emulator(**kw)
