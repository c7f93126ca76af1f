"""Bad input, a catalogue: each entry a real run that must end with a specific error.

Row-level entries make one user's row bad (through a SQL source over the users table) and
check that exactly that user is set aside with its reason while every other user is
delivered. Run-level entries (a column gone, the warehouse unreachable, a sync table
dropped) must stop before anything is sent, saying what is wrong.
A helper module: ``tests/test_bad_input.py`` runs the catalogue, and ``scripts/reliability.py``
the same for the README's figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

import fault_harness as h
from connector import state
from warehouse import USERS, write_config

BAD = "u00003"  # the user whose row goes bad


@dataclasses.dataclass
class Said:
    """What a run said (summary, error, failures, log) and how many users it lost."""

    text: str
    lost: int = 0


@dataclasses.dataclass
class Bad:
    """One bad input: ``columns`` replaced (SQL expressions) in the row of ``who``; the user
    ``key`` (None: a row without identity) must be set aside saying ``message``."""

    name: str
    vendor: str
    columns: dict[str, str]
    message: str
    who: str = BAD
    key: str | None = BAD

    def run(self, directory: Path, env: Callable[[str, str], None]) -> Said:
        case = sql_case(self.vendor, directory, env, self.columns, self.who)
        try:
            with _logged() as log:
                s = case.run()
            rows = case.rows(state.failures)
            failed = {r["user_key"] for r in rows}
            held = case.held()
            others = [k for k in case.keys if k != self.who and (self.key is None or k != self.key)]
            # everyone else delivered; of the bad user, a bad identity sets aside the whole user
            # (not sent), a bad value that attribute only (the user's others delivered)
            v = h.VENDORS[self.vendor]
            whole = set(self.columns) <= set(v["identity"].values())
            attrs = {m[1] for m in v["mapping"] if m[0] in self.columns}
            lost = sum(1 for k in others if k not in held) + (self.key is not None and self.key not in failed)
            if self.key:
                lost += (self.key in held) if whole else (self.key not in held or bool(attrs & set(held[self.key])))
            return Said("\n".join([s.line(), *(r["message"] for r in rows), *log]), lost)
        finally:
            case.running.stop()


class _logged:
    """Collect the usersync log's messages (warnings and up) while a run lasts."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda r: self.lines.append(r.getMessage())
        self.log, self.level = logging.getLogger("usersync"), logging.getLogger("usersync").level
        self.log.addHandler(self.handler)
        self.log.setLevel(logging.WARNING)  # whatever the root logger's level
        return self.lines

    def __exit__(self, *exc) -> None:
        self.log.removeHandler(self.handler)
        self.log.setLevel(self.level)


def sql_case(vendor: str, directory: Path, env, columns: dict[str, str], who: str) -> h.Case:
    """The vendor's fault-harness sync, reading the users table through SQL that spoils one row."""
    case = h.setup(vendor, directory, env)
    select = ", ".join(f"CASE WHEN user_id = '{who}' THEN {columns[c]} ELSE {c} END AS {c}" if c in columns else c
                       for c in USERS.c.keys())
    (directory / "users.sql").write_text(f"SELECT {select} FROM users")
    write_config(case.cfg_path, case.url, [dict(h.sync_dict(vendor, case.running.url), source={"sql": "users.sql"})])
    if "user_id" in columns or "numeric_id" in columns:  # the key the spoiled row now has
        column = next(iter(h.VENDORS[vendor]["identity"].values()))
        with sa.create_engine(case.url).connect() as c:
            rows = c.execute(sa.text(f"SELECT {column} FROM ({select_of(directory)}) s"))
            case.keys = [str(k) for (k,) in rows if k is not None and str(k).strip()]
    return case


def select_of(directory: Path) -> str:
    return (directory / "users.sql").read_text()


ROWS = [
    Bad("NULL identity", "dfinery", {"user_id": "NULL"}, "row with empty identity set aside", key=None),
    Bad("empty identity", "dfinery", {"user_id": "'  '"}, "row with empty identity set aside", key=None),
    Bad("duplicate identity in one extraction", "dfinery", {"user_id": f"'{BAD}'"},
        "duplicate identity in the source", who="u00004"),
    Bad("NaN in a number column", "dfinery", {"ltv": "'NaN'"}, "ltv: 'NaN' is not a valid double"),
    Bad("infinity in a number column", "dfinery", {"ltv": "9e999"}, "ltv: inf is not a valid double"),
    Bad("integer beyond 64 bits", "dfinery", {"orders": "1e30"}, "orders: 1e+30 is not a valid long"),
    Bad("text in a numeric column", "dfinery", {"orders": "'abc'"}, "orders: 'abc' is not a valid long"),
    Bad("text in a boolean column", "dfinery", {"subscribed": "'maybe'"}, "subscribed: 'maybe' is not a valid boolean"),
    Bad("impossible date", "dfinery", {"signup_at": "'2026-02-30 10:00:00'"},
        "signup_at: '2026-02-30 10:00:00' is not a valid datetime"),
    Bad("list where a number is expected", "dfinery", {"orders": "'[1, 2]'"}, "orders: '[1, 2]' is not a valid long"),
    Bad("scalar where a list is expected", "dfinery", {"interests": "'music'"},
        "interests: 'music' is not a valid list"),
    Bad("nested list in a list of strings", "dfinery", {"interests": """'[["a"]]'"""}, "is not a valid list"),
    Bad("Tencent value over 50 bytes", "tencent_im", {"plan": "'" + "x" * 51 + "'"}, "membership: value too long"),
    Bad("Tencent emoji over 50 bytes (13 characters)", "tencent_im", {"plan": "'" + "😀" * 13 + "'"},
        "membership: value too long"),
    Bad("Tencent non-ASCII account", "tencent_im", {"user_id": "'ü00003'"}, "is not a UserID", key="ü00003"),
    Bad("MoEngage string over 512 characters", "moengage", {"plan": "'" + "x" * 513 + "'"},
        "membership: value too long"),
    Bad("MoEngage array over 50 items", "moengage", {"interests": "'" + json.dumps([str(i) for i in range(51)]) + "'"},
        "is not a valid list"),
    Bad("EngageLab euid not a long", "engagelab", {"numeric_id": "'abc'"}, "euid must be a long", key="abc"),
    Bad("Jiguang CUID not positive", "jiguang", {"numeric_id": "-5"}, "is not a numeric Jiguang CUID", key="-5"),
]


# -- run-level bad input: the run stops before sending, saying what is wrong ----------------
def stopped(case: h.Case, sent: int | None = None) -> Said:
    """Run once more; whatever it raised or reported, and whether anything was sent."""
    before = len(case.emu.log) if sent is None else sent
    try:
        text = case.run().line()
    except Exception as e:  # noqa: BLE001 - the error is the point
        text = f"{type(e).__name__}: {e}"
    return Said(text, lost=0 if len(case.emu.log) == before else len(case.emu.log) - before)


def _synced(vendor: str, directory: Path, env) -> h.Case:
    case = h.setup(vendor, directory, env)
    assert case.run().status == "success"
    return case


def column_gone(directory: Path, env) -> Said:
    case = _synced("dfinery", directory, env)
    try:
        with sa.create_engine(case.url).begin() as c:
            c.execute(sa.text("ALTER TABLE users DROP COLUMN orders"))
            c.execute(sa.text("UPDATE users SET plan = 'gone', updated_at = '2026-02-01 00:00:00'"))
        return stopped(case)
    finally:
        case.running.stop()


def warehouse_unreachable(directory: Path, env) -> Said:
    case = _synced("dfinery", directory, env)
    try:
        url = "postgresql+psycopg2://usersync:wh-pass@127.0.0.1:9/warehouse"
        write_config(case.cfg_path, url, [h.sync_dict("dfinery", case.running.url)])
        said = stopped(case)
        said.text += "\n" + _stopped_with_state(case, url).text
        return said
    finally:
        case.running.stop()


def _stopped_with_state(case: h.Case, url: str) -> Said:
    write_config(case.cfg_path, url, [h.sync_dict("dfinery", case.running.url)], state_url=case.url)
    return stopped(case)


def sync_table_dropped(directory: Path, env) -> Said:
    case = _synced("engagelab", directory, env)  # an increase: re-sent as new, it would count twice
    try:
        with sa.create_engine(case.url).begin() as c:
            c.execute(sa.text("DROP TABLE sync_snapshot"))
        return stopped(case)
    finally:
        case.running.stop()


@dataclasses.dataclass
class Stop:
    name: str
    run: Callable[[Path, Callable], Said]
    message: str


RUNS = [
    Stop("mapped column gone from the source", column_gone, "mapping[2].column: unknown column 'orders'"),
    Stop("warehouse unreachable", warehouse_unreachable, "cannot reach the warehouse database"),
    Stop("warehouse unreachable (separate state database)", warehouse_unreachable,
         "source.table: cannot read the source"),
    Stop("sync table dropped", sync_table_dropped, "sync table(s) sync_snapshot missing although sync_runs records"),
]
CATALOGUE = [*ROWS, *RUNS]
