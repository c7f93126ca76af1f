"""EngageLab MA client — set user attributes (``seeds/engagelab-ma-set-user-attributes.txt``, VENDORS.md §1).

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

from connector.vendors.base import Change, Kind, Op, Request, Vendor, Verdict, json_body, wait_seconds
from connector.vendors.engagelab.settings import (
    DEFAULT_REGION, DELETE_VALUE, LIMIT, OK, OP_TYPES, PATH, PERMANENT, REGIONS, STOP, TYPES)

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
