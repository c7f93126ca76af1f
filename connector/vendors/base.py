"""The contract every vendor module fulfils.

A vendor's folder holds its whole behaviour in one place: its settings (types, update
rules, limits, error codes), the client (how a batch of changes becomes HTTP requests and
how a response becomes a verdict per user: this contract) and the emulator (the same
rules, enforced by a local HTTP server; see ``connector.vendors.emulator``).

The engine only ever talks to a vendor through :class:`Vendor`:

1. ``validate(spec)`` — before anything runs: names, types, rules (``ConfigError``).
2. ``batches(changes)`` — group planned changes into requests, at most
   ``max_users`` users each.
3. ``request(batch)`` — the HTTP request for one batch.
4. ``verdict(batch, response)`` — read the vendor's answer: delivered, retry, reject
   (per user), split, or stop the run (auth/config failures).
"""

from __future__ import annotations

import dataclasses
import email.utils
import enum
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import requests

from connector.wire import Coercer


class Op(str, enum.Enum):
    """What one attribute change asks the vendor to do."""

    SET = "set"  # overwrite with the new value (idempotent)
    INCREASE = "increase"  # add a number (send new - last delivered)
    APPEND = "append"  # add list items (send the new items only)
    REMOVE = "remove"  # remove list items
    UNSET = "unset"  # delete the attribute
    # set the value, sent only while the attribute was never delivered: not idempotent (sent
    # again after its first value landed, it could overwrite it), so its request gets an
    # intent and a crash settles it at most once, like an increment
    ONCE = "once"

    def __init__(self, value: str):
        # plain attributes, not properties: they are asked for every op of every request
        self.idempotent = value in ("set", "unset")
        self.sets = value in ("set", "once")  # the value goes on the wire as an attribute's value


# Update rules a sync may name in its mapping, and what each makes of a change.
# "once" is a ONCE op (a set) that is sent only while the attribute was never delivered.
RULES = {"set", "increase", "append", "list", "once"}


@dataclasses.dataclass(frozen=True)
class Change:
    """One user's planned delta: the ops to send and the snapshot once delivered."""

    key: str
    identity: Mapping[str, Any]  # vendor identity field -> value
    ops: tuple[tuple[str, Op, Any], ...]  # (attribute, op, value)

    @property
    def idempotent(self) -> bool:
        return all(op.idempotent for _, op, _ in self.ops)


@dataclasses.dataclass
class Request:
    """An HTTP request for a batch of users (``keys``).

    ``attributes`` names what this request carries when a batch needs several requests
    (a vendor whose operation type is per call): ``Vendor.request`` then returns a list,
    idempotent parts first. The push sends the parts in order, stops at the first that
    fails, and the snapshot keeps exactly the attributes of the parts acknowledged.
    """

    method: str
    url: str
    keys: tuple[str, ...]
    json: Any = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    attributes: tuple[str, ...] | None = None  # None: every attribute of the batch


# How a vendor sends a request of its own before the first batch (``Vendor.prepare``):
# ``call(build)`` sends ``build()`` through the push's transport, paced by its limiter and
# retried by its policy as a batch's request is (built afresh for each attempt), and gives
# the last verdict (``Vendor.verdict``) with its response (None when none came).
Call = Callable[[Callable[[], "Request"]], tuple["Verdict", "requests.Response | None"]]


class Kind(str, enum.Enum):
    DELIVERED = "delivered"
    REJECTED = "rejected"  # permanent for this payload: recorded, retried next run
    RETRY = "retry"  # transient: retried now with backoff, then next run
    SPLIT = "split"  # batch too large: halve and resend
    STOP = "stop"  # auth / account failure: no further request can succeed


@dataclasses.dataclass
class Verdict:
    """The vendor's answer to one request.

    ``kind`` is the request's outcome; ``per_user`` overrides it for single users
    (partial success). ``wait`` is how long the vendor asked us to back off.
    """

    kind: Kind
    code: str | None = None
    message: str = ""
    wait: float | None = None
    per_user: dict[str, tuple[Kind, str | None, str]] = dataclasses.field(default_factory=dict)
    # True when the vendor may have applied the request although we saw no success
    # (timeout after sending, connection reset mid-response). Non-idempotent ops are
    # then never retried blindly.
    ambiguous: bool = False

    def outcome(self, key: str) -> tuple[Kind, str | None, str]:
        return self.per_user.get(key, (self.kind, self.code, self.message))


@dataclasses.dataclass(frozen=True)
class Limit:
    """A vendor's rate limit as it counts it: at most ``count`` ``unit`` in any ``window`` seconds.

    Declared once per vendor and API, as documented (no margin: the rate limiter applies the
    one margin); read by the client, the rate limiter, the emulator's window and the bench.
    ``unit`` is ``requests``, or ``users`` when the vendor counts the users a request carries.
    """

    count: float
    window: float
    unit: str = "requests"

    def __post_init__(self):
        if self.unit not in ("requests", "users") or self.count <= 0 or self.window <= 0:
            raise ValueError(f"not a rate limit: {self}")

    @property
    def per_second(self) -> float:
        return self.count / self.window


class Vendor:
    """Base class for vendor clients. Subclasses set the class attributes."""

    name: ClassVar[str]
    types: ClassVar[Mapping[str, Coercer]]  # registered type name (lower case) -> coercer
    rules: ClassVar[Mapping[str, str]] = {"set": "set"}  # config rule name -> engine rule
    null_policies: ClassVar[frozenset[str]] = frozenset({"skip"})
    max_users: ClassVar[int] = 1  # users per request
    limit: ClassVar[Limit]  # the documented rate limit (of the default API: see limit_for)
    default_base_url: ClassVar[str]
    identity_fields: ClassVar[tuple[str, ...]]  # allowed identity fields, first = default
    credentials: ClassVar[tuple[str, ...]]  # credential names (all secret)
    settings: ClassVar[tuple[str, ...]] = ()  # non-secret connection settings
    required_settings: ClassVar[tuple[str, ...]] = ()  # must be set in the YAML, unless a conn_id gives them

    def __init__(self, base_url: str | None, credentials: Mapping[str, str], settings: Mapping[str, Any]):
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.creds = dict(credentials)
        self.settings_ = dict(settings)
        self.limit = self.limit_for(self.settings_)

    @classmethod
    def limit_for(cls, settings: Mapping[str, Any]) -> Limit:
        """The documented limit of the API these settings choose (a vendor with several overrides this)."""
        return cls.limit

    # How an Airflow connection's fields fill credentials and settings:
    # credential or setting name -> "login" | "password" | "host" | "extra.<key>".
    conn_fields: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_connection(cls, conn: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any], str | None]:
        """(credentials, settings, base_url) from a connection dict (see connector.connections)."""
        creds, settings = {}, {}
        for name, source in cls.conn_fields.items():
            if source.startswith("extra."):
                value = (conn.get("extra") or {}).get(source[6:])
            else:
                value = conn.get(source)
            if value in (None, ""):
                continue
            (creds if name in cls.credentials else settings)[name] = value
        extra = conn.get("extra") or {}
        return creds, settings, extra.get("base_url") or None

    # -- before the run -------------------------------------------------------------
    @classmethod
    def validate(cls, spec: Any) -> Iterable[tuple[str, str]]:
        """Vendor-specific checks of a sync spec: yields (field, message)."""
        return ()

    def prepare(self, call: Call, spec: Any) -> None:
        """Called once before the first batch (e.g. read registered names); ``call`` sends a
        request of the vendor's own (see :data:`Call`)."""

    # -- per batch ------------------------------------------------------------------
    def batches(self, changes: list[Change]) -> Iterator[list[Change]]:
        for i in range(0, len(changes), self.max_users):
            yield changes[i : i + self.max_users]

    def request(self, batch: list[Change]) -> Request | list[Request]:
        raise NotImplementedError

    def verdict(self, request: Request, response: requests.Response) -> Verdict:
        raise NotImplementedError

    # Why the vendor can never take an empty value ("" or []), as its docs say (None: it can).
    # An empty text is then set aside; an empty list means NULL, and the NULL policy decides.
    empty_refused: ClassVar[str | None] = None

    @classmethod
    def invalid(cls, change: Change) -> str | None:
        """Reason a user must not be sent at all, e.g. an identity the vendor cannot take
        (checked while planning)."""
        return None

    @classmethod
    def refuse(cls, coercer: Coercer, values: Any, errors: Any, label: str) -> tuple[Any, Any]:
        """One attribute's coerced (values, errors) with the values the vendor documents it can
        never accept turned into errors (so set aside while planning, never sent): here empty
        ones, where ``empty_refused``. A vendor with other such rules extends this."""
        if cls.empty_refused is None:
            return values, errors
        text = values.to_numpy(dtype=object, na_value=None)
        if coercer.kind == "list":  # no items: as NULL
            return values.mask(text == "[]"), errors
        empty = text == ""
        if empty.any():
            errors = errors.copy()
            errors[empty] = f"{label}: empty value ({cls.empty_refused})"
            values = values.mask(empty)
        return values, errors


def transport_verdict(exc: Exception) -> Verdict:
    """A request that got no readable answer: retry; ambiguous if it may have arrived.

    A certificate that fails verification stops the run: nothing was sent, and no other
    request to that host can fare better.
    """
    message = without_query(str(exc))[:300]
    if isinstance(exc, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in message:
        return Verdict(Kind.STOP, code="SSLError", message=f"TLS certificate not trusted: {message}")
    not_sent = isinstance(exc, (requests.ConnectTimeout, requests.exceptions.SSLError)) or (
        isinstance(exc, requests.ConnectionError) and "NewConnectionError" in repr(exc)
    )
    return Verdict(Kind.RETRY, code=type(exc).__name__, message=message, ambiguous=not not_sent)


_QUERY = re.compile(r"\?[^\s'\"]+")


def without_query(text: str) -> str:
    """``text`` with URL query strings cut (a vendor may carry credentials there)."""
    return _QUERY.sub("?…", text)


def configured_limit(vendor_cls: type[Vendor], vendor_cfg: Any) -> Limit:
    """The limit that applies to a sync as configured: the documented limit of the API its
    settings choose, or ``vendor.rate_limit`` (per second, in that limit's unit) over the
    vendor's window. The rate limiter paces under either by its one margin."""
    limit = vendor_cls.limit_for(vendor_cfg.settings)
    if vendor_cfg.rate_limit:
        return dataclasses.replace(limit, count=vendor_cfg.rate_limit * limit.window)
    return limit


# Epoch times from 2001 on: no vendor asks for a wait of 31 years (1e9 s), and 1e11 seconds
# is the year 5138, so anything above it is milliseconds.
_EPOCH_SECONDS, _EPOCH_MS = 1e9, 1e11


def wait_seconds(response: requests.Response, *headers: str, cap: float) -> float | None:
    """How long the vendor asked us to wait, as seconds from now: the first of ``headers``
    present (default ``Retry-After``), in whichever form the vendor writes it — seconds to wait,
    an epoch time in seconds or in milliseconds, or an HTTP date. Never more than ``cap``, the
    vendor's window: a limit of L per T seconds never needs a longer wait, and a misread unit
    must not stall the run (a DFINERY reset in epoch milliseconds read as seconds is 1.8e12 s)."""
    for name in headers or ("Retry-After",):
        value = response.headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp()
            except (TypeError, ValueError, IndexError):
                return None
        if seconds > _EPOCH_MS:
            seconds = seconds / 1000 - time.time()
        elif seconds > _EPOCH_SECONDS:
            seconds -= time.time()
        return min(max(0.0, seconds), cap)
    return None


def json_body(response: requests.Response) -> dict[str, Any] | None:
    """The response body as a JSON object, or None when it is not one."""
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
