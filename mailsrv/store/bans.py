"""Addresses refused after too many failed logins (table ``bans``; ``[auth] ban_after``).
A row is a ban until its ``until``; ``mailsrv ban del`` lifts one at once. Every process
sharing the database honours every row (each reads them again every few seconds). Every
call is one short transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select, update

from ..db import Database
from ..models import Ban, utcnow


@dataclass(frozen=True)
class BanInfo:
    address: str
    banned_at: datetime
    until: datetime
    failures: int
    reason: str


class Bans:
    """What ``bans`` holds (see the module docstring)."""

    def __init__(self, db: Database):
        self.db = db

    def ban(self, address: str, until: datetime, failures: int, reason: str) -> None:
        """Ban ``address`` until ``until`` (a ban already there is extended; ended ones are
        deleted on the way)."""
        now = utcnow()
        values = {"banned_at": now, "until": until, "failures": failures, "reason": reason}
        with self.db.write_core() as conn:
            conn.execute(delete(Ban).where(Ban.until <= now))
            if not conn.execute(update(Ban).where(Ban.address == address).values(**values)).rowcount:
                conn.execute(insert(Ban).values(address=address, **values))

    def lift(self, address: str) -> bool:
        """Lift the ban of ``address``; False when there was none."""
        with self.db.write_core() as conn:
            return conn.execute(delete(Ban).where(Ban.address == address.strip())).rowcount > 0

    def active(self) -> list[BanInfo]:
        """The bans in force now, newest first."""
        with self.db.read_core() as conn:
            rows = conn.execute(
                select(Ban).where(Ban.until > utcnow()).order_by(Ban.banned_at.desc(), Ban.address)
            ).all()
        return [BanInfo(r.address, r.banned_at, r.until, r.failures, r.reason) for r in rows]

    def addresses(self) -> dict[str, datetime]:
        """{address: until} of the bans in force now (the servers' periodic read)."""
        now = utcnow()
        with self.db.read_core() as conn:
            return dict(conn.execute(select(Ban.address, Ban.until).where(Ban.until > now)).all())
