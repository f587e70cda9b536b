"""Every database operation the servers and the command line need, each one short transaction.

Protocol handlers call these and never SQLAlchemy. The contract of each function is in its
docstring; the rules that hold for all of them:

- Each call is one transaction: it commits before it returns, or changes nothing and raises.
- :class:`~mailsrv.db.DatabaseUnavailable` means the database could not be reached (temporary:
  answer 4xx / ``-ERR [SYS/TEMP]``); :class:`Refused` means the operation is not allowed
  (its text is a one-line reason a person can read).
- Addresses and domains are stored lower case; arguments are lowered here.
- Message numbering is the caller's business: the store deals in message ids, which are
  never reused, and uids (the UIDL), which are never reused either.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from .db import Database
from .message import dot_line_offsets, encode_offsets, to_crlf
from .models import (
    Account,
    Alias,
    Domain,
    MaildropLock,
    Message,
    OdmrGrant,
    QueuedMessage,
    QueueRecipient,
    utcnow,
)


class Refused(Exception):
    """An operation the store will not do; the text is a one-line reason."""


@dataclass(frozen=True)
class AccountInfo:
    id: int
    address: str
    domain_id: int
    password_hash: str
    cram_secret: str | None
    enabled: bool
    quota_bytes: int | None
    last_login_at: datetime | None = None


@dataclass(frozen=True)
class MessageInfo:
    """One message of a maildrop snapshot: no body."""

    id: int
    uid: str
    size: int
    seen: bool


def batches_by_size(messages: Iterable[MessageInfo], limit: int) -> Iterator[list[int]]:
    """The ids of ``messages`` in order, in batches of at most ``limit`` octets (a message
    larger than that makes a batch of its own)."""
    batch: list[int] = []
    total = 0
    for message in messages:
        if batch and total + message.size > limit:
            yield batch
            batch, total = [], 0
        batch.append(message.id)
        total += message.size
    if batch:
        yield batch


@dataclass(frozen=True)
class DomainInfo:
    id: int
    name: str
    kind: str
    accounts: int = 0


def split_address(address: str) -> tuple[str, str]:
    """``"Ann@Example.ORG"`` -> ``("ann", "example.org")``; Refused when it has no domain."""
    local, at, domain = address.strip().lower().rpartition("@")
    if not at or not local or not domain or " " in address.strip():
        raise Refused(f"not an address: {address!r} (expected local@domain)")
    return local, domain


def new_uid() -> str:
    """A UIDL: 24 characters of 0-9a-f, unique and never reused (RFC 1939 section 7)."""
    return secrets.token_hex(12)


def this_host() -> str:
    return socket.gethostname()


def lock_holder(session_tag: str = "") -> str:
    """The name a lock or lease holder goes by: ``host:pid`` (plus a tag for one session)."""
    holder = f"{this_host()}:{os.getpid()}"
    return f"{holder}:{session_tag}" if session_tag else holder


def holder_is_dead(holder: str) -> bool:
    """True when ``holder`` names a process of this host that no longer runs."""
    parts = holder.split(":")
    if len(parts) < 2 or parts[0] != this_host() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


#: the hot read of POP3 retrieval: a range of one account's messages, as plain text SQL so
#: that no type processing copies the bodies (read_bodies drops ids it was not asked for)
BODIES_BETWEEN = text(
    "SELECT id, body, dot_offsets FROM messages"
    " WHERE account_id = :account AND id BETWEEN :low AND :high"
)

BODIES_BETWEEN_ONE_ROW = text(
    "SELECT group_concat(id), group_concat(length(body)),"
    " group_concat(coalesce(dot_offsets, '-'), '|'), CAST(group_concat(body, x'') AS BLOB)"
    " FROM (SELECT id, body, dot_offsets FROM messages"
    " WHERE account_id = :account AND id BETWEEN :low AND :high ORDER BY id)"
)

ACCOUNT_COLUMNS = (
    Account.id,
    Account.address,
    Account.domain_id,
    Account.password_hash,
    Account.cram_secret,
    Account.enabled,
    Account.quota_bytes,
    Account.last_login_at,
)


def _account_info(row: Account) -> AccountInfo:
    return AccountInfo(
        id=row.id,
        address=row.address,
        domain_id=row.domain_id,
        password_hash=row.password_hash,
        cram_secret=row.cram_secret,
        enabled=row.enabled,
        quota_bytes=row.quota_bytes,
        last_login_at=row.last_login_at,
    )


# --- the delivery queue ---------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A recipient a worker has leased, with what it needs of its message (``id`` and
    ``queue_id`` are None while its message is being posted: see :meth:`Store.post`)."""

    id: int | None
    queue_id: int | None
    recipient: str
    domain: str
    attempts: int
    sender: str
    size: int
    created_at: datetime
    origin: str


@dataclass
class Outcome:
    """What became of one claimed recipient (see :meth:`QueueOps.settle`).

    action: ``deliver`` (``account_id``), ``forward`` (``targets``: new recipients of the
    same message, envelope sender kept), ``hold``, ``retry`` (``delay`` seconds, ``error``)
    or ``fail`` (``status``, ``error``: an RFC 3463 code and the reason).
    """

    claimed: Claimed
    action: str
    account_id: int | None = None
    targets: tuple[str, ...] = ()
    delay: float = 0.0
    status: str = ""
    error: str = ""


@dataclass(frozen=True)
class Resolution:
    """Where an address leads: kind is ``account``, ``alias``, ``odmr``, ``remote`` or ``unknown``."""

    kind: str
    account: AccountInfo | None = None
    target: str = ""


_OURS = select(Domain.name)
_CLAIMED_COLUMNS = (
    QueueRecipient.id, QueueRecipient.queue_id, QueueRecipient.recipient, QueueRecipient.domain,
    QueueRecipient.attempts, QueuedMessage.sender, QueuedMessage.size, QueuedMessage.created_at,
    QueuedMessage.origin,
)
#: due recipients in our domains: queued ones whose time has come ...
DUE_QUEUED = (
    select(*_CLAIMED_COLUMNS)
    .join(QueuedMessage, QueuedMessage.id == QueueRecipient.queue_id)
    .where(
        QueueRecipient.state == "queued",
        QueueRecipient.next_attempt_at <= bindparam("now"),
        QueueRecipient.domain.in_(_OURS),
    )
    .order_by(QueueRecipient.next_attempt_at, QueueRecipient.id)
    .limit(bindparam("limit"))
)
#: ... and leases that ran out (a worker that died or hung)
DUE_EXPIRED = (
    select(*_CLAIMED_COLUMNS)
    .join(QueuedMessage, QueuedMessage.id == QueueRecipient.queue_id)
    .where(
        QueueRecipient.state == "inflight",
        QueueRecipient.lease_expires_at < bindparam("now"),
        QueueRecipient.domain.in_(_OURS),
    )
    .order_by(QueueRecipient.id)
    .limit(bindparam("limit"))
)


def _due_in(c, limit: int, now: datetime, expired: bool, lock: bool = False) -> list[Claimed]:
    """Due recipients: queued ones, and (when ``expired``) those whose lease ran out."""
    params = {"now": now, "limit": limit}
    statements = (DUE_QUEUED, DUE_EXPIRED) if expired else (DUE_QUEUED,)
    rows: list[Claimed] = []
    for statement in statements:
        if lock:  # PostgreSQL: skip rows another worker has locked
            statement = statement.with_for_update(of=QueueRecipient, skip_locked=True)
        rows += [Claimed(*row) for row in c.execute(statement, params)]
    return rows[:limit]


_SETTLE_VALUES = {
    column: bindparam(column)
    for column in ("state", "attempts", "last_error", "next_attempt_at", "lease_owner", "lease_expires_at", "updated_at")
}
#: a recipient settled by the worker that holds its lease
SETTLE_LEASED = (
    update(QueueRecipient)
    .where(
        QueueRecipient.id == bindparam("rid"),
        QueueRecipient.state == "inflight",
        QueueRecipient.lease_owner == bindparam("owner"),
    )
    .values(**_SETTLE_VALUES)
)
#: a recipient settled while it is still due (the update is the claim)
SETTLE_DUE = (
    update(QueueRecipient)
    .where(
        QueueRecipient.id == bindparam("rid"),
        (QueueRecipient.state == "queued")
        | ((QueueRecipient.state == "inflight") & (QueueRecipient.lease_expires_at < bindparam("now"))),
    )
    .values(**_SETTLE_VALUES)
)
INSERT_MESSAGE = insert(Message).returning(Message.id)
INSERT_QUEUED = insert(QueuedMessage).returning(QueuedMessage.id)
INSERT_RECIPIENT = insert(QueueRecipient)
#: the state a recipient is left in by each outcome's action
STATE_AFTER = {"deliver": "delivered", "forward": "delivered", "hold": "held", "retry": "queued", "fail": "failed"}


#: the statements of a maildrop session (login, UPDATE state, lock upkeep), run as Raw
#: transactions; SQLite compiles FOR UPDATE to nothing (its write transaction locks all)
LOCK_OF = (
    select(MaildropLock.holder, MaildropLock.expires_at)
    .where(MaildropLock.account_id == bindparam("account"))
    .with_for_update()
)
DROP_LOCK = delete(MaildropLock).where(MaildropLock.account_id == bindparam("account"))
INSERT_LOCK = insert(MaildropLock)
_OUR_LOCK = (MaildropLock.account_id == bindparam("account"), MaildropLock.holder == bindparam("holder"))
RELEASE_LOCK = delete(MaildropLock).where(*_OUR_LOCK)
RENEW_LOCK = update(MaildropLock).where(*_OUR_LOCK).values(expires_at=bindparam("expires"))
MARK_LOGIN = update(Account).where(Account.id == bindparam("account")).values(last_login_at=bindparam("now"))
SNAPSHOT = (
    select(Message.id, Message.uid, Message.size, Message.seen)
    .where(Message.account_id == bindparam("account"))
    .order_by(Message.id)
)
_ONE_MESSAGE = (Message.account_id == bindparam("account"), Message.id == bindparam("id"))
DELETE_MESSAGE = delete(Message).where(*_ONE_MESSAGE)
SET_SEEN = update(Message).where(*_ONE_MESSAGE).values(seen=bindparam("seen"))


#: recipients of a queued message that are not done with yet
PENDING_RECIPIENTS = select(func.count(QueueRecipient.id)).where(
    QueueRecipient.queue_id == bindparam("queue_id"), QueueRecipient.state.not_in(("delivered", "failed"))
)
CUT_BODY = update(QueuedMessage).where(QueuedMessage.id == bindparam("queue_id")).values(body=bindparam("header"))


def header_of(body: bytes) -> bytes:
    """What the queue keeps of a message once every recipient is done with: its header
    (through the blank line), so ``queue show`` and SQL still tell what it was."""
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 4]


def _recipient_rows(queue_id: int, recipients: Sequence[str], now: datetime) -> list[dict]:
    """New ``queued`` recipients of a queued message, ready for INSERT_RECIPIENT."""
    return [
        {"queue_id": queue_id, "recipient": r, "domain": r.rpartition("@")[2], "state": "queued",
         "attempts": 0, "next_attempt_at": now, "updated_at": now}
        for r in recipients
    ]


def _needing_body(outcomes: Iterable[Outcome]) -> set[int]:
    """The queued messages whose body these outcomes need: a delivery copies it, a
    failure quotes it in the bounce (and both may leave the message done with)."""
    return {o.claimed.queue_id for o in outcomes if o.action in ("deliver", "fail")}


def _queue_bodies_in(c, queue_ids: Iterable[int]) -> dict[int, bytes]:
    wanted = list(set(queue_ids))
    if not wanted:
        return {}
    rows = c.execute(select(QueuedMessage.id, QueuedMessage.body).where(QueuedMessage.id.in_(wanted)))
    return {r[0]: r[1] for r in rows.all()}


class Lookup:
    """Reads the delivery decisions need, on a connection the caller holds."""

    def __init__(self, connection):
        self.c = connection

    DOMAIN_KIND = select(Domain.kind).where(Domain.name == bindparam("name"))
    ACCOUNT = select(*ACCOUNT_COLUMNS).where(Account.address == bindparam("address"))
    ALIAS = select(Alias.target).where(Alias.address == bindparam("address"))
    USAGE = select(func.count(Message.id), func.coalesce(func.sum(Message.size), 0)).where(
        Message.account_id == bindparam("account")
    )

    def resolve(self, address: str) -> Resolution:
        """Where mail for ``address`` goes: an account, an alias, an ODMR domain, elsewhere."""
        address = address.strip().lower()
        kind = self.c.scalar(self.DOMAIN_KIND, {"name": address.rpartition("@")[2]})
        if kind is None:
            return Resolution("remote")
        if kind == "odmr":
            return Resolution("odmr")
        row = self.c.execute(self.ACCOUNT, {"address": address}).first()
        if row is not None:
            return Resolution("account", account=AccountInfo(*row))
        target = self.c.scalar(self.ALIAS, {"address": address})
        return Resolution("alias", target=target) if target else Resolution("unknown")

    def mailbox_usage(self, account_id: int) -> tuple[int, int]:
        """(messages, octets) in the account's mailbox."""
        row = self.c.execute(self.USAGE, {"account": account_id}).one()
        return int(row[0]), int(row[1])


def lease_is_dead(owner: str | None) -> bool:
    return bool(owner) and holder_is_dead(owner)


class QueueOps:
    """The queue operations of :class:`Store` (mixed in below)."""

    db: Database

    def has_due(self) -> bool:
        """Is any recipient in our domains due (a plain read: no write lock)?"""
        with self.db.read_core() as c:
            return bool(_due_in(c, 1, utcnow(), expired=True))

    def claim(self, owner: str, lease: float, limit: int = 100) -> list[Claimed]:
        """Lease up to ``limit`` due recipients in our domains (local and ODMR) to ``owner``:
        ``queued`` ones whose time has come, and ``inflight`` ones whose lease ran out.
        Remote recipients are left for the relay. One transaction; PostgreSQL skips rows
        another worker has locked. For work done outside the database (the relay): settle
        it with :meth:`settle` while the lease holds."""
        if not self.has_due():
            return []
        now = utcnow()
        with self.db.write_core(durable=False) as c:
            due = _due_in(c, limit, now, expired=True, lock=self.db.dialect == "postgresql")
            if not due:
                return []
            c.execute(
                update(QueueRecipient)
                .where(QueueRecipient.id.in_([d.id for d in due]))
                .values(state="inflight", lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease), updated_at=now)
            )
            return due

    def deliver_due(
        self, limit: int, decide, local_copy, bounce, expired: bool = True
    ) -> tuple[int, list[Outcome]]:
        """Deliver due recipients whose destination is decided without network I/O
        (mailboxes, ODMR hold, bounces): read them and decide (``decide(claimed, lookup)``
        -> outcomes, ``lookup`` a :class:`Lookup`) without holding the write lock, then
        apply the outcomes in one durable transaction, each only if its recipient is still
        due (the update of its row is the claim, so a recipient another worker got first is
        skipped and each is delivered exactly once). ``expired``: also take recipients
        whose lease ran out. Returns (how many were read, the outcomes applied)."""
        with self.db.read_core() as c:
            due = _due_in(c, limit, utcnow(), expired)
            if not due:
                return 0, []
            outcomes = decide(due, Lookup(c))
            bodies = _queue_bodies_in(c, _needing_body(outcomes))
        with self.db.write_core() as c:
            return len(due), self._settle_in(c, None, outcomes, local_copy, bounce, utcnow(), bodies)

    def reclaim_dead_leases(self) -> int:
        """Give the leases of dead processes of this host back to the queue at once."""
        with self.db.write() as s:
            rows = s.scalars(
                select(QueueRecipient).where(
                    QueueRecipient.state == "inflight", QueueRecipient.lease_owner.like(f"{this_host()}:%")
                )
            ).all()
            dead = [r for r in rows if lease_is_dead(r.lease_owner)]
            for row in dead:
                row.state, row.lease_owner, row.lease_expires_at = "queued", None, None
            return len(dead)

    def settle(self, owner: str, outcomes: Sequence[Outcome], local_copy, bounce) -> list[Outcome]:
        """Apply outcomes in one transaction, each only if ``owner`` still holds its lease;
        return those applied. A delivery writes the mailbox copy (``local_copy(outcome,
        body)``) in the same transaction that marks the recipient delivered, so it happens
        exactly once. Failures of one message get one bounce (``bounce(claimed, failed,
        body)`` returns its text, or None for no bounce), queued in the same transaction."""
        with self.db.write_core() as c:
            return self._settle_in(c, owner, outcomes, local_copy, bounce, utcnow())

    def _settle_in(
        self, s, owner: str | None, outcomes: Sequence[Outcome], local_copy, bounce, now: datetime,
        bodies: dict[int, bytes] | None = None,
    ) -> list[Outcome]:
        """Apply outcomes: with an ``owner``, each only while that owner's lease holds;
        without, each only while its recipient is still due (see :meth:`deliver_due`)."""
        applied: list[Outcome] = []
        if bodies is None:
            bodies = _queue_bodies_in(s, _needing_body(outcomes))
        statement = SETTLE_DUE if owner is None else SETTLE_LEASED
        for outcome in outcomes:
            c = outcome.claimed
            values = {
                "rid": c.id, "owner": owner, "now": now, "state": STATE_AFTER[outcome.action],
                "attempts": c.attempts, "last_error": None, "next_attempt_at": now, "lease_owner": None,
                "lease_expires_at": None, "updated_at": now,
            }
            if outcome.action == "forward":
                values["last_error"] = "forwarded to " + ", ".join(outcome.targets)
            elif outcome.action == "retry":
                values.update(
                    attempts=c.attempts + 1, last_error=outcome.error,
                    next_attempt_at=now + timedelta(seconds=outcome.delay),
                )
            elif outcome.action == "fail":
                values.update(attempts=c.attempts + 1, last_error=f"{outcome.status} {outcome.error}")
            if s.execute(statement, values).rowcount != 1:
                continue  # someone else has it now (or had it first)
            if outcome.action == "deliver":
                Store._insert_message(s, outcome.account_id, local_copy(outcome, bodies[c.queue_id]), c.sender)
            elif outcome.action == "forward":
                s.execute(INSERT_RECIPIENT, _recipient_rows(c.queue_id, outcome.targets, now))
            applied.append(outcome)
        failed: dict[int, list[Outcome]] = {}
        for outcome in applied:
            if outcome.action == "fail":
                failed.setdefault(outcome.claimed.queue_id, []).append(outcome)
        for queue_id, items in failed.items():
            text = bounce(items[0].claimed, items, bodies[queue_id])
            if text is not None:
                self._enqueue_in(s, "", text, [items[0].claimed.sender], "bounce", None, now)
        for queue_id in _needing_body(applied):
            if not s.scalar(PENDING_RECIPIENTS, {"queue_id": queue_id}):  # every recipient done
                s.execute(CUT_BODY, {"queue_id": queue_id, "header": header_of(bodies[queue_id])})
        return applied

    # --- administration ----------------------------------------------------------------

    def queue_list(self) -> list[tuple]:
        """(id, sender, size, created_at, origin, [(recipient, state, attempts, last_error)])."""
        with self.db.read() as s:
            messages = s.execute(
                select(QueuedMessage.id, QueuedMessage.sender, QueuedMessage.size, QueuedMessage.created_at, QueuedMessage.origin)
                .where(QueuedMessage.id.in_(select(QueueRecipient.queue_id).where(QueueRecipient.state.not_in(("delivered", "failed")))))
                .order_by(QueuedMessage.id)
            ).all()
            return [tuple(m) + (self._recipients(s, m.id),) for m in messages]

    @staticmethod
    def _recipients(s, queue_id: int) -> list[tuple]:
        return [
            tuple(r)
            for r in s.execute(
                select(QueueRecipient.recipient, QueueRecipient.state, QueueRecipient.attempts, QueueRecipient.last_error, QueueRecipient.next_attempt_at)
                .where(QueueRecipient.queue_id == queue_id)
                .order_by(QueueRecipient.id)
            )
        ]

    def queue_show(self, queue_id: int) -> tuple:
        """(id, sender, size, created_at, origin, recipients, body); Refused if unknown."""
        with self.db.read() as s:
            row = s.get(QueuedMessage, queue_id)
            if row is None:
                raise Refused(f"no such queued message: {queue_id}")
            return (row.id, row.sender, row.size, row.created_at, row.origin, self._recipients(s, queue_id), row.body)

    def queue_set_state(self, queue_id: int | None, from_states: tuple[str, ...], to_state: str) -> int:
        """Move recipients (of one message, or all) between states; return how many moved."""
        with self.db.write() as s:
            query = update(QueueRecipient).where(QueueRecipient.state.in_(from_states))
            if queue_id is not None:
                if s.get(QueuedMessage, queue_id) is None:
                    raise Refused(f"no such queued message: {queue_id}")
                query = query.where(QueueRecipient.queue_id == queue_id)
            values = {"state": to_state, "updated_at": utcnow()}
            if to_state == "queued":
                values["next_attempt_at"] = utcnow()
            return s.execute(query.values(**values)).rowcount

    def queue_delete(self, queue_id: int) -> None:
        with self.db.write() as s:
            row = s.get(QueuedMessage, queue_id)
            if row is None:
                raise Refused(f"no such queued message: {queue_id}")
            s.execute(delete(QueueRecipient).where(QueueRecipient.queue_id == queue_id))
            s.delete(row)


class Store(QueueOps):
    """The database operations of mailsrv (see the module docstring for the contract)."""

    def __init__(self, db: Database):
        self.db = db

    # --- accounts --------------------------------------------------------------------

    def find_account(self, address: str) -> AccountInfo | None:
        """The account with this address (any case), enabled or not; None if there is none."""
        with self.db.read_raw() as c:
            row = c.execute(Lookup.ACCOUNT, {"address": address.strip().lower()}).first()
            return AccountInfo(*row) if row else None

    def record_login(self, account_id: int) -> None:
        """Set ``last_login_at`` to now."""
        with self.db.write_raw(durable=False) as c:
            c.execute(MARK_LOGIN, {"account": account_id, "now": utcnow()})

    # --- maildrops -------------------------------------------------------------------

    def snapshot(self, account_id: int) -> list[MessageInfo]:
        """The account's messages in arrival order (id ascending): ids, uids, sizes; no bodies."""
        with self.db.read_raw() as c:
            return self._snapshot_in(c, account_id)

    @staticmethod
    def _snapshot_in(c, account_id: int) -> list[MessageInfo]:
        return [MessageInfo(r[0], r[1], r[2], bool(r[3])) for r in c.execute(SNAPSHOT, {"account": account_id}).all()]

    def read_body(self, account_id: int, message_id: int) -> bytes | None:
        """The stored message (CRLF line ends, not byte-stuffed); None if it is gone."""
        with self.db.read() as s:
            return s.scalar(
                select(Message.body).where(Message.id == message_id, Message.account_id == account_id)
            )

    def read_bodies(
        self, account_id: int, ids: Sequence[int]
    ) -> dict[int, tuple[bytes | memoryview, str | None]]:
        """{id: (body, dot_offsets)} of several messages of the account at once (missing
        ones left out); see :func:`mailsrv.message.dot_stuff_parts` for the offsets. A
        body may be a memoryview into the one value a batch was read as (no copy)."""
        wanted = set(ids)
        if not wanted:
            return {}
        params = {"account": account_id, "low": min(wanted), "high": max(wanted)}
        if self.db.dialect == "sqlite" and len(wanted) > 1:
            return {k: v for k, v in self._bodies_in_one_row(params).items() if k in wanted}
        with self.db.read_raw() as c:
            rows = c.execute(BODIES_BETWEEN, params).all()
        return {r[0]: (bytes(r[1]), r[2]) for r in rows if r[0] in wanted}

    def _bodies_in_one_row(self, params: dict) -> dict[int, tuple[bytes | memoryview, str | None]]:
        """SQLite: the range's bodies concatenated into one value, split by the lengths
        aggregated beside them. One row instead of one per message: the sqlite3 module
        gives the GIL up and takes it back for every row, which costs dearly while many
        sessions retrieve at once. All aggregates of one query see the rows in the same
        order, so ids, lengths, offsets and bodies line up whatever that order is."""
        with self.db.read_raw() as c:
            ids, lengths, offsets, blob = c.execute(BODIES_BETWEEN_ONE_ROW, params).one()
        if ids is None:
            return {}
        result: dict[int, tuple[bytes | memoryview, str | None]] = {}
        view, at = memoryview(blob), 0  # (views: each body copied once, when it is sent)
        for message_id, length, dots in zip(
            str(ids).split(","), str(lengths).split(","), str(offsets).split("|"), strict=True
        ):
            end = at + int(length)
            result[int(message_id)] = (view[at:end], None if dots == "-" else dots)
            at = end
        return result

    def read_messages(self, account_id: int, ids: Sequence[int]) -> dict[int, tuple[str, datetime, bytes]]:
        """{id: (envelope sender, received_at, body)} of several messages (missing ones left out)."""
        with self.db.read() as s:
            rows = s.execute(
                select(Message.id, Message.sender, Message.received_at, Message.body).where(
                    Message.account_id == account_id, Message.id.in_(list(ids))
                )
            )
            return {r.id: (r.sender, r.received_at, r.body) for r in rows}

    def delete_messages(self, account_id: int, ids: Iterable[int]) -> int:
        """Delete these messages of the account, all or none; return how many were there."""
        with self.db.write_raw() as c:
            return self._delete_in(c, account_id, sorted(set(ids)))

    def set_seen(self, account_id: int, ids: Iterable[int], seen: bool = True) -> None:
        """Mark these messages retrieved (``seen``) or not."""
        ids = sorted(set(ids))
        if ids:
            with self.db.write_raw() as c:
                self._set_seen_in(c, account_id, ids, seen)

    @staticmethod
    def _delete_in(c, account_id: int, ids: Sequence[int]) -> int:
        """Delete these messages in the caller's transaction; return how many were there.
        (One statement per message, run as one executemany, whose rowcount is the sum.)"""
        if not ids:
            return 0
        return c.execute(DELETE_MESSAGE, [{"account": account_id, "id": i} for i in ids]).rowcount

    @staticmethod
    def _set_seen_in(c, account_id: int, ids: Sequence[int], seen: bool) -> None:
        if ids:
            c.execute(SET_SEEN, [{"account": account_id, "id": i, "seen": seen} for i in ids])

    def deliver_local(self, account_id: int, body: bytes, sender: str = "") -> int:
        """Put a message into the account's mailbox; return its id. Line ends are stored as
        CRLF and a missing final line end is added, so ``size`` is what RETR sends."""
        with self.db.write() as s:
            return self._insert_message(s, account_id, body, sender)

    @staticmethod
    def _insert_message(s, account_id: int, body: bytes, sender: str) -> int:
        body = to_crlf(body)  # the stored form: CRLF line ends, ending with CRLF
        return s.execute(
            INSERT_MESSAGE,
            {
                "account_id": account_id, "uid": new_uid(), "sender": sender, "size": len(body), "body": body,
                "dot_offsets": encode_offsets(dot_line_offsets(body)), "received_at": utcnow(), "seen": False,
            },
        ).scalar_one()

    def mailbox_usage(self, account_id: int) -> tuple[int, int]:
        """(messages, octets) in the account's mailbox."""
        with self.db.read_core() as c:
            return Lookup(c).mailbox_usage(account_id)

    # --- maildrop locks --------------------------------------------------------------

    def acquire_lock(self, account_id: int, holder: str, ttl: float) -> bool:
        """Take the account's maildrop lock for ``ttl`` seconds; False if someone holds it.

        A lock whose time has run out, or whose holder is a dead process of this host, is
        taken over. The lock is valid across processes and hosts (it is a row).
        """
        try:
            with self.db.write_raw(durable=False) as c:
                return self._take_lock(c, account_id, holder, ttl)
        except IntegrityError:
            return False  # another session inserted it first (PostgreSQL)

    @staticmethod
    def _take_lock(c, account_id: int, holder: str, ttl: float) -> bool:
        now = utcnow()
        current = c.execute(LOCK_OF, {"account": account_id}).first()
        if current is not None:
            if current[1] > now and not holder_is_dead(current[0]):
                return False
            c.execute(DROP_LOCK, {"account": account_id})
        c.execute(
            INSERT_LOCK, {"account_id": account_id, "holder": holder, "expires_at": now + timedelta(seconds=ttl)}
        )
        return True

    def open_maildrop(self, account_id: int, holder: str, ttl: float) -> list[MessageInfo] | None:
        """Log in to a maildrop: take its lock, note the login time, and return the snapshot
        (as :meth:`snapshot`), all in one transaction. None when the lock is held."""
        try:
            with self.db.write_raw(durable=False) as c:
                if not self._take_lock(c, account_id, holder, ttl):
                    return None
                c.execute(MARK_LOGIN, {"account": account_id, "now": utcnow()})
                return self._snapshot_in(c, account_id)
        except IntegrityError:
            return None

    def close_maildrop(
        self, account_id: int, holder: str, delete_ids: Iterable[int], seen_ids: Iterable[int]
    ) -> int:
        """End a maildrop session (POP3 UPDATE, RFC 918 RCVD): delete ``delete_ids``, mark
        ``seen_ids`` retrieved and release our lock, all in one transaction. Returns how many
        messages were deleted. If it raises, nothing changed (and the lock is still ours)."""
        delete_ids = sorted(set(delete_ids))
        seen_ids = sorted(set(seen_ids) - set(delete_ids))
        with self.db.write_raw(durable=bool(delete_ids)) as c:
            removed = self._delete_in(c, account_id, delete_ids)
            self._set_seen_in(c, account_id, seen_ids, True)
            c.execute(RELEASE_LOCK, {"account": account_id, "holder": holder})
        return removed

    def renew_lock(self, account_id: int, holder: str, ttl: float) -> bool:
        """Extend our lock by ``ttl`` seconds from now; False if we no longer hold it."""
        with self.db.write_raw(durable=False) as c:
            expires = utcnow() + timedelta(seconds=ttl)
            return c.execute(RENEW_LOCK, {"account": account_id, "holder": holder, "expires": expires}).rowcount == 1

    def release_lock(self, account_id: int, holder: str) -> None:
        """Drop our lock (nothing happens if it is not ours any more)."""
        with self.db.write_raw(durable=False) as c:
            c.execute(RELEASE_LOCK, {"account": account_id, "holder": holder})

    def release_dead_locks(self) -> int:
        """Remove the locks of dead processes of this host; return how many."""
        with self.db.write() as s:
            rows = s.scalars(
                select(MaildropLock).where(MaildropLock.holder.like(f"{this_host()}:%"))
            ).all()
            dead = [row for row in rows if holder_is_dead(row.holder)]
            for row in dead:
                s.delete(row)
            return len(dead)

    # --- the queue -------------------------------------------------------------------

    def enqueue(
        self,
        sender: str,
        body: bytes,
        recipients: Sequence[str],
        origin: str,
        account_id: int | None = None,
    ) -> int:
        """Queue one message for these recipients, all in one transaction; return its id.

        Recipients are stored lower case, each once. Nothing is written unless all are.
        """
        return self.post(sender, body, recipients, origin, account_id)[0]

    def post(
        self,
        sender: str,
        body: bytes,
        recipients: Sequence[str],
        origin: str,
        account_id: int | None = None,
        decide=None,
        local_copy=None,
    ) -> tuple[int, int]:
        """:meth:`enqueue`, delivering to local mailboxes at once what can be: return the
        queue id and how many recipients were left ``queued`` for the workers.

        With ``decide`` and ``local_copy`` (as for :meth:`QueueOps.deliver_due`), each
        recipient that ``decide`` sends to a local mailbox is delivered in the transaction
        that queues the message: its mailbox copy is written and it is recorded
        ``delivered``, so the mail is readable once the reply to the poster says it is
        queued, and no worker has to read it back. When every recipient is delivered so,
        the queue keeps only the message's header (as it does once the workers are done
        with a message): the mailboxes hold the copies. The decisions are made inside that
        transaction, so a quota is checked against what the mailbox holds. Every other
        outcome (alias, ODMR, remote, unknown, over quota) is left ``queued`` for the
        workers, which own forwarding, holding, retries and bounces.

        The transaction runs on the driver's cursor and is shared with the posts of other
        sessions made at the same time (:meth:`Database.write_grouped`): this is the path
        every posted message takes.
        """
        unique = list(dict.fromkeys(r.strip().lower() for r in recipients))
        if not unique:
            raise Refused("no recipients")
        for recipient in unique:
            split_address(recipient)  # Refused for a malformed one, before anything is written
        now = utcnow()

        def work(c) -> tuple[int, int]:
            delivered: list[Outcome] = []
            if decide is not None:
                claimed = [Claimed(None, None, r, r.rpartition("@")[2], 0, sender, len(body), now, origin) for r in unique]
                delivered = [o for o in decide(claimed, Lookup(c)) if o.action == "deliver"]
            kept = body if len(delivered) < len(unique) else header_of(body)
            queue_id = self._enqueue_in(c, sender, kept, unique, origin, account_id, now, delivered, len(body))
            for outcome in delivered:
                Store._insert_message(c, outcome.account_id, local_copy(outcome, body), sender)
            return queue_id, len(unique) - len(delivered)

        return self.db.write_grouped(work)

    @staticmethod
    def _enqueue_in(
        c, sender: str, body: bytes, recipients: Sequence[str], origin: str, account_id, now,
        delivered: Sequence[Outcome] = (), size: int | None = None,
    ) -> int:
        """Insert a queued message and its recipients inside the caller's transaction;
        the recipients of ``delivered`` are recorded as delivered (``body`` is then what is
        kept of a message of ``size`` octets)."""
        queue_id = c.execute(
            INSERT_QUEUED,
            {"sender": sender, "body": body, "size": len(body) if size is None else size, "origin": origin,
             "account_id": account_id, "created_at": now},
        ).scalar_one()
        rows = _recipient_rows(queue_id, recipients, now)
        if delivered:
            done = {o.claimed.recipient for o in delivered}
            for row in rows:
                if row["recipient"] in done:
                    row["state"] = "delivered"
        c.execute(INSERT_RECIPIENT, rows)
        return queue_id

    # --- administration: domains -----------------------------------------------------

    def add_domain(self, name: str, kind: str = "local") -> DomainInfo:
        """Add a domain; Refused if it exists."""
        name = name.strip().lower().rstrip(".")
        if not name or "@" in name or " " in name:
            raise Refused(f"not a domain name: {name!r}")
        with self.db.write() as s:
            if s.scalar(select(Domain.id).where(Domain.name == name)) is not None:
                raise Refused(f"domain {name} exists already")
            row = Domain(name=name, kind=kind)
            s.add(row)
            s.flush()
            return DomainInfo(row.id, row.name, row.kind)

    def del_domain(self, name: str) -> None:
        """Delete a domain that has no accounts; Refused otherwise."""
        name = name.strip().lower()
        with self.db.write() as s:
            row = s.scalars(select(Domain).where(Domain.name == name)).first()
            if row is None:
                raise Refused(f"no such domain: {name}")
            users = s.scalar(select(func.count(Account.id)).where(Account.domain_id == row.id))
            if users:
                raise Refused(f"domain {name} still has {users} account(s); delete them first")
            s.delete(row)

    def list_domains(self) -> list[DomainInfo]:
        with self.db.read() as s:
            counts = (
                select(Account.domain_id, func.count(Account.id).label("n"))
                .group_by(Account.domain_id)
                .subquery()
            )
            rows = s.execute(
                select(Domain.id, Domain.name, Domain.kind, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.domain_id == Domain.id)
                .order_by(Domain.name)
            )
            return [DomainInfo(r[0], r[1], r[2], int(r[3])) for r in rows]

    def domain_kind(self, name: str) -> str | None:
        """``local``, ``odmr`` or None for a domain we do not serve."""
        with self.db.read() as s:
            return s.scalar(select(Domain.kind).where(Domain.name == name.strip().lower()))

    # --- administration: accounts ----------------------------------------------------

    def add_account(
        self,
        address: str,
        password_hash: str,
        cram_secret: str | None = None,
        quota_bytes: int | None = None,
    ) -> AccountInfo:
        """Create an account in an existing local domain; Refused if it or an alias exists."""
        local, domain = split_address(address)
        address = f"{local}@{domain}"
        with self.db.write() as s:
            dom = s.scalars(select(Domain).where(Domain.name == domain)).first()
            if dom is None:
                raise Refused(f"unknown domain {domain}: add it first with `mailsrv domain add`")
            if dom.kind != "local":
                raise Refused(f"{domain} is an ODMR domain: accounts live in local domains")
            if s.scalar(select(Account.id).where(Account.address == address)) is not None:
                raise Refused(f"user {address} exists already")
            if s.scalar(select(Alias.id).where(Alias.address == address)) is not None:
                raise Refused(f"{address} is an alias already")
            row = Account(
                address=address,
                domain_id=dom.id,
                password_hash=password_hash,
                cram_secret=cram_secret,
                quota_bytes=quota_bytes,
            )
            s.add(row)
            s.flush()
            return _account_info(row)

    def _require_account(self, s, address: str) -> Account:
        row = s.scalars(select(Account).where(Account.address == address.strip().lower())).first()
        if row is None:
            raise Refused(f"no such user: {address.strip().lower()}")
        return row

    def set_password(self, address: str, password_hash: str, cram_secret: str | None) -> None:
        """Replace an account's password (and CRAM-MD5 secret: None removes it)."""
        with self.db.write() as s:
            row = self._require_account(s, address)
            row.password_hash = password_hash
            row.cram_secret = cram_secret

    def set_enabled(self, address: str, enabled: bool) -> None:
        with self.db.write() as s:
            self._require_account(s, address).enabled = enabled

    def del_account(self, address: str) -> int:
        """Delete an account and its mailbox; return how many messages went with it."""
        with self.db.write() as s:
            row = self._require_account(s, address)
            count = s.scalar(select(func.count(Message.id)).where(Message.account_id == row.id))
            s.execute(delete(Message).where(Message.account_id == row.id))
            s.execute(delete(MaildropLock).where(MaildropLock.account_id == row.id))
            s.execute(delete(OdmrGrant).where(OdmrGrant.account_id == row.id))
            s.delete(row)
            return int(count or 0)

    def list_accounts(self) -> list[tuple[AccountInfo, int, int]]:
        """Every account with its (messages, octets)."""
        with self.db.read() as s:
            usage = (
                select(
                    Message.account_id,
                    func.count(Message.id).label("n"),
                    func.sum(Message.size).label("octets"),
                )
                .group_by(Message.account_id)
                .subquery()
            )
            rows = s.execute(
                select(Account, func.coalesce(usage.c.n, 0), func.coalesce(usage.c.octets, 0))
                .outerjoin(usage, usage.c.account_id == Account.id)
                .order_by(Account.address)
            )
            return [(_account_info(a), int(n), int(o)) for a, n, o in rows]

    # --- administration: aliases -----------------------------------------------------

    def add_alias(self, address: str, target: str) -> None:
        """Mail for ``address`` (in a local domain) goes to ``target`` (any address)."""
        local, domain = split_address(address)
        address = f"{local}@{domain}"
        target_local, target_domain = split_address(target)
        with self.db.write() as s:
            kind = s.scalar(select(Domain.kind).where(Domain.name == domain))
            if kind != "local":
                raise Refused(f"{domain} is not a local domain: add it first with `mailsrv domain add`")
            if s.scalar(select(Alias.id).where(Alias.address == address)) is not None:
                raise Refused(f"alias {address} exists already")
            if s.scalar(select(Account.id).where(Account.address == address)) is not None:
                raise Refused(f"{address} is a user: an alias cannot shadow it")
            s.add(Alias(address=address, target=f"{target_local}@{target_domain}"))

    def del_alias(self, address: str) -> None:
        with self.db.write() as s:
            result = s.execute(delete(Alias).where(Alias.address == address.strip().lower()))
            if result.rowcount == 0:
                raise Refused(f"no such alias: {address.strip().lower()}")

    def list_aliases(self) -> list[tuple[str, str]]:
        with self.db.read() as s:
            return [(r.address, r.target) for r in s.execute(select(Alias).order_by(Alias.address)).scalars()]

    # --- administration: ODMR grants -------------------------------------------------

    def grant_odmr(self, address: str, domain: str) -> None:
        """Let the account ATRN this ``odmr`` domain."""
        domain = domain.strip().lower()
        with self.db.write() as s:
            account = self._require_account(s, address)
            dom = s.scalars(select(Domain).where(Domain.name == domain)).first()
            if dom is None:
                raise Refused(f"unknown domain {domain}: add it with `mailsrv domain add {domain} --odmr`")
            if dom.kind != "odmr":
                raise Refused(f"{domain} is a local domain: only ODMR domains can be granted")
            if s.get(OdmrGrant, (account.id, dom.id)) is not None:
                raise Refused(f"{account.address} may ATRN {domain} already")
            s.add(OdmrGrant(account_id=account.id, domain_id=dom.id))

    def revoke_odmr(self, address: str, domain: str) -> None:
        domain = domain.strip().lower()
        with self.db.write() as s:
            account = self._require_account(s, address)
            dom_id = s.scalar(select(Domain.id).where(Domain.name == domain))
            grant = s.get(OdmrGrant, (account.id, dom_id)) if dom_id is not None else None
            if grant is None:
                raise Refused(f"{account.address} has no grant for {domain}")
            s.delete(grant)

    def list_odmr(self) -> list[tuple[str, str]]:
        with self.db.read() as s:
            rows = s.execute(
                select(Account.address, Domain.name)
                .join(OdmrGrant, OdmrGrant.account_id == Account.id)
                .join(Domain, Domain.id == OdmrGrant.domain_id)
                .order_by(Account.address, Domain.name)
            )
            return [(r[0], r[1]) for r in rows]

    def mailbox_list(self, address: str) -> list[tuple[int, str, int, datetime, bool, str]]:
        """(id, uid, size, received_at, seen, sender) of each message of the account."""
        with self.db.read() as s:
            account = self._require_account(s, address)
            rows = s.execute(
                select(
                    Message.id, Message.uid, Message.size, Message.received_at, Message.seen, Message.sender
                )
                .where(Message.account_id == account.id)
                .order_by(Message.id)
            )
            return [tuple(r) for r in rows]
