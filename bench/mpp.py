"""Posting: mailsrv (MPP into local mailboxes) and Postfix (SMTP into Maildir) side by side.

    python bench/mpp.py [--messages 2000] [--rounds 1] [--database postgresql] [--client-cpu 0]
                        [--against TREE] [--processes 2]
    python bench/mpp.py --database postgresql --database sqlite   # mailsrv on each, side by side

10 KB messages posted by 1 and by 8 concurrent clients, each client on one connection
sending its messages one after another (MPP: USER, PASS once, then DATA per message;
SMTP: MAIL, RCPT, DATA per message). Figures, for both servers and their ratio:

- posted/s: messages answered 250, per second of posting;
- delivered/s: messages in the recipient's mailbox, per second from the first post until
  the last one is there (the figure that counts: Postfix accepts faster than it delivers);
- p50/p99 delay from the 250 to the message being readable: for mailsrv the
  ``messages.received_at`` time written in the transaction that makes it readable over
  POP3; for Postfix the mtime of its file in ``Maildir/new``. A message readable before
  its 250 arrived counts 0: mailsrv delivers to a local mailbox in the transaction that
  queues the message, so its delays are 0 by construction;
- mailsrv and database CPU us/message (mailsrv only): the CPU the `mailsrv serve`
  processes used from the first post until the last message was readable, per message,
  and on PostgreSQL the database server's (its processes on this machine; SQLite runs
  inside mailsrv, so 0). Steadier than the rates on a noisy machine, and what decides
  them once the cores are full.

Postfix (Debian `postfix`) is set up by this script with its own config directory on a
loopback port, delivering to the Maildir of a local user made for the run. ``--against
TREE`` runs this tree's mailsrv ("after") against another tree's ("before") instead of
Postfix; ``--client-cpu N`` holds the load generator on one CPU. ``--database`` given
twice runs mailsrv on each database instead of Postfix (ratio: the first / the second).
``--processes N`` runs N `mailsrv serve` processes on the one database (as N hosts would
be: PostgreSQL), the clients taking turns between them; ``--processes 1,2`` runs mailsrv
both ways, side by side.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import smtplib
import socket
import statistics
import subprocess
import threading
import time
from datetime import UTC
from pathlib import Path

from common import (
    MailsrvWithStore,
    add_variant_arguments,
    database_label,
    databases,
    free_port,
    hold_on_cpu,
    percentile,
    print_side_by_side,
    raise_fd_limit,
    read_until,
    temp_folder,
)

DOMAIN = "bench.example"
USER = "mppbench"
PASSWORD = "bench-password"
ID = re.compile(rb"X-Bench-Id: (\d+)-(\d+)")


def message(client: int, n: int, size: int = 10 * 1024) -> bytes:
    header = (
        f"From: {USER}@{DOMAIN}\r\nTo: {USER}@{DOMAIN}\r\nSubject: bench {client}-{n}\r\n"
        f"X-Bench-Id: {client}-{n}\r\n\r\n"
    ).encode()
    line = b"Dear colleagues, the quarterly figures are attached to this message as promised.\r\n"
    return header + line * ((size - len(header)) // len(line))


def run_posters(clients: int, per_client: int, post_one) -> tuple[dict[str, float], float, float]:
    """Run the posters; return ({bench id: time of its 250}, first post, last 250)."""
    accepted: dict[str, float] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def poster(c: int) -> None:
        session = post_one(c)
        barrier.wait()
        for n in range(per_client):
            session(message(c, n))
            with lock:
                accepted[f"{c}-{n}"] = time.time()

    started = time.time()
    threads = [threading.Thread(target=poster, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return accepted, started, max(accepted.values())


def wait_for(count, target: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while count() < target and time.monotonic() < deadline:
        time.sleep(0.05)


def figures(accepted, started, last_accepted, readable: dict[str, float]) -> dict[str, float]:
    # a message readable before its 250 reached the client (mailsrv commits the mailbox
    # copy in the transaction the 250 waits for) has waited for nothing: 0
    delays = [max(0.0, readable[k] - accepted[k]) for k in accepted if k in readable]
    return {
        "posted/s": len(accepted) / (last_accepted - started),
        "delivered/s": len(readable) / (max(readable.values()) - started),
        "delay p50 ms": percentile(delays, 50) * 1000,
        "delay p99 ms": percentile(delays, 99) * 1000,
        "delivered": len(readable),
    }


# --- mailsrv --------------------------------------------------------------------------


class Mailsrv(MailsrvWithStore):
    def __init__(self, folder: Path, *, name: str = "mailsrv", database: str = "sqlite", code: Path | None = None,
                 processes: int = 1, **sections: dict[str, str]):
        from mailsrv.auth import hash_password

        # the shipped defaults: 2 delivery workers
        super().__init__(folder, DOMAIN, name=name, database=database, code=code, processes=processes, **sections)
        self.account = self.store.directory.add_account(f"{USER}@{DOMAIN}", hash_password(PASSWORD, 4))
        self.start_all()

    def session(self, client: int):
        process = self.processes[client % len(self.processes)]
        sock = socket.create_connection(process.addresses["mpp"], timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()

        def ask(data: bytes, expect: bytes) -> None:
            sock.sendall(data)
            read_until(sock, b"\r\n", buffer)
            if not buffer.startswith(expect):
                raise RuntimeError(bytes(buffer))

        read_until(sock, b"\r\n", buffer)
        ask(f"USER {USER}@{DOMAIN}\r\n".encode(), b"250")
        ask(f"PASS {PASSWORD}\r\n".encode(), b"250")

        def post(text: bytes) -> None:
            ask(b"DATA\r\n", b"354")
            ask(text + b".\r\n", b"250")

        return post

    def count(self) -> int:
        return self.store.maildrops.mailbox_usage(self.account.id)[0]

    def readable(self) -> dict[str, float]:
        result = {}
        for mid, _uid, _size, received, _seen, _sender in self.store.maildrops.mailbox_list(f"{USER}@{DOMAIN}"):
            body = self.store.maildrops.read_body(self.account.id, mid)
            match = ID.search(body)
            result[f"{match.group(1).decode()}-{match.group(2).decode()}"] = received.replace(tzinfo=UTC).timestamp()
        return result

    def clear(self) -> None:
        from sqlalchemy import text

        with self.db.write() as s:
            s.execute(text("DELETE FROM messages"))
            s.execute(text("DELETE FROM queue"))


# --- Postfix --------------------------------------------------------------------------


class Postfix:
    name = "postfix"

    def __init__(self, folder: Path, port: int):
        if shutil.which("postfix") is None:
            raise SystemExit("Postfix is not installed: apt-get install -y postfix")
        try:
            entry = pwd.getpwnam(USER)
        except KeyError:
            subprocess.run(["useradd", "-m", "-d", f"/home/{USER}", USER], check=True)
            entry = pwd.getpwnam(USER)
        self.maildir = Path(entry.pw_dir) / "Maildir"
        shutil.rmtree(self.maildir, ignore_errors=True)
        self.conf = folder / "postfix"
        shutil.copytree("/etc/postfix", self.conf)
        if not (self.conf / "main.cf").exists():  # installed with "No configuration"
            shutil.copy("/usr/share/postfix/main.cf.debian", self.conf / "main.cf")
        settings = {
            "inet_interfaces": "loopback-only",
            "myhostname": f"mx.{DOMAIN}",
            "mydestination": DOMAIN,
            "home_mailbox": "Maildir/",
            "default_transport": "error",
            "relayhost": "",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "smtpd_banner": "$myhostname ESMTP",
            "compatibility_level": "3.6",
            "message_size_limit": "26214400",
        }
        for key, value in settings.items():
            subprocess.run(["postconf", "-c", str(self.conf), "-e", f"{key} = {value}"], check=True)
        subprocess.run(["postconf", "-c", str(self.conf), "-M",
                        f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - smtpd"], check=True)
        subprocess.run(["postconf", "-c", str(self.conf), "-F", "*/*/chroot = n"], check=True)
        self.address = ("127.0.0.1", port)
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True, capture_output=True)
        wait_for(lambda: self._answers(), 1, 30)

    def _answers(self) -> int:
        try:
            socket.create_connection(self.address, timeout=1).close()
            return 1
        except OSError:
            return 0

    def session(self, _client: int):
        smtp = smtplib.SMTP(*self.address, timeout=60)
        smtp.ehlo("bench.client")

        def post(text: bytes) -> None:
            smtp.sendmail(f"{USER}@{DOMAIN}", [f"{USER}@{DOMAIN}"], text)

        return post

    def files(self) -> list[Path]:
        new = self.maildir / "new"
        return list(new.iterdir()) if new.exists() else []

    def count(self) -> int:
        return len(self.files())

    def readable(self) -> dict[str, float]:
        result = {}
        for path in self.files():
            match = ID.search(path.read_bytes()[:4096])
            result[f"{match.group(1).decode()}-{match.group(2).decode()}"] = path.stat().st_mtime
        return result

    def clear(self) -> None:
        # the whole Maildir, not just its files: a directory that once held thousands of
        # entries stays slower to add to, so each round starts as the first one did
        shutil.rmtree(self.maildir, ignore_errors=True)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False, capture_output=True)


def unpinned(processes: int) -> dict:
    """Several serve processes on this one machine stand for several hosts: each would
    keep its threads on the same CPU ([server] pin_cpu picks the highest), so they may
    use every CPU instead."""
    return {"server": {"pin_cpu": "no"}} if processes > 1 else {}


def main(mailsrv_class=None, description: str | None = None) -> None:
    """Run the figures with ``mailsrv_class`` as mailsrv's side (MPP's :class:`Mailsrv`
    unless given: bench/smtp.py gives its SMTP one)."""
    mailsrv_class = mailsrv_class or Mailsrv
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each figure (the median is printed)")
    parser.add_argument("--only", choices=("mailsrv", "postfix"))
    parser.add_argument("--processes", default="1", metavar="N[,M]",
                        help="mailsrv serve processes on the one database; two counts: both, side by side")
    add_variant_arguments(parser)
    args = parser.parse_args()
    raise_fd_limit()
    dbs = databases(args)
    counts = [int(n) for n in args.processes.split(",")]
    servers = []
    try:
        if args.against:
            for name, code in (("after", None), ("before", args.against.resolve())):
                servers.append(mailsrv_class(temp_folder("bench-mpp-"), name=name, database=dbs[0], code=code))
        elif len(dbs) > 1:
            for database in dbs:
                servers.append(mailsrv_class(temp_folder("bench-mpp-"), name=database_label(database),
                                             database=database, processes=counts[0], **unpinned(counts[0])))
        elif len(counts) > 1:
            for n in counts:
                servers.append(mailsrv_class(temp_folder("bench-mpp-"), name=f"{n} serve", database=dbs[0], processes=n,
                                             **unpinned(n)))
        elif args.only != "postfix":
            servers.append(mailsrv_class(temp_folder("bench-mpp-"), database=dbs[0], processes=counts[0],
                                         **unpinned(counts[0])))
        if args.only != "mailsrv" and not args.against and len(dbs) == 1 and len(counts) == 1:
            servers.append(Postfix(temp_folder("bench-postfix-"), free_port()))
        hold_on_cpu(args.client_cpu)
        runs: dict[str, dict[str, list[float]]] = {}
        for round_ in range(args.rounds):  # the servers take turns, so both see the same machine
            for clients in (1, 8):
                for server in servers:
                    server.clear()
                    cpu = getattr(server, "cpu_seconds", lambda: (float("nan"), float("nan")))
                    before = cpu()
                    accepted, started, last = run_posters(clients, args.messages // clients, server.session)
                    wait_for(server.count, len(accepted))
                    used = [b - a for a, b in zip(before, cpu(), strict=True)]
                    got = figures(accepted, started, last, server.readable())
                    got["mailsrv CPU us/message"] = used[0] * 1e6 / max(1, len(accepted))
                    got["database CPU us/message"] = used[1] * 1e6 / max(1, len(accepted))
                    for key, value in got.items():
                        runs.setdefault(server.name, {}).setdefault(f"{clients} client(s): {key}", []).append(value)
                    print(f"  round {round_ + 1}, {server.name}, {clients} client(s): "
                          f"{got['delivered/s']:.1f} delivered/s", flush=True)
    finally:
        for server in servers:
            server.stop()
    results = {name: {key: statistics.median(values) for key, values in figures_.items()} for name, figures_ in runs.items()}
    print_side_by_side(results, 34, 1)
    names = list(results)
    if len(names) == 2:
        print(f"\nratio = {names[0]} / {names[1]} (higher is better for rates, lower for delays and CPU)")
    if args.rounds > 1:
        print(f"each figure the median of {args.rounds} rounds")
    print(f"10 KB messages; mailsrv with its shipped defaults ([delivery] workers = 2, {' and '.join(dbs)}),"
          f" {args.processes} serve process(es) per database")
    peer = "Postfix with Debian's defaults; " if any(s.name == "postfix" for s in servers) else ""
    print(f"{peer}{os.cpu_count()} cores.")


if __name__ == "__main__":
    main()
