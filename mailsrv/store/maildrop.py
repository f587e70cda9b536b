"""Maildrops: the messages of a mailbox, their bodies and flags, and the maildrop lock.

A POP3 or RFC 918 session takes the lock and a snapshot at login (:meth:`open_maildrop`)
and ends with one transaction that deletes, marks seen and unlocks (:meth:`close_maildrop`).
The lock is a row of ``maildrop_locks``, so it holds across processes and hosts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    ARRAY,
    Integer,
    any_,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError

from ..db import Database
from ..message import dot_line_offsets, encode_offsets, to_crlf
from ..models import Account, MaildropLock, Message, utcnow
from .common import MessageInfo, Refused, holder_is_dead, new_uid, this_host
from .directory import MARK_LOGIN, Resolver

#: (Raw) the statements of a maildrop session: login, UPDATE state, lock upkeep. SQLite
#: compiles FOR UPDATE to nothing (its write transaction locks everything).
LOCK_OF = (
    select(MaildropLock.holder, MaildropLock.expires_at)
    .where(MaildropLock.account_id == bindparam("account"))
    .with_for_update()
)
DROP_LOCK = delete(MaildropLock).where(MaildropLock.account_id == bindparam("account"))
INSERT_LOCK = insert(MaildropLock)
#: (bind names differ from the columns' own: an UPDATE reserves those for its SET values)
_OUR_LOCK = (MaildropLock.account_id == bindparam("account"), MaildropLock.holder == bindparam("lock_holder"))
RELEASE_LOCK = delete(MaildropLock).where(*_OUR_LOCK)
RENEW_LOCK = update(MaildropLock).where(*_OUR_LOCK).values(expires_at=bindparam("expires"))
SNAPSHOT = (
    select(Message.id, Message.uid, Message.size, Message.seen)
    .where(Message.account_id == bindparam("account"))
    .order_by(Message.id)
)
_ONE_MESSAGE = (Message.account_id == bindparam("account"), Message.id == bindparam("message"))
DELETE_MESSAGE = delete(Message).where(*_ONE_MESSAGE)
SET_SEEN = update(Message).where(*_ONE_MESSAGE).values(seen=bindparam("seen"))
INSERT_MESSAGE = insert(Message).returning(Message.id)

#: (Raw, PostgreSQL) a login in one statement, when no lock row is there: the lock taken,
#: the login time noted and the snapshot read (a row of NULLs for an empty maildrop); no
#: row when a lock is there (then open_maildrop looks at it as on SQLite)
_LOCKED = (
    postgresql.insert(MaildropLock)
    .values(account_id=bindparam("account"), holder=bindparam("holder"), expires_at=bindparam("expires"))
    .on_conflict_do_nothing(index_elements=[MaildropLock.account_id])
    .returning(MaildropLock.account_id)
    .cte("locked")
)
_MARKED = (
    update(Account)
    .where(Account.id.in_(select(_LOCKED.c.account_id)))
    .values(last_login_at=bindparam("now"))
    .cte("marked")
)
OPEN_MAILDROP = (
    select(Message.id, Message.uid, Message.size, Message.seen)
    .select_from(_LOCKED.outerjoin(Message, Message.account_id == _LOCKED.c.account_id))
    .add_cte(_MARKED)
    .order_by(Message.id)
)
#: (Raw, PostgreSQL) a session's end in one statement: the marked messages deleted (how
#: many is the result), the retrieved ones marked seen, our lock released
_IDS = ARRAY(Integer)
_GONE = (
    delete(Message)
    .where(Message.account_id == bindparam("account"), Message.id == any_(bindparam("deleted", type_=_IDS)))
    .returning(Message.id)
    .cte("gone")
)
_SEEN = (
    update(Message)
    .where(Message.account_id == bindparam("account"), Message.id == any_(bindparam("retrieved", type_=_IDS)))
    .values(seen=true())
    .cte("seen")
)
_RELEASED = delete(MaildropLock).where(*_OUR_LOCK).cte("released")
CLOSE_MAILDROP = select(func.count()).select_from(_GONE).add_cte(_SEEN, _RELEASED)

#: (Raw) the hot read of POP3 retrieval: a range of one account's messages, as plain SQL
#: so that no type processing copies the bodies (read_bodies drops ids not asked for)
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

Bodies = dict[int, tuple[bytes | memoryview, str | None]]


def insert_message(raw, account_id: int, body: bytes, sender: str, received_at: datetime | None = None,
                   seen: bool = False) -> int:
    """Put a message into a mailbox inside the caller's transaction; return its id. Line
    ends are stored as CRLF and a missing final line end is added, so ``size`` is what
    RETR sends; the offsets of its "." lines are kept for byte-stuffing. ``received_at``
    and ``seen`` are for mail brought along from elsewhere (``mailsrv mailbox import``)."""
    return raw.execute(INSERT_MESSAGE, message_row(account_id, body, sender, received_at, seen)).scalar_one()


def message_row(account_id: int, body: bytes, sender: str, received_at: datetime | None = None,
                seen: bool = False) -> dict:
    """The values of a mailbox's new row for this message (see :func:`insert_message`)."""
    body = to_crlf(body)
    return {
        "account_id": account_id, "uid": new_uid(), "sender": sender, "size": len(body), "body": body,
        "dot_offsets": encode_offsets(dot_line_offsets(body)), "received_at": received_at or utcnow(), "seen": seen,
    }


def _info(row) -> MessageInfo:
    """A row of :data:`SNAPSHOT` (or of :data:`OPEN_MAILDROP`) as a MessageInfo."""
    return MessageInfo(row[0], row[1], row[2], bool(row[3]))


def _snapshot_in(raw, account_id: int) -> list[MessageInfo]:
    return [_info(r) for r in raw.execute(SNAPSHOT, {"account": account_id}).all()]


def _delete_in(raw, account_id: int, ids: Sequence[int]) -> int:
    """Delete these messages in the caller's transaction; return how many were there.
    (One statement per message, run as one executemany, whose rowcount is the sum.)"""
    if not ids:
        return 0
    return raw.execute(DELETE_MESSAGE, [{"account": account_id, "message": i} for i in ids]).rowcount


def _set_seen_in(raw, account_id: int, ids: Sequence[int], seen: bool) -> None:
    if ids:
        raw.execute(SET_SEEN, [{"account": account_id, "message": i, "seen": seen} for i in ids])


def _take_lock(raw, account_id: int, holder: str, ttl: float) -> bool:
    now = utcnow()
    current = raw.execute(LOCK_OF, {"account": account_id}).first()
    if current is not None:
        if current[1] > now and not holder_is_dead(current[0]):
            return False
        raw.execute(DROP_LOCK, {"account": account_id})
    raw.execute(INSERT_LOCK, {"account_id": account_id, "holder": holder, "expires_at": now + timedelta(seconds=ttl)})
    return True


@dataclass(frozen=True)
class StoredMessage:
    """A message as a mailbox keeps it, for moving mail in and out."""

    body: bytes
    sender: str
    received_at: datetime
    seen: bool


class Maildrops:
    """Mailboxes and their lock (see the module docstring)."""

    def __init__(self, db: Database):
        self.db = db

    # --- a session: login, retrieval, QUIT -------------------------------------------

    def open_maildrop(self, account_id: int, holder: str, ttl: float) -> list[MessageInfo] | None:
        """Log in to a maildrop: take its lock, note the login time, and return the snapshot
        (as :meth:`snapshot`), all in one transaction. None when the lock is held."""
        if self.db.dialect == "postgresql":  # (one statement, unless a lock row is there)
            params = {"account": account_id, "holder": holder, "now": utcnow()}
            params["expires"] = params["now"] + timedelta(seconds=ttl)
            with self.db.write_raw(one_statement=True) as raw:
                rows = raw.execute(OPEN_MAILDROP, params).all()
            if rows:
                return [_info(r) for r in rows if r[0] is not None]
        try:
            with self.db.write_raw(durable=False) as raw:
                if not _take_lock(raw, account_id, holder, ttl):
                    return None
                raw.execute(MARK_LOGIN, {"account": account_id, "now": utcnow()})
                return _snapshot_in(raw, account_id)
        except IntegrityError:
            return None  # another login inserted the lock first (PostgreSQL)

    def close_maildrop(self, account_id: int, holder: str, delete_ids: Iterable[int], seen_ids: Iterable[int]) -> int:
        """End a maildrop session (POP3 UPDATE, RFC 918 RCVD): delete ``delete_ids``, mark
        ``seen_ids`` retrieved and release our lock, all in one transaction. Returns how many
        messages were deleted. If it raises, nothing changed (and the lock is still ours)."""
        delete_ids = sorted(set(delete_ids))
        seen_ids = sorted(set(seen_ids) - set(delete_ids))
        if self.db.dialect == "postgresql":  # (one statement)
            params = {"account": account_id, "lock_holder": holder, "deleted": delete_ids, "retrieved": seen_ids}
            with self.db.write_raw(one_statement=True) as raw:
                return raw.execute(CLOSE_MAILDROP, params).scalar_one()
        with self.db.write_raw(durable=bool(delete_ids)) as raw:
            removed = _delete_in(raw, account_id, delete_ids)
            _set_seen_in(raw, account_id, seen_ids, True)
            raw.execute(RELEASE_LOCK, {"account": account_id, "lock_holder": holder})
        return removed

    def snapshot(self, account_id: int) -> list[MessageInfo]:
        """The account's messages in arrival order (id ascending): ids, uids, sizes; no bodies."""
        with self.db.read_raw(snapshot=False) as raw:
            return _snapshot_in(raw, account_id)

    def read_bodies(self, account_id: int, ids: Sequence[int]) -> Bodies:
        """{id: (body, dot_offsets)} of several messages of the account at once (missing
        ones left out); see :func:`mailsrv.message.dot_stuff_parts` for the offsets. A
        body may be a memoryview into the one value a batch was read as (no copy)."""
        wanted = set(ids)
        if not wanted:
            return {}
        params = {"account": account_id, "low": min(wanted), "high": max(wanted)}
        if self.db.dialect == "sqlite" and len(wanted) > 1:
            return {k: v for k, v in self._bodies_in_one_row(params).items() if k in wanted}
        with self.db.read_raw(snapshot=False) as raw:
            rows = raw.execute(BODIES_BETWEEN, params).all()
        return {r[0]: (bytes(r[1]), r[2]) for r in rows if r[0] in wanted}

    def _bodies_in_one_row(self, params: dict) -> Bodies:
        """SQLite: the range's bodies concatenated into one value, split by the lengths
        aggregated beside them. One row instead of one per message: the sqlite3 module
        gives the GIL up and takes it back for every row, which costs dearly while many
        sessions retrieve at once. All aggregates of one query see the rows in the same
        order, so ids, lengths, offsets and bodies line up whatever that order is."""
        with self.db.read_raw() as raw:
            ids, lengths, offsets, blob = raw.execute(BODIES_BETWEEN_ONE_ROW, params).one()
        if ids is None:
            return {}
        result: Bodies = {}
        view, at = memoryview(blob), 0  # (views: each body copied once, when it is sent)
        for message_id, length, dots in zip(
            str(ids).split(","), str(lengths).split(","), str(offsets).split("|"), strict=True
        ):
            end = at + int(length)
            result[int(message_id)] = (view[at:end], None if dots == "-" else dots)
            at = end
        return result

    def read_body(self, account_id: int, message_id: int) -> bytes | None:
        """The stored message (CRLF line ends, not byte-stuffed); None if it is gone."""
        with self.db.read_core() as conn:
            return conn.scalar(select(Message.body).where(Message.id == message_id, Message.account_id == account_id))

    def read_messages(self, account_id: int, ids: Sequence[int]) -> dict[int, tuple[str, datetime, bytes]]:
        """{id: (envelope sender, received_at, body)} of several messages (missing ones left out)."""
        with self.db.read_core() as conn:
            rows = conn.execute(
                select(Message.id, Message.sender, Message.received_at, Message.body).where(
                    Message.account_id == account_id, Message.id.in_(list(ids))
                )
            )
            return {r.id: (r.sender, r.received_at, r.body) for r in rows}

    def delete_messages(self, account_id: int, ids: Iterable[int]) -> int:
        """Delete these messages of the account, all or none; return how many were there."""
        with self.db.write_raw() as raw:
            return _delete_in(raw, account_id, sorted(set(ids)))

    def set_seen(self, account_id: int, ids: Iterable[int], seen: bool = True) -> None:
        """Mark these messages retrieved (``seen``) or not."""
        ids = sorted(set(ids))
        if ids:
            with self.db.write_raw() as raw:
                _set_seen_in(raw, account_id, ids, seen)

    def deliver_local(self, account_id: int, body: bytes, sender: str = "") -> int:
        """Put a message into the account's mailbox (see :func:`insert_message`); return its id."""
        with self.db.write_raw() as raw:
            return insert_message(raw, account_id, body, sender)

    def add_messages(self, account_id: int, messages: Sequence[StoredMessage]) -> list[int]:
        """Put several messages into the account's mailbox in one transaction, in this
        order, each with its own arrival time and seen flag; return their ids."""
        with self.db.write_raw() as raw:
            return [insert_message(raw, account_id, m.body, m.sender, m.received_at, m.seen) for m in messages]

    def messages_in_order(self, account_id: int, batch: int = 100) -> Iterator[StoredMessage]:
        """Every message of the account in arrival order, read ``batch`` at a time (one
        short transaction each), so a large mailbox is never all in memory."""
        ids = [m.id for m in self.snapshot(account_id)]
        for start in range(0, len(ids), batch):
            part = ids[start:start + batch]
            with self.db.read_core() as conn:
                rows = conn.execute(
                    select(Message.id, Message.sender, Message.received_at, Message.seen, Message.body).where(
                        Message.account_id == account_id, Message.id.in_(part)
                    )
                ).all()
            found = {r.id: StoredMessage(bytes(r.body), r.sender, r.received_at, bool(r.seen)) for r in rows}
            yield from (found[i] for i in part if i in found)  # (one deleted meanwhile is left out)

    def mailbox_usage(self, account_id: int) -> tuple[int, int]:
        """(messages, octets) in the account's mailbox."""
        with self.db.read_raw(snapshot=False) as raw:
            return Resolver(raw).mailbox_usage(account_id)

    def mailbox_list(self, address: str) -> list[tuple[int, str, int, datetime, bool, str]]:
        """(id, uid, size, received_at, seen, sender) of each message of the account."""
        address = address.strip().lower()
        with self.db.read_core() as conn:
            account_id = conn.scalar(select(Account.id).where(Account.address == address))
            if account_id is None:
                raise Refused(f"no such user: {address}")
            rows = conn.execute(
                select(Message.id, Message.uid, Message.size, Message.received_at, Message.seen, Message.sender)
                .where(Message.account_id == account_id)
                .order_by(Message.id)
            )
            return [tuple(r) for r in rows]

    # --- the lock --------------------------------------------------------------------

    def acquire_lock(self, account_id: int, holder: str, ttl: float) -> bool:
        """Take the account's maildrop lock for ``ttl`` seconds; False if someone holds it.
        A lock whose time has run out, or whose holder is a dead process of this host, is
        taken over."""
        try:
            with self.db.write_raw(durable=False) as raw:
                return _take_lock(raw, account_id, holder, ttl)
        except IntegrityError:
            return False  # another session inserted it first (PostgreSQL)

    def renew_lock(self, account_id: int, holder: str, ttl: float) -> bool:
        """Extend our lock by ``ttl`` seconds from now; False if we no longer hold it."""
        with self.db.write_raw(durable=False) as raw:
            expires = utcnow() + timedelta(seconds=ttl)
            return raw.execute(RENEW_LOCK, {"account": account_id, "lock_holder": holder, "expires": expires}).rowcount == 1

    def release_lock(self, account_id: int, holder: str) -> None:
        """Drop our lock (nothing happens if it is not ours any more)."""
        with self.db.write_raw(durable=False) as raw:
            raw.execute(RELEASE_LOCK, {"account": account_id, "lock_holder": holder})

    def release_dead_locks(self) -> int:
        """Remove the locks of dead processes of this host; return how many."""
        with self.db.write_core() as conn:
            rows = conn.execute(
                select(MaildropLock.account_id, MaildropLock.holder).where(MaildropLock.holder.like(f"{this_host()}:%"))
            ).all()
            dead = [(account_id, holder) for account_id, holder in rows if holder_is_dead(holder)]
            for account_id, holder in dead:
                conn.execute(
                    delete(MaildropLock).where(MaildropLock.account_id == account_id, MaildropLock.holder == holder)
                )
            return len(dead)
