"""The push's writes, on a real plan in a real state database: a delivery moves the snapshot
to exactly what the plan staged, and only deliveries may wait for the next flush."""

from __future__ import annotations

import json
import threading

import sqlalchemy as sa

from connector import config, engine, push, state
from connector.vendors.base import Kind, Verdict
from warehouse import make_users, user_row, write_config
from vendor_cases.tencent_im import KEY, tencent_sync

N = 30


def planned(db_url, tmp_path, monkeypatch):
    """A sync whose run has planned N users (nothing sent), and its pending changes."""
    monkeypatch.setenv("TEST_TENCENT_KEY", KEY)
    make_users(db_url, [user_row(i) for i in range(N)])
    cfg, _ = config.load(write_config(tmp_path / "syncs.yaml", db_url, [tencent_sync("http://127.0.0.1:9")]))
    sync = engine.open_sync(cfg, "tencent_users")
    run_id = engine.begin(sync, mode="incremental", trigger="test")
    engine.plan(sync, run_id)
    changes = [c for chunk in push.pending(sync, run_id, None) for c in chunk]
    assert len(changes) == N
    return sync, run_id, changes


def sent(changes, verdict: Verdict) -> push.Sent:
    return push.Sent(push.Job(changes), verdict, attempts=1, http_status=200, latency_ms=1)


def test_a_delivery_moves_the_snapshot_to_what_the_plan_staged(db_url, tmp_path, monkeypatch):
    sync, run_id, changes = planned(db_url, tmp_path, monkeypatch)
    writes = push.Writes(sync, run_id)
    push.record(sent(changes[:20], Verdict(Kind.DELIVERED)), writes, [], threading.Event(), push.PushResult(), 3)
    with sync.state.begin() as conn:
        writes.flush(conn)

    p, s = state.plan, state.snapshot
    with sync.state.connect() as c:
        staged = {k: (json.loads(v), h) for k, v, h in c.execute(
            sa.select(p.c.user_key, p.c.payload, p.c.row_hash).where(p.c.run_id == run_id))}
        snap = {k: (json.loads(v), h, r) for k, v, h, r in c.execute(
            sa.select(s.c.user_key, s.c.payload, s.c.row_hash, s.c.run_id).where(s.c.sync == "tencent_users"))}
        statuses = dict(c.execute(sa.select(p.c.user_key, p.c.status).where(p.c.run_id == run_id)).all())
    delivered = {c.key for c in changes[:20]}
    assert snap == {k: (*staged[k], run_id) for k in delivered}
    assert all(staged[k][0] for k in delivered)  # payloads are real, not empty
    assert statuses == {c.key: "delivered" if c.key in delivered else "pending" for c in changes}


def test_only_deliveries_wait_for_the_next_flush(sqlite_url, tmp_path, monkeypatch):
    sync, run_id, changes = planned(sqlite_url, tmp_path, monkeypatch)
    result, jobs = push.PushResult(), []

    waiting = push.Writes(sync, run_id)
    assert waiting.due() is None  # nothing to write: no deadline
    push.record(sent(changes[:10], Verdict(Kind.DELIVERED)), waiting, jobs, threading.Event(), result, 3)
    assert not waiting.urgent and 0 < waiting.due() <= push.Writes.FLUSH_SECONDS

    # a batch going back to pending to be split: written before its halves can go
    split = push.Writes(sync, run_id)
    push.record(sent(changes[10:20], Verdict(Kind.SPLIT, "90018")), split, jobs, threading.Event(), result, 3)
    assert split.urgent and [len(j.batch) for j in jobs] == [5, 5]

    # a user the vendor refused: its failure row is written at once
    refused = push.Writes(sync, run_id)
    verdict = Verdict(Kind.DELIVERED, per_user={changes[20].key: (Kind.REJECTED, "70107", "no such account")})
    push.record(sent(changes[20:30], verdict), refused, jobs, threading.Event(), result, 3)
    assert refused.urgent
    with sync.state.begin() as conn:
        refused.flush(conn)
    with sync.state.connect() as c:
        failures = {r.user_key: r.error_class for r in c.execute(sa.select(state.failures))}
    assert failures == {changes[20].key: "rejected"}


def test_staged_rows_come_back_as_written(db_url):
    """``state.stage`` (COPY on PostgreSQL) keeps every character the plan's JSON may hold."""
    eng = state.connect(db_url)
    tricky = ['a\\b', 'tab\there', 'line\nbreak\r\n', '\\N', '"quoted", comma', 'é한😀', ' ']
    rows = [state.PlanRow(7, f"user {i}", i % 3, state.dumps({"external_id": text}), state.dumps({"user_id": text}),
                          state.dumps([["note", "set", text]]), state.dumps({"note": text}), -(2**63) + i)
            for i, text in enumerate(tricky)]
    # keys with separators in them, in a batch of their own (COPY escapes value by value there)
    rows += [state.PlanRow(7, f"user {text}", 0, "{}", "{}", "[]", "{}", -(2**62) + i) for i, text in enumerate(tricky)]
    with eng.begin() as c:
        state.stage(c, rows[:len(tricky)])
        state.stage(c, rows[len(tricky):])
    p = state.plan
    with eng.connect() as c:
        back = c.execute(sa.select(*(p.c[n] for n in state.STAGED)).where(p.c.run_id == 7).order_by(p.c.row_hash)).all()
    assert [tuple(r) for r in back] == rows
    assert [state.loads(r[6])["note"] for r in back[:len(tricky)]] == tricky
    eng.dispose()


def test_state_json_keeps_numbers_numbers():
    """numpy scalars are JSON numbers and booleans (as ``json.dumps`` wrote them), not their text."""
    import decimal
    import math

    import numpy as np

    assert state.dumps({"f": np.float64(1.5), "i": np.int64(3), "b": np.bool_(True), "d": decimal.Decimal("2.50"),
                        "t": "한"}) == '{"f":1.5,"i":3,"b":true,"d":"2.50","t":"한"}'
    assert math.isnan(state.loads('{"x": NaN}')["x"])  # written by json before: still read
