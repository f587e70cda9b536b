"""Two `mailsrv serve` processes on one PostgreSQL database, on ports of their own, as two
hosts of one office would be: the maildrop lock holds across them, and when one is killed
with SIGKILL in the middle of a delivery, the other takes its leases over once they
expire and delivers everything (only the message whose reply the kill cut off may go
twice). ODMR turning one domain on one host while the other answers 450 is in
tests/test_odmr.py; queue work shared by two processes with no recipient delivered twice
in tests/test_delivery.py."""

from __future__ import annotations

import signal

import pytest
from sqlalchemy import text

from mailsrv.db import Database
from mailsrv.protocols.pop3 import Pop3Handler
from mailsrv.store import Store

from .conftest import PASSWORD
from .test_app import Served, mailsrv, shipped_config_on_ephemeral_ports
from .test_operations import pop3_login
from .test_relay import Stalling, smarthost  # noqa: F401  (fixture)

ANN = "ann@example.org"
LEASE = 3  # seconds: short, so the takeover comes soon


@pytest.fixture
def two_hosts(tmp_path, db_url, smarthost):  # noqa: F811
    if not db_url.startswith("postgresql"):
        pytest.skip("several hosts share a PostgreSQL database")
    script, sink = smarthost(Stalling())
    confs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        conf = shipped_config_on_ephemeral_ports(tmp_path / name, database=db_url)
        conf.write_text(conf.read_text().replace("relayhost =\n", f"relayhost = 127.0.0.1:{sink.port}\n")
                        .replace("relay_tls = may", "relay_tls = none").replace("workers = 2", "workers = 1")
                        .replace("lease = 5m", f"lease = {LEASE}s"))
        confs.append(conf)
    assert mailsrv(confs[0], "domain", "add", "example.org").returncode == 0
    assert mailsrv(confs[0], "user", "add", ANN, "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    database = Database(db_url)
    started: list[Served] = []

    def start(n: int, drain: bool = True) -> Served:
        served = Served(confs[n])
        if drain:
            served.drain()
        started.append(served)
        return served

    yield start, script, Store(database)
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()
    database.dispose()


def test_the_maildrop_lock_holds_across_hosts(two_hosts):
    start, _, _ = two_hosts
    a, b = start(0), start(1)
    first, reply = pop3_login(a.addresses["pop3"], PASSWORD)
    assert reply.startswith("+OK")
    second, reply = pop3_login(b.addresses["pop3"], PASSWORD)
    assert reply == Pop3Handler.REPLY_IN_USE  # held on the other host
    second.close()
    assert first.ask("QUIT").startswith("+OK")
    first.close()
    for _ in range(100):  # (until host a has committed its QUIT; each look is a login)
        third, reply = pop3_login(b.addresses["pop3"], PASSWORD)
        third.close()
        if reply != Pop3Handler.REPLY_IN_USE:
            break
    assert reply.startswith("+OK")
    for served in (a, b):
        assert served.stop(signal.SIGTERM) == 0


def test_a_killed_host_leaves_its_leases_to_the_other(two_hosts):
    start, script, store = two_hosts
    a = start(0)
    for i in range(5):
        store.queue.enqueue(ANN, f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode(), [f"x{i}@remote.example"], "mpp")
    assert script.stalled.wait(60)  # host a is in the middle of a delivery ...
    b = start(1, drain=False)  # (host b runs already when a dies; its log is read below)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    script.release.set()
    subjects = lambda: [c.split(b"Subject: ")[1].split(b"\r\n")[0] for _, _, c in script.received]  # noqa: E731
    with script.taken:  # ... and b delivers everything once a's leases have run out
        assert script.taken.wait_for(lambda: set(subjects()) == {b"m%d" % i for i in range(5)}, 60)
    settled: set[str] = set()
    for line in b.proc.stderr:  # until host b has settled all five
        if " sent (" in line:
            settled.add(line.split("<")[1].split(">")[0])
        if len(settled) == 5:
            break
    with store.db.read_core() as conn:
        states = conn.execute(text("SELECT state FROM queue_recipients")).scalars().all()
    assert states == ["delivered"] * 5
    counts = sorted(subjects().count(s) for s in set(subjects()))
    assert counts in ([1, 1, 1, 1, 1], [1, 1, 1, 1, 2])  # only the one cut off may come twice
    assert b.stop(signal.SIGTERM) == 0
