"""Soak: every protocol at once against one server, then an exact account of the mail.

    python bench/soak.py [--seconds 60] [--database sqlite|postgresql|URL ...] [--posters 50] [--readers 50]
    python bench/soak.py --database postgresql --database sqlite   # both, side by side

For `--seconds`, against one `mailsrv serve`: MPP posters (each logged in, posting to a
random local user), POP3 readers (each reading and deleting one user's mailbox, over and
over), SMTP senders on port 25 (to local users, and to an ODMR domain), submission clients
relaying to a local sink (aiosmtpd, the relayhost), and an ODMR customer collecting its
domain. Every message carries a tag. Then the load stops, the queue is drained, every
mailbox is read once more and the customer collects once more, and the tags accepted
(250 or +OK) are compared with those found, in a mailbox, at the sink, at the customer or
in a bounce: it prints `accepted N, delivered N, lost 0, duplicated 0, errors 0`, with
the rate and the p99 latency per protocol, and the CPU the load cost per message accepted
(mailsrv's, and on PostgreSQL the database server's processes on this machine).
"""

from __future__ import annotations

import argparse
import random
import re
import smtplib
import socket
import statistics
import threading
import time
from collections import Counter

from aiosmtpd.controller import Controller
from common import (
    MailsrvWithStore,
    cram_md5_answer,
    database_label,
    databases,
    free_port,
    percentile,
    print_side_by_side,
    raise_fd_limit,
    temp_folder,
)

DOMAIN, ODMR_DOMAIN = "soak.example", "customer.example"
PASSWORD, SECRET = "soak-password", "soak-secret"
CUSTOMER = f"customer@{DOMAIN}"
TAG = re.compile(rb"Subject: soak (\S+)")


class Account:
    """What was accepted and what was found, and how long each kind of work took."""

    def __init__(self):
        self.lock = threading.Lock()
        self.accepted: Counter[str] = Counter()
        self.found: Counter[str] = Counter()
        self.errors: list[str] = []
        self.latency: dict[str, list[float]] = {}
        self.tags = 0

    def tag(self, kind: str) -> str:
        with self.lock:
            self.tags += 1
            return f"{kind}-{self.tags}"

    def took(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latency.setdefault(kind, []).append(seconds)

    def accept(self, tag: str) -> None:
        with self.lock:
            self.accepted[tag] += 1

    def find(self, texts) -> None:
        with self.lock:
            for text in texts:
                for match in TAG.finditer(text):
                    self.found[match.group(1).decode()] += 1

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)


class Sink:
    def __init__(self, account: Account):
        self.account = account
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):
        self.account.find([envelope.original_content])
        return "250 2.0.0 OK"


def text(tag: str, to: str) -> bytes:
    return (f"From: someone@{DOMAIN}\r\nTo: {to}\r\nSubject: soak {tag}\r\n\r\n" + "a line of the soak\r\n" * 40).encode()


def lines(sock: socket.socket):
    reader = sock.makefile("rb")
    return reader


def mpp_poster(address, users: list[str], account: Account, until: float) -> None:
    sock = socket.create_connection(address, timeout=60)
    reader = lines(sock)
    reader.readline()
    sock.sendall(f"USER {users[0]}\r\nPASS {PASSWORD}\r\n".encode())
    reader.readline()
    if not reader.readline().startswith(b"250"):
        account.error("MPP login refused")
        return
    while time.monotonic() < until:
        tag = account.tag("mpp")
        started = time.perf_counter()
        sock.sendall(b"DATA\r\n")
        if not reader.readline().startswith(b"354"):
            account.error("MPP DATA refused")
            return
        sock.sendall(text(tag, random.choice(users)) + b".\r\n")
        reply = reader.readline()
        account.took("mpp post", time.perf_counter() - started)
        if reply.startswith(b"250"):
            account.accept(tag)
        elif not reply.startswith(b"451"):
            account.error(f"MPP: {reply!r}")
    sock.sendall(b"QUIT\r\n")
    sock.close()


def smtp_sender(address, users: list[str], account: Account, until: float, login: bool) -> None:
    kind = "submission" if login else "smtp"
    with smtplib.SMTP(*address, timeout=60) as client:
        if login:
            client.login(users[0], PASSWORD)
        while time.monotonic() < until:
            tag = account.tag(kind)
            to = f"far{random.randrange(10)}@remote.example" if login else random.choice(
                [*users, f"x@{ODMR_DOMAIN}"])
            started = time.perf_counter()
            try:
                client.sendmail(users[0] if login else "a@elsewhere.example", [to], text(tag, to))
                account.accept(tag)
            except (smtplib.SMTPDataError, smtplib.SMTPRecipientsRefused) as exc:
                account.error(f"{kind}: {exc!r}")
                client.rset()
            account.took(f"{kind} send", time.perf_counter() - started)


def pop3_read(address, user: str, account: Account) -> int:
    """One session: read and delete everything; what was read counts once QUIT is +OK."""
    started = time.perf_counter()
    sock = socket.create_connection(address, timeout=60)
    reader = lines(sock)
    reader.readline()
    sock.sendall(f"USER {user}\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode())
    reader.readline()
    login = reader.readline()
    if not login.startswith(b"+OK"):
        sock.close()
        if b"[IN-USE]" not in login:
            account.error(f"POP3 login: {login!r}")
        return 0
    count = int(reader.readline().split()[1])
    texts = []
    sock.sendall("".join(f"RETR {n}\r\nDELE {n}\r\n" for n in range(1, count + 1)).encode())  # (pipelined)
    for _ in range(count):
        reader.readline()
        body = []
        while (line := reader.readline()) != b".\r\n":
            body.append(line[1:] if line.startswith(b"..") else line)
        texts.append(b"".join(body))
        reader.readline()
    sock.sendall(b"QUIT\r\n")
    if reader.readline().startswith(b"+OK"):
        account.find(texts)
    else:
        account.error("POP3 QUIT refused")
    sock.close()
    account.took("pop3 session", time.perf_counter() - started)
    return count


def pop3_reader(address, user: str, account: Account, until: float) -> None:
    while time.monotonic() < until:
        pop3_read(address, user, account)


def odmr_collect(address, account: Account) -> bool:
    """One ATRN as the customer, then its MTA; True when there was mail."""
    started = time.perf_counter()
    sock = socket.create_connection(address, timeout=600)
    reader = lines(sock)
    reader.readline()
    sock.sendall(b"EHLO customer.example\r\n")
    while reader.readline()[3:4] == b"-":
        pass
    sock.sendall(b"AUTH CRAM-MD5\r\n")
    sock.sendall(cram_md5_answer(CUSTOMER, SECRET, reader.readline()))
    reader.readline()
    sock.sendall(b"ATRN\r\n")
    reply = reader.readline()
    if not reply.startswith(b"250"):
        sock.close()
        if not reply.startswith((b"453", b"450")):
            account.error(f"ATRN: {reply!r}")
        return False
    sock.sendall(b"220 customer.example ESMTP\r\n")
    while line := reader.readline():
        verb = line[:4].upper()
        if verb == b"DATA":
            sock.sendall(b"354 go ahead\r\n")
            body = []
            while (line := reader.readline()) != b".\r\n":
                body.append(line[1:] if line.startswith(b"..") else line)
            account.find([b"".join(body)])
            sock.sendall(b"250 OK\r\n")
        elif verb == b"QUIT":
            sock.sendall(b"221 bye\r\n")
            break
        else:
            sock.sendall(b"250 OK\r\n")
    sock.close()
    account.took("odmr turn", time.perf_counter() - started)
    return True


def odmr_customer(address, account: Account, until: float) -> None:
    while time.monotonic() < until:
        if not odmr_collect(address, account):
            time.sleep(0.5)  # (a bench: the customer comes back now and then)


def waiting(server) -> int:
    return sum(d.count for d in server.store.queue_admin.depth() if d.state.value in ("queued", "inflight", "held"))


def soak(database: str, args) -> dict[str, float]:
    """One soak against a new server on ``database``; print its account, return its figures."""
    from mailsrv.auth import hash_password

    account = Account()
    sink = Sink(account)
    server = MailsrvWithStore(
        temp_folder("bench-soak-"), DOMAIN, database=database,
        pop3={"listen": "127.0.0.1:0"}, odmr={"listen": "127.0.0.1:0"},
        smtp={"listen": "127.0.0.1:0", "submission": "127.0.0.1:0"},
        delivery={"workers": "2", "relayhost": f"127.0.0.1:{sink.controller.port}", "relay_tls": "none"},
    )
    hashed = hash_password(PASSWORD, 4)
    users = [f"user{n}@{DOMAIN}" for n in range(args.readers)]
    for user in users:
        server.store.directory.add_account(user, hashed)
    server.store.directory.add_account(CUSTOMER, hashed, cram_secret=SECRET)
    server.store.directory.add_domain(ODMR_DOMAIN, "odmr")
    server.store.directory.grant_odmr(CUSTOMER, ODMR_DOMAIN)
    server.process.start()
    where = server.process.addresses
    started = time.monotonic()
    until = started + args.seconds
    threads = [threading.Thread(target=mpp_poster, args=(where["mpp"], users, account, until))
               for _ in range(args.posters)]
    threads += [threading.Thread(target=pop3_reader, args=(where["pop3"], user, account, until)) for user in users]
    threads += [threading.Thread(target=smtp_sender, args=(where["smtp"], users, account, until, False))
                for _ in range(args.smtp)]
    threads += [threading.Thread(target=smtp_sender, args=(where["submission"], users, account, until, True))
                for _ in range(args.submission)]
    threads.append(threading.Thread(target=odmr_customer, args=(where["odmr"], account, until)))
    cpu_before = server.cpu_seconds()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        loaded = time.monotonic() - started
        cpu_used = [b - a for a, b in zip(cpu_before, server.cpu_seconds(), strict=True)]
        drained_by = time.monotonic() + 300
        while time.monotonic() < drained_by:  # the queue drained, every mailbox read, the customer served
            busy = waiting(server)
            read = sum(pop3_read(where["pop3"], user, account) for user in users)
            while odmr_collect(where["odmr"], account):
                pass
            if not busy and not read and not waiting(server):
                break
    finally:
        server.process.stop()
        sink.controller.stop()
        server.stop()
    accepted, found = account.accepted, account.found
    lost = sum(1 for tag in accepted if tag not in found)
    duplicated = sum(1 for tag in found if found[tag] > 1)
    strays = sum(1 for tag in found if tag not in accepted)
    print(f"\n{database_label(database)}: accepted {sum(accepted.values())}, delivered {sum(found[t] > 0 for t in accepted)},"
          f" lost {lost}, duplicated {duplicated}, errors {len(account.errors)}"
          f"{f', found but never accepted {strays}' if strays else ''}")
    for error in account.errors[:10]:
        print(f"  error: {error}")
    kinds = Counter(tag.split("-")[0] for tag in accepted)
    print(f"{args.seconds:.0f} s of load on {database_label(database)} (the last reader done after {loaded:.0f} s)", flush=True)
    figures = {"accepted": float(sum(accepted.values())), "lost": float(lost), "duplicated": float(duplicated),
               "errors": float(len(account.errors))}
    for kind in ("mpp", "smtp", "submission"):
        figures[f"{kind} accepted/s"] = kinds[kind] / args.seconds
    figures["all accepted/s"] = sum(accepted.values()) / args.seconds
    # the CPU of the load (every protocol's work, not just posting) per message accepted
    figures["mailsrv CPU us/accepted"] = cpu_used[0] * 1e6 / max(1, sum(accepted.values()))
    figures["database CPU us/accepted"] = cpu_used[1] * 1e6 / max(1, sum(accepted.values()))
    for kind, values in sorted(account.latency.items()):
        figures[f"{kind} p50 ms"] = statistics.median(values) * 1000
        figures[f"{kind} p99 ms"] = percentile(values, 99) * 1000
        figures[f"{kind} count"] = float(len(values))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--database", action="append", metavar="sqlite|postgresql|URL",
                        help="the database (sqlite when not given); given twice, one soak on each, side by side")
    parser.add_argument("--posters", type=int, default=50)
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--smtp", type=int, default=10)
    parser.add_argument("--submission", type=int, default=5)
    args = parser.parse_args()
    raise_fd_limit()
    dbs = databases(args)
    results = {database_label(database): soak(database, args) for database in dbs}
    print_side_by_side(results, 30, 1)
    if len(results) == 2:
        first, second = results
        print(f"\nratio = {first} / {second}")


if __name__ == "__main__":
    main()
