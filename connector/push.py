"""Push a staged plan: batches -> rate-limited concurrent requests -> verdicts -> state.

Workers send; the calling thread alone writes the sync tables, one transaction for
whatever finished together. A user's snapshot moves only when the vendor acknowledged
it. Retries follow the vendor's verdict: transient errors are retried with exponential
backoff (or the vendor's own wait); a request carrying increase/append ops is never
retried after an ambiguous failure (it may have been applied): its idempotent
attributes are re-sent next run, its non-idempotent ones are not.

A process can also die between "the vendor applied it" and "we recorded that". So a
request carrying non-idempotent ops is first marked ``sending`` in ``sync_plan`` (a
write-ahead intent, one small transaction just before it goes): rows a dead run left
``sending`` are settled by the same at-most-once rule (:func:`settle_in_doubt`).
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
from connector.transport import RateLimiter, Transport
from connector.vendors.base import Change, Kind, Op, Verdict, transport_verdict

log = logging.getLogger("usersync.push")
READ_CHUNK = 1000  # plan rows read at a time, while the previous ones' requests are out
# batches handed to the senders, per sender (in flight or next): while this thread reads the
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


def push(sync, run_id: int, shard: int | None = None, progress=None) -> PushResult:
    """Deliver the pending part of a run's plan (one shard, or all)."""
    cfg = sync.spec.vendor
    vendor = sync.client()
    concurrency = cfg.concurrency or vendor.concurrency
    transport = Transport(concurrency=concurrency, timeout=cfg.timeout, verify=cfg.verify_tls,
                          user_agent=f"usersync/{sync.version}")
    limiter = RateLimiter(cfg.rate_limit or vendor.rate_limit)
    result = PushResult()
    stop = threading.Event()
    feed = _Feed(sync, run_id, shard, vendor, transport)
    try:
        with ThreadPoolExecutor(concurrency, thread_name_prefix="push") as pool:
            _drain(sync, run_id, shard or 0, vendor, transport, limiter, pool, feed, stop, concurrency, result,
                   progress)
    finally:
        if feed.frozen:
            gc.unfreeze()
        transport.close()
    return result


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

    def __init__(self, sync, run_id: int, shard: int | None, vendor, transport: Transport):
        self.sync, self.vendor, self.transport = sync, vendor, transport
        self.chunks = _pending(sync, run_id, shard)
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
            self.vendor.prepare(self.transport.session, self.sync.spec)
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


def _pending(sync, run_id: int, shard: int | None):
    """Pending plan rows, a chunk at a time, as Changes (ordered by key for resumability)."""
    last = ""
    while True:
        q = sa.select(*_COLUMNS).where(_p.c.run_id == run_id, _p.c.status == "pending", _p.c.user_key > last)
        if shard is not None:
            q = q.where(_p.c.shard == shard)
        with sync.state.connect() as c:
            rows = c.execute(q.order_by(_p.c.user_key).limit(READ_CHUNK)).all()
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


def settle_in_doubt(sync, conn: sa.Connection, *where) -> int:
    """Settle plan rows left ``sending`` by a run that stopped mid-request (killed, interrupted).

    The vendor may have applied them, so the ambiguous-failure rule holds: their
    non-idempotent attributes in flight count as applied (never sent twice), the rest goes
    again next run; the users are recorded as ``in_doubt``, with one ``in_doubt`` batch
    row per run. ``where`` narrows the rows (a run, a shard, the sync's other runs).
    """
    rows = conn.execute(sa.select(_p.c.run_id, _p.c.in_flight, *_COLUMNS).where(_p.c.status == "sending", *where)
                        .order_by(_p.c.run_id, _p.c.in_flight, _p.c.user_key)).all()
    for (run_id, in_flight), group in itertools.groupby(rows, key=lambda r: r[:2]):
        changes = _load([r[2:] for r in group])
        keys = [c.key for c in changes]
        who = ", ".join(keys[:50]) + (f" and {len(keys) - 50} more" if len(keys) > 50 else "")
        sent = _Sent(_Job(changes), Verdict(Kind.RETRY, "in_doubt", f"{IN_DOUBT}: {who}", ambiguous=True), 0,
                     failing=frozenset(json.loads(in_flight)) if in_flight else None)
        _batch_row(conn, sync, run_id, 0, sent, "in_doubt")
        _failed(conn, sync, run_id, [(c, "in_doubt", None, IN_DOUBT) for c in changes], sent)
        log.warning("run %s: %d user(s) were in flight when it stopped; their increments/appends count as "
                    "applied (at most once), the rest is re-sent", run_id, len(changes))
    return len(rows)


def _drain(sync, run_id, shard, vendor, transport, limiter, pool, feed: _Feed, stop, concurrency, result, progress):
    cfg = sync.spec.vendor
    jobs = feed.jobs
    inflight: set[Future] = set()
    intend = functools.partial(_intend, sync, run_id)
    beat = state.Heartbeat(sync.state, sync.spec.name, run_id, sync.spec.lock_timeout)
    failed_before = state.failure_keys(sync.state, sync.spec.name)  # a delivery clears only theirs
    writes = _Writes(sync, run_id, shard, failed_before)
    while True:
        # the run's first request goes alone: a bad credential costs one request, not a burst
        limit = concurrency * AHEAD if result.requests else 1
        while len(jobs) < limit and not stop.is_set() and feed.fill():
            pass
        while jobs and len(inflight) < limit and not stop.is_set():
            inflight.add(pool.submit(_send, jobs.popleft(), vendor, transport, limiter, stop, cfg, intend))
        if not inflight:
            break
        done, inflight = wait(inflight, timeout=writes.due(), return_when=FIRST_COMPLETED)
        if done:
            crashpoint("vendor_answered")
        for fut in done:
            sent = fut.result()
            result.requests += sent.attempts - sent.job.attempts
            _record(sent, writes, jobs, stop, result, cfg.max_attempts)
        if writes.urgent or not inflight or writes.due() == 0:
            with sync.state.begin() as conn:
                writes.flush(conn)
            crashpoint("after_commit")
            writes = _Writes(sync, run_id, shard, failed_before)
        if progress:
            progress.update(requests=result.requests, delivered=result.delivered,
                            failed=result.failed + result.rejected)
        beat()


def _intend(sync, run_id: int, batch: list[Change], attributes: frozenset[str]) -> None:
    """Write-ahead intent, just before a request with non-idempotent ops goes: from now on
    the vendor may apply ``attributes``, so a run that dies before recording the answer leaves
    these users ``sending`` — settled at most once (:func:`settle_in_doubt`), never re-sent."""
    with sync.state.begin() as conn:
        for chunk in state.chunked([c.key for c in batch if not c.idempotent], 500):
            conn.execute(_p.update().where(_p.c.run_id == run_id, _p.c.user_key.in_(chunk))
                         .values(status="sending", in_flight=state.dumps(sorted(attributes))))


def _send(job: _Job, vendor, transport: Transport, limiter: RateLimiter, stop: threading.Event, cfg, intend) -> _Sent:
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
        sent = _send_part(job, i, attrs, vendor, transport, limiter, stop, cfg, attempts, intend,
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


def _send_part(job: _Job, index: int, carried, vendor, transport, limiter, stop, cfg, attempts: int,
               intend, req=None) -> _Sent:
    """``carried``: the attributes this part carries (None: the whole batch); ``req``: the part as
    built already (None: build it; every retry builds afresh: timestamps, nonces, signatures)."""
    risky = frozenset(a for c in job.batch for a, op, _ in c.ops if not op.idempotent and (carried is None or a in carried))
    idempotent = not risky
    while True:
        if stop.is_set():
            return _Sent(job, None, attempts)
        limiter.acquire()
        if req is None:
            req = _parts(vendor, job.batch)[index]
        if not risky <= job.intended:
            job.intended |= risky
            intend(job.batch, job.intended)
        crashpoint("before_send")
        sent_at = state.now()
        t0 = time.monotonic()
        attempts += 1
        try:
            resp = transport.send(req)
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
    if v is None or v.kind is Kind.STOP or (v.kind is Kind.SPLIT and len(batch) > 1):
        writes.mark([c.key for c in batch], "pending")  # not applied: no longer in flight
    if v is None:  # never sent (the run was stopped)
        return
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
        writes.mark([c.key for c in retry_now], "pending")
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
    acknowledged — and, after an ambiguous failure, the non-idempotent attributes that
    may have landed (never re-sent: at most once); everything else goes again next run.
    """
    if not failed:
        return
    staged = state.staged_rows(conn, sync.spec.name, run_id, [c.key for c, *_ in failed])
    partial = []
    for change, cls, _, _ in failed:
        applied = set(sent.applied)
        if cls == "in_doubt":
            applied |= {a for a, op, _ in change.ops if not op.idempotent
                        and (sent.failing is None or a in sent.failing)}
        if applied:
            _, payload, before = staged[change.key]
            kept = {a: v for a, v in before.items() if a not in applied}
            kept.update({a: payload[a] for a in applied if a in payload})
            partial.append((change.key, kept, 0))  # hash 0: the next run diffs this user again
    state.upsert_snapshot(conn, sync.spec.name, run_id, partial)
    state.record_failures(conn, sync.spec.name, run_id, [
        (c.key, staged[c.key][0], cls, code, msg) for c, cls, code, msg in failed])
    _mark(conn, run_id, [c.key for c, *_ in failed], "failed")


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
