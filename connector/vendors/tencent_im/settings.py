"""Tencent Cloud Chat (IM): what its docs fix (``seeds/tencent-im-set-user-attributes.txt``,
VENDORS.md §3) — hosts, paths, limits, error codes and the attribute types (all strings).
See README.md beside this file."""

from __future__ import annotations

import dataclasses
from typing import Any

from connector.vendors.base import Limit
from connector.wire import Coercer

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


# -- wire types: Tencent stores every attribute as a string of at most 50 bytes -----------
@dataclasses.dataclass(frozen=True)
class Text(Coercer):
    """Coerce to ``kind`` (so a bad number still rejects its user), then write it as text.

    The snapshot then holds exactly the string Tencent holds, and the 50-byte limit is
    checked on that string while planning: an oversize value sets aside its user alone.
    """

    def __call__(self, s: Any, label: str) -> tuple[Any, Any]:
        from connector import coerce  # pandas, only once a column is coerced

        return coerce.as_text(self, *super().__call__(s, label), label)


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
