"""The original POP (RFC 918) transcripts, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

import pytest

from mailsrv.message import mbox_entry
from mailsrv.protocols.pop import PopHandler

from .conftest import PASSWORD, deliver, wait_unlocked

ANN = "ann@example.org"
BODIES = [b"Subject: one\r\n\r\nFrom the start\r\nbody\r\n", b"From: x@example.net\r\n\r\n.\r\nFrom here\r\n"]


@pytest.fixture
def pop(app, client_factory):
    def connect(login: bool = True):
        c = client_factory(app.address("pop"))
        assert c.line() == "+OK mailsrv POP server ready"
        if login:
            assert c.ask(f"USER {ANN}") == "+OK"
            assert c.ask(f"PASS {PASSWORD}") == "+OK"
        return c

    return connect


def expected_mbox(store) -> bytes:
    account = store.directory.find_account(ANN)
    found = store.maildrops.read_messages(account.id, [m.id for m in store.maildrops.snapshot(account.id)])
    return b"".join(mbox_entry(*found[i]) for i in sorted(found))


def test_mbox_entry_quotes_from_lines():
    entry = mbox_entry("a@b", datetime(2026, 1, 2, 3, 4, 5), b"From me\r\nx\r\nFrom you\r\n")
    assert entry == b"From a@b Fri Jan 02 03:04:05 2026\r\n>From me\r\nx\r\n>From you\r\n\r\n"


def test_rdel_rcev_rcvd_deletes_exactly_what_was_sent(pop, store):
    for body in BODIES:
        deliver(store, ANN, body)
    expected = expected_mbox(store)
    c = pop()
    assert c.ask("RDEL") == f"#{len(expected)}"
    deliver(store, ANN, b"Subject: late\r\n\r\narrived after RDEL\r\n")  # must survive
    c.send("RCEV")
    data = c.file.read(len(expected))
    assert data == expected
    assert b">From the start" in data and b">From here" in data
    assert c.ask("RCVD") == "+OK"  # the very next line: RCEV sent nothing more
    remaining = store.maildrops.snapshot(store.directory.find_account(ANN).id)
    assert len(remaining) == 1 and store.maildrops.read_body(store.directory.find_account(ANN).id, remaining[0].id).endswith(b"arrived after RDEL\r\n")
    assert c.ask("QUIT") == "+OK"
    assert c.closed()


def test_retr_marks_seen_and_keeps_messages(pop, store):
    for body in BODIES:
        deliver(store, ANN, body)
    c = pop()
    expected = expected_mbox(store)
    assert c.ask(f"RETR {ANN}") == f"#{len(expected)}"
    c.send("RCEV")
    assert c.file.read(len(expected)) == expected
    assert c.ask("RCVD") == "+OK"
    snapshot = store.maildrops.snapshot(store.directory.find_account(ANN).id)
    assert len(snapshot) == 2 and all(m.seen for m in snapshot)


def test_empty_mailbox_is_zero_octets(pop):
    c = pop()
    assert c.ask("RETR ann") == "#0"
    c.send("RCEV")  # zero octets follow, so the next line is RCVD's reply
    assert c.ask("RCVD") == "+OK"


def test_drop_before_rcvd_deletes_nothing(pop, store):
    deliver(store, ANN, BODIES[0])
    c = pop()
    size = int(c.ask("RDEL")[1:])
    c.send("RCEV")
    c.file.read(size)
    c.close()
    wait_unlocked(store)  # until the server has seen the drop
    again = pop()  # the lock is free again
    assert again.ask("RDEL") == f"#{size}"
    assert len(store.maildrops.snapshot(store.directory.find_account(ANN).id)) == 1


def test_rset_aborts_and_unlocks(pop, store):
    deliver(store, ANN, BODIES[0])
    c = pop()
    c.ask("RDEL")
    other = pop()
    assert other.ask("RDEL") == PopHandler.REPLY_LOCKED  # locked, also against POP3
    assert c.ask("RSET") == "+OK"
    assert other.ask("RDEL").startswith("#")
    assert c.ask("RCVD") == PopHandler.REPLY_WRONG_STATE


def test_someone_elses_mailbox_is_refused(pop):
    c = pop()
    assert c.ask("RETR bob@example.org") == PopHandler.REPLY_NOT_YOURS
    assert c.ask("RDEL bob") == PopHandler.REPLY_NOT_YOURS
    assert c.ask("RETR ann").startswith("#")


@pytest.mark.parametrize("command", ["RETR", "RDEL", "RCEV", "RCVD", f"PASS {PASSWORD}"])
def test_out_of_order_before_login(pop, command):
    c = pop(login=False)
    assert c.ask(command) == PopHandler.REPLY_WRONG_STATE


def test_out_of_order_after_login(pop):
    c = pop()
    for command in ("RCEV", "RCVD", f"USER {ANN}", "PASS x"):
        assert c.ask(command) == PopHandler.REPLY_WRONG_STATE, command
    c.ask("RETR")
    for command in ("RCVD", "RETR", "RDEL"):
        assert c.ask(command) == PopHandler.REPLY_WRONG_STATE, command
    assert c.ask("NOOP") == "+OK"


def test_user_always_ok_and_wrong_password_err(pop):
    c = pop(login=False)
    assert c.ask("USER nobody@example.org") == "+OK"
    assert c.ask("PASS whatever") == "-ERR invalid user name or password"
    assert c.ask(f"USER {ANN}") == "+OK"
    assert c.ask("PASS wrong") == "-ERR invalid user name or password"


def test_stored_dot_offsets_match_the_body(store, accounts):
    from mailsrv.message import dot_line_offsets, dot_stuff, dot_stuff_parts

    body = b".first\r\nplain\r\n..second\r\n.\r\nend"
    message_id = deliver(store, ANN, body)
    ((stored, offsets),) = store.maildrops.read_bodies(store.directory.find_account(ANN).id, [message_id]).values()
    assert [int(o) for o in offsets.split()] == dot_line_offsets(stored) == [0, 15, 25]
    assert b"".join(dot_stuff_parts(stored, offsets)) == dot_stuff(stored) == b"..first\r\nplain\r\n...second\r\n..\r\nend\r\n.\r\n"
