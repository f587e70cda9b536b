"""The running ``mailsrv serve`` processes (table ``server_processes``): each announces
itself when it starts and every few seconds after, and withdraws when it stops, so that
``mailsrv status`` and ``mailsrv check`` can tell what runs, on this host and on others
sharing the database. Every call is one short transaction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select, update

from ..db import Database
from ..models import ServerProcess, utcnow


@dataclass(frozen=True)
class ProcessInfo:
    holder: str  # host:pid
    started_at: datetime
    seen_at: datetime
    listeners: list[dict]  # [{"name": "pop3", "address": "0.0.0.0:110"}, ...]
    sessions: dict[str, int]  # open sessions by protocol

    @property
    def host(self) -> str:
        return self.holder.rpartition(":")[0]

    @property
    def pid(self) -> int:
        return int(self.holder.rpartition(":")[2])

    def silent_for(self, now: datetime | None = None) -> float:
        """Seconds since the process last wrote its row."""
        return ((now or utcnow()) - self.seen_at).total_seconds()


class Processes:
    """What ``server_processes`` holds (see the module docstring)."""

    def __init__(self, db: Database):
        self.db = db

    def announce(self, holder: str, started_at: datetime, listeners: list[dict], sessions: dict[str, int]) -> None:
        """Write (or refresh) this process's row."""
        now = utcnow()
        values = {"seen_at": now, "listeners": json.dumps(listeners), "sessions": json.dumps(sessions, sort_keys=True)}
        with self.db.write_core(durable=False) as conn:
            done = conn.execute(update(ServerProcess).where(ServerProcess.holder == holder).values(**values)).rowcount
            if not done:
                conn.execute(insert(ServerProcess).values(holder=holder, started_at=started_at, **values))

    def withdraw(self, holder: str) -> None:
        with self.db.write_core(durable=False) as conn:
            conn.execute(delete(ServerProcess).where(ServerProcess.holder == holder))

    def all(self) -> list[ProcessInfo]:
        """Every row, oldest start first (a row long silent is a process that died)."""
        with self.db.read_core() as conn:
            rows = conn.execute(select(ServerProcess).order_by(ServerProcess.started_at, ServerProcess.holder)).all()
        return [ProcessInfo(r.holder, r.started_at, r.seen_at, json.loads(r.listeners), json.loads(r.sessions))
                for r in rows]
