"""ODMR: a customer collecting a large backlog over the reversed connection.

    python bench/odmr.py [--messages 1000] [--rounds 3] [--client-cpu 0] [--customer socat|fetchmail]

N held messages of 10 KB across 10 ODMR domains wait in mailsrv. The customer connects,
says EHLO, authenticates with CRAM-MD5 and sends ATRN for all 10 domains; after the 250 it
becomes a byte pipe to a local SMTP sink (aiosmtpd, as in bench/relay.py), whose greeting
and replies mailsrv then reads. The customer is this script with socat (the default: the
script logs in and sends ATRN, then socat, written in C, is the byte pipe) or fetchmail
(`--customer fetchmail`, `protocol odmr`, as a real office runs it; its ATRN and the 250
are timed from its `-v` protocol trace). Figures: the time from ATRN to
its 250, and the messages per second the sink received (first to last), once with a sink
that offers PIPELINING and once with one that does not. In the same run, taking turns
with the ODMR rounds, mailsrv's relay delivers the same number of messages to the same
kind of sink, so the rates are measured on the same machine at the same time: as shipped
(bench/relay.py's "mailsrv w2", up to 20 sessions at once), and held to one session, as
an ODMR turn is (smtplib, which does not pipeline).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

from common import (
    MailsrvWithStore,
    cram_md5_answer,
    hold_on_cpu,
    percentile,
    raise_fd_limit,
    temp_folder,
)
from relay import Mailsrv as RelayMailsrv
from relay import Sink, message

DOMAINS = [f"customer{i}.example" for i in range(10)]
USER, SECRET = "cust@bench.example", "bench-secret"


class Mailsrv(MailsrvWithStore):
    def __init__(self):
        from mailsrv.auth import hash_password

        super().__init__(temp_folder("bench-odmr-"), "bench.example", odmr={"listen": "127.0.0.1:0"},
                         delivery={"workers": "0"})
        self.store.directory.add_account(USER, hash_password(SECRET, 4), cram_secret=SECRET)
        for domain in DOMAINS:
            self.store.directory.add_domain(domain, "odmr")
            self.store.directory.grant_odmr(USER, domain)
        self.process.start()
        self.address = self.process.addresses["odmr"]

    def load(self, count: int) -> None:
        """``count`` held messages, one recipient each, across the domains."""
        from sqlalchemy import text

        from mailsrv.models import utcnow
        from mailsrv.store.queue import enqueue_in

        with self.db.write_raw() as raw:
            raw.execute(text("DELETE FROM queue"))
            for n in range(count):
                enqueue_in(raw, f"sender{n}@far.example", message(n), [f"user{n}@{DOMAINS[n % 10]}"], "smtp", None,
                           utcnow())
            raw.execute(text("UPDATE queue_recipients SET state = 'held'"))


class Customer:
    """The customer as a script and socat: this script logs in and sends ATRN, then hands
    its socket to socat, a byte pipe to the sink (written in C, forwarding whatever it
    reads at once, TCP_NODELAY towards the sink), so the pipe costs what a well-made
    customer's would and mailsrv is what is measured."""

    def __init__(self, address, sink_port: int):
        if shutil.which("socat") is None:
            raise SystemExit("socat is not installed: apt-get install -y socat")
        self.sock = socket.create_connection(address, timeout=120)
        self.reader = self.sock.makefile("rb", buffering=0)
        self.sink_port = sink_port

    def ask(self, line: str) -> list[bytes]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def reply(self) -> list[bytes]:
        lines = [self.reader.readline()]  # (unbuffered: nothing past the reply is read here)
        while lines[-1][3:4] == b"-":
            lines.append(self.reader.readline())
        return lines

    def collect(self) -> float:
        """Log in and ATRN; return the seconds from ATRN to its 250, then pipe."""
        self.reply()
        self.ask("EHLO customer.example")
        challenge = self.ask("AUTH CRAM-MD5")[0]
        assert self.ask(cram_md5_answer(USER, SECRET, challenge)[:-2].decode())[0].startswith(b"235")
        started = time.perf_counter()
        reply = self.ask("ATRN " + ",".join(DOMAINS))
        took = time.perf_counter() - started
        if not reply[0].startswith(b"250"):
            raise RuntimeError(f"ATRN: {reply!r}")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (both ways, as socat's own side)
        self.process = subprocess.Popen(
            ["socat", "-b", "262144", f"FD:{self.sock.fileno()}", f"TCP:127.0.0.1:{self.sink_port},nodelay"],
            pass_fds=[self.sock.fileno()])
        self.sock.close()
        return took

    def finish(self) -> None:
        self.process.wait(timeout=120)


class Fetchmail:
    """fetchmail as the customer: ``protocol odmr`` with the sink as its smtphost."""

    def __init__(self, folder: Path, address, sink_port: int):
        if shutil.which("fetchmail") is None:
            raise SystemExit("fetchmail is not installed: apt-get install -y fetchmail (or --customer script)")
        self.home = folder / "fetchmail-home"
        self.home.mkdir(exist_ok=True)
        rc = self.home / ".fetchmailrc"
        rc.write_text(f'set no bouncemail\npoll {address[0]} protocol odmr service {address[1]} user "{USER}"'
                      f' password "{SECRET}" fetchdomains {",".join(DOMAINS)} smtphost "127.0.0.1/{sink_port}"'
                      " sslproto ''\n")
        rc.chmod(0o600)
        self.rc = rc

    def collect(self) -> float:
        """Start fetchmail; return the seconds from its ATRN to the 250, read off its
        protocol trace as the lines come (it then pipes until mailsrv's QUIT)."""
        self.process = subprocess.Popen(["fetchmail", "-f", str(self.rc), "-N", "-v", "--nosyslog"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**os.environ, "HOME": str(self.home)})
        sent = None
        for line in self.process.stdout:
            if b"> ATRN" in line:
                sent = time.perf_counter()
            elif sent is not None and b"< 250" in line:
                took = time.perf_counter() - sent
                threading.Thread(target=self.process.stdout.read, daemon=True).start()
                return took
        raise RuntimeError(f"fetchmail ended (exit {self.process.wait()}) without a 250 to ATRN")

    def finish(self) -> None:
        if self.process.wait(timeout=120) != 0:
            raise RuntimeError(f"fetchmail exited with {self.process.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client-cpu", type=int, metavar="N",
                        help="hold this process (customer, sinks, and fetchmail) on CPU N")
    parser.add_argument("--customer", choices=("socat", "fetchmail"), default="socat")
    args = parser.parse_args()
    raise_fd_limit()
    sinks = {False: Sink(), True: Sink(pipelining=True)}
    server = Mailsrv()
    relays = {"relay (mailsrv w2)": RelayMailsrv(sinks[False], 2),  # as shipped: many sessions at once
              "relay, one session": RelayMailsrv(sinks[False], 1, sessions=1)}  # one connection, as ODMR has
    hold_on_cpu(args.client_cpu)
    turns: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    try:
        for round_ in range(args.rounds):
            for name, relay in relays.items():
                relay.clear()
                relay.load(args.messages)
                sinks[False].clear()
                relay.release()
                rate = sinks[False].wait(args.messages)
                rates.setdefault(name, []).append(rate)
                print(f"  round {round_ + 1}, {name}: {rate:.1f} messages/s", flush=True)
            for pipelining in (False, True):
                name = "ODMR, sink with PIPELINING" if pipelining else "ODMR, sink without PIPELINING"
                server.load(args.messages)
                sinks[pipelining].clear()
                if args.customer == "fetchmail":
                    customer = Fetchmail(server.process.folder, server.address, sinks[pipelining].port)
                else:
                    customer = Customer(server.address, sinks[pipelining].port)
                took = customer.collect()
                rate = sinks[pipelining].wait(args.messages)
                customer.finish()  # (before the next round's: one customer at a time)
                turns.setdefault(name, []).append(took * 1000)
                rates.setdefault(name, []).append(rate)
                print(f"  round {round_ + 1}, {name}: ATRN to 250 {took * 1000:.1f} ms, {rate:.1f} messages/s",
                      flush=True)
    finally:
        server.stop()
        for relay in relays.values():
            relay.stop()
        for sink in sinks.values():
            sink.stop()
    print(f"\n{'figure':34}{'ATRN to 250, ms':>18}{'messages/s':>14}")
    for name in rates:
        turn = f"{statistics.median(turns[name]):18.1f}" if name in turns else f"{'':18}"
        print(f"{name:34}{turn}{statistics.median(rates[name]):14.1f}")
    print(f"\n{args.messages} held messages of 10 KB in 10 domains, one ATRN, customer: {args.customer};"
          f" medians of {args.rounds} rounds (ATRN to 250, worst: {max(percentile(v, 100) for v in turns.values()):.1f} ms)")


if __name__ == "__main__":
    main()
