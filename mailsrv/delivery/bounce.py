"""Delivery status notifications (RFC 3464) for recipients that failed for good.

One bounce per message: a ``multipart/report; report-type=delivery-status`` with a
human-readable part, a ``message/delivery-status`` part (``Action: failed`` and an RFC 3463
``5.x.x`` status per recipient) and the original header as ``text/rfc822-headers``. It is
sent from ``MAILER-DAEMON@hostname`` with the empty envelope sender, and never for a
message whose own envelope sender is empty (no bounce of a bounce).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formatdate, make_msgid

from ..message import split_header, to_crlf


def build_bounce(
    hostname: str,
    sender: str,
    arrival: datetime,
    original: bytes,
    failures: Sequence[tuple[str, str, str]],
) -> bytes | None:
    """The bounce for ``failures`` [(recipient, status, reason)], or None for a '' sender."""
    if not sender:
        return None
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = f"<{sender}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = formatdate(localtime=True)
    report["Message-ID"] = make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"
    lines = [
        f"This is the mail system at {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients:",
        "",
        *[f"  <{rcpt}>: {reason}" for rcpt, _, reason in failures],
        "",
    ]
    text = "\n".join(lines)
    report.attach(MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8"))

    status = Message()
    status.set_type("message/delivery-status")
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["Arrival-Date"] = format_datetime(arrival)
    groups = [per_message]
    for rcpt, code, reason in failures:
        group = Message()
        group["Final-Recipient"] = f"rfc822; {rcpt}"
        group["Action"] = "failed"
        group["Status"] = code
        group["Diagnostic-Code"] = f"smtp; 550 {code} {reason}"
        groups.append(group)
    status.set_payload(groups)
    report.attach(status)

    headers = Message()
    headers.set_type("text/rfc822-headers")
    fields, _ = split_header(original)
    headers.set_payload(b"".join(fields).decode("utf-8", "replace"))
    report.attach(headers)
    return to_crlf(report.as_bytes())
