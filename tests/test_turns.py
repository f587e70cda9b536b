"""Transactions at once (``[server] database_transactions``): at most that many run, the
others wait their turn first come first served, and the connections stay open."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import event

from mailsrv import db as dbmod
from mailsrv import migrate
from mailsrv.db import DatabaseUnavailable, _Turns


def test_turns_are_handed_on_in_the_order_asked():
    turns = _Turns(1)
    assert turns.acquire(1)
    order = []

    def wait(n: int) -> None:
        assert turns.acquire(10)
        order.append(n)
        turns.release()

    threads = []
    for n in range(5):  # each in the queue before the next one asks
        thread = threading.Thread(target=wait, args=(n,))
        thread.start()
        threads.append(thread)
        while len(turns._waiting) < n + 1:
            threading.Event().wait(0.001)
    turns.release()
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4]


def test_a_turn_asked_inside_one_is_given_at_once_and_a_wait_can_end():
    turns = _Turns(1)
    assert turns.acquire(1)
    assert turns.acquire(0)  # the same thread again: nested, not a second turn
    turns.release()
    got = []
    other = threading.Thread(target=lambda: got.append(turns.acquire(0.05)))
    other.start()
    other.join()
    assert got == [False]  # still held by the outer one, and the waiter gave up
    assert not turns._waiting
    turns.release()
    assert turns.acquire(0)  # free again
    turns.release()


@pytest.fixture
def two_at_once(db_url):
    database = dbmod.Database(db_url, transactions=2)
    migrate.upgrade(database)
    yield database
    database.dispose()


def test_no_more_transactions_run_than_allowed_and_no_connection_is_reopened(two_at_once):
    database = two_at_once
    opened = []
    event.listen(database.engine, "connect", lambda *a: opened.append(1))
    inside, leave = threading.Semaphore(0), threading.Event()
    running, most = [0], [0]
    lock = threading.Lock()

    def transaction() -> None:
        with database.read_raw():
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            inside.release()
            leave.wait(10)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=transaction) for _ in range(6)]
    for thread in threads:
        thread.start()
    inside.acquire()
    inside.acquire()  # two are in, and stay until told; the others wait for a turn
    leave.set()
    for thread in threads:
        thread.join()
    assert most[0] == 2
    for _ in range(20):  # then one after another, on the connections kept
        with database.read_raw():
            pass
    assert len(opened) <= 2


def test_a_transaction_that_waits_too_long_for_its_turn_is_unavailable(two_at_once, monkeypatch):
    database = two_at_once
    monkeypatch.setattr(dbmod, "TURN_TIMEOUT_SECONDS", 0.05)
    held, leave = threading.Semaphore(0), threading.Event()

    def hold() -> None:
        with database.read_raw():
            held.release()
            leave.wait(10)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    held.acquire()
    held.acquire()
    try:
        with pytest.raises(DatabaseUnavailable, match="waiting for the database"), database.read_raw():
            pass
    finally:
        leave.set()
        for thread in holders:
            thread.join()
    with database.read_raw():  # and the turns are there again
        pass
