"""RFC 5322 helpers shared by the protocols: line ends, dot-stuffing, TOP, mbox form.

A stored message always has CRLF line ends and ends with CRLF (:func:`to_crlf`). Stuffing and
unstuffing work on whole messages, never per chunk, so a "." can never slip through at a
boundary between two reads or writes.
"""

from __future__ import annotations

import re
from datetime import datetime

CRLF = b"\r\n"
_BARE_LINE_END = re.compile(rb"\r?\n|\r(?!\n)")


def to_crlf(data: bytes) -> bytes:
    """Every line end (LF, CRLF, lone CR) as CRLF, and a CRLF at the end."""
    data = _BARE_LINE_END.sub(CRLF, data)
    if data and not data.endswith(CRLF):
        data += CRLF
    return data


def dot_stuff(body: bytes) -> bytes:
    """The multi-line form of a CRLF message: lines starting with "." get one more, and the
    terminating ``.CRLF`` is added (RFC 1939 section 3, RFC 5321 section 4.5.2)."""
    if body and not body.endswith(CRLF):
        body += CRLF
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


def dot_unstuff_line(line: bytes) -> bytes:
    """One received line with its leading stuffing "." removed."""
    return line[1:] if line.startswith(b".") else line


def top(body: bytes, lines: int) -> bytes:
    """The header, the blank line and the first ``lines`` lines of the body (RFC 1939 TOP)."""
    end = body.find(b"\r\n\r\n")
    if end < 0:
        return body  # no body at all: the header is everything
    head_end = end + 4
    if lines == 0:
        return body[:head_end]
    position = head_end
    for _ in range(lines):
        next_end = body.find(CRLF, position)
        if next_end < 0:
            return body
        position = next_end + 2
    return body[:position]


def mbox_entry(sender: str, received: datetime, body: bytes) -> bytes:
    """One message in mbox form with CRLF line ends: a ``From sender date`` line, the body
    with ``>From `` quoting of lines that start with ``From ``, and a blank line."""
    date = received.strftime("%a %b %d %H:%M:%S %Y")
    quoted = body.replace(b"\r\nFrom ", b"\r\n>From ")
    if quoted.startswith(b"From "):
        quoted = b">" + quoted
    if quoted and not quoted.endswith(CRLF):
        quoted += CRLF
    return f"From {sender or 'MAILER-DAEMON'} {date}\r\n".encode() + quoted + CRLF
