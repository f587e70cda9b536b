"""ODMR (RFC 2645) on SQLite and PostgreSQL: transcripts with the test playing the
customer's MTA after the turn, and real clients (swaks, fetchmail)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess

import pytest
from sqlalchemy import text

from mailsrv.auth import cram_md5_digest
from mailsrv.delivery.worker import Worker
from mailsrv.protocols import odmr as odmrmod
from mailsrv.protocols.odmr import OdmrHandler as O

from .conftest import PASSWORD, make_config
from .test_server import certificate  # noqa: F401  (fixture)

ANN = "ann@example.org"  # has a CRAM secret (the accounts fixture)


@pytest.fixture
def odmr_app(make_app, store, db_url, tmp_path):
    store.directory.add_domain("customer.example", "odmr")
    store.directory.add_domain("other.example", "odmr")
    store.directory.add_domain("notyours.example", "odmr")
    store.directory.grant_odmr(ANN, "customer.example")
    store.directory.grant_odmr(ANN, "other.example")
    return make_app(odmr={"listen": (("127.0.0.1", 0),)})


def hold(store, db_url, tmp_path, sender: str, recipients: list[str], body: bytes = b"Subject: held\r\n\r\nx\r\n") -> int:
    queue_id = store.queue.enqueue(sender, body, recipients, "smtp")
    Worker(store, make_config(db_url, tmp_path), "t").run_once()  # ODMR domains: held
    return queue_id


def states(database) -> list[tuple[str, str]]:
    with database.read_core() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT r.recipient, r.state FROM queue_recipients r JOIN queue q ON q.id = r.queue_id"
            " WHERE q.origin != 'bounce' ORDER BY r.id"))]


def settled(database, expected: list[str]) -> list[str]:
    """The recipients' states once the server has settled them as ``expected`` (it does so
    when it notices the customer is gone; each look is one query, bounded in number)."""
    for _ in range(10_000):
        got = [state for _, state in states(database)]
        if got == expected:
            break
    return got


@pytest.fixture
def odmr(odmr_app, client_factory):
    def connect(login: bool = True):
        c = client_factory(odmr_app.address("odmr"))
        assert c.line() == "220 mail.example.org ESMTP on-demand mail relay ready"
        if login:
            assert cram(c, ANN, PASSWORD) == O.REPLY_AUTH_OK
        return c
    return connect


def cram(c, user: str, secret: str) -> str:
    line = c.ask("AUTH CRAM-MD5")
    assert line.startswith("334 ")
    challenge = base64.b64decode(line[4:])
    return c.ask(base64.b64encode(f"{user} {cram_md5_digest(secret, challenge)}".encode()).decode())


class Customer:
    """The customer's MTA after the turn, scripted: codes per recipient at RCPT, in turn
    after each final dot; it may vanish in the middle of a text, and may be an old MTA
    that knows only HELO (``helo``: its reply to HELO, EHLO being refused)."""

    def __init__(self, c, pipelining: bool = False, rcpt: dict | None = None, after_dot: list | None = None,
                 vanish_in_text: int | None = None, helo: str | None = None):
        self.c, self.pipelining, self.helo = c, pipelining, helo
        self.rcpt, self.after_dot = rcpt or {}, list(after_dot or [])
        self.vanish_in_text = vanish_in_text
        self.received: list[tuple[str, list[str], bytes]] = []
        self.commands: list[str] = []

    def serve(self) -> None:
        c = self.c
        c.send("220 customer.example ESMTP")
        sender, recipients = None, []
        while True:
            line = c.line()
            if not line:
                return  # mailsrv closed the connection
            self.commands.append(line)
            verb = line.split(" ")[0].upper()
            if verb == "EHLO" and self.helo is not None:
                c.send("500 5.5.1 command unrecognized")
            elif verb == "HELO" and self.helo is not None:
                c.send(self.helo)
            elif verb == "EHLO":
                c.send("250-customer.example\r\n250 PIPELINING" if self.pipelining else "250 customer.example")
            elif verb == "MAIL":
                sender, recipients = line[len("MAIL FROM:<"):-1], []
                c.send("250 2.1.0 OK")
            elif verb == "RCPT":
                address = line[len("RCPT TO:<"):-1]
                reply = self.rcpt.get(address, "250 2.1.5 OK")
                if reply.startswith("250"):
                    recipients.append(address)
                c.send(reply)
            elif verb == "DATA":
                c.send("354 go ahead")
                if self.vanish_in_text is not None and len(self.received) == self.vanish_in_text:
                    c.raw_line()
                    c.close()
                    return
                body = b""
                while (raw := c.raw_line()) != b".\r\n":
                    body += raw[1:] if raw.startswith(b".") else raw
                self.received.append((sender, recipients, body))
                c.send(self.after_dot.pop(0) if self.after_dot else "250 2.0.0 OK")
            elif verb == "RSET":
                c.send("250 OK")
            elif verb == "QUIT":
                c.send("221 bye")
                return
            else:
                c.send("500 what?")


def test_ehlo_auth_and_the_initial_state(odmr):
    c = odmr(login=False)
    c.send("EHLO customer.example")
    assert [c.line() for _ in range(3)] == ["250-mail.example.org", "250-AUTH CRAM-MD5", "250 ATRN"]
    assert c.ask("ATRN") == O.REPLY_AUTH_REQUIRED
    assert c.ask("MAIL FROM:<a@b.example>") == O.REPLY_UNKNOWN
    assert c.ask("AUTH PLAIN AGFubkBleGFtcGxlLm9yZwBjb3JyZWN0IGhvcnNl") == O.REPLY_ENCRYPTION_REQUIRED
    assert cram(c, ANN, "wrong") == O.REPLY_AUTH_FAILED
    assert cram(c, "nobody@example.org", PASSWORD) == O.REPLY_AUTH_FAILED  # the same reply
    line = c.ask("AUTH CRAM-MD5")
    challenge = base64.b64decode(line[4:])
    answer = base64.b64encode(f"{ANN} {cram_md5_digest(PASSWORD, challenge)}".encode()).decode()
    assert c.ask(answer) == O.REPLY_AUTH_OK
    assert c.ask("AUTH CRAM-MD5") == O.REPLY_WRONG_STATE
    d = odmr(login=False)  # the same response to another challenge fails: no replay
    assert d.ask("AUTH CRAM-MD5").startswith("334 ")
    assert d.ask(answer) == O.REPLY_AUTH_FAILED


@pytest.mark.parametrize("arg", ["customer.example, other.example", " customer.example", "customer", "-x.example",
                                 "customer.example,", "customer.example;other.example"])
def test_atrn_syntax(odmr, arg):
    assert odmr().ask(f"ATRN {arg}") == O.REPLY_ATRN_SYNTAX


def test_atrn_refusals(odmr, store, db_url, tmp_path, database):
    hold(store, db_url, tmp_path, "a@b.example", ["x@notyours.example", "y@customer.example"])
    c = odmr()
    assert c.ask("ATRN customer.example,notyours.example") == O.REPLY_NOT_GRANTED.format(domain="notyours.example")
    assert c.ask("ATRN nosuch.example") == O.REPLY_NOT_GRANTED.format(domain="nosuch.example")
    assert c.ask("ATRN other.example") == O.REPLY_NO_MAIL
    assert states(database) == [("x@notyours.example", "held"), ("y@customer.example", "held")]  # nothing sent


@pytest.mark.parametrize("batch", [4 << 20, 1])
def test_atrn_delivers_every_held_message_and_marks_them_delivered(odmr, store, db_url, tmp_path, database, batch,
                                                                   monkeypatch):
    monkeypatch.setattr(odmrmod, "BATCH_OCTETS", batch)  # 1: every message a batch of its own
    hold(store, db_url, tmp_path, "a@b.example", ["x@customer.example", "y@other.example", "bob@example.org"],
         b"Subject: one\r\n\r\n.dotted\r\nline\r\n")
    hold(store, db_url, tmp_path, "", ["z@customer.example"], b"Subject: two\r\n\r\nbounce\r\n")
    c = odmr()
    assert c.ask("ATRN") == O.REPLY_TURNING  # no domains: every granted one
    customer = Customer(c)
    customer.serve()
    assert customer.commands[0] == "EHLO mail.example.org"
    assert [(s, r) for s, r, _ in customer.received] == [("a@b.example", ["x@customer.example", "y@other.example"]),
                                                         ("", ["z@customer.example"])]
    assert customer.received[0][2].endswith(b"Subject: one\r\n\r\n.dotted\r\nline\r\n")
    assert dict(states(database)) == {"x@customer.example": "delivered", "y@other.example": "delivered",
                                      "bob@example.org": "delivered", "z@customer.example": "delivered"}
    again = odmr()
    assert again.ask("ATRN") == O.REPLY_NO_MAIL


def test_a_customer_refusing_ehlo_is_spoken_to_with_helo(odmr, store, db_url, tmp_path, database):
    hold(store, db_url, tmp_path, "a@b.example", ["x@customer.example"], b"Subject: old\r\n\r\nhello\r\n")
    c = odmr()
    assert c.ask("ATRN customer.example") == O.REPLY_TURNING
    customer = Customer(c, helo="250 customer.example")
    customer.serve()
    assert customer.commands[:3] == ["EHLO mail.example.org", "HELO mail.example.org", "MAIL FROM:<a@b.example>"]
    assert customer.received[0][2].endswith(b"Subject: old\r\n\r\nhello\r\n")
    assert settled(database, ["delivered"]) == ["delivered"]


def test_a_customer_refusing_ehlo_and_helo_leaves_the_mail_held(odmr, store, db_url, tmp_path, database):
    hold(store, db_url, tmp_path, "a@b.example", ["x@customer.example"])
    c = odmr()
    assert c.ask("ATRN customer.example") == O.REPLY_TURNING
    customer = Customer(c, helo="554 5.7.1 go away")
    customer.serve()  # (returns when mailsrv closes the connection)
    assert customer.commands == ["EHLO mail.example.org", "HELO mail.example.org"]
    assert settled(database, ["held"]) == ["held"]


@pytest.mark.parametrize("pipelining", [False, True])
def test_4xx_keeps_held_and_5xx_bounces(odmr, store, db_url, tmp_path, database, pipelining):
    hold(store, db_url, tmp_path, ANN, ["keep@customer.example", "gone@customer.example", "ok@customer.example"])
    hold(store, db_url, tmp_path, ANN, ["late@customer.example"])
    c = odmr()
    assert c.ask("ATRN customer.example") == O.REPLY_TURNING
    customer = Customer(c, pipelining=pipelining, rcpt={"keep@customer.example": "451 4.3.0 later",
                                                         "gone@customer.example": "550 5.1.1 no such user"},
                        after_dot=["250 OK", "452 4.3.1 full"])
    customer.serve()
    assert dict(states(database)) == {"keep@customer.example": "held", "gone@customer.example": "failed",
                                      "ok@customer.example": "delivered", "late@customer.example": "held"}
    Worker(store, make_config(db_url, tmp_path), "t").run_once()  # the bounce, to ann's mailbox
    bounces = store.maildrops.mailbox_list(ANN)
    assert len(bounces) == 1  # ann, the sender, is told about gone@ only
    assert b"550 5.1.1 no such user" in store.maildrops.read_body(store.directory.find_account(ANN).id, bounces[0][0])


@pytest.mark.parametrize("pipelining,batch", [(False, 1), (False, 4 << 20), (True, 4 << 20)])
def test_a_customer_vanishing_mid_text_leaves_the_rest_held(odmr, store, db_url, tmp_path, database, monkeypatch,
                                                            pipelining, batch):
    monkeypatch.setattr(odmrmod, "BATCH_OCTETS", batch)  # 1: each message settled before the next is sent
    for i in range(3):
        hold(store, db_url, tmp_path, "a@b.example", [f"m{i}@customer.example"])
    c = odmr()
    assert c.ask("ATRN") == O.REPLY_TURNING
    Customer(c, pipelining=pipelining, vanish_in_text=1).serve()  # takes the first, vanishes in the second
    assert settled(database, ["delivered", "held", "held"]) == ["delivered", "held", "held"]
    d = odmr()
    assert d.ask("ATRN") == O.REPLY_TURNING
    customer = Customer(d)
    customer.serve()
    assert [r for _, r, _ in customer.received] == [["m1@customer.example"], ["m2@customer.example"]]  # none twice


def test_two_atrns_for_one_domain_one_gets_450(odmr, store, db_url, tmp_path, database):
    hold(store, db_url, tmp_path, "a@b.example", ["x@customer.example"])
    first = odmr()
    assert first.ask("ATRN customer.example") == O.REPLY_TURNING
    first.send("220 customer.example ESMTP")  # the turn has begun: the domain is taken
    assert first.line() == "EHLO mail.example.org"
    second = odmr()
    assert second.ask("ATRN customer.example") == O.REPLY_BUSY.format(domain="customer.example")
    assert second.ask("ATRN other.example") == O.REPLY_NO_MAIL  # another domain is free
    first.close()  # gone before answering EHLO: the recipient is held again
    assert settled(database, ["held"]) == ["held"]
    assert odmr().ask("ATRN customer.example") == O.REPLY_TURNING


FETCHMAIL = shutil.which("fetchmail")
SWAKS = shutil.which("swaks")


@pytest.mark.interop
@pytest.mark.skipif(FETCHMAIL is None, reason="fetchmail is not installed")
def test_fetchmail_collects_two_domains_into_a_local_smtp_server(odmr_app, store, db_url, tmp_path, database):
    from aiosmtpd.controller import Controller

    from .test_relay import Script, free_port

    bodies = [b"Subject: first\r\n\r\nbody one\r\n.dotted\r\n", b"Subject: second\r\n\r\n" + (b"x" * 70 + b"\r\n") * 70]
    hold(store, db_url, tmp_path, "a@b.example", ["x@customer.example"], bodies[0])
    hold(store, db_url, tmp_path, "c@d.example", ["y@other.example", "z@customer.example"], bodies[1])
    sink = Script()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    host, port = odmr_app.address("odmr")
    rc = tmp_path / "fetchmailrc"
    rc.write_text(f'set no bouncemail\npoll {host} protocol odmr service {port} user "{ANN}" password "{PASSWORD}"'
                  f' fetchdomains customer.example,other.example smtphost "127.0.0.1/{controller.port}" sslproto \'\'\n')
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(tmp_path)}
    try:
        first = subprocess.run([FETCHMAIL, "-f", str(rc), "-N", "-v"], capture_output=True, text=True, timeout=60, env=env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert settled(database, ["delivered"] * 3) == ["delivered"] * 3
        got = {frozenset(r): c for _, r, c in sink.received}
        assert got[frozenset({"x@customer.example"})].endswith(bodies[0])
        assert got[frozenset({"y@other.example", "z@customer.example"})].endswith(bodies[1])
        second = subprocess.run([FETCHMAIL, "-f", str(rc), "-N", "-v"], capture_output=True, text=True, timeout=60, env=env)
        assert "453" in second.stdout + second.stderr
    finally:
        controller.stop()


@pytest.mark.interop
@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
def test_swaks_ehlo_and_auth_cram_md5(odmr_app):
    host, port = odmr_app.address("odmr")
    base = [SWAKS, "--server", host, "--port", str(port), "--quit-after", "AUTH", "--auth", "CRAM-MD5",
            "--auth-user", ANN, "--timeout", "20"]
    ok = subprocess.run([*base, "--auth-password", PASSWORD], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "250 ATRN" in ok.stdout and "235 2.7.0" in ok.stdout
    wrong = subprocess.run([*base, "--auth-password", "wrong"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 28 and "535 5.7.8" in wrong.stdout


def test_two_servers_on_one_database_turn_a_domain_once(tmp_path, db_url):
    """Two `mailsrv serve` processes share the database: an ATRN for a domain that one of
    them is turning round gets 450 from the other."""
    import signal

    from mailsrv.db import Database
    from mailsrv.store import Store

    from .conftest import LineClient
    from .test_app import Served, mailsrv, shipped_config_on_ephemeral_ports

    conf = shipped_config_on_ephemeral_ports(tmp_path, database=db_url)
    for args, stdin in ((("domain", "add", "example.org"), None), (("domain", "add", "customer.example", "--odmr"), None),
                        (("user", "add", ANN, "--password-stdin", "--cram-md5"), PASSWORD + "\n"),
                        (("odmr", "grant", ANN, "customer.example"), None)):
        assert mailsrv(conf, *args, stdin=stdin).returncode == 0
    database = Database(db_url)
    hold(Store(database), db_url, tmp_path, "a@b.example", ["x@customer.example"])
    one, two = Served(conf), Served(conf)
    try:
        first, second = LineClient(one.addresses["odmr"]), LineClient(two.addresses["odmr"])
        for c in (first, second):
            c.line()
            assert cram(c, ANN, PASSWORD) == O.REPLY_AUTH_OK
        assert first.ask("ATRN customer.example") == O.REPLY_TURNING
        first.send("220 customer.example ESMTP")
        assert first.line().startswith("EHLO ")  # the turn has begun on the first server
        assert second.ask("ATRN customer.example") == O.REPLY_BUSY.format(domain="customer.example")
        first.close()
        second.close()
    finally:
        for server in (one, two):
            assert server.stop(signal.SIGTERM) == 0
        database.dispose()


def test_mail_the_customer_does_not_collect_bounces_at_the_queue_lifetime(store, accounts, db_url, tmp_path, database):
    store.directory.add_domain("customer.example", "odmr")
    hold(store, db_url, tmp_path, ANN, ["x@customer.example"])
    hold(store, db_url, tmp_path, "", ["y@customer.example"])  # the null sender: no bounce
    Worker(store, make_config(db_url, tmp_path), "t").run_once()
    assert [s for _, s in states(database)] == ["held", "held"]  # within the lifetime
    expired = Worker(store, make_config(db_url, tmp_path, delivery={"queue_lifetime": 0.0, "workers": 0}), "t2")
    expired.run_once()
    assert [s for _, s in states(database)] == ["failed", "failed"]
    expired.run_once()  # the one bounce, to ann's mailbox
    [entry] = store.maildrops.mailbox_list(ANN)
    report = store.maildrops.read_body(store.directory.find_account(ANN).id, entry[0])
    assert b"<x@customer.example>: the customer did not collect it within 0:00:00" in report


def test_failed_logins_count_against_the_session_budget(odmr):
    c = odmr(login=False)
    for _ in range(O.MAX_BAD_COMMANDS - 1):
        assert cram(c, ANN, "guess") == O.REPLY_AUTH_FAILED
    assert cram(c, ANN, "guess") == O.REPLY_TOO_MANY_ERRORS
    assert c.closed()


def test_starttls_then_plain_is_offered(make_app, store, client_factory, certificate):  # noqa: F811
    import ssl

    store.directory.add_domain("customer.example", "odmr")
    cert, key = certificate
    app = make_app(odmr={"listen": (("127.0.0.1", 0),)}, tls={"certfile": cert, "keyfile": key})
    c = client_factory(app.address("odmr"))
    c.line()
    c.send("EHLO customer.example")
    assert [c.line() for _ in range(4)] == ["250-mail.example.org", "250-AUTH CRAM-MD5", "250-STARTTLS", "250 ATRN"]
    assert c.ask("STARTTLS") == O.REPLY_TLS_READY
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_socket(c.sock, server_hostname="localhost")
    reader = tls.makefile("rb")
    tls.sendall(b"EHLO customer.example\r\n")
    assert [reader.readline() for _ in range(3)] == [b"250-mail.example.org\r\n", b"250-AUTH CRAM-MD5 PLAIN\r\n",
                                                      b"250 ATRN\r\n"]
    token = base64.b64encode(f"\0{ANN}\0{PASSWORD}".encode())
    tls.sendall(b"AUTH PLAIN " + token + b"\r\n")
    assert reader.readline() == (O.REPLY_AUTH_OK + "\r\n").encode()
    tls.sendall(b"ATRN\r\n")
    assert reader.readline() == (O.REPLY_NO_MAIL + "\r\n").encode()  # ann has no grant: no domains, no mail
    tls.close()


def test_a_customer_gone_before_the_turn_leaves_its_mail_held(odmr, store, db_url, tmp_path, database):
    hold(store, db_url, tmp_path, "a@b.example", ["x@customer.example"])
    c = odmr()
    assert c.ask("ATRN customer.example") == O.REPLY_TURNING  # the recipient is leased now ...
    c.close()  # ... and the customer is gone before its 220
    assert settled(database, ["held"]) == ["held"]
    assert odmr().ask("ATRN customer.example") == O.REPLY_TURNING  # not 450: nobody holds it
