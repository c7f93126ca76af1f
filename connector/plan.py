"""Plan a run: extract -> map -> diff against the snapshot -> stage the deltas.

The diff runs in two passes. First a 64-bit hash of each user's source row (and the
mapping) against the snapshot's: unchanged users cost one hash and one comparison and
are never coerced. The users whose hash moved are mapped (every mapped column coerced to
the vendor's wire type, a column at a time; a row that cannot be coerced sets its user
aside with a reason), then compared attribute by attribute against the last *delivered*
payload, which decides the ops each update rule needs. The result is staged in
``sync_plan`` so pushes (one process or many Airflow workers) read it by shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import decimal
import json
import logging
import zlib
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from connector import db, extract, mapping as mappings, rowhash, state
from connector.state import plans
from connector.coerce import is_text, decode_column
from connector.faults import crashpoint
from connector.vendors.base import Change, Op

log = logging.getLogger("usersync.plan")
MISSING = object()


@dataclasses.dataclass
class Plan:
    run_id: int
    users_read: int = 0
    users_changed: int = 0  # users with something to send
    users_invalid: int = 0  # set aside while mapping (a value or the whole user), newly: counted against the run
    set_aside_before: int = 0  # set aside again for what was set aside before, unchanged: not counted
    rows_without_identity: int = 0  # set aside, logged: no user to count them against
    users_settled: int = 0  # hash moved, nothing to send
    reread: int = 0  # users a first pass found moved, read again whole
    snapshot_size: int = 0
    existing_changed: int = 0  # changed users already in the snapshot
    per_attribute: Counter = dataclasses.field(default_factory=Counter)
    nulled: Counter = dataclasses.field(default_factory=Counter)
    samples: list[Change] = dataclasses.field(default_factory=list)
    watermark: Any = None
    guard: str | None = None
    mapping: mappings.MappingChange | None = None  # the mapping changed since it was last delivered
    dropped: Counter = dataclasses.field(default_factory=Counter)  # removed attributes: users that held each

    def check_guard(self, guard) -> str | None:
        """Why this plan is implausibly large, or None."""
        n = self.snapshot_size
        if n < max(guard.min_users, 1):
            return None
        if self.existing_changed / n > guard.max_changed_fraction:
            return (f"{self.existing_changed} of {n} known users changed "
                    f"({self.existing_changed / n:.0%} > max_changed_fraction {guard.max_changed_fraction:.0%})")
        for attr, count in self.nulled.most_common(1):
            if count / n > guard.max_nulled_fraction:
                return (f"attribute '{attr}' {self._nulled_by(attr)} for {count} of {n} known users "
                        f"({count / n:.0%} > max_nulled_fraction {guard.max_nulled_fraction:.0%})")
        return None

    def _nulled_by(self, attr: str) -> str:
        m = self.mapping
        if m is not None and attr in m.unset:
            return "would be unset by the mapping change (it left the mapping and unset_removed names it)"
        if m is not None and attr in m.changed:
            return f"would become NULL because of the mapping change ({', '.join(m.changed[attr])} changed)"
        return "became NULL"


def build(sync, run_id: int, *, mode: str, since: Any = None, window=None, user_ids=None,
          stage: bool = True, keep_plan: bool = False, progress=None,
          mapping: mappings.MappingChange | None = None) -> Plan:
    """Read the source, diff it and (with ``stage``) write the plan and settle hashes;
    ``mapping``: how the mapping changed since it was last delivered. ``keep_plan`` without
    ``stage`` (a dry run): write the plan rows only, to be read back (the run's page shows
    them); the next run of the sync deletes them, as a dead run's."""
    spec = sync.spec
    plan = Plan(run_id, mapping=mapping)
    whole = (since is None or not spec.cursor) and window is None and not user_ids
    hashes = Snapshot(sync.state, spec.name, whole=whole)
    seen = KeySet()  # every key read so far
    duplicates: set[str] = set()
    if stage:
        state.clear_unmapped(sync.state, spec.name, [a.attribute for a in spec.mapping])
    failed = state.failure_keys(sync.state, spec.name)  # settling a user clears only theirs

    moved = _first_pass(sync, plan, hashes, seen, duplicates, progress) if whole and mode != "full" else None
    if moved is None and plan.users_read:  # the first pass gave up: one full read instead
        plan, seen, duplicates = Plan(run_id, mapping=mapping), KeySet(), set()
    admitted = seen if moved is None else KeySet()  # the first pass saw every key once already
    if user_ids:
        chunks = extract.read(sync.warehouse, sync.source, spec, identities=_identities(spec, user_ids))
    elif moved is not None:
        chunks = extract.read(sync.warehouse, sync.source, spec, identities=moved)
    else:
        chunks = extract.ahead(extract.read(sync.warehouse, sync.source, spec, since=since, window=window),
                               sync.warehouse)
    for frame in _with_failures(sync, chunks, seen, retry=not user_ids):
        scanned = moved is not None and not frame.attrs.get("retry")  # counted by the first pass
        if not scanned:
            plan.users_read += len(frame)
            _watermark(plan, spec, frame)
        _plan_chunk(sync, plan, frame, hashes, admitted, duplicates, failed, mode=mode, stage=stage,
                    keep_plan=keep_plan)
        crashpoint("extract_chunk")  # (each chunk's staging commit renewed the lock: fenced)
        if progress:
            progress.update(rows=0 if scanned else len(frame), planned=plan.users_changed)
    if duplicates and stage:
        _reject_duplicates(sync, plan, duplicates)
    plan.snapshot_size = len(hashes)
    if plan.set_aside_before:
        log.info("%d user(s) still have a value set aside before, unchanged since: not sent, not counted again "
                 "(see sync_failures)", plan.set_aside_before)
    if plan.rows_without_identity:
        log.warning("%d row(s) without identity set aside", plan.rows_without_identity)
    return plan


def _first_pass(sync, plan: Plan, hashes: Snapshot, seen: KeySet, duplicates: set[str], progress) -> list | None:
    """A full scan's first pass, where the database hashes rows and users can be read back
    by identity: only identities and the database's row hash, against the snapshot's. The
    identities of the users whose hash moved (to be read whole), or None: not possible here,
    or more than a tenth of the snapshot moved (then one full read is cheaper)."""
    spec = sync.spec
    if not len(hashes) or not rowhash.hashes_in(sync.warehouse) or not extract.keyed(sync.source, spec):
        return None
    id_cols = list(spec.identity_columns.values())
    fingerprint = _fingerprint(sync)
    moved, moved_keys = [], []
    chunks = extract.ahead(extract.read(sync.warehouse, sync.source, spec, keys_only=True), sync.warehouse)
    with contextlib.closing(chunks):
        for frame in chunks:
            plan.users_read += len(frame)
            _watermark(plan, spec, frame)
            frame, digests = _admit(plan, frame, seen, duplicates, id_cols)
            known, old_hash = hashes.lookup(frame.index.to_numpy(), digests)
            changed = (old_hash != rowhash.row_hashes(frame, [], fingerprint)) | ~known
            moved_keys.extend(frame.index[changed])
            moved.extend(frame.loc[changed, id_cols].to_dict("records"))
            if len(moved) > len(hashes) / 10:
                log.info("%d of %d users moved by the %d rows read; reading the source whole", len(moved),
                         len(hashes), plan.users_read)
                return None
            if progress:
                progress.update(rows=len(frame))
    moved = [i for i, k in zip(moved, moved_keys) if k not in duplicates]
    plan.reread = len(moved)
    log.info("%d rows scanned by the database's row hash; %d users moved, read again whole",
             plan.users_read, len(moved))
    return moved


def _watermark(plan: Plan, spec, frame: pd.DataFrame) -> None:
    if spec.cursor and not frame.attrs.get("retry") and frame[spec.cursor].notna().any():
        top = db.plain(frame[spec.cursor].dropna().max())
        plan.watermark = top if plan.watermark is None else max(plan.watermark, top)


def _with_failures(sync, chunks, seen: KeySet, retry: bool):
    """The scan's chunks, then users who failed before and were not in the scan."""
    yield from chunks
    if not retry:
        return
    identities = state.failed_identities(sync.state, sync.spec.name)
    if not identities:
        return
    cols = list(sync.spec.identity_columns.values())
    read = seen.contains(digest(np.array([key_of(tuple(i[c] for c in cols)) for i in identities], dtype=object)))
    todo = [i for i, done in zip(identities, read) if not done]
    for frame in extract.read(sync.warehouse, sync.source, sync.spec, identities=todo):
        frame.attrs["retry"] = True
        yield frame


def _plan_chunk(sync, plan: Plan, frame: pd.DataFrame, hashes: Snapshot, seen: KeySet, duplicates, failed,
                *, mode: str, stage: bool, keep_plan: bool = False) -> None:
    spec = sync.spec
    id_cols = spec.identity_columns
    frame, digests = _admit(plan, frame, seen, duplicates, list(id_cols.values()))

    # diff, first pass: hash of the source row against the snapshot's
    row_hash = rowhash.row_hashes(frame, [a.column for a in spec.mapping], _fingerprint(sync))
    known, old_hash = hashes.lookup(frame.index.to_numpy(), digests)
    moved = (old_hash != row_hash) | ~known if mode != "full" else np.ones(len(frame), dtype=bool)
    frame, row_hash, known = frame[moved], row_hash[moved], known[moved]

    # map the moved rows: coerce every attribute. A value that cannot be coerced, or that the
    # vendor documents it can never take, is set aside: that attribute (left at the vendor as
    # last delivered, the user's other attributes go), or with ``on_invalid: user`` the user
    vendor, wire, aside = sync.vendor_cls, {}, {}
    for attr in spec.mapping:
        coercer = sync.coercers[attr.attribute]
        values, errors = vendor.refuse(coercer, *coercer(frame[attr.column], attr.attribute), attr.attribute)
        wire[attr.attribute] = values
        for k, reason in errors.dropna().items():
            aside.setdefault(k, {})[attr.attribute] = reason
    cand = pd.DataFrame(wire, index=frame.index)
    whole: dict[str, str] = {}  # users set aside as a whole: key -> reason
    if aside and spec.on_invalid == "user":
        whole, aside = {k: next(iter(r.values())) for k, r in aside.items()}, {}
        good = ~cand.index.isin(list(whole))
        cand, row_hash_kept, known = cand[good], row_hash[good], known[good]
    else:
        row_hash_kept = row_hash

    # second pass: attribute by attribute against the last delivered payload
    old = hashes.payloads(cand.index[known])
    staged, settled, dumps, rules = [], [], db.dumps, _rules(sync)
    change_of_mapping = plan.mapping
    strict = change_of_mapping.strict if change_of_mapping else frozenset()
    src_ids = frame.loc[cand.index, list(id_cols.values())]
    names = list(cand.columns)
    decoded = zip(*(decode_column(sync.coercers[n], cand[n]) for n in names)) if len(cand) else ()
    for key, row, h, ident_row in zip(cand.index, (dict(zip(names, values)) for values in decoded),
                                      row_hash_kept, src_ids.itertuples(index=False)):
        before = db.loads(old[key]) if key in old else None
        if aside and key in aside:
            row.update(dict.fromkeys(aside[key], SET_ASIDE))
        unset = []
        if change_of_mapping is not None and before is not None:
            before, unset, dropped = change_of_mapping.strip(before)
            plan.dropped.update(dropped)
        ops, payload, nulled = _ops(rules, row, before, full=mode == "full", strict=strict)
        if unset:
            ops += unset
            nulled += [a for a, _, _ in unset]
        if nulled:
            plan.nulled.update(nulled)
        ident_values = [v if type(v) is str else identity_value(v) for v in ident_row]
        identity, source_identity = dict(zip(id_cols, ident_values)), dict(zip(id_cols.values(), ident_values))
        if not ops:
            settled.append((key, payload, int(h)))
            continue
        change = Change(key, identity, tuple(ops))
        reason = vendor.invalid(change)
        if reason:
            whole[key] = reason
            continue
        plan.users_changed += 1
        # the guard weighs real changes: a full resync re-sends unchanged values, which is no risk
        plan.existing_changed += before is not None and (
            payload != before if change_of_mapping is None else change_of_mapping.data_changed(before, payload))
        for attr, _, _ in ops:
            plan.per_attribute[attr] += 1
        if len(plan.samples) < 5:
            plan.samples.append(change)
        staged.append(plans.PlanRow(plan.run_id, key, zlib.crc32(key.encode()) % spec.shards, dumps(identity),
                                    dumps(source_identity), dumps(ops), dumps(payload),  # an Op as its value
                                    int(h)))
    plan.users_settled += len(settled)
    with contextlib.ExitStack() as tx:  # written only while this run holds the lock (fenced)
        c = tx.enter_context(state.fenced(sync.state, spec.name, plan.run_id)) if stage or keep_plan else None
        rejected, cleared = _set_aside(sync, plan, c if stage else None, frame, row_hash, whole, aside, failed)
        if not stage:
            if keep_plan:  # a dry run's plan rows; nothing else moves: no snapshot row, no failure row
                state.stage(c, staged)
            return
        state.stage(c, staged)
        state.upsert_snapshot(c, spec.name, plan.run_id, settled)
        state.clear_failures(c, spec.name, [k for k, _, _ in settled], among=failed)
        for attribute, keys in cleared.items():
            state.clear_failures(c, spec.name, keys, attribute=attribute)
        state.set_aside(c, spec.name, plan.run_id, rejected)


SET_ASIDE = object()  # in a row for ``_ops``: this attribute's value was set aside, leave it be


def _set_aside(sync, plan: Plan, conn, frame: pd.DataFrame, row_hash: np.ndarray, whole: dict[str, str],
               aside: dict[str, dict[str, str]], failed: set[str] | None):
    """The failure rows this chunk's set-aside values and users need, and the set-aside
    attributes to forget ({attribute: keys}: their values changed, so they were planned again).

    What was set aside is remembered by its hash (the attribute's source value; the source
    row for a whole user): seen again unchanged, it is no new failure — not counted against
    the run, not written again. Only new ones count in ``plan.users_invalid``."""
    spec = sync.spec
    keys = [k for k in frame.index if failed is None or k in failed]
    if not (keys or whole or aside):  # the usual chunk: nothing set aside, now or before
        return [], {}
    if conn is None:  # a dry run: what the sync tables hold, read without a transaction
        with sync.state.connect() as c:
            prior = state.open_failures(c, spec.name, keys)
    else:
        prior = state.open_failures(conn, spec.name, keys)
    columns = {a.attribute: a.column for a in spec.mapping}
    cells: dict[str, pd.Series] = {}
    rows_by_key = pd.Series(row_hash, index=frame.index) if whole else None
    rows, new = [], set()
    for key, reason in whole.items():
        h = int(rows_by_key[key])
        if prior.get(key, {}).get(state.WHOLE) != ("invalid", h):
            rows.append((key, state.WHOLE, _source_identity(frame, key, spec.identity_columns), "invalid", None,
                         reason, h))
            new.add(key)
    for key, attrs in aside.items():
        for attr, reason in attrs.items():
            if attr not in cells:
                cells[attr] = pd.Series(rowhash.column_hashes(frame[columns[attr]]).view(np.int64), index=frame.index)
            h = int(cells[attr][key])
            if prior.get(key, {}).get(attr) != ("invalid", h):
                rows.append((key, attr, _source_identity(frame, key, spec.identity_columns), "invalid", None,
                             reason, h))
                new.add(key)
    cleared: dict[str, list[str]] = {}
    for key, held in prior.items():
        for attr in held:
            if attr != state.WHOLE and attr not in aside.get(key, ()):
                cleared.setdefault(attr, []).append(key)
    plan.users_invalid += len(new)
    plan.set_aside_before += len((set(whole) | set(aside)) - new)
    return rows, cleared


def _admit(plan: Plan, frame: pd.DataFrame, seen: KeySet, duplicates: set[str],
           id_cols: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The chunk's rows indexed by user key, without those whose identity is empty or read
    twice (set aside), and their key digests; those keys join ``seen``."""
    keys, bad_identity = _keys(frame, id_cols)
    frame = frame.set_axis(pd.Index(keys, dtype=object))
    for i in np.flatnonzero(bad_identity):  # no user to deliver to, nor to remember it by: logged each time read
        log.warning("row with empty identity set aside: %s", _row_text(frame.iloc[i], id_cols))
        plan.rows_without_identity += 1
    ok = ~bad_identity
    ok_keys, digests = keys[ok], digest(keys)
    twice = pd.Series(digests[ok, 0]).duplicated(keep=False).to_numpy(copy=True)  # by the digests' first halves,
    if twice.any():  # confirmed by the keys themselves
        twice[twice] = pd.Series(ok_keys[twice], dtype=object).duplicated(keep=False).to_numpy()
    duplicates.update(ok_keys[twice | seen.contains(digests[ok])])
    dup_mask = np.array([k in duplicates for k in keys]) if duplicates else np.zeros(len(keys), dtype=bool)
    usable = ok & ~dup_mask
    seen.add(digests[usable])
    return frame[usable], digests[usable]


def _fingerprint(sync) -> str:
    """What the wire form of a source row depends on (the mapping's specs): moves every row hash
    when it changes, so a mapping backfill re-reads the users its crashed attempt did not settle."""
    return repr(list(mappings.specs(sync.spec).items()))


def digest(keys: np.ndarray) -> np.ndarray:
    """128-bit digests of user keys (two keyed SipHashes): an (n, 2) array of uint64.

    The plan's memory per user is these 16 bytes (plus a row hash), not a Python string.
    """
    pair = np.empty((len(keys), 2), dtype=np.uint64)
    pair[:, 0] = pd.util.hash_array(keys, hash_key="usersync-keys-a1", categorize=False)
    pair[:, 1] = pd.util.hash_array(keys, hash_key="usersync-keys-b2", categorize=False)
    return pair


class Sorted:
    """Key digests ordered by their first 64 bits (with values that travel with them),
    searched by those and confirmed by the second 64: integer sorts and searches, several
    times faster than on 16-byte strings."""

    def __init__(self, digests: np.ndarray, *values: np.ndarray):
        order = np.argsort(digests[:, 0])
        self.hi, self.lo = digests[order, 0], digests[order, 1]
        self.values = [v[order] for v in values]
        self.ties = bool((self.hi[1:] == self.hi[:-1]).any())  # first halves that repeat

    def __len__(self) -> int:
        return len(self.hi)

    def digests(self) -> np.ndarray:
        return np.column_stack((self.hi, self.lo))

    def find(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position, found) of each digest."""
        hi, lo, n = digests[:, 0], digests[:, 1], len(self.hi)
        if not n:
            return np.zeros(len(hi), dtype=np.intp), np.zeros(len(hi), dtype=bool)
        order = np.argsort(hi)  # searched in order, each search starts where the last ended
        first = np.empty(len(hi), dtype=np.intp)
        first[order] = np.searchsorted(self.hi, hi[order])
        pos = np.minimum(first, n - 1)
        same_hi = self.hi[pos] == hi
        found = same_hi & (self.lo[pos] == lo)
        if self.ties:  # 2^-64 odds a pair: walk the run of equal first halves, in any order
            for i in np.flatnonzero(same_hi & ~found):
                j = first[i]
                while j < n and self.hi[j] == hi[i] and not found[i]:
                    found[i], pos[i] = self.lo[j] == lo[i], j
                    j += 1
        return pos, found


class KeySet:
    """A set of key digests kept as a few sorted runs, merged like a binary counter."""

    def __init__(self):
        self.runs: list[Sorted] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def add(self, digests: np.ndarray) -> None:
        self.runs.append(Sorted(digests))
        while len(self.runs) > 1 and len(self.runs[-1]) >= len(self.runs[-2]):
            last = self.runs.pop()
            self.runs[-1] = Sorted(np.concatenate([self.runs[-1].digests(), last.digests()]))

    def contains(self, digests: np.ndarray) -> np.ndarray:
        found = np.zeros(len(digests), dtype=bool)
        for run in self.runs:
            found |= run.find(digests)[1]
        return found


class Snapshot:
    """The snapshot's row hashes, looked up a chunk at a time.

    A run that reads few users (incremental, by cursor) asks the table for their keys (the
    payloads come along, for the second pass of those whose hash moved); once a run has
    read more than a twentieth of the snapshot, the whole of it is loaded, sorted (a 16-byte
    key digest and the row hash: 24 bytes a user), and looked up in memory.
    A full scan (``whole``) starts loading it on a thread at once, while the first chunk is
    read: the database's work and the waits for it overlap the read. The snapshot is
    counted on a thread too; until the count is in, lookups go by key.
    """

    def __init__(self, engine, sync: str, *, whole: bool = False):
        self.engine, self.sync, self.whole = engine, sync, whole
        self.read = 0
        self.loaded: Sorted | None = None
        self.fetched: dict[str, tuple[int, str]] = {}  # the last keys asked for one by one: hash, payload
        self.size: int | Future[int]
        self.loading: Future[Sorted] | None = None
        if db.threads_share(engine):  # the count (and the load) run beside the first chunk's read
            pool = ThreadPoolExecutor(2, thread_name_prefix="usersync-snapshot")
            self.size = pool.submit(self._count)
            self.loading = pool.submit(self._load) if whole else None
            pool.shutdown(wait=False)
        else:
            self.size = self._count()

    def __len__(self) -> int:
        if isinstance(self.size, Future):
            self.size = self.size.result()
        return self.size

    def _count(self) -> int:
        s = state.snapshot
        with self.engine.connect() as c:
            if c.dialect.name == "postgresql" and not self.whole:  # one backend: nothing waits for it (lookup),
                c.execute(sa.text("SET LOCAL max_parallel_workers_per_gather = 0"))  # and the read has the cores
            return c.execute(sa.select(sa.func.count()).select_from(s).where(s.c.sync == self.sync)).scalar()

    def lookup(self, keys: np.ndarray, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(known, row hash or 0) for each key (``digests``: theirs)."""
        self.read += len(keys)
        counting = isinstance(self.size, Future) and not self.size.done()
        # while the count runs, by key: at worst that costs what reading these users did
        if self.loaded is None and not self.whole and (counting or self.read <= len(self) / 20):
            # the moved among them are diffed against their payloads next
            self.fetched = found = state.snapshot_rows(self.engine, self.sync, keys)
            return (np.array([k in found for k in keys], dtype=bool),
                    np.array([found[k][0] if k in found else 0 for k in keys], dtype=np.int64))
        if self.loaded is None:
            self.loaded = self.loading.result() if self.loading else self._load()
        self.fetched = {}
        pos, known = self.loaded.find(digests)
        if not known.any():
            return known, np.zeros(len(keys), dtype=np.int64)
        return known, np.where(known, self.loaded.values[0][pos], 0)

    def _load(self) -> Sorted:
        parts = [(digest(np.array(k, dtype=object)), np.array(h, dtype=np.int64))
                 for k, h in state.snapshot_hashes(self.engine, self.sync)]
        known, hashes = zip(*parts) if parts else ([np.empty((0, 2), np.uint64)], [np.empty(0, np.int64)])
        return Sorted(np.concatenate(known), np.concatenate(hashes))

    def payloads(self, keys) -> dict[str, str]:
        """The last delivered payloads (JSON) of some of the keys just looked up."""
        rows = self.fetched if all(k in self.fetched for k in keys) else state.snapshot_rows(self.engine, self.sync, keys)
        return {k: rows[k][1] for k in keys if k in rows}


def _rules(sync) -> list[tuple[str, str, str]]:
    """(attribute, the vendor's rule, NULL policy) of each mapped attribute, for ``_ops``."""
    return [(a.attribute, sync.vendor_cls.rules[a.rule], a.null) for a in sync.spec.mapping]


def _ops(rules: list[tuple[str, str, str]], row: dict[str, Any], before: dict[str, Any] | None, *, full: bool,
         strict: frozenset[str] = frozenset()):
    """The ops that bring the vendor from ``before`` (last delivered) to ``row`` (decoded
    values, None for NULL), the payload after them, and the attributes that became NULL.
    ``strict``: attributes whose mapping changed, equal only when their wire text is (3 is
    not 3.0 there, nor true 1)."""
    payload = dict(before or {})
    ops: list[tuple[str, Op, Any]] = []
    nulled: list[str] = []
    for name, rule, null in rules:
        new = row[name]
        if new is SET_ASIDE:
            continue
        old = payload.get(name, MISSING)
        # unchanged: no rule sends anything (most attributes of a changed user); an unknown
        # vendor value (state.UNKNOWN: a send was never confirmed) equals no value, so it goes again;
        # an attribute the mapping changed (``strict``) compares by its wire text (True vs 1)
        same = new == old and (not strict or name not in strict or db.dumps(new) == db.dumps(old))
        if same and not full:
            continue
        if new is None:
            if old is MISSING or old is None:
                continue
            if old != state.UNKNOWN:  # the guard counts values that became NULL, not unconfirmed ones
                nulled.append(name)
            if null == "skip" or rule == "once":
                continue
            if null == "unset":
                ops.append((name, Op.UNSET, None))
                del payload[name]
            else:
                ops.append((name, Op.SET, None))
                payload[name] = None
            continue
        if rule == "once":  # non-idempotent: its request gets an intent, settled at most once
            if old is MISSING:
                ops.append((name, Op.ONCE, new))
                payload[name] = new
        elif rule == "set":
            if full or not same:
                ops.append((name, Op.SET, new))
                payload[name] = new
        elif rule == "increase":
            delta = _difference(new, old if isinstance(old, (int, float)) else 0)
            if delta:
                ops.append((name, Op.INCREASE, delta))
                payload[name] = new
        elif rule in ("append", "list"):
            had = old if isinstance(old, list) else []
            added = [x for x in new if x not in had]
            removed = [x for x in had if x not in new] if rule == "list" else []
            if added:
                ops.append((name, Op.APPEND, added))
            if removed:
                ops.append((name, Op.REMOVE, removed))
            if added or removed:
                payload[name] = new if rule == "list" else had + added
        else:  # pragma: no cover - config validation keeps rules known
            raise ValueError(f"unknown rule {rule}")
    return ops, payload, nulled


def _difference(new: int | float, old: int | float) -> int | float:
    """``new - old`` exactly as the wire has them: integers as integers; otherwise the
    difference of the two numbers' shortest decimal texts (what their JSON says), as the
    double nearest it (0.3 - 0.1 is 0.2, not 0.19999999999999998; nothing is cut off)."""
    if type(new) is int and type(old) is int:
        return new - old
    return float(decimal.Decimal(repr(new)) - decimal.Decimal(repr(old)))


def _reject_duplicates(sync, plan: Plan, duplicates: set[str]) -> None:
    """Users whose identity appears more than once: none of their rows is trusted."""
    keys = sorted(duplicates)
    with state.fenced(sync.state, sync.spec.name, plan.run_id) as c:
        plan.users_changed -= plans.drop_keys(c, plan.run_id, keys)
        prior = state.open_failures(c, sync.spec.name, keys)
        new = [k for k in keys if prior.get(k, {}).get(state.WHOLE, (None,))[0] != "invalid"]
        # no identity kept: the rows are re-read only when they change (and so pass the cursor)
        state.record_failures(c, sync.spec.name, plan.run_id, [
            (k, {}, "invalid", None, "duplicate identity in the source") for k in new])
    plan.users_invalid += len(new)  # set aside before: no new failure
    plan.set_aside_before += len(keys) - len(new)
    log.warning("%d identities appear more than once in the source; set aside: %s", len(keys), ", ".join(keys[:5]))


def _keys(frame: pd.DataFrame, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The user key of each row ('a|b' for composite identities) and which are empty."""
    parts = []
    bad = np.zeros(len(frame), dtype=bool)
    for c in cols:
        s = frame[c]
        if is_text(s):
            text = np.array([v.strip() if isinstance(v, str) else "" for v in s.to_numpy(dtype=object)], dtype=object)
        else:
            text = np.array([_key_part(v) or "" for v in s.to_numpy(dtype=object)], dtype=object)
        bad |= text == ""
        parts.append(text)
    if len(parts) == 1:
        return parts[0], bad
    return np.array(["|".join(p) for p in zip(*parts)], dtype=object), bad


def _key_part(v: Any) -> Any:
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def key_of(values: tuple) -> str:
    return "|".join(_key_part(v) or "" for v in values)


def _identities(spec, user_ids: list[str]) -> list[dict[str, Any]]:
    cols = list(spec.identity_columns.values())
    return [dict(zip(cols, str(u).split("|"))) for u in user_ids]


def _source_identity(frame: pd.DataFrame, key: str, id_cols: dict[str, str]) -> dict[str, Any]:
    row = frame.loc[key]
    return {c: identity_value(row[c]) for c in id_cols.values()}


def identity_value(v: Any) -> Any:
    """An identity value as its JSON keeps it: a datetime as its ``str()``, the text its user
    key was built from (JSON's own ISO form would not match that key when re-read)."""
    v = db.plain(v)
    return str(v) if isinstance(v, dt.datetime) else v


def _row_text(row: pd.Series, cols) -> str:
    return json.dumps({c: str(row[c]) for c in cols}, ensure_ascii=False)
