"""Moving mail in and out (mailsrv.mailboxes, `mailsrv mailbox import/export`): mbox and
Maildir, round trips byte for byte, LF and CRLF sources, what is skipped and why, and
memory bounded by a batch, not by the source."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from datetime import UTC, datetime

import pytest

from mailsrv import mailboxes
from mailsrv.store import Refused, StoredMessage

ANN, BOB = "ann@example.org", "bob@example.org"

#: texts that trip mbox writers and readers: From lines (quoted or not, after an empty
#: line or not), a header-only message, trailing empty lines, 8-bit octets, a lone dot
TRICKY = [
    b"Subject: plain\r\n\r\nhello\r\n",
    b"Subject: froms\r\n\r\nFrom the start\r\n\r\nFrom after an empty line\r\n>From quoted\r\n>>From twice\r\n",
    b"Subject: only a header\r\n",
    b"Subject: trailing\r\n\r\nbody\r\n\r\n\r\n",
    b"Subject: 8bit\r\n\r\ncaf\xc3\xa9 \xff\xfe\r\n.\r\n..\r\n",
    b"From: someone@example.net\r\nSubject: From in header\r\n\r\nx\r\n",
]


def fill(store, account_id: int) -> list[StoredMessage]:
    base = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    messages = [
        StoredMessage(body, "" if i == 2 else f"s{i}@example.net", base.replace(minute=i), i % 2 == 1)
        for i, body in enumerate(TRICKY)
    ]
    store.maildrops.add_messages(account_id, messages)
    return messages


def stored(store, account_id: int) -> list[StoredMessage]:
    return list(store.maildrops.messages_in_order(account_id))


@pytest.mark.parametrize("form", ["mbox", "maildir"])
def test_round_trip_is_byte_for_byte(store, accounts, tmp_path, form):
    original = fill(store, accounts["ann"].id)
    target = tmp_path / ("out.mbox" if form == "mbox" else "Maildir")
    export = mailboxes.export_mbox if form == "mbox" else mailboxes.export_maildir
    assert export(store, ANN, target) == len(TRICKY)
    report = mailboxes.import_mailbox(store, BOB, target)
    assert (report.imported, report.skipped) == (len(TRICKY), [])
    back = stored(store, accounts["bob"].id)
    assert [m.body for m in back] == TRICKY  # in order, exactly
    assert [m.seen for m in back] == [m.seen for m in original]
    assert [m.received_at.replace(microsecond=0) for m in back] == [m.received_at for m in original]
    if form == "mbox":  # (a Maildir keeps no envelope sender; Return-Path is read when there is one)
        assert [m.sender for m in back] == [m.sender for m in original]


def test_exported_mbox_quotes_from_lines_mboxrd(store, accounts, tmp_path):
    fill(store, accounts["ann"].id)
    mailboxes.export_mbox(store, ANN, tmp_path / "out.mbox")
    text = (tmp_path / "out.mbox").read_bytes()
    assert b"\r" not in text  # mbox is written with LF
    assert b"\n>From the start\n\n>From after an empty line\n>>From quoted\n>>>From twice\n" in text
    assert text.count(b"\nFrom ") + text.startswith(b"From ") == len(TRICKY)  # one From line per message
    assert text.startswith(b"From s0@example.net Tue Mar  4 05:00:07 2025\n")
    assert b"\nFrom MAILER-DAEMON Tue Mar  4 05:02:07 2025\n" in text  # the empty sender
    assert b"Subject: froms\nStatus: RO\n\n" in text and b"Subject: plain\nStatus: O\n\n" in text


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_mbox_from_another_program_lf_or_crlf(store, accounts, tmp_path, newline):
    lines = [
        b"From alice@example.net Sat Jan  4 10:00:00 2025", b"Status: RO", b"X-Status: F", b"Subject: a", b"",
        b"first", b">From quoted in mboxo", b"", b"From bob@example.net  Sun Jan  5 11:00:00 2025",
        b"Subject: b", b"", b"second", b"",
    ]
    source = tmp_path / "in.mbox"
    source.write_bytes(newline.join(lines))
    report = mailboxes.import_mailbox(store, ANN, source)
    assert (report.imported, report.skipped) == (2, [])
    first, second = stored(store, accounts["ann"].id)
    assert first.body == b"Subject: a\r\n\r\nfirst\r\nFrom quoted in mboxo\r\n"  # flags taken off, unquoted
    assert (first.sender, first.seen, first.received_at) == ("alice@example.net", True, datetime(2025, 1, 4, 10, tzinfo=UTC))
    assert second.body == b"Subject: b\r\n\r\nsecond\r\n"
    assert (second.sender, second.seen, second.received_at) == ("bob@example.net", False, datetime(2025, 1, 5, 11, tzinfo=UTC))


def test_maildir_from_another_program(store, accounts, tmp_path):
    folder = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True)
    files = [
        ("new", "1700000300.a.host", b"Subject: newest, not yet seen\n\nc\n", 1_700_000_300),
        ("cur", "1700000100.b.host:2,S", b"Return-Path: <x@example.net>\nSubject: seen\n\na\n", 1_700_000_100),
        ("cur", "1700000200.c.host:2,RF", b"Subject: replied, not seen\r\n\r\nb\r\n", 1_700_000_200),
        ("cur", ".hidden", b"Subject: never\n\n", 1_700_000_000),
    ]
    for sub, name, body, mtime in files:
        (folder / sub / name).write_bytes(body)
        os.utime(folder / sub / name, (mtime, mtime))
    report = mailboxes.import_mailbox(store, ANN, folder)
    assert (report.imported, report.skipped) == (3, [])
    got = stored(store, accounts["ann"].id)
    assert [m.body for m in got] == [b"Return-Path: <x@example.net>\r\nSubject: seen\r\n\r\na\r\n",
                                     b"Subject: replied, not seen\r\n\r\nb\r\n",
                                     b"Subject: newest, not yet seen\r\n\r\nc\r\n"]
    assert [m.seen for m in got] == [True, False, False]
    assert [m.sender for m in got] == ["x@example.net", "", ""]
    assert [m.received_at.timestamp() for m in got] == [1_700_000_100, 1_700_000_200, 1_700_000_300]


def test_what_is_not_imported_is_reported_with_why(store, accounts, tmp_path):
    source = tmp_path / "in.mbox"
    source.write_bytes(b"garbage before\n\nFrom a@example.net Sat Jan  4 10:00:00 2025\n\n\n"
                       b"From a@example.net Sat Jan  4 10:00:00 2025\nSubject: big\n\n" + b"x" * 3000 + b"\n\n"
                       b"From a@example.net Sat Jan  4 10:00:00 2025\nSubject: fits\n\ny\n")
    store.directory.add_account("small@example.org", accounts["ann"].password_hash, quota_bytes=1000)
    report = mailboxes.import_mailbox(store, "small@example.org", source)
    assert report.imported == 1
    whys = [why for _, why in report.skipped]
    assert whys == ["16 octets before the first From line", "empty message",
                    "over the quota of small@example.org (1000 octets)"]
    assert "message 2 (line 6)" in report.skipped[2][0]
    with pytest.raises(Refused):
        mailboxes.import_mailbox(store, ANN, tmp_path / "nothing-here")
    with pytest.raises(Refused):
        mailboxes.import_mailbox(store, "nobody@example.org", source)


def test_an_empty_mailbox_exports_and_imports_as_empty(store, accounts, tmp_path):
    assert mailboxes.export_mbox(store, ANN, tmp_path / "empty.mbox") == 0
    assert (tmp_path / "empty.mbox").read_bytes() == b""
    assert mailboxes.export_maildir(store, ANN, tmp_path / "Empty") == 0
    for source in (tmp_path / "empty.mbox", tmp_path / "Empty"):
        report = mailboxes.import_mailbox(store, BOB, source)
        assert (report.imported, report.skipped) == (0, [])
    with pytest.raises(FileExistsError):  # never over an existing file
        mailboxes.export_mbox(store, ANN, tmp_path / "empty.mbox")


def test_import_memory_is_a_batch_not_the_source(store, accounts, tmp_path, monkeypatch):
    """20 MB of mbox imported with batches of 1 MB: the peak of Python's allocations stays
    a few MB (the source is streamed; a batch is what is held)."""
    monkeypatch.setattr(mailboxes, "BATCH_OCTETS", 1 << 20)
    source = tmp_path / "big.mbox"
    body = b"Subject: load\n\n" + b"0123456789 abcdefghijklmnopqrstuvwxyz 0123456789 abcdefghijklmnopqrstuvwxyz\n" * 135
    with open(source, "wb") as out:
        for _ in range(2000):
            out.write(b"From a@example.net Sat Jan  4 10:00:00 2025\n" + body + b"\n")
    assert source.stat().st_size > 20_000_000
    tracemalloc.start()
    try:
        report = mailboxes.import_mailbox(store, ANN, source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (report.imported, report.skipped) == (2000, [])
    assert peak < 8_000_000, peak


def test_the_commands(tmp_path):
    from .test_app import mailsrv, shipped_config_on_ephemeral_ports

    conf = shipped_config_on_ephemeral_ports(tmp_path)
    assert mailsrv(conf, "domain", "add", "example.org").returncode == 0
    for user in (ANN, BOB):
        assert mailsrv(conf, "user", "add", user, "--password-stdin", stdin="pw\n").returncode == 0
    source = tmp_path / "in.mbox"
    source.write_bytes(b"junk\n\nFrom a@example.net Sat Jan  4 10:00:00 2025\nSubject: one\n\nx\n")
    result = mailsrv(conf, "mailbox", "import", ANN, str(source))
    assert result.returncode == 1  # something was left out: said, and the exit tells scripts
    assert result.stdout.splitlines() == ["imported 1 message(s), 19 octets", "not imported: 1",
                                          f"  {source} line 1: 6 octets before the first From line"]
    result = mailsrv(conf, "mailbox", "export", ANN, "--maildir", str(tmp_path / "Maildir"))
    assert (result.returncode, result.stdout) == (0, f"exported 1 message(s) to {tmp_path / 'Maildir'}\n")
    result = mailsrv(conf, "mailbox", "import", BOB, str(tmp_path / "Maildir"))
    assert (result.returncode, result.stdout) == (0, "imported 1 message(s), 19 octets\n")
    result = mailsrv(conf, "mailbox", "export", ANN, "--mbox", str(source))
    assert result.returncode == 1 and "exists already" in result.stderr
    assert subprocess.run([sys.executable, "-m", "mailsrv.cli", "-c", str(conf), "mailbox", "export", ANN],
                          capture_output=True).returncode == 2  # --mbox or --maildir
