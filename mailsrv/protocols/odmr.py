"""ODMR, On-Demand Mail Relay (RFC 2645): a customer host with a dynamic address
authenticates, sends ATRN, and the connection turns round so that mailsrv delivers the
mail held for the customer's domains over SMTP.

Decisions where the RFC leaves room (see also docs/design.md, "ODMR"):

- States: START (EHLO, AUTH, QUIT, and STARTTLS when ``[tls]`` is set), AUTHED (ATRN,
  QUIT). ATRN before AUTH answers ``530``; any other command ``502`` (RFC 2645 section
  5.4); a known command in the wrong state ``503``. EHLO lists ``AUTH CRAM-MD5`` (PLAIN
  too, only over TLS) and ``ATRN``.
- AUTH CRAM-MD5 draws a fresh challenge every time, so a replayed response fails; it is
  checked against the account's CRAM secret (``mailsrv user add --cram-md5``). A failure
  is ``535`` after the failure delay, whether the user exists or not, and counts against
  the session's error budget.
- ATRN takes the RFC's grammar exactly: domains separated by commas, no spaces; none means
  every domain granted to the account (``mailsrv odmr grant``). Single-line replies:
  ``501`` bad syntax; ``450`` a named domain not granted (nothing is sent for any) or
  another session turning one of them round now (a live lease in it, on this host or
  another sharing the database); ``453`` no mail waiting; ``451`` the grants cannot be
  checked now; ``250`` and the roles reverse.
- Reversed: mailsrv waits for the customer's ``220`` (at least 10 minutes, RFC 2645
  section 5.2.1), sends EHLO (HELO if refused), then every held message for those domains:
  MAIL FROM, a RCPT for each of its recipients there, DATA with dot-stuffing, message after
  message, pipelined when the customer offers PIPELINING; then QUIT. A recipient the
  customer took (2xx) is recorded delivered the moment its reply is read, before the next
  message goes (a commit that does not wait for the disk), so a crash of mailsrv sends at
  most the one message whose reply it cut off again. The other replies are settled a batch
  of messages (4 MB of text) at a time, and whatever was answered is settled when the turn
  ends however it ends: 4xx held again, 5xx failed with one RFC 3464 bounce (never for the
  empty sender). A connection lost on the way leaves whatever was not answered held, so
  the next ATRN sends exactly those.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import ClassVar

from .. import metrics
from ..db import DatabaseUnavailable
from ..delivery.relay import enhanced_status, reply_line
from ..delivery.worker import Worker
from ..message import dot_stuff_parts
from ..server import LineHandler, ProtocolError
from ..store import Action, Claimed, Outcome, lock_holder
from ..stream import LineStream, ReplyError
from .smtp import SmtpAuth, SmtpReplies

START, AUTHED = "START", "AUTHED"
#: RFC 2645 section 5.3's ABNF for the domains of ATRN
_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
ATRN_DOMAINS = re.compile(rf"{_DOMAIN}(?:,{_DOMAIN})*")
#: how long each read of the customer may take once reversed (RFC 2645 section 5.2.1: 10 min)
REVERSED_TIMEOUT = 600.0
#: how long the held recipients of one turn stay leased; the turn renews the leases of
#: what is left once a quarter of this has passed, so a process that dies frees its
#: domains this soon
TURN_LEASE = 600.0
#: message text read from the database, and answered recipients settled, a batch at a time
BATCH_OCTETS = 4 * 1024 * 1024


class OdmrHandler(SmtpAuth, SmtpReplies, LineHandler):
    protocol = "odmr"
    INITIAL_STATE = START
    STATES: ClassVar = {
        START: frozenset({"EHLO", "AUTH", "QUIT", "ATRN", "STARTTLS"}),
        AUTHED: frozenset({"ATRN", "QUIT"}),
    }
    MAX_BAD_COMMANDS = 10
    AUTH_FAILURES_COUNT = True  # a guesser gets MAX_BAD_COMMANDS tries a connection

    REPLY_UNKNOWN = "502 5.5.1 Error: command not implemented"
    REPLY_UNAVAILABLE = "451 4.3.0 Error: cannot check the domains now, try again later"
    REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"
    REPLY_ATRN_SYNTAX = "501 5.5.4 Syntax: ATRN [domain,domain...]"
    REPLY_NOT_GRANTED = "450 4.7.1 Error: not allowed to collect mail for {domain}"
    REPLY_BUSY = "450 4.3.2 Error: {domain} is being collected by another session"
    REPLY_NO_MAIL = "453 4.3.0 No mail waiting for you"
    REPLY_TURNING = "250 2.0.0 OK now reversing the connection"

    def idle_timeout(self) -> float:
        return self.config.odmr.idle_timeout

    def greet(self) -> None:
        self.account = None
        self.holder = lock_holder(f"odmr-{id(self):x}")
        self.send(f"220 {self.context.hostname} ESMTP on-demand mail relay ready")

    def mechanisms(self) -> list[str]:
        return ["CRAM-MD5", "PLAIN"] if self.tls_active else ["CRAM-MD5"]

    @property
    def plaintext_ok(self) -> bool:
        return self.tls_active  # PLAIN only over TLS, whatever the network

    def logged_in(self) -> None:
        self.state = AUTHED

    # --- the initial state -----------------------------------------------------------

    def cmd_EHLO(self, arg: str) -> None:
        if not arg.strip() or " " in arg.strip():
            raise ProtocolError(self.REPLY_NEED_HOSTNAME)
        lines = [self.context.hostname, "AUTH " + " ".join(self.mechanisms())]
        if self.context.tls_context is not None and not self.tls_active:
            lines.append("STARTTLS")
        self.send_reply(250, [*lines, "ATRN"])

    def cmd_STARTTLS(self, arg: str) -> None:
        if self.context.tls_context is None or self.tls_active:
            raise ProtocolError(self.REPLY_NO_TLS)
        self.send(self.REPLY_TLS_READY)
        self.start_tls()

    def cmd_QUIT(self, arg: str) -> None:
        self.close(self.REPLY_BYE)

    # --- ATRN and the reversed state ---------------------------------------------------

    def cmd_ATRN(self, arg: str) -> None:
        if self.account is None:
            raise ProtocolError(self.REPLY_AUTH_REQUIRED)
        asked = arg.rstrip()  # (the ABNF has one space after ATRN, none inside the list)
        if asked and not ATRN_DOMAINS.fullmatch(asked):
            raise ProtocolError(self.REPLY_ATRN_SYNTAX)
        try:
            granted = self.store.directory.granted_domains(self.account.id)
            domains = sorted({d.lower() for d in asked.split(",")}) if asked else granted
            for domain in domains:
                if domain not in granted:
                    self.log.info("[%s] %s: ATRN %s refused: not granted", self.peer, self.account.address, domain)
                    metrics.ODMR_TURNS.labels("not_granted").inc()
                    raise ProtocolError(self.REPLY_NOT_GRANTED.format(domain=domain), bad=False)
            claimed = self.store.leases.claim_for_turn(self.holder, domains, TURN_LEASE) if domains else []
        except DatabaseUnavailable as exc:
            self.log.warning("[%s] ATRN: database unavailable: %s", self.peer, exc)
            metrics.ODMR_TURNS.labels("unavailable").inc()
            raise ProtocolError(self.REPLY_UNAVAILABLE, bad=False) from None
        if claimed is None:
            metrics.ODMR_TURNS.labels("busy").inc()
            raise ProtocolError(self.REPLY_BUSY.format(domain=",".join(domains)), bad=False)
        if not claimed:
            metrics.ODMR_TURNS.labels("no_mail").inc()
            raise ProtocolError(self.REPLY_NO_MAIL, bad=False)
        self.log.info("[%s] %s: ATRN %s: %d recipient(s) waiting", self.peer, self.account.address,
                      ",".join(domains), len(claimed))
        metrics.ODMR_TURNS.labels("turned").inc()
        self.closing = True  # whatever happens now, the session ends with the turn
        Turn(self, self.turn_round(max(REVERSED_TIMEOUT, self.idle_timeout())), claimed).run(self.REPLY_TURNING)


class Turn:
    """One reversed session: mailsrv, as an SMTP client, delivers the claimed recipients."""

    def __init__(self, handler: OdmrHandler, stream: LineStream, claimed: list[Claimed]):
        self.handler = handler
        self.stream = stream
        self.store = handler.store
        self.log = handler.log
        self.peer = handler.peer
        self.owner = handler.holder
        self.bouncer = Worker(handler.store, handler.config, "odmr")
        self.messages: dict[int, list[Claimed]] = defaultdict(list)
        for c in claimed:
            self.messages[c.queue_id].append(c)
        self.pipelining = False

    def run(self, go_ahead: str) -> None:
        """Say ``go_ahead`` (the 250 to ATRN), then deliver; every claimed recipient is
        settled or held again however this ends."""
        pending = dict(self.messages)
        answered: list[Outcome] = []  # settled a batch at a time (one commit, not one per message)
        renewed = time.monotonic()
        try:
            self.stream.send(go_ahead)
            self.hello()
            for batch in self.batches(list(pending.items())):
                bodies = self.store.queue.bodies(batch)
                if self.pipelining:
                    self.send_pipelined(batch, bodies, pending, answered)
                else:
                    for queue_id in batch:
                        answered += self.record_sent(self.send_message(pending[queue_id], bodies[queue_id]), bodies)
                        del pending[queue_id]  # (answered: not held again below)
                answered = self.settle(answered, bodies)
                if pending and time.monotonic() - renewed > TURN_LEASE / 4:
                    self.store.leases.renew(self.owner, [c for rs in pending.values() for c in rs], TURN_LEASE)
                    renewed = time.monotonic()
            self.stream.send("QUIT")
            self.stream.read_reply()
        except (ReplyError, OSError, ValueError) as exc:
            self.log.info("[%s] turn ended early: %s", self.peer, exc)
        finally:  # what was answered is settled; what was not waits for the next ATRN
            left = [c for recipients in pending.values() for c in recipients]
            self.settle(answered + [Outcome(c, Action.HOLD) for c in left])

    @staticmethod
    def batches(messages: list[tuple[int, list[Claimed]]]):
        """The queue ids in order, in batches of at most BATCH_OCTETS of message text (one
        larger message makes a batch of its own)."""
        batch, octets = [], 0
        for queue_id, recipients in messages:
            size = recipients[0].size
            if batch and octets + size > BATCH_OCTETS:
                yield batch
                batch, octets = [], 0
            batch.append(queue_id)
            octets += size
        if batch:
            yield batch

    def hello(self) -> None:
        greeting = self.stream.read_reply()
        if greeting.code != 220:
            raise ReplyError(f"the customer greeted with {greeting.code}")
        hostname = self.handler.context.hostname
        self.stream.send(f"EHLO {hostname}")
        reply = self.stream.read_reply()
        if reply.code == 250:
            self.pipelining = any(line.upper().split(" ")[0] == "PIPELINING" for line in reply.lines[1:])
            return
        self.stream.send(f"HELO {hostname}")
        if self.stream.read_reply().code != 250:
            raise ReplyError("the customer refused EHLO and HELO")

    def send_message(self, recipients: list[Claimed], body: bytes) -> list[Outcome]:
        """One message to the customer: the outcome of each of its recipients. Pipelined
        (RFC 2920: MAIL, every RCPT and DATA at once, the replies read in order) when the
        customer offers it, else one command at a time."""
        mail_from = f"MAIL FROM:<{recipients[0].sender}>"
        rcpts = [f"RCPT TO:<{c.recipient}>" for c in recipients]
        if self.pipelining:
            self.stream.send_lines([mail_from, *rcpts, "DATA"])
            mail = self.stream.read_reply()
            answers = [self.stream.read_reply() for _ in rcpts]
            data = self.stream.read_reply()
        else:
            mail = self.ask(mail_from)
            if mail.code >= 400:
                return [self.by_reply(c, mail) for c in recipients]
            answers = [self.ask(line) for line in rcpts]
            data = self.ask("DATA") if any(r.code < 400 for r in answers) else None
        if mail.code >= 400:
            if data is not None and data.code == 354:
                self.ask(".")  # (an empty text for the DATA that went through: refused)
            return [self.by_reply(c, mail) for c in recipients]
        accepted = [c for c, r in zip(recipients, answers, strict=True) if r.code < 400]
        outcomes = [self.by_reply(c, r) for c, r in zip(recipients, answers, strict=True) if r.code >= 400]
        if data is None:  # every recipient refused (not pipelined): end the transaction
            self.ask("RSET")
            return outcomes
        if data.code != 354:
            return outcomes + [self.by_reply(c, data) for c in accepted]
        if not accepted:
            self.ask(".")
            return outcomes
        self.stream.send_text(body)
        final = self.stream.read_reply()
        return outcomes + [self.by_reply(c, final) for c in accepted]

    def send_pipelined(self, batch: list[int], bodies: dict[int, bytes], pending: dict[int, list[Claimed]],
                       answered: list[Outcome]) -> None:
        """A batch of messages pipelined across messages too (RFC 2920 section 3.1: the
        text's final dot may be followed by the next message's commands), so a message
        costs one round trip: each text goes out with the next message's MAIL, RCPTs and
        DATA. Each message's outcomes go to ``answered`` and it leaves ``pending`` as soon
        as its last reply is read."""
        def group(queue_id: int) -> list[str]:
            recipients = pending[queue_id]
            return [f"MAIL FROM:<{recipients[0].sender}>", *[f"RCPT TO:<{c.recipient}>" for c in recipients], "DATA"]

        self.stream.send_lines(group(batch[0]))
        for i, queue_id in enumerate(batch):
            recipients = pending[queue_id]
            mail = self.stream.read_reply()
            answers = [self.stream.read_reply() for _ in recipients]
            data = self.stream.read_reply()
            following = [f"{line}\r\n".encode() for line in group(batch[i + 1])] if i + 1 < len(batch) else []
            if mail.code >= 400:
                outcomes, accepted = [self.by_reply(c, mail) for c in recipients], []
            else:
                accepted = [c for c, r in zip(recipients, answers, strict=True) if r.code < 400]
                outcomes = [self.by_reply(c, r) for c, r in zip(recipients, answers, strict=True) if r.code >= 400]
            if data.code == 354:  # the text (an empty one when no recipient is left), then the next commands
                text = dot_stuff_parts(bodies[queue_id]) if accepted else [b".\r\n"]
                self.stream.send_parts([*text, *following])
                final = self.stream.read_reply()
                outcomes += [self.by_reply(c, final) for c in accepted]
            else:
                outcomes += [self.by_reply(c, data) for c in accepted]
                if following:
                    self.stream.send_parts(following)
            answered += self.record_sent(outcomes, bodies)
            del pending[queue_id]

    def ask(self, line: str):
        self.stream.send(line)
        return self.stream.read_reply()

    def by_reply(self, c: Claimed, reply) -> Outcome:
        customer_said = f"customer said: {reply_line(reply.code, reply.text)}"
        if reply.code < 400:
            return Outcome(c, Action.SENT, error=customer_said)
        if reply.code < 500:
            return Outcome(c, Action.HOLD, error=customer_said)
        return Outcome(c, Action.FAIL, status=enhanced_status(reply.code, reply.text), error=customer_said)

    def record_sent(self, outcomes: list[Outcome], bodies: dict[int, bytes]) -> list[Outcome]:
        """Settle at once the recipients the customer took (``sent``), before the next
        message goes, so that a crash sends again at most the message whose reply it cut
        off; return the other outcomes, which are settled a batch at a time."""
        self.settle([o for o in outcomes if o.action == Action.SENT], bodies, durable=False)
        return [o for o in outcomes if o.action != Action.SENT]

    def settle(self, outcomes: list[Outcome], bodies: dict[int, bytes] | None = None,
               durable: bool = True) -> list[Outcome]:
        """Apply the outcomes (nothing when there are none; ``bodies``, the batch's text,
        spares reading it again; ``durable``: see ``Leases.settle``); return an empty
        list to collect the next ones in."""
        if not outcomes:
            return []
        applied = self.store.leases.settle(self.owner, outcomes, Worker.local_copy, self.bouncer.bounce, bodies,
                                           durable=durable)
        metrics.count_settled(applied, "odmr")
        for outcome in applied:
            self.log.info("queue %d: <%s> %s%s", outcome.claimed.queue_id, outcome.claimed.recipient, outcome.action,
                          f" ({outcome.error})" if outcome.error else "")
        return []
