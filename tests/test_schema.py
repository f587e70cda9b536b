"""The committed schema files and the Alembic migrations both match mailsrv.models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from mailsrv import db as dbmod
from mailsrv.models import Base

SCHEMA = Path(__file__).resolve().parent.parent / "schema"


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_committed_schema_files_match_the_models(dialect):
    committed = (SCHEMA / f"{dialect}.sql").read_text()
    assert committed == dbmod.schema_ddl(dialect), (
        f"schema/{dialect}.sql is stale: run `mailsrv db schema --dialect {dialect} > schema/{dialect}.sql`"
    )


def test_migrations_build_exactly_the_models(database):
    """After `db init` the database has every table, column and index the models name."""
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []
    tables = set(inspect(database.engine).get_table_names())
    for name in ("domains", "accounts", "aliases", "odmr_grants", "messages", "maildrop_locks", "queue", "queue_recipients"):
        assert name in tables


def test_upgrade_is_idempotent(database):
    assert dbmod.current_revision(database) == dbmod.upgrade(database)
    assert dbmod.upgrade(database) == dbmod.current_revision(database)


def test_sqlite_schema_file_runs(tmp_path):
    import sqlite3

    connection = sqlite3.connect(tmp_path / "plain.db")
    connection.executescript((SCHEMA / "sqlite.sql").read_text())
    names = {r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"messages", "queue_recipients"} <= names
    connection.close()


def test_sqlite_pragmas(database):
    if database.dialect != "sqlite":
        pytest.skip("SQLite only")
    with database.read() as s:
        assert s.connection().exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert s.connection().exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert s.connection().exec_driver_sql("PRAGMA busy_timeout").scalar() == dbmod.SQLITE_BUSY_TIMEOUT_MS
