"""The benchmark suite at tiny scale, as a real process: it runs end to end and its figures
are sane. No timing is asserted here: timings belong to `make bench`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench  # deselect with -m "not bench"
ROOT = Path(__file__).resolve().parent.parent
KEYS = ("plan_vs_read_time", "plan_vs_read_memory", "incremental_vs_full", "commit_1m_vs_100k",
        "push_fraction_of_limit_by_latency", "push_peak_window", "tencent_batch_fill", "peak_rss_10m_mb")


@pytest.mark.timeout(600)
def test_tiny_bench_writes_sane_results(tmp_path):
    postgres = os.environ.get("USERSYNC_TEST_POSTGRES_URL", "")
    done = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--out", str(tmp_path), "--postgres", postgres,
                           "--vendors", "dfinery,tencent_im"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    dbs = ["sqlite"] + (["postgresql"] if postgres else [])
    for key in KEYS[:4]:
        assert sorted(results[key]) == sorted(dbs), key
        assert all(0 < v < math.inf for v in results[key].values()), (key, results[key])
    assert sorted(results["push_fraction_of_limit_by_latency"]) == ["dfinery", "tencent_im"]
    assert all(list(runs) == ["50ms"] for runs in results["push_fraction_of_limit_by_latency"].values())
    assert all(0 < peak <= 1.0 for peak in results["push_peak_window"].values())
    assert results["tencent_batch_fill"] == 1.0  # 100 users: one full request
    if postgres:
        assert results["peak_rss_10m_mb"] > 0

    raw = results["raw"]
    for db in dbs:
        phases = raw["databases"][db]
        assert phases["read"]["rows"] == phases["plan"]["rows"] == raw["users"]
        assert phases["plan"]["changed"] == raw["users"] // 100  # 1% changed since the seeded run
        assert phases["incremental"]["rows"] == phases["incremental"]["changed"] == raw["users"] // 100
        assert phases["commit_big"]["delivered"] == phases["commit_small"]["delivered"] == raw["users"] // 100
    for vendor, runs in raw["push"].items():
        for push in runs.values():
            assert push["delivered"] == push["users"] and push["status"] == "success", vendor
            assert push["throttled"] == 0, vendor
    if postgres:
        assert raw["scale"]["plan"]["rows"] == raw["scale_users"]
        assert raw["scale"]["plan"]["changed"] == raw["scale_users"] // 100

    md = (tmp_path / "results.md").read_text()
    assert "| `plan_vs_read_time`" in md and "| `push_fraction_of_limit_by_latency`" in md
    assert "| dfinery (10,000 requests / 60 s) | " in md
    try:
        import matplotlib  # noqa: F401 - the chart needs the bench extra
    except ImportError:
        return
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
