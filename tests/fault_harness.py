"""The fault matrix: every injectable fault class against every vendor, end to end.

Shared by ``tests/test_faults.py`` and ``scripts/reliability.py`` (which prints the figures).
Each case is a real warehouse (SQLite), the real engine and the vendor's emulator over HTTP.
One user (A) meets the fault once — it must be delivered by the retry in the same run —
and another (B, in another request) meets it on every attempt of the run — it must be
recorded as failed with its reason, then delivered by the next run. Afterwards every
user's attributes at the vendor equal the snapshot of what was acknowledged (so nothing
was applied twice), and nobody is missing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from connector import config, engine, state, vendors

from connector.vendors import emulator
from vendor_cases import CASES, match as match_key
from warehouse import make_users, user_row, write_config

MAX_ATTEMPTS = 2
READ_TIMEOUT = 1.0  # a `timeout` fault outlasts it, a `slow` one does not
THROTTLE_RESET = 1.6  # seconds the vendor's throttle answer asks for (beyond the client's 1 s default)

# What the fault worlds map of the users table, per vendor: idempotent attributes only (a lost
# answer must leave nothing in doubt), but EngageLab maps an increase too, so a change is two
# requests (parts). How each vendor is configured is the vendor case's (vendor_cases.CASES).
MAPPINGS: dict[str, list[tuple[str, ...]]] = {
    "dfinery": [("plan", "membership", "String"), ("ltv", "ltv", "Double"), ("orders", "orders", "Long"),
                ("subscribed", "subscribed", "Boolean"), ("signup_at", "signup_at", "Datetime"),
                ("interests", "interests", "Array")],
    "engagelab": [("plan", "membership", "STRING"), ("ltv", "ltv", "NUMBER"),
                  ("points", "points", "NUMBER", "increase"), ("subscribed", "subscribed", "BOOL"),
                  ("signup_at", "signup_at", "DATETIME")],
    "jiguang": [("plan", "membership", "String", "overwrite"), ("ltv", "ltv", "Number", "overwrite"),
                ("orders", "orders", "Long", "overwrite"), ("subscribed", "subscribed", "Boolean", "overwrite"),
                ("signup_at", "signup_at", "Datetime", "overwrite")],
    "tencent_im": [("plan", "membership", "String"), ("ltv", "ltv", "Double"), ("orders", "orders", "Long"),
                   ("subscribed", "subscribed", "Boolean"), ("signup_at", "signup_at", "Datetime")],
    "moengage": [("plan", "membership", "string"), ("ltv", "ltv", "number"), ("orders", "orders", "long"),
                 ("subscribed", "subscribed", "boolean"), ("signup_at", "signup_at", "datetime"),
                 ("interests", "interests", "array")],
}


def _vendor(vendor: str) -> dict[str, Any]:
    """A vendor's identity, settings and credentials (name -> secret value), from its case."""
    case = CASES[vendor]
    sync = case.sync("")
    credentials = {name: case.env[ref.strip("${}")] for name, ref in sync["vendor"]["credentials"].items()}
    return {"identity": sync["identity"], "settings": sync["vendor"].get("settings", {}), "credentials": credentials,
            "mapping": MAPPINGS[vendor]}


VENDORS: dict[str, dict[str, Any]] = {vendor: _vendor(vendor) for vendor in MAPPINGS}

# The vendor's own words for "internal error" and "slow down" (its case's)
INTERNAL_ERROR = {vendor: CASES[vendor].retry for vendor in MAPPINGS}
THROTTLE_CODE = {vendor: CASES[vendor].throttle for vendor in MAPPINGS}

FAULTS = ("http_5xx", "internal_error", "throttle_code", "throttle_429_reset", "timeout", "connection_reset",
          "malformed_json", "slow", "lost_answer", "partial_success")
# Partial success needs a request of several users or several parts. DFINERY and Jiguang
# send one user, one request: nothing can be half-applied. MoEngage's bulk API answers
# 200 whatever it drops: its partial failures are invisible (see moengage_bulk_drop_is_invisible).
NOT_APPLICABLE = {
    ("engagelab", "throttle_code"): "EngageLab documents no throttling code (a bare HTTP 429: see throttle_429_reset)",
    ("dfinery", "partial_success"): "one user a request: nothing can be half-applied",
    ("jiguang", "partial_success"): "one user a request: nothing can be half-applied",
    ("moengage", "partial_success"): "bulk API answers 200 for dropped elements: invisible to any client",
}


def secret_env(vendor: str) -> dict[str, str]:
    """Environment variable -> secret value for a vendor's credentials."""
    return dict(CASES[vendor].env)


def sync_dict(vendor: str, base_url: str, **vendor_over: Any) -> dict[str, Any]:
    """The vendor case's sync, named ``<vendor>_users``, mapping the fault world's attributes."""
    mapping = [{"column": m[0], "attribute": m[1], "type": m[2], **({"rule": m[3]} if len(m) > 3 else {})}
               for m in MAPPINGS[vendor]]
    sync = CASES[vendor].sync(base_url, name=f"{vendor}_users", mapping=mapping)
    sync["vendor"] = {**sync["vendor"], "backoff": 0.01, "max_attempts": MAX_ATTEMPTS, "timeout": [2.0, READ_TIMEOUT],
                      **vendor_over}
    return sync


def users_for(vendor: str) -> tuple[int, int, int]:
    """(users, index of A, index of B): A and B always travel in different requests."""
    per_request = vendors.get(vendor).max_users
    return (per_request + 6, 1, per_request + 2) if per_request > 1 else (8, 1, 5)


@dataclasses.dataclass
class Case:
    """One vendor's sync, set up in a directory: warehouse, config, emulator."""

    vendor: str
    cfg_path: Path
    url: str
    running: emulator.Running
    keys: list[str]  # user keys (the sync's identity column values, as text)

    @property
    def emu(self):
        return self.running.emulator

    @property
    def name(self) -> str:
        return f"{self.vendor}_users"

    def run(self, **kw: Any) -> engine.Summary:
        cfg, _ = config.load(self.cfg_path)
        return engine.run(cfg, self.name, engine.Options(**kw))

    def rows(self, table: sa.Table) -> list[dict[str, Any]]:
        eng = state.make_engine(self.url)
        with eng.connect() as c:
            rows = [dict(r) for r in c.execute(sa.select(table)).mappings()]
        eng.dispose()
        return rows

    def held(self) -> dict[str, dict[str, Any]]:
        """What the vendor holds, by user key, lists order-free."""
        return {str(k): {a: sorted(v) if isinstance(v, list) else v for a, v in attrs.items()}
                for k, attrs in self.emu.state().items()}

    def check(self) -> dict[str, Any]:
        """Every user is delivered exactly as acknowledged, or failed with a reason.

        Returns {"delivered": keys, "failed": {key: (class, code, message)}, "lost": keys,
        "wrong": keys whose vendor attributes differ from the acknowledged snapshot}.
        """
        held = self.held()
        snap = {r["user_key"]: json.loads(r["payload"]) for r in self.rows(state.snapshot)}
        failed = {r["user_key"]: (r["error_class"], r["code"], r["message"]) for r in self.rows(state.failures)}
        delivered = [k for k in self.keys if k in held and k not in failed]
        wrong = [k for k in delivered
                 if held[k] != {a: sorted(v) if isinstance(v, list) else v for a, v in snap.get(k, {}).items()
                                if v is not None}]
        lost = [k for k in self.keys if k not in delivered and not (k in failed and failed[k][2])]
        return {"delivered": delivered, "failed": failed, "lost": lost, "wrong": wrong}


def setup(vendor: str, directory: Path, env: Callable[[str, str], None], **vendor_over: Any) -> Case:
    """A fresh SQLite warehouse of users, the vendor's emulator accepting the sync, the config."""
    for name, value in secret_env(vendor).items():
        env(name, value)
    n, _, _ = users_for(vendor)
    url = f"sqlite:///{directory / 'warehouse.db'}"
    rows = [user_row(i, points=i * 10 + 5) for i in range(n)]
    make_users(url, rows).dispose()
    cfg_path = write_config(directory / "syncs.yaml", url, [sync_dict(vendor, "http://127.0.0.1:1", **vendor_over)])
    cfg, _ = config.load(cfg_path)
    running = emulator.Running(vendors.emulator_module(vendor).emulator(cfg.syncs))
    write_config(cfg_path, url, [sync_dict(vendor, running.url, **vendor_over)])
    column = next(iter(VENDORS[vendor]["identity"].values()))
    return Case(vendor, cfg_path, url, running, [str(r[column]) for r in rows])


def match(case: Case, index: int) -> str:
    """A substring of exactly the requests that carry user ``index``."""
    return match_key(case.keys[index])


def inject(case: Case, fault: str) -> None:
    """Queue ``fault``: once for user A, on every attempt of this run for user B."""
    v = case.vendor
    _, a, b = users_for(v)
    kinds = {
        "http_5xx": ("status", {"status": 503, "body": "upstream connect error"}),
        "internal_error": ("code", {"code": INTERNAL_ERROR[v]}),
        "throttle_code": ("code", {"code": THROTTLE_CODE[v]}),
        "throttle_429_reset": ("throttle", {"delay": THROTTLE_RESET}),
        "timeout": ("timeout", {"delay": READ_TIMEOUT + 0.5}),
        "connection_reset": ("reset", {}),
        "malformed_json": ("malformed", {}),
        "slow": ("slow", {"delay": READ_TIMEOUT / 3}),
        "lost_answer": ("lost", {}),
    }
    kind, kw = kinds[fault]
    case.emu.add_fault(kind, match=match(case, a), times=1, **kw)
    case.emu.add_fault(kind, match=match(case, b), times=MAX_ATTEMPTS, **kw)


def inject_partial(case: Case) -> None:
    """Partial success: Tencent's ErrorList (B's account does not exist yet); EngageLab's
    parts (B's second request, the increase, fails while its set was acknowledged)."""
    _, a, b = users_for(case.vendor)
    if case.vendor == "tencent_im":
        case.emu.accounts = set(case.keys) - {case.keys[b]}
    elif case.vendor == "engagelab":
        for who, times in ((a, 1), (b, MAX_ATTEMPTS)):  # B's increase: its attempts 2 and 3
            case.emu.add_fault("code", code=500, times=times, match=f'{match(case, who)} "type": "increase"')
    else:
        raise ValueError(f"no partial success for {case.vendor}")


def heal(case: Case, fault: str) -> None:
    """What the next run finds: the faults gone, B's account created."""
    case.emu.faults.clear()
    if fault == "partial_success" and case.vendor == "tencent_im":
        case.emu.accounts = None


def retry_gap(case: Case, index: int) -> float | None:
    """Seconds between the first two requests carrying user ``index``."""
    m = match(case, index)
    times = [r["at"] for r in case.emu.log if m in json.dumps(r["body"])]
    return times[1] - times[0] if len(times) > 1 else None


@dataclasses.dataclass
class Outcome:
    vendor: str
    fault: str
    users: int
    a: str  # the user meeting the fault once
    b: str  # the user meeting it on every attempt of the first run
    first: dict[str, Any]  # check() after the faulty run
    second: dict[str, Any]  # check() after the next, healthy run
    statuses: tuple[str, str]
    a_attempts: int | None
    b_failure: tuple | None
    gap: float | None  # seconds before A's retry
    seconds: float

    @property
    def lost(self) -> int:
        return len(self.first["lost"]) + len(self.second["lost"]) + len(self.first["wrong"]) + len(self.second["wrong"])

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and not self.second["failed"] and "failed" not in self.statuses
                and len(self.second["delivered"]) == self.users)


# The parts of one change share its batch's attempts (connector/push.py): EngageLab's second
# part is retried once in the run only with a third attempt.
OVERRIDES = {("engagelab", "partial_success"): {"max_attempts": MAX_ATTEMPTS + 1}}


def run_case(vendor: str, fault: str, directory: Path, env: Callable[[str, str], None]) -> Outcome:
    """One cell of the matrix: faulty run, then a healthy one."""
    t0 = time.monotonic()
    case = setup(vendor, directory, env, **OVERRIDES.get((vendor, fault), {}))
    try:
        _, a, b = users_for(vendor)
        if fault == "partial_success":
            inject_partial(case)
        else:
            inject(case, fault)
        s1 = case.run()
        first = case.check()
        first_of_a = case.keys[a - a % vendors.get(vendor).max_users]  # A's request starts with this user
        a_batches = [x for x in case.rows(state.batches) if x["first_user"] == first_of_a]
        gap = retry_gap(case, a)
        heal(case, fault)
        s2 = case.run()
        second = case.check()
        return Outcome(vendor, fault, len(case.keys), case.keys[a], case.keys[b], first, second, (s1.status, s2.status),
                       max((x["attempts"] for x in a_batches), default=None), first["failed"].get(case.keys[b]),
                       gap, time.monotonic() - t0)
    finally:
        case.running.stop()


def cells() -> list[tuple[str, str]]:
    return [(v, f) for v in VENDORS for f in FAULTS if (v, f) not in NOT_APPLICABLE]
