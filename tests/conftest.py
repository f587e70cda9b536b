"""Fixtures: real databases (SQLite file always, PostgreSQL when MAILSRV_TEST_POSTGRES_URL is
set), a configuration on ephemeral loopback ports, a running App, and a line client."""

from __future__ import annotations

import os
import socket
import sqlite3
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from mailsrv import db as dbmod
from mailsrv import migrate
from mailsrv.app import App
from mailsrv.auth import hash_password
from mailsrv.config import Config
from mailsrv.store import Store

POSTGRES_URL = os.environ.get("MAILSRV_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
PASSWORD = "correct horse"


def pytest_collection_modifyitems(config, items):
    if POSTGRES_URL:
        return
    skip = pytest.mark.skip(reason="MAILSRV_TEST_POSTGRES_URL is not set")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """A fresh, empty database: an SQLite file, or a private PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mailsrv.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)  # (survives cut-off backends)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def database(db_url):
    database = dbmod.Database(db_url)
    migrate.upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def store(database):
    return Store(database)


@pytest.fixture
def accounts(store):
    """Domain example.org with ann (also a CRAM-MD5 secret) and bob, password PASSWORD."""
    store.directory.add_domain("example.org")
    hashed = hash_password(PASSWORD, 4)
    ann = store.directory.add_account("ann@example.org", hashed, cram_secret=PASSWORD)
    bob = store.directory.add_account("bob@example.org", hashed)
    return {"ann": ann, "bob": bob}


def make_config(db_url: str, tmp_path: Path, **sections) -> Config:
    """A test configuration: loopback ephemeral ports, fast bcrypt, no failure delay."""
    base = Config(path=str(tmp_path / "mailsrv.conf")).replace(
        server={"hostname": "mail.example.org", "database": db_url},
        pop3={"listen": (("127.0.0.1", 0),)},
        pop={"listen": (("127.0.0.1", 0),)},
        mpp={"listen": (("127.0.0.1", 0),)},
        odmr={"listen": ()},
        smtp={"listen": (), "submission": ()},
        auth={"bcrypt_rounds": 4, "failure_delay": 0.0},
        delivery={"workers": 0},  # queue tests inspect the queue; pool tests ask for workers
    )
    return base.replace(**sections) if sections else base


@pytest.fixture
def config(db_url, tmp_path):
    return make_config(db_url, tmp_path)


@pytest.fixture
def app(config, accounts):
    """A running App on ephemeral ports with the accounts fixture's users."""
    application = App(config).start()
    yield application
    application.stop()


class LineClient:
    """A plain socket client that speaks in lines, for transcript tests."""

    def __init__(self, address, timeout: float = 10.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else line.encode("utf-8") + b"\r\n"
        self.sock.sendall(data)

    def line(self) -> str:
        """The next line without its CRLF ('' at end of input)."""
        raw = self.file.readline()
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    def raw_line(self) -> bytes:
        return self.file.readline()

    def ask(self, line: str | bytes) -> str:
        self.send(line)
        return self.line()

    def multiline(self) -> list[str]:
        """Lines up to the terminating '.' (not included), not un-stuffed."""
        lines = []
        while True:
            line = self.line()
            if line == ".":
                return lines
            lines.append(line)

    def closed(self) -> bool:
        """True when the server has closed the connection (end of input, or a reset because
        it closed with our data unread); False if more data came."""
        try:
            return self.file.read() == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def transcript(client: LineClient, steps: list[tuple[str, str]]) -> None:
    """Send each client line and check the reply starts with the expected text."""
    for sent, expected in steps:
        reply = client.ask(sent)
        assert reply.startswith(expected), f"{sent!r}: got {reply!r}, expected {expected!r}"


@pytest.fixture
def client_factory():
    clients: list[LineClient] = []

    def connect(address, timeout: float = 10.0) -> LineClient:
        client = LineClient(address, timeout)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def make_app(db_url, tmp_path, accounts):
    """Start an App with config changes: make_app(pop3={"idle_timeout": 1}) -> App."""
    apps: list[App] = []

    def start(**sections) -> App:
        application = App(make_config(db_url, tmp_path, **sections)).start()
        apps.append(application)
        return application

    yield start
    for application in apps:
        application.stop()


def deliver(store: Store, address: str, body: bytes, sender: str = "sender@example.net") -> int:
    """Put a message straight into a mailbox (the store's delivery function)."""
    account = store.directory.find_account(address)
    return store.maildrops.deliver_local(account.id, body, sender=sender)


def wait_unlocked(store: Store) -> None:
    """Until no maildrop lock is held: a session whose client hung up releases its lock
    once its thread has seen the end of input (each look is one query, bounded in number)."""
    for _ in range(10_000):
        with store.db.read_core() as conn:
            if not conn.exec_driver_sql("SELECT count(*) FROM maildrop_locks").scalar():
                return


@pytest.fixture
def short_lock_waits(monkeypatch):
    monkeypatch.setattr(dbmod, "SQLITE_BUSY_TIMEOUT_MS", 300)
    monkeypatch.setattr(dbmod, "POSTGRES_LOCK_TIMEOUT_MS", 300)


class DatabaseBlocker:
    """Holds the database's write lock from outside, as a stuck or failing database would."""

    def __init__(self, db_url: str):
        self.db_url = db_url

    def __enter__(self):
        if self.db_url.startswith("sqlite"):
            self.conn = sqlite3.connect(self.db_url.removeprefix("sqlite:///"), isolation_level=None)
            self.conn.execute("BEGIN EXCLUSIVE")
        else:
            self.engine = create_engine(self.db_url)
            self.conn = self.engine.connect()
            self.conn.execute(text("LOCK TABLE queue IN ACCESS EXCLUSIVE MODE"))
        return self

    def __exit__(self, *exc):
        if self.db_url.startswith("sqlite"):
            self.conn.execute("ROLLBACK")
            self.conn.close()
        else:
            self.conn.rollback()
            self.conn.close()
            self.engine.dispose()
