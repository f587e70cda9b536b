"""`mailsrv db copy --to URL`: an SQLite office into PostgreSQL (or another SQLite file),
every table, id and UIDL kept, ids never reused afterwards."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from mailsrv import cli, migrate
from mailsrv import db as dbmod
from mailsrv.auth import hash_password
from mailsrv.models import Base, utcnow
from mailsrv.store import Store, StoredMessage


def office(tmp_path) -> tuple[str, Store]:
    """An SQLite office with a row in every table, and a gap: the newest message deleted."""
    url = f"sqlite:///{tmp_path / 'office.db'}"
    database = dbmod.Database(url)
    migrate.upgrade(database)
    store = Store(database)
    store.directory.add_domain("example.org")
    store.directory.add_domain("customer.example", "odmr")
    ann = store.directory.add_account("ann@example.org", hash_password("pw", 4), cram_secret="pw")
    store.directory.add_account("bob@example.org", hash_password("pw", 4), quota_bytes=1 << 20)
    store.directory.add_alias("sales@example.org", "ann@example.org")
    store.directory.grant_odmr("ann@example.org", "customer.example")
    when = utcnow() - timedelta(days=3)
    ids = store.maildrops.add_messages(ann.id, [
        StoredMessage(b"Subject: one\r\n\r\n\xff 8-bit\r\n", "a@example.net", when, True),
        StoredMessage(b"Subject: two\r\n\r\n.dot\r\n", "", when, False),
        StoredMessage(b"Subject: three\r\n\r\ngone\r\n", "b@example.net", when, False),
    ])
    store.maildrops.delete_messages(ann.id, [ids[-1]])  # (its id must never come back)
    store.maildrops.acquire_lock(ann.id, "otherhost:1:s", 60)
    store.queue.enqueue("ann@example.org", b"Subject: out\r\n\r\nx\r\n", ["x@customer.example", "far@remote.example"],
                        "mpp", ann.id)
    store.processes.announce("otherhost:1", when, [{"name": "pop3", "address": "0.0.0.0:110"}], {"pop3": 1})
    store.bans.ban("192.0.2.9", utcnow() + timedelta(hours=1), 10, "10 failed logins in a row")
    return url, store


def rows(database: dbmod.Database) -> dict[str, list[tuple]]:
    with database.read_core() as conn:
        return {t.name: [tuple(r) for r in conn.execute(select(t).order_by(*t.primary_key))]
                for t in Base.metadata.sorted_tables}


def test_copy_keeps_every_row_and_id_and_never_reuses_one(tmp_path, db_url, capsys):
    source_url, source = office(tmp_path)
    conf = tmp_path / "mailsrv.conf"
    conf.write_text(f"[server]\ndatabase = {source_url}\n")
    assert cli.main(["-c", str(conf), "db", "copy", "--to", db_url]) == 0
    out = capsys.readouterr().out
    assert "messages: 2 row(s)" in out and "queue_recipients: 2 row(s)" in out
    target_db = dbmod.Database(db_url)
    try:
        before, after = rows(source.db), rows(target_db)
        assert all(before[name] for name in before), [name for name in before if not before[name]]  # (every table)
        assert after == before
        target = Store(target_db)
        ann = target.directory.find_account("ann@example.org")
        assert [m.uid for m in target.maildrops.snapshot(ann.id)] == [m.uid for m in source.maildrops.snapshot(ann.id)]
        new = target.maildrops.deliver_local(ann.id, b"Subject: after the move\r\n\r\nx\r\n")
        assert new == 4  # after the deleted third: no id is given twice
        account = target.directory.add_account("carl@example.org", hash_password("pw", 4))
        assert account.id == 3
        assert cli.main(["-c", str(conf), "db", "copy", "--to", db_url]) == 1  # never into a database with rows
        assert "has rows in" in capsys.readouterr().err
    finally:
        target_db.dispose()
        source.db.dispose()


def test_copy_refuses_its_own_database(tmp_path, capsys):
    source_url, source = office(tmp_path)
    source.db.dispose()
    conf = tmp_path / "mailsrv.conf"
    conf.write_text(f"[server]\ndatabase = {source_url}\n")
    assert cli.main(["-c", str(conf), "db", "copy", "--to", source_url]) == 1
    assert "own database" in capsys.readouterr().err
