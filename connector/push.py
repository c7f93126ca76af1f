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
import operator
import random
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import msgspec
import requests
import sqlalchemy as sa

from connector import state
from connector.faults import crashpoint
from connector.transport import MAX_SENDERS, RateLimiter, Senders, Transport
from connector.vendors.base import Change, Kind, Op, Verdict, configured_limit, transport_verdict

log = logging.getLogger("usersync.push")
READ_CHUNK = 1000  # plan rows read at a time, while the previous ones' requests are out
# batches handed to the senders, per sender at work (in flight or next): while this thread reads the
# plan or waits on a commit (at times 0.1-0.2 s when the disk is busy), they keep sending.
# With two a sender, Tencent's 8 senders ran dry after the longer commits: 0.955-0.967 of its
# limit against 0.969-0.970 with four, the disk under load.
AHEAD = 4


@dataclasses.dataclass
class PushResult:
    delivered: int = 0
    rejected: int = 0
    failed: int = 0
    requests: int = 0
    stopped: str | None = None


@dataclasses.dataclass
class _Job:
    batch: list[Change]
    attempts: int = 0
    not_before: float = 0.0
    intended: frozenset[str] = frozenset()  # non-idempotent attributes marked ``sending`` so far
    shape: list | None = None  # (attributes) of each request part: how many parts, what each carries


@dataclasses.dataclass
class _Sent:
    job: _Job
    verdict: Verdict | None  # None: not sent (the run was stopped)
    attempts: int
    http_status: int | None = None
    latency_ms: int | None = None
    sent_at: object = None
    applied: frozenset[str] = frozenset()  # attributes of the parts acknowledged before a failure
    failing: frozenset[str] | None = None  # attributes of the part that failed (None: all)


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
    senders = Senders(limiter, maximum)
    result = PushResult()
    stop = threading.Event()
    lease = state.Lease(sync.state, sync.spec.name, run_id, sync.spec.lock_timeout, stop)
    feed = _Feed(sync, run_id, shard, vendor, transport, lease)
    keeper = threading.Thread(target=_keep_share, args=(limiter, share, stop), daemon=True) if share else None
    try:
        if keeper:
            keeper.start()
        with ThreadPoolExecutor(maximum, thread_name_prefix="push") as pool:
            try:
                _drain(sync, run_id, shard or 0, vendor, transport, limiter, pool, feed, stop, lease, senders,
                       result, progress)
            finally:
                stop.set()  # whatever ended the push (a lost lock, an error), the senders start nothing more
    finally:
        stop.set()
        if feed.frozen:
            gc.unfreeze()
        transport.close()
    return result


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
    previous chunk's requests are still out, so reading never leaves the vendor idle.

    A long push (a first chunk that is full) keeps what is alive out of the cyclic
    collector's sight until it ends (``gc.unfreeze``): the objects from before the push
    (modules, the plan's leftovers) once, after collecting the garbage so nothing already dead
    waits for the end; then each chunk's users once they are queued (``gc.freeze`` is a list
    splice, not a walk). Those users live until their requests are answered, long enough to
    be promoted and walked again and again by the older generations' collections, which hold
    the GIL the senders need: at Tencent's 10,000 users a second, 0.49 s of collections in an
    8 s push, the full ones ~23 ms each (0.19 s in all with every chunk frozen). Reference
    counting still frees them as before; only a reference cycle alive at a freeze waits for
    the end of the push.
    """

    def __init__(self, sync, run_id: int, shard: int | None, vendor, transport: Transport, lease=None):
        self.sync, self.vendor, self.transport = sync, vendor, transport
        self.run_id, self.lease = run_id, lease
        self.chunks = _pending(sync, run_id, shard, lease)
        self.jobs: deque[_Job] = deque()
        self.more, self.prepared, self.frozen = True, False, False

    def fill(self) -> bool:
        """Queue the next chunk's batches; False when the plan has no more."""
        if not self.more:
            return False
        changes = next(self.chunks, None)
        if changes is None:
            self.more = False
            return False
        if not self.prepared:  # only when there is something to send: no change, no request
            try:
                self.vendor.prepare(self.transport.session, self.sync.spec)
            except BaseException:  # refused before any of the chunk could leave: not out after all
                if self.lease is not None:
                    with self.lease.begin() as conn:
                        _mark(conn, self.run_id, [c.key for c in changes], "pending")
                raise
            self.prepared = True
            if len(changes) == READ_CHUNK:  # a long push, nothing in flight yet
                gc.collect()
                self.frozen = True
        self.jobs.extend(_Job(b) for b in self.vendor.batches(changes))
        if self.frozen:
            gc.freeze()
        return True


_p = state.plan
_COLUMNS = (_p.c.user_key, _p.c.identity, _p.c.ops)  # the rest stays in the plan (see state.snapshot_from_plan)


OUT = "out"  # handed to the senders: a request carrying these users may have left


def _pending(sync, run_id: int, shard: int | None, lease=None):
    """Pending plan rows, a chunk at a time, as Changes (ordered by key for resumability).

    With ``lease`` (a push), the chunk's rows are marked ``out`` in the transaction that reads
    them, fenced: one statement a chunk (a key range), before any of them can be sent."""
    last = ""
    mine = [_p.c.run_id == run_id, _p.c.status == "pending"] + ([_p.c.shard == shard] if shard is not None else [])
    while True:
        with lease.begin() if lease else sync.state.connect() as c:
            rows = c.execute(sa.select(*_COLUMNS).where(*mine, _p.c.user_key > last)
                             .order_by(_p.c.user_key).limit(READ_CHUNK)).all()
            if rows and lease:
                c.execute(_p.update().where(*mine, _p.c.user_key > last, _p.c.user_key <= rows[-1][0])
                          .values(status=OUT))
        if not rows:
            return
        yield _load(rows)
        last = rows[-1][0]


_first = operator.itemgetter(0)
# A chunk's identities and ops are decoded in one call each, straight into what a Change
# holds (tuples, Op members): at Tencent's limit that is 10,000 users a second, and json
# plus a loop over the ops cost three times as much, under the GIL the senders need.
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
    rows = conn.execute(sa.select(_p.c.run_id, _p.c.status, _p.c.in_flight, *_COLUMNS)
                        .where(_p.c.status.in_(["sending", OUT]), *where)
                        .order_by(_p.c.run_id, _p.c.status, _p.c.in_flight, _p.c.user_key)).all()
    # one group per run and status (and, while sending, per attributes in flight)
    for (run_id, status, in_flight), group in itertools.groupby(
            rows, key=lambda r: (r[0], r[1], r[2] if r[1] == "sending" else None)):
        changes = _load([r[3:] for r in group])
        keys = [c.key for c in changes]
        if status == OUT and resend:
            _mark(conn, run_id, keys, "pending")
            continue
        flight = frozenset(json.loads(in_flight)) if status == "sending" and in_flight else None
        entries = []
        for c in changes:
            applied = {a for a, op, _ in c.ops if not op.idempotent and status == "sending"
                       and (flight is None or a in flight)}
            cls, code, why = ("in_doubt", "in_doubt", IN_DOUBT) if applied else ("retryable", "unconfirmed", UNCONFIRMED)
            entries.append((c, cls, code, why, applied, {a for a, op, _ in c.ops if op.idempotent}))
        who = ", ".join(keys[:50]) + (f" and {len(keys) - 50} more" if len(keys) > 50 else "")
        outcome, why = ("in_doubt", IN_DOUBT) if status == "sending" else ("unconfirmed", UNCONFIRMED)
        _batch_row(conn, sync, run_id, 0, _Sent(_Job(changes), Verdict(Kind.RETRY, outcome, f"{why}: {who}"), 0),
                   outcome)
        _settle(conn, sync, run_id, entries)
        log.warning("run %s: %d user(s) were %s when it stopped; their set attributes are re-sent next run%s",
                    run_id, len(changes), "in flight" if status == "sending" else "handed to its senders",
                    ", their increments/appends/once count as applied (at most once)" if status == "sending" else "")
    return len(rows)


def _drain(sync, run_id, shard, vendor, transport, limiter, pool, feed: _Feed, stop, lease: state.Lease, senders: Senders,
           result, progress):
    inflight: set[Future] = set()
    try:
        _loop(sync, run_id, shard, vendor, transport, limiter, pool, feed, stop, lease, senders, result, progress,
              inflight)
    except state.LeaseLost as e:  # stop is set: the senders start nothing more; what is on the wire completes
        for fut in inflight:
            sent = fut.result()
            result.requests += sent.attempts - sent.job.attempts
            if sent.verdict is not None and sent.verdict.kind is Kind.DELIVERED and not sent.verdict.per_user:
                result.delivered += len(sent.job.batch)  # acknowledged, never recorded: the new holder re-sends them
        e.requests, e.delivered = result.requests, result.delivered
        raise


def _loop(sync, run_id, shard, vendor, transport, limiter, pool, feed, stop, lease, senders, result, progress,
          inflight: set[Future]):
    cfg = sync.spec.vendor
    jobs = feed.jobs
    intend = functools.partial(_intend, sync, run_id, lease)
    failed_before = state.failure_keys(sync.state, sync.spec.name)  # a delivery clears only theirs
    writes = _Writes(sync, run_id, shard, failed_before)
    lease.keep()  # proved once before the first request
    while True:
        # the run's first request goes alone: a bad credential costs one request, not a burst
        limit = senders.limit * AHEAD if result.requests else 1
        while len(jobs) < limit and not stop.is_set() and feed.fill():
            pass
        while jobs and len(inflight) < limit and not stop.is_set():
            inflight.add(pool.submit(senders.run, _send, jobs.popleft(), vendor, transport, limiter, stop, lease,
                                     cfg, intend))
        if not inflight:
            break
        due = writes.due()  # and the lease's renewal: the senders wait for it once it lapses
        done, _ = wait(inflight, timeout=min(lease.renew_in(), due if due is not None else float("inf")),
                             return_when=FIRST_COMPLETED)
        inflight -= done
        if lease.lost:  # a sender's intent found the lock gone
            raise lease.lost
        if done:
            crashpoint("vendor_answered")
        for fut in done:
            sent = fut.result()
            senders.observe()
            result.requests += sent.attempts - sent.job.attempts
            _record(sent, writes, jobs, stop, result, cfg.max_attempts)
        if writes.urgent or not inflight or writes.due() == 0:
            with lease.begin() as conn:  # fenced: commits only while this run holds the lock
                writes.flush(conn)
            crashpoint("after_commit")
            writes = _Writes(sync, run_id, shard, failed_before)
        if progress:
            progress.update(requests=result.requests, delivered=result.delivered,
                            failed=result.failed + result.rejected)
        lease.keep()
    if lease.lost:
        raise lease.lost
    if jobs:  # stopped (the vendor refused the run): what never went to a sender was not sent
        with lease.begin() as conn:
            _mark(conn, run_id, [c.key for job in jobs for c in job.batch], "pending")


def _intend(sync, run_id: int, lease: state.Lease, batch: list[Change], attributes: frozenset[str]) -> bool:
    """Write-ahead intent, just before a request with non-idempotent ops goes: from now on
    the vendor may apply ``attributes``, so a run that dies before recording the answer leaves
    these users ``sending`` — settled at most once (:func:`settle_in_doubt`), never re-sent.
    Fenced: False (and the run stopping) when the lock is gone — its rows may be another
    run's to settle already, so the request must not go."""
    try:
        with lease.begin() as conn:
            for chunk in state.chunked([c.key for c in batch if not c.idempotent], 500):
                conn.execute(_p.update().where(_p.c.run_id == run_id, _p.c.user_key.in_(chunk))
                             .values(status="sending", in_flight=state.dumps(sorted(attributes))))
    except state.LeaseLost:
        return False
    return True


def _send(job: _Job, vendor, transport: Transport, limiter: RateLimiter, stop: threading.Event, lease, cfg,
          intend) -> _Sent:
    """Send one batch (its parts in order), retrying whole-request transient failures in place."""
    delay = job.not_before - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    built = None
    if job.shape is None:  # what each part carries (the parts go as built now, or afresh on a retry)
        built = _parts(vendor, job.batch)
        job.shape = [part.attributes for part in built]
    attempts, applied = job.attempts, frozenset()
    for i, attrs in enumerate(job.shape):
        sent = _send_part(job, i, attrs, vendor, transport, limiter, stop, lease, cfg, attempts, intend,
                          built[i] if built else None)
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


def _send_part(job: _Job, index: int, carried, vendor, transport, limiter, stop, lease, cfg, attempts: int,
               intend, req=None) -> _Sent:
    """``carried``: the attributes this part carries (None: the whole batch); ``req``: the part as
    built already (None: build it; every retry builds afresh: timestamps, nonces, signatures)."""
    risky = frozenset(a for c in job.batch for a, op, _ in c.ops if not op.idempotent and (carried is None or a in carried))
    # a once value is re-sent unchanged by a retry in the same run: harmless (at most once is
    # about a later run, whose value may differ); increments and appends are never retried blind
    idempotent = all(op.idempotent or op is Op.ONCE for c in job.batch for a, op, _ in c.ops
                     if carried is None or a in carried)
    while True:
        if stop.is_set():
            return _Sent(job, None, attempts)
        # the intent and the encoding come before the start slot: a wait on the state database
        # between the slot and the send (another thread's commit) would bunch the arrivals the
        # limiter spaced. Stopped while waiting: not sent, the rows go back to pending.
        if not risky <= job.intended:
            job.intended |= risky
            if not intend(job.batch, job.intended):
                return _Sent(job, None, attempts)
        prepared = transport.prepare(req) if req is not None else None
        start = limiter.acquire(len(job.batch))
        if stop.is_set():
            return _Sent(job, None, attempts)
        if prepared is None:
            req = _parts(vendor, job.batch)[index]
            prepared = transport.prepare(req)
        if not lease.ready():  # the last word before the request starts: the lease, on its clock
            return _Sent(job, None, attempts)
        crashpoint("before_send")
        sent_at = state.now()
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
            return _Sent(job, verdict, attempts, status, latency, sent_at)
        log.info("retrying %d user(s) after %s (attempt %d)", len(job.batch), verdict.code or status, attempts)
        req = None  # built afresh for the retry: timestamps, nonces, signatures
        time.sleep(verdict.wait or _backoff(cfg.backoff, attempts))


def _backoff(base: float, attempt: int) -> float:
    return min(60.0, base * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


def _record(sent: _Sent, writes: _Writes, jobs, stop, result: PushResult, max_attempts) -> None:
    """Turn one batch's verdict into snapshot, failure and batch rows (and follow-up jobs)."""
    v = sent.verdict
    batch = sent.job.batch
    if v is None:  # not sent (the run is stopping); parts acknowledged before are kept
        if sent.applied:
            writes.failures([(c, "retryable", None, STOPPED) for c in batch], sent)
        else:
            writes.mark([c.key for c in batch], "pending")
        return
    if v.kind is Kind.STOP:  # refused: not applied, no longer in flight
        writes.mark([c.key for c in batch], "pending")
    elif v.kind is Kind.SPLIT and len(batch) > 1:  # not applied; its halves go next (out again)
        writes.mark([c.key for c in batch], OUT)
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
        jobs.extend([_Job(batch[:half]), _Job(batch[half:])])
        writes.batch(sent, "split")
        return
    if retry_now:
        jobs.append(_Job(retry_now, sent.attempts, time.monotonic() + (v.wait or 0.5)))
        writes.mark([c.key for c in retry_now], OUT)  # no longer in flight (not applied), going again
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


class _Writes:
    """What finished requests leave to write — batch rows, delivered users, failures, plan
    statuses — written together in one transaction, a statement per kind (per 500 keys).

    Deliveries are gathered for up to ``FLUSH_SECONDS`` (or ``FLUSH_USERS``): at 100 requests
    a second, a transaction per answer costs the senders more GIL time than the HTTP does.
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
        self.failed_now: list[tuple[list, _Sent]] = []
        self.urgent, self.users, self.since = False, 0, None

    def due(self) -> float | None:
        """Seconds until these writes should be flushed (None: there is nothing to write)."""
        if self.since is None:
            return None
        return 0 if self.users >= self.FLUSH_USERS else max(0.0, self.since + self.FLUSH_SECONDS - time.monotonic())

    def batch(self, sent: _Sent, outcome: str) -> None:
        self.since = self.since or time.monotonic()
        self.batches.append(_batch_values(self.sync, self.run_id, self.shard, sent, outcome))

    def mark(self, keys: list[str], status: str) -> None:
        self.marks.setdefault(status, []).extend(keys)
        self.users += len(keys)
        self.urgent |= status != "delivered"

    def delivered(self, changes: list[Change]) -> None:
        self.mark([c.key for c in changes], "delivered")

    def failures(self, failed: list, sent: _Sent) -> None:
        if failed:
            self.failed_now.append((failed, sent))
            self.urgent = True

    def flush(self, conn) -> None:
        if self.batches:
            conn.execute(state.batches.insert(), self.batches)
        for failed, sent in self.failed_now:
            _failed(conn, self.sync, self.run_id, failed, sent)
        delivered = self.marks.get("delivered")
        if delivered:  # the snapshot moves only for the users the vendor acknowledged: to what the plan staged
            state.snapshot_from_plan(conn, self.sync.spec.name, self.run_id, delivered)
            state.clear_failures(conn, self.sync.spec.name, delivered, among=self.failed)
        for status, keys in self.marks.items():
            _mark(conn, self.run_id, keys, status)


def _delivered(conn, sync, run_id, changes: list[Change]) -> None:
    """Record users the vendor acknowledged (what a flush does for them; bench.phase times it)."""
    writes = _Writes(sync, run_id)
    writes.delivered(changes)
    writes.flush(conn)


def _failed(conn, sync, run_id, failed, sent: _Sent) -> None:
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
    _mark(conn, run_id, [e[0].key for e in entries], "failed")


def _mark(conn, run_id: int, keys: list[str], status: str) -> None:
    p = state.plan
    for chunk in state.chunked(keys, 500):
        conn.execute(p.update().where(p.c.run_id == run_id, p.c.user_key.in_(chunk)).values(status=status))


def _batch_row(conn, sync, run_id, shard, sent: _Sent, outcome: str) -> None:
    conn.execute(state.batches.insert().values(**_batch_values(sync, run_id, shard, sent, outcome)))


def _batch_values(sync, run_id, shard, sent: _Sent, outcome: str) -> dict:
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
        outcome=outcome, sent_at=sent.sent_at or state.now(), worker=sync.worker, task=sync.task)
