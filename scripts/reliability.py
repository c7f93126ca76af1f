"""The RELIABILITY figures: run the fault matrix, the bad-input catalogue and the failure
classes (``tests/failure_classes.py``: kills, values that go back after a kill, stalls past the
lease, concurrent first starts, integer edges), print them as markdown, write
``scripts/reliability.json`` — and with ``--readme``, put the markdown into README.md between its
reliability markers.

    .venv/bin/python scripts/reliability.py [--readme] [--skip-crash] [--sample]

Everything is real: SQLite (and PostgreSQL, with ``USERSYNC_TEST_POSTGRES_URL``) warehouses,
``usersync run`` subprocesses, SIGKILL/SIGSTOP/SIGCONT, the vendor emulators in their own
processes over loopback HTTP. ``--sample``: a few of each class (minutes, not the full loops).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import fault_harness as h  # noqa: E402
import bad_inputs as bad  # noqa: E402

START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"


def _setenv(name: str, value: str) -> None:
    os.environ[name] = value


def fault_matrix() -> dict:
    cells = {}
    for vendor, fault in h.cells():
        with tempfile.TemporaryDirectory() as tmp:
            o = h.run_case(vendor, fault, Path(tmp), _setenv)
        cells[f"{vendor}/{fault}"] = {"ok": o.ok, "users": o.users, "lost": o.lost, "statuses": o.statuses,
                                      "retried_in_run": o.a_attempts, "failed_with": o.b_failure,
                                      "seconds": round(o.seconds, 1)}
        print(f"  {vendor:<11} {fault:<19} {'ok' if o.ok else 'NOT OK'} ({o.seconds:.1f}s)", file=sys.stderr)
    return cells


def bad_inputs() -> dict:
    out = {}
    for entry in bad.CATALOGUE:
        with tempfile.TemporaryDirectory() as tmp:
            said = entry.run(Path(tmp), _setenv)
        out[entry.name] = {"ok": entry.message in said.text and said.lost == 0, "lost": said.lost,
                           "error": entry.message}
        print(f"  {entry.name:<48} {'ok' if out[entry.name]['ok'] else 'NOT OK'}", file=sys.stderr)
    return out


def crash(sample: bool = False, workers: int = 1) -> dict:
    import failure_classes

    return failure_classes.figures(sample=sample, workers=workers,
                                   log=lambda text: print(text, file=sys.stderr, flush=True))


CLASSES = {  # class -> what was tried, in the README's words
    "kill": "SIGKILL at a named point or a random moment",
    "back": "SIGKILL, then the values go back before the rerun",
    "stall": "SIGSTOP past lock_timeout, a new holder, SIGCONT",
    "first_start": "6 syncs started at once on a fresh state database",
    "edge_values": "2^53+1, 2^63-1, -2^63 in a BIGINT column with NULLs",
    "edge_identities": "large BIGINT identities with a NULL in the column",
    "edge_floats": "values and increments of 17 significant digits",
}


def crash_markdown(k: dict) -> list[str]:
    def n(c: dict, key: str) -> int:
        return c.get(key, 0)

    lines = ["", "| class | tried | lost | applied twice | in_doubt short | set aside | other | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for cls, what in CLASSES.items():
        c = k.get(cls) or {}
        tried = {"kill": "kill_points_tried", "back": "kill_points_tried", "stall": "stalls",
                 "first_start": "first_starts"}.get(cls, "values_tried")
        other = {"stall": f"{n(c, 'sent_after_resume')} requests sent after resume "
                          f"({n(c, 'resumed_while_holder_pushed')} resumed mid-push)",
                 "first_start": f"**{n(c, 'crashed')} crashed**" if n(c, "crashed") else "0 crashed",
                 }.get(cls, f"{n(c, 'misaddressed')} misaddressed, {n(c, 'runs_crashed')} runs crashed"
                       if cls.startswith("edge") else f"{n(c, 'killed')} SIGKILLs")
        errors = f"; {len(c['errors'])} errors" if c.get("errors") else ""
        seconds = c.get("seconds")
        seconds = "in kill's" if seconds is None else f"{seconds:.0f}"
        lost = n(c, "users_lost")
        lines.append(f"| {what} | {n(c, tried)} | {f'**{lost}**' if lost else 0} | {n(c, 'double_applied')} | "
                     f"{n(c, 'in_doubt_short')} | {n(c, 'set_aside')} | {other}{errors} | {seconds} |")
    lines.append(f"- **Crash classes:** {k['kill_points_tried']} kill points, {len(k['scenarios'])} syncs "
                 f"({', '.join(k['scenarios'])}) on {' and '.join(k['backends'])}, cursor and full-scan; "
                 f"in {k['seconds']:.0f} s with {k['workers']} worlds at a time (seed {k['seed']}; seconds per class "
                 "add up each world's time). Lost: the vendor differs from the warehouse "
                 "and nothing says so; in_doubt short: an increment or append in flight at the kill, "
                 "flagged and not re-sent (at most once).")
    return lines


def markdown(figures: dict) -> str:
    cells, inputs, kills = figures["faults"], figures["bad_inputs"], figures["crash"]
    vendors = list(h.VENDORS)
    lines = ["| fault | " + " | ".join(vendors) + " |", "| --- |" + " --- |" * len(vendors)]
    for fault in h.FAULTS:
        row = []
        for v in vendors:
            c = cells.get(f"{v}/{fault}")
            row.append("n/a" if c is None else "ok" if c["ok"] else f"**{c['lost']} lost**")
        lines.append(f"| {fault} | " + " | ".join(row) + " |")
    tried = len(cells)
    lost = sum(c["lost"] for c in cells.values())
    users = sum(c["users"] for c in cells.values())
    lines += ["", f"- **Faults:** {tried} fault class × vendor cells tried ({len(h.FAULTS)} classes, "
              f"{len(vendors)} vendors; n/a: {len(h.NOT_APPLICABLE)}), {sum(c['ok'] for c in cells.values())} "
              f"passed; {users} users through them, **{lost} lost**.",
              f"- **Bad input:** {len(inputs)} kinds tried, {sum(i['ok'] for i in inputs.values())} set aside "
              f"or stopped with their specific error; **{sum(i['lost'] for i in inputs.values())} users lost**."]
    if kills:
        lines += crash_markdown(kills)
    else:
        lines.append("- **Crashes:** not measured here (--skip-crash).")
    how = "`scripts/reliability.py --sample` (a few of each class, not the full loops)" if figures.get("sample") \
        else "`scripts/reliability.py`"
    lines.append(f"- Measured {figures['measured']} in {figures['seconds']:.0f} s by {how}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", action="store_true", help="write the table into README.md")
    p.add_argument("--skip-crash", action="store_true", help="leave out the crash loops (minutes)")
    p.add_argument("--sample", action="store_true", help="a few of each failure class, not the full loops")
    p.add_argument("--workers", type=int, default=int(os.environ.get("USERSYNC_CRASH_WORKERS", "2")),
                   help="worlds tried at once (each has its own processes and databases)")
    args = p.parse_args(argv)
    logging.basicConfig(handlers=[logging.NullHandler()])  # the runs' warnings are what is being tested
    t0 = time.monotonic()
    print("fault matrix:", file=sys.stderr)
    faults = fault_matrix()
    print("bad inputs:", file=sys.stderr)
    inputs = bad_inputs()
    figures = {"faults": faults, "bad_inputs": inputs, "sample": args.sample,
               "crash": None if args.skip_crash else crash(args.sample, args.workers),
               "measured": time.strftime("%Y-%m-%d"), "seconds": time.monotonic() - t0}
    text = markdown(figures)
    (ROOT / "scripts" / "reliability.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
    print(text)
    if args.readme:
        readme = ROOT / "README.md"
        doc = readme.read_text()
        head, _, rest = doc.partition(START)
        _, _, tail = rest.partition(END)
        readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    failed = [k for k, c in faults.items() if not c["ok"]] + [k for k, i in inputs.items() if not i["ok"]]
    k = figures["crash"] or {}
    bad = [c for c in ("kill", "back", "stall", "first_start", "edge") if (k.get(c) or {}).get("users_lost")
           or (k.get(c) or {}).get("double_applied") or (k.get(c) or {}).get("crashed")
           or (k.get(c) or {}).get("sent_after_resume") or (k.get(c) or {}).get("errors")]
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
