"""SMTP into local mailboxes: mailsrv's receiver (port 25) and Postfix's smtpd side by side.

    python bench/smtp.py [--messages 2000] [--rounds 1] [--database postgresql] [--client-cpu 0]
                         [--against TREE]

The same figures as bench/mpp.py (10 KB messages by 1 and by 8 clients, each on one
connection: delivered/s from the first post until the last message is readable, posted/s,
p50/p99 delay from the 250 to readable), with mailsrv receiving over SMTP (EHLO once,
then MAIL, RCPT, DATA per message, with smtplib as for Postfix) instead of MPP. Postfix is
set up as bench/mpp.py sets it up: smtpd on a loopback port, delivery to a Maildir.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import mpp


class MailsrvSmtp(mpp.Mailsrv):
    """mailsrv with its SMTP receiver on; posts go over SMTP to the local user."""

    def __init__(self, folder: Path, **kwargs):
        super().__init__(folder, smtp={"listen": "127.0.0.1:0"}, **kwargs)

    def session(self, client: int):
        smtp = smtplib.SMTP(*self.processes[client % len(self.processes)].addresses["smtp"], timeout=60)
        smtp.ehlo("bench.client")
        address = f"{mpp.USER}@{mpp.DOMAIN}"

        def post(text: bytes) -> None:
            smtp.sendmail("sender@elsewhere.example", [address], text)

        return post


if __name__ == "__main__":
    mpp.main(MailsrvSmtp, __doc__.splitlines()[0])
