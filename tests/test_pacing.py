"""Pacing: the rate limiter's schedule, the senders that adapt to answer times, the vendors'
wait headers in every unit, and each Airflow push task's share of the limit that applies.

No speed is asserted here (speed is shown in bench/ as ratios). What is asserted is the
limiter's schedule — the start times it decided — against the vendor's window: correctness."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from connector import config, demo, demo_run, engine, push as pushing

from connector.vendors import emulator
from connector.airflow import tasks
from connector.transport import MARGIN, RateLimiter, Senders, Transport
from connector.vendors.dfinery import client as dfinery_client, emulator as dfinery
from connector.vendors.base import Limit, Request, wait_seconds


class Recorded(RateLimiter):
    """The limiter as it is, its departures recorded; its sleeps wake late, as threads on a
    loaded machine do (exponentially, ``late`` seconds on average)."""

    def __init__(self, limit: Limit, share: float = 1.0, late: float = 0.0, starts: list | None = None):
        super().__init__(limit, share)
        self.late, self.starts = late, starts if starts is not None else []

    def _left(self, start):
        super()._left(start)
        self.starts.append((start.at, start.cost))  # when it left, as the limiter counts it

    def _sleep(self, seconds):
        time.sleep(seconds + (random.expovariate(1 / self.late) if self.late else 0.0))


def most_in_a_window(starts: list[tuple[float, float]], window: float) -> float:
    """The most any window (t - window, t] holds, over the recorded starts."""
    starts = sorted(starts)
    best = held = 0.0
    first = 0
    for at, cost in starts:
        held += cost
        while starts[first][0] <= at - window:
            held -= starts[first][1]
            first += 1
        best = max(best, held)
    return best


def drive(limiters: list[RateLimiter], senders: int, latency: float, seconds: float, users=lambda: 1,
          leaving=lambda: 0.0) -> None:
    """``senders`` threads per limiter: each takes a start, leaves ``leaving()`` seconds after it
    (the thread writing its request late), then holds its request for a lognormal answer time
    around ``latency`` (a tail to seconds), again and again, for ``seconds``."""
    end = time.monotonic() + seconds

    def sender(limiter):
        while time.monotonic() < end:
            start = limiter.acquire(users())
            time.sleep(leaving())
            start.left()
            if latency:
                time.sleep(random.lognormvariate(0, 0.8) * latency)

    threads = [threading.Thread(target=sender, args=(lim,)) for lim in limiters for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def late_departures(mean: float, beyond_a_window: float = 0.0, window: float = 0.0):
    """Departures an exponential ``mean`` after their slot; a ``beyond_a_window`` part of them
    later than a whole window (a sender that lost the CPU for that long)."""
    def leaving():
        if beyond_a_window and random.random() < beyond_a_window:
            return window * (1 + MARGIN) * random.uniform(1.0, 1.5)
        return random.expovariate(1 / mean) if mean else 0.0
    return leaving


@pytest.mark.parametrize("senders, latency, late, leaving", [
    (4, 0.0, 0.0, 0.0), (32, 0.0, 0.02, 0.0), (32, 0.05, 0.02, 0.01), (64, 0.2, 0.05, 0.03)])
def test_no_window_of_the_vendors_length_ever_holds_more_than_its_limit(senders, latency, late, leaving):
    limit = Limit(20, 0.5)
    limiter = Recorded(limit, late=late)
    drive([limiter], senders, latency, 1.6, leaving=late_departures(leaving))
    assert len(limiter.starts) > 2 * limit.count  # the window filled, several times
    # exactly: the vendor's count over a window (1 + MARGIN) times the vendor's, so arrivals
    # that lag their departures by up to MARGIN x window still fit the vendor's own window
    assert most_in_a_window(limiter.starts, limit.window * (1 + MARGIN)) <= limit.count
    assert most_in_a_window(limiter.starts, limit.window) <= limit.count


def test_requests_that_leave_long_after_their_slot_still_fit_the_window():
    """Senders that write their request late, some more than a window after their slot: the
    window holds over when they left, which is what the vendor counts."""
    limit = Limit(20, 0.3)
    limiter = Recorded(limit, late=0.01)
    drive([limiter], 48, 0.05, 2.0, leaving=late_departures(0.03, beyond_a_window=0.05, window=limit.window))
    assert len(limiter.starts) > 3 * limit.count
    assert most_in_a_window(limiter.starts, limit.window * (1 + MARGIN)) <= limit.count


def test_a_start_not_yet_gone_is_counted_however_long_it_takes_to_leave():
    limit = Limit(2, 0.2)
    limiter = Recorded(limit)
    late = limiter.acquire()  # its sender loses the CPU for longer than a window
    time.sleep(limiter.window * 1.2)
    on_time = limiter.acquire()
    on_time.left()
    third = limiter.acquire()  # the late one still counts: room only once on_time is a window old
    granted = third.at
    late.left()
    third.left()
    assert granted >= on_time.at + limiter.window * 0.99
    assert most_in_a_window(limiter.starts, limit.window * (1 + MARGIN)) <= limit.count


def test_a_limit_in_users_counts_the_users_each_request_carries():
    limit = Limit(100, 0.5, "users")
    limiter = Recorded(limit, late=0.02)
    drive([limiter], 16, 0.02, 1.6, users=lambda: random.randint(1, 30), leaving=late_departures(0.01))
    assert sum(cost for _, cost in limiter.starts) > 2 * limit.count
    assert most_in_a_window(limiter.starts, limit.window * (1 + MARGIN)) <= limit.count


def test_pushes_sharing_a_limit_together_stay_under_it():
    limit, starts = Limit(30, 0.5), []
    limiters = [Recorded(limit, share=1 / 3, late=0.02, starts=starts) for _ in range(3)]
    drive(limiters, 8, 0.03, 1.6, leaving=late_departures(0.01))
    assert most_in_a_window(starts, limit.window * (1 + MARGIN)) <= limit.count


def test_a_vendor_back_off_holds_every_start_for_its_wait_at_most_a_window():
    limit = Limit(10, 0.4)
    limiter = Recorded(limit)
    limiter.acquire().left()
    limiter.pause(3600)  # a misread reset: capped by the window
    paused = time.monotonic()
    limiter.acquire().left()
    assert limiter.starts[1][0] >= paused + limit.window * 0.99 and limiter.pauses == 1


class _Held(BaseHTTPRequestHandler):
    """Answers only once the client said its request has left (or after 5 s, with a 504)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        status = 200 if self.server.left.wait(5) else 504
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_transport_says_a_request_has_left_once_written_before_its_answer():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Held)
    server.left = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    transport = Transport(concurrency=2, timeout=(5, 10), verify=True, user_agent="test")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        prepared = transport.prepare(Request("POST", url, ("u",), json={"users": ["u"] * 1000}))
        assert transport.send(prepared, server.left.set).status_code == 200  # the answer waited for left
        server.left.clear()
        calls = []
        with pytest.raises(requests.ConnectionError):  # never written: counted from its failure, once
            transport.send(transport.prepare(Request("POST", "http://127.0.0.1:9/", ("u",), json={})),
                           lambda: calls.append(1))
        assert calls == [1]
    finally:
        transport.close()
        server.shutdown()
        server.server_close()


# -- senders ---------------------------------------------------------------------------------
def run_jobs(senders: Senders, jobs: int, seconds: float, at_work: list[int]) -> int:
    """``jobs`` jobs of ``seconds`` each through a pool of the senders' maximum; returns the
    most senders seen at work at once (also recorded in ``at_work``)."""
    lock, busy = threading.Lock(), [0]

    def job():
        with lock:
            busy[0] += 1
            at_work.append(busy[0])
            assert busy[0] <= senders.limit
        time.sleep(seconds)
        with lock:
            busy[0] -= 1

    with ThreadPoolExecutor(senders.maximum) as pool:
        futures = [pool.submit(senders.run, job) for _ in range(jobs)]
        for f in futures:
            f.result()
            senders.observe()
    return max(at_work)


def test_senders_follow_answer_times_by_littles_law_both_ways_and_halve_on_throttling():
    limiter = RateLimiter(Limit(100, 1.0))
    senders = Senders(limiter, maximum=64, start=4)
    run_jobs(senders, 300, 0.2, [])
    # in flight = rate x time: at 97 requests a second, 0.2 s answers need at least 19 at work
    slow = senders.limit
    assert slow >= limiter.pace() * 0.2 * Senders.HEADROOM
    run_jobs(senders, 400, 0.01, [])
    fast = senders.limit
    assert fast < slow  # answers sped up: fewer senders
    limiter.pause(0.01)
    senders.observe()
    assert senders.limit <= max(1, fast // 2)


def test_senders_never_exceed_their_maximum_nor_let_more_work_than_allowed():
    limiter = RateLimiter(Limit(1000, 1.0))
    senders = Senders(limiter, maximum=6, start=2)
    at_work: list[int] = []
    assert run_jobs(senders, 120, 0.05, at_work) <= 6  # the job itself asserts the gate
    assert senders.limit == 6  # 0.05 s at 970 a second would want 63


# -- wait headers, in every unit a vendor writes them ----------------------------------------
@pytest.mark.parametrize("unit", ["seconds", "epoch", "epoch_ms"])
def test_dfinery_reset_header_is_read_in_any_unit_and_capped_by_the_window(unit):
    emu = dfinery.Emulator(service_id="svc", access_token="tok", reset_unit=unit)
    client = dfinery_client.Client(None, {"access_token": "tok"}, {"service_id": "svc"})
    with emulator.Running(emu) as running:
        for asked, expected in [(20, 20), (10**7, dfinery.LIMIT.window)]:
            emu.add_fault("throttle", delay=asked)
            resp = requests.post(running.url + dfinery.PATH, params={"service_id": "svc"}, json={})
            assert resp.status_code == 429
            wait = client.verdict(None, resp).wait
            reset = resp.headers["X-Rate-Limit-Reset"]  # written in whole seconds or milliseconds
            assert expected - 1.5 <= wait <= min(expected + 0.5, dfinery.LIMIT.window), (unit, reset, wait)


@pytest.mark.timeout(120)
def test_a_throttled_push_with_a_reset_in_epoch_milliseconds_waits_and_delivers(sqlite_url, tmp_path, monkeypatch):
    from vendor_cases.dfinery import DFINERY_MAPPING, dfinery_sync
    from warehouse import make_users, run, user_row, write_config

    monkeypatch.setenv("TEST_DFINERY_TOKEN", "tok")
    emu = dfinery.Emulator(service_id="svc-1", access_token="tok", reset_unit="epoch_ms",
                           properties={m["attribute"]: m["type"] for m in DFINERY_MAPPING})
    emu.add_fault("throttle", delay=1)  # before the fix: a wait of 1.8e12 s, the run stalled for good
    make_users(sqlite_url, [user_row(i) for i in range(5)])
    with emulator.Running(emu) as running:
        cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [dfinery_sync(running.url)])
        s = run(cfg, "dfinery_users")
    assert s.status == "success" and s.users_delivered == 5 and s.requests == 6


class _Answer(BaseHTTPRequestHandler):
    """A loopback server answering 429 with the Retry-After the path names."""

    def do_GET(self):
        self.send_response(429)
        self.send_header("Retry-After", self.server.values[self.path])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_retry_after_in_every_form_through_a_real_http_answer():
    now = time.time()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    server.values = {"/seconds": "7", "/epoch": f"{now + 7:.0f}", "/epoch_ms": f"{(now + 7) * 1000:.0f}",
                     "/date": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 8)),
                     "/far": f"{(now + 10**6) * 1000:.0f}", "/past": f"{now - 100:.0f}", "/junk": "soon"}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        waits = {p: wait_seconds(requests.get(url + p), cap=60.0) for p in server.values}
    finally:
        server.shutdown()
        server.server_close()
    for form in ("seconds", "epoch", "epoch_ms", "date"):
        assert 5 <= waits["/" + form] <= 8, (form, waits)
    assert waits["/far"] == 60.0 and waits["/past"] == 0.0 and waits["/junk"] is None


# -- Airflow: each push task's share of the limit that applies to the sync as configured -----
# vendor (API) -> the documented limit, written out from the vendors' docs: count, window, unit
DOCUMENTED = {
    ("dfinery", None): (10_000, 60, "requests"),
    ("jiguang", None): (100, 1, "requests"),
    ("engagelab", None): (100, 1, "requests"),  # not published: the inferred 100 QPS
    ("tencent_im", None): (100, 1, "requests"),
    ("moengage", "track"): (10_000, 60, "users"),  # one budget across both APIs
    ("moengage", "bulk"): (10_000, 60, "users"),
}


@pytest.fixture
def demo_syncs(tmp_path, monkeypatch):
    """The demo's syncs (every vendor), and a planned run of 40 users for each, over 4 shards."""
    monkeypatch.setenv("USERSYNC_POOL_SLOTS", "4")

    def make(api: str = "bulk", rate_limit: float | None = None, shared: bool = False):
        path = demo_run.write_config(tmp_path)
        text = path.read_text().replace("api: bulk}", f"api: {api}}}")
        if rate_limit:
            text = text.replace("    vendor:\n", f"    vendor:\n      rate_limit: {rate_limit}\n")
        path.write_text(text)
        cfg, _ = config.load(path)
        if shared:  # a second sync on each vendor's credential
            cfg = cfg.model_copy(update={"syncs": cfg.syncs + [s.model_copy(update={"name": s.name + "_too"})
                                                               for s in cfg.syncs]})
        return cfg

    demo.build_warehouse(f"sqlite:///{tmp_path / 'warehouse.db'}", users=40)
    return make


def planned(cfg, name: str):
    sync = engine.open_sync(cfg, name)
    run_id = engine.begin(sync, mode="incremental", trigger="test")
    engine.plan(sync, run_id)
    return sync, run_id


@pytest.mark.parametrize("vendor, api", list(DOCUMENTED))
@pytest.mark.parametrize("shared", [False, True])
def test_each_push_task_paces_at_its_share_of_the_documented_limit(demo_syncs, vendor, api, shared):
    cfg = demo_syncs(api or "bulk", shared=shared)
    sync, run_id = planned(cfg, f"{vendor}_users")
    share = tasks.share(sync, run_id)()
    assert share == 1 / 4  # four shards pending (or a shared credential): a quarter each
    limiter = pushing.pacing(sync, share)
    count, window, unit = DOCUMENTED[(vendor, api)]
    assert (limiter.limit.count, limiter.limit.window, limiter.limit.unit) == (count, window, unit)
    # the pace, in the limit's unit a second: a quarter of the documented rate, under the margin
    assert limiter.rate == pytest.approx(count / window / 4 / (1 + MARGIN))
    if (vendor, api) == ("moengage", "bulk"):
        assert limiter.rate == pytest.approx(40.45, abs=0.01)  # users a second (the class's rate gave 8,167)


def test_vendor_rate_limit_overrides_the_documented_limit_in_its_unit(demo_syncs):
    cfg = demo_syncs("bulk", rate_limit=1000)  # a workspace granted 60,000 users a minute
    sync, run_id = planned(cfg, "moengage_users")
    limiter = pushing.pacing(sync, tasks.share(sync, run_id)())
    assert limiter.limit == Limit(60_000, 60, "users")
    assert limiter.rate == pytest.approx(1000 / 4 / (1 + MARGIN))


def test_when_a_shard_finishes_the_others_take_up_its_share(demo_syncs, monkeypatch):
    cfg = demo_syncs()
    sync, run_id = planned(cfg, "dfinery_users")
    share = tasks.share(sync, run_id)
    assert share() == 1 / 4
    with emulator.Running(dfinery.emulator([sync.spec])) as running:
        sync.spec = sync.spec.model_copy(update={"vendor": sync.spec.vendor.model_copy(
            update={"base_url": running.url})})
        for left, shard in [(3, 0), (2, 1), (1, 2)]:
            engine.push(sync, run_id, shard=shard, share=share)
            assert share() == 1 / left
        monkeypatch.setenv("USERSYNC_POOL_SLOTS", "2")
        assert tasks.share(sync, run_id)() == 1.0  # one shard left, whatever the slots
    shared = demo_syncs(shared=True)
    sync, run_id = planned(shared, "jiguang_users")
    assert tasks.share(sync, run_id)() == 1 / 2  # another sync on the credential: 1 / slots, fixed
