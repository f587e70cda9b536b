"""Crash safety: `mailsrv serve` killed with SIGKILL, again and again, at random points of
posting (MPP), local delivery, relaying to a smarthost, an ODMR turn and POP3's QUIT,
and started again after each kill. Then everything is accounted for:

- every post answered 250 is in the mailbox exactly once; a post whose reply the kill
  cut off is there once or not at all;
- every message queued for a local mailbox is there exactly once (the mailbox copy and
  the recipient's ``delivered`` are one transaction);
- every message relayed, or collected by the ODMR customer, arrived; only the message
  whose reply a kill cut off may arrive again, so at most one extra copy per kill there;
- no message deleted by a POP3 session whose QUIT was answered +OK comes back, and no
  message is gone that no QUIT deleted.

Each kill comes when the work has gone a random number of steps (posts sent,
deliveries logged, messages taken by the smarthost or the customer, QUITs sent), so it
lands anywhere in the work, not at a chosen place. The server is started by a helper that
imported mailsrv once and forks (tests/forkserver.py), so a restart costs 0.1-0.3 s, not 0.7-1 s.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import text

from mailsrv.auth import hash_password
from mailsrv.db import Database
from mailsrv.store import Store

from .conftest import LineClient
from .test_app import shipped_config_on_ephemeral_ports
from .test_relay import Script, smarthost  # noqa: F401  (fixture)
from .test_security import odmr_login

KILLS_PER_POINT = 10  # five points: 50 kills in all, on each database
BATCH = 20  # messages put in the way of each kill
DEADLINE = 150  # seconds for the whole test, kills and final account
PASSWORD, SECRET = "crash-password", "crash-secret"
CAROL, BOB, DAVE = "carol@example.org", "bob@example.org", "dave@example.org"
CUSTOMER, ODMR_DOMAIN = "cust@example.org", "customer.example"
TAG = re.compile(rb"Subject: crash (\S+)")
LISTENING = re.compile(r"(\w+) listening on ([\d.]+):(\d+)")
FORKSERVER = Path(__file__).with_name("forkserver.py")


def tag_of(body: bytes) -> str:
    return TAG.search(body).group(1).decode()


def message(tag: str, to: str) -> bytes:
    return f"From: {CAROL}\r\nTo: {to}\r\nSubject: crash {tag}\r\n\r\nbody of {tag}\r\n".encode()


class Servers:
    """`mailsrv serve` processes from the fork server, one at a time, with their log."""

    def __init__(self, conf: Path):
        self.conf = conf
        self.proc = subprocess.Popen([sys.executable, str(FORKSERVER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.changed = threading.Condition()
        self.pid: int | None = None
        self.ready = False
        self.exited: set[int] = set()
        self.killed: set[int] = set()  # (by kill(): an armed kill point, never a crash)
        self.addresses: dict[str, tuple[str, int]] = {}
        self.log: list[str] = []
        self.watchers: list = []  # called with each log line of the running server
        threading.Thread(target=self.read, daemon=True).start()

    def read(self) -> None:
        for line in self.proc.stdout:
            kind, _, rest = line.rstrip("\n").partition(" ")
            pid_text, _, payload = rest.partition(" ")
            with self.changed:
                if kind == "started":
                    self.pid, self.ready, self.addresses = int(pid_text), False, {}
                elif kind == "exit":
                    self.exited.add(int(pid_text))
                elif kind == "line":
                    self.log.append(payload)
                    match = LISTENING.search(payload)
                    if match:
                        self.addresses[match.group(1)] = (match.group(2), int(match.group(3)))
                    if "mailsrv ready" in payload:
                        self.ready = True
                    for watcher in list(self.watchers):
                        watcher(payload)
                self.changed.notify_all()

    def start(self) -> None:
        with self.changed:
            before = self.pid
            self.proc.stdin.write(f"serve {self.conf}\n")
            self.proc.stdin.flush()
            assert self.changed.wait_for(lambda: self.pid != before and (self.ready or self.pid in self.exited), 60)
            # A kill point armed for delivery or relaying may fire before the ready line:
            # the workers start delivering as the server starts. Any other exit fails.
            if self.pid in self.killed:
                return
            assert self.ready and self.pid not in self.exited, "\n".join(self.log[-30:])

    def kill(self) -> None:
        """SIGKILL the running server (from any thread), once."""
        pid = self.pid
        if pid is not None and pid not in self.exited:
            with self.changed:
                self.killed.add(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait_exited(self) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.pid in self.exited, 30)

    def wait_for_log(self, predicate, timeout: float = 60) -> bool:
        """Wait, one log line at a time, until ``predicate()`` holds."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def stop(self) -> None:
        if self.pid is not None and self.pid not in self.exited:
            os.kill(self.pid, signal.SIGTERM)
            self.wait_exited()
        self.proc.stdin.close()
        self.proc.wait(30)


class Ledger:
    """What the clients were told, and what the far ends received."""

    def __init__(self):
        self.lock = threading.Lock()
        self.posted: set[str] = set()  # answered 250
        self.post_cut: set[str] = set()  # sent, the reply cut off by a kill
        self.queued_local: set[str] = set()
        self.queued_relay: set[str] = set()
        self.queued_odmr: set[str] = set()
        self.collected: Counter[str] = Counter()  # at the ODMR customer
        self.pop_seeded: dict[str, str] = {}  # uid -> tag
        self.pop_deleted: set[str] = set()  # uids whose QUIT said +OK
        self.pop_maybe: set[str] = set()  # uids of a QUIT a kill cut off
        self.kills: Counter[str] = Counter()


def fire_after(steps: int, kill) -> callable:
    """A step counter that kills the server at the ``steps``-th step."""
    count = [0]
    lock = threading.Lock()

    def step() -> None:
        with lock:
            count[0] += 1
            if count[0] == steps:
                kill()
    return step


# --- the five kinds of work, each until the kill ends it -----------------------------
# Each is a generator: what comes before its ``yield`` runs while no server runs (mail put
# in the way, the kill armed), the rest once the next server has started.


def posting(servers: Servers, ledger: Ledger, store, rng: random.Random, n: int):
    step = fire_after(rng.randint(1, 20), servers.kill)
    yield
    c = LineClient(servers.addresses["mpp"], timeout=30)
    try:
        c.line()
        c.ask(f"USER {CAROL}")
        assert c.ask(f"PASS {PASSWORD}").startswith("250")
        for i in range(BATCH):
            tag = f"post-{n}-{i}"
            if not c.ask("DATA").startswith("354"):
                break
            ledger.post_cut.add(tag)  # (until its 250 comes)
            c.send(message(tag, CAROL) + b".\r\n")
            step()  # (the kill races the post's commit)
            reply = c.line()
            if not reply:
                break
            assert reply.startswith("250"), reply
            ledger.post_cut.discard(tag)
            ledger.posted.add(tag)
    except OSError:
        pass
    finally:
        c.close()


def local_delivery(servers: Servers, ledger: Ledger, store, rng: random.Random, n: int):
    for i in range(BATCH):  # queued, for the workers to deliver when the server starts
        tag = f"local-{n}-{i}"
        store.queue.enqueue(CAROL, message(tag, BOB), [BOB], "smtp")
        ledger.queued_local.add(tag)
    step = fire_after(rng.randint(1, BATCH - 5), servers.kill)
    watcher = lambda line: step() if f"<{BOB}> deliver" in line else None  # noqa: E731
    servers.watchers.append(watcher)
    yield
    servers.wait_for_log(lambda: servers.pid in servers.exited, 30)
    servers.watchers.remove(watcher)


def relaying(servers: Servers, ledger: Ledger, store, rng: random.Random, n: int, script):
    for i in range(BATCH):
        tag = f"relay-{n}-{i}"
        store.queue.enqueue(CAROL, message(tag, f"x{i}@remote.example"), [f"x{i}@remote.example"], "mpp")
        ledger.queued_relay.add(tag)
    script.step = fire_after(rng.randint(1, BATCH - 5), servers.kill)
    yield
    servers.wait_for_log(lambda: servers.pid in servers.exited, 30)
    script.step = None


def odmr_customer(address, ledger: Ledger, step=None) -> str:
    """Log in, ATRN, and be the customer's MTA (offering PIPELINING) until mailsrv says
    QUIT or goes away; return the ATRN reply."""
    try:
        c, login = odmr_login(address, SECRET, CUSTOMER)
    except OSError:
        return "gone"
    try:
        if not login.startswith("235"):
            return "gone" if not login else login
        reply = c.ask(f"ATRN {ODMR_DOMAIN}")
        if not reply.startswith("250"):
            return reply
        c.send("220 customer.example ESMTP")
        while line := c.line():
            verb = line.split(" ")[0].upper()
            if verb == "EHLO":
                c.send("250-customer.example\r\n250 PIPELINING")
            elif verb in ("MAIL", "RCPT", "RSET"):
                c.send("250 OK")
            elif verb == "DATA":
                c.send("354 go ahead")
                body = b""
                while (raw := c.raw_line()) not in (b".\r\n", b""):
                    body += raw
                if raw == b"":
                    break
                with ledger.lock:
                    ledger.collected[tag_of(body)] += 1
                c.send("250 2.0.0 OK")
                if step is not None:
                    step()
            elif verb == "QUIT":
                c.send("221 bye")
                break
        return reply
    except OSError:
        return "gone"
    finally:
        c.close()


def odmr_turning(servers: Servers, ledger: Ledger, store, rng: random.Random, n: int):
    for i in range(BATCH):
        tag = f"odmr-{n}-{i}"
        store.queue.enqueue(CAROL, message(tag, f"y{i}@{ODMR_DOMAIN}"), [f"y{i}@{ODMR_DOMAIN}"], "smtp")
        ledger.queued_odmr.add(tag)
    step = fire_after(rng.randint(1, BATCH - 5), servers.kill)
    held = [0]
    watcher = lambda line: held.__setitem__(0, held[0] + 1) if f"@{ODMR_DOMAIN}> hold" in line else None  # noqa: E731
    servers.watchers.append(watcher)
    yield
    assert servers.wait_for_log(lambda: held[0] >= BATCH, 30)  # (the workers have held them all)
    servers.watchers.remove(watcher)
    for _ in range(20):  # turns until the kill (a turn may end with everything collected)
        if servers.pid in servers.exited or odmr_customer(servers.addresses["odmr"], ledger, step) == "gone":
            break
    servers.kill()


def pop3_quit(servers: Servers, ledger: Ledger, store, rng: random.Random, n: int):
    dave = store.directory.find_account(DAVE)
    for i in range(BATCH):
        tag = f"pop-{n}-{i}"
        message_id = store.maildrops.deliver_local(dave.id, message(tag, DAVE), sender=CAROL)
        ledger.pop_seeded[uid_of(store, dave.id, message_id)] = tag
    quits = fire_after(rng.randint(1, 6), servers.kill)
    yield
    for _ in range(BATCH):
        c = LineClient(servers.addresses["pop3"], timeout=30)
        try:
            c.line()
            c.ask(f"USER {DAVE}")
            if not c.ask(f"PASS {PASSWORD}").startswith("+OK"):
                continue  # (the lock of a killed session: taken over at the next login)
            assert c.ask("UIDL").startswith("+OK")
            uids = [line.split(" ")[1] for line in c.multiline()]  # (no kill comes before the QUIT)
            chosen = list(range(1, min(len(uids), rng.randint(1, 3)) + 1))
            for number in chosen:
                assert c.ask(f"DELE {number}").startswith("+OK")
            doomed = {uids[number - 1] for number in chosen}
            c.send("QUIT")
            quits()
            reply = c.line()
            if reply.startswith("+OK"):
                ledger.pop_deleted |= doomed
                if servers.pid in servers.killed:  # (the UPDATE won the race with the kill)
                    return
            else:
                ledger.pop_maybe |= doomed
                return
        except OSError:
            return
        finally:
            c.close()


def uid_of(store, account_id: int, message_id: int) -> str:
    with store.db.read_core() as conn:
        return conn.execute(text("SELECT uid FROM messages WHERE id = :id"), {"id": message_id}).scalar_one()


# --- the test ------------------------------------------------------------------------


class CountingScript(Script):
    """The smarthost: takes everything, and counts each message it took as a step."""

    step = None

    async def handle_DATA(self, server, session, envelope):
        reply = await super().handle_DATA(server, session, envelope)
        if self.step is not None:
            self.step()
        return reply


def test_sigkill_at_random_points_loses_nothing(tmp_path, db_url, smarthost):  # noqa: F811
    started = time.monotonic()
    script, sink = smarthost(CountingScript())
    conf = shipped_config_on_ephemeral_ports(tmp_path, database=db_url)
    conf.write_text(conf.read_text().replace("relayhost =\n", f"relayhost = 127.0.0.1:{sink.port}\n")
                    .replace("relay_tls = may", "relay_tls = none").replace("workers = 2", "workers = 1"))
    database = Database(db_url)
    from mailsrv import migrate

    migrate.upgrade(database)
    store = Store(database)
    hashed = hash_password(PASSWORD, 4)
    store.directory.add_domain("example.org")
    store.directory.add_domain(ODMR_DOMAIN, "odmr")
    for address in (CAROL, BOB, DAVE):
        store.directory.add_account(address, hashed)
    store.directory.add_account(CUSTOMER, hashed, cram_secret=SECRET)
    store.directory.grant_odmr(CUSTOMER, ODMR_DOMAIN)
    rng = random.Random(os.environ.get("MAILSRV_CRASH_SEED", "crash"))
    ledger = Ledger()
    points = {
        "posting": posting,
        "local delivery": local_delivery,
        "relaying": lambda *a: relaying(*a, script),
        "odmr turning": odmr_turning,
        "pop3 quit": pop3_quit,
    }
    servers = Servers(conf)
    try:
        for n in range(KILLS_PER_POINT):
            for name, point in points.items():
                assert time.monotonic() - started < DEADLINE, f"out of time after {sum(ledger.kills.values())} kills"
                work = point(servers, ledger, store, rng, n)
                next(work)  # mail in the way, the kill armed
                servers.start()  # (which takes back a killed process's leases at once)
                for _ in work:  # the work, until the kill
                    pass
                servers.kill()  # (if the work ended before its kill)
                servers.wait_exited()
                ledger.kills[name] += 1
        assert sum(ledger.kills.values()) >= 50
        servers.start()

        # the final account, on the last server: the queue drained, the customer served
        def drained() -> bool:
            with database.read_core() as conn:
                return not conn.execute(text(
                    "SELECT count(*) FROM queue_recipients WHERE state IN ('queued', 'inflight')")).scalar()

        assert servers.wait_for_log(drained, 60), "the queue did not drain"
        for _ in range(BATCH):  # turns until the customer has everything
            if odmr_customer(servers.addresses["odmr"], ledger).startswith("453"):
                break
    finally:
        servers.stop()
        database.dispose()

    store = Store(Database(db_url))
    mailbox = lambda address: [  # noqa: E731
        tag_of(store.maildrops.read_body(store.directory.find_account(address).id, m.id))
        for m in store.maildrops.snapshot(store.directory.find_account(address).id)
    ]
    # posting: each answered post once; a cut-off one once or never; nothing else
    posted = Counter(mailbox(CAROL))
    assert max(posted.values(), default=1) == 1, posted.most_common(3)
    assert ledger.posted <= set(posted), sorted(ledger.posted - set(posted))
    assert set(posted) <= ledger.posted | ledger.post_cut
    # local delivery: exactly once
    delivered = Counter(mailbox(BOB))
    assert set(delivered) == ledger.queued_local and max(delivered.values()) == 1
    # relaying and ODMR: everything arrived; each kill sent again at most the one message
    # whose reply it cut off (the same message may be that one for two kills in a row).
    # The relay (one worker: one session) goes on with what a kill left through the
    # rounds that follow, so any kill may cut it off; the customer comes in ODMR rounds only.
    relayed = Counter(tag_of(body) for _, _, body in script.received)
    assert set(relayed) == ledger.queued_relay, sorted(ledger.queued_relay - set(relayed))
    assert sum(relayed.values()) - len(relayed) <= sum(ledger.kills.values()), relayed.most_common(12)
    collected = ledger.collected
    assert set(collected) == ledger.queued_odmr, sorted(ledger.queued_odmr - set(collected))
    assert sum(collected.values()) - len(collected) <= ledger.kills["odmr turning"], collected.most_common(12)
    # POP3: nothing deleted by an answered QUIT came back; nothing undeleted is gone
    dave = store.directory.find_account(DAVE)
    left = {m.uid for m in store.maildrops.snapshot(dave.id)}
    assert not left & ledger.pop_deleted
    assert set(ledger.pop_seeded) - ledger.pop_deleted - ledger.pop_maybe <= left
    assert ledger.pop_deleted, "no QUIT was ever answered"
    store.db.dispose()
    print(f"kills: {dict(ledger.kills)}; posts {len(ledger.posted)} (+{len(ledger.post_cut)} cut off, of which "
          f"{len(ledger.post_cut & set(posted))} were committed), "
          f"local {len(ledger.queued_local)}, relayed {len(relayed)} ({sum(relayed.values()) - len(relayed)} twice), "
          f"ODMR {len(collected)} ({sum(collected.values()) - len(collected)} twice), "
          f"POP3 deleted {len(ledger.pop_deleted)}; {time.monotonic() - started:.0f} s")

