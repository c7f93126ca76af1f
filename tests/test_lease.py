"""A lease, not a lock; unknown is not unchanged — with real ``usersync run`` processes, real
signals (SIGSTOP/SIGCONT, SIGKILL) and the vendor emulator in its own process (``crash_harness``).

- A run stopped mid-push past ``lock_timeout`` is taken over; once it resumes it starts no
  request (counted at the emulator: only what was already on the wire), commits nothing, and
  exits 4 saying what it did — also when it resumes while the new holder pushes.
- A run killed after some answers, then the warehouse value put back: the next run repairs the
  vendor (the killed run's sends are unknown, not unchanged), at every crash point.
- ``once`` is not re-sent after a kill; a killed local holder's lock is taken over at once.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import time
from collections import Counter

import pytest
import requests
import sqlalchemy as sa

from warehouse import USERS, table
from connector import state
from crash_harness import POINTS, SCENARIOS, World

SENDERS = 4  # World's concurrency: at most one request per sender can be past its lease check


def seen(w: World) -> list[dict]:
    """Every request the emulator received, in order."""
    return requests.get(w.vendor.url + "/_emulator/requests", timeout=10).json()


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    """A bounded wait for a condition (no timed assertion: the time is only a bound)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def clean(figures: Counter) -> None:
    assert figures["users_lost"] == 0 and figures["double_applied"] == 0, figures


def runs(w: World) -> dict[int, dict]:
    return {r["run_id"]: r for r in table(w.url, state.runs)}


def written_by(w: World, run_id: int) -> tuple:
    """What a run has in the sync tables: its batch rows, snapshot rows, plan rows, run row."""
    return (len(table(w.url, state.batches, state.batches.c.run_id == run_id)),
            sorted((r["user_key"], r["payload"]) for r in table(w.url, state.snapshot, state.snapshot.c.run_id == run_id)),
            len(table(w.url, state.plan, state.plan.c.run_id == run_id)),
            {k: v for k, v in runs(w)[run_id].items()})


def stop_mid_push(w: World, after: int = 15):
    """Start a run and SIGSTOP it once the emulator has seen ``after`` of its requests;
    returns the process, its run id, and the emulator's request count at the stop."""
    base = len(seen(w))
    p = w.start()
    wait_for(lambda: len(seen(w)) >= base + after or p.poll() is not None, what="the run to push")
    os.kill(p.pid, signal.SIGSTOP)
    assert p.poll() is None, "the run finished before it could be stopped"
    stalled = w._last_run()
    time.sleep(0.3)  # what was on the wire at the stop reaches the emulator (the kernel sends it)
    return p, stalled, len(seen(w))


@pytest.fixture
def jiguang(tmp_path):
    # 0.1 s a request, 4 senders: a push of ~100 changed users lasts seconds; lock_timeout 2 s
    w = World(SCENARIOS["jiguang"], tmp_path, users=160, latency=0.1, lock_timeout=2.0, seed=3)
    w.complete()
    yield w
    w.close()


def test_a_stalled_run_taken_over_starts_nothing_commits_nothing_and_says_so(jiguang):
    """SIGSTOP mid-push past lock_timeout; another run takes over and completes; SIGCONT: the
    stalled run's requests after the resume are at most those past their lease check when it
    stopped (one a sender; in practice none), it writes nothing, exits 4 and says why. Every
    accumulate/append lands once (or is short and flagged in_doubt); sets match the warehouse."""
    w = jiguang
    w.mutate()
    p, stalled, _ = stop_mid_push(w)
    w.complete()  # refused (exit 3) until the stalled run's heartbeat is lock_timeout old, then takes over
    new = max(runs(w))
    assert runs(w)[stalled]["status"] == "abandoned" and f"taken over by run {new}" in runs(w)[stalled]["error"]
    before, frozen = len(seen(w)), written_by(w, stalled)
    os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    late = len(seen(w)) - before
    assert p.returncode == 4, err[-3000:]
    assert f"stopped: sync '{w.name}': run {stalled} lost its lock; it is now held by" in err, err[-3000:]
    assert "request(s)" in err and "committed nothing" in err and "not started" not in err
    assert late <= SENDERS, f"{late} request(s) started after the resume"
    assert written_by(w, stalled) == frozen  # nothing committed after it lost the lock
    clean(w.check())
    w.mutate()
    w.complete()
    clean(w.check())


def test_a_stalled_run_resuming_while_the_new_holder_pushes(jiguang):
    w = jiguang
    w.mutate()
    p1, stalled, at_stop = stop_mid_push(w, after=10)
    wait_for(lambda: (state.now() - max(r["heartbeat_at"] for r in table(w.url, state.locks)).replace(
        tzinfo=dt.timezone.utc)).total_seconds() > 2.2, what="the lock to go stale")
    p2 = w.start()
    wait_for(lambda: len(seen(w)) >= at_stop + 10 or p2.poll() is not None, what="the new holder to push")
    assert p2.poll() is None, "the new holder finished before the stalled run resumed"
    os.kill(p1.pid, signal.SIGCONT)
    _, err1 = p1.communicate(timeout=120)
    _, err2 = p2.communicate(timeout=120)
    assert p2.returncode == 0, err2[-3000:]
    assert p1.returncode == 4 and "lost its lock" in err1, err1[-3000:]
    new = max(runs(w))
    late = len(seen(w)) - at_stop - runs(w)[new]["requests"]  # what neither the stop nor the new holder explains
    assert late <= SENDERS, f"{late} request(s) from the stalled run after the resume"
    assert table(w.url, state.plan) == [] and table(w.url, state.locks) == []
    clean(w.check())


# -- unknown is not unchanged --------------------------------------------------------------
def tick(w: World) -> dt.datetime:
    """A later ``updated_at`` than any before (the World's own rounds included)."""
    w.round += 1
    return dt.datetime(2026, 1, 1, 12) + dt.timedelta(hours=w.round)


def flip(w: World, rng: random.Random, fraction: float = 0.4) -> dict[str, str]:
    """A set attribute (``plan``) changes for ``fraction`` of the users; returns the old values."""
    old, when = {}, tick(w)
    eng = sa.create_engine(w.url)
    with eng.begin() as c:
        for row in w.rows:
            if rng.random() < fraction:
                old[row["user_id"]] = row["plan"]
                row["plan"], row["updated_at"] = "flipped", when
                c.execute(USERS.update().where(USERS.c.user_id == row["user_id"]).values(plan="flipped", updated_at=when))
    eng.dispose()
    return old


def revert(w: World, old: dict[str, str]) -> None:
    """The values go back to what they were (as a toggle undone: the row is updated again)."""
    when = tick(w)
    eng = sa.create_engine(w.url)
    with eng.begin() as c:
        for row in w.rows:
            if row["user_id"] in old:
                row["plan"], row["updated_at"] = old[row["user_id"]], when
                c.execute(USERS.update().where(USERS.c.user_id == row["user_id"]).values(plan=row["plan"], updated_at=when))
    eng.dispose()


def killed_then_reverted(w: World, rng: random.Random, point: str, nth: int) -> Counter:
    old = flip(w, rng)
    assert w.run(f"{point}:{nth}").returncode == -signal.SIGKILL
    revert(w, old)
    w.complete()
    w.complete()  # and the run after: nothing left to repair, nothing wrong
    return w.check()


@pytest.mark.parametrize("vendor,points", [
    ("dfinery", POINTS),  # sets only: the DFINERY round that recorded 215 of 231 landed requests
    ("jiguang", ("vendor_answered", "after_commit", "before_send")),
    ("engagelab", ("vendor_answered", "after_commit")),  # several requests a user
])
def test_a_crash_after_answers_then_the_value_put_back_is_repaired(vendor, points, tmp_path):
    """Kill a run after some answers, put the warehouse values back: the vendor ends equal to the
    warehouse for every user (the killed run's sends were unknown, so they are sent again)."""
    rng = random.Random(11)
    w = World(SCENARIOS[vendor], tmp_path, users=40, seed=5)
    try:
        w.complete()
        for point in points:
            figures = killed_then_reverted(w, rng, point, 4 if point in ("before_send", "vendor_answered") else 1)
            assert figures["users_lost"] == figures["double_applied"] == 0, (point, figures)
    finally:
        w.close()


def test_the_same_on_a_server_database(db_url, tmp_path):
    if db_url.startswith("sqlite"):
        pytest.skip("covered above")
    w = World(SCENARIOS["dfinery"], tmp_path, db_url=db_url, users=40, seed=5)
    try:
        w.complete()
        for point in ("vendor_answered", "before_finalize"):
            clean(killed_then_reverted(w, random.Random(3), point, 3 if point == "vendor_answered" else 1))
    finally:
        w.close()


# -- once, and a dead local holder ---------------------------------------------------------
def test_once_is_not_resent_after_a_kill(tmp_path):
    """Jiguang's ``signup_at`` is once-only: a first run killed after some answers; the rerun
    sends it to no user that already had it (the answered ones were in flight: at most once)."""
    w = World(SCENARIOS["jiguang"], tmp_path, users=30)
    try:
        assert w.run("vendor_answered:6").returncode == -signal.SIGKILL
        w.complete()
        carried = Counter(r["body"]["cuid"] for r in seen(w)
                          if isinstance(r.get("body"), dict) and "signup_at" in r["body"].get("data", {}))
        assert carried and max(carried.values()) == 1, carried
        held, flagged = w.vendor.state(), w._in_doubt_users()
        for row in w.rows:  # there, or counted as applied (in flight when the run died) and flagged
            key = w.scenario.user_key(row)
            assert held.get(key, {}).get("signup_at") == w.scenario.want(row)["signup_at"] or key in flagged
    finally:
        w.close()


def test_a_killed_local_holder_is_taken_over_at_once_a_live_one_is_not(tmp_path):
    """The holder ran on this machine and its process is gone: the next run takes over at once,
    even with a long lock_timeout. A live holder (here stopped) is waited for, and the refusal
    says when it would be presumed dead."""
    w = World(SCENARIOS["dfinery"], tmp_path, users=30, latency=0.1, lock_timeout=300)
    try:
        w.complete()
        w.mutate()
        assert w.run("vendor_answered:2").returncode == -signal.SIGKILL
        dead = w._last_run()
        again = w.run()
        assert again.returncode == 0, again.stderr[-3000:]
        assert runs(w)[dead]["status"] == "abandoned" and "its process is gone" in runs(w)[dead]["error"]
        clean(w.check())

        w.mutate()
        p, stalled, _ = stop_mid_push(w, after=2)
        try:
            refused = w.run()
            assert refused.returncode == 3, refused.stderr[-3000:]
            assert f"locked by run {stalled}" in refused.stderr and "presumed dead at" in refused.stderr
        finally:
            os.kill(p.pid, signal.SIGCONT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        clean(w.check())
    finally:
        w.close()


# -- the fence, in process --------------------------------------------------------------------
def test_a_fenced_commit_of_a_run_that_lost_its_lock_rolls_back(db_url):
    eng = state.connect(db_url)
    state.acquire_lock(eng, "s", 1, bound=False)
    with state.fenced(eng, "s", 1) as c:  # held: commits
        c.execute(state.cursors.insert().values(sync="s", watermark="1", run_id=1, updated_at=state.now()))
    assert state.acquire_lock(eng, "s", 2, stale_after=1e-6, bound=False) == 1  # presumed dead, taken over
    with pytest.raises(state.LeaseLost, match="run 1 lost its lock; it is now held by run 2"):
        with state.fenced(eng, "s", 1) as c:
            c.execute(state.cursors.update().values(watermark="2", run_id=1))
    assert [r["watermark"] for r in table(db_url, state.cursors)] == ["1"]
    eng.dispose()
