"""Push a staged plan: batches -> rate-limited concurrent requests -> verdicts -> state.

Workers send; the calling thread alone writes the sync tables, one transaction for
whatever finished together. A user's snapshot moves only when the vendor acknowledged
it. Retries follow the vendor's verdict: transient errors are retried with exponential
backoff (or the vendor's own wait); a request carrying increase/append ops is never
retried after an ambiguous failure (it may have been applied): its idempotent
attributes are re-sent next run, its non-idempotent ones are not.

A process can also die between "the vendor applied it" and "we recorded that", or stall
and lose its lock to another run. So nothing leaves unannounced: a chunk of plan rows is
marked ``out`` (may leave) in one transaction before its batches are handed to the senders,
and a request carrying non-idempotent ops is first marked ``sending`` (a write-ahead intent,
one small transaction just before it goes). The next holder settles what a dead run left
(:func:`settle_in_doubt`): the set attributes of ``out`` and ``sending`` users become
unknown in the snapshot (re-sent from the warehouse next run, whatever it did meanwhile);
the non-idempotent ones in flight count as applied (at most once).

A lease bounds how long the push acts on the lock without proving it still holds it
(:class:`state.Lease`): each request start is checked on the lease's clock (no round
trip), and every commit (the ``out`` marks, the intents, the answers) is fenced on the lock
row in its own transaction. Once the lock is lost, the senders start nothing more and
nothing more is committed: only requests already on the wire complete, and those are
exactly what the ``out`` and ``sending`` rows name for the new holder.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import json
import logging
import math
import operator
import queue
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import requests
import sqlalchemy as sa

from connector import db, state
from connector.faults import crashpoint
from connector.state import plans
from connector.transport import MAX_SENDERS, RateLimiter, Senders, Transport
from connector.vendors.base import Change, Kind, Op, Verdict, configured_limit, transport_verdict

log = logging.getLogger("usersync.push")
READ_CHUNK = 1000  # plan rows read at a time, while the previous ones' requests are out
# Batches handed to the senders ahead of their answers: AHEAD_SECONDS of the pace, and at least
# AHEAD per sender at work, at most MOST_AHEAD. While this thread reads the plan or commits (a
# few hundred ms when the CPU or the disk is busy) the senders keep sending what they hold;
# what they hold is ``out`` already, so a crash costs at most that many re-sends.
AHEAD, AHEAD_SECONDS, MOST_AHEAD = 4, 0.5, 512


@dataclasses.dataclass
class PushResult:
    delivered: int = 0
    rejected: int = 0
    failed: int = 0
    requests: int = 0
    stopped: str | None = None


@dataclasses.dataclass
class Job:
    batch: list[Change]
    attempts: int = 0
    not_before: float = 0.0
    intended: frozenset[str] = frozenset()  # non-idempotent attributes marked ``sending`` so far
    shape: list | None = None  # (attributes) of each request part: how many parts, what each carries


@dataclasses.dataclass
class Sent:
    job: Job
    verdict: Verdict | None  # None: not sent (the run was stopped)
    attempts: int
    http_status: int | None = None
    latency_ms: int | None = None
    sent_at: object = None
    applied: frozenset[str] = frozenset()  # attributes of the parts acknowledged before a failure
    failing: frozenset[str] | None = None  # attributes of the part that failed (None: all)


@dataclasses.dataclass
class _Push:
    """What one push's threads share: the vendor client and transport, the limiter and the
    senders' count, the lease and ``stop`` (set: no sender starts a request any more), the
    writes waiting for the next commit (written by the calling thread alone) and the result."""

    sync: Any
    run_id: int
    shard: int | None  # None: every shard (the CLI's push)
    vendor: Any
    transport: Transport
    limiter: RateLimiter
    senders: Senders
    lease: state.Lease
    stop: threading.Event
    writes: Writes
    result: PushResult = dataclasses.field(default_factory=PushResult)
    progress: Any = None

    @property
    def cfg(self):
        return self.sync.spec.vendor


def push(sync, run_id: int, shard: int | None = None, progress=None, share=None) -> PushResult:
    """Deliver the pending part of a run's plan (one shard, or all).

    ``share``: a callable giving this push's part of the vendor's limit (pushes of one
    credential at once: see ``connector.airflow.tasks``), asked again every ``SHARE_EVERY``
    seconds; None: the whole limit.
    """
    cfg = sync.spec.vendor
    vendor = sync.client()
    maximum = cfg.concurrency or MAX_SENDERS
    transport = Transport(concurrency=maximum, timeout=cfg.timeout, verify=cfg.verify_tls,
                          user_agent=f"usersync/{sync.version}")
    limiter = pacing(sync, share() if share else 1.0)
    stop = threading.Event()
    ctx = _Push(sync, run_id, shard, vendor, transport, limiter, Senders(limiter, maximum),
                state.Lease(sync.state, sync.spec.name, run_id, sync.spec.lock_timeout, stop), stop,
                # a delivery clears the failure rows of only those users who had one when the push began
                Writes(sync, run_id, shard or 0, state.failure_keys(sync.state, sync.spec.name)), progress=progress)
    keeper = threading.Thread(target=_keep_share, args=(limiter, share, stop), daemon=True) if share else None
    try:
        _freeze_heap()
        if keeper:
            keeper.start()
        with ThreadPoolExecutor(maximum, thread_name_prefix="push") as pool:
            out = _Out(ctx, pool)
            try:
                _drain(ctx, out, _Feed(ctx))
            finally:
                stop.set()  # whatever ended the push (a lost lock, an error), the senders start nothing more
                out.close()
    finally:
        stop.set()
        transport.close()
        gc.unfreeze()
    return ctx.result


def _freeze_heap() -> None:
    """Take the heap that exists before the push (imports, the plan's leftovers) out of the
    collector's sight until it ends. At a fast vendor's rate of users the queued changes
    trigger a full collection every second or so, and a full collection walks the whole heap
    while holding the GIL: no request starts meanwhile. Frozen objects are
    still freed by their reference counts; a collection first leaves no cyclic garbage behind.
    Process-wide: pushes overlapping in one process share it, and the first to end thaws it
    for all, which costs them speed, never correctness."""
    gc.collect()
    gc.freeze()


def pacing(sync, share: float = 1.0) -> RateLimiter:
    """The limiter of a push: the limit that applies to the sync as configured, this share of it."""
    return RateLimiter(configured_limit(sync.vendor_cls, sync.spec.vendor), share)


SHARE_EVERY = 5.0


def _keep_share(limiter: RateLimiter, share, stop: threading.Event) -> None:
    """Follow this push's share of the limit as the other pushes finish.

    A larger share applies only a window after it was seen: the pushes that finished sent
    until then, and the vendor still counts those starts for one window. A share never
    shrinks while pushes of the run are running (the shards left only decrease); should it,
    it applies at once."""
    while not stop.wait(SHARE_EVERY):
        try:
            now = share()
            if now > limiter.share and not stop.wait(limiter.limit.window):
                now = min(now, share())
        except Exception:  # the state database unreachable for a moment: keep the share held
            log.warning("could not read this push's share of the rate limit", exc_info=True)
            continue
        if not stop.is_set() and now != limiter.share:
            log.info("this push now paces at %.3g of the vendor's limit", now)
            limiter.set_share(now)


class _Feed:
    """The pending plan as jobs, read a chunk at a time as the queue runs low — while the
    previous chunk's requests are still out, so reading never leaves the vendor idle."""

    def __init__(self, ctx: _Push):
        self.ctx = ctx
        self.chunks = pending(ctx.sync, ctx.run_id, ctx.shard, ctx.lease)
        self.jobs: deque[Job] = deque()
        self.more, self.prepared = True, False

    def fill(self) -> bool:
        """Queue the next chunk's batches; False when the plan has no more."""
        if not self.more:
            return False
        changes = next(self.chunks, None)
        if changes is None:
            self.more = False
            return False
        ctx = self.ctx
        if not self.prepared:  # only when there is something to send: no change, no request
            try:
                ctx.vendor.prepare(functools.partial(_call, ctx), ctx.sync.spec)
            except BaseException:  # refused before any of the chunk could leave: not out after all
                with ctx.lease.begin() as conn:
                    plans.mark(conn, ctx.run_id, [c.key for c in changes], plans.PENDING)
                raise
            self.prepared = True
        self.jobs.extend(Job(b) for b in ctx.vendor.batches(changes))
        return True


_p = state.plan
_COLUMNS = (_p.c.user_key, _p.c.identity, _p.c.ops)  # the rest stays in the plan (see state.snapshot_from_plan)


def pending(sync, run_id: int, shard: int | None, lease=None):
    """Pending plan rows, a chunk at a time, as Changes (ordered by key for resumability).

    With ``lease`` (a push), the chunk's rows are marked ``out`` in the fenced transaction that
    reads them (``plans.take``), before any of them can be sent."""
    last = ""
    while True:
        with lease.begin() if lease else sync.state.connect() as c:
            rows = plans.take(c, run_id, shard, last, READ_CHUNK, _COLUMNS, out=lease is not None)
        if not rows:
            return
        yield _load(rows)
        last = rows[-1][0]


_first = operator.itemgetter(0)
# A chunk's identities and ops are decoded in one call each, straight into what a Change
# holds (tuples, Op members): json plus a loop over the ops costs several times as much, under
# the GIL the senders need, at the fastest vendor's rate of users.
_IDENTITIES = msgspec.json.Decoder(list[dict[str, Any]])
_OPSS = msgspec.json.Decoder(list[tuple[tuple[str, Op, Any], ...]])


def _load(rows) -> list[Change]:
    if not rows:
        return []
    idents, opss = "[" + ",".join([r[1] for r in rows]) + "]", "[" + ",".join([r[2] for r in rows]) + "]"
    try:
        idents, opss = _IDENTITIES.decode(idents), _OPSS.decode(opss)
    except msgspec.DecodeError:  # NaN or Infinity somewhere (Python's json writes them, msgspec refuses)
        idents = json.loads(idents)
        opss = [tuple((a, Op(o), v) for a, o, v in ops) for ops in json.loads(opss)]
    return [Change(r[0], i, ops) for r, i, ops in zip(rows, idents, opss)]


IN_DOUBT = "the run stopped while this request was in flight; it may have been applied, so it is not re-sent"
UNCONFIRMED = ("the run stopped after handing these users to its senders, before an answer was recorded; "
               "the vendor may hold their values, so they are re-sent next run")
STOPPED = "the run stopped before the rest of this user's request was sent"


def settle_in_doubt(sync, conn: sa.Connection, *where, resend: bool = False) -> int:
    """Settle plan rows a run left ``out`` or ``sending`` when it stopped (killed, interrupted,
    or its lock lost): a request carrying them may have left, and no answer was recorded.

    Their set attributes become unknown in the snapshot (:data:`state.UNKNOWN`, row hash 0,
    a failure row so that the next run re-reads them even by cursor): the next run re-sends
    the warehouse's values. The non-idempotent attributes of a ``sending`` row's request
    count as applied (at most once; the users recorded ``in_doubt``); a non-idempotent op
    never leaves without that intent, so those of ``out`` rows were not sent and go again as
    planned. One ``in_doubt`` or ``unconfirmed`` batch row per run names them. With
    ``resend`` (a retried push task of the same run), ``out`` rows go back to ``pending``
    instead: this push sends them again, as planned. ``where`` narrows the rows (a run, a
    shard, the sync's other runs).
    """
    rows = plans.in_flight(conn, _COLUMNS, *where)
    # one group per run and status (and, while sending, per attributes in flight)
    for (run_id, status, in_flight), group in itertools.groupby(
            rows, key=lambda r: (r[0], r[1], r[2] if r[1] == plans.SENDING else None)):
        changes = _load([r[3:] for r in group])
        keys = [c.key for c in changes]
        if status == plans.OUT and resend:
            plans.mark(conn, run_id, keys, plans.PENDING)
            continue
        flight = frozenset(json.loads(in_flight)) if status == plans.SENDING and in_flight else None
        entries = []
        for c in changes:
            applied = {a for a, op, _ in c.ops if not op.idempotent and status == plans.SENDING
                       and (flight is None or a in flight)}
            cls, code, why = ("in_doubt", "in_doubt", IN_DOUBT) if applied else ("retryable", "unconfirmed", UNCONFIRMED)
            entries.append((c, cls, code, why, applied, {a for a, op, _ in c.ops if op.idempotent}))
        who = ", ".join(keys[:50]) + (f" and {len(keys) - 50} more" if len(keys) > 50 else "")
        outcome, why = ("in_doubt", IN_DOUBT) if status == plans.SENDING else ("unconfirmed", UNCONFIRMED)
        conn.execute(state.batches.insert().values(**_batch_values(
            sync, run_id, 0, Sent(Job(changes), Verdict(Kind.RETRY, outcome, f"{why}: {who}"), 0), outcome)))
        _settle(conn, sync, run_id, entries)
        log.warning("run %s: %d user(s) were %s when it stopped; their set attributes are re-sent next run%s",
                    run_id, len(changes), "in flight" if status == plans.SENDING else "handed to its senders",
                    ", their increments/appends/once count as applied (at most once)" if status == plans.SENDING else "")
    return len(rows)


def _drain(ctx: _Push, out: _Out, feed: _Feed) -> None:
    try:
        _loop(ctx, out, feed)
    except state.LeaseLost as e:  # stop is set: the senders start nothing more; what is on the wire completes
        result = ctx.result
        while out.count:
            for sent in out.back(None):
                result.requests += sent.attempts - sent.job.attempts
                if sent.verdict is not None and sent.verdict.kind is Kind.DELIVERED and not sent.verdict.per_user:
                    result.delivered += len(sent.job.batch)  # acknowledged, never recorded: the new holder re-sends them
        e.requests, e.delivered = result.requests, result.delivered
        raise


def _loop(ctx: _Push, out: _Out, feed: _Feed) -> None:
    jobs, lease, stop, result = feed.jobs, ctx.lease, ctx.stop, ctx.result
    lease.keep()  # proved once before the first request
    while True:
        # the run's first request goes alone: a bad credential costs one request, not a burst
        ahead = 1
        if result.requests:
            ahead = min(MOST_AHEAD, max(ctx.senders.limit * AHEAD, math.ceil(ctx.limiter.pace() * AHEAD_SECONDS)))
        while len(jobs) + out.count < ahead and not stop.is_set() and feed.fill():
            pass
        while jobs and out.count < ahead and not stop.is_set():
            out.hand(jobs.popleft())
        if not out.count:
            break
        due = ctx.writes.due()  # and the lease's renewal: the senders wait for it once it lapses
        done = out.back(min(lease.renew_in(), due if due is not None else float("inf")))
        if lease.lost:  # a sender's intent found the lock gone
            raise lease.lost
        if done:
            crashpoint("vendor_answered")
        for sent in done:
            ctx.senders.observe()
            result.requests += sent.attempts - sent.job.attempts
            record(sent, ctx.writes, jobs, stop, result, ctx.cfg.max_attempts)
        if ctx.writes.urgent or not out.count or ctx.writes.due() == 0:
            with lease.begin() as conn:  # fenced: commits only while this run holds the lock
                ctx.writes.flush(conn)
            crashpoint("after_commit")
            ctx.writes = ctx.writes.fresh()
        if ctx.progress:
            ctx.progress.update(requests=result.requests, delivered=result.delivered,
                                failed=result.failed + result.rejected)
        lease.keep()
    if lease.lost:
        raise lease.lost
    if jobs:  # stopped (the vendor refused the run): what never went to a sender was not sent
        with lease.begin() as conn:
            plans.mark(conn, ctx.run_id, [c.key for job in jobs for c in job.batch], plans.PENDING)


class _Out:
    """The jobs handed to the senders, and what comes back. A sender takes the next job itself
    as soon as it is free: this thread's reading and commits (a few hundred ms when the CPU or
    the disk is busy) do not keep jobs from the senders while some are handed out. Threads are
    started as the senders' count grows (``Senders`` holds the count at work); ``close`` ends them."""

    def __init__(self, ctx: _Push, pool: ThreadPoolExecutor):
        self.ctx, self.pool = ctx, pool
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._back: queue.SimpleQueue[Sent | BaseException] = queue.SimpleQueue()
        self.count = 0  # handed out, not come back
        self._threads = 0

    def hand(self, job: Job) -> None:
        self._jobs.put(job)
        self.count += 1
        while self._threads < min(self.count, self.ctx.senders.limit):
            self.pool.submit(self._sender)
            self._threads += 1

    def back(self, timeout: float | None) -> list[Sent]:
        """What came back, waiting up to ``timeout`` seconds for the first (None: for ever)."""
        try:
            done = [self._back.get(timeout=None if timeout is None else max(0.0, timeout))]
        except queue.Empty:
            return []
        while True:
            try:
                done.append(self._back.get_nowait())
            except queue.Empty:
                break
        self.count -= len(done)
        for sent in done:
            if isinstance(sent, BaseException):
                raise sent
        return done

    def close(self) -> None:
        for _ in range(self._threads):
            self._jobs.put(None)

    def _sender(self) -> None:
        ctx = self.ctx
        while (job := self._jobs.get()) is not None:
            try:
                sent = ctx.senders.run(_send, ctx, job)
            except BaseException as e:  # raised in the push's thread, as the push's own error
                sent = e
            self._back.put(sent)


def _intend(ctx: _Push, batch: list[Change], attributes: frozenset[str]) -> bool:
    """Write-ahead intent, just before a request with non-idempotent ops goes: from now on
    the vendor may apply ``attributes``, so a run that dies before recording the answer leaves
    these users ``sending`` — settled at most once (:func:`settle_in_doubt`), never re-sent.
    Fenced: False (and the run stopping) when the lock is gone — its rows may be another
    run's to settle already, so the request must not go."""
    try:
        with ctx.lease.begin() as conn:
            plans.intend(conn, ctx.run_id, [c.key for c in batch if not c.idempotent], attributes)
    except state.LeaseLost:
        return False
    return True


def _send(ctx: _Push, job: Job) -> Sent:
    """Send one batch (its parts in order), retrying whole-request transient failures in place."""
    delay = job.not_before - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    built = None
    if job.shape is None:  # what each part carries (the parts go as built now, or afresh on a retry)
        built = _parts(ctx.vendor, job.batch)
        job.shape = [part.attributes for part in built]
    attempts, applied = job.attempts, frozenset()
    for i, attrs in enumerate(job.shape):
        sent = _send_part(ctx, job, i, attrs, attempts, built[i] if built else None)
        attempts = sent.attempts
        v = sent.verdict
        if v is None or v.kind is not Kind.DELIVERED or v.per_user or i == len(job.shape) - 1:
            sent.applied, sent.failing = applied, (frozenset(attrs) if attrs is not None else None)
            return sent
        applied |= frozenset(attrs or ())
    raise AssertionError("a batch must have at least one request")


def _parts(vendor, batch: list[Change]) -> list:
    parts = vendor.request(batch)
    return parts if isinstance(parts, list) else [parts]


def _send_part(ctx: _Push, job: Job, index: int, carried, attempts: int, req=None) -> Sent:
    """``carried``: the attributes this part carries (None: the whole batch); ``req``: the part as
    built already (None: build it; every retry builds afresh: timestamps, nonces, signatures)."""
    risky = frozenset(a for c in job.batch for a, op, _ in c.ops if not op.idempotent and (carried is None or a in carried))
    # a once value is re-sent unchanged by a retry in the same run: harmless (at most once is
    # about a later run, whose value may differ); increments and appends are never retried blind
    idempotent = all(op.idempotent or op is Op.ONCE for c in job.batch for a, op, _ in c.ops
                     if carried is None or a in carried)
    vendor, transport, limiter, stop, cfg = ctx.vendor, ctx.transport, ctx.limiter, ctx.stop, ctx.cfg
    while True:
        if stop.is_set():
            return Sent(job, None, attempts)
        # the intent and the encoding come before the start slot: a wait on the state database
        # between the slot and the send (another thread's commit) would bunch the arrivals the
        # limiter spaced. Stopped while waiting: not sent, the rows go back to pending.
        if not risky <= job.intended:
            job.intended |= risky
            if not _intend(ctx, job.batch, job.intended):
                return Sent(job, None, attempts)
        prepared = transport.prepare(req) if req is not None else None
        start = limiter.acquire(len(job.batch))
        if stop.is_set():
            return Sent(job, None, attempts)
        if prepared is None:
            req = _parts(vendor, job.batch)[index]
            prepared = transport.prepare(req)
        if not ctx.lease.ready():  # the last word before the request starts: the lease, on its clock
            return Sent(job, None, attempts)
        crashpoint("before_send")
        sent_at = db.now()
        t0 = time.monotonic()
        attempts += 1
        try:
            resp = transport.send(prepared, start.left)
            verdict, status = vendor.verdict(req, resp), resp.status_code
        except requests.RequestException as e:
            verdict, status = transport_verdict(e), None
        latency = int((time.monotonic() - t0) * 1000)
        if verdict.kind is Kind.STOP:
            stop.set()  # before anyone else sends
        if verdict.wait:
            limiter.pause(verdict.wait)
        retry = (verdict.kind is Kind.RETRY and not verdict.per_user and attempts < cfg.max_attempts
                 and (idempotent or not verdict.ambiguous))
        if not retry or stop.is_set():
            return Sent(job, verdict, attempts, status, latency, sent_at)
        log.info("retrying %d user(s) after %s (attempt %d)", len(job.batch), verdict.code or status, attempts)
        req = None  # built afresh for the retry: timestamps, nonces, signatures
        time.sleep(verdict.wait or _backoff(cfg.backoff, attempts))


def _call(ctx: _Push, build) -> tuple[Verdict, requests.Response | None]:
    """A request of the vendor's own (``Vendor.prepare``, :data:`~connector.vendors.base.Call`):
    paced, and retried as a batch's request is, on a transient verdict up to ``max_attempts``."""
    vendor, transport, limiter, cfg = ctx.vendor, ctx.transport, ctx.limiter, ctx.cfg
    for attempt in range(1, cfg.max_attempts + 1):
        start = limiter.acquire()
        try:
            req = build()
            resp = transport.send(transport.prepare(req), start.left)
            verdict = vendor.verdict(req, resp)
        except requests.RequestException as e:
            verdict, resp = transport_verdict(e), None
        if verdict.wait:
            limiter.pause(verdict.wait)
        if verdict.kind is not Kind.RETRY or attempt == cfg.max_attempts:
            return verdict, resp
        time.sleep(verdict.wait or _backoff(cfg.backoff, attempt))
    raise AssertionError("max_attempts is at least 1")


def _backoff(base: float, attempt: int) -> float:
    return min(60.0, base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


def record(sent: Sent, writes: Writes, jobs, stop, result: PushResult, max_attempts) -> None:
    """Turn one batch's verdict into snapshot, failure and batch rows (and follow-up jobs)."""
    v = sent.verdict
    batch = sent.job.batch
    if v is None:  # not sent (the run is stopping); parts acknowledged before are kept
        if sent.applied:
            writes.failures([(c, "retryable", None, STOPPED) for c in batch], sent)
        else:
            writes.mark([c.key for c in batch], plans.PENDING)
        return
    if v.kind is Kind.STOP:  # refused: not applied, no longer in flight
        writes.mark([c.key for c in batch], plans.PENDING)
    elif v.kind is Kind.SPLIT and len(batch) > 1:  # not applied; its halves go next (out again)
        writes.mark([c.key for c in batch], plans.OUT)
    if v.kind is Kind.STOP:
        stop.set()
        result.stopped = f"{v.code}: {v.message}" if v.code else v.message
        log.error("vendor refused the run: %s", result.stopped)
        writes.batch(sent, "stopped")
        return
    if v.kind is Kind.DELIVERED and not v.per_user:  # the usual answer: everyone acknowledged
        delivered, failed, retry_now = batch, [], []
    else:
        delivered, failed, retry_now = [], [], []
        for change in batch:
            kind, code, message = v.outcome(change.key)
            if kind is Kind.DELIVERED:
                delivered.append(change)
            elif kind is Kind.SPLIT and len(batch) > 1:
                continue  # handled below for the whole batch
            elif kind is Kind.RETRY and v.per_user and sent.attempts < max_attempts and not stop.is_set():
                retry_now.append(change)
            elif kind is Kind.RETRY and v.ambiguous and not change.idempotent:
                failed.append((change, "in_doubt", code, f"may have been applied; not re-sent: {message}"))
            elif kind is Kind.RETRY:
                failed.append((change, "retryable", code, message))
            else:
                failed.append((change, "rejected", code, message))
    if v.kind is Kind.SPLIT and len(batch) > 1:
        half = len(batch) // 2
        # a split is not a failed attempt
        jobs.extend([Job(batch[:half]), Job(batch[half:])])
        writes.batch(sent, "split")
        return
    if retry_now:
        jobs.append(Job(retry_now, sent.attempts, time.monotonic() + (v.wait or 0.5)))
        writes.mark([c.key for c in retry_now], plans.OUT)  # no longer in flight (not applied), going again
    outcome = ("delivered" if len(delivered) == len(batch) else
               "partial" if delivered else
               "retry" if retry_now and not failed else
               "rejected" if all(f[1] == "rejected" for f in failed) else "failed")
    writes.batch(sent, outcome)
    writes.delivered(delivered)
    writes.failures(failed, sent)
    result.delivered += len(delivered)
    result.rejected += sum(1 for f in failed if f[1] == "rejected")
    result.failed += sum(1 for f in failed if f[1] != "rejected")


class Writes:
    """What finished requests leave to write — batch rows, delivered users, failures, plan
    statuses — written together in one transaction, a statement per kind (per 500 keys).

    Deliveries are gathered for up to ``FLUSH_SECONDS`` (or ``FLUSH_USERS``): at a hundred
    requests a second, a transaction per answer costs the senders more GIL time than the HTTP does.
    Waiting is safe for them: a run that dies first re-sends those users next run, and the
    non-idempotent ones among them are still ``sending``, settled at most once. Anything
    else (a failure, a batch going back to ``pending`` to be split or retried) is
    ``urgent``: written before any of its users can be sent again.
    """

    FLUSH_SECONDS = 0.25
    FLUSH_USERS = 5000

    def __init__(self, sync, run_id: int, shard: int = 0, failed: set[str] | None = None):
        self.sync, self.run_id, self.shard = sync, run_id, shard
        self.failed = failed  # the users with a failure row when the push began (None: unknown)
        self.batches: list[dict] = []
        self.marks: dict[str, list[str]] = {}
        self.failed_now: list[tuple[list, Sent]] = []
        self.urgent, self.users, self.since = False, 0, None

    def fresh(self) -> Writes:
        """Empty writes for the same push, once these are committed."""
        return Writes(self.sync, self.run_id, self.shard, self.failed)

    def due(self) -> float | None:
        """Seconds until these writes should be flushed (None: there is nothing to write)."""
        if self.since is None:
            return None
        return 0 if self.users >= self.FLUSH_USERS else max(0.0, self.since + self.FLUSH_SECONDS - time.monotonic())

    def batch(self, sent: Sent, outcome: str) -> None:
        self.since = self.since or time.monotonic()
        self.batches.append(_batch_values(self.sync, self.run_id, self.shard, sent, outcome))

    def mark(self, keys: list[str], status: str) -> None:
        self.marks.setdefault(status, []).extend(keys)
        self.users += len(keys)
        self.urgent |= status != plans.DELIVERED

    def delivered(self, changes: list[Change]) -> None:
        self.mark([c.key for c in changes], plans.DELIVERED)

    def failures(self, failed: list, sent: Sent) -> None:
        if failed:
            self.failed_now.append((failed, sent))
            self.urgent = True

    def flush(self, conn) -> None:
        if self.batches:
            conn.execute(state.batches.insert(), self.batches)
        for failed, sent in self.failed_now:
            _failed(conn, self.sync, self.run_id, failed, sent)
        delivered = self.marks.get(plans.DELIVERED)
        if delivered:  # the snapshot moves only for the users the vendor acknowledged: to what the plan staged
            state.snapshot_from_plan(conn, self.sync.spec.name, self.run_id, delivered)
            state.clear_failures(conn, self.sync.spec.name, delivered, among=self.failed)
        for status, keys in self.marks.items():
            plans.mark(conn, self.run_id, keys, status)


def record_delivered(conn, sync, run_id, changes: list[Change]) -> None:
    """Record users the vendor acknowledged (what a flush does for them; bench.phase times it)."""
    writes = Writes(sync, run_id)
    writes.delivered(changes)
    writes.flush(conn)


def _failed(conn, sync, run_id, failed, sent: Sent) -> None:
    """Record failures; where part of a change was (or may have been) applied, keep exactly that.

    The snapshot of such a user becomes its old payload plus the attributes the vendor
    acknowledged; after an ambiguous failure (a timeout after sending, a dropped answer), the
    non-idempotent attributes of the failing part count as applied (never re-sent: at most
    once) and its set attributes become unknown (re-sent next run); everything else goes
    again next run as planned.
    """
    if not failed:
        return
    maybe = sent.verdict is not None and sent.verdict.ambiguous
    entries = []
    for change, cls, code, message in failed:
        applied, unknown = set(sent.applied), set()
        if maybe and cls != "rejected":
            for a, op, _ in change.ops:
                if sent.failing is None or a in sent.failing:
                    (unknown if op.idempotent else applied).add(a)
        entries.append((change, cls, code, message, applied, unknown - applied))
    _settle(conn, sync, run_id, entries)


def _settle(conn, sync, run_id, entries) -> None:
    """(change, error class, code, message, attributes applied, attributes unknown) of users
    that failed: the snapshot takes the applied attributes' staged values and marks the
    unknown ones (row hash 0: the next run diffs them again); a failure row each, re-read
    next run; their plan rows ``failed``."""
    staged = state.staged_rows(conn, sync.spec.name, run_id, [e[0].key for e in entries])
    partial = []
    for change, _, _, _, applied, unknown in entries:
        if applied or unknown:
            _, payload, before = staged[change.key]
            kept = {a: v for a, v in before.items() if a not in applied}
            kept.update({a: payload[a] for a in applied if a in payload})
            kept.update({a: state.UNKNOWN for a in unknown})
            partial.append((change.key, kept, 0))
    state.upsert_snapshot(conn, sync.spec.name, run_id, partial)
    state.record_failures(conn, sync.spec.name, run_id, [
        (c.key, staged[c.key][0], cls, code, msg) for c, cls, code, msg, _, _ in entries])
    plans.mark(conn, run_id, [e[0].key for e in entries], plans.FAILED)


def _batch_values(sync, run_id, shard, sent: Sent, outcome: str) -> dict:
    v = sent.verdict
    batch = sent.job.batch
    names: set[str] = set()
    for c in batch:
        names.update(map(_first, c.ops))
    attrs = sorted(names)
    return dict(
        run_id=run_id, sync=sync.spec.name, shard=shard, users=len(batch), first_user=batch[0].key,
        attributes=",".join(attrs)[:2000], http_status=sent.http_status, vendor_code=v.code,
        vendor_message=(v.message or "")[:2000], attempts=sent.attempts, latency_ms=sent.latency_ms,
        outcome=outcome, sent_at=sent.sent_at or db.now(), worker=sync.worker, task=sync.task)
