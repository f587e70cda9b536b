"""SQLAlchemy 2.0 models: the one source of truth for the schema.

Table and column names are part of mailsrv's interface (administrators query them; see
schema/README.md). Every id that must never be reused is AUTOINCREMENT on SQLite (a
PostgreSQL identity never goes back). Times are stored in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on both dialects (SQLite stores it without offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


NEVER_REUSED = {"sqlite_autoincrement": True}

#: the columns that hold whole messages. On PostgreSQL they are compressed with lz4 where
#: the server has it (14 and newer, built with lz4, as Debian's is): its default, pglz,
#: cost the server about 230 us of CPU per 10 KB message stored, lz4 about 90, at a
#: little less saving of space (migration 0005; SQLite stores bodies as they are)
BODY_COLUMNS = (("messages", "body"), ("queue", "body"))


def lz4_bodies_sql(method: str = "lz4") -> str:
    """PostgreSQL: one statement that sets the compression of BODY_COLUMNS to ``method``
    when the server offers lz4 and changes nothing when it does not (an older server, or
    one built without lz4). It applies to bodies written from then on."""
    alters = "".join(
        f"\n    ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method};" for table, column in BODY_COLUMNS
    )
    return (
        "DO $$\nBEGIN\n  IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression'"
        " AND 'lz4' = ANY(enumvals)) THEN"
        f"{alters}\n  END IF;\nEND $$"
    )


class Domain(Base):
    """A mail domain: ``local`` (mailboxes here) or ``odmr`` (held for a customer's ATRN)."""

    __tablename__ = "domains"
    __table_args__ = (CheckConstraint("kind IN ('local', 'odmr')", name="kind"), NEVER_REUSED)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(8), default="local")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Account(Base):
    """A mailbox owner who logs in with the full address."""

    __tablename__ = "accounts"
    __table_args__ = NEVER_REUSED

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id"), index=True)
    password_hash: Mapped[str] = mapped_column(String(100))
    cram_secret: Mapped[str | None] = mapped_column(Text, default=None)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class Alias(Base):
    """Mail to ``address`` goes to ``target`` (local or remote; envelope sender kept)."""

    __tablename__ = "aliases"
    __table_args__ = NEVER_REUSED

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    target: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OdmrGrant(Base):
    """Which account may ATRN which ``odmr`` domain."""

    __tablename__ = "odmr_grants"

    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    domain_id: Mapped[int] = mapped_column(
        ForeignKey("domains.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class Message(Base):
    """A message in a mailbox: ``body`` is exactly what RETR sends before byte-stuffing."""

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_account_id_id", "account_id", "id"), NEVER_REUSED)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    uid: Mapped[str] = mapped_column(String(70), unique=True)
    sender: Mapped[str] = mapped_column(String(320), default="")
    size: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen: Mapped[bool] = mapped_column(Boolean, default=False)
    #: where the lines that start with "." begin (octet offsets, space-separated; '' for
    #: none), found once at delivery so that RETR never scans a body; NULL: not known
    dot_offsets: Mapped[str | None] = mapped_column(Text, default=None)


class MaildropLock(Base):
    """The POP/POP3 exclusive lock: a row exists exactly while a session holds it."""

    __tablename__ = "maildrop_locks"

    account_id: Mapped[int] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class QueuedMessage(Base):
    """A message waiting for delivery to one or more ``queue_recipients``."""

    __tablename__ = "queue"
    __table_args__ = (
        CheckConstraint("origin IN ('mpp', 'smtp', 'submission', 'bounce')", name="origin"),
        NEVER_REUSED,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sender: Mapped[str] = mapped_column(String(320))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(BigInteger)
    origin: Mapped[str] = mapped_column(String(16))
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL"), default=None
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class State(StrEnum):
    """The state of a queued recipient (``queue_recipients.state``); the one list of them."""

    QUEUED = "queued"  # waiting for a worker, from next_attempt_at on
    HELD = "held"  # an ODMR domain's, waiting for the customer's ATRN (or held by hand)
    INFLIGHT = "inflight"  # leased to lease_owner until lease_expires_at
    DELIVERED = "delivered"  # done: in a mailbox, forwarded, or taken by the next hop
    FAILED = "failed"  # done: bounced (or dropped, for a bounce that failed)



class QueueRecipient(Base):
    """One recipient of a queued message and where its delivery stands."""

    __tablename__ = "queue_recipients"
    __table_args__ = (
        CheckConstraint("state IN ({})".format(", ".join(f"'{s}'" for s in State)), name="state"),
        Index("ix_queue_recipients_state_next_attempt_at", "state", "next_attempt_at"),
        NEVER_REUSED,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    queue_id: Mapped[int] = mapped_column(
        ForeignKey("queue.id", ondelete="CASCADE"), index=True
    )
    recipient: Mapped[str] = mapped_column(String(320))
    domain: Mapped[str] = mapped_column(String(255), index=True)
    state: Mapped[str] = mapped_column(String(16), default=State.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ServerProcess(Base):
    """A running ``mailsrv serve`` process, one row each on every host sharing the
    database: written when it starts and every few seconds after (``seen_at``), deleted
    when it stops. ``mailsrv status`` reads it; a row whose ``seen_at`` is old belongs to
    a process that died."""

    __tablename__ = "server_processes"

    holder: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    listeners: Mapped[str] = mapped_column(Text)  # JSON: [{"name": "pop3", "address": "0.0.0.0:110"}, ...]
    sessions: Mapped[str] = mapped_column(Text)  # JSON: {"pop3": 3, ...}, sessions open by protocol


class Ban(Base):
    """An address refused on every protocol until ``until``, after ``failures`` failed
    logins in a row (``[auth] ban_after``); ``mailsrv ban del`` removes the row."""

    __tablename__ = "bans"

    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    banned_at: Mapped[datetime] = mapped_column(UTCDateTime)
    until: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    failures: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)  # e.g. "10 failed logins, the last on pop3 as ann@example.org"
