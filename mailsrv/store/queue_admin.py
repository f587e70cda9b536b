"""Queue administration, as ``postqueue``/``postsuper`` offer it: list, show, flush, hold,
release and delete queued mail. Every call is one short transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update

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
