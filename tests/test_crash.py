"""Crashes and concurrency with real processes: ``usersync run`` subprocesses SIGKILLed at named
points (``USERSYNC_CRASH_AT``) or after a random delay, vendor emulators in their own processes,
and the vendor compared with the warehouse for every user (see ``crash_harness``)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from conftest import table
from connector import state
from crash_harness import SCENARIOS, World, crash_figures, crash_round

slow = pytest.mark.skipif(os.environ.get("USERSYNC_SLOW") != "1", reason="set USERSYNC_SLOW=1")


@pytest.fixture
def world(request, tmp_path):
    vendor, kw = request.param if isinstance(request.param, tuple) else (request.param, {})
    w = World(SCENARIOS[vendor], tmp_path, **kw)
    w.complete()
    yield w
    w.close()


def clean(figures) -> None:
    assert figures["killed"] and figures["users_lost"] == 0 and figures["double_applied"] == 0, figures


def runs(w: World) -> list[dict]:
    return sorted(table(w.url, state.runs), key=lambda r: r["run_id"])


@pytest.mark.parametrize("world", ["jiguang"], indirect=True)
def test_kill_between_the_vendors_answer_and_the_commit_never_counts_twice(world):
    """The accumulate/append requests the vendor applied but the dead run never recorded are
    settled as applied (from their `sending` intent): the rerun does not send them again."""
    before = runs(world)[-1]["run_id"]
    clean(crash_round(world, "vendor_answered", 3))
    dead = [r for r in runs(world) if r["run_id"] > before][0]  # the killed run (a rerun may have met its lock)
    assert dead["status"] == "abandoned" and "taken over" in dead["error"]
    settled = table(world.url, state.batches, state.batches.c.outcome == "in_doubt")
    assert settled and settled[0]["run_id"] == dead["run_id"]
    assert table(world.url, state.plan) == [] and table(world.url, state.locks) == []


def test_the_same_kill_on_a_server_database(db_url, tmp_path):
    if db_url.startswith("sqlite"):
        pytest.skip("covered above")
    w = World(SCENARIOS["jiguang"], tmp_path, db_url=db_url)
    try:
        w.complete()
        clean(crash_round(w, "vendor_answered", 2))
    finally:
        w.close()


@pytest.mark.parametrize("world", ["jiguang"], indirect=True)
def test_kill_after_the_intent_before_the_request_is_flagged_in_doubt_never_resent(world):
    """At most once: an increment in flight when the run died is not re-sent. Killed before it
    left, it is missing at the vendor — and named in an in_doubt batch row; nothing else is."""
    figures = crash_round(world, "before_send", 4)
    clean(figures)
    assert figures["in_doubt_short"] >= 1  # the killed one, and any other between its intent and its send
    flagged = table(world.url, state.batches, state.batches.c.outcome == "in_doubt")
    assert flagged and all("may have been applied" in row["vendor_message"] for row in flagged)
    clean(crash_round(world))  # the next round is exact again (the shortfall stays known, not re-sent)


@pytest.mark.parametrize("world", ["engagelab"], indirect=True)
def test_every_named_point_and_a_random_kill(world):
    """EngageLab sends a user's sets, increases and appends as separate requests: kills land between them."""
    for point in ("extract_chunk", "vendor_answered", "after_commit"):  # all of POINTS: the slow test
        figures = crash_round(world, point, 2)
        assert figures["killed"] and figures["users_lost"] == figures["double_applied"] == 0, (point, figures)
    clean(crash_round(world, delay=0.05))


@pytest.mark.parametrize("world", [("jiguang", {"lock_timeout": 30, "latency": 0.3})], indirect=True)
def test_two_runs_started_together_exactly_one_pushes(world):
    world.mutate()
    a, b = world.start(), world.start()
    (out_a, err_a), (out_b, err_b) = a.communicate(timeout=120), b.communicate(timeout=120)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 3], (err_a[-2000:], err_b[-2000:])
    loser = err_a if a.returncode == 3 else err_b
    winner = [r for r in runs(world) if r["status"] == "success"][-1]
    assert f"locked by run {winner['run_id']}" in loser
    assert [r["status"] for r in runs(world)][-2:] in (["success", "skipped"], ["skipped", "success"])
    clean(world.check() + Counter(killed=1))


@pytest.mark.parametrize("world", [("dfinery", {"lock_timeout": 4})], indirect=True)
def test_a_killed_runs_lock_is_taken_over_after_lock_timeout(world):
    """A holder on another machine (its process cannot be looked up from here) is presumed dead
    only lock_timeout after its last heartbeat. (One of this machine is taken over as soon as
    its process is gone: tests/test_lease.py.)"""
    world.mutate()
    assert world.run("vendor_answered:2").returncode == -signal.SIGKILL
    killed_at = time.monotonic()
    dead = runs(world)[-1]
    with world.state.begin() as c:  # as a run on another host would have recorded itself
        c.execute(state.locks.update().values(owner="elsewhere:4242"))
    early = world.run()
    assert early.returncode == 3 and f"locked by run {dead['run_id']} (elsewhere:4242)" in early.stderr
    assert "presumed dead at" in early.stderr
    time.sleep(max(0.0, 4 - (time.monotonic() - killed_at)))
    assert world.run().returncode == 0
    after = {r["run_id"]: r for r in runs(world)}
    assert after[dead["run_id"]]["status"] == "abandoned"
    assert list(after.values())[-1]["status"] == "success"
    clean(world.check() + Counter(killed=1))


def test_lock_timeout_is_validated(tmp_path):
    from connector import config

    with pytest.raises(Exception, match="lock_timeout"):
        config.SyncSpec.model_validate({**SCENARIOS["dfinery"].sync("http://x"), "lock_timeout": 0})


@slow
def test_crash_figures_over_many_kill_points():
    figures = crash_figures(int(os.environ.get("USERSYNC_CRASH_ITERATIONS", "10")))
    assert figures["users_lost"] == 0 and figures["double_applied"] == 0, figures
    assert figures["killed"] >= figures["kill_points_tried"] // 2, figures
