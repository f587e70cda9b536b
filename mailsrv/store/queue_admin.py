"""Queue administration, as ``postqueue``/``postsuper`` offer it: list, show, flush, hold,
release and delete queued mail. Every call is one short transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select, update

from ..db import Database
from ..models import QueuedMessage, QueueRecipient, State, utcnow
from .common import DONE, Refused


@dataclass(frozen=True)
class RecipientStatus:
    recipient: str
    state: State
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None


@dataclass(frozen=True)
class QueueEntry:
    """A queued message and where each of its recipients stands (``body``: only from
    :meth:`QueueAdmin.show`; once every recipient is done, only the header is kept)."""

    id: int
    sender: str
    size: int
    created_at: datetime
    origin: str
    recipients: list[RecipientStatus]
    body: bytes | None = None

    @property
    def pending(self) -> list[RecipientStatus]:
        """The recipients not done with yet."""
        return [r for r in self.recipients if r.state not in DONE]


@dataclass(frozen=True)
class StateDepth:
    """How many recipients are in one state, and how long ago the oldest of their
    messages was queued."""

    state: State
    count: int
    oldest: datetime | None

    @property
    def oldest_seconds(self) -> float:
        return max(0.0, (utcnow() - self.oldest).total_seconds()) if self.oldest else 0.0


@dataclass(frozen=True)
class Deferred:
    """A recipient waiting after a failed attempt, with why."""

    queue_id: int
    recipient: str
    created_at: datetime
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None


_ENTRY_COLUMNS = (
    QueuedMessage.id, QueuedMessage.sender, QueuedMessage.size, QueuedMessage.created_at, QueuedMessage.origin,
)
_RECIPIENT_COLUMNS = (
    QueueRecipient.recipient, QueueRecipient.state, QueueRecipient.attempts, QueueRecipient.last_error,
    QueueRecipient.next_attempt_at,
)


def _recipients(conn, queue_id: int) -> list[RecipientStatus]:
    rows = conn.execute(select(*_RECIPIENT_COLUMNS).where(QueueRecipient.queue_id == queue_id).order_by(QueueRecipient.id))
    return [RecipientStatus(r[0], State(r[1]), r[2], r[3], r[4]) for r in rows]


def _require(conn, queue_id: int) -> None:
    if conn.scalar(select(QueuedMessage.id).where(QueuedMessage.id == queue_id)) is None:
        raise Refused(f"no such queued message: {queue_id}")


class QueueAdmin:
    """What ``mailsrv queue`` does (see the module docstring)."""

    def __init__(self, db: Database):
        self.db = db

    def list(self) -> list[QueueEntry]:
        """The messages with a recipient not done with, oldest first, with all their recipients."""
        with self.db.read_core() as conn:
            waiting = select(QueueRecipient.queue_id).where(QueueRecipient.state.not_in(DONE))
            rows = conn.execute(
                select(*_ENTRY_COLUMNS).where(QueuedMessage.id.in_(waiting)).order_by(QueuedMessage.id)
            ).all()
            return [QueueEntry(*row, recipients=_recipients(conn, row[0])) for row in rows]

    def depth(self) -> list[StateDepth]:
        """Recipients by state (every state that has any), with the age of the oldest."""
        with self.db.read_core() as conn:
            rows = conn.execute(
                select(QueueRecipient.state, func.count(QueueRecipient.id), func.min(QueuedMessage.created_at))
                .join(QueuedMessage, QueuedMessage.id == QueueRecipient.queue_id)
                .group_by(QueueRecipient.state).order_by(QueueRecipient.state)
            ).all()
        return [StateDepth(State(state), count, oldest) for state, count, oldest in rows]

    def oldest_deferred(self) -> Deferred | None:
        """The queued recipient, tried at least once, whose message is the oldest."""
        with self.db.read_core() as conn:
            row = conn.execute(
                select(QueueRecipient.queue_id, QueueRecipient.recipient, QueuedMessage.created_at,
                       QueueRecipient.attempts, QueueRecipient.last_error, QueueRecipient.next_attempt_at)
                .join(QueuedMessage, QueuedMessage.id == QueueRecipient.queue_id)
                .where(QueueRecipient.state == State.QUEUED, QueueRecipient.attempts > 0)
                .order_by(QueuedMessage.created_at, QueueRecipient.id).limit(1)
            ).first()
        return Deferred(*row) if row else None

    def last_errors(self) -> dict[str, tuple[datetime, str]]:
        """Per destination domain, the error of the newest recipient there (still queued,
        or failed) that has one: (when it was recorded, the error)."""
        with self.db.read_core() as conn:
            newest = (
                select(QueueRecipient.domain, func.max(QueueRecipient.id).label("id"))
                .where(QueueRecipient.state.in_((State.QUEUED, State.FAILED)), QueueRecipient.last_error.is_not(None))
                .group_by(QueueRecipient.domain).subquery()
            )
            rows = conn.execute(
                select(QueueRecipient.domain, QueueRecipient.updated_at, QueueRecipient.last_error)
                .join(newest, newest.c.id == QueueRecipient.id).order_by(QueueRecipient.domain)
            ).all()
        return {domain: (when, error) for domain, when, error in rows}

    def show(self, queue_id: int) -> QueueEntry:
        """One queued message with its recipients and what the queue keeps of its text."""
        with self.db.read_core() as conn:
            row = conn.execute(select(*_ENTRY_COLUMNS, QueuedMessage.body).where(QueuedMessage.id == queue_id)).first()
            if row is None:
                raise Refused(f"no such queued message: {queue_id}")
            return QueueEntry(*row[:-1], recipients=_recipients(conn, queue_id), body=row[-1])

    def flush(self) -> int:
        """Make every queued recipient due now (``postqueue -f``); return how many."""
        return self._move(None, State.QUEUED, State.QUEUED)

    def hold(self, queue_id: int) -> int:
        """Hold the queued recipients of a message (``postsuper -h``); return how many."""
        return self._move(queue_id, State.QUEUED, State.HELD)

    def release(self, queue_id: int) -> int:
        """Queue the held recipients of a message again, due now (``postsuper -H``)."""
        return self._move(queue_id, State.HELD, State.QUEUED)

    def _move(self, queue_id: int | None, from_state: State, to_state: State) -> int:
        now = utcnow()
        values: dict = {"state": to_state, "updated_at": now}
        if to_state == State.QUEUED:
            values["next_attempt_at"] = now
        with self.db.write_core() as conn:
            query = update(QueueRecipient).where(QueueRecipient.state == from_state)
            if queue_id is not None:
                _require(conn, queue_id)
                query = query.where(QueueRecipient.queue_id == queue_id)
            return conn.execute(query.values(**values)).rowcount

    def delete(self, queue_id: int) -> None:
        """Delete a queued message and its recipients (``postsuper -d``)."""
        with self.db.write_core() as conn:
            _require(conn, queue_id)
            conn.execute(delete(QueueRecipient).where(QueueRecipient.queue_id == queue_id))
            conn.execute(delete(QueuedMessage).where(QueuedMessage.id == queue_id))
