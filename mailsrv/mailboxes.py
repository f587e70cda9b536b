"""Moving mail into and out of a mailbox: ``mailsrv mailbox import`` and ``export``.

Both stream: import reads one message at a time and stores them a batch at a time (one
transaction per :data:`BATCH_MESSAGES` messages or :data:`BATCH_OCTETS` of text); export
reads the mailbox a batch at a time. A mailbox of any size needs the memory of one batch.

**mbox** is read and written as *mboxrd*: a message starts with a ``From `` line at the
start of the file or after an empty line; the empty line before the next ``From `` line
(or at the end of the file) is the separator, not part of the message; in the text,
lines that start with ``From `` after any number of ``>`` get one ``>`` more when written
and one fewer when read, so every message comes back exactly (an mboxo file, which quotes
only ``From ``, reads the same way). LF and CRLF files are both read; mailsrv stores CRLF
and writes mbox with LF. The ``From `` line carries the envelope sender (``MAILER-DAEMON``
for the empty one) and the arrival time, in UTC; the seen flag travels in a ``Status:``
header (``RO`` seen, ``O`` not), which import takes off again along with ``X-Status:``,
as mail clients and Dovecot treat them: flags, not text.

**Maildir**: every file in ``new/`` and ``cur/``. The arrival time is the file's
modification time (as Maildir readers take it), the seen flag is ``S`` in the name's
``:2,`` flags, and messages are taken in arrival order, then by name. Export writes each
message into ``cur/`` (by way of ``tmp/``) with LF line ends, ``:2,S`` when seen, and its
arrival time as the modification time.

The standard library's ``mailbox`` is not used for either: its mbox reader leaves a CRLF
file's separator line in the message and knows no mboxrd unquoting, and its Maildir
reader (before Python 3.13) parses every message to tell a file's flags; both formats are
simple enough to read and write exactly.

Nothing is skipped silently: what was not imported is reported with why (text before the
first ``From `` line, an empty message, a file that cannot be read, the mailbox quota).
"""

from __future__ import annotations

import email.utils
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .message import to_crlf
from .store import Refused, Store, StoredMessage, header_of

BATCH_MESSAGES = 200
BATCH_OCTETS = 16 * 1024 * 1024
#: an mbox ``From `` line's date (asctime, as ``From `` lines have it)
ASCTIME = "%a %b %d %H:%M:%S %Y"
NULL_SENDER = "MAILER-DAEMON"
_QUOTED_FROM = re.compile(rb"^>*From ")
_FLAG_HEADER = re.compile(rb"^(?:X-)?Status:", re.IGNORECASE)


@dataclass
class Report:
    """What an import did: messages and octets taken, and each one left out with why."""

    imported: int = 0
    octets: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where in the source, why)

    def lines(self) -> list[str]:
        out = [f"imported {self.imported} message(s), {self.octets} octets"]
        if self.skipped:
            out.append(f"not imported: {len(self.skipped)}")
            out += [f"  {where}: {why}" for where, why in self.skipped]
        return out


# --- reading a source -------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """A message read from a source, or why one could not be (``body`` None)."""

    where: str
    body: bytes | None
    sender: str | None = None  # (None: the header's Return-Path, if any)
    received_at: datetime | None = None  # (None: the header's Date, if any)
    seen: bool = False
    why: str = ""


def read_mbox(path: Path) -> Iterator[Found]:
    """The messages of an mboxrd (or mboxo) file, one at a time."""
    with open(path, "rb") as source:
        lines: list[bytes] = []
        from_line: bytes | None = None
        number, previous_empty, start_line = 0, True, 0
        for line_number, line in enumerate(source, 1):
            if line.startswith(b"From ") and previous_empty:
                if from_line is not None:
                    number += 1
                    yield _mbox_message(path, number, start_line, from_line, lines)
                elif any(lines):
                    octets = sum(map(len, lines))
                    yield Found(f"{path} line 1", None, why=f"{octets} octets before the first From line")
                from_line, lines, start_line = line, [], line_number
            else:
                lines.append(line)
            previous_empty = line in (b"\n", b"\r\n")
        if from_line is not None:
            yield _mbox_message(path, number + 1, start_line, from_line, lines)
        elif any(lines):
            yield Found(f"{path}", None, why="no From line: not an mbox file")


def _mbox_message(path: Path, number: int, line_number: int, from_line: bytes, lines: list[bytes]) -> Found:
    where = f"{path} message {number} (line {line_number})"
    if lines and lines[-1] in (b"\n", b"\r\n"):
        lines.pop()  # the separator
    header_done, seen, kept = False, False, []
    for line in lines:
        if not header_done:
            if line in (b"\n", b"\r\n"):
                header_done = True
            elif _FLAG_HEADER.match(line):
                if line[:7].lower() == b"status:":
                    seen = b"R" in line[7:]
                continue
        kept.append(line[1:] if _QUOTED_FROM.match(line) and line.startswith(b">") else line)
    body = b"".join(kept)
    if not body.strip():
        return Found(where, None, why="empty message")
    sender, received_at = _parse_from_line(from_line)
    return Found(where, body, sender, received_at, seen)


def _parse_from_line(line: bytes) -> tuple[str, datetime | None]:
    parts = line.decode("utf-8", "replace").split()
    sender = parts[1] if len(parts) > 1 else ""
    if sender == NULL_SENDER:
        sender = ""
    try:
        received = datetime.strptime(" ".join(parts[2:7]), ASCTIME).replace(tzinfo=UTC)
    except ValueError:
        received = None
    return sender, received


def _date_header(header: bytes) -> datetime | None:
    match = re.search(rb"(?im)^Date:[ \t]*(.+?)\r?$", header)
    if not match:
        return None
    try:
        return email.utils.parsedate_to_datetime(match.group(1).decode("ascii", "replace")).astimezone(UTC)
    except (TypeError, ValueError):
        return None


def _return_path(header: bytes) -> str:
    """The envelope sender a delivering MTA wrote into the header (Maildir has no other)."""
    match = re.search(rb"(?im)^Return-Path:[ \t]*<([^>\r\n]*)>", header)
    return match.group(1).decode("utf-8", "replace") if match else ""


def read_maildir(path: Path) -> Iterator[Found]:
    """The messages of a Maildir (``new/`` and ``cur/``), in arrival order."""
    entries = []
    for sub in ("new", "cur"):
        folder = path / sub
        if folder.is_dir():
            for name in os.listdir(folder):
                if not name.startswith("."):
                    try:
                        mtime = (folder / name).stat().st_mtime
                    except OSError:
                        mtime = 0.0  # (its reading fails below, and is reported)
                    entries.append((mtime, name, folder / name))
    for mtime, name, file in sorted(entries):
        info = name.split(":2,", 1)[1] if ":2," in name else ""
        try:
            body = file.read_bytes()
        except OSError as exc:
            yield Found(str(file), None, why=f"cannot read: {exc.strerror}")
            continue
        if not body.strip():
            yield Found(str(file), None, why="empty message")
            continue
        yield Found(str(file), body, None, datetime.fromtimestamp(mtime, UTC), "S" in info)


def sources(path: Path) -> Iterator[Found]:
    if (path / "cur").is_dir() or (path / "new").is_dir():
        return read_maildir(path)
    if path.is_file():
        return read_mbox(path)
    raise Refused(f"{path}: neither a Maildir (a folder with cur/ and new/) nor an mbox file")


# --- import and export ------------------------------------------------------------------


def import_mailbox(store: Store, address: str, path: Path) -> Report:
    """Bring the messages at ``path`` (Maildir or mbox) into the mailbox of ``address``,
    in order; return what was imported and what was not."""
    account = _account(store, address)
    report = Report()
    _, used = store.maildrops.mailbox_usage(account.id)
    batch: list[StoredMessage] = []
    octets = 0
    for found in sources(path):
        if found.body is None:
            report.skipped.append((found.where, found.why))
            continue
        body = to_crlf(found.body)
        if account.quota_bytes and used + len(body) > account.quota_bytes:
            report.skipped.append((found.where, f"over the quota of {account.address} ({account.quota_bytes} octets)"))
            continue
        used += len(body)
        header = header_of(body)
        sender = _return_path(header) if found.sender is None else found.sender
        received_at = found.received_at or _date_header(header) or datetime.now(UTC)
        batch.append(StoredMessage(body, sender, received_at, found.seen))
        octets += len(body)
        if len(batch) >= BATCH_MESSAGES or octets >= BATCH_OCTETS:
            _store(store, account.id, batch, report)
            batch, octets = [], 0
    if batch:
        _store(store, account.id, batch, report)
    return report


def _store(store: Store, account_id: int, batch: list[StoredMessage], report: Report) -> None:
    store.maildrops.add_messages(account_id, batch)
    report.imported += len(batch)
    report.octets += sum(len(m.body) for m in batch)


def _lf(body: bytes) -> bytes:
    return body.replace(b"\r\n", b"\n")


def export_mbox(store: Store, address: str, path: Path) -> int:
    """Write the mailbox of ``address`` to a new mboxrd file; return how many messages."""
    account = _account(store, address)
    count = 0
    with open(path, "xb") as out:  # (never over an existing file)
        for message in store.maildrops.messages_in_order(account.id):
            stamp = time.asctime(message.received_at.astimezone(UTC).timetuple())
            out.write(f"From {message.sender or NULL_SENDER} {stamp}\n".encode())
            text = _lf(message.body)
            head, blank, rest = text.partition(b"\n\n")
            status = b"Status: RO\n" if message.seen else b"Status: O\n"
            head = head + b"\n" + status if blank else head + (b"" if head.endswith(b"\n") else b"\n") + status
            for line in (head + (b"\n" + rest if blank else b"")).splitlines(keepends=True):
                out.write(b">" + line if _QUOTED_FROM.match(line) else line)
            out.write(b"\n")  # the separator
            count += 1
    return count


def export_maildir(store: Store, address: str, path: Path) -> int:
    """Write the mailbox of ``address`` into a Maildir (new, or with an empty ``cur/``);
    return how many messages."""
    account = _account(store, address)
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    if any((path / "cur").iterdir()) or any((path / "new").iterdir()):
        raise Refused(f"{path}: this Maildir has messages already; export into a new one")
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    count = 0
    for count, message in enumerate(store.maildrops.messages_in_order(account.id), 1):
        stamp = message.received_at.timestamp()
        name = f"{int(stamp)}.M{count}P{os.getpid()}.{host}"
        tmp = path / "tmp" / name
        tmp.write_bytes(_lf(message.body))
        os.utime(tmp, (stamp, stamp))
        os.rename(tmp, path / "cur" / f"{name}:2,{'S' if message.seen else ''}")
    return count


def _account(store: Store, address: str):
    account = store.directory.find_account(address)
    if account is None:
        raise Refused(f"no such user: {address.strip().lower()}")
    return account
