"""RFC 5322 helpers shared by the protocols: line ends, dot-stuffing, TOP, mbox form.

A stored message always has CRLF line ends and ends with CRLF (:func:`to_crlf`). Stuffing and
unstuffing work on whole messages, never per chunk, so a "." can never slip through at a
boundary between two reads or writes.
"""

from __future__ import annotations

import re
from datetime import datetime
from email.utils import formatdate, getaddresses, make_msgid

CRLF = b"\r\n"
_BARE_LINE_END = re.compile(rb"\r?\n|\r(?!\n)")


def to_crlf(data: bytes) -> bytes:
    """Every line end (LF, CRLF, lone CR) as CRLF, and a CRLF at the end."""
    crlf = data.count(CRLF)
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:  # else: CRLF already
        data = _BARE_LINE_END.sub(CRLF, data)
    if data and not data.endswith(CRLF):
        data += CRLF
    return data


def dot_stuff(body: bytes) -> bytes:
    """The multi-line form of a CRLF message: lines starting with "." get one more, and the
    terminating ``.CRLF`` is added (RFC 1939 section 3, RFC 5321 section 4.5.2)."""
    return b"".join(dot_stuff_parts(body))


def dot_line_offsets(body: bytes) -> list[int]:
    """The offsets at which lines starting with "." begin in a CRLF message."""
    offsets = [0] if body.startswith(b".") else []
    at = body.find(b"\r\n.")
    while at >= 0:
        offsets.append(at + 2)
        at = body.find(b"\r\n.", at + 3)
    return offsets


def encode_offsets(offsets: list[int]) -> str:
    return " ".join(map(str, offsets))


def dot_stuff_parts(body: bytes | memoryview, offsets: str | None = None) -> list[bytes | memoryview]:
    """:func:`dot_stuff` as pieces to send one after another, without copying the body.
    ``offsets`` is the stored :func:`dot_line_offsets` (None: find them now)."""
    if offsets is None:
        body = bytes(body)  # (a view has no find(); only rows stored without offsets)
        found = dot_line_offsets(body)
    else:
        found = [int(o) for o in offsets.split()]
    if found:
        view, start, parts = memoryview(body), 0, []
        for offset in found:
            parts += [view[start:offset], b"."]
            start = offset
        parts.append(view[start:])
    else:
        parts = [body]
    parts.append(b".\r\n" if not body or body[-2:] == CRLF else b"\r\n.\r\n")
    return parts


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


# --- header fields on raw bytes ---------------------------------------------------------
#
# Posting must keep the text byte for byte apart from the fields mailsrv adds or removes,
# so header fields are handled as raw lines; the standard library's email.utils parses the
# address lists inside them.

_FIELD_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+:")


def split_header(message: bytes) -> tuple[list[bytes], bytes]:
    """(header fields, rest) of a CRLF message. Each field is one raw field with its folded
    continuation lines and CRLF; ``rest`` starts with the blank line (or is empty). Text
    that does not start with a header field has no header: ``([], message)``."""
    fields: list[bytes] = []
    position = 0
    while position < len(message):
        end = message.find(CRLF, position)
        end = len(message) if end < 0 else end + 2
        line = message[position:end]
        if line in (CRLF, b""):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD_NAME.match(line):
            fields.append(line)
        else:
            break
        position = end
    if not fields:
        return [], message
    return fields, message[position:]


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].decode("ascii", "replace").strip().lower()


def field_value(field: bytes) -> str:
    """The unfolded value of a raw field, decoded (UTF-8, undecodable octets kept as escapes)."""
    value = field.split(b":", 1)[1]
    return re.sub(r"\r\n(?=[ \t])", "", value.decode("utf-8", "surrogateescape")).strip()


def header_line(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\n".encode()


_ATOMS = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
#: the forms nearly every field has, which the parser would read the same way: a bare
#: dot-atom address, or one in <> after a plain name (no quotes, comments or commas)
_PLAIN_ADDRESS = re.compile(rf"[A-Za-z0-9 .'-]*<({_ATOMS})>|({_ATOMS})")


def addresses(fields: list[bytes], names: tuple[str, ...]) -> list[str]:
    """Every address in the named fields, in order ("Name <a@b>" -> "a@b"; groups opened)."""
    result: list[str] = []
    for value in (field_value(f) for f in fields if field_name(f) in names):
        plain = _PLAIN_ADDRESS.fullmatch(value)
        if plain:
            result.append(plain.group(1) or plain.group(2))
            continue
        pairs = getaddresses([value])
        if ("", "") in pairs:  # the strict parser's mark of a malformed list: name all of it
            result.append(value)
        else:  # an entry without an address ("To: Joe") keeps its text so it can be named
            result.extend(addr or name for name, addr in pairs if addr or name)
    return result


_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*$")
_LOCAL_FORBIDDEN = set(" <>()[],;:\\\"\t\r\n@")


def is_address(address: str) -> bool:
    """local@domain, a plain local part and a host name: what mailsrv will queue."""
    local, at, domain = address.rpartition("@")
    return bool(at and local and _DOMAIN.match(domain)) and not (set(local) & _LOCAL_FORBIDDEN)


def posting_recipients(fields: list[bytes]) -> list[str]:
    """Recipients as ``sendmail -t`` takes them: Resent-To/Cc/Bcc when any Resent- field
    exists, else To/Cc/Bcc (RFC 5322 section 3.6.6)."""
    if any(field_name(f).startswith("resent-") for f in fields):
        return addresses(fields, ("resent-to", "resent-cc", "resent-bcc"))
    return addresses(fields, ("to", "cc", "bcc"))


class PostingRefused(ValueError):
    """A posted message that will never be accepted; the text says why."""


def count_received(fields: list[bytes]) -> int:
    return sum(1 for f in fields if field_name(f) == "received")


def complete_posting(
    fields: list[bytes], rest: bytes, poster: str, from_policy: str, hostname: str, trace: bytes,
    dropped: tuple[str, ...] = (), date: str | None = None,
) -> bytes:
    """A message posted by an authenticated ``poster`` (MPP, submission), as it is queued:
    the ``trace`` (Received) field first, the ``dropped`` fields removed, and what is
    missing added: From absent -> ``From: <poster>``; From naming someone else ->
    ``Sender: <poster>`` (``from_policy = sender``) or PostingRefused (``reject``);
    Message-ID and Date (``date``, else now) where there are none."""
    names = [field_name(f) for f in fields]
    drop = set(dropped)
    added: list[bytes] = []
    senders = addresses(fields, ("from",))
    if not senders:
        added.append(header_line("From", f"<{poster}>"))
    elif [s.lower() for s in senders] != [poster]:
        if from_policy == "reject":
            raise PostingRefused(f"From: {', '.join(senders)} is not the poster {poster}")
        drop.add("sender")
        added.append(header_line("Sender", f"<{poster}>"))
    kept = [f for f, name in zip(fields, names, strict=True) if name not in drop]
    if "message-id" not in names:
        added.append(header_line("Message-ID", make_msgid(domain=hostname)))
    if "date" not in names:
        added.append(header_line("Date", date or formatdate(localtime=True)))
    return trace + b"".join(kept) + b"".join(added) + rest

