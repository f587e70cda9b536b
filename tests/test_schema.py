"""The committed schema files and the Alembic migrations both match mailsrv.models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from mailsrv import db as dbmod
from mailsrv import migrate
from mailsrv.models import Base

SCHEMA = Path(__file__).resolve().parent.parent / "schema"


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_committed_schema_files_match_the_models(dialect):
    committed = (SCHEMA / f"{dialect}.sql").read_text()
    assert committed == migrate.schema_ddl(dialect), (
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
    assert migrate.current_revision(database) == migrate.upgrade(database)
    assert migrate.upgrade(database) == migrate.current_revision(database)


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


def database_at(db_url: str, revision: str) -> dbmod.Database:
    """A database of ``db_url`` migrated only as far as ``revision``."""
    from alembic import command

    database = dbmod.Database(db_url)
    cfg = migrate.alembic_config(database)
    with database.engine.connect() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
        connection.commit()
    return database


def test_upgrade_from_0001_keeps_mail_and_pop3_still_stuffs_it(db_url):
    """A database made by revision 0001 migrates with its messages, and rows without
    dot_offsets are byte-stuffed by scanning."""
    from sqlalchemy import text as sql

    from mailsrv.message import dot_stuff, dot_stuff_parts
    from mailsrv.store import Store

    database = database_at(db_url, "0001")
    with database.write() as s:
        s.execute(sql("INSERT INTO domains (name, kind, created_at) VALUES ('example.org', 'local', CURRENT_TIMESTAMP)"))
        s.execute(sql("INSERT INTO accounts (address, domain_id, password_hash, enabled, created_at) VALUES ('ann@example.org', 1, 'x', :t, CURRENT_TIMESTAMP)"), {"t": True})
        for uid, body in (("u1", b".a\r\n.b\r\n"), ("u2", b"c\r\n.\r\n")):
            s.execute(
                sql("INSERT INTO messages (account_id, uid, sender, size, body, received_at, seen) VALUES (1, :u, '', :n, :b, CURRENT_TIMESTAMP, :f)"),
                {"u": uid, "n": len(body), "b": body, "f": False},
            )
    assert migrate.upgrade(database) == migrate.HEAD_REVISION  # (the newest)
    store = Store(database)
    ids = [m.id for m in store.maildrops.snapshot(1)]
    for wanted in (ids[:1], ids):  # one message alone, and a batch (on SQLite read as one value)
        bodies = store.maildrops.read_bodies(1, wanted)
        assert [bodies[i][1] for i in wanted] == [None] * len(wanted)
        stuffed = [b"".join(dot_stuff_parts(*bodies[i])) for i in wanted]
        assert stuffed == [b"..a\r\n..b\r\n.\r\n", b"c\r\n..\r\n.\r\n"][: len(wanted)]
        assert stuffed[0] == dot_stuff(bytes(bodies[ids[0]][0]))
    database.dispose()


@pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_postgresql_bodies_are_lz4_and_those_stored_before_still_read(db_url):
    """Migration 0005: bodies written after it are lz4 (where the server has lz4), those
    written before keep pglz, and both read back as they were stored."""
    import random

    from sqlalchemy import text as sql

    from mailsrv.store import Store

    database = database_at(db_url, "0004")
    store = Store(database)
    store.directory.add_domain("example.org")
    account = store.directory.add_account("ann@example.org", "x").id
    words = [bytes(random.Random(n).choices(b"abcdefghij", k=6)) for n in range(200)]
    texts = [b"\r\n".join(b" ".join(random.Random(n + k).choices(words, k=9)) for k in range(150)) + b"\r\n"
             for n in (1, 2)]  # 10 KB of word-like text each: compressed, stored inline
    store.maildrops.deliver_local(account, texts[0])
    with database.read_core() as connection:
        offered = connection.execute(sql(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")).scalar()
    assert migrate.upgrade(database) == migrate.HEAD_REVISION
    store.maildrops.deliver_local(account, texts[1])
    with database.read_core() as connection:
        methods = [r[0] for r in connection.execute(sql("SELECT pg_column_compression(body) FROM messages ORDER BY id"))]
        columns = dict(connection.execute(sql(
            "SELECT attrelid::regclass::text, attcompression FROM pg_attribute"
            " WHERE attname = 'body' AND attrelid IN ('messages'::regclass, 'queue'::regclass)")).all())
    assert methods == (["pglz", "lz4"] if offered else ["pglz", "pglz"])
    assert columns == ({"messages": "l", "queue": "l"} if offered else {"messages": "", "queue": ""})
    ids = [m.id for m in store.maildrops.snapshot(account)]
    bodies = store.maildrops.read_bodies(account, ids)
    assert [bytes(bodies[i][0]) for i in ids] == texts
    database.dispose()


def test_head_revision_constant_is_alembics_head(database):
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(migrate.alembic_config(database)).get_current_head() == migrate.HEAD_REVISION


def test_durable_writes_sync_fully_after_a_lighter_one(database):
    if database.dialect != "sqlite":
        pytest.skip("SQLite only")
    with database.write(durable=False) as s:
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with database.write() as s:
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
