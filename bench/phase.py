"""One measured phase in a fresh process: ``python -m bench.phase '<json>'`` prints a JSON line.

The line holds ``seconds`` (the phase's wall time, setup excluded) and ``peak_rss_mb``
(this process's own peak RSS, so phases never pollute each other).
With ``"profile": path`` the phase runs under pyinstrument and writes an HTML report.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
import yaml

from connector import config, engine, extract, push, state

GROUP = 100  # users committed per transaction, as a push records a round of finished requests


def open_sync(url: str, spec: dict, workdir: str) -> engine.Sync:
    path = Path(workdir) / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump({"warehouse": url, "syncs": [spec]}, sort_keys=False))
    cfg, _ = config.load(path)
    return engine.open_sync(cfg, spec["name"])


def bare_read(url: str, spec: dict, **_) -> dict:
    """``pandas.read_sql`` of the plan's own query, streamed in the sync's chunk size."""
    cols = list(dict.fromkeys([*spec["identity"].values(), *(m["column"] for m in spec["mapping"])]))
    eng = sa.create_engine(url)
    rows = 0
    t0 = time.perf_counter()
    with eng.connect() as conn:
        conn = conn.execution_options(stream_results=True, yield_per=spec["chunk_size"])
        for df in pd.read_sql(sa.text(f"SELECT {', '.join(cols)} FROM {spec['source']['table']}"), conn,
                              chunksize=spec["chunk_size"], coerce_float=False):
            rows += len(df)
    return {"seconds": time.perf_counter() - t0, "rows": rows}


def plan(url: str, spec: dict, workdir: str, **_) -> dict:
    """``engine.begin`` + ``engine.plan`` (staged); then the run is closed without pushing."""
    sync = open_sync(url, spec, workdir)
    sync.source  # noqa: B018 - reflection is setup, not planning
    t0 = time.perf_counter()
    run_id = engine.begin(sync, mode="incremental", trigger="bench")
    p = engine.plan(sync, run_id)
    seconds = time.perf_counter() - t0
    engine.finalize(sync, run_id, status="failed", error="bench: planned only")
    return {"seconds": seconds, "rows": p.users_read, "changed": p.users_changed}


def seed(url: str, spec: dict, workdir: str, **_) -> dict:
    """A real first run without HTTP: plan everyone (staged), write every staged payload to
    the snapshot with the function a push uses (``state.upsert_snapshot``), mark the plan
    delivered and finalize (the cursor advances)."""
    sync = open_sync(url, spec, workdir)
    t0 = time.perf_counter()
    run_id = engine.begin(sync, mode="incremental", trigger="bench")
    p = engine.plan(sync, run_id)
    plan = state.plan
    with sync.state.connect() as c:
        rows = c.execution_options(stream_results=True, yield_per=50_000).execute(
            sa.select(plan.c.user_key, plan.c.payload, plan.c.row_hash).where(plan.c.run_id == run_id))
        for part in rows.partitions(50_000):
            with sync.state.begin() as w:
                state.upsert_snapshot(w, sync.spec.name, run_id, [(k, json.loads(v), h) for k, v, h in part])
            _vacuum(sync.state, "ANALYZE sync_snapshot")
    with sync.state.begin() as c:
        c.execute(plan.update().where(plan.c.run_id == run_id).values(status="delivered"))
    summary = engine.finalize(sync, run_id)
    seconds = time.perf_counter() - t0
    _vacuum(sync.state, "VACUUM ANALYZE sync_plan", "VACUUM ANALYZE sync_snapshot")
    return {"seconds": seconds, "rows": p.users_read, "delivered": summary.users_delivered}


def _vacuum(eng: sa.Engine, *commands: str) -> None:
    """What autovacuum would soon do on a production server (the test server runs without
    it): statistics for the grown snapshot (without them PostgreSQL answers each 500-key
    lookup by walking the sync's whole index range, half a second a query at 1M users), and
    the seed plan's deleted rows vacuumed (else the next run's cleanup of dead runs' plan rows
    visits a million dead tuples)."""
    if eng.dialect.name == "postgresql":
        with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            for command in commands:
                c.execute(sa.text(command))


def commit(url: str, spec: dict, workdir: str, **_) -> dict:
    """Plan the changed users, then time committing them as delivered, GROUP users a transaction."""
    sync = open_sync(url, spec, workdir)
    run_id = engine.begin(sync, mode="incremental", trigger="bench")
    engine.plan(sync, run_id)
    seconds = _commit_all(sync, run_id, group=GROUP)
    summary = engine.finalize(sync, run_id)
    return {"seconds": seconds, "delivered": summary.users_delivered}


def _commit_all(sync, run_id: int, group: int) -> float:
    spent = 0.0
    for changes in push.pending(sync, run_id, None):
        for i in range(0, len(changes), group):
            t0 = time.perf_counter()
            with sync.state.begin() as conn:
                push.record_delivered(conn, sync, run_id, changes[i:i + group])
            spent += time.perf_counter() - t0
    return spent


def snapshot_copy(url: str, spec: dict, template: int, **_) -> dict:
    """Scale run: users past the template get the snapshot row of their template user (SQL)."""
    eng = state.make_engine(url)
    t0 = time.perf_counter()
    with eng.begin() as c:
        c.execute(sa.text(
            "INSERT INTO sync_snapshot (sync, user_key, payload, row_hash, run_id, updated_at) "
            "SELECT s.sync, w.user_id, s.payload, s.row_hash, s.run_id, s.updated_at FROM bench_users w "
            "JOIN sync_snapshot s ON s.sync = :sync AND s.user_key = 'u' || lpad((w.seq % :n)::text, 9, '0') "
            "WHERE w.seq >= :n"), {"sync": spec["name"], "n": template})
        c.execute(sa.text("ANALYZE sync_snapshot"))
    return {"seconds": time.perf_counter() - t0}


PHASES = {"read": bare_read, "plan": plan, "seed": seed, "commit": commit, "snapshot_copy": snapshot_copy}


def main(arg: str) -> None:
    job = json.loads(arg)
    fn = PHASES[job["phase"]]
    if job.get("profile"):
        from pyinstrument import Profiler

        with Profiler() as prof:
            out = fn(**job)
        Path(job["profile"]).write_text(prof.output_html())
    else:
        out = fn(**job)
    out["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(out))


def peak_rss_mb() -> float:
    """VmHWM: the peak of this process's own memory. ``getrusage``'s ru_maxrss would not do:
    Linux carries it over fork and exec, so a child starts with its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main(sys.argv[1])
