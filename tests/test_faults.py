"""Database faults under load: PostgreSQL backends terminated while four SMTP clients send
(the connections are cut), PostgreSQL itself restarted while they send, and SQLite's file
locked by another process. Sessions get 4xx replies, never a broken conversation; everything answered 250 is
in the mailbox exactly once; service comes back by itself, with no server restart."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from .conftest import DatabaseBlocker

BOB = "bob@example.org"
SENDERS, EACH = 4, 60
LOOPBACK = (("127.0.0.1", 0),)


class Load:
    """SENDERS threads sending EACH messages to bob over port 25, one session each, or
    (``until_stopped``) as many as they can until :meth:`stop`."""

    def __init__(self, address, until_stopped: bool = False):
        self.address = address
        self.each = 100_000 if until_stopped else EACH
        self.stopped = threading.Event()
        self.accepted: list[str] = []
        self.deferred: list[tuple[str, int]] = []
        self.broken: list[str] = []
        self.progress = threading.Condition()
        self.threads = [threading.Thread(target=self.send, args=(n,)) for n in range(SENDERS)]

    def send(self, sender: int) -> None:
        with smtplib.SMTP(*self.address, timeout=60) as client:
            for n in range(self.each):
                if self.stopped.is_set():
                    return
                tag = f"{sender}-{n}"
                try:
                    client.sendmail("a@example.net", [BOB], f"Subject: load {tag}\r\n\r\nmessage {tag}\r\n".encode())
                    outcome = ("accepted", tag)
                except smtplib.SMTPRecipientsRefused as exc:
                    outcome = ("deferred", (tag, exc.recipients[BOB][0]))
                except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as exc:
                    outcome = ("deferred", (tag, exc.smtp_code))
                except smtplib.SMTPException as exc:
                    outcome = ("broken", f"{tag}: {exc!r}")
                with self.progress:
                    getattr(self, outcome[0]).append(outcome[1])
                    self.progress.notify_all()
                if outcome[0] == "deferred":
                    client.rset()
                if outcome[0] == "broken":
                    return

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def wait_for(self, done: int) -> None:
        with self.progress:
            self.progress.wait_for(lambda: len(self.accepted) + len(self.deferred) + len(self.broken) >= done, 120)

    def stop(self) -> None:
        self.stopped.set()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(120)


def delivered_tags(store) -> list[str]:
    account = store.directory.find_account(BOB)
    bodies = [store.maildrops.read_body(account.id, m.id) for m in store.maildrops.snapshot(account.id)]
    return [re.search(rb"Subject: load (\S+)", body).group(1).decode() for body in bodies]


def check(load: Load, store) -> None:
    assert load.broken == []  # every refusal was a reply, and every conversation went on
    assert all(400 <= code < 500 for _, code in load.deferred), load.deferred
    if not load.stopped.is_set():
        assert len(load.accepted) + len(load.deferred) == SENDERS * EACH
    tags = delivered_tags(store)
    assert sorted(tags) == sorted(load.accepted)  # all that got 250, each once, and nothing else


def test_backends_terminated_under_load(make_app, store, db_url):
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only (SQLite has no server to lose: see the locked-file test)")
    app = make_app(smtp={"listen": LOOPBACK, "submission": ()}, delivery={"workers": 1})
    killer = create_engine(db_url)
    load = Load(app.address("smtp"))
    load.start()
    cut = 0
    try:
        with killer.connect() as conn:
            for round_ in range(1, 6):  # five times, spread over the run, every other backend is cut off
                load.wait_for(round_ * SENDERS * EACH // 6)
                cut += conn.execute(text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                )).scalar()
                conn.commit()
    finally:
        load.join()
        killer.dispose()
    assert cut >= 5
    store.db.engine.dispose()  # (the test's own connections were cut too)
    check(load, store)
    with smtplib.SMTP(*app.address("smtp"), timeout=30) as client:  # and service is back, by itself
        assert client.sendmail("a@example.net", [BOB], b"Subject: load after\r\n\r\nx\r\n") == {}


def test_postgresql_restarted_under_load(make_app, store, db_url):
    """The PostgreSQL server itself is restarted (``pg_ctlcluster ... restart``: every
    connection cut, then a few seconds with nothing listening) while the senders go on:
    they are told 4xx meanwhile, nothing answered 250 is lost, and mailsrv carries on
    by itself once PostgreSQL is back."""
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    clusters = sorted(Path("/etc/postgresql").glob("*/main")) if Path("/etc/postgresql").is_dir() else []
    if not clusters or shutil.which("pg_ctlcluster") is None or os.geteuid() != 0:
        pytest.skip("needs the machine's own PostgreSQL cluster (pg_ctlcluster, as root), as on CI")
    version = clusters[-1].parent.name
    app = make_app(smtp={"listen": LOOPBACK, "submission": ()}, delivery={"workers": 1})
    load = Load(app.address("smtp"))
    load.start()
    try:
        load.wait_for(SENDERS * EACH // 4)
        restart = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
                                 capture_output=True, text=True, timeout=120)
        assert restart.returncode == 0, restart.stderr
    finally:
        load.join()
    store.db.engine.dispose()  # (the test's own connections were cut too)
    check(load, store)
    assert load.deferred, "no sender noticed the restart"
    print(f"accepted {len(load.accepted)}, deferred {len(load.deferred)}")
    assert len(load.accepted) > SENDERS * EACH // 4
    with smtplib.SMTP(*app.address("smtp"), timeout=30) as client:  # and service is back, by itself
        assert client.sendmail("a@example.net", [BOB], b"Subject: load after\r\n\r\nx\r\n") == {}


def test_sqlite_file_locked_by_another_process(make_app, store, db_url, short_lock_waits):
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite only")
    app = make_app(smtp={"listen": LOOPBACK, "submission": ()}, delivery={"workers": 1})
    load = Load(app.address("smtp"), until_stopped=True)  # (the blocker may wait a while for the lock)
    load.start()
    try:
        load.wait_for(SENDERS * EACH // 4)
        with DatabaseBlocker(db_url):  # another process holds the file's lock ...
            with load.progress:
                deferred, done = len(load.deferred), len(load.accepted) + len(load.deferred)
            load.wait_for(done + 2 * SENDERS)  # ... while the senders go on
            with load.progress:
                assert len(load.deferred) >= deferred + SENDERS  # they were told to come back later
                accepted_while_locked = len(load.accepted)
        load.wait_for(done + 2 * SENDERS + SENDERS * EACH // 4)
    finally:
        load.stop()
        load.join()
    check(load, store)
    assert len(load.accepted) >= accepted_while_locked + SENDERS  # once it let go, mail went through again
