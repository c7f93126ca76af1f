"""Tests for the demo warehouse (connector/demo.py + sql/demo_warehouse.sql).

Data is read back with the stdlib sqlite3 module, independently of the code
under test.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from connector import demo

EXPECTED_COLUMNS = {
    "user_id": "TEXT", "numeric_id": "INTEGER", "email": "TEXT", "phone": "TEXT",
    "first_name": "TEXT", "last_name": "TEXT", "country": "TEXT", "city": "TEXT",
    "language": "TEXT", "plan": "TEXT", "lifetime_value": "REAL",
    "orders_count": "INTEGER", "points": "INTEGER", "is_subscribed": "INTEGER",
    "marketing_opt_in": "INTEGER", "signup_at": "TEXT", "last_seen_at": "TEXT",
    "birthday": "TEXT", "interests": "TEXT", "internal_note": "TEXT", "updated_at": "TEXT",
}
NULLABLE = {"phone", "marketing_opt_in", "last_seen_at", "birthday", "interests", "internal_note"}
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
NOW_S = "2030-01-02 03:04:05"


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def _rows(path: Path) -> dict[str, dict]:
    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    try:
        return {r["user_id"]: dict(r) for r in con.execute("SELECT * FROM users")}
    finally:
        con.close()


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wh") / "demo.db"
    assert demo.build_warehouse(_url(path), users=5000) == 5000
    return path


@pytest.fixture(scope="module")
def rows(warehouse: Path) -> list[dict]:
    return list(_rows(warehouse).values())


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.db"
    demo.build_warehouse(_url(path), users=1000)
    return path


def test_row_count_and_schema(warehouse: Path, rows: list[dict]) -> None:
    assert len(rows) == 5000
    con = sqlite3.connect(warehouse)
    info = {r[1]: (r[2], r[5]) for r in con.execute("PRAGMA table_info(users)")}
    con.close()
    assert {c: t for c, (t, _) in info.items()} == EXPECTED_COLUMNS
    assert [c for c, (_, pk) in info.items() if pk] == ["user_id"]
    assert tuple(info) == demo.COLUMNS


def test_ids(rows: list[dict]) -> None:
    ids = [r["user_id"] for r in rows]
    assert all(re.fullmatch(r"u\d{6}", i) for i in ids)
    nums = [r["numeric_id"] for r in rows]
    assert len(set(nums)) == len(nums)
    assert all(isinstance(n, int) and 0 < n < 2**63 for n in nums)
    assert {r["numeric_id"] - int(r["user_id"][1:]) for r in rows} == {demo.NUMERIC_ID_BASE}
    assert len({r["email"] for r in rows}) == len(rows)


def test_nulls_only_in_nullable_columns(rows: list[dict]) -> None:
    for col in EXPECTED_COLUMNS:
        share = sum(r[col] is None for r in rows) / len(rows)
        if col in NULLABLE:
            assert 0.05 < share < 0.15, (col, share)
        else:
            assert share == 0, col


def test_value_formats(rows: list[dict]) -> None:
    for r in rows:
        assert r["plan"] in {"free", "pro", "enterprise"}
        assert r["is_subscribed"] in (0, 1)
        assert r["marketing_opt_in"] in (0, 1, None)
        assert re.fullmatch(r"[A-Z]{2}", r["country"])
        assert re.fullmatch(r"[a-z]{2}", r["language"])
        assert re.fullmatch(r"[a-z]+\.[a-z]+\d+@example\.(com|net|org)", r["email"]), r["email"]
        assert r["phone"] is None or re.fullmatch(r"\+[1-9]\d{7,14}", r["phone"]), r["phone"]
        assert round(r["lifetime_value"], 2) == r["lifetime_value"] >= 0
        assert r["orders_count"] >= 0 and r["points"] >= 0
        for col in ("signup_at", "last_seen_at", "updated_at"):
            if r[col] is not None:
                assert TS_RE.match(r[col]), (col, r[col])
                datetime.strptime(r[col], demo.TS_FORMAT)
        if r["last_seen_at"] is not None:
            assert r["signup_at"] <= r["last_seen_at"] <= r["updated_at"]
        assert r["signup_at"] <= r["updated_at"] < "2025-01-01 00:00:00"
        if r["birthday"] is not None:
            datetime.strptime(r["birthday"], "%Y-%m-%d")
            assert "1950-01-01" <= r["birthday"] < "2006-01-01"
    assert {r["language"] for r in rows} >= {"en", "zh", "ko", "ja"}
    assert {r["plan"] for r in rows} == {"free", "pro", "enterprise"}


def test_non_ascii_text(rows: list[dict]) -> None:
    def has(pattern: str, col: str) -> bool:
        return any(r[col] and re.search(pattern, r[col]) for r in rows)

    assert has(r"[\uac00-\ud7a3]", "first_name")  # Hangul
    assert has(r"[\u4e00-\u9fff]", "last_name")   # CJK ideographs
    assert has(r"[\u3040-\u309f]", "first_name")  # Hiragana
    assert has(r"[\u4e00-\u9fff]", "city")
    assert has(r"[éèëüöß]", "first_name") or has(r"[éèëüöß]", "last_name")
    assert has(r"[\U0001F300-\U0001FAFF]", "internal_note")  # emoji
    first = next(r for r in rows if r["user_id"] == "u000001")
    assert first["internal_note"].endswith("🎉")


def test_interests_are_json_string_lists(rows: list[dict]) -> None:
    parsed = [json.loads(r["interests"]) for r in rows if r["interests"] is not None]
    assert all(isinstance(p, list) and all(isinstance(i, str) for i in p) for p in parsed)
    assert any(p == [] for p in parsed)
    assert any(len(p) >= 2 for p in parsed)
    assert all(len(set(p)) == len(p) and set(p) <= set(demo.INTERESTS) for p in parsed)


def test_deterministic_and_rebuild_drops_table(tmp_path: Path, rows: list[dict]) -> None:
    path = tmp_path / "again.db"
    assert demo.build_warehouse(_url(path), users=5000, seed=7) == 5000
    assert list(_rows(path).values()) == rows
    assert demo.build_warehouse(_url(path), users=50, seed=8) == 50
    other = _rows(path)
    assert len(other) == 50
    assert [other[f"u{n:06d}"] for n in range(1, 51)] != rows[:50]


def test_change_users(small: Path) -> None:
    before = _rows(small)
    changed = demo.change_users(_url(small), count=5, now=NOW)
    assert len(set(changed)) == 5 and changed == sorted(changed)
    after = _rows(small)
    for uid, row in before.items():
        if uid not in changed:
            assert after[uid] == row
            continue
        old, new = row, after[uid]
        assert new["updated_at"] == NOW_S > old["updated_at"]
        assert new["last_seen_at"] == NOW_S
        assert new["plan"] == demo.UPGRADE[old["plan"]]
        assert new["points"] > old["points"]
        assert new["orders_count"] == old["orders_count"] + 1
        assert new["lifetime_value"] > old["lifetime_value"]
        assert round(new["lifetime_value"], 2) == new["lifetime_value"]
        old_i = json.loads(old["interests"]) if old["interests"] else []
        new_i = json.loads(new["interests"])
        assert new_i[:-1] == old_i and new_i[-1] not in old_i
        for col in ("email", "first_name", "internal_note", "numeric_id", "signup_at"):
            assert new[col] == old[col]


def test_change_users_is_deterministic_and_defaults_to_utc_now(tmp_path: Path,
                                                              small: Path) -> None:
    other = tmp_path / "other.db"
    demo.build_warehouse(_url(other), users=1000)
    assert demo.change_users(_url(small), count=3) == demo.change_users(_url(other), count=3)
    assert demo.change_users(_url(small), count=3, seed=1) != demo.change_users(
        _url(small), count=3, seed=2)
    ids = demo.change_users(_url(other), count=2)
    stamp = datetime.strptime(_rows(other)[ids[0]]["updated_at"], demo.TS_FORMAT)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    assert abs(now - stamp) < timedelta(minutes=5)
    with pytest.raises(ValueError):
        demo.change_users(_url(other), count=1001)


def test_touch_unmapped_changes_only_note_and_cursor(small: Path) -> None:
    before = _rows(small)
    null_note = next(u for u, r in before.items() if r["internal_note"] is None)
    targets = ["u000001", "u000500", null_note]
    assert demo.touch_unmapped(_url(small), targets + ["u999999"], now=NOW) == 3
    after = _rows(small)
    for uid, row in before.items():
        diff = {c for c in row if after[uid][c] != row[c]}
        if uid in targets:
            assert diff == {"internal_note", "updated_at"}, (uid, diff)
            assert after[uid]["updated_at"] == NOW_S
        else:
            assert diff == set(), (uid, diff)
    assert after["u000001"]["internal_note"].startswith(before["u000001"]["internal_note"])
    # Touching again in the same second still changes the note.
    demo.touch_unmapped(_url(small), ["u000001"], now=NOW)
    assert _rows(small)["u000001"]["internal_note"] != after["u000001"]["internal_note"]
    assert demo.touch_unmapped(_url(small), [], now=NOW) == 0


def test_rejects_non_sqlite_url() -> None:
    with pytest.raises(ValueError, match="SQLite"):
        demo.build_warehouse("postgresql://user:pw@localhost/warehouse", users=10)


def test_missing_ddl_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope" / "demo_warehouse.sql"
    monkeypatch.setattr(demo, "DDL_PATH", missing)
    with pytest.raises(FileNotFoundError, match="demo DDL not found"):
        demo.build_warehouse(_url(tmp_path / "x.db"), users=10)
    assert not (tmp_path / "x.db").exists()
