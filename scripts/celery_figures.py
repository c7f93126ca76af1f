"""The scale-out figures: the steps of ``tests/test_celery.py`` on a fresh Airflow-on-Celery
deployment (``tests/celery_harness.py``), printed as markdown, written to ``scripts/celery.json``,
and with ``--readme`` put into README.md between its celery markers (``--again``: render the
saved figures again without measuring).

    USERSYNC_TEST_POSTGRES_URL=postgresql+psycopg2://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python scripts/celery_figures.py [--readme]       # ~7 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from celery_harness import ScaleOut  # noqa: E402

START, END = "<!-- celery:start -->", "<!-- celery:end -->"


def measure() -> dict:
    t0, load = time.monotonic(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        s = ScaleOut(Path(tmp))
        try:
            s.start()
            out = {"first": s.first_sync(), "killed": s.killed_sync(), "overlap": s.overlapping_runs()}
        finally:
            s.close()
    out["seconds"] = round(time.monotonic() - t0)
    out["load"] = [load, os.getloadavg()[0]]
    out["at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return out


def markdown(f: dict) -> str:
    a, k, o = f["first"], f["killed"], f["overlap"]
    spread = ", ".join(f"{w} {n:,} users (shards {a['shards_by_worker'][w]})" for w, n in sorted(a["workers"].items()))
    retried = ", ".join(f"shard {m}: " + " -> ".join(f"try {t} on {h} {st}" for t, h, st in v)
                        for m, v in k["retried"].items())
    spans = "; ".join(f"{kind} {n} batches {s[11:19]}-{e[11:19]}"  # the times of day (UTC)
                      for kind, (s, e, n) in sorted(o["spans"].items(), key=lambda kv: kv[1][0]))
    # what the kill cost: the killed run's push time against the same requests at the first
    # sync's pace (the dead worker's pushes hold their share until Airflow retries them)
    cost = k["push_s"] - k["requests_at_vendor"] / a["rate"]
    return "\n".join([
        "| step | users | shards | workers | push rate / limit | peak 1 s window (sliding) | throttled | latency p50 / p99 | wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| first sync (scheduled run) | {a['users']:,} | {a['shards']} | {len(a['workers'])} | "
        f"{a['rate']} / {a['limit']} = **{a['rate_vs_limit']}** | {a['peak_sliding_window']} | "
        f"{a['throttled']} | {a['latency_p50_ms']} / {a['latency_p99_ms']} ms | {a['wall_s']} s (push {a['push_s']} s) |",
        f"| one worker SIGKILLed mid-push | {k['users']:,} | {k['shards']} | {len(k['workers'])} | "
        f"{k['rate']} / {k['limit']} = {k['rate_vs_limit']} | {k['peak_sliding_window']} | "
        f"{k['throttled']} | {k['latency_p50_ms']} / {k['latency_p99_ms']} ms | {k['wall_s']} s (push {k['push_s']} s) |",
        "",
        f"- **Spread:** {spread}.",
        f"- **Kill:** {k['victim']} SIGKILLed {k['killed_after_s']} s into the run, after "
        f"{k['victim_batches_before_kill']:,} of its batches; the first retried batch went "
        f"{k['retry_started_s_after_kill']} s later ({retried}). The kill cost {cost:.0f} s of pushing "
        f"(push {k['push_s']} s against {k['requests_at_vendor'] / a['rate']:.0f} s at the first sync's pace). "
        f"In doubt: {k['in_doubt']} user(s); after the next run: users lost **{k['check']['users_lost']}**, "
        f"applied twice **{k['check']['double_applied']}**, in-doubt increments short {k['check']['in_doubt_short']}.",
        *([f"- **Not met:** the vendor's window, held in aggregate: {a['throttled']} of {a['requests_at_vendor']:,} "
            f"requests were answered 429 (each retried, none lost), the busiest one-second window held "
            f"{a['peak_sliding_window']} of {a['limit']}. Each push holds its share of starts to windows 3% longer "
            f"than the vendor's, which covers start-to-arrival jitter up to 30 ms; here push latency reached "
            f"{a['latency_p99_ms']} ms at p99 against the emulator's 10."] if a["throttled"] or a["peak_sliding_window"] > a["limit"] else []),
        f"- **Overlap:** scheduled, manual and backfill runs started within {o['started_within_s']} s; pushes "
        f"never overlapped ({spans}); {o['plans_refused_by_the_lock']} plan tries refused by the lock; "
        f"users lost {o['check']['users_lost']}, applied twice {o['check']['double_applied']}.",
        f"- Measured {f['at'][:10]} in {f['seconds']} s by `scripts/celery_figures.py` (2 CPUs, load average "
        f"{f['load'][0]:.1f} before and {f['load'][1]:.1f} after; Jiguang emulator in its own process, 10 ms latency).",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="write the figures into README.md")
    ap.add_argument("--again", action="store_true", help="render scripts/celery.json again, not measure")
    args = ap.parse_args()
    saved = ROOT / "scripts" / "celery.json"
    if not args.again:
        saved.write_text(json.dumps(measure(), indent=2, default=str) + "\n")
    md = markdown(json.loads(saved.read_text()))
    print(md)
    if args.readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        head, rest = text.split(START)
        readme.write_text(f"{head}{START}\n{md}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
