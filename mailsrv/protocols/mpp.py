"""MPP, the Message Posting Protocol (RFC 1204): USER, PASS, DATA, NOOP, QUIT.

The "can only be used" conditions of RFC 1204 section 2.3 are the state table, to the
letter (decisions in docs/design.md, "MPP"):

========  ===========================================  =======================
state     how it is reached                            allowed
========  ===========================================  =======================
START     the session has just started                 USER NOOP QUIT
USER      USER answered 250                            PASS NOOP QUIT
AUTHED    PASS answered 250                            DATA NOOP QUIT
POSTED    a message text answered 250                  USER DATA NOOP QUIT
FAILED    PASS answered 530                            NOOP QUIT
REFUSED   a message text answered 451 or 550           NOOP QUIT
========  ===========================================  =======================

500, 501 and 503 replies do not change the state; anything not allowed answers 503. NOOP
never changes the state; QUIT always answers 221. USER answers 250 for any syntactically
valid address (no user enumeration); PASS checks bcrypt (a dummy hash for unknown users)
and answers 530 after the failure delay. Passwords are taken only from
``[auth] plaintext_networks`` or over TLS (``[mpp] listen_tls``).

The text (after 354) is read by the I/O layer's lenient mode (``mailsrv.stream``):
dot-unstuffed, bare LF taken as CRLF, and the size limit enforced while reading (the rest
is read and dropped, never buffered; 550). A session cut off because the server stops
hears 421, SMTP's "closing transmission channel" (RFC 1204 has no code of its own for it).
Recipients come from the header as ``sendmail -t`` takes them (Resent- fields first); Bcc
and Resent-Bcc fields are removed from the copy but still delivered. From absent: mailsrv
adds ``From: <poster>``. From naming someone else: ``[mpp] from_policy = sender`` adds
``Sender: <poster>``, ``reject`` refuses (550). Received, Message-ID and Date are added
where missing; more than ``[smtp] max_received_headers`` Received fields is a loop (550).
250 is sent only once the message and all its recipients are committed to the queue; 451
when it could not be queued (nothing half-written stays), 550 when it never will be. A
client that disconnects during the text queues nothing.
"""

from __future__ import annotations

from email.utils import formatdate
from typing import ClassVar

from .. import message as msg
from ..db import DatabaseUnavailable
from ..server import LineHandler, ProtocolError

START, USER_GIVEN, AUTHED, POSTED, FAILED, REFUSED = (
    "START", "USER", "AUTHED", "POSTED", "FAILED", "REFUSED",
)

class Refusal(Exception):
    """The message will never be accepted: 550 with this reason."""


class MppHandler(LineHandler):
    protocol = "mpp"
    INITIAL_STATE = START
    STATES: ClassVar = {
        START: frozenset({"USER", "NOOP", "QUIT"}),
        USER_GIVEN: frozenset({"PASS", "NOOP", "QUIT"}),
        AUTHED: frozenset({"DATA", "NOOP", "QUIT"}),
        POSTED: frozenset({"USER", "DATA", "NOOP", "QUIT"}),
        FAILED: frozenset({"NOOP", "QUIT"}),
        REFUSED: frozenset({"NOOP", "QUIT"}),
    }
    MAX_BAD_COMMANDS = 20
    READ_BUFFER = 8192  # the message text is read through it (peek), a chunk at a time

    REFUSAL = "451 Local error encountered: too many connections, try again later."
    BANNED = "451 Local error encountered: too many failed logins from your address, try again later."
    REPLY_UNKNOWN = "500 Command unrecognized."
    REPLY_WRONG_STATE = "503 Illegal command sequence."
    REPLY_TOO_LONG = "500 Command unrecognized: line too long."
    REPLY_BAD_CHARS = "500 Command unrecognized: invalid characters."
    REPLY_TOO_MANY_ERRORS = "451 Local error encountered: too many bad commands, closing connection."
    REPLY_TIMEOUT = "451 Local error encountered: idle for too long, closing connection."
    REPLY_INTERNAL = "451 Local error encountered."
    REPLY_UNAVAILABLE = "451 Local error encountered: mail store unavailable, try again later."
    REPLY_SHUTDOWN = "421 Service not available: server shutting down, closing connection."
    REPLY_NOT_QUEUED = "451 Local error encountered: the message has not been queued, try again later."

    def idle_timeout(self) -> float:
        return self.config.mpp.idle_timeout

    def greet(self) -> None:
        self.user = ""
        self.account = None
        self.send(f"220 {self.context.hostname} Message Posting Service Ready.")

    # --- commands ----------------------------------------------------------------------

    def cmd_USER(self, arg: str) -> None:
        """USER address: 250 for any syntactically valid address."""
        name = arg.strip()
        if not msg.is_address(name) or arg != arg.lstrip():
            raise ProtocolError("501 Argument syntax error: USER takes the full address.")
        self.user, self.account, self.state = name, None, USER_GIVEN
        self.send("250 Command OK.")

    def cmd_PASS(self, arg: str) -> None:
        if not arg:
            raise ProtocolError("501 Argument syntax error: PASS takes the password.")
        if not self.auth.plaintext_allowed(self.peer_ip, self.tls_active):
            self.state = FAILED
            raise ProtocolError("530 Authentication Failure: passwords need TLS from your network.", bad=False)
        account = self.auth.check_plain(self.user, arg)
        if not self.login_checked(account, self.user, "USER"):
            self.state = FAILED
            raise ProtocolError("530 Authentication Failure.", bad=False)
        self.store.directory.record_login(account.id)
        self.account, self.state = account, AUTHED
        self.log.info("[%s] %s logged in", self.peer, account.address)
        self.send("250 Command OK.")

    def cmd_NOOP(self, arg: str) -> None:
        self.send("250 Command OK.")

    def cmd_QUIT(self, arg: str) -> None:
        self.close(f"221 {self.context.hostname} Closing Connection.")

    def cmd_DATA(self, arg: str) -> None:
        if arg.strip():
            raise ProtocolError("501 Argument syntax error: DATA takes no argument.")
        self.send("354 Enter mail, end with <CRLF>.<CRLF>")
        read = self.read_text(self.config.mpp.max_message_size, strict=False)
        try:
            if read.too_large:
                raise Refusal(f"message exceeds the size limit of {self.config.mpp.max_message_size} octets")
            if b"\0" in read.text:
                raise Refusal("message contains NUL characters")
            body, recipients = self.prepare(read.text)
            queue_id = self.context.post(self.account.address, body, recipients, "mpp", self.account.id)
        except Refusal as exc:
            self.state = REFUSED
            self.log.info("[%s] %s: message refused: %s", self.peer, self.account.address, exc)
            self.send(f"550 Error: {exc}.")
            return
        except DatabaseUnavailable as exc:
            self.state = REFUSED
            self.log.warning("[%s] %s: message not queued: %s", self.peer, self.account.address, exc)
            self.send(self.REPLY_NOT_QUEUED)
            return
        self.state = POSTED
        self.log.info(
            "[%s] %s: queued %d (%d octets, %d recipient(s))",
            self.peer, self.account.address, queue_id, len(body), len(recipients),
        )
        self.send(f"250 Command OK: queued as {queue_id}.")

    # --- the text ----------------------------------------------------------------------

    def prepare(self, text: bytes) -> tuple[bytes, list[str]]:
        """The copy to queue (fields added and Bcc removed) and its recipients."""
        fields, rest = msg.split_header(text)
        recipients = msg.posting_recipients(fields)
        if not recipients:
            raise Refusal("no recipients: the message has no To, Cc or Bcc field")
        for address in recipients:
            if not msg.is_address(address):
                raise Refusal(f"bad recipient address {address!r}")
        received = msg.count_received(fields)
        if received > self.config.smtp.max_received_headers:
            raise Refusal(f"mail loop: {received} Received fields")
        protocol = "MPP with TLS" if self.tls_active else "MPP"
        now = formatdate(localtime=True)
        trace = msg.header_line(
            "Received", f"from [{self.peer_ip}] by {self.context.hostname} (mailsrv) with {protocol};\r\n\t{now}"
        )
        try:
            body = msg.complete_posting(
                fields, rest, self.account.address, self.config.mpp.from_policy, self.context.hostname, trace,
                dropped=("bcc", "resent-bcc"), date=now,
            )
        except msg.PostingRefused as exc:
            raise Refusal(str(exc)) from None
        return body, recipients
