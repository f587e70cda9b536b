"""POP3: RFC 1081 (with LAST, and RPOP refused) as clients speak it today (RFC 1939), with
CAPA and response codes (RFC 2449), STLS (RFC 2595), AUTH (RFC 5034: PLAIN, RFC 4616;
CRAM-MD5, RFC 2195) and APOP (RFC 1939 section 7).

Decisions where the RFCs leave room (see also docs/design.md, "POP3"):

- States (RFC 1939 section 3) are a table. AUTHORIZATION is split in two: ``AUTH`` before
  USER and ``USER`` after it, where PASS is allowed. UPDATE is not a state a command can
  see: QUIT in TRANSACTION enters it and the session ends.
- USER answers ``+OK`` whether the user exists or not. A failed PASS, APOP or AUTH answers
  ``-ERR [AUTH]`` after the failure delay and returns to the start of AUTHORIZATION.
- Plaintext mechanisms (USER/PASS, AUTH PLAIN) are offered and accepted only from
  ``[auth] plaintext_networks`` or over TLS; CAPA then omits USER and PLAIN.
- CRAM-MD5 and APOP exist only with ``[auth] cram_md5 = yes`` (the greeting carries an
  APOP timestamp only then), and work only for accounts that have a CRAM secret.
- The maildrop is locked for the whole session (``-ERR [IN-USE]``) and snapshotted at
  login: mail arriving later appears in the next session. DELE marks; only QUIT in
  TRANSACTION deletes, in one transaction, together with the ``seen`` flags of retrieved
  messages. A dropped connection, a timeout or a server stop deletes nothing.
- LAST (RFC 1081): the highest message number retrieved (RETR) or deleted (DELE) in this
  maildrop; at login it is the highest number whose message was retrieved in an earlier
  session; RSET restores that value. ``[pop3] enable_last = no`` turns LAST off.
- Message numbers are decimal without sign, 1 to the number of messages; anything else is
  ``-ERR`` and counts against the bad-command budget. UIDLs are 24 hex digits.
- The idle timeout is ``[pop3] idle_timeout`` (10 minutes, RFC 1939 section 3's minimum).
"""

from __future__ import annotations

import base64
import time
from typing import ClassVar

from .. import auth as authmod
from ..message import dot_stuff_parts, top
from ..server import LineHandler, ProtocolError
from ..store import MessageInfo, batches_by_size, lock_holder

AUTHORIZATION, USER_GIVEN, TRANSACTION = "AUTHORIZATION", "USER", "TRANSACTION"
_AUTH_COMMANDS = frozenset({"USER", "APOP", "AUTH", "STLS", "CAPA", "QUIT", "RPOP"})

#: octets of message bodies read from the database at once while retrieving
READ_AHEAD = 1024 * 1024


def is_decimal(text: str) -> bool:
    """An unsigned decimal of at most 10 ASCII digits (no sign, no spaces, no other digits)."""
    return text.isascii() and text.isdigit() and len(text) <= 10


class Pop3Handler(LineHandler):
    protocol = "pop3"
    INITIAL_STATE = AUTHORIZATION
    STATES: ClassVar = {
        AUTHORIZATION: _AUTH_COMMANDS,
        USER_GIVEN: _AUTH_COMMANDS | {"PASS"},
        TRANSACTION: frozenset(
            {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "QUIT", "TOP", "UIDL", "LAST", "CAPA"}
        ),
    }
    MAX_LINE = 512  # RFC 2449 section 4 allows 255 octets; be generous
    MAX_AUTH_LINE = 12288  # SASL responses: RFC 5034 section 4 lets them be longer than commands
    LINE_LIMITS: ClassVar = {"AUTH": MAX_AUTH_LINE}  # an AUTH line may carry an initial response
    MAX_BAD_COMMANDS = 20

    REFUSAL = "-ERR [SYS/TEMP] too many connections, try again later"
    BANNED = "-ERR [AUTH] too many failed logins from your address, try again later"
    REPLY_UNKNOWN = "-ERR unknown command"
    REPLY_WRONG_STATE = "-ERR command not valid in this state"
    REPLY_TOO_LONG = "-ERR line too long"
    REPLY_BAD_CHARS = "-ERR invalid characters in command"
    REPLY_TOO_MANY_ERRORS = "-ERR too many bad commands, closing connection"
    REPLY_TIMEOUT = "-ERR idle for too long, closing connection"
    REPLY_INTERNAL = "-ERR [SYS/TEMP] internal error"
    REPLY_UNAVAILABLE = "-ERR [SYS/TEMP] mail store unavailable, try again later"
    REPLY_AUTH_FAILED = "-ERR [AUTH] invalid user name or password"
    REPLY_PLAINTEXT = "-ERR [AUTH] plaintext authentication not allowed without TLS (use STLS)"
    REPLY_IN_USE = "-ERR [IN-USE] maildrop already locked by another session"
    REPLY_SHUTDOWN = "-ERR [SYS/TEMP] server shutting down, closing connection (nothing deleted)"
    REPLY_RPOP = "-ERR RPOP is not supported (insecure); use PASS"
    REPLY_NO_TLS = "-ERR TLS is not available"
    REPLY_TLS_ACTIVE = "-ERR TLS is already active"
    REPLY_USER_NEEDS_NAME = "-ERR USER needs a name"
    REPLY_NO_APOP = "-ERR APOP is not available"
    REPLY_APOP_USAGE = "-ERR usage: APOP name digest"
    REPLY_UNSUPPORTED_MECHANISM = "-ERR unsupported authentication mechanism"
    REPLY_BAD_PLAIN = "-ERR [AUTH] malformed PLAIN response"
    REPLY_CRAM_INITIAL = "-ERR CRAM-MD5 takes no initial response"
    REPLY_BAD_CRAM = "-ERR [AUTH] malformed CRAM-MD5 response"
    REPLY_SASL_TOO_LONG = "-ERR [AUTH] response too long"
    REPLY_AUTH_CANCELLED = "-ERR authentication cancelled"
    REPLY_BAD_NUMBER = "-ERR invalid message number"
    REPLY_TOP_USAGE = "-ERR usage: TOP message lines"
    REPLY_BAD_LINES = "-ERR invalid number of lines"
    REPLY_NO_SUCH_MESSAGE = "-ERR no such message, only {count} in maildrop"
    REPLY_ALREADY_DELETED = "-ERR message {n} already deleted"
    REPLY_UNREADABLE = "-ERR [SYS/TEMP] message {n} cannot be read"

    # --- session -----------------------------------------------------------------------

    def idle_timeout(self) -> float:
        return self.config.pop3.idle_timeout

    def greet(self) -> None:
        self.user = ""
        self.account = None
        self.messages: list[MessageInfo] = []
        self.deleted: set[int] = set()
        self.retrieved: set[int] = set()
        self.last_at_login = self.last = 0
        self.holder = lock_holder(f"pop3-{id(self):x}")
        self.lock_ttl = self.idle_timeout() + 60
        self.lock_renewed = 0.0
        self.cache: dict[int, tuple[bytes | memoryview, str | None]] = {}
        self.timestamp = ""
        if self.config.auth.cram_md5:
            self.timestamp = authmod.new_challenge(self.context.hostname)
            self.send(f"+OK mailsrv POP3 server ready {self.timestamp}")
        else:
            self.send("+OK mailsrv POP3 server ready")

    def on_close(self) -> None:
        if self.account is not None:
            self.store.maildrops.release_lock(self.account.id, self.holder)
            self.log.info("[%s] %s: session ended, nothing deleted", self.peer, self.account.address)
            self.account = None

    def run_command(self, verb, method, arg) -> None:
        if self.state == TRANSACTION and time.monotonic() - self.lock_renewed > self.lock_ttl / 2:
            if not self.store.maildrops.renew_lock(self.account.id, self.holder, self.lock_ttl):
                self.account = None
                self.close("-ERR [IN-USE] lost the maildrop lock, closing")
                return
            self.lock_renewed = time.monotonic()
        super().run_command(verb, method, arg)

    # --- AUTHORIZATION -----------------------------------------------------------------

    @property
    def plaintext_ok(self) -> bool:
        return self.auth.plaintext_allowed(self.peer_ip, self.tls_active)

    def mechanisms(self) -> list[str]:
        result = ["PLAIN"] if self.plaintext_ok else []
        if self.config.auth.cram_md5:
            result.append("CRAM-MD5")
        return result

    def cmd_CAPA(self, arg: str) -> None:
        """CAPA: the capabilities of RFC 2449 section 5, in either state."""
        lines = ["+OK capability list follows", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        # (RFC 2449 section 5: what the AUTHORIZATION state offers is announced in both states)
        if self.plaintext_ok:
            lines.append("USER")
        if self.mechanisms():
            lines.append("SASL " + " ".join(self.mechanisms()))
        if self.context.tls_context is not None and not self.tls_active:
            lines.append("STLS")
        lines += ["IMPLEMENTATION mailsrv", "."]
        self.send_lines(lines)

    def cmd_STLS(self, arg: str) -> None:
        """STLS (RFC 2595 section 4): only before login, only once, only when configured."""
        if self.context.tls_context is None:
            raise ProtocolError(self.REPLY_NO_TLS)
        if self.tls_active:
            raise ProtocolError(self.REPLY_TLS_ACTIVE)
        self.send("+OK begin TLS negotiation")
        self.start_tls()
        self.state, self.user = AUTHORIZATION, ""

    def cmd_USER(self, arg: str) -> None:
        """USER name: +OK for any name (no user enumeration)."""
        if not self.plaintext_ok:
            raise ProtocolError(self.REPLY_PLAINTEXT, bad=False)
        if not arg.strip():
            raise ProtocolError(self.REPLY_USER_NEEDS_NAME)
        self.user = arg.strip()
        self.state = USER_GIVEN
        self.send("+OK send PASS")

    def cmd_PASS(self, arg: str) -> None:
        """PASS secret: the rest of the line is the password (it may contain spaces)."""
        if not self.plaintext_ok:
            raise ProtocolError(self.REPLY_PLAINTEXT, bad=False)
        self.login(self.auth.check_plain(self.user, arg), self.user, "USER")

    def cmd_RPOP(self, arg: str) -> None:
        raise ProtocolError(self.REPLY_RPOP)

    def cmd_APOP(self, arg: str) -> None:
        """APOP name digest (RFC 1939 section 7), only with [auth] cram_md5 = yes."""
        if not self.timestamp:
            raise ProtocolError(self.REPLY_NO_APOP)
        name, _, digest = arg.strip().rpartition(" ")
        if not name or len(digest) != 32:
            raise ProtocolError(self.REPLY_APOP_USAGE)
        self.login(self.auth.check_apop(name, self.timestamp, digest), name, "APOP")

    def cmd_AUTH(self, arg: str) -> None:
        """AUTH [mechanism [initial-response]] (RFC 5034)."""
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:  # the list of mechanisms, as many clients expect
            self.send_lines(["+OK", *self.mechanisms(), "."])
            return
        if mechanism not in self.mechanisms():
            if mechanism == "PLAIN" and not self.plaintext_ok:
                raise ProtocolError(self.REPLY_PLAINTEXT, bad=False)
            raise ProtocolError(self.REPLY_UNSUPPORTED_MECHANISM)
        if mechanism == "PLAIN":
            response = initial if initial else self.sasl_exchange("")
            if response == "=":
                response = ""
            checked = self.auth.check_sasl_plain(response)
            if checked is None:
                raise ProtocolError(self.REPLY_BAD_PLAIN)
            self.login(checked[1], checked[0], "PLAIN")
        else:
            if initial:
                raise ProtocolError(self.REPLY_CRAM_INITIAL)
            challenge = authmod.new_challenge(self.context.hostname).encode()
            response = self.sasl_exchange(base64.b64encode(challenge).decode())
            try:
                name, _, digest = base64.b64decode(response, validate=True).decode().rpartition(" ")
            except (ValueError, UnicodeDecodeError):
                raise ProtocolError(self.REPLY_BAD_CRAM) from None
            self.login(self.auth.check_cram(name, challenge, digest), name, "CRAM-MD5")

    def sasl_exchange(self, challenge: str) -> str:
        """Send a ``+ challenge`` and return the client's answer; ``*`` cancels."""
        answer = self.sasl_response(f"+ {challenge}", self.MAX_AUTH_LINE, self.REPLY_SASL_TOO_LONG)
        if answer == "*":
            raise ProtocolError(self.REPLY_AUTH_CANCELLED, bad=False)
        return answer

    def login(self, account, name: str, mechanism: str) -> None:
        """Finish an authentication: lock and snapshot the maildrop, or fail after the delay."""
        self.state, self.user = AUTHORIZATION, ""
        if not self.login_checked(account, name, mechanism):
            raise ProtocolError(self.REPLY_AUTH_FAILED, bad=False)
        snapshot = self.store.maildrops.open_maildrop(account.id, self.holder, self.lock_ttl)
        if snapshot is None:
            self.log.info("[%s] %s: maildrop in use", self.peer, account.address)
            raise ProtocolError(self.REPLY_IN_USE, bad=False)
        self.account, self.messages, self.state = account, snapshot, TRANSACTION
        self.lock_renewed = time.monotonic()
        seen = [number for number, m in enumerate(snapshot, 1) if m.seen]
        self.last_at_login = self.last = max(seen, default=0)
        self.log.info("[%s] %s logged in, %d message(s)", self.peer, account.address, len(snapshot))
        count, size = self.totals()
        self.send(f"+OK {account.address} has {count} message(s) ({size} octets)")

    # --- TRANSACTION -------------------------------------------------------------------

    def totals(self) -> tuple[int, int]:
        live = [m for m in self.messages if m.id not in self.deleted]
        return len(live), sum(m.size for m in live)

    def number(self, text: str) -> tuple[int, MessageInfo]:
        """A message number argument: decimal digits naming a message not marked deleted."""
        text = text.strip()
        if not is_decimal(text):
            raise ProtocolError(self.REPLY_BAD_NUMBER)
        n = int(text)
        if not 1 <= n <= len(self.messages):
            raise ProtocolError(self.REPLY_NO_SUCH_MESSAGE.format(count=len(self.messages)), bad=False)
        message = self.messages[n - 1]
        if message.id in self.deleted:
            raise ProtocolError(self.REPLY_ALREADY_DELETED.format(n=n), bad=False)
        return n, message

    def listing(self, arg: str, field: str, what: str) -> None:
        """LIST and UIDL: one message, or all not marked deleted."""
        if arg.strip():
            n, message = self.number(arg)
            self.send(f"+OK {n} {getattr(message, field)}")
            return
        lines = [f"+OK {what}"]
        lines += [
            f"{n} {getattr(m, field)}" for n, m in enumerate(self.messages, 1) if m.id not in self.deleted
        ]
        lines.append(".")
        self.send_lines(lines)

    def cmd_STAT(self, arg: str) -> None:
        count, size = self.totals()
        self.send(f"+OK {count} {size}")

    def cmd_LIST(self, arg: str) -> None:
        count, size = self.totals()
        self.listing(arg, "size", f"{count} messages ({size} octets)")

    def cmd_UIDL(self, arg: str) -> None:
        self.listing(arg, "uid", "unique-id listing follows")

    def body(self, n: int, message: MessageInfo) -> tuple[bytes | memoryview, str | None]:
        """A message's stored text and dot-line offsets, read ahead with the next ones up
        to READ_AHEAD octets."""
        body = self.cache.pop(message.id, None)
        if body is not None:
            return body
        ahead = (m for m in self.messages[n - 1 :] if m.id not in self.deleted)
        self.cache = self.store.maildrops.read_bodies(self.account.id, next(batches_by_size(ahead, READ_AHEAD)))
        body = self.cache.pop(message.id, None)
        if body is None:
            raise ProtocolError(self.REPLY_UNREADABLE.format(n=n), bad=False)
        return body

    def cmd_RETR(self, arg: str) -> None:
        n, message = self.number(arg)
        body, offsets = self.body(n, message)
        self.send_parts([f"+OK {message.size} octets\r\n".encode(), *dot_stuff_parts(body, offsets)])
        self.retrieved.add(message.id)
        self.last = max(self.last, n)

    def cmd_TOP(self, arg: str) -> None:
        parts = arg.split()
        if len(parts) != 2:
            raise ProtocolError(self.REPLY_TOP_USAGE)
        n, message = self.number(parts[0])
        if not is_decimal(parts[1]):
            raise ProtocolError(self.REPLY_BAD_LINES)
        body, offsets = self.cache[message.id] = self.body(n, message)  # TOP keeps it cached
        text = bytes(body)
        head = top(text, int(parts[1]))
        stuffed = dot_stuff_parts(text, offsets) if head is text else dot_stuff_parts(head)
        self.send_parts([b"+OK top of message follows\r\n", *stuffed])

    def cmd_DELE(self, arg: str) -> None:
        n, message = self.number(arg)
        self.deleted.add(message.id)
        self.cache.pop(message.id, None)
        self.last = max(self.last, n)
        self.send(f"+OK message {n} deleted")

    def cmd_NOOP(self, arg: str) -> None:
        self.send("+OK")

    def cmd_LAST(self, arg: str) -> None:
        if not self.config.pop3.enable_last:
            raise ProtocolError(self.REPLY_UNKNOWN)
        self.send(f"+OK {self.last}")

    def cmd_RSET(self, arg: str) -> None:
        self.deleted.clear()
        self.retrieved.clear()
        self.last = self.last_at_login
        count, size = self.totals()
        self.send(f"+OK maildrop has {count} messages ({size} octets)")

    def cmd_QUIT(self, arg: str) -> None:
        """QUIT: in TRANSACTION, the UPDATE state: delete what is marked, in one transaction."""
        if self.state != TRANSACTION:
            self.close("+OK mailsrv POP3 server signing off")
            return
        account = self.account
        try:
            removed = self.store.maildrops.close_maildrop(account.id, self.holder, self.deleted, self.retrieved)
        except Exception:
            self.log.exception("[%s] %s: UPDATE failed, nothing deleted", self.peer, account.address)
            self.close("-ERR [SYS/TEMP] could not remove deleted messages, none were removed")
            return
        self.account = None  # the lock went with the transaction
        count = len(self.messages) - removed
        self.log.info("[%s] %s: quit, %d deleted", self.peer, account.address, removed)
        self.close(f"+OK mailsrv POP3 server signing off ({count} messages left)")
