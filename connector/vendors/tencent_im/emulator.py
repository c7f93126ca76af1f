"""The Tencent Cloud Chat (IM) emulator: the same rules as the client's, enforced by a strict stand-in on
loopback (for the tests, the demo, the bench and ``usersync emulators``; never a production run)."""

from __future__ import annotations

import hmac
import time
from typing import Any

from connector.vendors.emulator import Emulator as _EmulatorBase
from connector.vendors.tencent_im.settings import (
    GET_ATTR, GET_ATTR_NAME, LIMIT, MAX_NAMES, MAX_USERS, MAX_VALUE_BYTES, REMOVE_ATTR, SET_ATTR)
from connector.vendors.tencent_im.usersig import read_usersig, signature

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
    stores = ("attrs",)

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
        if not hmac.compare_digest(str(sig), signature(self.secret_key, ident, appid, t, expire)):
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
        return self._each_account(users, lambda account, attrs: self.attrs.setdefault(account, {}).update(attrs))

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
        def remove(account, names):
            held = self.attrs.get(account, {})
            for name in names:
                held.pop(name, None)

        return self._each_account(users, remove)

    def _each_account(self, users, apply):
        """Apply each entry of a request that passed its checks (``apply(account, Attrs)``); an
        account the app does not have is an ErrorList entry, the rest are applied (im_set_attr and
        im_remove_attr alike)."""
        errors = []
        with self.lock:
            for u in users:
                if self.accounts is not None and u["To_Account"] not in self.accounts:
                    errors.append({"To_Account": u["To_Account"], "ErrorCode": 70107,
                                   "ErrorInfo": "account does not exist"})
                    continue
                apply(u["To_Account"], u["Attrs"])
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
