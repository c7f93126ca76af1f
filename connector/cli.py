"""``usersync``: run, plan and inspect syncs; serve the emulators; run the demo.

A thin shell over ``connector.engine``: the Airflow tasks call the same steps. The engine
(and with it pandas) is imported by the commands that run a sync, not by ``--help``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from pathlib import Path

import sqlalchemy as sa

from connector import __version__, config, db, migrations, state
from connector.config import ConfigError
from connector.progress import Progress

DEFAULT_CONFIG = os.environ.get("USERSYNC_CONFIG", "syncs.yaml")
EXAMPLES = """examples:
  usersync run --all --config demo/syncs.yaml       push every sync's changes
  usersync run dfinery_users --full-refresh          re-send every attribute (not increments)
  usersync plan dfinery_users                        what would be sent, nothing sent
  usersync status                                    recent runs and their batches
  usersync emulators --config demo/syncs.yaml        serve the vendor emulators on 127.0.0.1
  usersync db upgrade                                create or upgrade the sync tables now
"""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # the commands' engine and sync tables (pandas, numpy) load only once the arguments are read:
    # `usersync --help` and a mistyped command never load them
    global engine
    from connector import engine
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # its INFO lines narrate each step of an upgrade; usersync logs the outcome
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except state.Locked as e:
        print(f"not started: {e}", file=sys.stderr)
        return 3
    except state.LeaseLost as e:
        print(f"stopped: {superseded(e)}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("interrupted: the next run re-sends whatever was not acknowledged", file=sys.stderr)
        return 130


def superseded(e: state.LeaseLost) -> str:
    """What a run that lost its lock did, and why it stopped."""
    did = ("" if e.requests is None else
           f" It had sent {e.requests} request(s), {e.delivered} user(s) acknowledged by the vendor.")
    return (f"{e}: another run took the sync over (this run stalled longer than its lock_timeout, or lost "
            f"the state database for that long).{did} It started no request and committed nothing after "
            "that; the run holding the lock settles what it had in flight.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="usersync", description="Reverse ETL for user attributes: "
                                "warehouse -> engagement platforms, only what changed.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"usersync {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp):
        sp.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                        help=f"the syncs file (default: $USERSYNC_CONFIG or syncs.yaml; now {DEFAULT_CONFIG})")

    r = sub.add_parser("run", help="read, diff and push what changed; record the run",
                       description="Read changed users, diff them against what was last delivered, push only "
                       "the changes, and record every batch. Exit 0 on success or on a partial run within the "
                       "sync's max_failure_fraction; 1 otherwise; 2 on a config error; 3 when another run holds the lock "
                       "(nothing done); 4 when this run lost its lock to another run while it ran (it stalled "
                       "past lock_timeout): it stops at once, sending and recording nothing more, and says what it "
                       "had done.")
    r.add_argument("sync", nargs="?", help="sync name (or --all)")
    r.add_argument("--all", action="store_true", help="run every sync in the file, one after another")
    with_config(r)
    r.add_argument("--full-refresh", action="store_true",
                   help="ignore the cursor and re-send every set attribute (increments still send only the difference)")
    r.add_argument("--dry-run", action="store_true", help="plan and record the run, send nothing")
    r.add_argument("--since", type=_datetime, metavar="DATETIME", help="backfill: cursor window start (inclusive)")
    r.add_argument("--until", type=_datetime, metavar="DATETIME", help="backfill: cursor window end (exclusive)")
    r.add_argument("--user", action="append", dest="users", metavar="ID", help="only this user (repeatable)")
    r.add_argument("--allow-large-change", action="store_true", help="override the blast-radius guard")
    r.add_argument("--json", action="store_true", help="end each run with one JSON line summarising it")
    r.set_defaults(func=cmd_run)

    pl = sub.add_parser("plan", help="show what a run would send, without sending",
                        description="Plan a run (extract, map, diff) and show counts per attribute and sample "
                        "payloads. Nothing is sent and the snapshot does not move.")
    pl.add_argument("sync")
    with_config(pl)
    pl.add_argument("--full-refresh", action="store_true")
    pl.add_argument("--samples", type=int, default=3, help="sample payloads to print (default 3)")
    pl.set_defaults(func=cmd_plan)

    st = sub.add_parser("status", help="recent runs and their batch outcomes")
    st.add_argument("sync", nargs="?")
    with_config(st)
    st.add_argument("--runs", type=int, default=10, help="how many recent runs (default 10)")
    st.set_defaults(func=cmd_status)

    em = sub.add_parser("emulators", help="serve the vendor emulators on 127.0.0.1 (foreground)",
                        description="Serve every vendor's emulator. With --config, the attributes the syncs map "
                        "are registered, as a user would register them in each vendor's console.")
    em.add_argument("--config", "-c", help="register the attributes mapped in this syncs file")
    em.add_argument("--host", default="127.0.0.1")
    em.set_defaults(func=cmd_emulators)

    dm = sub.add_parser("demo", help="build a demo warehouse in demo/, sync it to the emulators, change users, sync again")
    dm.add_argument("--dir", default="demo", help="where to put the warehouse and syncs.yaml (default demo/)")
    dm.add_argument("--users", type=int, default=2000)
    dm.set_defaults(func=cmd_demo)

    db = sub.add_parser("db", help="the sync tables' schema: its revision, upgrade it",
                        description="The sync tables are versioned by the Alembic migrations shipped with "
                        f"usersync (version table {migrations.VERSION_TABLE}). Every run upgrades them itself, "
                        f"one process at a time; with {migrations.SWITCH}=manual a run refuses tables behind "
                        "this release instead, for operators who upgrade them with `usersync db upgrade`.")
    dbs = db.add_subparsers(dest="action", required=True, metavar="ACTION")
    dc = dbs.add_parser("current", help="the state database's revision and this release's head",
                        description="Print the state database's schema revision and this release's head. "
                        "Exit 0 when they are the same, 1 otherwise.")
    with_config(dc)
    dc.set_defaults(func=cmd_db_current)
    du = dbs.add_parser("upgrade", help="create the sync tables, or bring them to this release's head",
                        description="Create the sync tables in the state database, or upgrade them to this "
                        "release's head, keeping every row (tables made by a release before migrations are "
                        "adopted in place). Safe while syncs start: one process upgrades at a time, the "
                        "others find it done. Exit 0 when done (or nothing to do); 2 when the database "
                        "is newer than this release, or lost a sync table that holds what was delivered.")
    with_config(du)
    du.set_defaults(func=cmd_db_upgrade)
    dr = dbs.add_parser("revision", help="(developers) write the next migration from connector/state/schema.py",
                        description="From a source checkout: write connector/migrations/versions/<next>_<slug>.py "
                        "with what the tables in connector/state/schema.py have that a database at head lacks "
                        "(Alembic autogenerate). Read it and finish it by hand; then `make ddl`.")
    dr.add_argument("-m", "--message", required=True, help="what the revision changes, in a few words")
    dr.set_defaults(func=lambda a: print(migrations.revision(a.message)) or 0)

    dd = sub.add_parser("ddl", help="print the sync tables' DDL for a database dialect")
    dd.add_argument("dialect", choices=["sqlite", "postgresql", "mysql"])
    dd.set_defaults(func=lambda a: print(state.ddl(a.dialect), end="") or 0)
    return p


def _datetime(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date-time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def cmd_run(args) -> int:
    from connector import engine

    cfg, _ = config.load(args.config)
    if args.all == bool(args.sync):
        print("give a sync name or --all", file=sys.stderr)
        return 2
    names = [s.name for s in cfg.syncs] if args.all else [args.sync]
    options = engine.Options(full_refresh=args.full_refresh, dry_run=args.dry_run, window=(args.since, args.until),
                             user_ids=args.users, allow_large_change=args.allow_large_change)
    worst = 0
    for name in names:
        progress = Progress(name)
        try:
            summary = engine.run(cfg, name, options, progress=progress)
        finally:
            progress.close()
        print(json.dumps(summary.as_json()) if args.json else summary.line(), flush=True)
        worst = max(worst, 0 if summary.ok else 1)
    return worst


def cmd_plan(args) -> int:
    from connector import engine

    cfg, _ = config.load(args.config)
    sync = engine.open_sync(cfg, args.sync)
    started = engine.start(sync, engine.Options(full_refresh=args.full_refresh, dry_run=True, trigger="cli:plan"))
    engine.finalize(sync, started.run_id, status=started.outcome)
    p = started.plan
    print(f"{args.sync}: read {p.users_read} users; {p.users_changed} to send; {p.users_invalid} set aside; "
          f"{p.users_settled} changed in unmapped or NULL-skipped columns only")
    m = p.mapping
    if m is not None and m.since_run is None:
        print("mapping: none remembered yet (a first run, or state older than sync_mappings): every user is read once")
    elif m is not None:
        print(f"mapping changed since run {m.since_run} ({m.since:%Y-%m-%d %H:%M:%S} UTC): a run reads every user "
              "once and sends only what the change touches:")
        print("\n".join(m.lines(p.per_attribute, p.dropped)))
    if p.per_attribute:
        width = max(len(a) for a in p.per_attribute)
        print("changes per attribute:")
        for attr, n in p.per_attribute.most_common():
            print(f"  {attr:<{width}}  {n}")
    client = sync.vendor_cls(sync.spec.vendor.base_url, {c: "***" for c in sync.vendor_cls.credentials},
                             {**{k: "***" for k in sync.vendor_cls.settings}, **sync.spec.vendor.settings})
    for change in p.samples[: args.samples]:
        parts = client.request([change])
        for req in parts if isinstance(parts, list) else [parts]:
            print(f"sample {req.method} {req.url.split('?')[0]}:\n  {json.dumps(req.json, ensure_ascii=False)}")
    if p.guard:
        print(f"blast-radius guard would stop this run: {p.guard}")
    return 0


def cmd_status(args) -> int:
    from connector import engine, report

    cfg, _ = config.load(args.config)
    eng = db.make_engine(cfg.state_url)
    engine.check_state(cfg, eng)  # before creating anything: a dropped table must not come back empty
    engine.upgrade_state(cfg, eng)
    rows = report.recent_runs(eng, args.sync, limit=args.runs)
    if not rows:
        print("no runs recorded yet")
        return 0
    print(f"{'run':>5} {'sync':<22} {'mode':<11} {'status':<9} {'started (UTC)':<19} "
          f"{'read':>8} {'changed':>8} {'deliv.':>8} {'reject.':>8} {'failed':>7} {'reqs':>7}")
    for run in rows:
        print(f"{run['run_id']:>5} {run['sync'][:22]:<22} {run['mode']:<11} {run['status']:<9} "
              f"{run['started_at']:%Y-%m-%d %H:%M:%S} {run['users_read']:>8} {run['users_changed']:>8} "
              f"{run['users_delivered']:>8} {run['users_rejected']:>8} {run['users_failed']:>7} {run['requests']:>7}")
        outcomes = report.batch_outcomes(eng, run["run_id"])
        if outcomes:
            print("      batches: " + ", ".join(f"{o} {n} ({a} attempts)" for o, n, a in outcomes))
        if run["mapping_change"]:
            change = json.loads(run["mapping_change"])
            print("      mapping backfill: " + "; ".join(
                f"{k} {', '.join(change[k])}" for k in ("added", "changed", "removed") if change[k]))
        if run["error"]:
            print(f"      error: {run['error'][:300]}")
    fails = report.recent_failures(eng, args.sync, limit=5)
    if fails:  # open until delivered; a set-aside value until its source value changes
        print("recent failures (retried next run; a value set aside, once it changes):")
        for f in fails:
            attr = f" [{f['attribute']}]" if f["attribute"] else ""
            print(f"  {f['sync']} {f['user_key']}{attr}: {f['error_class']} {f['code'] or ''} {f['message'][:120]}")
    return 0

def _state_engine(args) -> tuple[config.Config, sa.Engine]:
    from connector import engine

    cfg, _ = config.load(args.config)
    eng = db.make_engine(cfg.state_url)
    engine.check_state(cfg, eng)  # reachable, and no delivered-snapshot table lost
    return cfg, eng


def cmd_db_current(args) -> int:
    _, eng = _state_engine(args)
    revision, head = migrations.current(eng), migrations.head()
    if revision == head:
        note = "head"
    elif revision is None and sa.inspect(eng).has_table(state.runs.name):
        note = "sync tables from a release before migrations: `usersync db upgrade` adopts them"
    elif revision is None:
        note = "no sync tables yet: `usersync db upgrade` (or the first run) creates them"
    elif migrations.known(revision):
        note = f"behind this release's head {head}: `usersync db upgrade`"
    else:
        note = f"newer than this release's head {head}: a newer usersync upgraded it"
    print(f"{eng.url.render_as_string(hide_password=True)}: revision {revision or 'none'} ({note})")
    return 0 if revision == head else 1


def cmd_db_upgrade(args) -> int:
    cfg, eng = _state_engine(args)
    try:
        before, after = migrations.upgrade(eng)
    except migrations.SchemaError as e:
        raise ConfigError(cfg.path, str(e), None, "state" if cfg.state else "warehouse") from None
    where = eng.url.render_as_string(hide_password=True)
    print(f"{where}: already at revision {after}" if before == after else
          f"{where}: upgraded from revision {before or 'none'} to {after}")
    return 0


def cmd_emulators(args) -> int:
    from connector.vendors import emulator

    specs = config.load(args.config)[0].syncs if args.config else []
    running = emulator.start_all(specs, host=args.host)
    for name, r in running.items():
        print(f"{name:<10} {r.url}")
    print("serving; Ctrl-C to stop", flush=True)
    try:
        emulator.wait()
    except KeyboardInterrupt:
        pass
    for r in running.values():
        r.stop()
    return 0


def cmd_demo(args) -> int:
    from connector import demo_run

    return demo_run.main(Path(args.dir), users=args.users)
