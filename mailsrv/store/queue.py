"""The delivery queue: posting, local delivery by the workers, and settlement.

A message is queued with its recipients in one transaction (:meth:`Queue.post`), and the
recipients in local mailboxes are delivered in that same transaction where the caller
decides so. The workers take the rest (:meth:`Queue.deliver_due`): every destination they
handle is decided without network I/O, so the update of a recipient's row is its claim.
Work done outside the database (the relay, ODMR) takes a lease first and settles with
:mod:`.leases`; both end in :func:`settle_in`, which applies outcomes, writes mailbox
copies, queues bounces and cuts the body of a message every recipient is done with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import bindparam, func, insert, select, update

from ..db import Database
from ..models import Domain, Message, QueuedMessage, QueueRecipient, State, utcnow
from .common import DONE, Refused, domain_of, header_of, split_address
from .directory import Resolver, read_routes
from .maildrop import insert_message, message_row


@dataclass(frozen=True)
class Claimed:
    """A recipient taken for delivery, with what is needed of its message (``id`` and
    ``queue_id`` are None while its message is being posted: see :meth:`Queue.post`)."""

    id: int | None
    queue_id: int | None
    recipient: str
    domain: str
    attempts: int
    sender: str
    size: int
    created_at: datetime
    origin: str


class Action(StrEnum):
    """What became of a recipient, and so the state it is left in (:data:`STATE_AFTER`)."""

    DELIVER = "deliver"  # written to the mailbox of ``account_id``
    SENT = "sent"  # taken by the next hop (relay, ODMR customer)
    FORWARD = "forward"  # new recipients of the same message (``targets``), sender kept
    HOLD = "hold"  # held for an ODMR customer
    RETRY = "retry"  # again after ``delay`` seconds (``status``, ``error``)
    FAIL = "fail"  # bounced (``status``: an RFC 3463 code, ``error``: the reason)
    RELEASE = "release"  # not tried after all: queued again, due now, no attempt counted


STATE_AFTER = {
    Action.DELIVER: State.DELIVERED, Action.SENT: State.DELIVERED, Action.FORWARD: State.DELIVERED,
    Action.HOLD: State.HELD, Action.RETRY: State.QUEUED, Action.FAIL: State.FAILED, Action.RELEASE: State.QUEUED,
}


@dataclass
class Outcome:
    """What became of one claimed recipient."""

    claimed: Claimed
    action: Action
    account_id: int | None = None
    targets: tuple[str, ...] = ()
    delay: float = 0.0
    status: str = ""
    error: str = ""


#: decide(claimed, resolver) -> outcomes; local_copy(outcome, body) -> the mailbox copy;
#: bounce(claimed, failed outcomes, body) -> the bounce's text, or None for none
Decide = Callable[[list[Claimed], Resolver], list[Outcome]]
LocalCopy = Callable[[Outcome, bytes], bytes]
Bounce = Callable[[Claimed, list[Outcome], bytes], "bytes | None"]

CLAIMED_COLUMNS = (
    QueueRecipient.id, QueueRecipient.queue_id, QueueRecipient.recipient, QueueRecipient.domain,
    QueueRecipient.attempts, QueuedMessage.sender, QueuedMessage.size, QueuedMessage.created_at,
    QueuedMessage.origin,
)
OUR_DOMAINS = select(Domain.name)
_CLAIMED = select(*CLAIMED_COLUMNS).join(QueuedMessage, QueuedMessage.id == QueueRecipient.queue_id)
_IS_DUE = (QueueRecipient.state == State.QUEUED, QueueRecipient.next_attempt_at <= bindparam("now"))
_LEASE_RAN_OUT = (QueueRecipient.state == State.INFLIGHT, QueueRecipient.lease_expires_at < bindparam("now"))


def due(*where, order=(QueueRecipient.next_attempt_at, QueueRecipient.id)):
    """(plain, locked) statements of recipients taken in order: the locked one skips the
    rows another transaction has locked (PostgreSQL; SQLite's write lock covers all)."""
    plain = _CLAIMED.where(*where).order_by(*order).limit(bindparam("limit"))
    return plain, plain.with_for_update(of=QueueRecipient, skip_locked=True)


#: recipients in our domains whose time has come, and those whose lease ran out
DUE_QUEUED = due(*_IS_DUE, QueueRecipient.domain.in_(OUR_DOMAINS))
DUE_EXPIRED = due(*_LEASE_RAN_OUT, QueueRecipient.domain.in_(OUR_DOMAINS), order=(QueueRecipient.id,))


def due_in(raw, statements, params: dict, limit: int, lock: bool) -> list[Claimed]:
    """The recipients the statements (each a :func:`due` pair) name, at most ``limit``."""
    rows: list[Claimed] = []
    for plain, locked in statements:
        if len(rows) >= limit:
            break
        rows += [Claimed(*row) for row in raw.execute(locked if lock else plain, {**params, "limit": limit})]
    return rows[:limit]


_SETTLE_VALUES = {
    column: bindparam(column)
    for column in ("state", "attempts", "last_error", "next_attempt_at", "lease_owner", "lease_expires_at", "updated_at")
}
#: a recipient settled by the holder of its lease
SETTLE_LEASED = (
    update(QueueRecipient)
    .where(
        QueueRecipient.id == bindparam("rid"),
        QueueRecipient.state == State.INFLIGHT,
        QueueRecipient.lease_owner == bindparam("owner"),
    )
    .values(**_SETTLE_VALUES)
)
#: a recipient settled while it is still due (the update is the claim)
SETTLE_DUE = (
    update(QueueRecipient)
    .where(
        QueueRecipient.id == bindparam("rid"),
        (QueueRecipient.state == State.QUEUED)
        | ((QueueRecipient.state == State.INFLIGHT) & (QueueRecipient.lease_expires_at < bindparam("now"))),
    )
    .values(**_SETTLE_VALUES)
)
INSERT_QUEUED = insert(QueuedMessage).returning(QueuedMessage.id)
INSERT_RECIPIENT = insert(QueueRecipient)
_QUEUED_COLUMNS = ("sender", "body", "size", "origin", "account_id", "created_at")
_RECIPIENT_COLUMNS = ("recipient", "domain", "state", "attempts", "next_attempt_at", "updated_at")
_NEW_QUEUED = (
    insert(QueuedMessage)
    .values({c: bindparam(c, type_=QueuedMessage.__table__.c[c].type) for c in _QUEUED_COLUMNS})
    .returning(QueuedMessage.id)
    .cte("new_queued")
)
#: PostgreSQL: a queued message and its first recipient in one statement (one round trip
#: where two were; on SQLite, where a statement is a function call, the two are kept)
INSERT_QUEUED_WITH_RECIPIENT = (
    insert(QueueRecipient)
    .from_select(
        ["queue_id", *_RECIPIENT_COLUMNS],
        select(_NEW_QUEUED.c.id, *(bindparam(c, type_=QueueRecipient.__table__.c[c].type) for c in _RECIPIENT_COLUMNS)),
    )
    .returning(QueueRecipient.queue_id)
)
#: PostgreSQL: the whole of the commonest post, one message to one local user delivered at
#: once, in one statement: the queue row (its header), its recipient as delivered, and the
#: mailbox copy. The mailbox row's values are named ``message_*`` (``message_account_id``
#: is the mailbox's owner; ``account_id`` the poster's, as in the queue row).
_MESSAGE_COLUMNS = ("account_id", "uid", "sender", "size", "body", "dot_offsets", "received_at", "seen")
_COPY_INTO_MAILBOX = (
    insert(Message)
    .values({c: bindparam(f"message_{c}", type_=Message.__table__.c[c].type) for c in _MESSAGE_COLUMNS})
    .returning(Message.id)
    .cte("mailbox_copy")
)
POST_DELIVERED = (
    select(_NEW_QUEUED.c.id)
    .add_cte(INSERT_QUEUED_WITH_RECIPIENT.returning(QueueRecipient.id).cte("queued_recipient"))
    .add_cte(_COPY_INTO_MAILBOX)
)
QUEUE_BODY = select(QueuedMessage.body).where(QueuedMessage.id == bindparam("queue_id"))
#: recipients of a queued message that are not done with yet
PENDING_RECIPIENTS = select(func.count(QueueRecipient.id)).where(
    QueueRecipient.queue_id == bindparam("queue_id"), *(QueueRecipient.state != state for state in DONE)
)
CUT_BODY = update(QueuedMessage).where(QueuedMessage.id == bindparam("queue_id")).values(body=bindparam("header"))


def recipient_rows(queue_id: int, recipients: Sequence[str], now: datetime) -> list[dict]:
    """New ``queued`` recipients of a queued message, ready for INSERT_RECIPIENT."""
    return [
        {"queue_id": queue_id, "recipient": r, "domain": domain_of(r), "state": State.QUEUED,
         "attempts": 0, "next_attempt_at": now, "updated_at": now}
        for r in recipients
    ]


def enqueue_in(
    raw, sender: str, body: bytes, recipients: Sequence[str], origin: str, account_id: int | None, now: datetime,
    delivered: Iterable[str] = (), size: int | None = None,
) -> int:
    """Insert a queued message and its recipients inside the caller's transaction; those
    in ``delivered`` are recorded as delivered (``body`` is then what is kept of a message
    of ``size`` octets). Returns the queue id."""
    message, rows = queued_rows(sender, body, recipients, origin, account_id, now, delivered, size)
    if raw.dialect == "postgresql" and rows:
        queue_id = raw.execute(INSERT_QUEUED_WITH_RECIPIENT, {**message, **rows.pop(0)}).scalar_one()
    else:
        queue_id = raw.execute(INSERT_QUEUED, message).scalar_one()
    for row in rows:
        row["queue_id"] = queue_id
    if rows:
        raw.execute(INSERT_RECIPIENT, rows)
    return queue_id


def queued_rows(
    sender: str, body: bytes, recipients: Sequence[str], origin: str, account_id: int | None, now: datetime,
    delivered: Iterable[str] = (), size: int | None = None,
) -> tuple[dict, list[dict]]:
    """The values of a queued message's row and of its recipients' rows (without their
    ``queue_id``), those in ``delivered`` recorded as delivered."""
    message = {"sender": sender, "body": body, "size": len(body) if size is None else size, "origin": origin,
               "account_id": account_id, "created_at": now}
    done = set(delivered)
    rows = [{c: row[c] for c in _RECIPIENT_COLUMNS} for row in recipient_rows(0, recipients, now)]
    for row in rows:
        if row["recipient"] in done:
            row["state"] = State.DELIVERED
    return message, rows


def needing_body(outcomes: Iterable[Outcome]) -> set[int]:
    """The queued messages whose body these outcomes need: a delivery copies it, a
    failure quotes it in the bounce (and either may leave the message done with)."""
    return {o.claimed.queue_id for o in outcomes if o.action in (Action.DELIVER, Action.FAIL, Action.SENT)}


def queue_bodies_in(raw, queue_ids: Iterable[int]) -> dict[int, bytes]:
    return {queue_id: raw.scalar(QUEUE_BODY, {"queue_id": queue_id}) for queue_id in set(queue_ids)}


def settle_in(
    raw, owner: str | None, outcomes: Sequence[Outcome], local_copy: LocalCopy, bounce: Bounce, now: datetime,
    bodies: dict[int, bytes] | None = None,
) -> list[Outcome]:
    """Apply outcomes in the caller's transaction and return those applied: with an
    ``owner``, each only while that owner holds its lease; without, each only while its
    recipient is still due. A delivery writes the mailbox copy in the same transaction
    that marks the recipient delivered, so it happens exactly once; the failures of one
    message get one bounce to its sender (unless ``bounce`` says none)."""
    applied: list[Outcome] = []
    if bodies is None:
        bodies = queue_bodies_in(raw, needing_body(outcomes))
    statement = SETTLE_DUE if owner is None else SETTLE_LEASED
    for outcome in outcomes:
        c = outcome.claimed
        values = {
            "rid": c.id, "owner": owner, "now": now, "state": STATE_AFTER[outcome.action],
            "attempts": c.attempts, "last_error": None, "next_attempt_at": now, "lease_owner": None,
            "lease_expires_at": None, "updated_at": now,
        }
        if outcome.action == Action.FORWARD:
            values["last_error"] = "forwarded to " + ", ".join(outcome.targets)
        elif outcome.action == Action.SENT and outcome.error:
            values["last_error"] = outcome.error  # the next hop's reply
        elif outcome.action == Action.RETRY:
            values.update(
                attempts=c.attempts + 1, last_error=outcome.error,
                next_attempt_at=now + timedelta(seconds=outcome.delay),
            )
        elif outcome.action == Action.FAIL:
            values.update(attempts=c.attempts + 1, last_error=f"{outcome.status} {outcome.error}")
        if raw.execute(statement, values).rowcount != 1:
            continue  # someone else has it now (or had it first)
        if outcome.action == Action.DELIVER:
            insert_message(raw, outcome.account_id, local_copy(outcome, bodies[c.queue_id]), c.sender)
        elif outcome.action == Action.FORWARD:
            raw.execute(INSERT_RECIPIENT, recipient_rows(c.queue_id, outcome.targets, now))
        applied.append(outcome)
    failed: dict[int, list[Outcome]] = {}
    for outcome in applied:
        if outcome.action == Action.FAIL:
            failed.setdefault(outcome.claimed.queue_id, []).append(outcome)
    for queue_id, items in failed.items():
        text = bounce(items[0].claimed, items, bodies[queue_id])
        if text is not None:
            enqueue_in(raw, "", text, [items[0].claimed.sender], "bounce", None, now)
    for queue_id in needing_body(applied):
        if not raw.scalar(PENDING_RECIPIENTS, {"queue_id": queue_id}):  # every recipient done
            raw.execute(CUT_BODY, {"queue_id": queue_id, "header": header_of(bodies[queue_id])})
    return applied


class Queue:
    """Posting and the workers' local delivery (see the module docstring)."""

    def __init__(self, db: Database):
        self.db = db

    def enqueue(
        self, sender: str, body: bytes, recipients: Sequence[str], origin: str, account_id: int | None = None
    ) -> int:
        """Queue one message for these recipients, all in one transaction; return its id.
        Recipients are stored lower case, each once. Nothing is written unless all are."""
        return self.post(sender, body, recipients, origin, account_id)[0]

    def post(
        self, sender: str, body: bytes, recipients: Sequence[str], origin: str, account_id: int | None = None,
        decide: Decide | None = None, local_copy: LocalCopy | None = None,
    ) -> tuple[int, int]:
        """:meth:`enqueue`, delivering to local mailboxes at once what can be: return the
        queue id and how many recipients were left ``queued`` for the workers.

        With ``decide`` and ``local_copy`` (as for :meth:`deliver_due`), each recipient
        that ``decide`` sends to a local mailbox is delivered in the transaction that
        queues the message: its mailbox copy is written and it is recorded ``delivered``,
        so the mail is readable once the poster is told it is queued, and no worker reads
        it back. When every recipient is delivered so, the queue keeps only the header.
        The decisions are made inside that transaction, so a quota is checked against what
        the mailbox holds. Every other outcome (alias, ODMR, remote, unknown, over quota)
        is left ``queued`` for the workers, which own forwarding, holding, retries and
        bounces. The transaction is shared with the posts of other sessions made at the
        same time (:meth:`Database.write_grouped`).
        """
        unique = list(dict.fromkeys(r.strip().lower() for r in recipients))
        if not unique:
            raise Refused("no recipients")
        for recipient in unique:
            split_address(recipient)  # Refused for a malformed one, before anything is written
        now = utcnow()

        def work(raw) -> tuple[int, int]:
            delivered: list[Outcome] = []
            if decide is not None:
                claimed = [Claimed(None, None, r, domain_of(r), 0, sender, len(body), now, origin) for r in unique]
                delivered = [o for o in decide(claimed, Resolver(raw)) if o.action == Action.DELIVER]
            kept = body if len(delivered) < len(unique) else header_of(body)
            done = [o.claimed.recipient for o in delivered]
            if raw.dialect == "postgresql" and len(unique) == len(delivered) == 1:  # one round trip
                message, (recipient,) = queued_rows(sender, kept, unique, origin, account_id, now, done, len(body))
                copy = message_row(delivered[0].account_id, local_copy(delivered[0], body), sender)
                return raw.execute(POST_DELIVERED, {
                    **message, **recipient, **{f"message_{c}": v for c, v in copy.items()},
                }).scalar_one(), 0
            queue_id = enqueue_in(raw, sender, kept, unique, origin, account_id, now, done, len(body))
            for outcome in delivered:
                insert_message(raw, outcome.account_id, local_copy(outcome, body), sender)
            return queue_id, len(unique) - len(delivered)

        # (PostgreSQL: the routes of a group's posts are read in one round trip, not one each)
        prime = (read_routes, unique) if decide is not None and self.db.dialect == "postgresql" else None
        return self.db.write_grouped(work, prime)

    def bodies(self, queue_ids) -> dict[int, bytes]:
        """{queue id: the message as queued} (the relay's read before it sends)."""
        with self.db.read_raw(snapshot=False) as raw:
            return queue_bodies_in(raw, queue_ids)

    def has_due(self) -> bool:
        """Is any recipient in our domains due (a plain read: no write lock)?"""
        with self.db.read_raw(snapshot=False) as raw:
            return bool(due_in(raw, (DUE_QUEUED, DUE_EXPIRED), {"now": utcnow()}, 1, lock=False))

    def deliver_due(
        self, limit: int, decide: Decide, local_copy: LocalCopy, bounce: Bounce, expired: bool = True
    ) -> tuple[int, list[Outcome]]:
        """Deliver due recipients in our domains (mailboxes, ODMR hold, aliases, bounces):
        read them and decide without holding the write lock, then apply the outcomes in
        one durable transaction, each only if its recipient is still due (the update of
        its row is the claim, so a recipient another worker got first is skipped and each
        is delivered exactly once). ``expired``: also take recipients whose lease ran out.
        Returns (how many were read, the outcomes applied)."""
        statements = (DUE_QUEUED, DUE_EXPIRED) if expired else (DUE_QUEUED,)
        with self.db.read_raw() as raw:
            claimed = due_in(raw, statements, {"now": utcnow()}, limit, lock=False)
            if not claimed:
                return 0, []
            outcomes = decide(claimed, Resolver(raw))
            bodies = queue_bodies_in(raw, needing_body(outcomes))
        with self.db.write_raw() as raw:
            return len(claimed), settle_in(raw, None, outcomes, local_copy, bounce, utcnow(), bodies)
