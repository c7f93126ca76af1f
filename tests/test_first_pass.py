"""A full scan's first pass: the database hashes each row, only the users whose hash moved
are read again whole (SQLite and PostgreSQL; MySQL/MariaDB hash in Python, in one pass)."""

import sqlalchemy as sa

from connector import config, engine, state
from vendor_cases.dfinery import dfinery_sync
from warehouse import USERS, make_users, run, update_users, user_row, write_config


def _plan(cfg_path, name="dfinery_users"):
    """engine.begin + engine.plan, as a run does; the run then closed without pushing."""
    cfg, _ = config.load(cfg_path)
    sync = engine.open_sync(cfg, name)
    run_id = engine.begin(sync, mode="incremental", trigger="test")
    p = engine.plan(sync, run_id)
    with sync.state.connect() as c:
        staged = {k: state.loads(ops) for k, ops in c.execute(
            sa.select(state.plan.c.user_key, state.plan.c.ops).where(state.plan.c.run_id == run_id))}
    engine.finalize(sync, run_id, status="failed", error="test: planned only")
    return p, staged


def _seeded(db_url, tmp_path, dfinery, n=300):
    make_users(db_url, [user_row(i, ltv=0.3) for i in range(n)])
    cfg_path = write_config(tmp_path / "syncs.yaml", db_url, [dfinery_sync(dfinery.url, cursor=None)])
    assert run(cfg_path, "dfinery_users").status == "success"
    return cfg_path


def test_only_the_moved_users_are_read_again(db_url, tmp_path, dfinery):
    cfg_path = _seeded(db_url, tmp_path, dfinery)
    mysql = db_url.startswith("mysql")
    changes = {"u00003": {"plan": "vip"}, "u00010": {"orders": 99}, "u00200": {"subscribed": False},
               "u00011": {"note": "not mapped"}}  # not mapped: its hash does not move
    if not mysql:  # 0.1 + 0.2 differs from 0.3 in the 17th digit (MySQL's FLOAT is single precision)
        changes["u00250"] = {"ltv": 0.1 + 0.2}
    update_users(db_url, changes)

    p, staged = _plan(cfg_path)

    moved = sorted(set(changes) - {"u00011"})
    assert sorted(staged) == moved
    assert p.users_read == 300 and p.users_changed == len(moved)
    assert p.reread == (0 if mysql else len(moved))
    assert staged["u00003"] == [["membership", "set", "vip"]]
    if not mysql:
        assert staged["u00250"] == [["ltv", "set", 0.1 + 0.2]]


def test_when_many_moved_the_source_is_read_whole_once(db_url, tmp_path, dfinery):
    cfg_path = _seeded(db_url, tmp_path, dfinery)
    update_users(db_url, {f"u{i:05d}": {"orders": 100 + i} for i in range(0, 300, 5)})  # 60 of 300

    p, staged = _plan(cfg_path)

    assert p.reread == 0 and p.users_read == 300
    assert sorted(staged) == [f"u{i:05d}" for i in range(0, 300, 5)]


def test_a_source_without_an_index_on_its_identity_is_read_in_one_pass(sqlite_url, tmp_path, dfinery):
    eng = sa.create_engine(sqlite_url)
    bare = sa.Table("members", sa.MetaData(), *(sa.Column(c.name, c.type) for c in USERS.columns))
    bare.create(eng)
    with eng.begin() as c:
        c.execute(bare.insert(), [user_row(i) for i in range(50)])
        c.execute(bare.update().where(bare.c.user_id == "u00007").values(plan="vip"))
    cfg_path = write_config(tmp_path / "syncs.yaml", sqlite_url,
                            [dfinery_sync(dfinery.url, cursor=None, source={"table": "members"})])
    assert run(cfg_path, "dfinery_users").status == "success"
    with eng.begin() as c:
        c.execute(bare.update().where(bare.c.user_id == "u00009").values(plan="vip"))

    p, staged = _plan(cfg_path)

    assert p.reread == 0 and sorted(staged) == ["u00009"]


def test_a_blob_in_a_text_column_does_not_stop_the_scan(sqlite_url, tmp_path, dfinery):
    """SQLite lets a TEXT column hold bytes that are not UTF-8; the row hash takes them as bytes."""
    cfg_path = _seeded(sqlite_url, tmp_path, dfinery, n=50)
    update_users(sqlite_url, {"u00004": {"plan": "vip"}})
    with sa.create_engine(sqlite_url).begin() as c:
        c.execute(sa.text("UPDATE users SET interests = :b WHERE user_id = 'u00005'"), {"b": b"\xff\x00["})

    p, staged = _plan(cfg_path)

    assert p.reread == 2 and "u00004" in staged
    assert p.users_changed + p.users_invalid == 2
