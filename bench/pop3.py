"""POP3: mailsrv and Dovecot side by side in one run, on the same machine and load.

    python bench/pop3.py [--seconds 5] [--rounds 1] [--idle 2000] [--only mailsrv] [--figure "RETR"]
                         [--set server.pin_cpu=no] [--tls] [--database postgresql] [--client-cpu 0]
                         [--compare-pin | --against TREE]

Dovecot (Debian `dovecot-pop3d`) is set up by this script on a loopback port with its own
standalone config, the same users, bcrypt hashes of the same cost (10) and the same
messages (Maildir). Figures, each for both servers and their ratio (mailsrv / Dovecot):

- logins per second (USER, PASS, QUIT) at 1, 8 and 32 concurrent clients;
- RETR throughput in MB/s for 10 KB and 1 MB messages at 1 and 8 clients;
- login + STAT + LIST + UIDL time for a 10,000-message mailbox (median of 5);
- 2,000 idle logged-in sessions: resident memory (mailsrv: RSS of its one process;
  Dovecot: PSS summed over its process tree) and p50/p99 NOOP latency while they are open.

The load generator is one thread per client with a blocking socket. ``--tls``: every
session starts TLS with STLS first (both servers get a self-signed certificate).
``--compare-pin`` runs mailsrv twice instead, ``[server] pin_cpu`` yes and no, and
``--against TREE`` runs this tree's mailsrv ("after") against another tree's ("before");
``--client-cpu N`` holds the load generator on one CPU (bench/README.md says why).
``--database postgresql --database sqlite`` runs mailsrv on each database instead of
Dovecot, side by side (ratio: the first / the second).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import ssl
import statistics
import subprocess
import threading
import time
from pathlib import Path

import bcrypt
from common import (
    MailsrvWithStore,
    add_variant_arguments,
    database_label,
    databases,
    free_port,
    hold_on_cpu,
    now,
    percentile,
    print_side_by_side,
    pss_tree_mb,
    raise_fd_limit,
    read_until,
    rss_mb,
    rss_parts_mb,
    self_signed_certificate,
    temp_folder,
)

PASSWORD = "bench-password"
COST = 10
IDLE_COST = 4  # the idle sessions only need to log in, quickly, on both servers
DOMAIN = "bench.example"


PROSE = [
    b"Dear colleagues, the quarterly figures are attached to this message as promised.",
    b"Please check the numbers for your department before Friday and send corrections",
    b"to the finance office; the board meets on Monday morning at nine o'clock sharp.",
]


def make_message(index: int, size: int) -> bytes:
    """A plain-text message of about ``size`` octets: prose lines, and one line starting
    with "." (as a signature separator might) so that byte-stuffing is exercised."""
    header = f"From: load@{DOMAIN}\r\nTo: user@{DOMAIN}\r\nSubject: message {index}\r\nMessage-ID: <{index}.{size}@bench>\r\n\r\n"
    body = bytearray(header.encode())
    n = 0
    while len(body) < size - 40:
        body += PROSE[n % len(PROSE)] + b"\r\n"
        n += 1
    return bytes(body + b".. the sender's signature, dot-stuffed\r\n")


# --- the two servers ------------------------------------------------------------------


class Mailsrv(MailsrvWithStore):
    def __init__(self, folder: Path, settings: dict[str, dict[str, str]] | None = None, *, name: str = "mailsrv",
                 database: str = "sqlite", code: Path | None = None, tls: bool = False):
        sections = {"delivery": {"workers": "0"}}
        if tls:
            cert, key = self_signed_certificate(folder)
            sections["tls"] = {"certfile": cert, "keyfile": key}
            sections["auth"] = {"plaintext_networks": ""}  # passwords only after STLS
        for section, keys in (settings or {}).items():
            sections.setdefault(section, {}).update(keys)
        super().__init__(folder, DOMAIN, name=name, database=database, code=code, **sections)

    def add_users(self, names: list[str], cost: int) -> None:
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost)).decode()
        from mailsrv.models import Account

        domain_id = self.store.directory.list_domains()[0].id
        with self.db.write() as s:
            s.add_all(Account(address=f"{n}@{DOMAIN}", domain_id=domain_id, password_hash=hashed) for n in names)

    def add_messages(self, name: str, bodies: list[bytes]) -> None:
        from mailsrv.message import dot_line_offsets, encode_offsets
        from mailsrv.models import Message
        from mailsrv.store import new_uid

        account = self.store.directory.find_account(f"{name}@{DOMAIN}")
        with self.db.write() as s:  # in bulk, as the store's delivery would write them
            s.add_all(
                Message(account_id=account.id, uid=new_uid(), sender="", size=len(b), body=b,
                        dot_offsets=encode_offsets(dot_line_offsets(b)))
                for b in bodies
            )

    def start(self) -> None:
        self.process.start()
        self.address = self.process.addresses["pop3"]

    def memory_mb(self) -> float:
        anonymous, mapped = rss_parts_mb(self.process.proc.pid)
        print(f"  mailsrv resident: {anonymous:.1f} MiB anonymous + {mapped:.1f} MiB file-backed", flush=True)
        return rss_mb(self.process.proc.pid)


class Dovecot:
    name = "dovecot"

    def __init__(self, folder: Path, port: int, tls: bool = False):
        if shutil.which("dovecot") is None:
            raise SystemExit("Dovecot is not installed: apt-get install -y dovecot-pop3d")
        self.folder = folder
        self.port = port
        self.address = ("127.0.0.1", port)
        nobody = pwd.getpwnam("nobody")
        self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
        (folder / "home").mkdir()
        (folder / "run").mkdir()
        self.passwd = folder / "passwd"
        self.passwd.write_text("")
        self.conf = folder / "dovecot.conf"
        ssl_settings = "ssl = no"
        if tls:
            cert, key = self_signed_certificate(folder)
            ssl_settings = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}"
        self.conf.write_text(f"""
instance_name = mailsrv-bench-dovecot
base_dir = {folder}/run
state_dir = {folder}/state
log_path = {folder}/dovecot.log
protocols = pop3
listen = 127.0.0.1
{ssl_settings}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
first_valid_uid = 1
last_valid_uid = 0
default_client_limit = 8000
default_process_limit = 4000
default_vsz_limit = 1G
mail_max_userip_connections = 10000
passdb {{
  driver = passwd-file
  args = scheme=BLF-CRYPT {self.passwd}
}}
userdb {{
  driver = passwd-file
  args = {self.passwd}
  default_fields = uid={self.uid} gid={self.gid} home={folder}/home/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
  service_count = 0
  client_limit = 4000
  process_limit = 4
}}
service pop3 {{
  process_limit = 4000
}}
service anvil {{
  client_limit = 8003
}}
service auth {{
  client_limit = 8000
}}
""")
        self.counter = 0

    def add_users(self, names: list[str], cost: int) -> None:
        hashed = subprocess.run(
            ["doveadm", "-c", str(self.conf), "pw", "-s", "BLF-CRYPT", "-r", str(cost), "-p", PASSWORD],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        with open(self.passwd, "a") as handle:
            for n in names:
                handle.write(f"{n}@{DOMAIN}:{hashed}::::::\n")
        for n in names:
            home = self.folder / "home" / f"{n}@{DOMAIN}"
            for sub in ("cur", "new", "tmp"):
                (home / "Maildir" / sub).mkdir(parents=True)
            for path in (home, home / "Maildir", *[home / "Maildir" / s for s in ("cur", "new", "tmp")]):
                os.chown(path, self.uid, self.gid)

    def add_messages(self, name: str, bodies: list[bytes]) -> None:
        cur = self.folder / "home" / f"{name}@{DOMAIN}" / "Maildir" / "cur"
        for body in bodies:
            self.counter += 1
            lf = body.replace(b"\r\n", b"\n")
            path = cur / f"{1700000000 + self.counter}.M{self.counter}P1.bench,S={len(lf)},W={len(body)}:2,S"
            path.write_bytes(lf)
            os.chown(path, self.uid, self.gid)

    def start(self) -> None:
        subprocess.run(["dovecot", "-c", str(self.conf)], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(self.address, timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("Dovecot did not start: see " + str(self.folder / "dovecot.log"))

    def memory_mb(self) -> float:
        master = int((self.folder / "run" / "master.pid").read_text())
        return pss_tree_mb(master)

    def stop(self) -> None:
        subprocess.run(["dovecot", "-c", str(self.conf), "stop"], check=False)


# --- the clients ----------------------------------------------------------------------


class Session:
    """A POP3 client on a blocking socket (over TLS, after STLS, when TLS_CLIENT is set)."""

    #: the client side of --tls: no certificate check (the servers' are self-signed)
    TLS_CLIENT: ssl.SSLContext | None = None

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.line()
        if self.TLS_CLIENT is not None:
            self.ask(b"STLS")
            self.sock = self.TLS_CLIENT.wrap_socket(self.sock, server_hostname="localhost")

    def line(self) -> bytes:
        read_until(self.sock, b"\r\n", self.buffer)
        return bytes(self.buffer)

    def ask(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+"):
            raise RuntimeError(f"{command!r}: {reply!r}")
        return reply

    def multi(self, command: bytes) -> int:
        self.sock.sendall(command + b"\r\n")
        size = read_until(self.sock, b"\r\n.\r\n", self.buffer)
        if not self.buffer.startswith(b"+OK"):
            raise RuntimeError(f"{command!r}: {bytes(self.buffer[:100])!r}")
        return size

    def login(self, user: str) -> None:
        self.ask(f"USER {user}@{DOMAIN}".encode())
        self.ask(f"PASS {PASSWORD}".encode())

    def close(self) -> None:
        try:
            self.ask(b"QUIT")
        except (OSError, RuntimeError):
            pass
        self.sock.close()


def run_clients(count: int, target) -> list:
    results: list = [None] * count
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, target(i))) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def logins_per_second(server, clients: int, seconds: float) -> float:
    deadline = now() + seconds

    def client(i: int) -> int:
        done = 0
        while now() < deadline:
            s = Session(server.address)
            s.login(f"login{i}")
            s.close()
            done += 1
        return done

    started = now()
    total = sum(run_clients(clients, client))
    return total / (now() - started)


def retr_mb_per_second(server, clients: int, prefix: str, count: int, seconds: float) -> float:
    deadline = now() + seconds

    def client(i: int) -> int:
        s = Session(server.address)
        s.login(f"{prefix}{i}")
        received = 0
        n = 0
        while now() < deadline:
            received += s.multi(f"RETR {n % count + 1}".encode())
            n += 1
        s.close()
        return received

    started = now()
    total = sum(run_clients(clients, client))
    return total / (now() - started) / 1e6


def big_mailbox_seconds(server, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = now()
        s = Session(server.address)
        s.login("big")
        s.ask(b"STAT")
        s.multi(b"LIST")
        s.multi(b"UIDL")
        s.close()
        times.append(now() - t)
    return percentile(times, 50)


def idle_sessions(server, count: int) -> tuple[float, float, float, int]:
    sessions = []
    for i in range(count):
        s = Session(server.address)
        s.login(f"idle{i}")
        sessions.append(s)
    memory = server.memory_mb()
    latencies = []
    for s in sessions:
        t = now()
        s.ask(b"NOOP")
        latencies.append((now() - t) * 1000)
    for s in sessions:
        s.close()
    return memory, percentile(latencies, 50), percentile(latencies, 99), len(sessions)


# --- the run --------------------------------------------------------------------------


def populate(server, idle: int) -> None:
    server.add_users([f"login{i}" for i in range(32)], COST)
    server.add_users([f"small{i}" for i in range(8)] + [f"large{i}" for i in range(8)] + ["big"], COST)
    server.add_users([f"idle{i}" for i in range(idle)], IDLE_COST)
    small = [make_message(i, 10 * 1024) for i in range(100)]
    large = [make_message(i, 1024 * 1024) for i in range(8)]
    for i in range(8):
        server.add_messages(f"small{i}", small)
        server.add_messages(f"large{i}", large)
    server.add_messages("big", [make_message(i, 1024) for i in range(10_000)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each timed figure (the median is printed)")
    parser.add_argument("--idle", type=int, default=2000, help="idle logged-in sessions")
    parser.add_argument("--only", choices=("mailsrv", "dovecot"))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a mailsrv.conf setting for mailsrv (repeatable), e.g. server.pin_cpu=no")
    parser.add_argument("--figure", action="append", default=[],
                        help="time only the figures whose name holds this text (repeatable; --idle 0 skips the idle figure)")
    parser.add_argument("--tls", action="store_true", help="every session starts TLS (STLS) before it logs in")
    parser.add_argument("--compare-pin", action="store_true",
                        help="mailsrv with [server] pin_cpu = yes against no, instead of against Dovecot")
    add_variant_arguments(parser)
    args = parser.parse_args()
    raise_fd_limit(args.idle * 3 + 2000)
    if args.tls:
        Session.TLS_CLIENT = ssl.create_default_context()
        Session.TLS_CLIENT.check_hostname = False
        Session.TLS_CLIENT.verify_mode = ssl.CERT_NONE
    settings: dict[str, dict[str, str]] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        section, _, key = name.partition(".")
        settings.setdefault(section, {})[key] = value
    dbs = databases(args)
    variants: list[tuple[str, dict, Path | None]] = [("mailsrv", settings, None)]
    if args.compare_pin:
        variants = [(f"pin_cpu={v}", {**settings, "server": {**settings.get("server", {}), "pin_cpu": v}}, None)
                    for v in ("yes", "no")]
    elif args.against:
        variants = [("after", settings, None), ("before", settings, args.against.resolve())]
    servers = []
    try:
        if args.only != "dovecot":
            for name, variant, code in variants:
                for database in dbs:
                    label = name if len(dbs) == 1 else database_label(database)
                    servers.append(Mailsrv(temp_folder("bench-mailsrv-"), variant, name=label, database=database,
                                           code=code, tls=args.tls))
        if args.only != "mailsrv" and len(variants) == 1 and len(dbs) == 1:
            servers.append(Dovecot(temp_folder("bench-dovecot-"), free_port(), tls=args.tls))
        for server in servers:
            print(f"setting up {server.name} ...", flush=True)
            populate(server, args.idle)
            server.start()
        hold_on_cpu(args.client_cpu)
        timed = [(f"logins/s, {c} clients", lambda srv, c=c: logins_per_second(srv, c, args.seconds)) for c in (1, 8, 32)]
        for label, prefix, count in (("10 KB", "small", 100), ("1 MB", "large", 8)):
            for c in (1, 8):
                timed.append((f"RETR MB/s, {label}, {c} clients",
                              lambda srv, c=c, prefix=prefix, count=count: retr_mb_per_second(srv, c, prefix, count, args.seconds)))
        timed.append(("10,000-message login+STAT+LIST+UIDL, s", big_mailbox_seconds))
        if args.figure:
            timed = [(key, measure) for key, measure in timed if any(f in key for f in args.figure)]
        runs: dict[str, dict[str, list[float]]] = {}
        for round_ in range(args.rounds):  # the servers take turns, so both see the same machine
            for key, measure in timed:
                for server in servers:
                    value = measure(server)
                    runs.setdefault(server.name, {}).setdefault(key, []).append(value)
                    print(f"  round {round_ + 1}, {server.name}: {key}: {value:.2f}", flush=True)
        results = {name: {key: statistics.median(v) for key, v in figures.items()} for name, figures in runs.items()}
        for server in servers if args.idle else ():
            memory, p50, p99, held = idle_sessions(server, args.idle)
            figures = results.setdefault(server.name, {})
            figures[f"{held} idle sessions: memory MiB"] = memory
            figures[f"{held} idle sessions: NOOP p50 ms"] = p50
            figures[f"{held} idle sessions: NOOP p99 ms"] = p99
            print(f"  {server.name}: idle sessions done", flush=True)
    finally:
        for server in servers:
            server.stop()
    print_side_by_side(results, 48, 2)
    names = list(results)
    if len(names) == 2:
        print(f"\nratio = {names[0]} / {names[1]} (higher is better for rates, lower for times, memory, latency)")
    print(f"mailsrv on {' and '.join(dbs)}{', every session over TLS (STLS)' if args.tls else ''}"
          f"{f', load generator on CPU {args.client_cpu}' if args.client_cpu is not None else ''}")
    if args.rounds > 1:
        print(f"timed figures: the median of {args.rounds} rounds, the servers taking turns")


if __name__ == "__main__":
    main()
