"""``mailsrv db copy --to URL``: every table into another database, ids kept, as an office
moves from SQLite to PostgreSQL (or back, or to a new server).

- The target gets the schema (``db upgrade``) and must hold no rows yet: a copy never
  mixes with what is there.
- The source is read in one read transaction, so a running office is copied as it was at
  one moment (SQLite's WAL and PostgreSQL's snapshots give that while the server goes on
  writing); what arrives after that moment is not in the copy, so stop the server for the
  last copy before switching over, or copy twice and switch during a quiet minute.
- Rows go over in batches of :data:`BATCH` (messages are read a batch at a time, so a large
  mailbox is never all in memory), every column as it is: ids, UIDLs, leases, times.
- Ids are never reused, in the target either: each table's id counter is set past the
  highest id the source ever gave (SQLite's ``sqlite_sequence`` remembers ids of rows since
  deleted; a PostgreSQL sequence its last value).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, insert, inspect, select, text

from . import db as dbmod
from . import migrate
from .models import Base
from .store import Refused

BATCH = 500


def _counters(conn, dialect: str, tables: list[str]) -> dict[str, int]:
    """The highest id each table's counter has given, as far as the database remembers."""
    seen: dict[str, int] = {}
    if dialect == "sqlite":
        if inspect(conn).has_table("sqlite_sequence"):
            seen = {name: int(value) for name, value in conn.execute(text("SELECT name, seq FROM sqlite_sequence"))}
    elif dialect == "postgresql":
        for table in tables:
            sequence = conn.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar()
            if sequence:
                row = conn.execute(text(f"SELECT last_value, is_called FROM {sequence}")).first()
                if row and row[1]:
                    seen[table] = int(row[0])
    return {table: seen[table] for table in tables if table in seen}


def copy_database(source: dbmod.Database, target: dbmod.Database,
                  progress: Callable[[str, int], None] = lambda table, rows: None) -> dict[str, int]:
    """Copy every table of ``source`` into ``target`` (see the module docstring); return
    the rows copied per table."""
    migrate.upgrade(target)
    tables = Base.metadata.sorted_tables  # (parents before children)
    with target.read_core() as conn:
        for table in tables:
            if conn.execute(select(func.count()).select_from(table)).scalar():
                raise Refused(f"the target database has rows in {table.name} already: copy into an empty one")
    copied: dict[str, int] = {}
    with_ids = [t.name for t in tables if "id" in t.c and t.c.id.primary_key]
    with source.read_core() as reading:
        counters = _counters(reading, source.dialect, with_ids)
        for table in tables:
            rows = 0
            result = reading.execution_options(yield_per=BATCH).execute(select(table).order_by(*table.primary_key))
            for batch in result.partitions():
                with target.write_core() as writing:
                    writing.execute(insert(table), [dict(row._mapping) for row in batch])
                rows += len(batch)
                progress(table.name, rows)
            copied[table.name] = rows
    with target.write_core() as conn:
        for name in with_ids:
            highest = max(counters.get(name, 0), conn.execute(text(f"SELECT coalesce(max(id), 0) FROM {name}")).scalar())
            if not highest:
                continue
            if target.dialect == "postgresql":
                conn.execute(text("SELECT setval(pg_get_serial_sequence(:t, 'id'), :v)"), {"t": name, "v": highest})
            elif target.dialect == "sqlite":
                conn.execute(text("DELETE FROM sqlite_sequence WHERE name = :t"), {"t": name})
                conn.execute(text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :v)"), {"t": name, "v": highest})
    return copied
