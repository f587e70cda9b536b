"""The Raw path: Core statements compiled once per database and run straight on the
driver's cursor (see :mod:`mailsrv.db`, which opens the transactions, and
``tests/test_db.py``, which runs every Raw statement of the store both ways)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .db import Database


class Prepared:
    """A Core statement compiled once for one dialect, with the driver's parameter style
    and the type conversions SQLAlchemy would apply (SQLite keeps dates as text)."""

    __slots__ = ("sql", "names", "defaults", "converters", "results")

    def __init__(self, statement, dialect, keys: tuple[str, ...] | None):
        compiled = statement.compile(dialect=dialect, column_keys=list(keys) if keys is not None else None)
        self.sql = str(compiled)
        self.names = list(compiled.positiontup) if compiled.positional else None
        self.defaults = {}  # the values written into the statement (``coalesce(x, 0)``)
        self.converters = {}
        rendered = set(compiled.bind_names.values())  # (binds is also keyed by anonymous names)
        for name, bind in compiled.binds.items():
            if name not in rendered:
                continue
            if bind.expanding:
                raise ValueError("a Raw statement cannot expand IN lists")
            if not bind.required:
                self.defaults[name] = bind.effective_value
            convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if convert is not None:
                self.converters[name] = convert
        self.results = None  # the columns a SELECT or a RETURNING gives back
        columns = getattr(statement, "exported_columns", ())  # none for text(): raw values
        converters = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns]
        if any(converters):
            self.results = converters

    def parameters(self, values: dict):
        if self.defaults or self.converters:
            values = {**self.defaults, **values}  # one copy: the caller's dict stays as it is
            for name, convert in self.converters.items():
                if name in values:
                    values[name] = convert(values[name])
        if self.names is not None:
            return tuple(values[name] for name in self.names)
        return values


class Raw:
    """A transaction on the driver's own connection.

    SQLAlchemy's execution layer costs about 0.1 ms a statement in Python (with a new
    statement object each time, far more); on the paths every message or login takes
    (posting, delivery, a maildrop session's login and QUIT) that was most of the work. A
    :class:`Raw` runs Core statements compiled once per database
    (:meth:`Database.prepared`) straight on the driver's cursor, and offers the part of
    ``Connection`` those paths use:
    ``execute`` (a list of parameter sets: executemany) and ``scalar``, with results
    offering ``first``, ``one``, ``scalar_one``, ``all``, iteration and ``rowcount``.
    """

    def __init__(self, db: Database, cursor):
        self._db = db
        self._cursor = cursor
        self.dialect = db.dialect  # "sqlite" or "postgresql", for the few statements that differ
        #: what was read earlier in this transaction and may be used again in it, by key
        #: (the routes a group of posts reads at once: ``directory.read_routes``)
        self.memo: dict = {}

    def execute(self, statement, params: dict | list[dict] | None = None) -> RawResult:
        if isinstance(params, list) and len(params) == 1:
            params = params[0]  # (one row: a plain execute, without executemany's pipeline)
        if isinstance(params, list):
            prepared = self._db.prepared(statement, tuple(params[0]) if statement.is_insert else None)
            self._cursor.executemany(prepared.sql, [prepared.parameters(p) for p in params])
        else:
            params = params or {}
            prepared = self._db.prepared(statement, tuple(params) if statement.is_insert else None)
            self._cursor.execute(prepared.sql, prepared.parameters(params))
        return RawResult(self._cursor, prepared.results)

    def scalar(self, statement, params: dict | None = None):
        row = self.execute(statement, params).first()
        return None if row is None else row[0]


class RawResult:
    """What a :meth:`Raw.execute` gives back: the part of a Result the store uses."""

    __slots__ = ("_cursor", "_converters")

    def __init__(self, cursor, converters):
        self._cursor = cursor
        self._converters = converters

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def _convert(self, row):
        if row is None or self._converters is None:
            return row
        return tuple(value if c is None else c(value) for c, value in zip(self._converters, row, strict=True))

    def first(self):
        return self._convert(self._cursor.fetchone())

    def one(self):
        row = self.first()
        if row is None:
            raise LookupError("no row")
        return row

    def scalar_one(self):
        return self.one()[0]

    def all(self) -> list:
        return [self._convert(row) for row in self._cursor.fetchall()]

    def __iter__(self):
        return iter(self.all())
