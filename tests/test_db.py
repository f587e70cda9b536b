"""The Raw path against SQLAlchemy's own, statement by statement, on SQLite and PostgreSQL.

The Raw path (mailsrv.raw.Raw) compiles each statement once and runs it on the driver's
cursor, reading SQLAlchemy's compiled form to do so (the positional order of parameters,
the binds' defaults and type conversions, the result columns' conversions). Those are
SQLAlchemy internals: an upgrade that changes them must fail here, not in a mailbox. So
every statement the store runs on the Raw path is run both ways, in a transaction rolled
back each time, and the SQL and parameters handed to the driver and the rows it gave back
must agree."""

from __future__ import annotations

import importlib
from datetime import UTC, datetime

import pytest
from sqlalchemy import Boolean, DateTime, Integer, LargeBinary, event
from sqlalchemy.sql.base import Executable

from mailsrv.raw import Raw

STORE_MODULES = ("directory", "maildrop", "queue", "leases")
#: statements only ever run on SQLite (read_bodies takes another one on PostgreSQL)
SQLITE_ONLY = {"maildrop.BODIES_BETWEEN_ONE_ROW"}
#: and only ever on PostgreSQL
POSTGRES_ONLY = {"leases.DOMAIN_TURN", "queue.INSERT_QUEUED_WITH_RECIPIENT", "queue.POST_DELIVERED",
                 "directory.ROUTES_OF", "maildrop.OPEN_MAILDROP", "maildrop.CLOSE_MAILDROP"}
WHEN = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)


def raw_statements() -> list[tuple[str, Executable]]:
    """Every public statement constant of the store's Raw-path modules (a ``due`` pair
    counts as its two statements)."""
    found: dict[str, Executable] = {}
    for name in STORE_MODULES:
        module = importlib.import_module(f"mailsrv.store.{name}")
        for attr, value in vars(module).items():
            if attr.startswith("_") or not attr.isupper():
                continue
            if isinstance(value, Executable):
                found[f"{name}.{attr}"] = value
            elif isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, Executable) for v in value):
                found[f"{name}.{attr}[plain]"], found[f"{name}.{attr}[locked]"] = value
    return sorted(found.items())


def test_the_raw_statements_are_found():
    names = {name for name, _ in raw_statements()}
    for expected in ("maildrop.SNAPSHOT", "maildrop.INSERT_MESSAGE", "queue.SETTLE_LEASED", "queue.DUE_QUEUED[locked]",
                     "leases.TAKE_LEASE", "leases.HELD_IN_DOMAIN[plain]", "directory.ACCOUNT_BY_ADDRESS"):
        assert expected in names
    assert len(names) >= 30


class _Recorder:
    """A driver cursor whose executions are seen."""

    def __init__(self, cursor, seen: list):
        self._cursor, self._seen = cursor, seen

    def execute(self, sql, params=()):
        self._seen.append((sql, params))
        return self._cursor.execute(sql, params)

    def executemany(self, sql, params):
        self._seen.append((sql, list(params)))
        return self._cursor.executemany(sql, params)

    def __getattr__(self, name):
        return getattr(self._cursor, name)


class _Rollback(Exception):
    pass


def _sample_values(statement, database, ids: dict[str, int]) -> dict:
    """Values for every parameter the statement needs (an INSERT: every column but its id)."""
    if statement.is_insert and not statement._values and statement.select is None:  # (values given at execution)
        columns = [c for c in statement.table.columns if not c.primary_key or statement.table.name in ("maildrop_locks",)]
        names = {c.key: c.type for c in columns}
    else:
        compiled = statement.compile(dialect=database.engine.dialect)
        names = {name: bind.type for name, bind in compiled.binds.items() if bind.required}
    values = {}
    for name, kind in names.items():
        if name in ids:
            values[name] = ids[name]
        elif isinstance(getattr(kind, "impl", kind), DateTime) or "expires" in name or name.endswith("_at"):
            values[name] = WHEN
        elif isinstance(kind, Boolean):
            values[name] = True
        elif isinstance(kind, LargeBinary) or name in ("body", "header"):
            values[name] = b"Subject: x\r\n\r\nbody\r\n"
        elif isinstance(kind, Integer) or name in ("limit", "attempts", "size"):
            values[name] = 5
        elif name in ("state",):
            values[name] = "queued"
        elif name in ("origin",):
            values[name] = "mpp"
        elif name in ("kind",):
            values[name] = "local"
        elif name in ("host",):
            values[name] = "nohost:%"
        else:
            values[name] = "ann@example.org" if name in ("address", "recipient", "sender") else f"value-of-{name}"
    return values


@pytest.mark.parametrize("name,statement", raw_statements(), ids=[n for n, _ in raw_statements()])
def test_raw_path_agrees_with_sqlalchemy(name, statement, store, database, accounts):
    if name in SQLITE_ONLY and database.dialect != "sqlite":
        pytest.skip("an SQLite-only statement")
    if name in POSTGRES_ONLY and database.dialect != "postgresql":
        pytest.skip("a PostgreSQL-only statement")
    ann = accounts["ann"].id
    queue_id = store.queue.enqueue("ann@example.org", b"Subject: q\r\n\r\nx\r\n", ["bob@example.org"], "mpp")
    message_id = store.maildrops.deliver_local(ann, b"Subject: m\r\n\r\n.dot\r\n")
    with database.read_core() as conn:
        rid = conn.exec_driver_sql("SELECT id FROM queue_recipients").scalar()
    ids = {"account": ann, "account_id": ann, "queue_id": queue_id, "rid": rid, "id": message_id, "low": 1,
           "high": message_id + 10, "name": "example.org", "domain": "example.org", "address": "ann@example.org",
           "message": message_id, "lock_holder": "me:1", "owner": "me:1", "message_account_id": ann,
           "addresses": ["ann@example.org", "x@elsewhere.example"], "names": ["example.org", "elsewhere.example"],
           "deleted": [message_id], "retrieved": [message_id + 1], "holder": "me:1"}
    values = _sample_values(statement, database, ids)

    raw_seen: list = []
    with pytest.raises(_Rollback), database.write_raw() as raw:
        recorded = Raw(database, _Recorder(raw._cursor, raw_seen))
        result = recorded.execute(statement, values)
        raw_rows = result.all() if _returns_rows(statement) else None
        raise _Rollback

    core_seen: list = []

    def seen(conn, cursor, sql, parameters, context, executemany):
        core_seen.append((sql, parameters))

    event.listen(database.engine, "before_cursor_execute", seen)
    try:
        with pytest.raises(_Rollback), database.write_core() as conn:
            core_seen.clear()  # (the transaction's own BEGIN and settings)
            result = conn.execute(statement, values)
            core_rows = [tuple(r) for r in result.all()] if _returns_rows(statement) else None
            raise _Rollback
    finally:
        event.remove(database.engine, "before_cursor_execute", seen)

    assert len(raw_seen) == len(core_seen) == 1, (raw_seen, core_seen)
    (raw_sql, raw_params), (core_sql, core_params) = raw_seen[0], core_seen[0]
    assert raw_sql == core_sql
    assert _plain(raw_params) == _plain(core_params)
    if "INSERT INTO" in raw_sql:  # a new id each time (a PostgreSQL sequence is not rolled back)
        assert len(raw_rows or ()) == len(core_rows or ())
    else:
        assert raw_rows == core_rows


def _returns_rows(statement) -> bool:
    return getattr(statement, "is_select", False) or bool(getattr(statement, "_returning", ())) or statement.is_text


def _plain(params):
    """Parameters as comparable values (psycopg wraps bytes in a Binary, which compares by identity)."""
    def value(v):
        return getattr(v, "obj", v)

    if isinstance(params, dict):
        return {k: value(v) for k, v in params.items()}
    return [value(v) for v in params]
