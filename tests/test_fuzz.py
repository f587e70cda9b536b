"""Fuzzing with hypothesis, a bounded number of examples: every protocol's command parser
over a real socket, and the dot-terminated text readers. No exception escapes a
dispatcher (nothing logged at ERROR), every reply is a well-formed line of the protocol,
and the server goes on serving others (a normal login afterwards)."""

from __future__ import annotations

import logging
import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import PASSWORD, LineClient
from .test_mpp import read_text_with

ANN = "ann@example.org"
LOOPBACK = (("127.0.0.1", 0),)
EXAMPLES = 40

VERBS = {
    "pop3": ["USER", "PASS", "APOP", "AUTH", "CAPA", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL",
             "LAST", "STLS", "QUIT"],
    "pop": ["USER", "PASS", "HOST", "FOLD", "READ", "RETR", "ACKS", "ACKD", "NACK", "QUIT"],
    "mpp": ["USER", "PASS", "DATA", "NOOP", "QUIT"],
    "smtp": ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "QUIT", "STARTTLS", "AUTH"],
    "submission": ["EHLO", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT"],
    "odmr": ["EHLO", "AUTH", "ATRN", "QUIT", "STARTTLS"],
}
#: what every line the server sends must look like, per protocol (multi-line POP3
#: listings: CAPA and AUTH's mechanisms before login, whose lines are capability names)
REPLY = {
    "pop3": re.compile(r"(\+OK( .*)?|-ERR( .*)?|\+ .*|\.|[A-Z][A-Z0-9-]*( [A-Za-z0-9.=/_-]+)*)"),
    "pop": re.compile(r"(\+OK( .*)?|-ERR( .*)?|=\d+.*|#\d+.*)"),
    "mpp": re.compile(r"[2-5]\d\d[ -].*"),
    "smtp": re.compile(r"[2-5]\d\d([ -].*)?"),
    "submission": re.compile(r"[2-5]\d\d([ -].*)?"),
    "odmr": re.compile(r"[2-5]\d\d([ -].*)?"),
}

argument = st.one_of(
    st.just(""), st.just(ANN), st.just(PASSWORD), st.just("FROM:<a@b.example>"), st.just("TO:<ann@example.org>"),
    st.just("1"), st.just("-1"), st.just("99999999999999999999"), st.just("PLAIN"), st.just("CRAM-MD5"),
    st.text(max_size=40), st.text(alphabet=st.characters(codec="ascii"), max_size=600),
)
command = st.one_of(
    st.tuples(st.sampled_from(sorted({v for vs in VERBS.values() for v in vs})), argument).map(
        lambda va: (va[0] + (" " + va[1] if va[1] else "")).encode("utf-8")),
    st.binary(max_size=80),  # anything: NUL, 8-bit, invalid UTF-8, bare CR
    st.just(b"."), st.just(b"..x"), st.just(b"x" * 3000),
)
line_end = st.sampled_from([b"\r\n", b"\n", b"\r\n", b"\r\n", b"\r"])
session = st.lists(st.tuples(command, line_end), min_size=1, max_size=25)


def converse(address, data: bytes) -> list[bytes]:
    """Send everything, close our side, and read every line the server sends until it
    closes (the end of our input ends any session, whatever state it is in)."""
    with socket.create_connection(address, timeout=20) as sock:
        try:
            sock.sendall(data)
        except OSError:  # (the server may close first: too many errors)
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received.split(b"\r\n")[:-1] if received.endswith(b"\r\n") else received.split(b"\r\n")


@pytest.fixture
def everything(make_app, store, caplog):
    store.directory.add_domain("customer.example", "odmr")
    store.directory.grant_odmr(ANN, "customer.example")
    app = make_app(smtp={"listen": LOOPBACK, "submission": LOOPBACK}, odmr={"listen": LOOPBACK})
    caplog.set_level(logging.INFO)
    return app


@pytest.mark.parametrize("protocol", sorted(VERBS))
def test_fuzzed_commands_get_well_formed_replies_and_the_server_serves_on(everything, caplog, protocol):
    address = everything.address(protocol)
    pattern = REPLY[protocol]

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(session)
    def one(lines):
        data = b"".join(text + end for text, end in lines)
        replies = converse(address, data)
        assert replies, "no greeting"
        for reply in replies:
            text = reply.decode("utf-8")  # (raises on anything that is not UTF-8)
            assert pattern.fullmatch(text), (protocol, text)
            assert len(reply) <= 1000 and "Traceback" not in text and "Error(" not in text

    one()
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("mailsrv")]
    assert failures == [], [r.getMessage() for r in failures]
    c = LineClient(everything.address("pop3"))  # and the server still serves a normal login
    c.line()
    c.ask(f"USER {ANN}")
    assert c.ask(f"PASS {PASSWORD}").startswith("+OK")
    c.ask("QUIT")
    c.close()


@settings(max_examples=300, deadline=None, database=None)
@given(chunks=st.lists(st.binary(max_size=200) | st.sampled_from([b".", b"\r\n", b"\n", b"\r", b"..", b"\r\n.\r\n"]),
                       max_size=30),
       strict=st.booleans(), limit=st.integers(min_value=1, max_value=2000))
def test_text_readers_take_anything_and_end_only_at_their_terminator(chunks, strict, limit):
    """Whatever comes, split however: a text, or the client gone; never more than the
    limit kept; and nothing after the end of the text consumed."""
    data = b"".join(chunks) + b"\r\n.\r\n"
    try:
        pieces = [c for c in chunks if c] + [b"\r\n.\r\n"]  # (an empty read is the end of input)
        (text, too_large, _), rest, _ = read_text_with(pieces, max_size=limit, strict=strict)
    except ConnectionAbortedError:
        raise AssertionError("the input has a terminator: the reader must have found one") from None
    assert text == b"" if too_large else len(text) <= limit
    assert data.endswith(rest)
