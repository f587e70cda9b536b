"""SMTP (RFC 5321): the receiver for mail from the Internet (``[smtp] listen``, port 25) and
message submission (RFC 6409: ``[smtp] submission``, port 587 with STARTTLS, and
``[smtp] submission_tls``, port 465 with implicit TLS, RFC 8314).

Decisions where the RFCs leave room (see also docs/design.md, "SMTP"):

- States are a table: GREET (before EHLO/HELO), READY, MAIL (after MAIL), RCPT (after an
  accepted RCPT). A command in the wrong state answers ``503 5.5.1``; an unknown one
  ``500 5.5.2``; bad arguments ``501 5.5.4``. Every reply carries an enhanced status
  code (RFC 3463). Unknown commands, syntax errors, unknown and refused recipients count
  against a budget (as Postfix's error limits): past it, ``421`` and close.
- Port 25 accepts a recipient only when mail for it stays here: a local account or alias
  (even an alias whose target is elsewhere: it is forwarded, envelope sender kept), or an
  ODMR domain (the mail is held for ATRN). An unknown local address is ``550 5.1.1``;
  every other domain ``554 5.7.1`` relay denied. Addresses that ask a host to relay by
  other means are refused the same way whatever their domain: a local part with ``%`` or
  ``!``, a quoted local part, an IP literal. A source route (``@a,@b:user@c``) is dropped
  and ``user@c`` judged (RFC 5321 section 4.1.1.3); one trailing dot of a domain is
  dropped; case does not matter.
- The text is read by the I/O layer's strict mode: only ``CRLF . CRLF`` ends it, and a
  bare CR or LF anywhere in it refuses the message (``550 5.5.2``, as Postfix's
  ``smtpd_forbid_bare_newline = yes``), so no message smuggles another. The size limit is
  advertised (SIZE) and enforced while reading (``552 5.3.4``, nothing buffered past it);
  more than ``max_received_headers`` Received fields is a loop (``554 5.4.6``). A Received
  field names the peer, its EHLO name and the TLS version and cipher when used. ``250``
  only once the message and every recipient are committed (the posting transaction, shared
  with other sessions' posts, delivers local recipients at once); ``451 4.3.0`` and
  nothing written when the database is unavailable; a client that leaves during the text
  queues nothing.
- STARTTLS (RFC 3207): whatever the client pipelined after it is discarded, and the
  session starts again from GREET.
- VRFY answers ``252`` for every argument: it never tells who exists. EXPN is not offered.
- Submission requires AUTH (PLAIN and LOGIN, RFC 4954; CRAM-MD5 too with
  ``[auth] cram_md5``), offered and accepted only over TLS or from
  ``[auth] plaintext_networks``; ``535 5.7.8`` after the failure delay, ``530 5.7.0`` for
  MAIL before AUTH. The envelope sender must be the account's address or one of its
  aliases (``553 5.7.1``, as Postfix's ``reject_sender_login_mismatch``); the header gets
  MPP's sender policy (``[mpp] from_policy``), Message-ID and Date where missing. Any
  recipient is then accepted: local ones are delivered at once, others wait for the relay.
"""

from __future__ import annotations

import base64
from email.utils import formatdate
from typing import ClassVar

from .. import auth as authmod
from .. import message as msg
from ..db import DatabaseUnavailable
from ..server import LineHandler, ProtocolError
from ..store import Route

GREET, READY, MAIL, RCPT = "GREET", "READY", "MAIL", "RCPT"
#: how long a client may be silent (RFC 5321 section 4.5.3.2.7: at least 5 minutes)
IDLE_TIMEOUT = 300.0
_ALWAYS = frozenset({"NOOP", "QUIT", "RSET", "HELP", "VRFY", "EHLO", "HELO"})


class SmtpReplies:
    """The replies every SMTP-style protocol here shares (SMTP, submission, ODMR)."""

    REFUSAL = "421 4.7.0 Error: too many connections, try again later"
    BANNED = "554 5.7.1 too many failed logins from your address, try again later"
    REPLY_WRONG_STATE = "503 5.5.1 Error: bad sequence of commands"
    REPLY_TOO_LONG = "500 5.5.2 Error: line too long"
    REPLY_BAD_CHARS = "500 5.5.2 Error: invalid characters in command"
    REPLY_TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors, closing connection"
    REPLY_TIMEOUT = "421 4.4.2 Error: timeout exceeded, closing connection"
    REPLY_INTERNAL = "451 4.3.0 Error: internal error, try again later"
    REPLY_SHUTDOWN = "421 4.3.2 Error: server shutting down, closing connection"
    REPLY_BYE = "221 2.0.0 Bye"
    REPLY_NEED_HOSTNAME = "501 5.5.4 Syntax: EHLO hostname"
    REPLY_TLS_READY = "220 2.0.0 Ready to start TLS"
    REPLY_NO_TLS = "454 4.7.0 TLS not available"


class SmtpHandler(SmtpReplies, LineHandler):
    """Port 25: mail for local and ODMR domains, from anyone, never relayed."""

    protocol = "smtp"
    ORIGIN = "smtp"
    INITIAL_STATE = GREET
    STATES: ClassVar = {
        GREET: _ALWAYS,
        READY: _ALWAYS | {"MAIL", "STARTTLS"},
        MAIL: _ALWAYS | {"RCPT"},
        RCPT: _ALWAYS | {"RCPT", "DATA"},
    }
    MAX_LINE = 2048  # RFC 5321 section 4.5.3.1.4 says 512; extensions' parameters may need more
    MAX_BAD_COMMANDS = 20  # Postfix's smtpd_hard_error_limit
    MAX_RECIPIENTS = 1000  # RFC 5321 section 4.5.3.1.8 asks for at least 100

    REPLY_UNKNOWN = "500 5.5.2 Error: command not recognized"
    REPLY_UNAVAILABLE = "451 4.3.0 Error: mail store unavailable, try again later"
    REPLY_OK = "250 2.0.0 Ok"
    REPLY_SENDER_OK = "250 2.1.0 Ok"
    REPLY_RECIPIENT_OK = "250 2.1.5 Ok"
    REPLY_HELP = "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY STARTTLS"
    REPLY_VRFY = "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
    REPLY_GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"
    REPLY_MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address>"
    REPLY_RCPT_SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address>"
    REPLY_BAD_ADDRESS = "501 5.1.3 Bad address syntax"
    REPLY_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
    REPLY_BAD_PARAMETER = "555 5.5.4 Unsupported parameter"
    REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"
    REPLY_TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
    REPLY_UNKNOWN_USER = "550 5.1.1 <{address}>: Recipient address rejected: User unknown"
    REPLY_RELAY_DENIED = "554 5.7.1 <{address}>: Relay access denied"
    REPLY_DATA_ARGUMENT = "501 5.5.4 Syntax: DATA"
    REPLY_BARE_NEWLINE = "550 5.5.2 Error: bare <CR> or <LF> received in the message text"
    REPLY_NUL = "550 5.6.0 Error: NUL character in the message text"
    REPLY_LOOP = "554 5.4.6 Error: too many hops (mail loop?)"
    REPLY_NOT_QUEUED = "451 4.3.0 Error: the message has not been queued, try again later"
    REPLY_QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
    REPLY_TLS_ACTIVE = "554 5.5.1 Error: TLS already active"

    def idle_timeout(self) -> float:
        return IDLE_TIMEOUT

    def greet(self) -> None:
        self.helo = ""
        self.esmtp = False
        self.account = None
        self.reset()
        self.send(f"220 {self.context.hostname} ESMTP mailsrv")

    def reset(self) -> None:
        """Forget the mail transaction (RSET, a new EHLO, the end of DATA)."""
        self.sender: str | None = None
        self.recipients: list[str] = []
        if self.state in (MAIL, RCPT):
            self.state = READY

    # --- the session -----------------------------------------------------------------

    def extensions(self) -> list[str]:
        """What EHLO lists after the greeting line."""
        lines = [f"SIZE {self.config.smtp.max_message_size}", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.context.tls_context is not None and not self.tls_active:
            lines.append("STARTTLS")
        return lines

    def cmd_EHLO(self, arg: str) -> None:
        self.hello(arg, esmtp=True)
        self.send_reply(250, [self.context.hostname, *self.extensions()])

    def cmd_HELO(self, arg: str) -> None:
        self.hello(arg, esmtp=False)
        self.send(f"250 {self.context.hostname}")

    def hello(self, arg: str, esmtp: bool) -> None:
        name = arg.strip()
        if not name or " " in name:
            raise ProtocolError(self.REPLY_NEED_HOSTNAME)
        self.helo, self.esmtp = name[:255], esmtp
        self.reset()
        self.state = READY

    def cmd_NOOP(self, arg: str) -> None:
        self.send(self.REPLY_OK)

    def cmd_RSET(self, arg: str) -> None:
        self.reset()
        self.send(self.REPLY_OK)

    def cmd_QUIT(self, arg: str) -> None:
        self.close(self.REPLY_BYE)

    def cmd_HELP(self, arg: str) -> None:
        self.send(self.REPLY_HELP)

    def cmd_VRFY(self, arg: str) -> None:
        self.send(self.REPLY_VRFY)

    def cmd_STARTTLS(self, arg: str) -> None:
        if self.tls_active:
            raise ProtocolError(self.REPLY_TLS_ACTIVE)
        if self.context.tls_context is None:
            raise ProtocolError(self.REPLY_NO_TLS)
        if arg.strip():
            raise ProtocolError("501 5.5.4 Syntax: STARTTLS")
        self.send(self.REPLY_TLS_READY)
        self.start_tls()
        self.helo, self.esmtp = "", False
        self.reset()
        self.state = GREET  # RFC 3207 section 4.2: the client starts again with EHLO

    # --- the mail transaction ----------------------------------------------------------

    def cmd_MAIL(self, arg: str) -> None:
        path, params = parse_path(arg, "FROM")
        if path is None:
            raise ProtocolError(self.REPLY_MAIL_SYNTAX)
        sender = strip_route(path)
        if sender and not msg.is_address(sender):
            raise ProtocolError(self.REPLY_BAD_SENDER)
        for key, value in params.items():
            if key == "SIZE":
                if not (value.isascii() and value.isdigit()):
                    raise ProtocolError(self.REPLY_MAIL_SYNTAX)
                if int(value) > self.config.smtp.max_message_size:
                    raise ProtocolError(self.REPLY_TOO_BIG, bad=False)
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    raise ProtocolError(self.REPLY_BAD_PARAMETER)
            else:
                raise ProtocolError(self.REPLY_BAD_PARAMETER)
        self.check_sender(sender)
        self.sender, self.recipients, self.state = sender, [], MAIL
        self.send(self.REPLY_SENDER_OK)

    def check_sender(self, sender: str) -> None:
        """Whether this sender may send here (port 25: anyone)."""

    def cmd_RCPT(self, arg: str) -> None:
        path, params = parse_path(arg, "TO")
        if path is None or params:
            raise ProtocolError(self.REPLY_RCPT_SYNTAX if path is None else self.REPLY_BAD_PARAMETER)
        if len(self.recipients) >= self.MAX_RECIPIENTS:
            raise ProtocolError(self.REPLY_TOO_MANY_RECIPIENTS, bad=False)
        address = self.accept_recipient(strip_route(path))
        self.recipients.append(address)  # (logged with the message it belongs to)
        self.state = RCPT
        self.send(self.REPLY_RECIPIENT_OK)

    def accept_recipient(self, path: str) -> str:
        """The recipient as it will be queued, or ProtocolError: mail for it must stay here."""
        address = relay_safe(path)
        if address is None:
            self.refuse_recipient(path, self.REPLY_RELAY_DENIED)
        if not msg.is_address(address):
            raise ProtocolError(self.REPLY_BAD_ADDRESS)
        route = self.store.directory.resolve(address).route
        if route == Route.UNKNOWN:
            self.refuse_recipient(address, self.REPLY_UNKNOWN_USER)
        if route == Route.REMOTE:
            self.refuse_recipient(address, self.REPLY_RELAY_DENIED)
        return address

    def refuse_recipient(self, address: str, reply: str) -> None:
        self.log.info("[%s] from <%s> to <%s>: refused: %s", self.peer, self.sender, address[:200], reply[:3])
        raise ProtocolError(reply.format(address=address[:200]))

    def cmd_DATA(self, arg: str) -> None:
        if arg.strip():
            raise ProtocolError(self.REPLY_DATA_ARGUMENT)
        self.send(self.REPLY_GO_AHEAD)
        read = self.read_text(self.config.smtp.max_message_size, strict=True)
        sender, recipients = self.sender, self.recipients
        self.reset()
        if read.too_large:
            raise ProtocolError(self.REPLY_TOO_BIG, bad=False)
        if read.bare_newline:
            self.log.info("[%s] from <%s>: refused: bare CR or LF in the text", self.peer, sender)
            raise ProtocolError(self.REPLY_BARE_NEWLINE)
        if b"\0" in read.text:
            raise ProtocolError(self.REPLY_NUL)
        fields, rest = msg.split_header(read.text)
        if msg.count_received(fields) > self.config.smtp.max_received_headers:
            raise ProtocolError(self.REPLY_LOOP, bad=False)
        body = self.complete(fields, rest, recipients)
        try:
            account_id = self.account.id if self.account is not None else None
            queue_id = self.context.post(sender, body, recipients, self.ORIGIN, account_id)
        except DatabaseUnavailable as exc:
            self.log.warning("[%s] from <%s>: not queued: %s", self.peer, sender, exc)
            raise ProtocolError(self.REPLY_NOT_QUEUED, bad=False) from None
        self.log.info("[%s] from <%s>: queued %d (%d octets, %d recipient(s))",
                      self.peer, sender, queue_id, len(body), len(recipients))
        self.send(self.REPLY_QUEUED.format(queue_id=queue_id))

    def complete(self, fields: list[bytes], rest: bytes, recipients: list[str]) -> bytes:
        """The message as it is queued: a Received field before it (port 25)."""
        return self.trace(recipients) + b"".join(fields) + rest

    def trace(self, recipients: list[str]) -> bytes:
        """The Received field (RFC 5321 section 4.4)."""
        protocol = "ESMTP" if self.esmtp else "SMTP"
        if self.tls_active:
            protocol += "S"
        if self.account is not None:
            protocol += "A"
        tls = f"\r\n\t(using {self.tls_version})" if self.tls_active else ""
        to = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
        return msg.header_line(
            "Received",
            f"from {self.helo or 'unknown'} ([{self.peer_ip}]){tls}\r\n\tby {self.context.hostname} (mailsrv)"
            f" with {protocol}{to};\r\n\t{formatdate(localtime=True)}",
        )


class SmtpAuth:
    """AUTH (RFC 4954) for an SMTP-style handler: PLAIN and LOGIN where passwords may
    cross (TLS, or ``plaintext_networks``), CRAM-MD5 where the handler offers it. On
    success ``self.account`` is set and :meth:`logged_in` runs."""

    LINE_LIMITS: ClassVar = {"AUTH": 12288}  # an initial response (RFC 4954 section 4)
    #: whether a failed AUTH counts against the session's bad-command budget
    AUTH_FAILURES_COUNT: ClassVar[bool] = False

    REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"
    REPLY_AUTH_OK = "235 2.7.0 Authentication successful"
    REPLY_AUTH_FAILED = "535 5.7.8 Error: authentication failed"
    REPLY_AUTH_ONCE = "503 5.5.1 Error: already authenticated"
    REPLY_AUTH_CANCELLED = "501 5.7.0 Authentication aborted"
    REPLY_AUTH_MALFORMED = "501 5.5.2 Cannot decode the response"
    REPLY_MECHANISM = "504 5.5.4 Unrecognized authentication type"
    REPLY_ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"

    @property
    def plaintext_ok(self) -> bool:
        return self.auth.plaintext_allowed(self.peer_ip, self.tls_active)

    def mechanisms(self) -> list[str]:
        result = ["PLAIN", "LOGIN"] if self.plaintext_ok else []
        if self.config.auth.cram_md5:
            result.append("CRAM-MD5")
        return result

    def cmd_AUTH(self, arg: str) -> None:
        if self.account is not None:
            raise ProtocolError(self.REPLY_AUTH_ONCE)
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        if mechanism in ("PLAIN", "LOGIN") and not self.plaintext_ok:
            raise ProtocolError(self.REPLY_ENCRYPTION_REQUIRED, bad=False)
        if mechanism not in self.mechanisms():
            raise ProtocolError(self.REPLY_MECHANISM)
        if mechanism == "PLAIN":
            checked = self.auth.check_sasl_plain(self.sasl(initial) if initial else self.sasl_exchange(""))
            if checked is None:
                raise ProtocolError(self.REPLY_AUTH_MALFORMED)
            name, account = checked
        elif mechanism == "LOGIN":
            name = self.decoded(self.sasl(initial) if initial else self.sasl_exchange(_b64("Username:")))
            password = self.decoded(self.sasl_exchange(_b64("Password:")))
            account = self.auth.check_plain(name, password)
        else:
            if initial:
                raise ProtocolError(self.REPLY_AUTH_MALFORMED)
            challenge = authmod.new_challenge(self.context.hostname).encode()
            name, _, digest = self.decoded(self.sasl_exchange(base64.b64encode(challenge).decode())).rpartition(" ")
            account = self.auth.check_cram(name, challenge, digest)
        if not self.login_checked(account, name, mechanism):
            raise ProtocolError(self.REPLY_AUTH_FAILED, bad=self.AUTH_FAILURES_COUNT)
        self.store.directory.record_login(account.id)
        self.account = account
        self.log.info("[%s] %s logged in (%s)", self.peer, account.address, mechanism)
        self.logged_in()
        self.send(self.REPLY_AUTH_OK)

    def logged_in(self) -> None:
        """What follows a successful AUTH (override)."""

    def sasl(self, response: str) -> str:
        """A response as the client gave it: ``*`` cancels, ``=`` is the empty one."""
        if response == "*":
            raise ProtocolError(self.REPLY_AUTH_CANCELLED, bad=False)
        return "" if response == "=" else response

    def sasl_exchange(self, challenge: str) -> str:
        """Send a ``334`` challenge and return the client's answer (RFC 4954 section 4)."""
        return self.sasl(self.sasl_response(f"334 {challenge}", self.LINE_LIMITS["AUTH"], self.REPLY_TOO_LONG))

    def decoded(self, response: str) -> str:
        try:
            return base64.b64decode(response, validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError(self.REPLY_AUTH_MALFORMED) from None


class SubmissionHandler(SmtpAuth, SmtpHandler):
    """Ports 587 and 465: authenticated users' mail, to anywhere."""

    protocol = "submission"
    ORIGIN = "submission"
    STATES: ClassVar = {
        **SmtpHandler.STATES,
        READY: SmtpHandler.STATES[READY] | {"AUTH"},
    }

    REPLY_SENDER_MISMATCH = "553 5.7.1 <{address}>: Sender address rejected: not owned by user {user}"

    def extensions(self) -> list[str]:
        lines = super().extensions()
        if self.mechanisms() and self.account is None:
            lines.append("AUTH " + " ".join(self.mechanisms()))
        return lines

    def cmd_MAIL(self, arg: str) -> None:
        if self.account is None:
            raise ProtocolError(self.REPLY_AUTH_REQUIRED)
        super().cmd_MAIL(arg)

    def check_sender(self, sender: str) -> None:
        """The envelope sender must be the account's address or one of its aliases."""
        own = self.account.address
        if sender.lower() != own:
            where = self.store.directory.resolve(sender) if sender else None
            if where is None or where.route != Route.ALIAS or where.target.lower() != own:
                raise ProtocolError(self.REPLY_SENDER_MISMATCH.format(address=sender, user=own), bad=False)

    def accept_recipient(self, path: str) -> str:
        """Any well-formed address: an authenticated user's mail may go anywhere."""
        if not msg.is_address(path):
            raise ProtocolError(self.REPLY_BAD_ADDRESS)
        local, _, domain = path.rpartition("@")
        return f"{local}@{domain.lower().rstrip('.')}"

    def complete(self, fields: list[bytes], rest: bytes, recipients: list[str]) -> bytes:
        """Received first, then MPP's sender policy, Message-ID and Date (RFC 6409 section 8)."""
        try:
            return msg.complete_posting(
                fields, rest, self.account.address, self.config.mpp.from_policy, self.context.hostname,
                self.trace(recipients),
            )
        except msg.PostingRefused as exc:
            raise ProtocolError(f"550 5.7.1 {exc}", bad=False) from None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def parse_path(arg: str, keyword: str) -> tuple[str | None, dict[str, str]]:
    """``FROM:<path> KEY=VALUE ...`` -> (path without brackets, {KEY: VALUE}); (None, {})
    when malformed. A space after the colon is tolerated, as most servers do."""
    head, colon, rest = arg.partition(":")
    if not colon or head.strip().upper() != keyword:
        return None, {}
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        return None, {}
    end = _path_end(rest)
    if end < 0:
        return None, {}
    path, params = rest[1:end], {}
    for item in rest[end + 1 :].split():
        key, _, value = item.partition("=")
        if not key:
            return None, {}
        params[key.upper()] = value
    if rest[end + 1 : end + 2] not in ("", " "):
        return None, {}
    return path, params


def _path_end(text: str) -> int:
    """Where the ``>`` that closes the path at the start of ``text`` is (quotes honoured)."""
    quoted = False
    for i, char in enumerate(text[1:], 1):
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return i
    return -1


def strip_route(path: str) -> str:
    """``@a,@b:user@c`` -> ``user@c`` (RFC 5321 section 4.1.1.3: the route is ignored)."""
    if path.startswith("@") and ":" in path:
        return path.split(":", 1)[1]
    return path


def relay_safe(address: str) -> str | None:
    """The address with its domain lowered and one trailing dot dropped; None when it
    asks for relaying by the old tricks (``%``, ``!``, a quoted local part or an ``@``
    inside it, an IP literal), which a receiver that relays for no one refuses."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return address
    if local.startswith('"') or set(local) & set('%!@"') or domain.startswith("["):
        return None
    domain = domain.lower()
    if domain.endswith("."):
        domain = domain[:-1]
    return f"{local}@{domain}"
