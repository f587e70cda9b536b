"""POP, the original Post Office Protocol (RFC 918): USER, PASS, RETR/RDEL, RCEV, RCVD, RSET,
NOOP, QUIT.

Decisions where RFC 918 is vague (see also docs/design.md, "POP (RFC 918)"):

- Greeting ``+OK``. USER always ``+OK`` (no user enumeration); PASS ``+OK`` or ``-ERR`` after
  the failure delay. Passwords cross in the clear, so PASS is accepted only from
  ``[auth] plaintext_networks`` (POP has no TLS).
- ``RETR mailbox`` / ``RDEL mailbox``: the argument is the user's own address or local part
  (empty means their own); anything else is ``-ERR``. The maildrop is locked (the lock POP3
  uses) and the reply is ``#N``, N the exact number of octets RCEV will send. The messages
  are fixed at that moment: mail arriving later waits for the next transaction.
- RCEV sends exactly N octets and nothing else: each message in mbox form (a
  ``From sender date`` line, ``>From `` quoting, a blank line after it; CRLF line ends).
  It is streamed in batches, never the whole mailbox in memory.
- RCVD after RDEL deletes exactly the messages that were sent; after RETR it marks them
  seen; either way the lock is released and the reply is ``+OK``. RSET aborts the
  transaction and unlocks. QUIT answers ``+OK`` and closes; a transaction not ended by RCVD
  deletes nothing. Any other order: ``-ERR``.
"""

from __future__ import annotations

from typing import ClassVar

from ..message import mbox_entry
from ..server import LineHandler, ProtocolError
from ..store import MessageInfo, batches_by_size, lock_holder

START, USER_GIVEN, READY, OPENED, SENT = "START", "USER", "READY", "OPENED", "SENT"
#: octets of messages read from the database at once while sending
BATCH = 1024 * 1024


class PopHandler(LineHandler):
    protocol = "pop"
    INITIAL_STATE = START
    STATES: ClassVar = {
        START: frozenset({"USER", "QUIT", "NOOP", "RSET"}),
        USER_GIVEN: frozenset({"USER", "PASS", "QUIT", "NOOP", "RSET"}),
        READY: frozenset({"RETR", "RDEL", "QUIT", "NOOP", "RSET"}),
        OPENED: frozenset({"RCEV", "QUIT", "NOOP", "RSET"}),
        SENT: frozenset({"RCVD", "QUIT", "NOOP", "RSET"}),
    }
    MAX_BAD_COMMANDS = 20

    REFUSAL = "-ERR too many connections, try again later"
    BANNED = "-ERR too many failed logins from your address, try again later"
    REPLY_UNKNOWN = "-ERR unknown command"
    REPLY_WRONG_STATE = "-ERR command out of order"
    REPLY_TOO_LONG = "-ERR line too long"
    REPLY_BAD_CHARS = "-ERR invalid characters in command"
    REPLY_TOO_MANY_ERRORS = "-ERR too many bad commands, closing connection"
    REPLY_TIMEOUT = "-ERR idle for too long, closing connection"
    REPLY_INTERNAL = "-ERR internal error"
    REPLY_UNAVAILABLE = "-ERR mail store unavailable, try again later"
    REPLY_SHUTDOWN = "-ERR server shutting down, closing connection (nothing deleted)"
    REPLY_USER_NEEDS_NAME = "-ERR USER needs a name"
    REPLY_PLAINTEXT = "-ERR passwords are not accepted from your network"
    REPLY_AUTH_FAILED = "-ERR invalid user name or password"
    REPLY_NOT_YOURS = "-ERR no such mailbox or not yours"
    REPLY_LOCKED = "-ERR mailbox is locked by another session"
    REPLY_VANISHED = "-ERR a message vanished from the mailbox"

    def idle_timeout(self) -> float:
        return self.config.pop.idle_timeout

    def greet(self) -> None:
        self.user = ""
        self.account = None
        self.locked = False
        self.holder = lock_holder(f"pop-{id(self):x}")
        self.lock_ttl = self.idle_timeout() + 60
        self.batch: list[MessageInfo] = []
        self.deleting = False
        self.send("+OK mailsrv POP server ready")

    def on_close(self) -> None:
        self.unlock()

    def unlock(self) -> None:
        if self.locked:
            self.store.maildrops.release_lock(self.account.id, self.holder)
            self.locked = False
        self.batch = []

    # --- authorization -----------------------------------------------------------------

    def cmd_USER(self, arg: str) -> None:
        if not arg.strip():
            raise ProtocolError(self.REPLY_USER_NEEDS_NAME)
        self.user, self.state = arg.strip(), USER_GIVEN
        self.send("+OK")

    def cmd_PASS(self, arg: str) -> None:
        self.state = START
        if not self.auth.plaintext_allowed(self.peer_ip, self.tls_active):
            raise ProtocolError(self.REPLY_PLAINTEXT, bad=False)
        account = self.auth.check_plain(self.user, arg)
        if not self.login_checked(account, self.user, "USER"):
            raise ProtocolError(self.REPLY_AUTH_FAILED, bad=False)
        self.account, self.state = account, READY
        self.store.directory.record_login(account.id)
        self.log.info("[%s] %s logged in", self.peer, account.address)
        self.send("+OK")

    # --- the mail reading transaction --------------------------------------------------

    def own_mailbox(self, arg: str) -> bool:
        name = arg.strip().lower()
        return name in ("", self.account.address, self.account.address.split("@")[0])

    def open(self, arg: str, deleting: bool) -> None:
        if not self.own_mailbox(arg):
            raise ProtocolError(self.REPLY_NOT_YOURS, bad=False)
        snapshot = self.store.maildrops.open_maildrop(self.account.id, self.holder, self.lock_ttl)
        if snapshot is None:
            raise ProtocolError(self.REPLY_LOCKED, bad=False)
        self.locked, self.batch, self.deleting = True, snapshot, deleting
        self.total = sum(len(entry) for entry in self.entries())
        self.state = OPENED
        self.send(f"#{self.total}")

    def entries(self):
        """The mbox entries of the fixed batch, read from the database a batch at a time."""
        for chunk in batches_by_size(self.batch, BATCH):
            found = self.store.maildrops.read_messages(self.account.id, chunk)
            for message_id in chunk:
                if message_id not in found:
                    raise ProtocolError(self.REPLY_VANISHED)
                yield mbox_entry(*found[message_id])

    def cmd_RETR(self, arg: str) -> None:
        """RETR mailbox: read every message without deleting."""
        self.open(arg, deleting=False)

    def cmd_RDEL(self, arg: str) -> None:
        """RDEL mailbox: read every message, deleted at RCVD."""
        self.open(arg, deleting=True)

    def cmd_RCEV(self, arg: str) -> None:
        """RCEV: exactly the announced octets, nothing else."""
        sent = 0
        for entry in self.entries():
            self.send_bytes(entry)
            sent += len(entry)
        if sent != self.total:  # cannot happen while we hold the lock
            self.log.error("[%s] RCEV sent %d octets, announced %d", self.peer, sent, self.total)
            self.close()
            return
        self.state = SENT

    def cmd_RCVD(self, arg: str) -> None:
        ids = [m.id for m in self.batch]
        deleted = self.store.maildrops.close_maildrop(
            self.account.id, self.holder, ids if self.deleting else [], [] if self.deleting else ids
        )
        self.locked, self.batch, self.state = False, [], READY
        self.log.info("[%s] %s: RCVD, %d deleted", self.peer, self.account.address, deleted)
        self.send("+OK")

    def cmd_RSET(self, arg: str) -> None:
        if self.state in (OPENED, SENT):
            self.unlock()
            self.state = READY
        elif self.state == USER_GIVEN:
            self.state = START
        self.send("+OK")

    def cmd_NOOP(self, arg: str) -> None:
        self.send("+OK")

    def cmd_QUIT(self, arg: str) -> None:
        self.unlock()
        self.close("+OK")
