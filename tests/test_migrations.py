"""The sync tables under Alembic: head is state/schema.py's tables, a database made by a release before
migrations is adopted in place with every row kept, first starts in many processes at once
all succeed, and a schema newer than this release is refused.

``schema_fd24d1f/`` holds ``sql/sync_tables.*.sql`` as the last release before migrations
(fd24d1f) wrote them: what a state database in the field looks like today.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from connector import migrations, state
from vendor_cases.dfinery import dfinery_sync
from warehouse import cli, make_users, user_row, write_config

ROOT = Path(__file__).resolve().parent.parent
FD24D1F = Path(__file__).parent / "schema_fd24d1f"


def dialect(url: str) -> str:
    return sa.make_url(url).get_backend_name().replace("mariadb", "mysql")


def build_fd24d1f(url: str) -> sa.Engine:
    """A state database as fd24d1f's ``create_tables`` left it: its DDL, no version table."""
    eng = state.make_engine(url)
    with eng.begin() as c:
        for statement in (FD24D1F / f"{dialect(url)}.sql").read_text().split(";\n"):
            if statement.strip():
                c.exec_driver_sql(statement)
    return eng


def differences(eng: sa.Engine) -> list:
    """What state/schema.py's tables have that the database lacks, or the reverse (Alembic's autogenerate)."""
    with eng.connect() as c:
        context = MigrationContext.configure(c, opts={"include_name": lambda n, t, _: t != "table" or n in state.metadata.tables})
        return compare_metadata(context, state.metadata)


def schema(eng: sa.Engine) -> dict:
    """Every sync table's columns (name, type, nullable), primary key and indexes, as reflected."""
    inspector = sa.inspect(eng)
    return {t: ([(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(t)],
                inspector.get_pk_constraint(t)["constrained_columns"],
                sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(t)))
            for t in sorted(inspector.get_table_names()) if t.startswith("sync_")}


def test_revisions_are_one_numbered_line():
    """``migrations.head`` reads the newest revision off the file names: true only while the ids
    are 0001, 0002, ... each revising the one before (a merge of two branches that both added
    0002 fails here until one is renumbered)."""
    script = migrations.scripts()
    assert script.get_heads() == [migrations.head()]
    chain = list(reversed(list(script.walk_revisions())))
    assert [s.revision for s in chain] == [f"{n:04d}" for n in range(1, len(chain) + 1)]
    assert [s.down_revision for s in chain] == [None, *(s.revision for s in chain[:-1])]


def test_head_is_the_schema_of_state_py(db_url):
    eng = state.make_engine(db_url)
    assert migrations.upgrade(eng) == (None, migrations.head())
    assert migrations.current(eng) == migrations.head()
    assert differences(eng) == [], "state/schema.py's tables and the revisions disagree: add a revision (usersync db revision)"
    eng.dispose()


def test_revision_0001_is_the_schema_fd24d1f_made(db_url):
    """On an empty database 0001 makes what the release before migrations made, exactly."""
    old = build_fd24d1f(db_url)
    made = schema(old)
    with old.begin() as c:
        for t in made:
            c.exec_driver_sql(f"DROP TABLE {t}")
    with old.connect() as c, c.begin():
        command.upgrade(migrations.alembic_config(c), "0001")
    assert schema(old) == made
    old.dispose()


SNAPSHOT = [("s1", f"user {i}", state.dumps({"n": 2**63 - 1 - i, "t": f"é한😀 {i}", "l": ["a", i]}), -(2**63) + i)
            for i in range(500)]


def test_a_state_database_of_fd24d1f_upgrades_in_place(db_url):
    """Tables there, no version table: 0001 adopts them; every snapshot, run and failure row stays."""
    eng = build_fd24d1f(db_url)
    ts = state.now()
    with eng.begin() as c:
        run = c.execute(state.runs.insert().values(sync="s1", vendor="dfinery", mode="full", trigger="cli",
                                                   status="success", started_at=ts)).inserted_primary_key[0]
        c.execute(state.snapshot.insert(), [{"sync": s, "user_key": k, "payload": p, "row_hash": h, "run_id": run,
                                             "updated_at": ts} for s, k, p, h in SNAPSHOT])
        old_failures = sa.Table("sync_failures", sa.MetaData(), autoload_with=c)  # fd24d1f's: no attribute
        c.execute(old_failures.insert().values(sync="s1", user_key="user 7", identity="{}", run_id=run,
                                                 error_class="rejected", attempts=2, first_seen=ts, last_seen=ts))
    assert migrations.current(eng) is None
    assert migrations.upgrade(eng) == (None, migrations.head())
    assert migrations.current(eng) == migrations.head() and differences(eng) == []
    s = state.snapshot
    with eng.connect() as c:
        assert sorted(map(tuple, c.execute(sa.select(s.c.sync, s.c.user_key, s.c.payload, s.c.row_hash)))) == sorted(SNAPSHOT)
        assert c.execute(sa.select(state.runs.c.run_id, state.runs.c.status)).all() == [(run, "success")]
        assert c.execute(sa.select(state.failures.c.user_key, state.failures.c.attempts)).all() == [("user 7", 2)]
    eng.dispose()


def test_older_tables_are_brought_to_the_same_schema(db_url):
    """What earlier releases left that ``create_tables`` never repaired: ``sync_plan`` with
    ``before`` and without ``in_flight``, the covering snapshot index, a 40-character trigger."""
    eng = build_fd24d1f(db_url)
    quote = eng.dialect.identifier_preparer.quote
    older = sa.MetaData()
    old_plan = sa.Table("sync_plan", older, *(c.copy() for c in state.plan.columns if c.name != "in_flight"),
                        sa.Column("before", sa.Text, nullable=False), sa.Index("ix_sync_plan_shard", "run_id", "shard", "status"))
    with eng.begin() as c:
        c.exec_driver_sql("DROP TABLE sync_plan")
        older.create_all(c)
        c.exec_driver_sql("CREATE INDEX ix_sync_snapshot_hash ON sync_snapshot (sync, user_key, row_hash)")
        if dialect(db_url) == "postgresql":
            c.exec_driver_sql(f"ALTER TABLE sync_runs ALTER COLUMN {quote('trigger')} TYPE VARCHAR(40)")
        elif dialect(db_url) == "mysql":
            c.exec_driver_sql(f"ALTER TABLE sync_runs MODIFY {quote('trigger')} VARCHAR(40) NOT NULL")
        c.execute(old_plan.insert().values(run_id=1, user_key="u1", shard=0, identity="{}", source_identity="{}",
                                           ops="[]", payload="{}", row_hash=5, status="pending", before="{}"))
        c.execute(state.snapshot.insert(), [{"sync": s, "user_key": k, "payload": p, "row_hash": h, "updated_at": state.now()}
                                            for s, k, p, h in SNAPSHOT])
    assert {c["name"] for c in sa.inspect(eng).get_columns("sync_plan")} >= {"before"}
    migrations.upgrade(eng)
    assert differences(eng) == []
    with eng.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(state.snapshot)).scalar() == len(SNAPSHOT)
        assert c.execute(sa.select(state.plan.c.user_key, state.plan.c.in_flight)).all() == [("u1", None)]
    row = state.PlanRow(3, "u2", 0, "{}", "{}", "[]", "{}", 5)
    with eng.begin() as c:
        state.stage(c, [row])
    eng.dispose()


# -- first starts at once --------------------------------------------------------------
UPGRADE = """
import sys
import alembic.command, alembic.script  # imported before the gate: the processes race on the database alone
from connector import migrations, state
print("ready", flush=True)
sys.stdin.read()
print(migrations.upgrade(state.make_engine(sys.argv[1]))[0])
"""

RUN = """
import sys
import alembic.command, alembic.script
from connector import cli
print("ready", flush=True)
sys.stdin.read()
sys.exit(cli.main(sys.argv[1:]))
"""


def at_once(code: str, argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Start one process per argv, wait until each has imported everything and says so, then
    let them all go at once (by closing their stdin); their exit codes and output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for argv in argvs]
    for p in procs:
        assert p.stdout.readline() == "ready\n", p.communicate()[1]
    for p in procs:
        p.stdin.close()
        p.stdin = None  # closed: communicate() has nothing to send
    out = []
    for p, argv in zip(procs, argvs):
        stdout, stderr = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(argv, p.returncode, stdout, stderr))
    return out


def test_first_starts_at_once_upgrade_exactly_once(db_url):
    """Six processes upgrade one fresh database at the same moment: every one succeeds, and
    exactly one found it empty (the others read the version inside the lock and did nothing)."""
    done = at_once(UPGRADE, [[db_url]] * 6)
    assert [d.returncode for d in done] == [0] * 6, "\n".join(d.stderr[-2000:] for d in done if d.returncode)
    assert sorted(d.stdout.strip() for d in done) == [migrations.head()] * 5 + ["None"]
    eng = state.make_engine(db_url)
    assert migrations.current(eng) == migrations.head() and differences(eng) == []
    eng.dispose()


def test_six_syncs_start_at_once_on_a_fresh_state_database(db_url, dfinery, tmp_path):
    """What five nightly DAGs do at midnight on a new deployment: `usersync run` of six
    different syncs at once, the sync tables in the warehouse, none made yet."""
    make_users(db_url, [user_row(i) for i in range(12)])
    names = [f"dfinery_{i}" for i in range(6)]
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [dfinery_sync(dfinery.url, name=n) for n in names])
    done = at_once(RUN, [["run", n, "--config", str(cfg)] for n in names])
    assert [d.returncode for d in done] == [0] * 6, "\n".join(d.stderr[-2000:] for d in done if d.returncode)
    eng = state.make_engine(db_url)
    assert migrations.current(eng) == migrations.head()
    with eng.connect() as c:
        runs = c.execute(sa.select(state.runs.c.sync, state.runs.c.status, state.runs.c.users_delivered)).all()
    assert sorted(runs) == [(n, "success", 12) for n in names]
    eng.dispose()


# -- the common path, operators' commands, and what is refused --------------------------
def test_a_run_on_a_database_at_head_imports_no_alembic(sqlite_url):
    migrations.upgrade(state.make_engine(sqlite_url))
    probe = f"import sys; from connector import state; state.connect({sqlite_url!r}); print(sorted(m for m in sys.modules if m.startswith('alembic')))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == "[]"


def test_db_current_and_upgrade(sqlite_url, tmp_path):
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [])
    head = migrations.head()
    before = cli("db", "current", "--config", str(cfg))
    assert before.returncode == 1 and "revision none (no sync tables yet" in before.stdout, before.stderr
    up = cli("db", "upgrade", "--config", str(cfg))
    assert up.returncode == 0 and f"upgraded from revision none to {head}" in up.stdout, up.stderr
    assert "alembic" not in up.stderr  # Alembic's narration stays out unless -v
    now = cli("db", "current", "--config", str(cfg))
    assert now.returncode == 0 and now.stdout.strip() == f"sqlite:///{tmp_path / 'warehouse.db'}: revision {head} (head)"
    again = cli("db", "upgrade", "--config", str(cfg))
    assert again.returncode == 0 and f"already at revision {head}" in again.stdout
    for sub in ("current", "upgrade", "revision"):
        assert cli("db", sub, "--help").returncode == 0
    assert "USERSYNC_DB_UPGRADE=manual" in cli("db", "--help").stdout


def test_db_current_names_tables_from_before_migrations(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    build_fd24d1f(url).dispose()
    cfg = write_config(tmp_path / "syncs.yaml", url, [])
    r = cli("db", "current", "--config", str(cfg))
    assert r.returncode == 1 and "revision none (sync tables from a release before migrations" in r.stdout


def test_a_schema_newer_than_this_release_is_refused(sqlite_url, tmp_path, dfinery):
    make_users(sqlite_url, [user_row(i) for i in range(3)])
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [dfinery_sync(dfinery.url)])
    eng = state.connect(sqlite_url)
    with eng.begin() as c:
        c.execute(sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '9999'"))
    eng.dispose()
    said = f"warehouse: the sync tables in the state database {sqlite_url} are at revision 9999, newer than this release's"
    for args in (["run", "dfinery_users"], ["status"], ["db", "upgrade"]):
        r = cli(*args, "--config", str(cfg))
        assert r.returncode == 2 and said in r.stderr, (args, r.stderr)
    assert dfinery.emulator.log == []
    r = cli("db", "current", "--config", str(cfg))
    assert r.returncode == 1 and "revision 9999 (newer than this release's head" in r.stdout
    assert migrations.current(state.make_engine(sqlite_url)) == "9999"


def test_manual_upgrades_leave_a_run_refusing_old_tables(sqlite_url, tmp_path, dfinery):
    make_users(sqlite_url, [user_row(i) for i in range(3)])
    cfg = write_config(tmp_path / "syncs.yaml", sqlite_url, [dfinery_sync(dfinery.url)])
    manual = {"USERSYNC_DB_UPGRADE": "manual"}
    r = cli("run", "dfinery_users", "--config", str(cfg), env_extra=manual)
    assert r.returncode == 2 and "revision none, this release needs" in r.stderr and "`usersync db upgrade`" in r.stderr
    assert not sa.inspect(state.make_engine(sqlite_url)).has_table("sync_runs")
    assert cli("db", "upgrade", "--config", str(cfg), env_extra=manual).returncode == 0
    r = cli("run", "dfinery_users", "--config", str(cfg), env_extra=manual)
    assert r.returncode == 0 and "delivered 3" in r.stdout, r.stderr
    r = cli("run", "dfinery_users", "--config", str(cfg), env_extra={"USERSYNC_DB_UPGRADE": "sometimes"})
    assert r.returncode == 2 and "USERSYNC_DB_UPGRADE='sometimes'" in r.stderr


def test_an_upgrade_never_recreates_a_lost_snapshot(db_url, tmp_path):
    """Runs recorded, sync_snapshot gone: created empty, every user would be sent again as new.
    ``engine.check_state`` refuses before a run or `db upgrade`; 0001 refuses on its own."""
    eng = build_fd24d1f(db_url)
    with eng.begin() as c:
        c.execute(state.runs.insert().values(sync="s1", vendor="dfinery", mode="full", trigger="cli",
                                             status="success", started_at=state.now()))
        c.exec_driver_sql("DROP TABLE sync_snapshot")
    with pytest.raises(migrations.SchemaError, match="sync_snapshot missing although sync_runs records runs"):
        migrations.upgrade(eng)
    assert migrations.current(eng) is None and not sa.inspect(eng).has_table("sync_snapshot")
    cfg = write_config(tmp_path / "syncs.yaml", db_url, [])
    r = cli("db", "upgrade", "--config", str(cfg))
    assert r.returncode == 2 and "sync table(s) sync_snapshot missing although sync_runs records 1 run(s)" in r.stderr
    eng.dispose()


NEW_COLUMN = """
import sys
import sqlalchemy as sa
from connector import migrations, state
state.batches.append_column(sa.Column("worker_host", sa.String(200)))  # a schema change, as a helper would make it
print(migrations.revision("worker host").name)
eng = state.make_engine(sys.argv[1])
print(migrations.upgrade(eng))
print(migrations.current(eng), [c["name"] for c in sa.inspect(eng).get_columns("sync_batches")][-1])
"""


def test_a_schema_change_is_one_command_away_from_its_revision(sqlite_url):
    """`usersync db revision -m` (migrations.revision) writes the next numbered file from what
    state/schema.py has that head lacks, and that file upgrades a database. Written into the package's
    versions/ (where a real one goes), removed again here."""
    versions = Path(migrations.__file__).parent / "versions"
    base = migrations.head()
    nxt = f"{int(base) + 1:04d}"
    try:
        r = subprocess.run([sys.executable, "-c", NEW_COLUMN, sqlite_url], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        name, upgraded, now = r.stdout.splitlines()[-3:]  # after Alembic's "Generating ..."
        assert name == f"{nxt}_worker_host.py"
        text = (versions / name).read_text()
        assert f"revision = '{nxt}'" in text and f"down_revision = '{base}'" in text
        assert "batch_op.add_column(sa.Column('worker_host', sa.String(length=200), nullable=True))" in text
        assert upgraded == f"(None, '{nxt}')" and now == f"{nxt} worker_host"
    finally:
        for stale in [*versions.glob(f"{nxt}_*.py"), *versions.glob(f"__pycache__/{nxt}_*")]:
            stale.unlink()
