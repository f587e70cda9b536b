"""The outbound relay on SQLite and PostgreSQL, against SMTP servers started by the tests
(aiosmtpd) that answer scripted codes, and a DNS server of the tests' own for MX."""

from __future__ import annotations

import socket
import ssl
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from sqlalchemy import text

from mailsrv.auth import hash_password
from mailsrv.delivery import relay as relaymod
from mailsrv.delivery.relay import Destinations, Relay
from mailsrv.delivery.worker import Worker

from .conftest import make_config
from .test_server import certificate  # noqa: F401  (fixture)

ANN = "ann@example.org"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Script:
    """An aiosmtpd handler answering scripted codes: per recipient at RCPT, and in turn
    after the final dot; what it accepted is kept."""

    def __init__(self):
        self.rcpt: dict[str, str] = {}
        self.after_dot: list[str] = []
        self.received: list[tuple[str, list[str], bytes]] = []
        self.logins: list[str] = []

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address in self.rcpt:
            return self.rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.after_dot:
            reply = self.after_dot.pop(0)
            if not reply.startswith("250"):
                return reply
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 OK: queued as X1"


@pytest.fixture
def smarthost():
    started: list[Controller] = []

    def start(script: Script | None = None, port: int | None = None, hostname: str = "127.0.0.1",
              **kwargs) -> tuple[Script, Controller]:
        script = script or Script()
        controller = Controller(script, hostname=hostname, port=port or free_port(), **kwargs)
        controller.start()
        started.append(controller)
        return script, controller

    yield start
    for controller in started:
        try:
            controller.stop()
        except (AssertionError, RuntimeError):
            pass


@pytest.fixture
def relay_for(store, accounts, db_url, tmp_path):
    """A Relay with these [delivery] settings (and a local worker, for bounces)."""
    def make(**delivery) -> tuple[Relay, Worker]:
        config = make_config(db_url, tmp_path, delivery={"workers": 0, "relay_tls": "none", **delivery})
        worker = Worker(store, config, "t1")
        return Relay(store, config, Destinations(config), "r1", bounce=worker.bounce), worker
    return make


def rows(database) -> list[tuple]:
    with database.read_core() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT r.recipient, r.state, r.attempts, r.last_error FROM queue_recipients r JOIN queue q"
            " ON q.id = r.queue_id WHERE q.origin != 'bounce' ORDER BY r.id"))]


def bounces(database) -> list[tuple[str, bytes]]:
    with database.read_core() as conn:
        return [(r[0], bytes(r[1])) for r in conn.execute(text(
            "SELECT r.recipient, q.body FROM queue q JOIN queue_recipients r ON r.queue_id = q.id"
            " WHERE q.origin = 'bounce' ORDER BY q.id"))]


BODY = b"From: ann@example.org\r\nTo: x@remote.example\r\nSubject: out\r\n\r\nhello\r\n.dot line\r\n"


def test_delivered_with_the_right_envelope(store, database, smarthost, relay_for):
    script, server = smarthost()
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}")
    store.queue.enqueue(ANN, BODY, ["x@remote.example", "y@other.example"], "mpp")
    assert relay.run_once() == 2
    [(sender, recipients, content)] = script.received  # one session, one transaction
    assert (sender, sorted(recipients)) == (ANN, ["x@remote.example", "y@other.example"])
    assert content == BODY
    assert [r[:2] for r in rows(database)] == [("x@remote.example", "delivered"), ("y@other.example", "delivered")]
    assert "250 2.0.0 OK: queued as X1" in rows(database)[0][3]
    assert relay.run_once() == 0


def test_451_then_250_is_delivered_once(store, database, smarthost, relay_for):
    script, server = smarthost()
    script.rcpt["x@remote.example"] = "451 4.3.0 try later"
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}")
    store.queue.enqueue(ANN, BODY, ["x@remote.example"], "mpp")
    relay.run_once()
    assert rows(database) == [("x@remote.example", "queued", 1, "127.0.0.1 said: 451 4.3.0 try later (in reply to RCPT)")]
    assert relay.run_once() == 0  # not due before the backoff
    del script.rcpt["x@remote.example"]
    store.queue_admin.flush()
    assert relay.run_once() == 1
    assert len(script.received) == 1 and rows(database)[0][1] == "delivered"


def test_one_refused_recipient_of_three_bounces_with_the_reply(store, database, smarthost, relay_for):
    script, server = smarthost()
    script.rcpt["b@remote.example"] = "550 5.1.1 no such user b"
    relay, worker = relay_for(relayhost=f"127.0.0.1:{server.port}")
    store.queue.enqueue(ANN, BODY, ["a@remote.example", "b@remote.example", "c@remote.example"], "mpp")
    relay.run_once()
    assert sorted(script.received[0][1]) == ["a@remote.example", "c@remote.example"]
    assert [r[1] for r in rows(database)] == ["delivered", "failed", "delivered"]
    [(to, report)] = bounces(database)
    assert to == ANN
    assert b"Final-Recipient: rfc822; b@remote.example" in report and b"550 5.1.1 no such user b" in report
    assert b"Status: 5.1.1" in report and b"Subject: out" in report  # the original header is attached
    worker.run_once()  # the bounce goes to the local sender's mailbox
    assert len(store.maildrops.snapshot(store.directory.find_account(ANN).id)) == 1


@pytest.mark.parametrize("reply,state", [("451 4.3.0 queue full", "queued"), ("554 5.7.1 spam", "failed")])
def test_replies_after_the_final_dot(store, database, smarthost, relay_for, reply, state):
    script, server = smarthost()
    script.after_dot = [reply]
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}")
    store.queue.enqueue(ANN, BODY, ["x@remote.example"], "mpp")
    relay.run_once()
    assert rows(database)[0][1] == state and reply in rows(database)[0][3]
    assert len(bounces(database)) == (state == "failed")


def test_421_during_rcpt_is_retried(store, database, smarthost, relay_for):
    script, server = smarthost()
    script.rcpt["x@remote.example"] = "421 4.7.0 closing"
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}")
    store.queue.enqueue(ANN, BODY, ["x@remote.example", "y@remote.example"], "mpp")
    relay.run_once()
    # 421 closes the session (RFC 5321 section 3.8): both are retried, neither sent nor bounced
    assert [r[1:3] for r in rows(database)] == [("queued", 1), ("queued", 1)]
    assert "421 4.7.0 closing" in rows(database)[0][3]
    assert script.received == [] and not bounces(database)


def test_a_failed_bounce_never_bounces(store, database, smarthost, relay_for):
    script, server = smarthost()
    script.rcpt["x@remote.example"] = "550 5.1.1 gone"
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}")
    store.queue.enqueue("", b"Subject: a bounce\r\n\r\nx\r\n", ["x@remote.example"], "bounce")
    relay.run_once()
    with database.read_core() as conn:
        states = conn.execute(text("SELECT state FROM queue_recipients")).scalars().all()
        count = conn.execute(text("SELECT count(*) FROM queue")).scalar()
    assert states == ["failed"] and count == 1


def test_lifetime_expiry_bounces_with_the_last_reason(store, database, smarthost, relay_for):
    script, server = smarthost()
    script.rcpt["x@remote.example"] = "452 4.2.2 mailbox full"
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}", queue_lifetime=0.0)
    store.queue.enqueue(ANN, BODY, ["x@remote.example"], "mpp")
    relay.run_once()
    recipient, state, _, error = rows(database)[0]
    assert state == "failed" and error.startswith("5.4.7 delivery time expired; last error:") and "452 4.2.2" in error
    [(_, report)] = bounces(database)
    assert b"452 4.2.2 mailbox full" in report


def test_smarthost_down_then_up(store, database, smarthost, relay_for):
    port = free_port()
    relay, _ = relay_for(relayhost=f"127.0.0.1:{port}")
    store.queue.enqueue(ANN, BODY, ["x@remote.example"], "mpp")
    relay.run_once()
    recipient, state, attempts, error = rows(database)[0]
    assert (state, attempts) == ("queued", 1) and "Connection refused" in error
    script, _ = smarthost(port=port)
    store.queue_admin.flush()
    relay.run_once()
    assert rows(database)[0][1] == "delivered" and len(script.received) == 1


def test_credentials_are_never_sent_without_tls(store, database, smarthost, relay_for):
    script, server = smarthost()  # (it offers no STARTTLS)
    store.queue.enqueue(ANN, BODY, ["x@remote.example"], "mpp")
    for mode, why in (("may", "no TLS, so the relay password is not sent"), ("starttls", "offers no STARTTLS")):
        relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}", relay_tls=mode,
                             relay_username="me", relay_password="secret")
        store.queue_admin.flush()
        relay.run_once()
        recipient, state, _, error = rows(database)[0]
        assert state == "queued" and why in error, error
    assert script.received == []


# --- MX lookups against a DNS server of the tests' own -----------------------------------


class TinyDns:
    """A UDP DNS server answering from a dict {(name, type): [rdata text]}; names in
    ``servfail`` answer SERVFAIL, names not in the zone NXDOMAIN."""

    def __init__(self, zone: dict[tuple[str, str], list[str]], servfail: set[str] = frozenset()):
        self.zone, self.servfail = zone, servfail
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            kind = dns.rdatatype.to_text(question.rdtype)
            if name in self.servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif not any(n == name for n, _ in self.zone):
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif (name, kind) in self.zone:
                response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", kind, self.zone[(name, kind)]))
            response.flags |= dns.flags.AA
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def mx_world(smarthost, monkeypatch):
    """Two SMTP servers on 127.0.0.2 and 127.0.0.3 (one port, as MX hosts share port 25),
    and DNS for them."""
    port = free_port()
    monkeypatch.setattr(relaymod, "SMTP_PORT", port)
    first, _ = smarthost(port=port, hostname="127.0.0.2")
    second, _ = smarthost(port=port, hostname="127.0.0.3")
    zone = {
        ("pref.example", "MX"): ["20 mx2.pref.example.", "10 mx1.pref.example."],
        ("mx1.pref.example", "A"): ["127.0.0.2"], ("mx2.pref.example", "A"): ["127.0.0.3"],
        ("fallback.example", "MX"): ["10 dead.fallback.example.", "20 mx2.pref.example."],
        ("dead.fallback.example", "A"): ["127.0.0.9"],
        ("nomx.example", "A"): ["127.0.0.3"],
        ("nullmx.example", "MX"): ["0 ."],
    }
    server = TinyDns(zone, servfail={"broken.example"})
    yield first, second, server
    server.close()


@pytest.mark.parametrize("domain,where", [
    ("pref.example", "first"), ("fallback.example", "second"), ("nomx.example", "second"),
])
def test_mx_delivery(store, database, relay_for, mx_world, domain, where):
    first, second, dns_server = mx_world
    relay, _ = relay_for(resolver=f"127.0.0.1:{dns_server.port}")
    store.queue.enqueue(ANN, BODY, [f"x@{domain}"], "mpp")
    relay.run_once()
    assert rows(database)[0][1] == "delivered", rows(database)
    assert len((first if where == "first" else second).received) == 1
    assert len((second if where == "first" else first).received) == 0


@pytest.mark.parametrize("domain,state,status", [
    ("nxdomain.example", "failed", "5.1.2 domain"), ("nullmx.example", "failed", "5.1.10 domain"),
    ("broken.example", "queued", "DNS lookup of broken.example MX failed"),
])
def test_mx_failures(store, database, relay_for, mx_world, domain, state, status):
    _, _, dns_server = mx_world
    relay, _ = relay_for(resolver=f"127.0.0.1:{dns_server.port}")
    store.queue.enqueue(ANN, BODY, [f"x@{domain}"], "mpp")
    relay.run_once()
    recipient, got_state, _, error = rows(database)[0]
    assert got_state == state and error.startswith(status), error


def test_pool_relays_what_a_session_posts(make_app, client_factory, smarthost, store):
    """End to end: submission of mail to a remote address wakes a relay thread at once."""
    script, server = smarthost()
    store.directory.add_account("carol@example.org", hash_password("pw", 4))
    app = make_app(smtp={"listen": (), "submission": (("127.0.0.1", 0),)},
                   delivery={"workers": 1, "relayhost": f"127.0.0.1:{server.port}", "relay_tls": "none"})
    import smtplib
    with smtplib.SMTP(*app.address("submission"), timeout=10) as client:
        client.login("carol@example.org", "pw")
        client.sendmail("carol@example.org", ["far@remote.example"], b"Subject: far\r\n\r\naway\r\n")
    assert app.delivery.wait_until(lambda: len(script.received) == 1, 30)
    assert script.received[0][:2] == ("carol@example.org", ["far@remote.example"])


@pytest.fixture
def trusted_certificate(certificate, monkeypatch):  # noqa: F811
    """The tests' self-signed certificate for localhost, trusted as an authority."""
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


def accept_login(logins):
    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((mechanism, auth_data.login, auth_data.password))
        return AuthResult(success=True)
    return authenticator


@pytest.mark.parametrize("mode", ["starttls", "tls", "may"])
def test_relayhost_over_tls_with_login(store, database, smarthost, relay_for, trusted_certificate, mode):
    logins: list = []
    options = {"ssl_context": trusted_certificate} if mode == "tls" else {"tls_context": trusted_certificate}
    # (aiosmtpd counts only STARTTLS as TLS for auth_require_tls)
    script, server = smarthost(authenticator=accept_login(logins), auth_require_tls=mode != "tls", **options)
    relay, _ = relay_for(relayhost=f"localhost:{server.port}", relay_tls=mode, relay_username="me",
                         relay_password="secret")
    store.queue.enqueue(ANN, BODY, ["x@remote.example"], "mpp")
    relay.run_once()
    assert rows(database)[0][1] == "delivered", rows(database)
    assert logins == [("PLAIN", b"me", b"secret")] or logins == [("LOGIN", b"me", b"secret")]
    assert len(script.received) == 1


def test_verified_tls_refuses_an_untrusted_certificate(store, database, smarthost, relay_for, certificate):  # noqa: F811
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)  # (not trusted: SSL_CERT_FILE is left alone)
    script, server = smarthost(tls_context=context)
    relay, _ = relay_for(relayhost=f"localhost:{server.port}", relay_tls="starttls")
    store.queue.enqueue(ANN, BODY, ["x@remote.example"], "mpp")
    relay.run_once()
    recipient, state, _, error = rows(database)[0]
    assert state == "queued" and "CERTIFICATE_VERIFY_FAILED" in error
    assert script.received == []


def test_dkim_signed_mail_verifies_against_the_published_key(store, database, smarthost, relay_for, tmp_path):
    """`mailsrv dkim keygen` makes the key and the record; the relay signs mail of the
    domain; dkimpy verifies the relayed message against the record, served by DNS."""
    import re

    import dkim
    import dns.resolver

    from mailsrv import dkim as dkimmod

    config = make_config("sqlite://", tmp_path, dkim={"domains": ("example.org",), "key_dir": str(tmp_path / "keys")})
    _, record = dkimmod.keygen(config, "example.org")
    name, strings = re.fullmatch(r"(\S+)\. IN TXT \( (.+) \)", record).groups()
    assert name == "mailsrv._domainkey.example.org"
    dns_server = TinyDns({(name, "TXT"): [strings]})
    script, server = smarthost()
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}")
    relay.signer = dkimmod.Signer(config)
    store.queue.enqueue(ANN, BODY, ["x@remote.example"], "mpp")
    store.queue.enqueue("someone@elsewhere.example", b"From: someone@elsewhere.example\r\n\r\nx\r\n", ["y@remote.example"], "mpp")
    relay.run_once()
    signed, unsigned = sorted((r[2] for r in script.received), key=len, reverse=True)
    assert signed.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;")
    assert not unsigned.startswith(b"DKIM-Signature")

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = ["127.0.0.1"], dns_server.port

    def txt(qname, timeout=5):
        return b"".join(b"".join(r.strings) for r in resolver.resolve(qname.decode().rstrip("."), "TXT"))

    assert dkim.verify(signed, dnsfunc=txt)
    assert not dkim.verify(signed.replace(b"hello", b"HELLO"), dnsfunc=txt)  # a changed body fails
    dns_server.close()


class Stalling(Script):
    """A smarthost that, at the first message, takes the text and then stalls before its
    reply to the final dot until released; every text it takes is counted."""

    def __init__(self):
        super().__init__()
        self.stalled, self.release = threading.Event(), threading.Event()
        self.taken = threading.Condition()

    async def handle_DATA(self, server, session, envelope):
        import asyncio

        with self.taken:
            self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
            self.taken.notify_all()
        if not self.stalled.is_set():
            self.stalled.set()
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)
        return "250 2.0.0 OK"


def test_sigkill_while_the_smarthost_stalls_after_data(tmp_path, db_url, smarthost):
    """The server is killed while the smarthost holds its reply to the final dot: after
    a restart every message arrives, none is lost, and only that one may come twice."""
    import signal

    from mailsrv.db import Database
    from mailsrv.store import Store

    from .test_app import Served, mailsrv, shipped_config_on_ephemeral_ports

    script, server = smarthost(Stalling())
    conf = shipped_config_on_ephemeral_ports(tmp_path, database=db_url)
    conf.write_text(conf.read_text().replace("relayhost =\n", f"relayhost = 127.0.0.1:{server.port}\n")
                    .replace("relay_tls = may", "relay_tls = none").replace("workers = 2", "workers = 1"))
    assert mailsrv(conf, "domain", "add", "example.org").returncode == 0
    database = Database(db_url)
    store = Store(database)
    for i in range(5):
        store.queue.enqueue(ANN, f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode(), [f"x{i}@remote.example"], "mpp")
    first = Served(conf)
    try:
        assert script.stalled.wait(60)
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    script.release.set()
    again = Served(conf)  # takes back the dead process's leases at once
    try:
        subjects = lambda: [c.split(b"Subject: ")[1].split(b"\r\n")[0] for _, _, c in script.received]  # noqa: E731
        with script.taken:
            assert script.taken.wait_for(lambda: set(subjects()) == {b"m%d" % i for i in range(5)}, 60)
        settled: set[str] = set()
        for line in again.proc.stderr:  # until the restarted server has settled all five
            if " sent (" in line:
                settled.add(line.split("<")[1].split(">")[0])
            if len(settled) == 5:
                break
        with database.read_core() as conn:
            assert conn.execute(text("SELECT state FROM queue_recipients")).scalars().all() == ["delivered"] * 5
        counts = {s: subjects().count(s) for s in set(subjects())}
        assert sorted(counts.values()) in ([1, 1, 1, 1, 1], [1, 1, 1, 1, 2])
    finally:
        assert again.stop(signal.SIGTERM) == 0
        database.dispose()


def test_bounce_to_a_remote_sender_goes_out_with_the_null_sender(store, database, smarthost, relay_for):
    script, server = smarthost()
    script.rcpt["x@remote.example"] = "550 5.1.1 gone"
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}")
    store.queue.enqueue("someone@far.example", BODY, ["x@remote.example"], "smtp")
    relay.run_once()
    [(to, report)] = bounces(database)
    assert to == "someone@far.example"
    relay.run_once()  # the bounce itself, relayed
    [(sender, recipients, content)] = script.received
    assert (sender, recipients) == ("<>", ["someone@far.example"]) and b"550 5.1.1 gone" in content  # MAIL FROM:<>


def test_an_undeliverable_bounce_is_dropped_at_bounce_lifetime(store, database, smarthost, relay_for, caplog):
    script, server = smarthost()
    script.rcpt["someone@far.example"] = "451 4.3.0 later"
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}", bounce_lifetime=0.0)
    store.queue.enqueue("", b"Subject: a bounce\r\n\r\nx\r\n", ["someone@far.example"], "bounce")
    with caplog.at_level("WARNING", logger="mailsrv.relay"):
        relay.run_once()
    with database.read_core() as conn:
        assert conn.execute(text("SELECT state FROM queue_recipients")).scalars().all() == ["failed"]
        assert conn.execute(text("SELECT count(*) FROM queue")).scalar() == 1  # no bounce of it
    assert any("bounce to <someone@far.example> dropped" in r.getMessage() for r in caplog.records)


def test_destination_concurrency_bounds_parallel_sessions(store, database, smarthost, relay_for, monkeypatch):
    """Three relay workers, one destination allowed one session: never two at once."""
    import asyncio

    monkeypatch.setattr(relaymod, "BATCH", 5)  # so that every worker gets a share

    class Counting(Script):
        def __init__(self):
            super().__init__()
            self.open = self.most = 0

        async def handle_MAIL(self, server, session, envelope, address, options):
            self.open += 1
            self.most = max(self.most, self.open)
            await asyncio.sleep(0)
            envelope.mail_from = address
            return "250 OK"

        async def handle_DATA(self, server, session, envelope):
            self.open -= 1
            return await super().handle_DATA(server, session, envelope)

    script, server = smarthost(Counting())
    relays = [relay_for(relayhost=f"127.0.0.1:{server.port}", destination_concurrency=1)[0] for _ in range(3)]
    shared = relays[0].destinations
    for r in relays:
        r.destinations = shared
    for i in range(30):
        store.queue.enqueue(ANN, BODY, [f"x{i}@remote.example"], "mpp")
    barrier = threading.Barrier(3)

    def run(r):
        barrier.wait()
        while r.run_once():
            pass

    threads = [threading.Thread(target=run, args=(r,)) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(script.received) == 30 and script.most == 1


def test_nothing_is_begun_once_half_the_lease_is_gone(store, database, smarthost, relay_for):
    """A batch outliving half its lease gives the rest back (queued, due, no attempt
    counted) rather than sending what another worker may take over."""
    script, server = smarthost()
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}", lease=0.0)
    store.queue.enqueue(ANN, BODY, ["x@remote.example"], "mpp")
    assert relay.run_once() == 1
    assert rows(database) == [("x@remote.example", "queued", 0, None)] and script.received == []
    relay, _ = relay_for(relayhost=f"127.0.0.1:{server.port}")
    relay.run_once()
    assert rows(database)[0][1] == "delivered"
