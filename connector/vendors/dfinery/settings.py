"""DFINERY: what its docs fix (``seeds/dfinery-user-profile.txt``, VENDORS.md §5) — endpoints, limits,
error codes and attribute types. The rules around them: README.md beside this file."""

from __future__ import annotations

from connector.vendors.base import Limit
from connector.wire import Coercer

BASE_URL = "https://openapi.dfinery.ai"
PATH = "/api/v1/user-profile"
LIMIT = Limit(10_000, 60.0)  # profile API: 10,000 requests a minute [doc]
IDENTITY_FIELDS = ("external_id", "phone_no", "email", "kakao_user_id", "line_user_id")
DATETIME = "%Y-%m-%dT%H:%M:%S.%3fZ"  # yyyy-MM-dd'T'HH:mm:ss.SSSZ, UTC
TYPES = {
    "string": Coercer("string"),
    "long": Coercer("long"),
    "double": Coercer("double"),
    "boolean": Coercer("boolean"),
    "datetime": Coercer("datetime", fmt=DATETIME),
    "date": Coercer("date", fmt="%Y-%m-%d"),
    "array": Coercer("list", item="string"),
    "array<string>": Coercer("list", item="string"),
    "array<long>": Coercer("list", item="long"),
    "array<double>": Coercer("list", item="double"),
}
OK = "20000"
PERMANENT = {"40000": "bad request", "40001": "bad request"}  # reject the user
STOP = {"40101": "invalid service id", "40201": "invalid access token"}  # nothing can succeed
THROTTLED = {"40401"}  # usage limit: wait for X-Rate-Limit-Reset, retry
TOO_MANY = {"40402", "40403"}  # too many in one request: split
RETRYABLE = {"50000"}
