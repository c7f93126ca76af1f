"""DFINERY client — user profile API (``seeds/dfinery-user-profile.txt``, VENDORS.md §5).

``POST {base}/api/v1/user-profile?service_id=…`` with header ``access_token``; one profile
a call; body ``{"identity": {...}, "user_properties": {...}, "request_datetime": ISO UTC}``.
The body's ``code`` is the verdict, not the HTTP status. 10,000 requests a minute [doc]; the
unit of ``X-Rate-Limit-Reset`` is not documented, so every form is read (``wait_seconds``).

NULL (the mapping's ``null:``): ``skip`` (the value DFINERY has stays) or ``send`` (the
property is sent as JSON ``null``). The docs name no call that removes a property: no ``unset``.
"""

from __future__ import annotations

import datetime as dt

import requests

from connector.vendors.base import Change, Kind, Request, Vendor, Verdict, json_body, wait_seconds
from connector.vendors.dfinery.settings import (
    BASE_URL, IDENTITY_FIELDS, LIMIT, OK, PATH, PERMANENT, STOP, THROTTLED, TOO_MANY, TYPES)

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
