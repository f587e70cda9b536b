"""store.py on SQLite and PostgreSQL: maildrops, uids, queueing, and maildrop locks across processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from sqlalchemy import text

from mailsrv.store import Refused, lock_holder


def test_snapshot_has_no_bodies_and_counts_octets(store, accounts):
    ann = accounts["ann"].id
    first = store.maildrops.deliver_local(ann, b"Subject: a\r\n\r\none\r\n", sender="x@example.net")
    second = store.maildrops.deliver_local(ann, b"Subject: b\r\n\r\ntwo two\r\n")
    snap = store.maildrops.snapshot(ann)
    assert [m.id for m in snap] == [first, second]
    assert [m.size for m in snap] == [19, 23]
    assert all(1 <= len(m.uid) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in m.uid) for m in snap)
    assert store.maildrops.read_body(ann, second) == b"Subject: b\r\n\r\ntwo two\r\n"
    assert store.maildrops.read_body(accounts["bob"].id, second) is None  # not bob's
    assert store.maildrops.snapshot(accounts["bob"].id) == []


def test_uids_are_never_reused_after_delete(store, accounts):
    ann = accounts["ann"].id
    ids = [store.maildrops.deliver_local(ann, b"x\r\n") for _ in range(5)]
    old_uids = {m.uid for m in store.maildrops.snapshot(ann)}
    assert store.maildrops.delete_messages(ann, ids) == 5
    new = [store.maildrops.deliver_local(ann, b"x\r\n") for _ in range(5)]
    assert not old_uids & {m.uid for m in store.maildrops.snapshot(ann)}
    assert min(new) > max(ids)  # ids never go back either


def test_delete_only_touches_the_owner(store, accounts):
    ann, bob = accounts["ann"].id, accounts["bob"].id
    mine = store.maildrops.deliver_local(ann, b"x\r\n")
    assert store.maildrops.delete_messages(bob, [mine]) == 0
    assert store.maildrops.read_body(ann, mine) == b"x\r\n"


def test_seen_flags(store, accounts):
    ann = accounts["ann"].id
    ids = [store.maildrops.deliver_local(ann, b"x\r\n") for _ in range(3)]
    store.maildrops.set_seen(ann, ids[:2])
    assert [m.seen for m in store.maildrops.snapshot(ann)] == [True, True, False]
    store.maildrops.set_seen(ann, ids[:1], False)
    assert [m.seen for m in store.maildrops.snapshot(ann)] == [False, True, False]


def test_enqueue_writes_message_and_recipients_together(store, accounts, database):
    qid = store.queue.enqueue("ann@example.org", b"body\r\n", ["Bob@Example.org", "bob@example.org", "x@remote.example"], "mpp", accounts["ann"].id)
    with database.read() as s:
        rows = s.execute(text("SELECT recipient, domain, state FROM queue_recipients WHERE queue_id = :q ORDER BY id"), {"q": qid}).all()
    assert [tuple(r) for r in rows] == [("bob@example.org", "example.org", "queued"), ("x@remote.example", "remote.example", "queued")]
    with pytest.raises(Refused):
        store.queue.enqueue("ann@example.org", b"body\r\n", ["no-domain"], "mpp")
    with database.read() as s:
        assert s.execute(text("SELECT count(*) FROM queue")).scalar() == 1  # nothing half-written


def test_lock_excludes_a_second_holder_and_is_released(store, accounts):
    ann = accounts["ann"].id
    assert store.maildrops.acquire_lock(ann, lock_holder("one"), 60)
    assert not store.maildrops.acquire_lock(ann, lock_holder("two"), 60)
    assert store.maildrops.renew_lock(ann, lock_holder("one"), 60)
    assert not store.maildrops.renew_lock(ann, lock_holder("two"), 60)
    store.maildrops.release_lock(ann, lock_holder("two"))  # not ours: no effect
    assert not store.maildrops.acquire_lock(ann, lock_holder("two"), 60)
    store.maildrops.release_lock(ann, lock_holder("one"))
    assert store.maildrops.acquire_lock(ann, lock_holder("two"), 60)


HOLDER = textwrap.dedent(
    """
    import sys
    from mailsrv.db import Database
    from mailsrv.store import Store, lock_holder
    store = Store(Database(sys.argv[1]))
    got = store.maildrops.acquire_lock(int(sys.argv[2]), lock_holder("child"), float(sys.argv[3]))
    print("locked" if got else "busy", flush=True)
    sys.stdin.readline()  # hold until told
    """
)


def hold_in_child(db_url: str, account_id: int, ttl: float) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db_url, str(account_id), str(ttl)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout.readline().strip() == "locked"
    return child


def test_lock_excludes_across_processes(store, accounts, db_url):
    ann = accounts["ann"].id
    child = hold_in_child(db_url, ann, 600)
    try:
        assert not store.maildrops.acquire_lock(ann, lock_holder("parent"), 60)
    finally:
        child.communicate("\n", timeout=30)
    # the child ended without releasing; its process is dead, so the lock is taken over
    assert store.maildrops.acquire_lock(ann, lock_holder("parent"), 60)


def test_expired_lock_of_a_live_process_is_taken_over(store, accounts, db_url):
    ann = accounts["ann"].id
    child = hold_in_child(db_url, ann, 0)  # expires at once, while the child still runs
    try:
        assert store.maildrops.acquire_lock(ann, lock_holder("parent"), 60)
        # and now the parent holds it: the child (another process) cannot
        other = subprocess.run(
            [sys.executable, "-c", HOLDER, db_url, str(ann), "60"], input="\n", capture_output=True, text=True, timeout=30
        )
        assert other.stdout.strip() == "busy"
    finally:
        child.communicate("\n", timeout=30)


def test_dead_process_locks_are_released_at_start(store, accounts, db_url):
    ann = accounts["ann"].id
    child = hold_in_child(db_url, ann, 600)
    child.communicate("\n", timeout=30)
    assert store.maildrops.release_dead_locks() == 1
    assert store.maildrops.acquire_lock(ann, lock_holder("me"), 60)
    assert store.maildrops.release_dead_locks() == 0  # our own live lock stays


def test_batches_by_size_keeps_order_and_the_limit():
    from mailsrv.store import MessageInfo, batches_by_size

    messages = [MessageInfo(i, f"u{i}", size, False) for i, size in enumerate([4, 4, 4, 20, 1, 1], 1)]
    assert list(batches_by_size(messages, 8)) == [[1, 2], [3], [4], [5, 6]]
    assert list(batches_by_size([], 8)) == []


def test_raw_transactions_write_and_read_what_sqlalchemy_does(store, database, accounts):
    """Database.write_raw/read_raw (the driver's cursor, for the per-message paths) keep
    SQLAlchemy's conversions: dates with and without microseconds, booleans, literal
    values in a statement, executemany, RETURNING; an exception rolls everything back."""
    from datetime import UTC, datetime

    from sqlalchemy import select

    from mailsrv.models import QueuedMessage, QueueRecipient
    from mailsrv.store import Resolver
    from mailsrv.store.queue import INSERT_QUEUED, INSERT_RECIPIENT

    whole, fraction = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    row = {"sender": "a@example.org", "body": b"x\r\n", "size": 3, "origin": "mpp", "account_id": None}
    with database.write_raw() as c:
        ids = [c.execute(INSERT_QUEUED, {**row, "created_at": at}).scalar_one() for at in (whole, fraction)]
        recipients = [
            {"queue_id": ids[0], "recipient": f"r{i}@example.org", "domain": "example.org", "state": "queued",
             "attempts": 0, "next_attempt_at": whole, "updated_at": fraction}
            for i in range(3)
        ]
        c.execute(INSERT_RECIPIENT, recipients)
    with database.read() as s:  # what the ORM reads back
        assert s.scalars(select(QueuedMessage.created_at).order_by(QueuedMessage.id)).all() == [whole, fraction]
        assert s.execute(select(QueueRecipient.next_attempt_at, QueueRecipient.updated_at)).all() == [(whole, fraction)] * 3
    with database.read_raw() as c:  # and what the raw path reads back
        assert c.execute(select(QueuedMessage.id, QueuedMessage.created_at).order_by(QueuedMessage.id)).all() == [
            (ids[0], whole), (ids[1], fraction)
        ]
        assert Resolver(c).mailbox_usage(accounts["ann"].id) == (0, 0)  # coalesce(sum, 0): a literal
        assert c.scalar(select(QueuedMessage.id).where(QueuedMessage.id == -1)) is None

    with pytest.raises(ZeroDivisionError), database.write_raw() as c:
        c.execute(INSERT_QUEUED, {**row, "created_at": whole})
        raise ZeroDivisionError
    with database.read() as s:
        assert s.execute(text("SELECT count(*) FROM queue")).scalar() == 2


def insert_queued(raw, i: int) -> int:
    """A queue row from sender s{i}, in the caller's transaction; its id."""
    from datetime import UTC, datetime

    from mailsrv.store.queue import INSERT_QUEUED

    return raw.execute(INSERT_QUEUED, {
        "sender": f"s{i}@example.org", "body": b"x", "size": 1, "origin": "mpp", "account_id": None,
        "created_at": datetime.now(UTC),
    }).scalar_one()


def test_routes_read_ahead_are_the_routes_read_one_by_one(store, database, accounts, db_url):
    """PostgreSQL reads the routes of a group of posts in one statement (read_routes):
    each is then what resolving it alone gives, and resolving reads nothing more."""
    from mailsrv.store.directory import Resolver, read_routes

    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite reads each route with a function call")
    store.directory.add_domain("customer.example", kind="odmr")
    store.directory.add_alias("sales@example.org", "bob@example.org")
    addresses = ["ann@example.org", "sales@example.org", "nobody@example.org", "x@customer.example",
                 "x@elsewhere.example", "bob@example.org"]
    with database.read_raw() as raw:
        alone = [Resolver(raw).resolve(a) for a in addresses]
    with database.read_raw() as raw:
        read_routes(raw, [addresses[:3], addresses[2:]])
        raw.execute = None  # (resolving from what was read ahead runs no statement)
        ahead = [Resolver(raw).resolve(a.upper()) for a in addresses]
    assert ahead == alone
    assert [r.route.value for r in alone] == ["account", "alias", "unknown", "odmr", "remote", "account"]


def test_grouped_writes_commit_together_and_fail_alone(database):
    """Database.write_grouped from many threads at once: every work's own result, all
    committed, and a work that raises fails alone, the others still committed."""
    import threading

    threads_n = 16
    barrier = threading.Barrier(threads_n)
    results: dict[int, object] = {}

    def work_for(i: int):
        def work(c):
            queue_id = insert_queued(c, i)
            if i == 7:
                raise ValueError("this one fails")
            return i, queue_id
        return work

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = database.write_grouped(work_for(i))
        except ValueError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(results.pop(7), ValueError)
    assert sorted(r[0] for r in results.values()) == [i for i in range(threads_n) if i != 7]
    with database.read() as s:
        rows = dict(s.execute(text("SELECT id, sender FROM queue")).all())
    assert {queue_id: f"s{i}@example.org" for i, queue_id in results.values()} == rows


def test_posts_waiting_while_a_transaction_runs_share_the_next_one(database, monkeypatch):
    """Group commit: while one post's transaction runs, the 15 that arrive meanwhile wait
    and are then committed together, in one transaction (not 15). (One shared transaction
    at a time, as on SQLite; PostgreSQL's several are the next test's.) What they read
    ahead (their ``prime``) is read once for the 15, before their works, which find it."""
    import threading

    monkeypatch.setattr(database, "_group_leaders_max", 1)

    others_waiting = threading.Event()
    primed: list[list[int]] = []

    def read_ahead(raw, values: list[int]) -> None:
        primed.append(sorted(values))
        raw.memo.update({("read ahead", v): True for v in values})

    def queued(i: int):
        def work(raw):
            if i == 0:  # the first leads; it holds its transaction until the others wait
                assert others_waiting.wait(30)
            assert ("read ahead", i) in raw.memo
            return insert_queued(raw, i)
        return work

    def post(i: int) -> None:
        results[i] = database.write_grouped(queued(i), (read_ahead, i))

    results: dict[int, int] = {}
    first = threading.Thread(target=post, args=(0,))
    first.start()
    while not database._group_leaders:  # until it leads
        threading.Event().wait(0.001)
    threads = [threading.Thread(target=post, args=(i,)) for i in range(1, 16)]
    for t in threads:
        t.start()
    while not others_waiting.is_set() and first.is_alive():  # until all 15 are queued behind it
        with database._group_lock:
            if len(database._group) == 15:
                others_waiting.set()
        threading.Event().wait(0.001)
    for t in (first, *threads):
        t.join(60)
    assert sorted(results) == list(range(16)) and len(set(results.values())) == 16
    assert database.group_sizes == {1: 1, 15: 1}  # two transactions: the leader's, then the 15
    assert primed == [[0], list(range(1, 16))]


def test_shared_transactions_run_side_by_side_on_postgresql(database, db_url):
    """On PostgreSQL, while a shared transaction runs, posts wait to share the next one
    until GROUP_FULL wait: those then start another beside it, up to GROUP_LEADERS at once
    (one fewer than the transactions allowed at once), each on a connection of its own.
    So that many batches meet inside their transactions (one at a time, the barrier would
    break), and once every lead is taken the next post waits however many wait."""
    import threading

    from mailsrv import db as dbmod

    if not db_url.startswith("postgresql"):
        assert dbmod.GROUP_LEADERS["sqlite"] == 1
        pytest.skip("SQLite has one writer: one shared transaction at a time")
    leaders = database._group_leaders_max
    assert leaders == min(dbmod.GROUP_LEADERS["postgresql"], dbmod.TRANSACTIONS_AT_ONCE - 1) > 1
    full = dbmod.GROUP_FULL
    inside = threading.Barrier(leaders, timeout=30)
    release = threading.Event()
    firsts = {0, *(1 + full * k for k in range(leaders - 1))}  # the first work of each batch

    def queued(i: int):
        def work(raw):
            queue_id = insert_queued(raw, i)
            if i in firsts:
                inside.wait()  # every batch inside its own transaction at once
                assert release.wait(30)
            return queue_id
        return work

    def waiting() -> int:
        with database._group_lock:
            return len(database._group)

    def until(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition() and time.monotonic() < deadline:
            threading.Event().wait(0.001)
        assert condition()

    results: dict[int, int] = {}
    threads: list[threading.Thread] = []

    def post(i: int) -> None:
        thread = threading.Thread(target=lambda: results.__setitem__(i, database.write_grouped(queued(i))))
        threads.append(thread)
        thread.start()

    post(0)  # none runs: it leads at once
    until(lambda: database._group_leaders == 1)
    for k in range(leaders - 1):
        for j in range(full - 1):  # these wait for the running one
            post(1 + full * k + j)
            until(lambda j=j, k=k: waiting() == j + 1 and database._group_leaders == k + 1)
        post(full * (k + 1))  # the one that makes GROUP_FULL: they start another
        until(lambda k=k: waiting() == 0 and database._group_leaders == k + 2)
    late = 1 + full * (leaders - 1)
    for j in range(full + 1):  # every lead is taken: these wait, however many
        post(late + j)
        until(lambda j=j: waiting() == j + 1)
    assert database._group_leaders == leaders
    release.set()
    for t in threads:
        t.join(60)
    total = late + full + 1
    assert not inside.broken
    assert sorted(results) == list(range(total)) and len(set(results.values())) == total
    assert database.group_sizes == {1: 1, full: leaders - 1, full + 1: 1}
    assert database._group_leaders == 0


def test_raw_connection_that_lost_its_server_is_replaced(database, db_url, monkeypatch):
    """A raw transaction's kept connection whose server side went away (a PostgreSQL
    restart, here its backend terminated): one left idle goes back through the pool's
    ping; one in use fails with DatabaseUnavailable, and the next transaction works."""
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: an SQLite connection has no server to lose")
    from sqlalchemy import create_engine, func, literal, select

    from mailsrv import db as dbmod
    from mailsrv.db import DatabaseUnavailable

    def backend() -> int:
        with database.write_raw() as c:
            return c.scalar(select(func.pg_backend_pid()))

    def terminate(pid: int) -> None:
        engine = create_engine(db_url)
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})  # waits for its end
            other.commit()
        engine.dispose()

    terminate(backend())  # kept connections are used again within RAW_IDLE_SECONDS ...
    with pytest.raises(DatabaseUnavailable), database.write_raw() as c:
        c.scalar(select(literal(1)))
    with database.write_raw() as c:  # ... and the next transaction gets a working one
        assert c.scalar(select(literal(1))) == 1
    monkeypatch.setitem(dbmod.RAW_IDLE_SECONDS, "postgresql", 0.0)  # kept "too long"
    terminate(backend())
    with database.write_raw() as c:  # pinged by the pool, replaced, never failing
        assert c.scalar(select(literal(1))) == 1


def test_reads_without_a_snapshot_run_outside_a_transaction_on_postgresql(database, db_url):
    """read_raw(snapshot=False): on PostgreSQL each statement is a transaction of its own
    (no BEGIN or COMMIT round trips), and the connection goes back transactional, also
    when its server went away meanwhile (DatabaseUnavailable, then a working one)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite reads begin a transaction of their own")
    from sqlalchemy import create_engine

    from mailsrv.db import DatabaseUnavailable

    started = text("SELECT transaction_timestamp(), pg_backend_pid()")
    with database.read_raw(snapshot=False) as raw:
        (first, pid), (second, _) = raw.execute(started).one(), raw.execute(started).one()
    assert first != second  # (two round trips: two transactions)
    with database.read_raw() as raw:
        (first, _), (second, _) = raw.execute(started).one(), raw.execute(started).one()
    assert first == second  # one snapshot, one transaction
    kept = [connection.dbapi_connection for connection, _ in database._raw_idle]
    assert kept and not any(connection.autocommit for connection in kept)

    engine = create_engine(db_url)
    with engine.connect() as other:  # the kept connection's server side ends
        other.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
        other.commit()
    engine.dispose()
    with pytest.raises(DatabaseUnavailable), database.read_raw(snapshot=False) as raw:
        raw.execute(started).one()
    with database.read_raw(snapshot=False) as raw:
        assert raw.execute(started).one()
    assert not any(connection.dbapi_connection.autocommit for connection, _ in database._raw_idle)
    with database.write_raw() as raw:  # a write after it is still one transaction
        (first, _), (second, _) = raw.execute(started).one(), raw.execute(started).one()
    assert first == second


def test_raw_constraint_error_is_sqlalchemys_and_rolls_back(store, database, accounts):
    """A constraint broken in a raw transaction raises SQLAlchemy's IntegrityError, as
    Database.write does (the maildrop lock relies on it), and leaves nothing behind."""
    from sqlalchemy.exc import IntegrityError

    from mailsrv.store.maildrop import INSERT_LOCK

    ann = accounts["ann"].id
    assert store.maildrops.acquire_lock(ann, lock_holder("one"), 60)
    with pytest.raises(IntegrityError), database.write_raw() as c:
        c.execute(INSERT_LOCK, {"account_id": accounts["bob"].id, "holder": "x", "expires_at": None})
        c.execute(INSERT_LOCK, {"account_id": ann, "holder": "x", "expires_at": None})  # ann's is there
    with database.read() as s:
        assert s.execute(text("SELECT account_id, holder FROM maildrop_locks")).all() == [(ann, lock_holder("one"))]
    assert store.maildrops.acquire_lock(accounts["bob"].id, lock_holder("one"), 60)  # still usable


def test_login_that_loses_the_lock_race_is_told_in_use(store, database, accounts, db_url):
    """PostgreSQL: two logins to one maildrop at once both find no lock row; the second
    one's insert waits for the first to commit, then finds the first one's lock (its
    insert does nothing on the conflict) and is refused. That login gets None (IN-USE),
    not an error, and the first one's lock stays."""
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite write transactions never overlap")
    import threading
    from datetime import timedelta

    from sqlalchemy import create_engine

    from mailsrv.models import utcnow
    from mailsrv.store.maildrop import INSERT_LOCK

    ann = accounts["ann"].id
    store.maildrops.deliver_local(ann, b"x\r\n")
    got: list = []
    with database.write_raw(durable=False) as c:  # the first login, not yet committed
        first = {"account_id": ann, "holder": lock_holder("first"), "expires_at": utcnow() + timedelta(seconds=60)}
        c.execute(INSERT_LOCK, first)
        second = threading.Thread(target=lambda: got.append(store.maildrops.open_maildrop(ann, lock_holder("second"), 60)))
        second.start()
        watcher = create_engine(db_url)
        try:
            with watcher.connect() as w:  # until the second login waits on our row lock
                for _ in range(10_000):
                    waiting = w.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    )).scalar()
                    w.rollback()
                    if waiting or not second.is_alive():
                        break
                assert waiting == 1
        finally:
            watcher.dispose()
    second.join(30)
    assert got == [None]
    with database.read() as s:
        assert s.execute(text("SELECT holder FROM maildrop_locks")).all() == [(lock_holder("first"),)]
