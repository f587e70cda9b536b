"""store.leases on SQLite and PostgreSQL: the relay's claim of remote recipients, an ODMR
customer's claim of held ones, settlement only by the lease's holder, leases taken over
after expiry, and the leases of dead processes given back at start."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from sqlalchemy import text

from mailsrv.delivery.worker import Worker
from mailsrv.store import Action, Outcome, State, lock_holder

from .conftest import make_config

ANN = "ann@example.org"
RELAY, OTHER = lock_holder("relay"), "elsewhere.example:1234:relay"


def rows(database) -> list[tuple[str, str, str | None]]:
    with database.read_core() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT recipient, state, lease_owner FROM queue_recipients ORDER BY id"))]


def expire_leases(database) -> None:
    with database.write_core() as conn:
        conn.execute(text("UPDATE queue_recipients SET lease_expires_at = :t WHERE state = 'inflight'"), {"t": "2000-01-01 00:00:00"})


def no_copy(outcome, body):  # settlement of remote recipients writes no mailbox copy
    raise AssertionError("a remote recipient has no mailbox")


def bounce_text(claimed, failed, body) -> bytes:
    return b"Subject: bounce\r\n\r\n" + ", ".join(o.claimed.recipient for o in failed).encode() + b"\r\n"


@pytest.fixture
def mixed(store, accounts):
    """One message to a local, a remote and an ODMR recipient; another to a second remote."""
    store.directory.add_domain("customer.example", "odmr")
    store.directory.add_domain("other.example", "odmr")
    first = store.queue.enqueue(ANN, b"Subject: one\r\n\r\nbody\r\n", ["bob@example.org", "x@remote.example", "c@customer.example"], "mpp")
    second = store.queue.enqueue(ANN, b"Subject: two\r\n\r\nbody\r\n", ["y@far.example"], "mpp")
    return first, second


def test_claim_remote_takes_only_other_domains_once(store, database, mixed):
    claimed = store.leases.claim_remote(RELAY, 600)
    assert sorted(c.recipient for c in claimed) == ["x@remote.example", "y@far.example"]
    assert {c.queue_id for c in claimed} == set(mixed)
    assert all(c.sender == ANN and c.origin == "mpp" for c in claimed)
    assert store.leases.claim_remote(OTHER, 600) == []  # leased: nobody else gets them
    assert [r for r in rows(database) if r[1] == State.INFLIGHT] == [
        ("x@remote.example", "inflight", RELAY), ("y@far.example", "inflight", RELAY),
    ]
    assert store.leases.claim_remote(RELAY, 600, limit=1) == []


def test_settle_applies_each_outcome_and_bounces_once_per_message(store, database, mixed):
    claimed = {c.recipient: c for c in store.leases.claim_remote(RELAY, 600)}
    applied = store.leases.settle(RELAY, [
        Outcome(claimed["x@remote.example"], Action.RETRY, delay=300, status="4.4.1", error="connection refused"),
        Outcome(claimed["y@far.example"], Action.FAIL, status="5.1.1", error="user unknown"),
    ], no_copy, bounce_text)
    assert len(applied) == 2
    with database.read_core() as conn:
        retry = conn.execute(text(
            "SELECT state, attempts, last_error, next_attempt_at > updated_at FROM queue_recipients"
            " WHERE recipient = 'x@remote.example'")).one()
        bounce = conn.execute(text("SELECT q.sender, q.origin, r.recipient FROM queue q JOIN queue_recipients r"
                                   " ON r.queue_id = q.id WHERE q.origin = 'bounce'")).all()
        second_body = conn.execute(text("SELECT body FROM queue WHERE id = :q"), {"q": mixed[1]}).scalar()
    assert tuple(retry) == ("queued", 1, "connection refused", True)
    assert [tuple(b) for b in bounce] == [("", "bounce", ANN)]
    assert bytes(second_body) == b"Subject: two\r\n\r\n"  # every recipient done: the header is kept
    assert store.leases.claim_remote(RELAY, 600) == []  # the retry is not due yet


def test_sent_marks_delivered(store, database, mixed):
    claimed = store.leases.claim_remote(RELAY, 600)
    assert len(store.leases.settle(RELAY, [Outcome(c, Action.SENT) for c in claimed], no_copy, bounce_text)) == 2
    assert ("x@remote.example", "delivered", None) in rows(database)
    assert ("y@far.example", "delivered", None) in rows(database)


def test_expired_lease_is_taken_over_and_the_old_holders_settlement_changes_nothing(store, database, mixed):
    old = store.leases.claim_remote(OTHER, 600)
    assert len(old) == 2
    assert store.leases.claim_remote(RELAY, 600) == []
    expire_leases(database)
    new = store.leases.claim_remote(RELAY, 600)
    assert sorted(c.id for c in new) == sorted(c.id for c in old)
    before = rows(database)
    late = [Outcome(c, Action.FAIL, status="5.0.0", error="late") for c in old]
    assert store.leases.settle(OTHER, late, no_copy, bounce_text) == []
    assert rows(database) == before  # still the new holder's, and no bounce was queued
    assert len(store.leases.settle(RELAY, [Outcome(c, Action.SENT) for c in new], no_copy, bounce_text)) == 2


def test_dead_process_lease_is_taken_back_at_once(store, database, mixed, worker_on):
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    dead = lock_holder().split(":")[0] + f":{dead_pid}:relay"
    worker_on(store).run_once()  # bob delivered, c@customer.example held
    assert len(store.leases.claim_remote(dead, 3600)) == 2
    assert len(store.leases.claim_held(dead, ["customer.example"], 3600)) == 1
    assert store.leases.claim_remote(RELAY, 3600) == []  # leased for an hour
    assert store.leases.reclaim_dead_leases() == 3
    states = {r[0]: r[1] for r in rows(database)}
    assert states == {"bob@example.org": "delivered", "x@remote.example": "queued", "c@customer.example": "held",
                      "y@far.example": "queued"}
    assert len(store.leases.claim_remote(RELAY, 3600)) == 2


def test_other_hosts_leases_are_not_taken_back_until_they_expire(store, database, mixed):
    assert len(store.leases.claim_remote(OTHER, 3600)) == 2
    assert store.leases.reclaim_dead_leases() == 0
    assert store.leases.claim_remote(RELAY, 3600) == []


@pytest.fixture
def worker_on(db_url, tmp_path):
    return lambda store: Worker(store, make_config(db_url, tmp_path), "t1")


def test_claim_held_takes_the_named_odmr_domains_only(store, database, accounts, worker_on):
    store.directory.add_domain("customer.example", "odmr")
    store.directory.add_domain("other.example", "odmr")
    ids = [store.queue.enqueue(ANN, f"Subject: {i}\r\n\r\nx\r\n".encode(), [f"u{i}@customer.example", "v@other.example"], "mpp")
           for i in range(3)]
    store.queue.enqueue(ANN, b"x\r\n", ["bob@example.org", "z@remote.example"], "mpp")
    worker_on(store).run_once()
    assert store.leases.claim_held(RELAY, ["remote.example", "example.org"], 600) == []  # not ODMR domains
    claimed = store.leases.claim_held(RELAY, ["Customer.Example"], 600)
    assert [(c.queue_id, c.recipient) for c in claimed] == [(q, f"u{i}@customer.example") for i, q in enumerate(ids)]
    assert store.leases.claim_held(OTHER, ["customer.example"], 600) == []  # taken
    # the customer took the first, deferred the second, refused the third
    outcomes = [Outcome(claimed[0], Action.SENT), Outcome(claimed[1], Action.HOLD),
                Outcome(claimed[2], Action.FAIL, status="5.1.1", error="no such user")]
    assert len(store.leases.settle(RELAY, outcomes, no_copy, bounce_text)) == 3
    states = [r[1] for r in rows(database) if r[0].endswith("@customer.example")]
    assert states == ["delivered", "held", "failed"]
    again = store.leases.claim_held(OTHER, ["customer.example", "other.example"], 600)
    assert sorted(c.recipient for c in again) == ["u1@customer.example"] + ["v@other.example"] * 3


def test_concurrent_claims_never_share_a_recipient(store, database, accounts):
    """Four claimers at once (on PostgreSQL, FOR UPDATE SKIP LOCKED; on SQLite, the write
    lock): every recipient is leased to exactly one."""
    for i in range(40):
        store.queue.enqueue(ANN, b"x\r\n", [f"r{i}@remote{i % 5}.example"], "mpp")
    barrier = threading.Barrier(4)
    got: dict[int, list[int]] = {}

    def claim(n: int) -> None:
        barrier.wait()
        mine: list[int] = []
        while batch := store.leases.claim_remote(f"{RELAY}{n}", 600, limit=3):
            mine += [c.id for c in batch]
        got[n] = mine

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [rid for ids in got.values() for rid in ids]
    assert len(every) == len(set(every)) == 40


def test_a_holder_renews_only_its_own_leases(store, database, mixed):
    claimed = store.leases.claim_remote(RELAY, 600)
    with database.read_core() as conn:
        before = conn.execute(text("SELECT lease_expires_at FROM queue_recipients WHERE state = 'inflight'")).scalars().all()
    assert store.leases.renew(OTHER, claimed, 3600) == 0  # not OTHER's
    assert store.leases.renew(RELAY, claimed, 3600) == 2
    with database.read_core() as conn:
        after = conn.execute(text("SELECT lease_expires_at FROM queue_recipients WHERE state = 'inflight'")).scalars().all()
    assert all(str(a) > str(b) for a, b in zip(after, before, strict=True))
