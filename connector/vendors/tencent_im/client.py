"""Tencent Cloud Chat (IM) client: user attributes for push, up to 100 accounts a request.

``POST https://{region host}/v4/all_member_push/im_set_attr?usersig=…&identifier=…&sdkappid=…&random=…&contenttype=json``
with ``{"UserAttrs": [{"To_Account": "...", "Attrs": {name: "value"}}]}``; ``im_remove_attr``
(``"Attrs": [names]``) for the attributes a NULL unsets. The answer is HTTP 200 with
``ActionStatus``/``ErrorCode``/``ErrorInfo`` (and ``ErrorList`` for per-account failures).

Auth is a UserSig (``usersig.py``) made for the app admin; it is made here, cached until
near expiry and made again when Tencent says it expired (70001) or was invalidated
(70052) — once: a fresh sig refused as well stops the run.

An app has at most 10 attribute names, registered beforehand; ``prepare`` reads them
(``im_get_attr_name``, sent by the push like any request: paced, retried) and refuses a
mapping that names any other before the first write.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests

from connector.errors import ConfigError
from connector.vendors.base import Call, Change, Kind, Op, Request, Vendor, Verdict, json_body, without_query
from connector.vendors.tencent_im.settings import (
    DEFAULT_REGION, GET_ATTR_NAME, LIMIT, MAX_ACCOUNT_BYTES, MAX_NAMES, MAX_USERS, OK, PERMANENT, REGIONS, REMOVE_ATTR,
    RETRYABLE, SET_ATTR, SIG_RENEW, SIG_RENEW_BEFORE, SIG_TTL, STOP, THROTTLED, TYPES)
from connector.vendors.tencent_im.usersig import make_usersig

# the config field to fix, for a refusal of the admin request
STOP_FIELDS = {60002: "vendor", 70013: "vendor.settings.identifier", 90009: "vendor.settings.identifier",
               70014: "vendor.settings.sdkappid", 70020: "vendor.settings.sdkappid"}


class _NoUserSigInLogs(logging.Filter):
    """urllib3 logs each request's URL at debug level; ours carry the UserSig, a credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg, record.args = without_query(record.getMessage()), ()
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_NoUserSigInLogs())


@dataclasses.dataclass
class _Sig:
    text: str
    time: int
    renewed: bool  # made because the last one was refused; cleared by its first success


@dataclasses.dataclass
class _Call(Request):
    """A request and the sig it carries (so a refusal can be matched to the sig)."""

    sig: _Sig | None = None


class Client(Vendor):
    name = "tencent_im"
    types = TYPES
    rules = {"set": "set", "once": "once"}  # im_set_attr only overwrites
    null_policies = frozenset({"skip", "unset"})  # no null on the wire (values are strings): im_remove_attr
    max_users = MAX_USERS
    limit = LIMIT
    default_base_url = "https://" + REGIONS[DEFAULT_REGION]
    identity_fields = ("To_Account",)
    credentials = ("secret_key",)
    settings = ("sdkappid", "identifier", "region")
    required_settings = ("sdkappid", "identifier")
    conn_fields = {"identifier": "login", "secret_key": "password", "sdkappid": "extra.sdkappid",
                   "region": "extra.region"}

    def __init__(self, base_url, credentials, settings):
        region = str(settings.get("region") or DEFAULT_REGION)
        self.host = REGIONS.get(region.lower()) or (region if region in REGIONS.values() else None)
        super().__init__(base_url or (f"https://{self.host}" if self.host else None), credentials, settings)
        self._lock = threading.Lock()
        self._sig: _Sig | None = None
        self._refused: int | None = None  # TLS.time of the sig Tencent last refused

    @classmethod
    def validate(cls, spec):
        s = spec.vendor.settings
        if "sdkappid" in s and not str(s["sdkappid"]).isdigit():
            yield "vendor.settings.sdkappid", f"{s['sdkappid']!r} is not an SDKAppID (a number)"
        region = s.get("region")
        if region is not None and str(region).lower() not in REGIONS and region not in REGIONS.values():
            yield "vendor.settings.region", f"unknown region {region!r} (expected: {', '.join(REGIONS)})"
        if len(spec.mapping) > MAX_NAMES:
            yield "mapping", f"{len(spec.mapping)} attributes; a Tencent IM app has at most {MAX_NAMES}"

    @classmethod
    def invalid(cls, change: Change) -> str | None:
        """An account Tencent cannot take (the values' 50 bytes are checked as they are coerced)."""
        account = str(change.identity.get("To_Account", ""))
        if not account or len(account.encode()) > MAX_ACCOUNT_BYTES or not account.isascii() \
                or not account.isprintable():
            return f"To_Account {account!r} is not a UserID (printable ASCII, 1-{MAX_ACCOUNT_BYTES} bytes)"
        return None

    # -- the UserSig ------------------------------------------------------------------
    def _usersig(self) -> _Sig:
        """The cached sig, or a new one when it is near expiry or was refused."""
        with self._lock:
            now = time.time()
            s = self._sig
            if s is None or s.time + SIG_TTL - now < SIG_RENEW_BEFORE:
                t = int(now)
                if self._refused is not None and t <= self._refused:
                    # made in the same second, the new sig would be the refused one again
                    time.sleep(self._refused + 1 - now)
                    t = self._refused + 1
                sig = make_usersig(self.settings_.get("sdkappid", ""), self.creds["secret_key"],
                                   self.settings_.get("identifier", ""), SIG_TTL, t)
                self._sig = s = _Sig(sig, t, renewed=self._refused is not None)
                self._refused = None
            return s

    def _call(self, path: str, body: Any, keys: tuple[str, ...] = ()) -> _Call:
        sig = self._usersig()
        return _Call("POST", self.base_url + path, keys=keys, json=body, sig=sig,
                     params={"usersig": sig.text, "identifier": self.settings_.get("identifier", ""),
                             "sdkappid": self.settings_.get("sdkappid", ""), "random": secrets.randbits(32),
                             "contenttype": "json"},
                     headers={"Content-Type": "application/json"})

    # -- before the run: the registered names -------------------------------------------
    def prepare(self, call: Call, spec: Any) -> None:
        """Read the app's registered attribute names; a mapped name that is not one fails the run."""
        where = f"Tencent IM app {self.settings_.get('sdkappid')}"
        if self.host is None and not spec.vendor.base_url:
            raise ConfigError(where, f"unknown region {self.settings_.get('region')!r} "
                                     f"(expected: {', '.join(REGIONS)})", spec.name, "vendor.settings.region")
        v, response = call(lambda: self._call(GET_ATTR_NAME, {}))  # a new sig, random, for each attempt
        if v.kind is Kind.STOP:
            raise ConfigError(where, f"Tencent IM refused the admin request: {v.code} {v.message}",
                              spec.name, STOP_FIELDS.get(int(v.code or 0), "vendor.credentials.secret_key"))
        if v.kind is not Kind.DELIVERED:
            raise RuntimeError(f"{where}: could not read the registered attribute names: {v.code} {v.message}")
        found = (json_body(response) or {}).get("AttrNames") or {}
        names = {str(n) for n in (found.values() if isinstance(found, dict) else found)}
        for i, a in enumerate(spec.mapping):
            if a.attribute not in names:
                raise ConfigError(where, f"attribute {a.attribute!r} is not registered in the app "
                                         f"(registered: {', '.join(sorted(names)) or 'none'}); register it in the "
                                         f"console (at most {MAX_NAMES} names) before syncing",
                                  spec.name, f"mapping[{i}].attribute")

    # -- per batch ------------------------------------------------------------------
    def batches(self, changes: list[Change]) -> Iterator[list[Change]]:
        """Requests of the full 100 accounts Tencent takes: the users that only set, then those
        that only remove. A user that needs both goes alone, as two requests (parts): were it
        in a shared pair, an ErrorList for another account of the first would leave its
        second unsent, and it would count as delivered."""
        sets, removes = [], []
        for c in changes:
            if all(op.sets for _, op, _ in c.ops):
                sets.append(c)
            elif all(op is Op.UNSET for _, op, _ in c.ops):
                removes.append(c)
            else:
                yield [c]
        for group in (sets, removes):
            for i in range(0, len(group), MAX_USERS):
                yield group[i : i + MAX_USERS]

    def request(self, batch: list[Change]) -> Request | list[Request]:
        """``im_set_attr`` for the values set, ``im_remove_attr`` for the attributes unset
        (both, as two parts, only for a user alone in its batch: see ``batches``)."""
        sets = [(c, {a: v for a, op, v in c.ops if op.sets}) for c in batch]
        removes = [(c, [a for a, op, _ in c.ops if op is Op.UNSET]) for c in batch]
        parts = [self._part(path, [(c, attrs) for c, attrs in users if attrs])
                 for path, users in ((SET_ATTR, sets), (REMOVE_ATTR, removes)) if any(a for _, a in users)]
        if len(parts) == 1:
            return parts[0]
        for part in parts:  # an attribute is acknowledged with the part that carries it
            part.attributes = tuple(dict.fromkeys(n for u in part.json["UserAttrs"] for n in u["Attrs"]))
        return parts

    def _part(self, path: str, users: list[tuple[Change, Any]]) -> _Call:
        body = {"UserAttrs": [{"To_Account": str(c.identity["To_Account"]), "Attrs": attrs} for c, attrs in users]}
        return self._call(path, body, keys=tuple(c.key for c, _ in users))

    def verdict(self, request: Request, response: requests.Response) -> Verdict:
        body = json_body(response)
        if body is None or "ActionStatus" not in body:
            return Verdict(Kind.RETRY, str(response.status_code), f"unreadable answer: {response.text[:200]!r}",
                           ambiguous=True)
        try:
            code = int(body.get("ErrorCode") or 0)
        except (TypeError, ValueError):
            code = -1
        info = str(body.get("ErrorInfo") or "")
        sig = getattr(request, "sig", None)
        if body.get("ActionStatus") == "OK" and code == OK:
            if sig is not None and sig.renewed:
                sig.renewed = False  # the new sig works: a later refusal may renew again
            return Verdict(Kind.DELIVERED, "0", info or "OK", per_user=self._error_list(request, body))
        text = info or STOP.get(code) or SIG_RENEW.get(code) or PERMANENT.get(code) or RETRYABLE.get(code, "")
        if code in SIG_RENEW:
            with self._lock:
                if sig is not None and sig.renewed:
                    return Verdict(Kind.STOP, str(code), f"{text} (refused again right after a new "
                                   "UserSig was made: check secret_key, sdkappid and the clock)")
                if sig is not None and sig is self._sig:
                    self._sig, self._refused = None, sig.time
            return Verdict(Kind.RETRY, str(code), f"{text}; retrying with a new UserSig")
        if code in STOP:  # the vendor's words and what they mean for us
            return Verdict(Kind.STOP, str(code), f"{info} ({STOP[code]})" if info else STOP[code])
        if code in THROTTLED:
            return Verdict(Kind.RETRY, str(code), text or "frequency limit", wait=self.limit.window)
        if code in PERMANENT:
            kind = Kind.SPLIT if len(request.keys) > 1 else Kind.REJECTED
            return Verdict(kind, str(code), text)
        return Verdict(Kind.RETRY, str(code), text)

    @staticmethod
    def _error_list(request: Request, body: dict) -> dict[str, tuple[Kind, str | None, str]]:
        """Per-account failures of a request that otherwise succeeded."""
        errors = body.get("ErrorList") or []
        if not errors or not request.json:
            return {}
        key_of = {u["To_Account"]: k for u, k in zip(request.json.get("UserAttrs", []), request.keys)}
        per_user = {}
        for e in errors:
            key = key_of.get(str(e.get("To_Account")))
            if key is None:
                continue
            try:
                code = int(e.get("ErrorCode") or 0)
            except (TypeError, ValueError):
                code = -1
            if code == OK:
                continue
            text = str(e.get("ErrorInfo") or PERMANENT.get(code) or RETRYABLE.get(code) or "account refused")
            kind = Kind.RETRY if code in THROTTLED or code in RETRYABLE else Kind.REJECTED
            per_user[key] = (kind, str(code), text)
        return per_user
