"""Tencent Cloud Chat (IM) — user attributes for push (``seeds/tencent-im-set-user-attributes.txt``, VENDORS.md §3).

``POST https://{region host}/v4/all_member_push/im_set_attr?usersig=…&identifier=…&sdkappid=…&random=…&contenttype=json``
with ``{"UserAttrs": [{"To_Account": "...", "Attrs": {name: "value"}}]}``: up to 100 users a
request, 100 requests a second, every value a string of at most 50 bytes. The answer is HTTP 200
with ``ActionStatus``/``ErrorCode``/``ErrorInfo`` (and ``ErrorList`` for per-account failures).

Auth is a UserSig (TLS sig v2, HMAC-SHA256 with the app's secret key) made for the app admin;
it is made here, cached until near expiry and made again when Tencent says it expired
(70001) or was invalidated (70052) — once: a fresh sig refused as well stops the run.

An app has at most 10 attribute names, registered beforehand; ``prepare`` reads them
(``im_get_attr_name``) and refuses a mapping that names any other before the first write.

NULL (the mapping's ``null:``): ``skip`` (the value Tencent has stays) or ``unset``: the
attribute is removed with ``im_remove_attr`` (``{"UserAttrs": [{"To_Account", "Attrs":
[names]}]}``, up to 100 accounts a request). There is no null value on the wire: every value
is a string of at most 50 bytes, and a longer one is set aside while planning (never sent).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pandas as pd
import requests

from connector.coerce import Coercer
from connector.config import ConfigError
from connector.emulator import Emulator as _EmulatorBase
from connector.vendors.base import (Change, Kind, Limit, Op, Request, Vendor, Verdict, json_body, transport_verdict,
                                    without_query)

# -- settings: everything the docs fix -------------------------------------------------
REGIONS = {  # region -> admin API host [doc]
    "china": "console.tim.qq.com",
    "singapore": "adminapisgp.im.qcloud.com",
    "seoul": "adminapikr.im.qcloud.com",
    "tokyo": "adminapijpn.im.qcloud.com",
    "frankfurt": "adminapiger.im.qcloud.com",
    "mumbai": "adminapiind.im.qcloud.com",
    "silicon_valley": "adminapiusa.im.qcloud.com",
    "jakarta": "adminapiidn.im.qcloud.com",
}
DEFAULT_REGION = "china"
API = "/v4/all_member_push/"
SET_ATTR, GET_ATTR_NAME, GET_ATTR = API + "im_set_attr", API + "im_get_attr_name", API + "im_get_attr"
REMOVE_ATTR = API + "im_remove_attr"  # [doc] the attribute names to remove, per account
MAX_USERS = 100  # accounts a request [doc]
LIMIT = Limit(100, 1.0)  # requests a second [doc]
MAX_VALUE_BYTES = 50  # bytes an attribute value [doc]
MAX_NAMES = 10  # attribute names an app may register [doc]
MAX_ACCOUNT_BYTES = 32  # a UserID: printable ASCII, at most 32 bytes [doc, SDK error 7003]
SIG_TTL = 86_400  # seconds a UserSig we make is valid
SIG_RENEW_BEFORE = 600  # make a new one when less than this is left

# error codes (ErrorCode, an integer); [doc] unless marked
OK = 0
SIG_RENEW = {70001: "UserSig expired", 70052: "UserSig invalidated"}  # make a new sig, retry once
STOP = {  # no request of this run can succeed
    60002: "request URL parameters invalid",  # [inferred] our bug, not the data's
    70003: "UserSig invalid",  # [inferred, common code]
    70009: "UserSig verification failed (check secret_key)",  # [inferred, common code]
    70013: "identifier differs from the UserSig's identifier",
    70014: "sdkappid differs from the UserSig's sdkappid",  # [inferred, common code]
    70020: "unknown sdkappid",  # [inferred, common code]
    90009: "the request requires app admin permissions (identifier must be the app admin)",
}
THROTTLED = {60007, 60011, 60018, 60019}  # frequency limits: back off a window, retry
PERMANENT = {  # this payload is refused: split the batch to find the users, reject them alone
    90001: "JSON format invalid",
    90018: "too many accounts in one request",
    90033: "invalid attribute",
    70107: "account does not exist",  # [inferred] as ErrorList entries for unknown accounts
    70402: "parameter invalid",  # [inferred, common code]
}
RETRYABLE = {91000: "internal service error", 70500: "internal server error"}
STOP_FIELDS = {60002: "vendor", 70013: "vendor.settings.identifier", 90009: "vendor.settings.identifier",
               70014: "vendor.settings.sdkappid", 70020: "vendor.settings.sdkappid"}


class _NoUserSigInLogs(logging.Filter):
    """urllib3 logs each request's URL at debug level; ours carry the UserSig, a credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg, record.args = without_query(record.getMessage()), ()
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_NoUserSigInLogs())


# -- wire types: Tencent stores every attribute as a string of at most 50 bytes -----------
@dataclasses.dataclass(frozen=True)
class Text(Coercer):
    """Coerce to ``kind`` (so a bad number still rejects its user), then write it as text.

    The snapshot then holds exactly the string Tencent holds, and the 50-byte limit is
    checked on that string while planning: an oversize value sets aside its user alone.
    """

    def __call__(self, s: pd.Series, label: str) -> tuple[pd.Series, pd.Series]:
        values, errors = super().__call__(s, label)
        if self.kind in ("long", "double", "boolean"):
            values = pd.Series([_text(v) for v in values.astype(object)], index=values.index, dtype=object)
            big = self._oversize(values)
            if big.any():
                errors[big] = [f"{label}: value too long ({v!r})" for v in values[big]]
                values = values.where(~big)
        return values, errors


def _text(v: Any) -> str | None:
    """A number or boolean as Tencent keeps it: decimal text, 'true'/'false'."""
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return "true" if v else "false"
    if isinstance(v, float) or type(v).__name__.startswith("float"):
        return repr(float(v))  # shortest text that reads back as the same number
    return str(int(v))


# Accepted types, all written as strings (the only value type Tencent has): numbers and
# booleans are validated as such first so that "12abc" in a Long column rejects its user;
# dates and datetimes get one fixed, sortable format. No list type: a value is one string
# (no append), and no increase rule: Tencent only overwrites.
TYPES = {
    "string": Text("string", max_bytes=MAX_VALUE_BYTES),
    "long": Text("long", max_bytes=MAX_VALUE_BYTES),
    "double": Text("double", max_bytes=MAX_VALUE_BYTES),
    "boolean": Text("boolean", max_bytes=MAX_VALUE_BYTES),
    "date": Text("date", fmt="%Y-%m-%d", max_bytes=MAX_VALUE_BYTES),
    "datetime": Text("datetime", fmt="%Y-%m-%dT%H:%M:%SZ", max_bytes=MAX_VALUE_BYTES),
}


# -- UserSig (TLS sig v2, VENDORS.md §3) ---------------------------------------------------
def _hmac(secret_key: str, identifier: str, sdkappid: Any, t: int, expire: int) -> str:
    content = f"TLS.identifier:{identifier}\nTLS.sdkappid:{sdkappid}\nTLS.time:{t}\nTLS.expire:{expire}\n"
    return base64.b64encode(hmac.new(secret_key.encode(), content.encode(), hashlib.sha256).digest()).decode()


def make_usersig(sdkappid: Any, secret_key: str, identifier: str, expire: int = SIG_TTL,
                 now: int | None = None) -> str:
    """A UserSig for ``identifier``, valid ``expire`` seconds from ``now``."""
    t = int(time.time()) if now is None else int(now)
    appid = int(sdkappid) if str(sdkappid).isdigit() else sdkappid
    doc = {"TLS.ver": "2.0", "TLS.identifier": str(identifier), "TLS.sdkappid": appid, "TLS.expire": int(expire),
           "TLS.time": t, "TLS.sig": _hmac(secret_key, identifier, appid, t, expire)}
    packed = base64.b64encode(zlib.compress(json.dumps(doc, separators=(",", ":")).encode())).decode()
    return packed.translate(str.maketrans("+/=", "*-_"))


def read_usersig(sig: str) -> dict[str, Any]:
    """The JSON inside a UserSig (raises ValueError when it is not one)."""
    try:
        raw = zlib.decompress(base64.b64decode(sig.translate(str.maketrans("*-_", "+/=")), validate=True))
        doc = json.loads(raw)
    except (ValueError, zlib.error) as e:
        raise ValueError(f"not a UserSig: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a UserSig")
    return doc


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
    def prepare(self, session: requests.Session, spec: Any) -> None:
        """Read the app's registered attribute names; a mapped name that is not one fails the run."""
        where = f"Tencent IM app {self.settings_.get('sdkappid')}"
        if self.host is None and not spec.vendor.base_url:
            raise ConfigError(where, f"unknown region {self.settings_.get('region')!r} "
                                     f"(expected: {', '.join(REGIONS)})", spec.name, "vendor.settings.region")
        names = self._attr_names(session, spec, where)
        for i, a in enumerate(spec.mapping):
            if a.attribute not in names:
                raise ConfigError(where, f"attribute {a.attribute!r} is not registered in the app "
                                         f"(registered: {', '.join(sorted(names)) or 'none'}); register it in the "
                                         f"console (at most {MAX_NAMES} names) before syncing",
                                  spec.name, f"mapping[{i}].attribute")

    def _attr_names(self, session, spec, where: str) -> set[str]:
        cfg = spec.vendor
        attempt = 0
        while True:
            attempt += 1
            req = self._call(GET_ATTR_NAME, {})
            try:
                resp = session.request(req.method, req.url, params=req.params, json=req.json,
                                       headers=req.headers, timeout=cfg.timeout, verify=session.verify)
                v, body = self._read(req, resp)
            except requests.RequestException as e:
                v, body = transport_verdict(e), None
            if v.kind is Kind.DELIVERED:
                names = (body or {}).get("AttrNames") or {}
                return {str(n) for n in (names.values() if isinstance(names, dict) else names)}
            if v.kind is Kind.STOP:
                raise ConfigError(where, f"Tencent IM refused the admin request: {v.code} {v.message}",
                                  spec.name, STOP_FIELDS.get(int(v.code or 0), "vendor.credentials.secret_key"))
            if attempt >= cfg.max_attempts:
                raise RuntimeError(f"{where}: could not read the registered attribute names "
                                   f"after {attempt} attempts: {v.code} {v.message}")
            time.sleep(v.wait or cfg.backoff * 2 ** (attempt - 1))

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
        return self._read(request, response)[0]

    def _read(self, request: Request, response: requests.Response) -> tuple[Verdict, dict | None]:
        body = json_body(response)
        if body is None or "ActionStatus" not in body:
            return Verdict(Kind.RETRY, str(response.status_code), f"unreadable answer: {response.text[:200]!r}",
                           ambiguous=True), None
        try:
            code = int(body.get("ErrorCode") or 0)
        except (TypeError, ValueError):
            code = -1
        info = str(body.get("ErrorInfo") or "")
        sig = getattr(request, "sig", None)
        if body.get("ActionStatus") == "OK" and code == OK:
            if sig is not None and sig.renewed:
                sig.renewed = False  # the new sig works: a later refusal may renew again
            return Verdict(Kind.DELIVERED, "0", info or "OK", per_user=self._error_list(request, body)), body
        text = info or STOP.get(code) or SIG_RENEW.get(code) or PERMANENT.get(code) or RETRYABLE.get(code, "")
        if code in SIG_RENEW:
            with self._lock:
                if sig is not None and sig.renewed:
                    return Verdict(Kind.STOP, str(code), f"{text} (refused again right after a new "
                                   "UserSig was made: check secret_key, sdkappid and the clock)"), body
                if sig is not None and sig is self._sig:
                    self._sig, self._refused = None, sig.time
            return Verdict(Kind.RETRY, str(code), f"{text}; retrying with a new UserSig"), body
        if code in STOP:  # the vendor's words and what they mean for us
            return Verdict(Kind.STOP, str(code), f"{info} ({STOP[code]})" if info else STOP[code]), body
        if code in THROTTLED:
            return Verdict(Kind.RETRY, str(code), text or "frequency limit", wait=self.limit.window), body
        if code in PERMANENT:
            kind = Kind.SPLIT if len(request.keys) > 1 else Kind.REJECTED
            return Verdict(kind, str(code), text), body
        return Verdict(Kind.RETRY, str(code), text), body

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


# -- emulator: the same rules, enforced ---------------------------------------------------
class Emulator(_EmulatorBase):
    """One Tencent IM app: checks the URL parameters and the UserSig, the body, the limits.

    Settings: ``sdkappid``, ``secret_key``, ``identifier`` (the app admin), ``attr_names``
    (the registered names, at most 10), ``accounts`` (imported accounts; None = any
    account exists), ``rate_limit`` (requests a second, default 100).
    ``revoke()`` invalidates every sig made so far (70052).
    """

    name = "tencent_im"
    routes = {("POST", SET_ATTR): "set_attr", ("POST", GET_ATTR_NAME): "get_attr_name",
              ("POST", GET_ATTR): "get_attr", ("POST", REMOVE_ATTR): "remove_attr"}
    limit = LIMIT

    def __init__(self, sdkappid: str | int = "1400000000", secret_key: str = "demo-secret-key",
                 identifier: str = "administrator", attr_names: list[str] | None = None,
                 accounts: set[str] | None = None, rate_limit: float = LIMIT.count):
        self.attrs: dict[str, dict[str, str]] = {}
        super().__init__(rate_limit=rate_limit)
        self.sdkappid, self.secret_key, self.identifier = str(sdkappid), secret_key, identifier
        self.attr_names = list(dict.fromkeys(attr_names or []))
        if len(self.attr_names) > MAX_NAMES:
            raise ValueError(f"a Tencent IM app has at most {MAX_NAMES} attribute names, got {len(self.attr_names)}")
        self.accounts = accounts
        self.revoked_until = 0  # sigs with TLS.time <= this are invalidated

    def reset(self) -> None:
        with self.lock:
            self.attrs = {}
        super().reset()

    def state(self) -> dict[str, dict[str, str]]:
        with self.lock:
            return {k: dict(v) for k, v in self.attrs.items()}

    def revoke(self) -> None:
        self.revoked_until = int(time.time())

    def error(self, code):
        return 200, _fail(int(code), "injected error"), {}

    def throttled(self, retry_after):
        return 200, _fail(60007, "REST API call frequency exceeds the limit"), {}

    def _auth(self, req) -> tuple[int, dict, dict] | None:
        """The URL parameters and the UserSig, as Tencent checks them; None when they pass."""
        q = req.query
        if q.get("contenttype") != "json":
            return 200, _fail(60002, "contenttype must be json"), {}
        r = q.get("random", "")
        if not (r.isdigit() and int(r) < 2**32):
            return 200, _fail(60002, "random must be a 32-bit unsigned integer"), {}
        if q.get("sdkappid") != self.sdkappid:
            return 200, _fail(70020, "SDKAppID not found"), {}
        try:
            doc = read_usersig(q.get("usersig", ""))
            ident, appid = doc["TLS.identifier"], doc["TLS.sdkappid"]
            t, expire, sig = int(doc["TLS.time"]), int(doc["TLS.expire"]), doc["TLS.sig"]
            if doc.get("TLS.ver") != "2.0":
                raise ValueError("TLS.ver")
        except (ValueError, KeyError, TypeError):
            return 200, _fail(70003, "UserSig invalid"), {}
        if ident != q.get("identifier"):
            return 200, _fail(70013, "identifier does not match the UserSig's identifier"), {}
        if str(appid) != self.sdkappid:
            return 200, _fail(70014, "sdkappid does not match the UserSig's sdkappid"), {}
        if not hmac.compare_digest(str(sig), _hmac(self.secret_key, ident, appid, t, expire)):
            return 200, _fail(70009, "UserSig verification failed"), {}
        if t + expire < time.time():
            return 200, _fail(70001, "UserSig expired"), {}
        if t <= self.revoked_until:
            return 200, _fail(70052, "UserSig invalidated"), {}
        if ident != self.identifier:
            return 200, _fail(90009, "The request requires app admin permissions"), {}
        return None

    def get_attr_name(self, req):
        if (refused := self._auth(req)) is not None:
            return refused
        if req.json != {}:
            return 200, _fail(90001, "body must be {}"), {}
        return 200, {**_ok(), "AttrNames": {str(i): n for i, n in enumerate(self.attr_names)}}, {}

    def get_attr(self, req):
        if (refused := self._auth(req)) is not None:
            return refused
        body = req.json
        accounts = body.get("To_Account") if isinstance(body, dict) else None
        if not isinstance(accounts, list) or not all(isinstance(a, str) for a in accounts):
            return 200, _fail(90001, "To_Account must be a list of strings"), {}
        if len(accounts) > MAX_USERS:
            return 200, _fail(90018, "the number of requested accounts exceeds the limit"), {}
        with self.lock:
            users = [{"To_Account": a, "Attrs": dict(self.attrs.get(a, {}))} for a in accounts]
        return 200, {**_ok(), "UserAttrs": users}, {}

    def _user_attrs(self, req):
        """(the body's UserAttrs, None), or (None, the answer Tencent gives a request it refuses
        as a whole): the same for im_set_attr and im_remove_attr."""
        if (refused := self._auth(req)) is not None:
            return None, refused
        body = req.json
        users = body.get("UserAttrs") if isinstance(body, dict) else None
        if not isinstance(users, list) or not users:
            return None, (200, _fail(90001, "UserAttrs must be a non-empty list"), {})
        if len(users) > MAX_USERS:
            return None, (200, _fail(90018, "the number of requested accounts exceeds the limit"), {})
        return users, None

    def set_attr(self, req):
        users, refused = self._user_attrs(req)
        if refused is not None:
            return refused
        for u in users:
            if not isinstance(u, dict) or not isinstance(u.get("To_Account"), str) or not u["To_Account"] \
                    or not isinstance(u.get("Attrs"), dict):
                return 200, _fail(90001, "each entry needs To_Account (string) and Attrs (object)"), {}
            for name, value in u["Attrs"].items():
                if name not in self.attr_names:
                    return 200, _fail(90033, f"invalid attribute: {name}"), {}
                if not isinstance(value, str):
                    return 200, _fail(90001, f"attribute {name}: value must be a string"), {}
                if len(value.encode()) > MAX_VALUE_BYTES:
                    return 200, _fail(90033, f"invalid attribute: value of {name} exceeds {MAX_VALUE_BYTES} bytes"), {}
        errors = []
        with self.lock:
            for u in users:
                if self.accounts is not None and u["To_Account"] not in self.accounts:
                    errors.append({"To_Account": u["To_Account"], "ErrorCode": 70107,
                                   "ErrorInfo": "account does not exist"})
                    continue
                self.attrs.setdefault(u["To_Account"], {}).update(u["Attrs"])
        return 200, {**_ok(), **({"ErrorList": errors} if errors else {})}, {}

    def remove_attr(self, req):
        users, refused = self._user_attrs(req)
        if refused is not None:
            return refused
        for u in users:
            if not isinstance(u, dict) or not isinstance(u.get("To_Account"), str) or not u["To_Account"] \
                    or not isinstance(u.get("Attrs"), list) or not all(isinstance(n, str) for n in u["Attrs"]):
                return 200, _fail(90001, "each entry needs To_Account (string) and Attrs (a list of names)"), {}
            for name in u["Attrs"]:
                if name not in self.attr_names:
                    return 200, _fail(90033, f"invalid attribute: {name}"), {}
        errors = []
        with self.lock:
            for u in users:
                if self.accounts is not None and u["To_Account"] not in self.accounts:
                    errors.append({"To_Account": u["To_Account"], "ErrorCode": 70107,
                                   "ErrorInfo": "account does not exist"})
                    continue
                held = self.attrs.get(u["To_Account"], {})
                for name in u["Attrs"]:
                    held.pop(name, None)
        return 200, {**_ok(), **({"ErrorList": errors} if errors else {})}, {}


def _ok() -> dict[str, Any]:
    return {"ActionStatus": "OK", "ErrorInfo": "", "ErrorCode": 0}


def _fail(code: int, info: str) -> dict[str, Any]:
    return {"ActionStatus": "FAIL", "ErrorInfo": info, "ErrorCode": code}


PORT = 8604  # where `usersync emulators` serves it


def emulator(specs) -> Emulator:
    """An emulator with the attributes these syncs map registered, accepting their credentials."""
    names = list(dict.fromkeys(a.attribute for s in specs for a in s.mapping))[:MAX_NAMES]
    kw: dict[str, Any] = {}
    for s in specs:
        st = s.vendor.settings
        kw = {"sdkappid": st.get("sdkappid", "1400000000"), "identifier": st.get("identifier", "administrator"),
              "secret_key": s.vendor.credentials.get("secret_key", "demo-secret-key")}
    return Emulator(attr_names=names, **kw)
