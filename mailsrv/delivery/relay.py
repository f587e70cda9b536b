"""The outbound relay: mail for domains we do not serve, to a smarthost or the domain's MX.

:meth:`Relay.run_once` leases a batch of due remote recipients (``store.leases.claim_remote``),
groups them by destination (the ``[delivery] relayhost``, or each recipient's domain),
delivers each group over one SMTP session that carries message after message (as Postfix's
connection cache does), and settles every recipient by its own reply while its lease holds
(``store.leases.settle``). A recipient the next hop took is recorded at once, before the
next message goes (a commit that does not wait for the disk: a power cut may send it
again, a crash of mailsrv does not), so a crash sends again at most the message whose
reply it cut off; the other outcomes are settled when the batch ends:

- 2xx to RCPT and to the final dot: ``sent`` (delivered);
- 4xx, a network error, a 421 or a lost connection mid-transaction, an unanswered final
  dot: retried, after a delay that grows with the message's age between ``min_backoff`` and
  ``max_backoff``; once ``queue_lifetime`` (``bounce_lifetime`` for a bounce) would pass,
  the recipient fails with its last error;
- 5xx: failed. The failures of one message in one run make one RFC 3464 bounce to its
  sender, quoting each remote reply (never for the empty sender: a bounce that cannot be
  delivered is dropped and logged).

``last_error`` always says why, with the remote host and its reply.

Where mail goes: with ``[delivery] relayhost`` (``host:port``), everything goes there,
with ``relay_username``/``relay_password`` over AUTH, and ``relay_tls``: ``tls`` (implicit
TLS, certificate verified), ``starttls`` (required and verified: a server without it
defers the mail), ``may`` (STARTTLS when offered, unverified) or ``none``. Credentials
are never sent without TLS unless ``none`` was chosen. Without a relayhost, the domain's
MX records (dnspython; ``[delivery] resolver`` picks a DNS server): in preference order,
ties shuffled, each host tried in turn; no MX means the domain's own address; NXDOMAIN or
a null MX (``0 .``) fail for good, SERVFAIL or a timeout retry. MX hosts get opportunistic
STARTTLS. At most ``destination_concurrency`` sessions run to one destination at once.
Messages of the ``[dkim] domains`` are DKIM-signed on the way out (``mailsrv.dkim``).
"""

from __future__ import annotations

import logging
import random
import smtplib
import ssl
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

import dkim
import dns.exception
import dns.resolver

from .. import metrics
from ..config import Config
from ..dkim import Signer
from ..models import utcnow
from ..store import Action, Claimed, Outcome, Store, lock_holder

log = logging.getLogger("mailsrv.relay")

#: the port of an MX host (RFC 5321); tests point it elsewhere
SMTP_PORT = 25
#: seconds for connecting and for each command's reply (RFC 5321 section 4.5.3.2 asks
#: for minutes; a dead host should not hold a worker that long)
TIMEOUT = 60.0
#: seconds to wait for the reply to the final dot (RFC 5321 section 4.5.3.2.6: 10 minutes)
DATA_TIMEOUT = 600.0
BATCH = 100


class TemporaryFailure(Exception):
    """The destination cannot be reached now: every recipient is retried."""


class PermanentFailure(Exception):
    """The destination will never take mail: every recipient fails (``status``)."""

    def __init__(self, status: str, text: str):
        super().__init__(text)
        self.status = status


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    port: int


class Destinations:
    """Where a destination's mail goes, and how many sessions may run to it at once."""

    def __init__(self, config: Config):
        self.config = config.delivery
        self.resolver = dns.resolver.Resolver(configure=not self.config.resolver)
        if self.config.resolver:
            host, _, port = self.config.resolver.rpartition(":")
            self.resolver.nameservers = [host.strip("[]")]
            self.resolver.port = int(port)
        self.resolver.lifetime = 10.0
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def key(self, claimed: Claimed) -> str:
        return "[relayhost]" if self.config.relayhost else claimed.domain

    def slot(self, key: str) -> threading.BoundedSemaphore:
        with self._lock:
            if key not in self._slots:
                self._slots[key] = threading.BoundedSemaphore(self.config.destination_concurrency)
            return self._slots[key]

    def hosts(self, domain: str) -> list[Host]:
        """The hosts to try for a destination, in order (see the module docstring)."""
        if self.config.relayhost:
            host, _, port = self.config.relayhost.rpartition(":")
            return [Host(host, host.strip("[]"), int(port))]
        try:
            answer = self.resolver.resolve(domain, "MX")
            records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        except dns.resolver.NXDOMAIN:
            raise PermanentFailure("5.1.2", f"domain {domain} does not exist") from None
        except dns.resolver.NoAnswer:
            records = [(0, domain)]  # no MX: the domain's own address (RFC 5321 section 5.1)
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise TemporaryFailure(f"DNS lookup of {domain} MX failed: {exc.__class__.__name__}") from None
        if any(name in ("", ".") for _, name in records):
            raise PermanentFailure("5.1.10", f"domain {domain} accepts no mail (null MX)")
        random.shuffle(records)  # ties in random order ...
        records.sort(key=lambda r: r[0])  # ... preferences in order (the sort is stable)
        hosts = []
        for _, name in records:
            hosts += [Host(name, address, SMTP_PORT) for address in self.addresses(name)]
        if not hosts:
            raise TemporaryFailure(f"no address found for the mail hosts of {domain}")
        return hosts

    def addresses(self, name: str) -> list[str]:
        found = []
        for kind in ("A", "AAAA"):
            try:
                found += [r.to_text() for r in self.resolver.resolve(name, kind)]
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                pass
            except (dns.resolver.NoNameservers, dns.exception.Timeout):
                log.info("DNS lookup of %s %s failed", name, kind)
        return found


#: what a relay attempt came to, for ``mailsrv_relay_attempts_total``
ATTEMPTS = {Action.SENT: "sent", Action.RETRY: "deferred", Action.FAIL: "failed"}


class Relay:
    """One relay worker: ``run_once()`` delivers one leased batch."""

    def __init__(self, store: Store, config: Config, destinations: Destinations, name: str = "r1", bounce=None):
        self.store = store
        self.config = config
        self.destinations = destinations
        self.owner = lock_holder(name)
        self.bounce = bounce
        self.signer = Signer(config)
        self.deadline = 0.0  # (set per batch: see run_once)
        self.data_timeout = DATA_TIMEOUT

    def run_once(self) -> int:
        lease = self.config.delivery.lease
        claimed = self.store.leases.claim_remote(self.owner, lease, BATCH)
        if not claimed:
            return 0
        # no message is begun once half the lease is gone, and none may take longer than
        # the other half: a recipient is never sent by two workers at once
        self.deadline = time.monotonic() + lease / 2
        self.data_timeout = min(DATA_TIMEOUT, lease / 2)
        groups: dict[str, list[Claimed]] = defaultdict(list)
        for c in claimed:
            groups[self.destinations.key(c)].append(c)
        outcomes: list[Outcome] = []
        for key, items in groups.items():
            outcomes += self.deliver(key, items)
        self.record(outcomes)
        return len(claimed)

    def record(self, outcomes: list[Outcome], durable: bool = True) -> None:
        """Settle outcomes (see ``Leases.settle`` for ``durable``), counted and logged."""
        if not outcomes:
            return
        applied = self.store.leases.settle(self.owner, outcomes, _no_copy, self.bounce, durable=durable)
        metrics.count_settled(applied, "remote")
        for outcome in applied:
            if outcome.action in ATTEMPTS:  # (a recipient given back untried was not an attempt)
                metrics.RELAY_ATTEMPTS.labels(ATTEMPTS[outcome.action]).inc()
            c = outcome.claimed
            log.info("queue %d: <%s> %s%s", c.queue_id, c.recipient, outcome.action,
                     f" ({outcome.error})" if outcome.error else "")

    def deliver(self, key: str, items: list[Claimed]) -> list[Outcome]:
        """Deliver a destination's recipients: one session, message after message."""
        with self.destinations.slot(key):
            try:
                hosts = self.destinations.hosts(items[0].domain)
            except PermanentFailure as exc:
                return [Outcome(c, Action.FAIL, status=exc.status, error=str(exc)) for c in items]
            except TemporaryFailure as exc:
                return [self.retry(c, "4.4.3", str(exc)) for c in items]
            by_message: dict[int, list[Claimed]] = defaultdict(list)
            for c in items:
                by_message[c.queue_id].append(c)
            session: smtplib.SMTP | None = None
            host: Host | None = None
            outcomes: list[Outcome] = []
            try:
                for queue_id, recipients in by_message.items():
                    if time.monotonic() > self.deadline:  # the lease is half gone: the rest go back
                        outcomes += [Outcome(c, Action.RELEASE) for c in recipients]
                        continue
                    if session is None:
                        try:
                            session, host = self.open(hosts)
                        except TemporaryFailure as exc:
                            outcomes += [self.retry(c, "4.4.1", str(exc)) for c in recipients]
                            continue
                    try:
                        body = self.signer.sign(recipients[0].sender, self.store.queue.bodies([queue_id])[queue_id])
                    except (OSError, ValueError, dkim.DKIMException) as exc:  # (logged with each retry)
                        outcomes += [self.retry(c, "4.7.5", f"cannot DKIM-sign: {exc}") for c in recipients]
                        continue
                    done, session = self.send(session, host, recipients, body)
                    # what the next hop took is recorded before the next message goes, so
                    # a crash sends again at most the message whose reply it cut off;
                    # the rest of the batch's outcomes are settled together at its end
                    self.record([o for o in done if o.action == Action.SENT], durable=False)
                    outcomes += [o for o in done if o.action != Action.SENT]
            finally:
                if session is not None:
                    _quit(session)
            return outcomes

    def open(self, hosts: list[Host]) -> tuple[smtplib.SMTP, Host]:
        """A session with the first host that answers, TLS and AUTH done as configured."""
        errors = []
        for host in hosts:
            try:
                return self.connect(host), host
            except TemporaryFailure as exc:
                errors.append(str(exc))
        raise TemporaryFailure("; ".join(errors) or "no host to try")

    def connect(self, host: Host) -> smtplib.SMTP:
        d = self.config.delivery
        relayhost = bool(d.relayhost)
        mode = d.relay_tls if relayhost else "may"
        hostname = self.config.server.hostname
        try:
            if mode == "tls":
                session = smtplib.SMTP_SSL(host.address, host.port, local_hostname=hostname, timeout=TIMEOUT,
                                           context=_verified(host.name))
            else:
                session = smtplib.SMTP(host.address, host.port, local_hostname=hostname, timeout=TIMEOUT)
            session.ehlo()
            if mode in ("may", "starttls"):
                if session.has_extn("starttls"):
                    session.starttls(context=_verified(host.name) if mode == "starttls" else _unverified())
                    session.ehlo()
                elif mode == "starttls":
                    _quit(session)
                    raise TemporaryFailure(f"{host.name} offers no STARTTLS (relay_tls = starttls)")
            if relayhost and d.relay_username:
                encrypted = isinstance(session.sock, ssl.SSLSocket)
                if not encrypted and mode != "none":
                    _quit(session)
                    raise TemporaryFailure(f"{host.name}: no TLS, so the relay password is not sent")
                session.login(d.relay_username, d.relay_password)
            return session
        except smtplib.SMTPAuthenticationError as exc:
            raise TemporaryFailure(f"{host.name} refused the relay login: {reply_line(exc.smtp_code, exc.smtp_error)}") from None
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            raise TemporaryFailure(f"{host.name}[{host.address}]:{host.port}: {exc}") from None

    def send(self, session: smtplib.SMTP, host: Host, recipients: list[Claimed], body: bytes
             ) -> tuple[list[Outcome], smtplib.SMTP | None]:
        """One message's recipients over the session: each one's outcome by its own reply,
        and the session if it can carry the next message (None if it broke)."""
        outcomes: list[Outcome] = []
        accepted: list[Claimed] = []
        try:
            options = ["BODY=8BITMIME"] if session.has_extn("8bitmime") else []
            code, text = _closing(*session.mail(recipients[0].sender, options))
            if code >= 400:
                _reset(session)
                return [self.by_reply(c, host, "MAIL", code, text) for c in recipients], session
            for c in recipients:
                code, text = _closing(*session.rcpt(c.recipient))
                if code < 300:
                    accepted.append(c)
                else:
                    outcomes.append(self.by_reply(c, host, "RCPT", code, text))
            if not accepted:
                _reset(session)
                return outcomes, session
            session.sock.settimeout(self.data_timeout)
            code, text = _closing(*session.data(body))
            session.sock.settimeout(TIMEOUT)
        except smtplib.SMTPDataError as exc:  # DATA itself was refused
            _reset(session)
            return outcomes + [self.by_reply(c, host, "DATA", exc.smtp_code, exc.smtp_error) for c in accepted], session
        except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
            # the connection broke mid-transaction (421, a reset, no reply to the final
            # dot): whoever has no answer yet is retried
            _quit(session)
            answered = {o.claimed.recipient for o in outcomes}
            lost = [self.retry(c, "4.4.2", f"{host.name}: connection lost: {exc}")
                    for c in recipients if c.recipient not in answered]
            return outcomes + lost, None
        if code < 300:
            sent = f"{host.name} said: {reply_line(code, text)}"
            return outcomes + [Outcome(c, Action.SENT, error=sent) for c in accepted], session
        return outcomes + [self.by_reply(c, host, "DATA", code, text) for c in accepted], session

    def by_reply(self, c: Claimed, host: Host, stage: str, code: int, text) -> Outcome:
        why = f"{host.name} said: {reply_line(code, text)} (in reply to {stage})"
        status = enhanced_status(code, text)
        if code >= 500:
            return Outcome(c, Action.FAIL, status=status, error=why)
        return self.retry(c, status, why)

    def retry(self, c: Claimed, status: str, error: str) -> Outcome:
        """Retry after a delay that grows with the message's age, or fail once its
        lifetime would be over."""
        d = self.config.delivery
        age = (utcnow() - c.created_at).total_seconds()
        delay = min(d.max_backoff, max(d.min_backoff, age))
        lifetime = d.bounce_lifetime if c.origin == "bounce" else d.queue_lifetime
        if age + delay > lifetime:
            if c.origin == "bounce":
                log.warning("queue %s: bounce to <%s> dropped after %s: %s", c.queue_id, c.recipient,
                            timedelta(seconds=int(age)), error)
            return Outcome(c, Action.FAIL, status="5.4.7", error=f"delivery time expired; last error: {error}")
        return Outcome(c, Action.RETRY, delay=delay, status=status, error=error)


def load_everything() -> None:
    """Run what imports more on first use (dnspython's record types, smtplib's helpers)
    once, before the server drops its privileges and may no longer read the Python
    installation."""
    import email.base64mime  # noqa: F401  (smtplib's AUTH)
    import email.utils  # noqa: F401  (smtplib's quoteaddr)
    import hmac  # noqa: F401  (smtplib's CRAM-MD5)

    import dns.message
    import dns.rdata
    import dns.rrset

    for kind, sample in (("MX", "10 mx.example."), ("A", "192.0.2.1"), ("AAAA", "2001:db8::1")):
        query = dns.message.make_query("example.org", kind)
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text_list("example.org.", 60, "IN", kind, [sample]))
        dns.message.from_wire(response.to_wire())
        dns.rdata.from_text("IN", kind, sample)


def _no_copy(outcome: Outcome, body: bytes) -> bytes:
    raise AssertionError("the relay delivers to no mailbox")


def _verified(name: str) -> ssl.SSLContext:
    """The host's certificate checked against the system's authorities and its name
    (smtplib checks the name it connected to)."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _unverified() -> ssl.SSLContext:
    """Opportunistic TLS: better than plain text even when the certificate proves nothing."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def reply_line(code: int, text) -> str:
    """A reply as one line for ``last_error`` and bounces: its code and text, whitespace folded."""
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    return f"{code} {' '.join(text.split())}"[:500]


def enhanced_status(code: int, text) -> str:
    """The reply's enhanced status code (RFC 3463), or one made from its basic code."""
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    first = text.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and first[0] == str(code)[0]:
        return first
    return f"{str(code)[0]}.0.0"


def _closing(code: int, text) -> tuple[int, bytes]:
    """A reply, unless it is 421: the server is closing the session (RFC 5321 section
    3.8), which ends it as a lost connection would."""
    if code == 421:
        raise smtplib.SMTPServerDisconnected(reply_line(code, text))
    return code, text


def _reset(session: smtplib.SMTP) -> None:
    try:
        session.rset()
    except (OSError, smtplib.SMTPException):
        pass


def _quit(session: smtplib.SMTP) -> None:
    try:
        session.quit()
    except (OSError, smtplib.SMTPException):
        try:
            session.close()
        except OSError:
            pass
