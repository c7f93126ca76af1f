"""MoEngage client — track user and bulk transition APIs (``seeds/moengage-track-user.txt``, VENDORS.md §4).

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
from collections.abc import Iterator
from typing import Any

import requests

from connector.vendors.base import Change, Kind, Request, Vendor, Verdict, json_body, wait_seconds
from connector.vendors.moengage.settings import (
    APIS, BULK_MAX_BYTES, BULK_MAX_USERS, BULK_PATH, DATA_CENTERS, DEFAULT_DC, IDENTITY_FIELDS, LIMITS,
    MAX_CUSTOM_ATTRIBUTES, STOP, SUCCESS, TRACK_PATH, TYPES, id_problem, name_problem)

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
