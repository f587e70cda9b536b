"""The SMTP receiver (port 25) and submission (587, 465) on SQLite and PostgreSQL:
transcripts for every rule, the relay tricks, SMTP smuggling, and real clients (smtplib,
swaks)."""

from __future__ import annotations

import base64
import poplib
import shutil
import smtplib
import ssl
import subprocess

import pytest
from sqlalchemy import text

from mailsrv.delivery.worker import DeliveryPool
from mailsrv.protocols.smtp import SmtpHandler, SubmissionHandler

from .conftest import PASSWORD, DatabaseBlocker, transcript
from .test_server import certificate  # noqa: F401  (fixture)

ANN, BOB = "ann@example.org", "bob@example.org"
H, S = SmtpHandler, SubmissionHandler


@pytest.fixture
def smtp_app(make_app, store, certificate):  # noqa: F811
    """A server with port 25, submission (STARTTLS) and submission over TLS, an alias to
    a remote address, an ODMR domain. Posts deliver local mail at once, as a server with
    workers does, but no worker thread runs (the queue is inspected)."""
    store.directory.add_alias("sales@example.org", ANN)
    store.directory.add_alias("away@example.org", "someone@remote.example")
    store.directory.add_alias("ann.alias@example.org", ANN)
    store.directory.add_domain("customer.example", "odmr")
    cert, key = certificate
    app = make_app(
        smtp={"listen": (("127.0.0.1", 0),), "submission": (("127.0.0.1", 0),),
              "submission_tls": (("127.0.0.1", 0),), "max_message_size": 20_000, "max_received_headers": 5},
        tls={"certfile": cert, "keyfile": key},
    )
    app.context.delivery = DeliveryPool(app.store, app.config)  # (its threads not started)
    return app


@pytest.fixture
def smtp(smtp_app, client_factory):
    def connect(ehlo: bool = True, port: str = "smtp"):
        c = client_factory(smtp_app.address(port))
        assert c.line() == "220 mail.example.org ESMTP mailsrv"
        if ehlo:
            c.send("EHLO client.example")
            assert read_reply(c)[0] == "250-mail.example.org"
        return c
    return connect


def read_reply(c) -> list[str]:
    lines = [c.line()]
    while lines[-1][3:4] == "-":
        lines.append(c.line())
    return lines


def queued(database) -> list[tuple]:
    with database.read_core() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT q.sender, q.origin, r.recipient, r.state FROM queue q JOIN queue_recipients r ON r.queue_id = q.id"
            " ORDER BY r.id"))]


def mailbox(store, address) -> list[bytes]:
    account = store.directory.find_account(address)
    return [store.maildrops.read_body(account.id, m.id) for m in store.maildrops.snapshot(account.id)]


def send_mail(c, sender: str, recipients: list[str], body: bytes) -> str:
    assert c.ask(f"MAIL FROM:<{sender}>") == H.REPLY_SENDER_OK
    for r in recipients:
        assert c.ask(f"RCPT TO:<{r}>") == H.REPLY_RECIPIENT_OK
    assert c.ask("DATA") == H.REPLY_GO_AHEAD
    c.send(body)
    return c.line()


def test_ehlo_lists_the_extensions(smtp_app, client_factory):
    c = client_factory(smtp_app.address("smtp"))
    c.line()
    c.send("EHLO client.example")
    assert read_reply(c) == ["250-mail.example.org", "250-SIZE 20000", "250-PIPELINING", "250-8BITMIME",
                             "250-ENHANCEDSTATUSCODES", "250 STARTTLS"]
    assert c.ask("HELO client.example") == "250 mail.example.org"
    assert c.ask("EHLO") == H.REPLY_NEED_HOSTNAME


def test_mail_to_a_local_user_is_delivered_at_once(smtp, store, database):
    c = smtp()
    reply = send_mail(c, "someone@remote.example", [BOB], b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [copy] = mailbox(store, BOB)
    assert b"\r\nSubject: hi\r\n\r\nhello\r\n" in copy
    assert b"Received: from client.example ([127.0.0.1])\r\n\tby mail.example.org (mailsrv) with ESMTP\r\n\tfor <bob@example.org>;" in copy
    assert copy.startswith(b"Return-Path: <someone@remote.example>\r\nDelivered-To: bob@example.org\r\n")
    assert queued(database) == [("someone@remote.example", "smtp", BOB, "delivered")]
    assert c.ask("QUIT") == H.REPLY_BYE


def test_states_are_enforced(smtp):
    c = smtp(ehlo=False)
    transcript(c, [("MAIL FROM:<a@b.example>", H.REPLY_WRONG_STATE), ("RCPT TO:<bob@example.org>", H.REPLY_WRONG_STATE),
                   ("DATA", H.REPLY_WRONG_STATE), ("NOOP", H.REPLY_OK), ("VRFY bob", H.REPLY_VRFY)])
    c.ask("EHLO client.example")
    read_reply(c)
    transcript(c, [("RCPT TO:<bob@example.org>", H.REPLY_WRONG_STATE), ("DATA", H.REPLY_WRONG_STATE),
                   ("MAIL FROM:<a@b.example>", H.REPLY_SENDER_OK), ("MAIL FROM:<a@b.example>", H.REPLY_WRONG_STATE),
                   ("DATA", H.REPLY_WRONG_STATE), ("RSET", H.REPLY_OK), ("RCPT TO:<bob@example.org>", H.REPLY_WRONG_STATE),
                   ("FROB", H.REPLY_UNKNOWN), ("AUTH PLAIN x", H.REPLY_UNKNOWN)])


@pytest.mark.parametrize("line,reply", [
    ("MAIL FROM:a@b.example", H.REPLY_MAIL_SYNTAX), ("MAIL TO:<a@b.example>", H.REPLY_MAIL_SYNTAX),
    ("MAIL FROM:<a@b.example> SIZE=x", H.REPLY_MAIL_SYNTAX), ("MAIL FROM:<a@b.example> FOO=1", H.REPLY_BAD_PARAMETER),
    ("MAIL FROM:<a@b.example> BODY=BINARYMIME", H.REPLY_BAD_PARAMETER), ("MAIL FROM:<a b@c>", H.REPLY_BAD_SENDER),
    ("MAIL FROM:<a@b.example> SIZE=20001", H.REPLY_TOO_BIG), ("MAIL FROM:<a@b.example>x", H.REPLY_MAIL_SYNTAX),
])
def test_mail_syntax(smtp, line, reply):
    c = smtp()
    assert c.ask(line) == reply
    assert c.ask("MAIL FROM:<> SIZE=100 BODY=8BITMIME") == H.REPLY_SENDER_OK  # the null sender, parameters


@pytest.mark.parametrize("recipient", [
    "someone@remote.example", "someone@REMOTE.example", "user%remote.example@example.org",
    "remote.example!user@example.org", "@example.org:user@remote.example", "@a.example,@example.org:x@remote.example",
    '"user@remote.example"@example.org', '"bob"@example.org', "bob@[127.0.0.1]", "bob@example.org.remote.example",
    "someone@remote.example.", "bob%example.org@example.org", "user@example.org@remote.example",
    "postmaster@remote.example",
])
def test_relay_tricks_are_denied(smtp, database, recipient):
    c = smtp()
    c.ask("MAIL FROM:<a@b.example>")
    reply = c.ask(f"RCPT TO:<{recipient}>")
    assert reply.startswith("554 5.7.1 <") and reply.endswith(">: Relay access denied"), reply
    assert c.ask("DATA") == H.REPLY_WRONG_STATE
    assert queued(database) == []


@pytest.mark.parametrize("recipient,queued_as,state", [
    ("BOB@Example.ORG", BOB, "delivered"), ("bob@example.org.", BOB, "delivered"),
    ("@relay.example:bob@example.org", BOB, "delivered"), ("sales@example.org", "sales@example.org", "delivered"),
    ("away@example.org", "away@example.org", "queued"), ("anyone@customer.example", "anyone@customer.example", "queued"),
])
def test_local_aliases_and_odmr_are_accepted(smtp, database, recipient, queued_as, state):
    c = smtp()
    assert send_mail(c, "a@b.example", [recipient], b"x\r\n.\r\n").startswith("250 2.0.0")
    assert queued(database) == [("a@b.example", "smtp", queued_as, state)]


def test_unknown_users_are_refused_and_count_against_the_budget(smtp):
    c = smtp()
    c.ask("MAIL FROM:<a@b.example>")
    assert c.ask("RCPT TO:<nobody@example.org>") == H.REPLY_UNKNOWN_USER.format(address="nobody@example.org")
    for i in range(H.MAX_BAD_COMMANDS - 2):
        assert c.ask(f"RCPT TO:<nobody{i}@example.org>").startswith("550 5.1.1")
    assert c.ask("RCPT TO:<last@example.org>") == H.REPLY_TOO_MANY_ERRORS
    assert c.closed()


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"])
def test_smuggling_is_refused_and_never_splits_a_message(smtp, database, fake_end):
    c = smtp()
    c.ask("MAIL FROM:<a@b.example>")
    c.ask("RCPT TO:<bob@example.org>")
    c.ask("DATA")
    c.send(b"Subject: one\r\n\r\nfirst" + fake_end + b"MAIL FROM:<evil@b.example>\r\nRCPT TO:<ann@example.org>\r\n"
           b"DATA\r\nSubject: smuggled\r\n\r\nsecond\r\n.\r\nNOOP\r\n")
    assert c.line() == H.REPLY_BARE_NEWLINE
    assert c.line() == H.REPLY_OK  # the NOOP after the real end: the session is in step
    assert queued(database) == []


def test_size_limit_and_loops(smtp, database):
    c = smtp()
    c.ask("MAIL FROM:<a@b.example>")
    c.ask("RCPT TO:<bob@example.org>")
    c.ask("DATA")
    c.send(b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n")
    c.send((b"y" * 998 + b"\r\n") * 30 + b".\r\n")
    assert c.line() == H.REPLY_TOO_BIG
    hops = b"".join(b"Received: from hop%d\r\n" % i for i in range(6))
    assert send_mail(c, "a@b.example", [BOB], hops + b"\r\nloop\r\n.\r\n") == H.REPLY_LOOP
    assert send_mail(c, "a@b.example", [BOB], b"a\0b\r\n.\r\n") == H.REPLY_NUL
    assert queued(database) == []
    five = b"".join(b"Received: from hop%d\r\n" % i for i in range(5))
    assert send_mail(c, "a@b.example", [BOB], five + b"\r\nfive hops are fine\r\n.\r\n").startswith("250 2.0.0")


def test_client_gone_mid_text_queues_nothing(smtp, database):
    c = smtp()
    c.ask("MAIL FROM:<a@b.example>")
    c.ask("RCPT TO:<bob@example.org>")
    c.ask("DATA")
    c.send(b"Subject: half\r\n\r\nhalf a message")
    c.close()
    d = smtp()  # the server goes on: a new session is served, and nothing was queued
    assert d.ask("NOOP") == H.REPLY_OK
    assert queued(database) == []


def test_database_unavailable_gives_451_and_writes_nothing(short_lock_waits, smtp, database, db_url):
    c = smtp()
    with DatabaseBlocker(db_url):
        assert send_mail(c, "a@b.example", [BOB], b"x\r\n.\r\n") in (H.REPLY_NOT_QUEUED, H.REPLY_UNAVAILABLE)
    assert queued(database) == []
    assert send_mail(c, "a@b.example", [BOB], b"x\r\n.\r\n").startswith("250 2.0.0")


def test_pipelined_transaction(smtp, store):
    c = smtp()
    c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
           b"RCPT TO:<ann@example.org>\r\nDATA\r\n")
    assert [c.line() for _ in range(5)] == [H.REPLY_SENDER_OK, H.REPLY_RECIPIENT_OK,
                                            H.REPLY_UNKNOWN_USER.format(address="nobody@example.org"),
                                            H.REPLY_RECIPIENT_OK, H.REPLY_GO_AHEAD]
    c.send(b"Subject: both\r\n\r\nx\r\n.\r\nQUIT\r\n")
    assert c.line().startswith("250 2.0.0")
    assert c.line() == H.REPLY_BYE
    assert len(mailbox(store, BOB)) == len(mailbox(store, ANN)) == 1


def test_starttls_discards_pipelined_commands_and_resets(smtp):
    c = smtp()
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@b.example>\r\n")
    assert c.line() == H.REPLY_TLS_READY
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls = ctx.wrap_socket(c.sock, server_hostname="localhost")
    reader = tls.makefile("rb")
    tls.sendall(b"MAIL FROM:<a@b.example>\r\n")  # EHLO again first (RFC 3207 section 4.2)
    assert reader.readline() == (H.REPLY_WRONG_STATE + "\r\n").encode()
    tls.sendall(b"EHLO client.example\r\n")
    lines = [reader.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(reader.readline())
    assert b"STARTTLS" not in b"".join(lines)
    tls.sendall(b"STARTTLS\r\n")
    assert reader.readline() == (H.REPLY_TLS_ACTIVE + "\r\n").encode()
    tls.close()


# --- submission --------------------------------------------------------------------------


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_submission_requires_auth_and_the_senders_own_address(smtp, store, database):
    c = smtp(port="submission")
    assert c.ask(f"MAIL FROM:<{ANN}>") == S.REPLY_AUTH_REQUIRED
    assert c.ask(f"AUTH PLAIN {plain(ANN, 'wrong')}") == S.REPLY_AUTH_FAILED
    assert c.ask("AUTH X-FOO") == S.REPLY_MECHANISM
    assert c.ask(f"AUTH PLAIN {plain(ANN, PASSWORD)}") == S.REPLY_AUTH_OK
    assert c.ask(f"AUTH PLAIN {plain(ANN, PASSWORD)}") == S.REPLY_AUTH_ONCE
    for other in (BOB, "away@example.org", "someone@remote.example", ""):
        assert c.ask(f"MAIL FROM:<{other}>").startswith("553 5.7.1"), other
    assert c.ask("MAIL FROM:<ann.alias@example.org>") == H.REPLY_SENDER_OK
    c.ask("RSET")
    reply = send_mail(c, ANN, ["friend@remote.example", BOB], b"To: friend@remote.example\r\n\r\nhi\r\n.\r\n")
    assert reply.startswith("250 2.0.0")
    assert queued(database) == [(ANN, "submission", "friend@remote.example", "queued"), (ANN, "submission", BOB, "delivered")]
    [copy] = mailbox(store, BOB)
    assert b"with ESMTPA" in copy and b"\r\nFrom: <ann@example.org>\r\n" in copy and b"\r\nMessage-ID: <" in copy


def test_submission_auth_login_and_cancel(smtp):
    c = smtp(port="submission")
    assert c.ask("AUTH LOGIN") == "334 " + base64.b64encode(b"Username:").decode()
    assert c.ask(base64.b64encode(ANN.encode()).decode()) == "334 " + base64.b64encode(b"Password:").decode()
    assert c.ask(base64.b64encode(PASSWORD.encode()).decode()) == S.REPLY_AUTH_OK
    d = smtp(port="submission")
    assert d.ask("AUTH PLAIN") == "334 "
    assert d.ask("*") == S.REPLY_AUTH_CANCELLED
    assert d.ask("AUTH PLAIN !!!") == S.REPLY_AUTH_MALFORMED


def test_submission_takes_no_password_in_the_clear_outside_trusted_networks(make_app, client_factory, store, certificate):  # noqa: F811
    cert, key = certificate
    app = make_app(smtp={"listen": (), "submission": (("127.0.0.1", 0),)}, tls={"certfile": cert, "keyfile": key},
                   auth={"plaintext_networks": (), "bcrypt_rounds": 4, "failure_delay": 0.0})
    app.context.delivery = DeliveryPool(app.store, app.config)  # (its threads not started)
    c = client_factory(app.address("submission"))
    c.line()
    c.send("EHLO client.example")
    assert not any("AUTH" in line for line in read_reply(c))
    assert c.ask(f"AUTH PLAIN {plain(ANN, PASSWORD)}") == S.REPLY_ENCRYPTION_REQUIRED
    with smtplib.SMTP(*app.address("submission"), timeout=10) as client:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        client.starttls(context=ctx)
        client.login(ANN, PASSWORD)  # over TLS: offered and accepted
        client.sendmail(ANN, [BOB], b"Subject: over tls\r\n\r\nsecret\r\n")
    assert b"with ESMTPSA" in mailbox(store, BOB)[0]


def test_smtplib_to_port_25_and_implicit_tls_submission(smtp_app, store):
    with smtplib.SMTP(*smtp_app.address("smtp"), timeout=10) as client:
        refused = client.sendmail("x@remote.example", [BOB, "nobody@example.org"], b"Subject: a\r\n\r\nbody\r\n")
        assert refused == {"nobody@example.org": (550, b"5.1.1 <nobody@example.org>: Recipient address rejected: User unknown")}
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP_SSL(*smtp_app.address("submissions"), timeout=10, context=ctx) as client:
        client.login(ANN, PASSWORD)
        client.sendmail(ANN, [BOB], b"Subject: b\r\n\r\nbody\r\n")
    assert len(mailbox(store, BOB)) == 2


SWAKS = shutil.which("swaks")


def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SWAKS, "--timeout", "20", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.interop
@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
def test_swaks_port_25_plain_pipelining_starttls(smtp_app, store):
    host, port = smtp_app.address("smtp")
    base = ["--server", host, "--port", str(port), "--from", "x@remote.example", "--to", BOB, "--ehlo", "client.example"]
    assert swaks(*base).returncode == 0
    assert swaks(*base, "--pipeline").returncode == 0
    assert swaks(*base, "--tls").returncode == 0
    denied = swaks(*base[:-4], "--to", "x@elsewhere.example")
    assert denied.returncode != 0 and "554 5.7.1" in denied.stdout
    assert len(mailbox(store, BOB)) == 3


@pytest.mark.interop
@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
def test_swaks_submission_auth_to_a_mailbox_read_back_by_poplib(smtp_app, store):
    host, port = smtp_app.address("submission")
    tls_host, tls_port = smtp_app.address("submissions")
    # (swaks ends the text with CRLF . CRLF itself: a final line end of ours would add a line)
    body = "Subject: through submission\r\nX-Test: kept\r\n\r\nline one\r\n.line with a dot\r\nline three"
    common = ["--from", ANN, "--to", BOB, "--auth-user", ANN, "--auth-password", PASSWORD, "--data", body]
    assert swaks("--server", host, "--port", str(port), "--tls", "--auth", "PLAIN", *common).returncode == 0
    assert swaks("--server", tls_host, "--port", str(tls_port), "--tlsc", "--auth", "LOGIN", *common).returncode == 0
    wrong = swaks("--server", host, "--port", str(port), "--tls", "--auth", "PLAIN", *common[:6],
                  "--auth-password", "wrong")
    assert wrong.returncode != 0 and "535 5.7.8" in wrong.stdout
    pop = poplib.POP3(*smtp_app.address("pop3"), timeout=10)
    pop.user(BOB)
    pop.pass_(PASSWORD)
    assert pop.stat()[0] == 2
    for n in (1, 2):
        lines = pop.retr(n)[1]
        at = lines.index(b"Subject: through submission")
        assert lines[at:at + 2] == [b"Subject: through submission", b"X-Test: kept"]
        assert lines[-3:] == [b"line one", b".line with a dot", b"line three"]
    pop.quit()


def test_submission_cram_md5_when_enabled(make_app, client_factory, store):
    from mailsrv.auth import cram_md5_digest

    app = make_app(smtp={"listen": (), "submission": (("127.0.0.1", 0),)},
                   auth={"cram_md5": True, "bcrypt_rounds": 4, "failure_delay": 0.0})
    c = client_factory(app.address("submission"))
    c.line()
    c.send("EHLO client.example")
    assert "250 AUTH PLAIN LOGIN CRAM-MD5" in read_reply(c)
    challenge_line = c.ask("AUTH CRAM-MD5")
    assert challenge_line.startswith("334 ")
    challenge = base64.b64decode(challenge_line[4:])
    wrong = base64.b64encode(f"{ANN} {cram_md5_digest('wrong', challenge)}".encode()).decode()
    assert c.ask(wrong) == S.REPLY_AUTH_FAILED
    challenge = base64.b64decode(c.ask("AUTH CRAM-MD5")[4:])  # a fresh challenge each time
    assert c.ask(base64.b64encode(f"{ANN} {cram_md5_digest(PASSWORD, challenge)}".encode()).decode()) == S.REPLY_AUTH_OK


def test_received_names_the_tls_version_and_cipher(smtp_app, store):
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(*smtp_app.address("smtp"), timeout=10) as client:
        client.starttls(context=ctx)
        client.sendmail("x@remote.example", [BOB], b"Subject: tls\r\n\r\nbody\r\n")
    [copy] = mailbox(store, BOB)
    received = copy.split(b"Received: ", 1)[1].split(b";", 1)[0]
    assert b"(using TLSv1.3 TLS_" in received and b"with ESMTPS" in received
