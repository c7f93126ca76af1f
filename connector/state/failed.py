"""``sync_failures``: one row per open failure, kept until it is resolved.

A row is the user's as a whole (``attribute`` :data:`WHOLE`: the vendor or the plan refused
the user; re-read every run until delivered, :func:`failed_identities`) or one attribute's
whose value was set aside while planning (the rest of that user delivered; forgotten once
its source value changes). ``value_hash`` remembers what was set aside, so the same value
seen again is no new failure, and is never sent.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from connector.db import chunked, dumps, now
from connector.state.schema import failures

WHOLE = ""  # the ``attribute`` of a failure of the user as a whole


def record_failures(conn: sa.Connection, sync: str, run_id: int,
                    rows: list[tuple[str, dict[str, Any], str, str | None, str]]) -> None:
    """(key, source identity, error class, code, message) of users failed as a whole — kept
    until delivered (a user's set-aside attributes are kept apart: :func:`set_aside`)."""
    set_aside(conn, sync, run_id, [(k, WHOLE, ident, cls, code, msg, None) for k, ident, cls, code, msg in rows])


def set_aside(conn: sa.Connection, sync: str, run_id: int,
              rows: list[tuple[str, str, dict[str, Any], str, str | None, str, int | None]]) -> None:
    """Write failure rows (key, attribute, source identity, error class, code, message, value
    hash), each replacing that (user, attribute)'s own, its first sight and attempts kept."""
    if not rows:
        return
    f = failures
    prior: dict[tuple[str, str], tuple[int, dt.datetime]] = {}
    for attribute in {r[1] for r in rows}:
        for chunk in chunked([r[0] for r in rows if r[1] == attribute], 500):
            where = (f.c.sync == sync, f.c.attribute == attribute, f.c.user_key.in_(chunk))
            prior.update(((k, attribute), (a, s)) for k, a, s in
                         conn.execute(sa.select(f.c.user_key, f.c.attempts, f.c.first_seen).where(*where)))
            conn.execute(f.delete().where(*where))
    ts = now()
    conn.execute(f.insert(), [
        {"sync": sync, "user_key": k, "attribute": a, "identity": dumps(ident), "run_id": run_id,
         "error_class": cls, "code": code, "message": (msg or "")[:2000], "value_hash": h,
         "attempts": prior.get((k, a), (0, ts))[0] + 1, "first_seen": prior.get((k, a), (0, ts))[1],
         "last_seen": ts}
        for k, a, ident, cls, code, msg, h in rows])


def open_failures(conn: sa.Connection, sync: str, keys: list[str]) -> dict[str, dict[str, tuple[str, int | None]]]:
    """Some users' open failures: key -> {attribute ('' the whole user): (error class, value hash)}."""
    f, out = failures, {}
    for chunk in chunked(keys, 500):
        q = sa.select(f.c.user_key, f.c.attribute, f.c.error_class, f.c.value_hash).where(
            f.c.sync == sync, f.c.user_key.in_(chunk))
        for k, a, cls, h in conn.execute(q):
            out.setdefault(k, {})[a] = (cls, h)
    return out


def clear_failures(conn: sa.Connection, sync: str, keys: list[str], among: set[str] | None = None,
                   attribute: str = WHOLE) -> None:
    """Delete the failure rows of ``keys`` (of the user as a whole, or of one attribute);
    ``among``: the keys known to have one (from :func:`failure_keys`; None: unknown), so that
    the others cost no DELETE. A delivery clears the user's row, never a set-aside attribute's:
    that one goes when the plan finds its value changed."""
    if among is not None:
        keys = [k for k in keys if k in among]
    f = failures
    for chunk in chunked(keys, 500):
        conn.execute(f.delete().where(f.c.sync == sync, f.c.attribute == attribute, f.c.user_key.in_(chunk)))


def clear_unmapped(engine: Engine, sync: str, attributes: list[str]) -> None:
    """Forget set-aside attributes the mapping no longer has."""
    f = failures
    with engine.begin() as c:
        c.execute(f.delete().where(f.c.sync == sync, f.c.attribute != WHOLE, f.c.attribute.notin_(attributes)))


def failure_keys(engine: Engine, sync: str, most: int = 100_000) -> set[str] | None:
    """The keys of a sync's users with a failure row (None: more than ``most`` of them)."""
    with engine.connect() as c:
        keys = c.execute(sa.select(failures.c.user_key).where(failures.c.sync == sync).distinct()
                         .limit(most + 1)).scalars().all()
    return set(keys) if len(keys) <= most else None


def failed_identities(engine: Engine, sync: str) -> list[dict[str, Any]]:
    """Source identities of users whose last attempt failed as a whole: re-read every run.
    (A set-aside attribute is not: its user is read again when the source row changes.)"""
    with engine.connect() as c:
        rows = c.execute(sa.select(failures.c.identity).where(failures.c.sync == sync,
                                                              failures.c.attribute == WHOLE))
        return [ident for ident in (json.loads(i) for (i,) in rows) if ident]


def count_by_class(conn: sa.Connection, sync: str, run_id: int, classes: tuple[str, ...]) -> dict[str, int]:
    """How many of a run's users failed, by error class (among ``classes``)."""
    f = failures
    return dict(conn.execute(sa.select(f.c.error_class, sa.func.count()).where(
        f.c.sync == sync, f.c.run_id == run_id, f.c.error_class.in_(classes)).group_by(f.c.error_class)).all())
