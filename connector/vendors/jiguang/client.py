"""Jiguang Operation Growth client — set user attributes (``seeds/jiguang-growth-set-user-attributes.txt``,
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
import re
from typing import Any

import requests

from connector.vendors.base import Change, Kind, Op, Request, Vendor, Verdict, json_body, wait_seconds
from connector.vendors.jiguang.settings import (
    BASE_URL, LIMIT, MAX_CUID, NAME, OK, PATH, REJECT, RETRYABLE, RULES, STOP, THROTTLED, TYPES)

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
