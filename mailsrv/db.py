"""The database: engine, the two execution paths, group commit.

SQLite (the default) runs in WAL mode with ``synchronous=FULL`` (a commit is on disk before
anyone is told 250 or +OK), a busy timeout, foreign keys on, and every write transaction
opened with ``BEGIN IMMEDIATE`` so two writers never deadlock upgrading a read lock; the
writers of one process take turns on a lock of their own. PostgreSQL runs at READ
COMMITTED; queue claims use ``FOR UPDATE SKIP LOCKED``.

Each method below opens and ends one short transaction; no connection is held while a
client is being waited for. The store (``mailsrv.store``, whose docstring gives the rule
for choosing) uses two paths:

- **Core**: :meth:`Database.read_core` and :meth:`Database.write_core` yield a SQLAlchemy
  ``Connection``; any statement, built per call or not.
- **Raw**: :meth:`Database.read_raw`, :meth:`Database.write_raw` and
  :meth:`Database.write_grouped` yield a :class:`~mailsrv.raw.Raw`, which runs Core
  statements compiled once per database straight on the driver's cursor. It reads SQLAlchemy's compiled form
  (positional order, bind defaults and type conversions, result conversions), which is
  why ``setup.py`` pins SQLAlchemy's minor series and ``tests/test_db.py`` runs every Raw
  statement of the store both ways and compares what reaches the driver.

:meth:`Database.read` and :meth:`Database.write` yield an ORM ``Session``: the store does
not use them; the benchmarks' bulk loading and some tests do.

Errors: :class:`DatabaseUnavailable` when the database cannot be reached or stays locked
(temporary), SQLAlchemy's ``IntegrityError`` for a broken constraint, on every path.

The schema's revisions and DDL are :mod:`mailsrv.migrate`'s.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from . import metrics
from .raw import Prepared, Raw

#: how long a statement waits for another writer's lock before the database counts as
#: unavailable (SQLite busy timeout; PostgreSQL lock_timeout)
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_LOCK_TIMEOUT_MS = 30_000
#: SQLite's memory map: off. Reading through a map saved a copy per page (RETR of 1 MB
#: messages about 25% faster), but every page a connection touched then counted as the
#: process's own resident memory, once per connection: 300+ MiB after a RETR load, where
#: the server needs 130 without it. Pages are read through the kernel's page cache.
SQLITE_MMAP_SIZE = 0
#: page cache of each SQLite connection, in KiB (the kernel's page cache holds the rest)
SQLITE_CACHE_KIB = 1024
#: transactions of one process that run at once (``[server] database_transactions``); the
#: others wait their turn, in the order they came (:class:`_Turns`), and the pool keeps as
#: many connections open, so none is opened or closed under load. Unbounded, a soak of
#: 120 sessions (bench/soak.py, 2 cores) had more transactions in flight than the pool
#: kept connections for (14): on PostgreSQL the pool opened and closed 35 connections a
#: second (each a new server process, its statements prepared again), and every thread
#: woken by its database reply fought the others for the interpreter lock. Per message
#: accepted, unbounded / 16 / 4 at once: PostgreSQL 430 / 600 / 1,170 messages/s, the
#: database server's CPU 1.8 / 0.8 / 0.4 ms, mailsrv's 1.9 / 1.7 / 0.8 ms; SQLite 970 /
#: 1,320 / 1,910 messages/s
TRANSACTIONS_AT_ONCE = 4
#: how long a transaction waits for its turn before the database counts as unavailable
TURN_TIMEOUT_SECONDS = 30.0
#: how long the raw transactions keep a connection between uses (a PostgreSQL connection
#: idle for longer is checked by the pool's ping before it is used again)
RAW_IDLE_SECONDS = {"sqlite": 10.0, "postgresql": 1.0}
#: shared transactions of write_grouped that may run at once: SQLite has one writer;
#: PostgreSQL runs several, each on its own connection and backend, and shares the disk
#: flushes of commits that meet itself. Fewer than the transactions allowed at once, so
#: that post batches never hold every turn and POP3 sessions need not wait behind them
#: (with one turn fewer, the soak's readers got through a third more sessions)
GROUP_LEADERS = {"sqlite": 1, "postgresql": 8}
#: while a shared transaction runs, a post waits to share the next one; only when this
#: many wait does another start beside it (up to GROUP_LEADERS). Each shared transaction
#: runs its posts one round trip after another, so running several side by side is
#: faster when many post at once, but each then holds fewer posts, and every transaction
#: costs its BEGIN, COMMIT and flush in mailsrv and in the database. With 8 MPP clients
#: on PostgreSQL (bench/mpp.py, 2 cores), starting another whenever fewer than 3 ran gave
#: 1.6 posts a transaction and about 1,650 posts/s; never more than one, 4 posts a
#: transaction and about 1,800/s, but the soak then accepted 810 messages/s where it
#: had 1,220; starting another once 4 wait, about 1,900/s and 1,260/s
GROUP_FULL = 4


class DatabaseUnavailable(Exception):
    """The database could not be reached or refused the operation (temporary). Each one
    made is counted (``mailsrv_database_errors_total``): every failed call makes one."""

    def __init__(self, *args):
        super().__init__(*args)
        metrics.DATABASE_ERRORS.inc()


class Database:
    """An engine plus the two kinds of short transaction mailsrv uses."""

    def __init__(self, url: str, *, transactions: int = TRANSACTIONS_AT_ONCE, max_overflow: int = 8):
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self._turns = _Turns(transactions)
        #: connections the raw transactions keep between uses: as many as run at once
        self._raw_idle_max = transactions
        # (max_overflow: for a Core transaction while the raw path keeps every connection it
        # may, and for what runs outside the turns, such as migrations)
        pool_size = transactions
        kwargs: dict = {"future": True, "pool_pre_ping": self.dialect != "sqlite"}
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs.update(pool_size=pool_size, max_overflow=max_overflow, pool_timeout=60)
        else:
            kwargs.update(pool_size=pool_size, max_overflow=max_overflow, pool_timeout=30)
        self.engine: Engine = create_engine(url, **kwargs)
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        elif self.dialect == "postgresql":
            _configure_postgresql(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = threading.Lock() if self.dialect == "sqlite" else _NoLock()
        dbapi = self.engine.dialect.loaded_dbapi
        self._driver_errors = (dbapi.OperationalError, dbapi.InterfaceError)
        self._integrity_error = dbapi.IntegrityError
        self._programming_error = dbapi.ProgrammingError
        self._prepared: dict = {}
        self._raw_idle: list[tuple] = []  # (connection, idle since) kept by _raw_checkin
        self._group: list[_Grouped] = []  # works waiting for write_grouped's next turn
        self._group_lock = threading.Lock()
        self._group_leaders = 0  # shared transactions running now
        #: (one turn fewer than run at once: posts never take every turn, and a reader's
        #: transactions need not wait for a post batch to end)
        self._group_leaders_max = min(GROUP_LEADERS.get(self.dialect, 1), max(1, transactions - 1))
        #: shared transactions run so far, by how many works each held (tests, metrics)
        self.group_sizes: collections.Counter[int] = collections.Counter()

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[Session]:
        """One write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on success.

        ``durable=False`` is for writes that protect no mail (maildrop locks, login times,
        queue leases): they commit without waiting for the disk (SQLite
        ``synchronous=NORMAL``, PostgreSQL ``synchronous_commit = off``); a power cut may
        undo them but never leaves the database inconsistent. Anything that accepts,
        delivers or deletes mail stays durable.

        On SQLite the writers of this process queue on a lock of their own, which wakes
        the next one at once, rather than on SQLite's busy handler, which sleeps.
        Raises DatabaseUnavailable when the database cannot be reached or stays locked.
        """
        with self._writer_turn(), self._turn(), self._sessions() as session, session.begin():
            session.connection(execution_options={"mailsrv_write": True, "mailsrv_durable": durable})
            if not durable and self.dialect == "postgresql":
                session.execute(text("SET LOCAL synchronous_commit TO OFF"))
            yield session

    @contextmanager
    def write_core(self, durable: bool = True) -> Iterator[Connection]:
        """:meth:`write` on a Core connection (no ORM session): the fast path of the queue."""
        with self._writer_turn(), self._turn(), self.engine.connect() as connection:
            connection.execution_options(mailsrv_write=True, mailsrv_durable=durable)
            with connection.begin():
                if not durable and self.dialect == "postgresql":
                    connection.execute(text("SET LOCAL synchronous_commit TO OFF"))
                yield connection

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """This transaction's turn among those that may run at once. A writer on SQLite
        takes it once it holds the writer lock, so that writers queued behind a long
        write (the file locked by another program) hold no turn and reads go on. A
        transaction opened inside another of the same thread runs in the outer one's turn."""
        if not self._turns.acquire(TURN_TIMEOUT_SECONDS):
            raise DatabaseUnavailable("too many transactions waiting for the database")
        try:
            yield
        finally:
            self._turns.release()

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """This process's turn to write (SQLite), with database errors made DatabaseUnavailable."""
        if not self._writer.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000):
            raise DatabaseUnavailable("database is busy")
        try:
            yield
        except UNAVAILABLE as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc
        finally:
            self._writer.release()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """One read-only transaction (DatabaseUnavailable as for :meth:`write`)."""
        try:
            with self._turn(), self._sessions() as session, session.begin():
                yield session
        except UNAVAILABLE as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc

    @contextmanager
    def read_core(self) -> Iterator[Connection]:
        """One read-only transaction on a Core connection: the fast path for hot reads."""
        try:
            with self._turn(), self.engine.connect() as connection, connection.begin():
                yield connection
        except UNAVAILABLE as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc

    @contextmanager
    def write_raw(self, durable: bool = True, one_statement: bool = False) -> Iterator[Raw]:
        """:meth:`write` on the driver's own connection (see :class:`Raw`): for the few
        statements on the paths every message or login takes. Errors are raised as
        :meth:`write` raises them: DatabaseUnavailable, or SQLAlchemy's IntegrityError.
        ``one_statement``: the caller runs a single statement, which on PostgreSQL then
        is a transaction of its own (one round trip, where BEGIN, it and COMMIT take
        three), committed durably whatever ``durable`` says."""
        with self._writer_turn(), self._turn(), self._raw(write=True, durable=durable, alone=one_statement) as raw:
            yield raw

    def write_grouped(
        self, work: Callable[[Raw], T], prime: tuple[Callable[[Raw, list], None], Any] | None = None
    ) -> T:
        """Run ``work(raw)`` in a durable :meth:`write_raw` transaction, sharing it with
        whatever other threads asked at the same time (group commit); return its result.
        ``prime``, a (function, value) pair, reads ahead what the work will read: before
        the works of one transaction run, each function is called once, with the
        transaction and the values of all the works that gave it (so that what each would
        read alone, in a round trip of its own, is read in one; it leaves what it read in
        ``raw.memo``). A work must give the same result with or without its prime.

        A thread leads when no shared transaction runs, or when GROUP_FULL works wait
        and fewer than GROUP_LEADERS run (on SQLite: only when none runs): it runs every
        work waiting in one transaction. When it is done, the works that came meanwhile
        are handed, as one batch, to the first of them, which leads the next transaction
        (so no thread waits for others' posts after its own is committed). On PostgreSQL
        they are handed on once the works have run, before the COMMIT, so that the next
        batch's statements overlap this one's commit (on SQLite, where one transaction
        writes at a time, the next would only wait). So under load each message costs its
        own statements but a share of one BEGIN, COMMIT and disk flush, and the writers no
        longer take turns on the write lock one by one. ``work`` must touch nothing but
        the transaction: if a shared transaction fails other than by the database being
        unavailable, each of its works is run again alone, so that one failing work never
        fails another.
        """
        item = _Grouped(work, prime)
        with self._group_lock:
            if self._group_leaders == 0 or (
                len(self._group) + 1 >= GROUP_FULL and self._group_leaders < self._group_leaders_max
            ):
                self._group_leaders += 1
                item.batch, self._group = [*self._group, item], []
            else:
                self._group.append(item)
        if item.batch is None:
            item.wake.wait()  # done by a leader, or handed a batch to lead
        if item.batch is not None:
            batch = item.batch
            handed_on = []

            def hand_on() -> None:  # the lead, with what waits, to the first waiting
                if handed_on:
                    return
                handed_on.append(True)
                with self._group_lock:
                    if self._group:
                        following = self._group[0]
                        following.batch, self._group = self._group, []
                        following.wake.set()
                    else:
                        self._group_leaders -= 1

            try:
                self._run_group(batch, hand_on)
            finally:
                for other in batch:  # only if _run_group was interrupted
                    if not other.done:
                        other.finish(error=DatabaseUnavailable("interrupted"))
                hand_on()
        if item.error is not None:
            raise item.error
        return item.result

    def _run_group(self, batch: list[_Grouped], hand_on: Callable[[], None]) -> None:
        """Run a batch in one transaction; on PostgreSQL, call ``hand_on`` once its works
        have run (before the COMMIT), and if it fails, before its works are run again
        alone (write_grouped calls it at the end if it has not been called)."""
        self.group_sizes[len(batch)] += 1
        try:
            with self.write_raw() as raw:
                primes: dict[Callable, list] = {}
                for item in batch:
                    if item.prime is not None:
                        primes.setdefault(item.prime[0], []).append(item.prime[1])
                for function, values in primes.items():
                    function(raw, values)
                results = [item.work(raw) for item in batch]
                if self.dialect != "sqlite":  # (SQLite writes one transaction at a time)
                    hand_on()
        except DatabaseUnavailable as exc:
            for item in batch:
                item.finish(error=exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].finish(error=exc)
                return
            hand_on()
            for item in batch:  # alone, so that only the failing one fails
                try:
                    with self.write_raw() as raw:
                        result = item.work(raw)
                except Exception as one:
                    item.finish(error=one)
                else:
                    item.finish(result=result)
            return
        for item, result in zip(batch, results, strict=True):
            item.finish(result=result)

    @contextmanager
    def read_raw(self, snapshot: bool = True) -> Iterator[Raw]:
        """:meth:`read` on the driver's own connection (see :class:`Raw`).
        ``snapshot=False``: the caller's statements need not see the database as of one
        moment (one statement, or reads of what does not change); on PostgreSQL each then
        runs on its own, outside a transaction: one round trip to the server, where
        BEGIN, the statement and COMMIT take three."""
        with self._turn(), self._raw(write=False, durable=True, alone=not snapshot) as raw:
            yield raw

    @contextmanager
    def _raw(self, write: bool, durable: bool, alone: bool = False) -> Iterator[Raw]:
        connection = self._raw_checkout()
        try:
            sqlite = self.dialect == "sqlite"
            alone = alone and not sqlite
            if alone:  # (psycopg then sends neither BEGIN nor COMMIT)
                try:
                    connection.dbapi_connection.autocommit = True
                except self._programming_error as exc:  # (one already known to be broken)
                    raise self._driver_errors[0](str(exc)) from exc
            cursor = connection.cursor()
            if sqlite:
                _sqlite_begin(cursor.execute, connection.info, write, durable)
            elif write and not durable and not alone:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
            try:
                yield Raw(self, cursor)
            except BaseException:
                try:
                    if sqlite:
                        cursor.execute("ROLLBACK")
                    else:
                        connection.rollback()
                except self._driver_errors:
                    pass
                if alone:  # (never back to the pool in autocommit: closed if it broke)
                    try:
                        connection.dbapi_connection.autocommit = False
                    except Exception:
                        connection.invalidate()
                raise
            if alone:
                connection.dbapi_connection.autocommit = False
            if sqlite:
                cursor.execute("COMMIT")
            elif not alone:
                connection.commit()
        except self._driver_errors as exc:
            if connection.is_valid:  # (not yet invalidated above)
                connection.invalidate()  # (back to the pool, closed): fresh ones next time
            for kept, _ in self._take_kept():  # (they may have lost their server as well)
                kept.invalidate()
            raise DatabaseUnavailable(_describe(exc)) from exc
        except self._integrity_error as exc:  # raised as write() would: SQLAlchemy's
            connection.close()
            raise IntegrityError(None, None, exc) from exc
        except BaseException:
            connection.close()
            raise
        self._raw_checkin(connection)

    def _raw_checkout(self):
        """A pooled connection for a raw transaction. The raw paths keep a few of their own
        between transactions (out of the pool: its check-in and check-out were a good part
        of a short transaction); one left unused for longer than RAW_IDLE_SECONDS goes back
        through the pool, which pings a PostgreSQL connection before it is used again."""
        for connection, since in self._take_kept():
            if time.monotonic() - since < RAW_IDLE_SECONDS.get(self.dialect, 0.0):
                return connection
            connection.close()
        try:
            return self.engine.raw_connection()
        except UNAVAILABLE as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc

    def _take_kept(self) -> Iterator[tuple]:
        """Take the kept connections, newest first, one at a time as the caller asks
        (other threads may be taking them too)."""
        while True:
            try:
                yield self._raw_idle.pop()
            except IndexError:
                return

    def _raw_checkin(self, connection) -> None:
        if len(self._raw_idle) < self._raw_idle_max:
            self._raw_idle.append((connection, time.monotonic()))
        else:
            connection.close()

    def prepared(self, statement, keys: tuple[str, ...] | None) -> Prepared:
        """``statement`` compiled for this database once (``keys``: an INSERT's columns)."""
        key = (statement, keys)
        found = self._prepared.get(key)
        if found is None:
            found = self._prepared[key] = Prepared(statement, self.engine.dialect, keys)
        return found

    def dispose(self) -> None:
        for connection, _ in self._take_kept():
            connection.close()
        self.engine.dispose()


UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeoutError)
T = TypeVar("T")


class _Grouped:
    """One work of :meth:`Database.write_grouped`, and what became of it."""

    __slots__ = ("work", "prime", "wake", "batch", "done", "result", "error")

    def __init__(self, work, prime=None):
        self.work = work
        self.prime = prime
        self.wake = threading.Event()  # set when done, or when handed a batch to lead
        self.batch: list[_Grouped] | None = None  # the works it leads (itself among them)
        self.done = False
        self.result = None
        self.error: BaseException | None = None

    def finish(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error, self.done = result, error, True
        self.wake.set()


class _Turns:
    """At most ``n`` holders at once; a waiter is handed a turn when one ends, in the
    order the waiters came (no newcomer takes it first, so none waits for long under
    load). A thread that holds a turn and asks again is given it at once, so a
    transaction opened inside another can never wait for itself."""

    def __init__(self, n: int):
        self._free = n
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._held = threading.local()

    def acquire(self, timeout: float) -> bool:
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            return True
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                self._held.depth = 1
                return True
            handed = threading.Event()
            self._waiting.append(handed)
        if not handed.wait(timeout):
            with self._lock:
                if handed in self._waiting:  # (else it was handed over as time ran out)
                    self._waiting.remove(handed)
                    return False
        self._held.depth = 1
        return True

    def release(self) -> None:
        self._held.depth -= 1
        if self._held.depth:
            return
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # the turn goes on, still taken
            else:
                self._free += 1


class _NoLock:
    """PostgreSQL needs no writer lock: its own row locks do the work."""

    def acquire(self, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass


def _describe(exc: Exception) -> str:
    """The first line of a database error (the driver's, under SQLAlchemy's wrapper), or
    its type where it says nothing."""
    cause = getattr(exc, "orig", None) or exc
    return (str(cause).splitlines() or [type(cause).__name__])[0]


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, record):
        # pysqlite's own transaction handling is off: we emit BEGIN ourselves below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        record.info["synchronous"] = "FULL"
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute(f"PRAGMA mmap_size = {SQLITE_MMAP_SIZE}")
        cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        options = connection.get_execution_options()
        write = options.get("mailsrv_write", False)
        _sqlite_begin(connection.exec_driver_sql, connection.info, write, options.get("mailsrv_durable", True))


def _sqlite_begin(execute: Callable[[str], object], info: dict, write: bool, durable: bool) -> None:
    """Begin an SQLite transaction: ``BEGIN IMMEDIATE`` for a write, after setting the
    connection's ``synchronous`` for its durability (``info``: the pooled connection's
    record, which remembers the setting); a plain ``BEGIN`` for a read."""
    if write:
        synchronous = "FULL" if durable else "NORMAL"
        if info.get("synchronous") != synchronous:
            execute(f"PRAGMA synchronous = {synchronous}")
            info["synchronous"] = synchronous
    execute("BEGIN IMMEDIATE" if write else "BEGIN")


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = {int(POSTGRES_LOCK_TIMEOUT_MS)}")
        dbapi_connection.autocommit = autocommit


def sqlite_path(url: str) -> str | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return os.path.abspath(parsed.database)
