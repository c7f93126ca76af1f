"""The RELIABILITY figures: run the fault matrix and the bad-input catalogue (and the crash
loops, when ``tests/crash_harness.py`` is there), print them as markdown, write
``scripts/reliability.json`` — and with ``--readme``, put the markdown into README.md between its
reliability markers.

    .venv/bin/python scripts/reliability.py [--readme] [--skip-crash]

Everything is real: SQLite warehouses, the engine, the vendor emulators over loopback HTTP.
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
import test_bad_input as bad  # noqa: E402

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


def crash() -> dict | None:
    try:
        import crash_harness
    except ImportError:
        return None
    return crash_harness.crash_figures()


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
        lines.append(f"- **Crashes:** {kills['kill_points_tried']} kill points tried ({kills['killed']} SIGKILLs, "
                     f"{kills['vendors']} vendors, {kills['users_checked']} users checked); "
                     f"**{kills['users_lost']} users lost**, {kills['double_applied']} applied twice.")
    else:
        lines.append("- **Crashes:** not measured here (tests/crash_harness.py absent or --skip-crash).")
    lines.append(f"- Measured {figures['measured']} in {figures['seconds']:.0f} s by `scripts/reliability.py`.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", action="store_true", help="write the table into README.md")
    p.add_argument("--skip-crash", action="store_true", help="leave out the crash loops (minutes)")
    args = p.parse_args(argv)
    logging.basicConfig(handlers=[logging.NullHandler()])  # the runs' warnings are what is being tested
    t0 = time.monotonic()
    print("fault matrix:", file=sys.stderr)
    faults = fault_matrix()
    print("bad inputs:", file=sys.stderr)
    inputs = bad_inputs()
    figures = {"faults": faults, "bad_inputs": inputs, "crash": None if args.skip_crash else crash(),
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
    return 1 if failed or (figures["crash"] or {}).get("users_lost") else 0


if __name__ == "__main__":
    sys.exit(main())
