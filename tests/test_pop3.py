"""POP3 transcripts (RFC 1081, RFC 1939, RFC 2449, RFC 5034, RFC 2595) on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import poplib
import re
import ssl

import pytest

from mailsrv.auth import apop_digest, cram_md5_digest
from mailsrv.protocols.pop3 import Pop3Handler

from .conftest import PASSWORD, deliver, wait_unlocked
from .test_server import certificate  # noqa: F401  (fixture)

ANN = "ann@example.org"
MSG1 = b"Subject: one\r\n\r\nfirst\r\n"
MSG2 = b"Subject: two\r\nX: y\r\n\r\nline 1\r\n.line 2 starts with a dot\r\n.\r\nline 4\r\n"


@pytest.fixture
def pop3(app, client_factory):
    """Connect to the running POP3 server; returns a LineClient after the greeting."""

    def connect():
        client = client_factory(app.address("pop3"))
        assert client.line().startswith("+OK")
        return client

    return connect


def login(client, user=ANN, password=PASSWORD):
    assert client.ask(f"USER {user}").startswith("+OK")
    reply = client.ask(f"PASS {password}")
    assert reply.startswith("+OK"), reply
    return reply


def test_greeting_and_capa_before_and_after_login(pop3):
    c = pop3()
    c.send("CAPA")
    assert c.line().startswith("+OK")
    caps = c.multiline()
    for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER", "SASL PLAIN"):
        assert cap in caps
    assert any(line.startswith("IMPLEMENTATION") for line in caps)
    assert "STLS" not in caps  # no TLS configured
    login(c)
    c.send("CAPA")
    assert c.line().startswith("+OK")
    after = c.multiline()
    # RFC 2449 section 5: the AUTHORIZATION state's capabilities are announced in both states
    assert after == caps


def test_unknown_user_gets_the_same_user_reply(pop3):
    c = pop3()
    known = c.ask(f"USER {ANN}")
    unknown = c.ask("USER nobody@example.org")
    assert known == unknown == "+OK send PASS"
    assert c.ask("PASS wrong") == "-ERR [AUTH] invalid user name or password"
    assert c.ask(f"USER {ANN}") == "+OK send PASS"
    assert c.ask("PASS wrong") == "-ERR [AUTH] invalid user name or password"


def test_states_are_enforced(pop3):
    c = pop3()
    for command in ("STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 0", "UIDL", "LAST"):
        assert c.ask(command) == Pop3Handler.REPLY_WRONG_STATE, command
    assert c.ask(f"PASS {PASSWORD}") == Pop3Handler.REPLY_WRONG_STATE  # PASS before USER
    login(c)
    for command in (f"USER {ANN}", "PASS x", "APOP a b", "AUTH PLAIN", "STLS"):
        assert c.ask(command) == Pop3Handler.REPLY_WRONG_STATE, command
    assert c.ask("STAT") == "+OK 0 0"


def test_stat_list_retr_top_uidl(pop3, store):
    deliver(store, ANN, MSG1)
    deliver(store, ANN, MSG2)
    c = pop3()
    login(c)
    assert c.ask("STAT") == f"+OK 2 {len(MSG1) + len(MSG2)}"
    c.send("LIST")
    assert c.line().startswith("+OK")
    assert c.multiline() == [f"1 {len(MSG1)}", f"2 {len(MSG2)}"]
    assert c.ask("LIST 2") == f"+OK 2 {len(MSG2)}"
    c.send("TOP 1 0")  # reads 1 and 2 ahead: on SQLite one value, the bodies views into it
    assert c.line().startswith("+OK")
    assert c.multiline() == ["Subject: one", ""]
    c.send("RETR 2")
    assert c.line() == f"+OK {len(MSG2)} octets"
    assert c.multiline() == ["Subject: two", "X: y", "", "line 1", "..line 2 starts with a dot", "..", "line 4"]
    c.send("TOP 2 1")
    assert c.line().startswith("+OK")
    assert c.multiline() == ["Subject: two", "X: y", "", "line 1"]
    c.send("TOP 2 0")
    c.line()
    assert c.multiline() == ["Subject: two", "X: y", ""]
    c.send("UIDL")
    assert c.line().startswith("+OK")
    uidls = c.multiline()
    assert [u.split()[0] for u in uidls] == ["1", "2"]
    for u in uidls:
        assert re.fullmatch(r"[\x21-\x7e]{1,70}", u.split()[1])
    assert c.ask("UIDL 1") == f"+OK {uidls[0]}"
    assert c.ask("NOOP") == "+OK"
    assert c.ask("QUIT").startswith("+OK")


def test_byte_stuffing_and_sizes_with_poplib(app, store):
    tricky = [
        b".starts with a dot\r\n\r\nbody\r\n",
        b"Subject: dots\r\n\r\n.\r\n..\r\n...\r\n. x\r\n",
        b"Subject: big\r\n\r\n" + b"".join(b".%06d" % i + b"x" * 70 + b"\r\n" for i in range(20000)),
        b"Subject: no final line end\r\n\r\nlast",
    ]
    for body in tricky:
        deliver(store, ANN, body)
    client = poplib.POP3(*app.address("pop3"), timeout=30)
    client.user(ANN)
    client.pass_(PASSWORD)
    _, listing, _ = client.list()
    sizes = [int(line.split()[1]) for line in listing]
    for number, body in enumerate(tricky, 1):
        _, lines, octets = client.retr(number)
        stored = body if body.endswith(b"\r\n") else body + b"\r\n"
        assert b"\r\n".join(lines) + b"\r\n" == stored
        assert sizes[number - 1] == len(stored)
    client.quit()


def test_dele_then_drop_keeps_message(pop3, store):
    deliver(store, ANN, MSG1)
    c = pop3()
    login(c)
    assert c.ask("DELE 1") == "+OK message 1 deleted"
    assert c.ask("RETR 1") == Pop3Handler.REPLY_ALREADY_DELETED.format(n=1)
    assert c.ask("DELE 1") == Pop3Handler.REPLY_ALREADY_DELETED.format(n=1)
    assert c.ask("STAT") == "+OK 0 0"
    c.close()  # dropped without QUIT
    wait_unlocked(store)  # until the server has seen the drop
    again = pop3()
    login(again)  # the lock was released when the session ended
    assert again.ask("STAT") == f"+OK 1 {len(MSG1)}"


def test_rset_unmarks_and_quit_deletes(pop3, store):
    for _ in range(3):
        deliver(store, ANN, MSG1)
    c = pop3()
    login(c)
    c.ask("DELE 1")
    c.ask("DELE 2")
    assert c.ask("RSET") == f"+OK maildrop has 3 messages ({3 * len(MSG1)} octets)"
    c.ask("DELE 2")
    assert c.ask("QUIT") == "+OK mailsrv POP3 server signing off (2 messages left)"
    assert len(store.maildrops.snapshot(store.directory.find_account(ANN).id)) == 2


def test_uidls_are_stable_across_sessions_and_never_reused(pop3, store):
    for _ in range(3):
        deliver(store, ANN, MSG1)

    def uidls():
        c = pop3()
        login(c)
        c.send("UIDL")
        c.line()
        result = [u.split()[1] for u in c.multiline()]
        return c, result

    c, first = uidls()
    c.ask("DELE 3")
    c.ask("QUIT")
    c, second = uidls()
    assert second == first[:2]
    c.ask("QUIT")
    deliver(store, ANN, MSG1)
    c, third = uidls()
    assert third[:2] == first[:2] and third[2] not in first


def test_second_session_gets_in_use(pop3):
    first = pop3()
    login(first)
    second = pop3()
    second.ask(f"USER {ANN}")
    assert second.ask(f"PASS {PASSWORD}") == "-ERR [IN-USE] maildrop already locked by another session"
    assert second.ask("STAT") == Pop3Handler.REPLY_WRONG_STATE  # still not logged in
    first.ask("QUIT")
    login(second)


def test_last_per_rfc1081(pop3, store):
    for _ in range(3):
        deliver(store, ANN, MSG1)
    c = pop3()
    login(c)
    assert c.ask("LAST") == "+OK 0"
    c.send("RETR 2")
    c.line()
    c.multiline()
    assert c.ask("LAST") == "+OK 2"
    assert c.ask("RSET").startswith("+OK")
    assert c.ask("LAST") == "+OK 0"
    c.send("RETR 2")
    c.line()
    c.multiline()
    c.ask("QUIT")
    c = pop3()
    login(c)
    assert c.ask("LAST") == "+OK 2"  # persisted as messages.seen
    assert c.ask("DELE 3") == "+OK message 3 deleted"
    assert c.ask("LAST") == "+OK 3"


def test_last_can_be_turned_off(make_app, client_factory):
    app = make_app(pop3={"enable_last": False, "listen": (("127.0.0.1", 0),)})
    c = client_factory(app.address("pop3"))
    c.line()
    login(c)
    assert c.ask("LAST") == Pop3Handler.REPLY_UNKNOWN


def test_rpop_is_refused(pop3):
    c = pop3()
    c.ask(f"USER {ANN}")
    assert c.ask("RPOP x") == Pop3Handler.REPLY_RPOP


NO_SUCH = Pop3Handler.REPLY_NO_SUCH_MESSAGE.format(count=1)


@pytest.mark.parametrize(
    "line,reply",
    [("LIST 0", NO_SUCH), ("RETR abc", Pop3Handler.REPLY_BAD_NUMBER), ("TOP 1 -1", Pop3Handler.REPLY_BAD_LINES),
     ("RETR 4294967297", NO_SUCH), ("RETR 42949672970", Pop3Handler.REPLY_BAD_NUMBER),
     ("LIST -1", Pop3Handler.REPLY_BAD_NUMBER), ("DELE +1", Pop3Handler.REPLY_BAD_NUMBER),
     ("TOP 1", Pop3Handler.REPLY_TOP_USAGE), ("TOP x 1", Pop3Handler.REPLY_BAD_NUMBER),
     ("RETR 1 2", Pop3Handler.REPLY_BAD_NUMBER), ("RETR \u0661", Pop3Handler.REPLY_BAD_NUMBER)],
)
def test_bad_arguments_get_err(pop3, store, line, reply):
    deliver(store, ANN, MSG1)
    c = pop3()
    login(c)
    assert c.ask(line) == reply, line
    assert c.ask("STAT").startswith("+OK 1")


@pytest.mark.parametrize(
    "raw,reply",
    [(b"STAT" + b"x" * 2000 + b"\r\n", Pop3Handler.REPLY_TOO_LONG), (b"ST\0AT\r\n", Pop3Handler.REPLY_BAD_CHARS),
     (b"STAT \xff\r\n", Pop3Handler.REPLY_BAD_CHARS), (b"\r\n", Pop3Handler.REPLY_UNKNOWN),
     (b"FOO\r\n", Pop3Handler.REPLY_UNKNOWN)],
)
def test_bad_input_gets_err_and_session_goes_on(pop3, raw, reply):
    c = pop3()
    login(c)
    assert c.ask(raw) == reply
    assert c.ask("STAT") == "+OK 0 0"


def test_a_flood_of_bad_commands_ends_the_session_only(pop3):
    other = pop3()
    login(other)
    flood = pop3()
    for _ in range(19):
        assert flood.ask("BOGUS") == Pop3Handler.REPLY_UNKNOWN
    assert flood.ask("BOGUS") == "-ERR too many bad commands, closing connection"
    assert flood.closed()
    assert other.ask("STAT") == "+OK 0 0"


def test_idle_timeout_deletes_nothing_and_unlocks(make_app, client_factory, store):
    deliver(store, ANN, MSG1)
    app = make_app(pop3={"idle_timeout": 0.5, "listen": (("127.0.0.1", 0),)})
    c = client_factory(app.address("pop3"))
    c.line()
    login(c)
    c.ask("DELE 1")
    assert c.line() == "-ERR idle for too long, closing connection"
    assert c.closed()
    again = client_factory(app.address("pop3"))
    again.line()
    login(again)
    assert again.ask("STAT") == f"+OK 1 {len(MSG1)}"


def test_auth_plain_with_and_without_initial_response(pop3):
    token = base64.b64encode(f"\0{ANN}\0{PASSWORD}".encode()).decode()
    c = pop3()
    assert c.ask(f"AUTH PLAIN {token}").startswith("+OK")
    c.ask("QUIT")
    c = pop3()
    assert c.ask("AUTH PLAIN") == "+ "
    assert c.ask(token).startswith("+OK")
    c.ask("QUIT")
    c = pop3()
    assert c.ask("AUTH PLAIN") == "+ "
    assert c.ask("*") == Pop3Handler.REPLY_AUTH_CANCELLED
    bad = base64.b64encode(f"\0{ANN}\0wrong".encode()).decode()
    assert c.ask(f"AUTH PLAIN {bad}") == "-ERR [AUTH] invalid user name or password"
    assert c.ask("AUTH PLAIN !!!") == Pop3Handler.REPLY_BAD_PLAIN
    assert c.ask("AUTH CRAM-MD5") == Pop3Handler.REPLY_UNSUPPORTED_MECHANISM  # not enabled
    assert c.ask("AUTH X-UNKNOWN") == Pop3Handler.REPLY_UNSUPPORTED_MECHANISM


def test_plaintext_needs_trusted_network_or_tls(make_app, client_factory, certificate):  # noqa: F811
    cert, key = certificate
    app = make_app(auth={"plaintext_networks": (), "bcrypt_rounds": 4, "failure_delay": 0.0}, tls={"certfile": cert, "keyfile": key})
    c = client_factory(app.address("pop3"))
    c.line()
    c.send("CAPA")
    c.line()
    caps = c.multiline()
    assert "USER" not in caps and not any("PLAIN" in x for x in caps) and "STLS" in caps
    assert c.ask(f"USER {ANN}").startswith("-ERR [AUTH]")
    token = base64.b64encode(f"\0{ANN}\0{PASSWORD}".encode()).decode()
    assert c.ask(f"AUTH PLAIN {token}").startswith("-ERR [AUTH]")
    # after STLS, with poplib:
    client = poplib.POP3(*app.address("pop3"), timeout=10)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    client.stls(context)
    caps = client.capa()
    assert "USER" in caps and "STLS" not in caps and "PLAIN" in caps["SASL"]
    client.user(ANN)
    client.pass_(PASSWORD)
    assert client.stat() == (0, 0)
    client.quit()


def test_stls_without_tls_configured_is_refused(pop3):
    c = pop3()
    assert c.ask("STLS") == Pop3Handler.REPLY_NO_TLS


def test_cram_md5_and_apop_when_enabled(make_app, client_factory):
    app = make_app(auth={"cram_md5": True, "bcrypt_rounds": 4, "failure_delay": 0.0})
    c = client_factory(app.address("pop3"))
    greeting = c.line()
    timestamp = re.search(r"<[^>]+>", greeting).group(0)
    c.send("CAPA")
    c.line()
    assert "SASL PLAIN CRAM-MD5" in c.multiline()
    assert c.ask(f"APOP {ANN} {apop_digest(timestamp, PASSWORD)}").startswith("+OK")
    c.ask("QUIT")
    # bob has no CRAM secret
    c = client_factory(app.address("pop3"))
    timestamp = re.search(r"<[^>]+>", c.line()).group(0)
    assert c.ask(f"APOP bob@example.org {apop_digest(timestamp, PASSWORD)}")== Pop3Handler.REPLY_AUTH_FAILED
    challenge_line = c.ask("AUTH CRAM-MD5")
    assert challenge_line.startswith("+ ")
    challenge = base64.b64decode(challenge_line[2:])
    answer = base64.b64encode(f"{ANN} {cram_md5_digest(PASSWORD, challenge)}".encode()).decode()
    assert c.ask(answer).startswith("+OK")


def test_no_apop_timestamp_without_cram(app, client_factory):
    c = client_factory(app.address("pop3"))
    assert "<" not in c.line()
    assert c.ask(f"APOP {ANN} {'0' * 32}") == Pop3Handler.REPLY_NO_APOP


def test_passwords_never_reach_the_log(pop3, caplog, app, client_factory):
    """Successful and failed logins over POP3 (USER/PASS, AUTH PLAIN) and MPP are logged
    with the peer and the name, never with the password."""
    import logging

    caplog.set_level(logging.DEBUG, logger="mailsrv")
    c = pop3()
    c.ask(f"USER {ANN}")
    c.ask("PASS wrong-secret-1")
    login(c)
    c.ask("QUIT")
    c = pop3()
    c.ask("AUTH PLAIN " + base64.b64encode(f"\0{ANN}\0wrong-secret-2".encode()).decode())
    m = client_factory(app.address("mpp"))
    m.line()
    m.ask(f"USER {ANN}")
    m.ask("PASS wrong-secret-3")
    m.ask("QUIT")
    c.ask("QUIT")
    text = caplog.text
    assert "login failed" in text and "logged in" in text and "127.0.0.1" in text
    for secret in (PASSWORD, "wrong-secret-1", "wrong-secret-2", "wrong-secret-3"):
        assert secret not in text
