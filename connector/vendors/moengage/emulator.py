"""The MoEngage emulator: the same rules as the client's, enforced by a strict stand-in on
loopback (for the tests, the demo, the bench and ``usersync emulators``; never a production run)."""

from __future__ import annotations

import base64
import re
import time
from typing import Any

from connector.vendors.emulator import Emulator as _EmulatorBase
from connector.vendors.moengage.settings import (
    BULK_MAX_BYTES, BULK_PATH, LIMITS, MAX_CHARS, MAX_CUSTOM_ATTRIBUTES, MAX_ITEMS, TRACK_MAX_BYTES, TRACK_PATH,
    id_problem, name_problem)

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
    stores = ("customers", "types", "dropped")

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
