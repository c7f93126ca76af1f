"""The sync tables' schema, versioned: an Alembic environment inside the package.

Before a run touches the sync tables, :func:`ensure` brings them to this release's schema:
one version query when they are there already (none for an engine this process checked),
otherwise :func:`upgrade`, which takes a lock on the database, reads the version again
inside it and upgrades only if nobody did meanwhile. So any number of processes may start
at once on a fresh database: one creates the tables, the others wait and find them made.
The version lives in ``usersync_alembic_version``, apart from Airflow's (or anybody's)
``alembic_version`` in the same database.

Adding a schema change (from a source checkout): change the tables in ``connector/state/schema.py``,
run ``usersync db revision -m "what changes"``, which writes ``versions/<next number>_<slug>.py``
with what a database at the current head lacks, then read and finish it (data to move;
SQLite alters by batch operations), ``make ddl``, and run ``tests/test_migrations.py``: it
fails while the revisions and state/schema.py disagree. Revision ids are sequence numbers on one
line: two branches that each add the same number renumber one (and its ``down_revision``)
when they merge.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

VERSION_TABLE = "usersync_alembic_version"
SWITCH = "USERSYNC_DB_UPGRADE"  # auto (default): a run upgrades; manual: `usersync db upgrade` does
_HERE = Path(__file__).parent
_PG_KEY = int.from_bytes(b"usersync", "big")  # the advisory lock's key: the word in ASCII
_MYSQL_WAIT = 600  # seconds GET_LOCK waits for another process's upgrade
_at_head: weakref.WeakSet[sa.Engine] = weakref.WeakSet()
log = logging.getLogger("usersync")


class SchemaError(Exception):
    """The state database's schema is one this release cannot use (or may not upgrade)."""


def head() -> str:
    """This release's newest revision, from the file names alone: revision ids are sequence
    numbers on one line (tests/test_migrations.py checks that against Alembic), so a run's
    common path imports no Alembic."""
    return max((p.name.split("_", 1)[0] for p in (_HERE / "versions").glob("[0-9]*_*.py")), key=int)


def current(bind: sa.Engine | sa.Connection) -> str | None:
    """The database's revision; None when it has none (empty, or sync tables from a release
    before migrations)."""
    with contextlib.ExitStack() as stack:
        conn = stack.enter_context(bind.connect()) if isinstance(bind, sa.Engine) else bind
        if not sa.inspect(conn).has_table(VERSION_TABLE):
            return None
        return conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def ensure(engine: sa.Engine) -> None:
    """The sync tables at this release's schema, or SchemaError: upgraded here unless
    ``USERSYNC_DB_UPGRADE=manual`` (then a database behind is refused, not upgraded)."""
    if engine in _at_head:
        return
    mode = os.environ.get(SWITCH) or "auto"
    if mode not in ("auto", "manual"):
        raise SchemaError(f"{SWITCH}={mode!r}: auto (a run upgrades the sync tables) or manual "
                          "(`usersync db upgrade` does)")
    if current(engine) != head():
        if mode == "auto":
            upgrade(engine)
        else:
            with engine.connect() as conn:
                revision = _known(conn, current(conn))
            raise SchemaError(f"the sync tables in {_name(engine)} are at revision {revision or 'none'}, this "
                              f"release needs {head()}: run `usersync db upgrade` ({SWITCH}=manual)")
    _at_head.add(engine)


def upgrade(engine: sa.Engine) -> tuple[str | None, str]:
    """Bring the sync tables to head; returns (revision before, head).

    One process at a time per database (:func:`_serialised`), and the revision is read inside
    the lock: a process that waited while another upgraded finds head and does nothing.
    """
    from alembic import command

    with engine.connect() as conn, _serialised(conn):
        before = _known(conn, current(conn))
        if before != scripts().get_current_head():
            command.upgrade(alembic_config(conn), "head")
            log.info("sync tables in %s upgraded from revision %s to %s", _name(engine), before or "none", head())
    return before, head()


@contextlib.contextmanager
def _serialised(conn: sa.Connection) -> Iterator[None]:
    """Hold the database's upgrade lock for the block, which runs in one transaction.

    SQLite: ``BEGIN IMMEDIATE`` takes the file's write lock before the version is read (the
    others wait on the busy timeout), and SQLite's DDL is transactional. PostgreSQL: a
    transaction-scoped advisory lock, released by the commit that makes the tables (and the
    version) visible; its DDL is transactional too. MySQL/MariaDB: a named lock per database
    (DDL there commits as it goes, so a failed upgrade may stop halfway; revision 0001 creates
    only what is missing, so running it again finishes it).
    """
    dialect, name = conn.dialect.name, None
    if dialect == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_KEY)))
    elif dialect in ("mysql", "mariadb"):
        name = f"usersync_alembic:{conn.exec_driver_sql('SELECT DATABASE()').scalar()}"[:64]
        if conn.execute(sa.select(sa.func.get_lock(name, _MYSQL_WAIT))).scalar() != 1:
            raise SchemaError(f"{_name(conn.engine)}: another process held the lock {name!r} for "
                              f"{_MYSQL_WAIT} s while upgrading the sync tables; try again")
    try:
        yield
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        if name is not None:
            with contextlib.suppress(sa.exc.DBAPIError):  # a lost connection released it already
                conn.execute(sa.select(sa.func.release_lock(name)))
                conn.commit()


def known(revision: str) -> bool:
    """Whether this release has ``revision`` (else a newer release made it)."""
    return revision in {s.revision for s in scripts().walk_revisions()}


def _known(conn: sa.Connection, revision: str | None) -> str | None:
    """``revision`` if this release knows it, else SchemaError: a newer release upgraded the
    database, and writing into a schema this one does not know could lose what it added."""
    if revision is not None and not known(revision):
        raise SchemaError(f"the sync tables in {_name(conn.engine)} are at revision {revision}, newer than this "
                          f"release's {head()}: a newer usersync upgraded them; run that release")
    return revision


def _name(engine: sa.Engine) -> str:
    return f"the state database {engine.url.render_as_string(hide_password=True)}"


def alembic_config(conn: sa.Connection | None = None) -> Config:
    """Alembic's configuration, in code (no alembic.ini); env.py runs on ``conn``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    cfg.attributes["connection"] = conn
    return cfg


@functools.cache
def scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def revision(message: str) -> Path:
    """Write the next revision file: what the tables in state/schema.py have that a database at head
    lacks (Alembic's autogenerate, against a scratch SQLite database). Returns its path."""
    from alembic import command

    from connector import db

    with tempfile.TemporaryDirectory() as scratch:
        engine = db.make_engine(f"sqlite:///{scratch}/head.db")
        try:
            upgrade(engine)
            with engine.connect() as conn:
                script = command.revision(alembic_config(conn), message, autogenerate=True, rev_id=f"{int(head()) + 1:04d}")
        finally:
            engine.dispose()
    scripts.cache_clear()
    return Path(script.path)
