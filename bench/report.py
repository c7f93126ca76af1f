"""The targets, computed from one run's raw figures: results.json, results.md, results.png."""

from __future__ import annotations

import json
from pathlib import Path

# key -> (what, goal text, is it met?)
TARGETS = {
    "plan_vs_read_time": ("plan time / bare read time", "<= 1.5", lambda x: x <= 1.5),
    "plan_vs_read_memory": ("plan peak RSS / bare read peak RSS", "<= 2", lambda x: x <= 2.0),
    "incremental_vs_full": ("incremental plan time / full-scan plan time (1% changed)", "<= 0.10", lambda x: x <= 0.10),
    "commit_1m_vs_100k": ("commit of 10k delivered users: 1M-user / 100k-user snapshot", "about 1 (<= 1.5)",
                          lambda x: x <= 1.5),
    "push_fraction_of_limit_by_latency": ("sustained push rate / vendor's declared limit, at each added "
                                          "latency (0 when throttled)", ">= 0.95", lambda x: x >= 0.95),
    "push_peak_window": ("most requests (users) arriving in any window of the vendor's length / its limit",
                         "<= 1.0", lambda x: x <= 1.0),
    "push_throttled": ("throttled answers, all pushes", "0", lambda x: x == 0),
    "tencent_batch_fill": ("Tencent users per request / 100", ">= 0.99", lambda x: x >= 0.99),
    "peak_rss_10m_mb": ("peak RSS planning 10M users on PostgreSQL (MB)", "bounded (stated)", lambda x: True),
}


def summarize(raw: dict) -> dict:
    dbs = raw["databases"]
    out: dict = {
        "plan_vs_read_time": {db: _ratio(d["plan"]["seconds"], d["read"]["seconds"]) for db, d in dbs.items()},
        "plan_vs_read_memory": {db: _ratio(d["plan"]["peak_rss_mb"], d["read"]["peak_rss_mb"]) for db, d in dbs.items()},
        "incremental_vs_full": {db: _ratio(d["incremental"]["seconds"], d["plan"]["seconds"]) for db, d in dbs.items()},
        "commit_1m_vs_100k": {db: _ratio(d["commit_big"]["seconds"], d["commit_small"]["seconds"])
                              for db, d in dbs.items()},
        # not a target: as many users, spread over the big table (1 in 100), touch more pages
        "commit_1m_spread_vs_100k": {db: _ratio(d["commit_big_spread"]["seconds"], d["commit_small"]["seconds"])
                                     for db, d in dbs.items() if "commit_big_spread" in d},
        "push_fraction_of_limit_by_latency": {v: {lat: p["fraction_of_limit"] if not p["throttled"] else 0.0
                                                  for lat, p in runs.items()} for v, runs in raw["push"].items()},
        "push_peak_window": {v: max(p["peak_window"] for p in runs.values()) for v, runs in raw["push"].items()},
        "push_throttled": sum(p["throttled"] or 0 for runs in raw["push"].values() for p in runs.values()),
    }
    out = {k: v for k, v in out.items() if v != {}}
    tencent = raw["push"].get("tencent_im", {})
    if tencent:
        out["tencent_batch_fill"] = min(p.get("batch_fill", 1.0) for p in tencent.values())
    if "scale" in raw:
        out["peak_rss_10m_mb"] = round(raw["scale"]["plan"]["peak_rss_mb"])
    out["met"] = {k: all(TARGETS[k][2](x) for x in _leaves(v)) for k, v in out.items() if k in TARGETS}
    out["raw"] = raw
    return out


def _leaves(v):
    return [x for y in v.values() for x in _leaves(y)] if isinstance(v, dict) else [v]


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("inf")


def table(results: dict) -> str:
    raw = results["raw"]
    lines = ["| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    for key, (what, goal, _) in TARGETS.items():
        if key not in results:
            continue
        v = results[key]
        if key == "push_fraction_of_limit_by_latency":
            shown = "by vendor and latency: the table below"
        else:
            shown = ", ".join(f"{k} {x}" for k, x in v.items()) if isinstance(v, dict) else str(v)
        lines.append(f"| `{key}`: {what} | {shown} | {goal} | {'yes' if results['met'][key] else '**no**'} |")
    if "machine" in raw:
        m = raw["machine"]
        lines.append("")
        lines.append(f"Mode `{raw['mode']}`: {raw['users']:,} users (commit: {raw['small_users']:,}; scale: "
                     f"{raw['scale_users']:,}), {m['cpus']} CPUs, load average {m['load_before'][0]:.2f} before and "
                     f"{m['load_after'][0]:.2f} after, {m['minutes']} min, {m['date']}.")
    if raw.get("push"):
        lines += ["", push_table(results)]
    return "\n".join(lines)


def push_table(results: dict) -> str:
    """The push's fraction of each vendor's limit by added latency, its peak window, its throttling."""
    raw = results["raw"]
    latencies = list(dict.fromkeys(lat for runs in raw["push"].values() for lat in runs))
    lines = ["| vendor (limit) | " + " | ".join(latencies) + " | peak window | throttled |",
             "| --- |" + " --- |" * (len(latencies) + 2)]
    for v, runs in raw["push"].items():
        first = next(iter(runs.values()))
        limit = f"{first['limit'] * first['window']:,.0f} {first['unit'][:-2]} / {first['window']:g} s"
        cells = [_cell(runs[lat]) if lat in runs else "" for lat in latencies]
        peak = results["push_peak_window"][v]
        lines.append(f"| {v} ({limit}) | " + " | ".join(cells) + f" | {_mark(peak, peak <= 1.0)} | "
                     f"{sum(p['throttled'] or 0 for p in runs.values())} |")
    m = raw["push_machine"]
    lines.append("")
    lines.append(f"Push mode `{m['mode']}`: latencies added by the emulator to every answer (lognormal: median "
                 f"150 ms, p99 1 s), {m['cpus']} CPUs, load average {m['load_before'][0]:.2f} before and "
                 f"{m['load_after'][0]:.2f} after, {m['minutes']} min, {m['date']}.")
    return "\n".join(lines)


def _cell(run: dict) -> str:
    """A push's fraction of the limit as the target counts it: 0 when throttled (the rate measured then, in brackets)."""
    if run["throttled"]:
        return f"**0.0** ({run['fraction_of_limit']}, {run['throttled']} throttled)"
    return _mark(run["fraction_of_limit"], run["fraction_of_limit"] >= 0.95)


def _mark(x: float, ok: bool) -> str:
    return str(x) if ok else f"**{x}**"


def details(results: dict) -> str:
    raw = results["raw"]
    rows = ["| database | phase | seconds | peak RSS (MB) | rows |", "| --- | --- | --- | --- | --- |"]
    for db, d in raw["databases"].items():
        for phase, r in d.items():
            seconds = f"{r['seconds']:.2f}" + (f" (median of {', '.join(map(str, r['rounds']))})" if len(r.get("rounds", [])) > 1 else "")
            rows.append(f"| {db} | {phase} | {seconds} | {r['peak_rss_mb']:.0f} | {r.get('rows', r.get('delivered', ''))} |")
    if "scale" in raw:
        r = raw["scale"]["plan"]
        rows.append(f"| postgresql | plan, {raw['scale_users']:,} users | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['rows']} |")
    rows += ["", "| vendor | latency | users | requests | seconds | rate | limit | fraction | whole run | peak window "
                 "| throttled | load before |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v, runs in raw["push"].items():
        for lat, p in runs.items():
            rows.append(f"| {v} | {lat} | {p['users']} | {p['requests']} | {p['seconds']} | {p['rate']} {p['unit']} | "
                        f"{p['limit']:.1f} | {p['fraction_of_limit']} | {p.get('run_fraction_of_limit', '')} | "
                        f"{p['peak_window']} | {p['throttled']} | "
                        f"{p.get('load', '')} |")
    return "\n".join(rows)


def readme(results: dict, path: Path, start: str = "<!-- bench:start -->", end: str = "<!-- bench:end -->") -> None:
    """Put the table between the README's bench markers."""
    text = path.read_text()
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + table(results) + "\n" + end + rest.split(end, 1)[1])


def write(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        chart(results, out / "results.png")
    except ImportError:  # matplotlib comes with the bench extra; the tests' smoke run may lack it
        pass
    (out / "results.md").write_text(
        "# usersync benchmarks\n\nWritten by `make bench` (`python -m bench`); every target is a ratio "
        "measured in the same run.\n\n" + table(results) + "\n\n![targets](results.png)\n\n## Phases\n\n"
        + details(results) + "\n")


def chart(results: dict, path: Path) -> None:
    """One bar per measured ratio, each scaled to its goal (<= 1 is inside the goal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goals = {"plan_vs_read_time": 1.5, "plan_vs_read_memory": 2.0, "incremental_vs_full": 0.10,
             "commit_1m_vs_100k": 1.5}
    labels, values = [], []
    for key, goal in goals.items():
        for db, x in results.get(key, {}).items():
            labels.append(f"{key}\n{db}")
            values.append(x / goal)
    for vendor, runs in results.get("push_fraction_of_limit_by_latency", {}).items():
        for latency, x in runs.items():
            labels.append(f"push {vendor} {latency}")
            values.append(0.95 / x if x else 2.0)  # higher is better: show goal / value
    for vendor, x in results.get("push_peak_window", {}).items():
        labels.append(f"peak window {vendor}")
        values.append(x)
    if "tencent_batch_fill" in results:
        labels.append("tencent batch fill")
        values.append(0.99 / results["tencent_batch_fill"])
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    ax.barh(labels, values, color=["#2a9d8f" if v <= 1 else "#e76f51" for v in values])
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("measured / goal (left of the dashed line: target met)")
    ax.set_title(f"usersync benchmarks ({results['raw']['mode']}, {results['raw']['users']:,} users)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
