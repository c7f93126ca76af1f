"""The one table of vendor test cases: how each vendor (and each MoEngage API) is configured
over the users table of ``warehouse``, what it should then hold, and the vendor's own words
for "rejected", "try again" and "slow down" (EngageLab documents no internal-error or
throttling code: its docs retry only HTTP 5xx, its throttle is a bare 429; MoEngage has no
codes beyond the HTTP status). The contract test (``test_vendor_contract.py``), the fault
matrix (``fault_harness``) and the crash worlds (``crash_harness``) all read it; each
vendor's module here holds that vendor's test world (its mapping, secrets, sync builder and
expected state), which the vendor's own test file also uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from connector.vendors.dfinery import settings as dfinery_api
from connector.vendors.jiguang import settings as jiguang_api
from connector.vendors.tencent_im import settings as tencent_api
from vendor_cases import dfinery, engagelab, jiguang, moengage, tencent_im


@dataclasses.dataclass(frozen=True)
class VendorCase:
    name: str  # the case's id: a vendor, or a vendor and its API
    vendor: str  # the vendor type
    sync: Callable[..., dict]  # base URL (and overrides) -> the sync's YAML, secrets as ${ENV}
    env: dict[str, str]  # the secrets: environment variable -> value
    expected: Callable[[dict], dict]  # warehouse row -> what the vendor holds, written out by hand
    reject: tuple[Any, str] | None  # the vendor's code for "this user's payload is refused" (an emulator
    # `code` fault) and the failure's message as the client records it; None: no per-user rejection
    retry: Any  # its code for "internal error, try again" (nothing applied)
    throttle: Any  # its code for "slow down" (None: it documents none, a bare HTTP 429)
    unmapped: str = "note"  # a users column the sync does not map
    users: int = 30  # a world's size: enough users for several requests
    first_points: Callable[[int], int] = lambda i: i * 10  # the users' points (an increase from 0 sends nothing)

    @property
    def identity_column(self) -> str:
        return next(iter(self.sync("")["identity"].values()))

    def key(self, row: dict) -> str:
        """The user's key, as the emulator's state names it (text)."""
        return str(row[self.identity_column])


def match(key: str) -> str:
    """A substring of exactly the request bodies that carry the user ``key`` (a number is a JSON number)."""
    return f'"{key}"' if not key.isdigit() else f": {key},"


def _bulk(url: str, **over: Any) -> dict:
    return moengage.moengage_sync(url, api="bulk", **{"name": "moengage_bulk", **over})


_moengage_env = {"TEST_MOENGAGE_KEY": moengage.KEY}
CASES = {c.name: c for c in (
    VendorCase("dfinery", "dfinery", dfinery.dfinery_sync, {"TEST_DFINERY_TOKEN": dfinery.TOKEN},
               dfinery.expected_profile, reject=("40001", "injected error"),
               retry=min(dfinery_api.RETRYABLE), throttle=min(dfinery_api.THROTTLED)),
    VendorCase("engagelab", "engagelab", engagelab.el_sync,
               {"TEST_EL_KEY": engagelab.KEY, "TEST_EL_SECRET": engagelab.SECRET}, engagelab.expected,
               reject=(55102, "invalid user attributes"), retry=500, throttle=None,
               unmapped="user_id", first_points=lambda i: i * 10 + 5),
    VendorCase("jiguang", "jiguang", jiguang.jiguang_sync, {"TEST_JIGUANG_SECRET": jiguang.SECRET},
               jiguang.expected, reject=(40002, "invalid business parameter: invalid business parameter"),
               retry=min(jiguang_api.RETRYABLE), throttle=min(jiguang_api.THROTTLED)),
    VendorCase("tencent_im", "tencent_im", tencent_im.tencent_sync, {"TEST_TENCENT_KEY": tencent_im.KEY},
               tencent_im.expected, reject=(90033, "injected error"),
               retry=min(tencent_api.RETRYABLE), throttle=min(tencent_api.THROTTLED),
               unmapped="points", users=300),  # 100 users a request: several requests
    VendorCase("moengage", "moengage", moengage.moengage_sync, _moengage_env, moengage.expected,
               reject=(409, "Conflict: injected error"), retry=500, throttle=429, unmapped="points"),
    VendorCase("moengage_bulk", "moengage", _bulk, _moengage_env, moengage.expected,
               reject=None, retry=500, throttle=429, unmapped="points"),  # bulk answers 200 whatever it drops
)}
