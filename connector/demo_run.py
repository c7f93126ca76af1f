"""``make demo``: a real sync from an embedded SQLite warehouse to the vendor emulators.

Builds ``demo/warehouse.db`` and ``demo/syncs.yaml``, starts the emulators on their fixed
ports, runs every sync, changes a few users (and one unmapped column), runs again and
shows what the sync tables hold. Afterwards, by hand:
``usersync emulators --config demo/syncs.yaml`` in one shell and
``usersync run --all --config demo/syncs.yaml`` in another.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import sqlalchemy as sa

from connector import config, demo, engine, state

from connector.vendors import emulator

TEMPLATE = Path(__file__).with_name("demo_syncs.yaml")


def write_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "syncs.yaml"
    path.write_text(TEMPLATE.read_text().replace("{warehouse}", f"sqlite:///{directory / 'warehouse.db'}"))
    return path


def main(directory: Path, users: int = 2000) -> int:
    logging.getLogger("usersync").setLevel(logging.WARNING)
    path = write_config(directory)
    url = f"sqlite:///{directory / 'warehouse.db'}"
    (directory / "warehouse.db").unlink(missing_ok=True)
    print(f"== building {users} demo users in {directory / 'warehouse.db'}")
    demo.build_warehouse(url, users=users)
    cfg, _ = config.load(path)
    running = emulator.start_all(cfg.syncs)
    try:
        for name, r in running.items():
            print(f"   {name} emulator on {r.url}")
        print("\n== first run: every user is new, every mapped attribute is sent")
        _run_all(cfg)
        print("\n== second run, nothing changed: no requests")
        _run_all(cfg)
        later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
        changed = demo.change_users(url, count=3, now=later)
        demo.touch_unmapped(url, ["u000010"], now=later)
        print(f"\n== third run: {', '.join(changed)} changed mapped columns; u000010 only an unmapped note")
        _run_all(cfg)
        _show_tables(cfg, running)
    finally:
        for r in running.values():
            r.stop()
    print(f"\nAgain by hand: `usersync emulators --config {path}` in one shell, "
          f"`usersync run --all --config {path}` in another; `usersync status --config {path}`.")
    return 0


def _run_all(cfg) -> None:
    for spec in cfg.syncs:
        print("   " + engine.run(cfg, spec.name).line())


def _show_tables(cfg, running) -> None:
    eng = state.connect(cfg.state_url)
    with eng.connect() as c:
        print("\n== sync tables")
        for t in (state.runs, state.batches, state.snapshot, state.failures):
            print(f"   {t.name:<14} {c.execute(sa.select(sa.func.count()).select_from(t)).scalar():>7} rows")
        b = state.batches
        rows = c.execute(sa.select(b.c.run_id, b.c.first_user, b.c.attributes, b.c.http_status, b.c.vendor_code,
                                   b.c.latency_ms).order_by(b.c.batch_id.desc()).limit(4)).all()
        print("   last batches (run, user, attributes, http, code, ms):")
        for row in rows:
            print("     ", *row)
    for name, r in running.items():
        held = r.emulator.state()
        if held:
            key = sorted(held)[0]
            print(f"\n== {name} now holds {len(held)} users; {key}: {held[key]}")
