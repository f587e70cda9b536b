"""The delivery queue on SQLite and PostgreSQL: local delivery exactly once (threads, processes,
crashes), aliases, ODMR hold, remote left queued, quota, RFC 3464 bounces, leases."""

from __future__ import annotations

import email
import poplib
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from sqlalchemy import text

from mailsrv.db import DatabaseUnavailable
from mailsrv.delivery.worker import DeliveryPool, Worker

from .conftest import PASSWORD, DatabaseBlocker, make_config
from .test_app import Served, mailsrv, shipped_config_on_ephemeral_ports

ANN, BOB = "ann@example.org", "bob@example.org"


@pytest.fixture
def worker(store, accounts, db_url, tmp_path):
    return Worker(store, make_config(db_url, tmp_path), "t1")


def drain(worker: Worker) -> int:
    total = 0
    while (handled := worker.run_once()):
        total += handled
    return total


def states(database) -> list[tuple[str, str]]:
    with database.read() as s:
        return [tuple(r) for r in s.execute(text("SELECT recipient, state FROM queue_recipients ORDER BY id"))]


def queue_bodies(database) -> list[tuple[bytes, int]]:
    with database.read() as s:
        return [(bytes(r[0]), r[1]) for r in s.execute(text("SELECT body, size FROM queue ORDER BY id"))]


def mailbox(store, address) -> list[bytes]:
    account = store.directory.find_account(address)
    return [store.maildrops.read_body(account.id, m.id) for m in store.maildrops.snapshot(account.id)]


def test_local_recipients_are_delivered_with_trace_fields(worker, store, database):
    store.queue.enqueue(ANN, b"Subject: hi\r\n\r\nhello\r\n", [BOB, ANN], "mpp")
    assert drain(worker) == 2
    assert states(database) == [(BOB, "delivered"), (ANN, "delivered")]
    (copy,) = mailbox(store, BOB)
    assert copy == f"Return-Path: <{ANN}>\r\nDelivered-To: {BOB}\r\n".encode() + b"Subject: hi\r\n\r\nhello\r\n"
    assert store.maildrops.snapshot(store.directory.find_account(BOB).id)[0].size == len(copy)
    assert queue_bodies(database) == [(b"Subject: hi\r\n\r\n", 22)]  # done with: the header is kept


def test_odmr_is_held_and_remote_is_left_queued(worker, store, database):
    store.directory.add_domain("customer.example", "odmr")
    store.queue.enqueue(ANN, b"x\r\n", ["x@customer.example", "y@remote.example"], "mpp")
    drain(worker)
    assert states(database) == [("x@customer.example", "held"), ("y@remote.example", "queued")]
    assert drain(worker) == 0  # nothing left to do, no busy loop on the remote one


def test_aliases_local_and_remote(worker, store, database):
    store.directory.add_alias("sales@example.org", BOB)
    store.directory.add_alias("fwd@example.org", "partner@remote.example")
    qid = store.queue.enqueue(ANN, b"x\r\n", ["sales@example.org", "fwd@example.org"], "mpp")
    drain(worker)
    assert len(mailbox(store, BOB)) == 1
    with database.read() as s:
        rows = [tuple(r) for r in s.execute(text("SELECT r.recipient, r.state, q.sender FROM queue_recipients r JOIN queue q ON q.id = r.queue_id WHERE r.queue_id = :q ORDER BY r.id"), {"q": qid})]
    assert rows == [
        ("sales@example.org", "delivered", ANN),
        ("fwd@example.org", "delivered", ANN),
        ("partner@remote.example", "queued", ANN),  # for the relay, envelope sender kept
    ]


def test_alias_loop_fails(worker, store, database):
    store.directory.add_alias("a@example.org", "b@example.org")
    store.directory.add_alias("b@example.org", "a@example.org")
    store.queue.enqueue(ANN, b"Subject: loop\r\n\r\nx\r\n", ["a@example.org"], "mpp")
    drain(worker)
    assert states(database)[0] == ("a@example.org", "failed")


def test_unknown_local_recipient_bounces_rfc3464(worker, store, database):
    store.queue.enqueue(ANN, b"Subject: to nobody\r\nMessage-ID: <m1@x>\r\n\r\nx\r\n", ["nobody@example.org", "ghost@example.org", BOB], "mpp")
    drain(worker)
    bounces = mailbox(store, ANN)
    assert len(bounces) == 1  # one bounce per message
    report = email.message_from_bytes(bounces[0])
    assert report["From"].endswith("<MAILER-DAEMON@mail.example.org>")
    assert report["Return-Path"] == "<>"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = report.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    groups = parts[1].get_payload()
    assert groups[0]["Reporting-MTA"] == "dns; mail.example.org"
    assert [(g["Final-Recipient"], g["Action"], g["Status"]) for g in groups[1:]] == [
        ("rfc822; nobody@example.org", "failed", "5.1.1"),
        ("rfc822; ghost@example.org", "failed", "5.1.1"),
    ]
    assert "Message-ID: <m1@x>" in parts[2].get_payload()
    with database.read() as s:
        assert s.execute(text("SELECT sender, origin FROM queue WHERE origin = 'bounce'")).one() == ("", "bounce")
    assert len(mailbox(store, BOB)) == 1


def test_no_bounce_for_empty_sender(worker, store, database):
    store.queue.enqueue("", b"x\r\n", ["nobody@example.org"], "smtp")
    drain(worker)
    assert states(database) == [("nobody@example.org", "failed")]
    with database.read() as s:
        assert s.execute(text("SELECT count(*) FROM queue")).scalar() == 1


def test_quota(store, database, db_url, tmp_path, accounts):
    from mailsrv.auth import hash_password

    store.directory.add_account("tiny@example.org", hash_password("pw", 4), quota_bytes=1000)
    worker = Worker(store, make_config(db_url, tmp_path), "q1")
    store.queue.enqueue(ANN, b"x" * 2000 + b"\r\n", ["tiny@example.org"], "mpp")  # can never fit
    store.queue.enqueue(ANN, b"y" * 500 + b"\r\n", ["tiny@example.org"], "mpp")  # fits
    store.queue.enqueue(ANN, b"z" * 500 + b"\r\n", ["tiny@example.org"], "mpp")  # box full now: retry later
    drain(worker)

    def tiny_rows():
        with database.read() as s:
            return [tuple(r) for r in s.execute(text("SELECT state, attempts FROM queue_recipients WHERE recipient = 'tiny@example.org' ORDER BY id"))]

    assert tiny_rows() == [("failed", 1), ("delivered", 0), ("queued", 1)]
    assert len(mailbox(store, ANN)) == 1  # the bounce for the one that can never fit
    # with a queue lifetime already over, the full-box message fails for good
    short = Worker(store, make_config(db_url, tmp_path, delivery={"queue_lifetime": 0.0, "workers": 1}), "q2")
    store.queue_admin.flush()  # due now
    drain(short)
    assert tiny_rows()[-1] == ("failed", 2)
    assert len(mailbox(store, ANN)) == 2


def posted_pool(store, db_url, tmp_path) -> DeliveryPool:
    """A pool whose threads are not started: what a session's post does, on its own."""
    return DeliveryPool(store, make_config(db_url, tmp_path, delivery={"workers": 1}))


def woken(pool: DeliveryPool) -> bool:
    return pool._wake.acquire(blocking=False)


def test_post_delivers_local_mailboxes_in_the_queuing_transaction(worker, store, database, db_url, tmp_path):
    store.directory.add_alias("sales@example.org", BOB)
    store.directory.add_alias("fwd@example.org", "partner@remote.example")
    pool = posted_pool(store, db_url, tmp_path)
    body = b"Subject: at once\r\n\r\nhello\r\n"
    recipients = [BOB, "sales@example.org", "fwd@example.org", "nobody@example.org", "y@remote.example"]
    pool.post(ANN, body, recipients, "mpp")
    # readable as soon as post() returns, before any worker ran: the account and the
    # alias of an account, each with its own Delivered-To
    assert mailbox(store, BOB) == [
        f"Return-Path: <{ANN}>\r\nDelivered-To: {to}\r\n".encode() + body for to in (BOB, "sales@example.org")
    ]
    assert states(database) == [
        (BOB, "delivered"), ("sales@example.org", "delivered"), ("fwd@example.org", "queued"),
        ("nobody@example.org", "queued"), ("y@remote.example", "queued"),
    ]
    assert woken(pool)  # the rest is the workers' job
    drain(worker)
    assert states(database) == [
        (BOB, "delivered"), ("sales@example.org", "delivered"), ("fwd@example.org", "delivered"),
        ("nobody@example.org", "failed"), ("y@remote.example", "queued"), ("partner@remote.example", "queued"),
        (ANN, "delivered"),  # the bounce
    ]
    assert len(mailbox(store, BOB)) == 2  # never again by a worker
    assert len(mailbox(store, ANN)) == 1  # the bounce for nobody@, from the worker

    pool.post(ANN, body, [ANN], "mpp")
    assert not woken(pool)  # all delivered: no worker needed
    assert drain(worker) == 0
    # the queue keeps a body while a recipient needs it: the first message (y@remote and
    # partner@remote still queued) whole; the last (done at once) and the bounce (done
    # by the worker) only their header
    assert [(b == body, size) for b, size in queue_bodies(database) if b.endswith(b"hello\r\n")] == [(True, len(body))]
    assert queue_bodies(database)[-1] == (b"Subject: at once\r\n\r\n", len(body))
    bounce_header, bounce_size = queue_bodies(database)[1]
    assert bounce_header.endswith(b"\r\n\r\n") and b"MAILER-DAEMON" in bounce_header
    assert bounce_size > len(bounce_header)


def test_post_keeps_the_quota_and_leaves_the_rest_to_the_workers(worker, store, database, db_url, tmp_path):
    from mailsrv.auth import hash_password

    store.directory.add_account("tiny@example.org", hash_password("pw", 4), quota_bytes=1000)
    pool = posted_pool(store, db_url, tmp_path)
    pool.post(ANN, b"x" * 2000 + b"\r\n", ["tiny@example.org"], "mpp")  # can never fit
    pool.post(ANN, b"y" * 500 + b"\r\n", ["tiny@example.org"], "mpp")  # fits
    pool.post(ANN, b"z" * 500 + b"\r\n", ["tiny@example.org"], "mpp")  # box full now
    assert [s for _, s in states(database)] == ["queued", "delivered", "queued"]
    drain(worker)
    assert [s for _, s in states(database) if _ == "tiny@example.org"] == ["failed", "delivered", "queued"]
    assert len(mailbox(store, "tiny@example.org")) == 1


def test_post_with_the_database_locked_writes_nothing(short_lock_waits, store, accounts, database, db_url, tmp_path):
    pool = posted_pool(store, db_url, tmp_path)
    with DatabaseBlocker(db_url):
        with pytest.raises(DatabaseUnavailable):
            pool.post(ANN, b"x\r\n", [BOB], "mpp")
    assert states(database) == []
    assert mailbox(store, BOB) == []
    pool.post(ANN, b"x\r\n", [BOB], "mpp")  # and the next one goes through
    assert len(mailbox(store, BOB)) == 1


def test_exactly_once_with_four_worker_threads(store, database, db_url, tmp_path, accounts):
    config = make_config(db_url, tmp_path)
    for i in range(120):
        store.queue.enqueue(ANN, f"Subject: {i}\r\n\r\nbody {i}\r\n".encode(), [BOB, ANN], "mpp")
    workers = [Worker(store, config, f"t{i}") for i in range(4)]
    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for address in (ANN, BOB):
        subjects = sorted(b.split(b"Subject: ")[1].split(b"\r\n")[0] for b in mailbox(store, address))
        assert subjects == sorted(str(i).encode() for i in range(120))


WORKER_PROCESS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from mailsrv.db import Database
    from mailsrv.store import Store
    from mailsrv.delivery.worker import Worker
    from tests.conftest import make_config
    store = Store(Database(sys.argv[1]))
    worker = Worker(store, make_config(sys.argv[1], Path(sys.argv[3])), "p")
    print("ready", flush=True)
    sys.stdin.readline()
    while worker.run_once():
        pass
    """
)


def test_exactly_once_with_two_worker_processes(store, database, db_url, tmp_path, accounts):
    import os

    for i in range(150):
        store.queue.enqueue(ANN, f"Subject: {i}\r\n\r\nbody\r\n".encode(), [BOB], "mpp")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER_PROCESS, db_url, root, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:  # both start together
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    subjects = sorted(int(b.split(b"Subject: ")[1].split(b"\r\n")[0]) for b in mailbox(store, BOB))
    assert subjects == list(range(150))


def test_pool_wakes_at_once_on_mpp_post_and_pop3_reads_it_back(make_app, client_factory, store):
    app = make_app(delivery={"workers": 2})
    posted = b"From: ann@example.org\r\nTo: bob@example.org\r\nSubject: round trip\r\nMessage-ID: <rt@x>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nline one\r\n.dot line\r\n\r\nlast line\r\n"
    c = client_factory(app.address("mpp"))
    c.line()
    c.ask(f"USER {ANN}")
    c.ask(f"PASS {PASSWORD}")
    c.ask("DATA")
    c.send(posted.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    assert c.line().startswith("250")
    bob = store.directory.find_account(BOB).id
    assert app.delivery.wait_until(lambda: store.maildrops.snapshot(bob), timeout=30)
    client = poplib.POP3(*app.address("pop3"), timeout=30)
    client.user(BOB)
    client.pass_(PASSWORD)
    _, lines, _ = client.retr(1)
    client.quit()
    got = b"\r\n".join(lines) + b"\r\n"
    # byte for byte, apart from the fields mailsrv added in front
    assert got.endswith(posted)
    added = got[: -len(posted)]
    assert added.startswith(b"Return-Path: <ann@example.org>\r\nDelivered-To: bob@example.org\r\nReceived: from [127.0.0.1]")


@pytest.mark.parametrize("workers_before_kill", [0, 1])
def test_accepted_then_sigkill_is_delivered_exactly_once(tmp_path, workers_before_kill, db_url):
    conf = shipped_config_on_ephemeral_ports(tmp_path, database=db_url)
    conf.write_text(conf.read_text().replace("workers = 2", f"workers = {workers_before_kill}"))
    for args, stdin in ((("domain", "add", "example.org"), None), (("user", "add", ANN, "--password-stdin"), PASSWORD + "\n"), (("user", "add", BOB, "--password-stdin"), PASSWORD + "\n")):
        assert mailsrv(conf, *args, stdin=stdin).returncode == 0
    server = Served(conf)
    from .conftest import LineClient

    c = LineClient(server.addresses["mpp"])
    c.line()
    c.ask(f"USER {ANN}")
    c.ask(f"PASS {PASSWORD}")
    c.ask("DATA")
    c.send(b"To: bob@example.org\r\nSubject: survive\r\n\r\nkept\r\n.\r\n")
    assert c.line().startswith("250")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    c.close()
    conf.write_text(conf.read_text().replace(f"workers = {workers_before_kill}", "workers = 0"))
    again = Served(conf)  # restart; takes back dead leases; delivery below, in this test
    try:
        from mailsrv.db import Database
        from mailsrv.store import Store

        database = Database(db_url)
        store = Store(database)
        worker = Worker(store, make_config(db_url, tmp_path), "after")
        drain(worker)
        client = poplib.POP3(*again.addresses["pop3"], timeout=30)
        client.user(BOB)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        _, lines, _ = client.retr(1)
        client.quit()
        assert count == 1
        assert b"Subject: survive" in lines
        database.dispose()
    finally:
        assert again.stop(signal.SIGTERM) == 0
