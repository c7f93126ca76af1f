"""One sync run, top-down: :func:`start` (preflight, begin, plan, guard) -> :func:`push` -> :func:`finalize`.

This module is the whole life of a run. The CLI calls :func:`run`, which does the three
steps in one process; the Airflow DAG calls the same three as tasks (``start`` in the plan
task, ``push`` once per shard of :func:`shards`, then ``finalize``). What a run is asked to
do is one :class:`Options` for both. State passes between the steps through the sync
tables, never through XCom.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa

from connector import __version__, connections, db, extract, mapping as mappings, migrations, plan as planning
from connector import push as pushing, state, vendors
from connector.state import plans
from connector.config import Config, ConfigError, SyncSpec
from connector.faults import crashpoint

log = logging.getLogger("usersync")


class Sync:
    """A validated sync with its engines, vendor class and coercers: what every step needs."""

    version = __version__

    def __init__(self, cfg: Config, spec: SyncSpec):
        self.cfg, self.spec = cfg, spec
        self.vendor_cls = vendors.get(spec.vendor.type)
        self.coercers = {a.attribute: self.vendor_cls.types[a.type.lower()] for a in spec.mapping}
        self.warehouse = db.make_engine(cfg.warehouse)
        self.state = self.warehouse if cfg.state_url == cfg.warehouse else db.make_engine(cfg.state_url)
        check_state(cfg, self.state, spec.name)
        upgrade_state(cfg, self.state, spec.name)
        self._source: sa.FromClause | None = None
        # who pushes, recorded on each sync_batches row; an Airflow push task sets both for itself
        self.worker, self.task = socket.gethostname(), None

    @property
    def source(self) -> sa.FromClause:
        if self._source is None:
            self._source = self._check_source()
        return self._source

    def _check_source(self) -> sa.FromClause:
        """The source exists and has every configured column — else a ConfigError."""
        spec, path = self.spec, self.cfg.path
        field = "source.sql" if spec.source.sql else "source.table"
        try:
            src = extract.source(self.warehouse, self.cfg, spec)
        except sa.exc.NoSuchTableError:
            raise ConfigError(path, f"table {spec.source.table!r} not found in the warehouse", spec.name, field) from None
        except sa.exc.OperationalError as e:
            raise ConfigError(path, f"cannot read the source: {e.orig}", spec.name, field) from None
        have = set(src.c.keys())
        for i, a in enumerate(spec.mapping):
            if a.column not in have:
                raise ConfigError(path, f"unknown column {a.column!r} (source has: {', '.join(sorted(have))})",
                                  spec.name, f"mapping[{i}].column")
        for field_, col in spec.identity_columns.items():
            if col not in have:
                raise ConfigError(path, f"unknown identity column {col!r}", spec.name, "identity")
        if spec.cursor and spec.cursor not in have:
            raise ConfigError(path, f"unknown cursor column {spec.cursor!r}", spec.name, "cursor")
        return src

    def client(self) -> vendors.Vendor:
        """The vendor client with its credentials resolved (env or Airflow connection)."""
        v = self.spec.vendor
        creds, settings, base_url = dict(v.credentials), dict(v.settings), v.base_url
        if v.conn_id:
            try:
                conn = connections.get(v.conn_id)
            except LookupError as e:
                raise ConfigError(self.cfg.path, str(e), self.spec.name, "vendor.conn_id") from None
            c_creds, c_settings, c_url = self.vendor_cls.from_connection(conn)
            creds = {**c_creds, **creds}
            settings = {**c_settings, **settings}
            base_url = base_url or c_url
        missing = [c for c in self.vendor_cls.credentials if not creds.get(c)]
        if missing:
            raise ConfigError(self.cfg.path, f"missing credential(s): {', '.join(missing)}", self.spec.name,
                              f"vendor.credentials.{missing[0]}")
        return self.vendor_cls(base_url, creds, settings)


def check_state(cfg: Config, engine: sa.Engine, sync: str | None = None) -> None:
    """Refuse a state database that is unreachable, or that lost a table holding what was
    delivered: recreated empty, it would send every user again as new (and count
    increments twice). Raises ConfigError naming what is wrong."""
    where = "state" if cfg.state else "warehouse"
    try:
        with engine.connect() as c:
            have = set(sa.inspect(c).get_table_names())
            ran = state.runs.name in have and c.execute(sa.select(sa.func.count()).select_from(state.runs)).scalar()
    except sa.exc.DBAPIError as e:
        raise ConfigError(cfg.path, f"cannot reach the {where} database: {e.orig}", sync, where) from None
    missing = [t.name for t in (state.snapshot, state.failures) if t.name not in have]
    if ran and missing:
        raise ConfigError(cfg.path, f"sync table(s) {', '.join(missing)} missing although sync_runs records "
                          f"{ran} run(s): dropped? Restore it from a backup, or drop every sync_* table to "
                          "start over (every user is then sent again as new)", sync, where)


def upgrade_state(cfg: Config, engine: sa.Engine, sync: str | None = None) -> None:
    """The sync tables at this release's schema (``migrations.ensure``: after ``check_state``,
    which refuses a database that lost its snapshot), or a ConfigError saying why not."""
    try:
        migrations.ensure(engine)
    except migrations.SchemaError as e:
        raise ConfigError(cfg.path, str(e), sync, "state" if cfg.state else "warehouse") from None


@dataclasses.dataclass(frozen=True)
class Options:
    """What a run is asked to do, whoever asks (the CLI's flags, the Airflow trigger form).

    ``window``: [start, end) on the cursor (either end None: open); ``user_ids``: only these
    users; ``allow_large_change``: override the blast-radius guard; ``trigger``: who started
    the run, as ``sync_runs.trigger`` records it."""

    full_refresh: bool = False
    dry_run: bool = False
    window: tuple[Any, Any] | None = None
    user_ids: tuple[str, ...] | None = None
    allow_large_change: bool = False
    trigger: str = "cli"

    def __post_init__(self):
        if self.window is not None and not any(self.window):
            object.__setattr__(self, "window", None)
        if self.user_ids is not None:
            object.__setattr__(self, "user_ids", tuple(str(u) for u in self.user_ids) or None)

    @property
    def mode(self) -> str:
        """``sync_runs.mode``: dry_run / full / backfill (a window) / incremental."""
        return "dry_run" if self.dry_run else "full" if self.full_refresh else "backfill" if self.window else "incremental"


@dataclasses.dataclass
class Started:
    """A run begun and planned: ``outcome`` None when its plan is to be pushed, else the status
    ``finalize`` records without pushing (``dry_run``, or ``blocked`` by the guard with ``error``)."""

    run_id: int
    plan: planning.Plan
    outcome: str | None = None
    error: str | None = None


@dataclasses.dataclass
class Summary:
    run_id: int
    sync: str
    vendor: str
    status: str
    users_read: int = 0
    users_changed: int = 0
    users_delivered: int = 0
    users_rejected: int = 0
    users_failed: int = 0
    requests: int = 0
    mode: str = "incremental"
    error: str | None = None
    ok: bool = True  # exit status 0?

    def as_json(self) -> dict[str, Any]:
        keys = ("run_id", "sync", "vendor", "status", "users_read", "users_changed", "users_delivered",
                "users_rejected", "users_failed", "requests")
        return {k: getattr(self, k) for k in keys}

    def line(self) -> str:
        text = (f"{self.sync} [{self.vendor}] run {self.run_id}: {self.status} - read {self.users_read}, "
                f"changed {self.users_changed}, delivered {self.users_delivered}, rejected {self.users_rejected}, "
                f"failed {self.users_failed}, {self.requests} request(s)")
        return text + (f" - {self.error}" if self.error else "")


def open_sync(cfg: Config, name: str) -> Sync:
    return Sync(cfg, cfg.sync(name))


def preflight(sync: Sync, options: Options) -> None:
    """Everything a run can be refused for before anything is recorded or sent: the source
    and its columns, the vendor's credentials (not for a dry run, which sends nothing), and a
    window only where there is a cursor to apply it to. A ConfigError naming the sync."""
    sync.source  # noqa: B018 - the source and every configured column exist
    if options.window and not sync.spec.cursor:
        raise ConfigError(sync.cfg.path, "no cursor column: a date-time window (--since/--until, a backfill) "
                          "cannot be applied", sync.spec.name, "cursor")
    if not options.dry_run:
        sync.client()


def start(sync: Sync, options: Options, *, bound: bool = True, guard_override: str = "--allow-large-change",
          progress=None) -> Started:
    """Preflight, begin (the lock: ``state.Locked``), plan and guard. ``guard_override``: how
    the caller's user overrides the guard, for the message of a blocked run. A plan that fails
    finalizes its run as failed before the error propagates (a lost lock excepted: the run
    holding the lock now settles this one)."""
    preflight(sync, options)
    run_id = begin(sync, mode=options.mode, trigger=options.trigger[:250], bound=bound)
    with failing(sync, run_id):
        p = plan(sync, run_id, mode="full" if options.full_refresh else "incremental", window=options.window,
                 user_ids=list(options.user_ids) if options.user_ids else None, dry_run=options.dry_run,
                 allow_large_change=options.allow_large_change, progress=progress)
    if options.dry_run:
        return Started(run_id, p, "dry_run")
    if p.guard:
        return Started(run_id, p, "blocked", f"blast-radius guard: {p.guard}; nothing sent (override: {guard_override})")
    return Started(run_id, p)


@contextlib.contextmanager
def failing(sync: Sync, run_id: int) -> Iterator[None]:
    """Record the run as failed when the block raises (a lost lock excepted: another run holds
    the sync now, and this one records nothing more), then let the error go on."""
    try:
        yield
    except state.LeaseLost:
        raise
    except BaseException as e:
        try:
            finalize(sync, run_id, status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        except Exception:  # the state database itself may be what failed
            log.exception("could not record the failure of run %s", run_id)
        raise


def begin(sync: Sync, *, mode: str, trigger: str, bound: bool = True) -> int:
    """Record a new run and take the sync's lock (``state.Locked`` if another run holds it).

    ``bound``: the run lives and dies with this process (the CLI), so a later run on this
    machine may take the lock over as soon as this process is gone; an Airflow run's lock
    outlives its plan task (False)."""
    run_id = state.start_run(sync.state, sync.spec.name, sync.spec.vendor.type, mode, trigger)
    try:
        taken = state.acquire_lock(sync.state, sync.spec.name, run_id, stale_after=sync.spec.lock_timeout,
                                   bound=bound)
    except state.Locked as e:
        state.update_run(sync.state, run_id, status="skipped", finished_at=db.now(), error=str(e))
        raise
    if taken:
        log.warning("took over the lock of run %s (presumed dead); what it left in flight is settled", taken)
    _clear_dead_runs(sync, run_id)
    return run_id


def _clear_dead_runs(sync: Sync, run_id: int) -> None:
    """With the lock held, any other unfinished run's plan rows are a dead run's: settle what
    it had in flight (at most once), then drop them — the new plan starts from the snapshot."""
    dead = plans.dead_runs(sync.spec.name, run_id)
    with state.fenced(sync.state, sync.spec.name, run_id) as c:
        pushing.settle_in_doubt(sync, c, dead)
        plans.drop(c, dead)


def plan(sync: Sync, run_id: int, *, mode: str = "incremental", window=None, user_ids=None,
         dry_run: bool = False, allow_large_change: bool = False, progress=None) -> planning.Plan:
    """Extract, map, diff and stage; then apply the blast-radius guard.

    When the mapping differs from the one last delivered, the run is a mapping backfill: it
    reads every user (not only those past the cursor; the watermark still advances) and
    records the change in ``sync_runs.mapping_change``; ``finalize`` remembers the new mapping
    once the deliveries are recorded. A window or a list of users reads only those: the
    change applies to them, and the next full read still backfills the rest."""
    change = mappings.compare(sync.spec, state.get_mapping(sync.state, sync.spec.name))  # one small query
    backfill = change is not None and not window and not user_ids
    if change is not None:
        _log_mapping(sync, change, backfill)
    since = (state.get_watermark(sync.state, sync.spec.name)
             if mode == "incremental" and not window and not backfill else None)
    p = planning.build(sync, run_id, mode=mode, since=since, window=window, user_ids=user_ids,
                       stage=not dry_run, keep_plan=dry_run, progress=progress, mapping=change)
    p.guard = p.check_guard(sync.spec.guard)
    if p.guard and allow_large_change:
        log.warning("blast-radius guard overridden: %s", p.guard)
        p.guard = None
    advance = mode in ("incremental", "full") and not window and not user_ids and p.watermark is not None
    with state.fenced(sync.state, sync.spec.name, run_id) as c:
        state.record_run(
            c, run_id, users_read=p.users_read, users_changed=p.users_changed, users_rejected=p.users_invalid,
            watermark_from=state.show_watermark(since),
            watermark_to=state.encode_watermark(p.watermark) if advance else None,
            mapping_change=db.dumps(change.as_json()) if backfill else None)
    return p


def _log_mapping(sync: Sync, change: mappings.MappingChange, backfill: bool) -> None:
    name, reach = sync.spec.name, ("reading every user once, sending only what the change touches" if backfill
                                   else "applied to the users this run reads only")
    if change.since_run is None:
        log.info("%s: no delivered mapping remembered yet (a first run, or state older than sync_mappings): %s",
                 name, reach)
        return
    log.warning("%s: the mapping changed since run %s (%s UTC): %s; %s", name, change.since_run,
                f"{change.since:%Y-%m-%d %H:%M:%S}", change.describe(), reach)
    for a in change.removed:
        log.warning("%s: attribute %r is no longer synced: %s", name, a,
                    "it is unset at the vendor (unset_removed)" if a in change.unset
                    else "the vendor keeps its values; the snapshot stops tracking it")


def push(sync: Sync, run_id: int, shard: int | None = None, progress=None, share=None) -> pushing.PushResult:
    """Push a run's plan (one shard, or all); ``share``: see :func:`connector.push.push`.
    ``state.LeaseLost`` when another run took the lock over meanwhile: nothing more was sent
    or committed (its ``requests``/``delivered`` say what this push did)."""
    name = sync.spec.name
    with state.fenced(sync.state, name, run_id) as c:  # a retried push task: what its dead attempt left
        pushing.settle_in_doubt(sync, c, *plans.of_run(run_id, shard), resend=True)
    result = pushing.push(sync, run_id, shard, progress, share)
    try:
        with state.fenced(sync.state, name, run_id) as c:
            state.record_run(c, run_id, requests=state.runs.c.requests + result.requests,
                             **({"error": result.stopped} if result.stopped else {}))
    except state.LeaseLost as e:
        e.requests, e.delivered = result.requests, result.delivered
        raise
    return result


def shards(sync: Sync, run_id: int) -> list[int]:
    """The shards of a run's plan that have users to push (one Airflow push task each)."""
    return plans.shards(sync.state, run_id)


def share(sync: Sync, run_id: int, slots: int, *, shared: bool) -> Callable[[], float]:
    """One push's share of the vendor's limit, as a callable the push asks again now and then
    (see :func:`connector.push.push`), when up to ``slots`` pushes of the credential run at once.

    ``shared``: other syncs push with the same credential. Their runs are not counted here, so
    only the fixed 1 / ``slots`` is safe with any of them running. Otherwise the pushes on the
    credential are this run's shards only, and each takes 1 / the shards still to push, never
    less than 1 / ``slots``: at most ``slots`` pushes run, each on a shard with rows still
    pending (or in flight), and those shards only decrease as the run goes, so a share read
    earlier is never larger than one read now — together they stay under the limit."""
    if shared:
        return lambda: 1 / slots
    return lambda: 1 / max(1, min(slots, len(plans.shards(sync.state, run_id, plans.UNSENT))))


def finalize(sync: Sync, run_id: int, *, status: str | None = None, error: str | None = None) -> Summary:
    """Count outcomes from the sync tables, decide the status, advance the cursor, unlock.
    Fenced: a run whose lock was taken over records nothing (``state.LeaseLost``)."""
    with state.fenced(sync.state, sync.spec.name, run_id) as c:  # interrupted mid-push: what may have left
        pushing.settle_in_doubt(sync, c, *plans.of_run(run_id))
    run = state.get_run(sync.state, run_id)
    counts = plans.counts(sync.state, run_id)
    with sync.state.connect() as c:
        by_class = state.count_by_class(c, sync.spec.name, run_id, ("rejected", "retryable", "in_doubt"))
    pending = 0 if status == "dry_run" else counts.get(plans.PENDING, 0)  # a dry run's plan stays, unsent
    s = Summary(run_id, sync.spec.name, sync.spec.vendor.type, "running", run["users_read"], run["users_changed"],
                counts.get("delivered", 0), run["users_rejected"] + by_class.get("rejected", 0),
                by_class.get("retryable", 0) + by_class.get("in_doubt", 0) + pending,
                run["requests"], run["mode"], error or run["error"])
    if status is None:
        if s.error or pending:
            status = "failed"
            s.error = s.error or f"{pending} planned user(s) were not pushed"
        else:
            status = "partial" if s.users_rejected or s.users_failed else "success"
    s.status = status
    # the tolerance weighs what went wrong in this run: its rejections and failures, and the
    # values it set aside anew (``users_rejected`` of the plan: one set aside before, for a
    # source value still unchanged, is not counted again), against the users it considered
    considered = max(s.users_changed + run["users_rejected"], 1)
    s.ok = status in ("success", "dry_run") or (
        status == "partial" and (s.users_rejected + s.users_failed) / considered <= sync.spec.max_failure_fraction)
    with state.fenced(sync.state, sync.spec.name, run_id) as c:
        if status in ("success", "partial") and run["watermark_to"]:
            state.set_watermark(c, sync.spec.name, state.decode_watermark(run["watermark_to"]), run_id)
        if status in ("success", "partial") and run["mapping_change"]:
            # every planned user is now delivered or kept in sync_failures (re-read and re-diffed
            # each run): from here on the snapshot holds this mapping's values
            state.remember_mapping(c, sync.spec.name, run_id, db.loads(run["mapping_change"])["mapping"])
        state.record_run(c, run_id, status=status, finished_at=db.now(), users_delivered=s.users_delivered,
                         users_rejected=s.users_rejected, users_failed=s.users_failed, error=s.error)
        if status != "dry_run":
            plans.drop(c, *plans.of_run(run_id))
    state.release_lock(sync.state, sync.spec.name, run_id)
    return s


def run(cfg: Config, name: str, options: Options = Options(), *, progress=None) -> Summary:
    """The whole run in this process (the CLI's ``usersync run``)."""
    sync = open_sync(cfg, name)
    started = start(sync, options, progress=progress)
    with failing(sync, started.run_id):
        if started.outcome:
            return finalize(sync, started.run_id, status=started.outcome, error=started.error)
        crashpoint("plan_staged")
        push(sync, started.run_id, progress=progress)
        crashpoint("before_finalize")
        return finalize(sync, started.run_id)
