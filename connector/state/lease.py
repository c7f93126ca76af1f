"""``sync_locks``: one row a sync, held by the run that may push it — a lease, with fencing.

A run takes the lock (:func:`acquire_lock`) before it plans, and ``finalize`` releases it. A
holder renews its heartbeat with every fenced commit (:func:`fenced`: the lock row is the
transaction's last statement, so a commit happens only while the run still holds the lock);
a holder whose heartbeat is older than ``lock_timeout`` (or whose process on this machine is
gone) is presumed dead and taken over. :class:`Lease` bounds how long a push acts without
proving it still holds the lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from connector.db import aware, now
from connector.state.schema import locks, runs


class Locked(Exception):
    """Another run of the same sync holds the lock."""


class LeaseLost(Exception):
    """This run's lock was taken over (or lapsed): it may send nothing more and commit nothing more.

    Not a :class:`Locked`: a run that loses its lock mid-push did start, and may have sent
    requests (``requests``, ``delivered``: what its push did before it stopped, when known)."""

    def __init__(self, sync: str, run_id: int, holder: Any = None):
        self.sync, self.run_id, self.holder = sync, run_id, holder
        self.requests: int | None = None
        self.delivered: int | None = None
        by = (f"run {holder['run_id']} ({_shown(holder['owner'])})" if holder else "no run (the lock row is gone)")
        super().__init__(f"sync '{sync}': run {run_id} lost its lock; it is now held by {by}")


# The lease's clock: CLOCK_BOOTTIME counts a system suspend (a laptop lid, a VM paused by its
# host), CLOCK_MONOTONIC on Linux does not; neither jumps with the wall clock.
if hasattr(time, "CLOCK_BOOTTIME"):
    clock = functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)
else:  # pragma: no cover - not Linux
    clock = time.monotonic


def _proc_start(pid: int | str) -> str | None:
    """A Linux process's start time (clock ticks since boot) while it lives; None once it is
    gone or a zombie. With the PID it names one process: a recycled PID starts later."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


@functools.cache
def _process_token() -> str | None:
    """What names this process on this machine: the boot, the PID namespace and the process's
    start time (a PID alone is recycled, and another container may have the same hostname)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    start = _proc_start(os.getpid())
    return f"{boot}/{ns}/{start}" if start else None


def owner(bound: bool = True) -> str:
    """``host:pid``; with ``bound`` (the lock lives and dies with this process: a CLI run), also
    the process's token, so that a run on this host can tell when the holder is gone."""
    token = _process_token() if bound else None
    return f"{socket.gethostname()}:{os.getpid()}" + (f"@{token}" if token else "")


def _shown(owner_: str) -> str:
    return owner_.partition("@")[0]


def _holder_gone(owner_: str) -> bool:
    """True only when the lock's owner is a process of this machine (same boot, same PID
    namespace) that no longer exists; anything else (another host, an Airflow run whose
    tasks come and go, no /proc) is judged by its heartbeat alone."""
    host_pid, _, token = owner_.partition("@")
    mine = _process_token()
    if not token or not mine:
        return False
    host, _, pid = host_pid.rpartition(":")
    boot, ns, start = token.split("/")
    if host != socket.gethostname() or f"{boot}/{ns}" != mine.rpartition("/")[0] or not pid.isdigit():
        return False
    return _proc_start(pid) != start


def acquire_lock(engine: Engine, sync: str, run_id: int, stale_after: float = 600.0, bound: bool = True) -> int | None:
    """Take the sync's lock for a run. Returns the run id of a holder taken over.

    Raises :class:`Locked` when a live run holds it. A holder is presumed dead, and
    replaced, when its heartbeat is older than ``stale_after`` seconds, or at once when it
    was a process of this machine that no longer exists. The takeover is conditional on
    what was judged (the heartbeat still that old, or the row unchanged): a holder that
    renewed its lease meanwhile keeps it. ``bound``: the lock belongs to this process
    (see :func:`owner`).
    """
    ts = now()
    me = owner(bound)
    with engine.begin() as c:
        held = c.execute(sa.select(locks).where(locks.c.sync == sync)).mappings().first()
        if held is None:
            try:
                with c.begin_nested():
                    c.execute(locks.insert().values(sync=sync, run_id=run_id, owner=me, acquired_at=ts, heartbeat_at=ts))
                return None
            except sa.exc.IntegrityError:
                held = c.execute(sa.select(locks).where(locks.c.sync == sync)).mappings().first()
        if held["run_id"] == run_id:
            return None
        beat = aware(held["heartbeat_at"])
        take = locks.update().where(locks.c.sync == sync, locks.c.run_id == held["run_id"])
        if _holder_gone(held["owner"]):  # it cannot renew: the run_id condition alone decides a race of takers
            why = "its process is gone"
        elif (ts - beat).total_seconds() >= stale_after:
            take = take.where(locks.c.heartbeat_at <= ts - dt.timedelta(seconds=stale_after))
            why = f"no heartbeat for {stale_after:g} s"
        else:
            dead_at = beat + dt.timedelta(seconds=stale_after)
            raise Locked(f"sync '{sync}' is locked by run {held['run_id']} ({_shown(held['owner'])}), last heartbeat "
                         f"{beat:%Y-%m-%d %H:%M:%S} UTC. If that run is dead (killed, its machine gone), its lock "
                         f"is presumed dead at {dead_at:%Y-%m-%d %H:%M:%S} UTC (lock_timeout {stale_after:g} s)")
        res = c.execute(take.values(run_id=run_id, owner=me, acquired_at=ts, heartbeat_at=ts))
        if res.rowcount != 1:
            raise Locked(f"sync '{sync}' lock was taken by another run, or renewed by its holder, just now")
        c.execute(runs.update().where(runs.c.run_id == held["run_id"], runs.c.status == "running")
                  .values(status="abandoned", finished_at=ts, error=f"lock taken over by run {run_id} ({why})"))
        return int(held["run_id"])


def fence(conn: sa.Connection, sync: str, run_id: int) -> float:
    """The fencing check: in ``conn``'s transaction, prove this run still holds the sync's lock
    (renewing its heartbeat), else raise :class:`LeaseLost` (the caller's transaction then
    rolls back). Run it as the transaction's last statement: from here to the commit the lock
    row is this transaction's (a row lock; SQLite's write lock), so a takeover waits for the
    commit and the new holder sees everything committed. Returns the lease clock's reading
    from just before the renewal (a lease renewed by this commit runs from there)."""
    t0 = clock()
    res = conn.execute(locks.update().where(locks.c.sync == sync, locks.c.run_id == run_id).values(heartbeat_at=now()))
    if res.rowcount != 1:
        raise LeaseLost(sync, run_id, conn.execute(sa.select(locks).where(locks.c.sync == sync)).mappings().first())
    return t0


@contextlib.contextmanager
def fenced(engine: Engine, sync: str, run_id: int, lease: Lease | None = None) -> Iterator[sa.Connection]:
    """A transaction that commits only while this run holds the lock (:func:`fence`, last);
    ``lease``: renewed by the commit."""
    with engine.begin() as conn:
        yield conn
        t0 = fence(conn, sync, run_id)
    if lease is not None:
        lease.renewed(t0)


def heartbeat(engine: Engine, sync: str, run_id: int) -> float:
    """Keep the run's lock alive; raise :class:`LeaseLost` if another run took it over meanwhile."""
    with engine.begin() as conn:
        return fence(conn, sync, run_id)


class Lease:
    """How long this process may go on acting for a run without asking the state database.

    Every fenced commit (:func:`fenced` with this lease) renews it, and :meth:`keep` renews it
    when a third of ``lock_timeout`` passed without one. A renewal that began at clock time
    ``t`` is good until ``t + lock_timeout - margin``: another run presumes this one dead only
    ``lock_timeout`` after the heartbeat that renewal wrote (judged on its own wall clock; the
    margin, a third of the timeout, absorbs clock skew between hosts). :meth:`ready` — a clock
    reading, no round trip — is asked before each request starts; past the lease it waits for
    a renewal (the thread calling :meth:`keep`), so a process that was stopped (SIGSTOP, a VM
    freeze, a suspend, a long GC) starts nothing until it has proved it still holds the lock.
    """

    def __init__(self, engine: Engine, sync: str, run_id: int, lock_timeout: float, stop: threading.Event | None = None):
        self.engine, self.sync, self.run_id = engine, sync, run_id
        self.every, self.length = lock_timeout / 3, lock_timeout * 2 / 3
        self.stop = stop or threading.Event()
        self.lost: LeaseLost | None = None
        self._cond = threading.Condition()
        self.due = self.valid_until = 0.0  # not proved yet: the first keep() renews

    def renewed(self, t0: float) -> None:
        with self._cond:
            if t0 + self.length > self.valid_until:
                self.due, self.valid_until = t0 + self.every, t0 + self.length
            self._cond.notify_all()

    def renew_in(self) -> float:
        """Seconds until :meth:`keep` should renew (0: now)."""
        return max(0.0, self.due - clock())

    def keep(self) -> None:
        """Renew when due (one fenced heartbeat); raises :class:`LeaseLost` (and sets ``stop``)."""
        if clock() < self.due:
            return
        with self.guard():
            self.renewed(heartbeat(self.engine, self.sync, self.run_id))

    @contextlib.contextmanager
    def begin(self) -> Iterator[sa.Connection]:
        """A fenced transaction that renews the lease (see :func:`fenced`)."""
        with self.guard(), fenced(self.engine, self.sync, self.run_id, self) as conn:
            yield conn

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a lost lock into ``stop`` (the senders start nothing more) before it propagates."""
        try:
            yield
        except LeaseLost as e:
            self.lose(e)
            raise

    def lose(self, e: LeaseLost) -> None:
        with self._cond:
            self.lost = self.lost or e
            self.stop.set()
            self._cond.notify_all()

    def ready(self) -> bool:
        """Whether a request may start now: the lease is good (no round trip), or, once it has
        lapsed, as soon as it is renewed; False once the run is stopping."""
        if clock() < self.valid_until and not self.stop.is_set():
            return True
        with self._cond:
            while not self.stop.is_set() and clock() >= self.valid_until:
                self._cond.wait(self.every)
            return not self.stop.is_set()


def release_lock(engine: Engine, sync: str, run_id: int) -> None:
    with engine.begin() as c:
        c.execute(locks.delete().where(locks.c.sync == sync, locks.c.run_id == run_id))
