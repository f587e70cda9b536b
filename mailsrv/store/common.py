"""What every part of the store shares: the refusal, the recipient states, the small
records handed to callers, and the names of lock and lease holders."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from ..models import State


class Refused(Exception):
    """An operation the store will not do; the text is a one-line reason."""


#: the states in which a recipient is done with
DONE = (State.DELIVERED, State.FAILED)


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
class DomainInfo:
    id: int
    name: str
    kind: str
    accounts: int = 0


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


def split_address(address: str) -> tuple[str, str]:
    """``"Ann@Example.ORG"`` -> ``("ann", "example.org")``; Refused when it has no domain."""
    local, at, domain = address.strip().lower().rpartition("@")
    if not at or not local or not domain or " " in address.strip():
        raise Refused(f"not an address: {address!r} (expected local@domain)")
    return local, domain


def domain_of(address: str) -> str:
    """The domain of an address already lowered and checked (``split_address``)."""
    return address.rpartition("@")[2]


def new_uid() -> str:
    """A UIDL: 24 characters of 0-9a-f, unique and never reused (RFC 1939 section 7)."""
    return secrets.token_hex(12)


def header_of(body: bytes) -> bytes:
    """What the queue keeps of a message once every recipient is done with: its header
    (through the blank line), so ``queue show`` and SQL still tell what it was."""
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 4]


# --- holders of maildrop locks and queue leases -------------------------------------------


def this_host() -> str:
    return socket.gethostname()


def lock_holder(session_tag: str = "") -> str:
    """The name a lock or lease holder goes by: ``host:pid`` (plus a tag for one session)."""
    holder = f"{this_host()}:{os.getpid()}"
    return f"{holder}:{session_tag}" if session_tag else holder


def holder_is_dead(holder: str | None) -> bool:
    """True when ``holder`` names a process of this host that no longer runs."""
    parts = (holder or "").split(":")
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
