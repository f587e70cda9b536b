"""ODMR: a customer collecting a large backlog over the reversed connection.

    python bench/odmr.py [--messages 1000] [--rounds 3] [--client-cpu 0]

N held messages of 10 KB across 10 ODMR domains wait in mailsrv. The customer (this
script, as fetchmail does it) connects, says EHLO, authenticates with CRAM-MD5 and sends
ATRN for all 10 domains; after the 250 it becomes a byte pipe to a local SMTP sink
(aiosmtpd, as in bench/relay.py), whose greeting and replies mailsrv then reads. Figures:
the time from ATRN to its 250, and the messages per second the sink received (first to
last), with the customer offering PIPELINING (the pipe adds it to the sink's EHLO reply)
and without. Compare the rate with bench/relay.py's figure for mailsrv to the same sink.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import socket
import statistics
import threading
import time

from common import MailsrvWithStore, hold_on_cpu, percentile, raise_fd_limit, temp_folder
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
    """The customer's side: ODMR client, then a byte pipe to the sink."""

    def __init__(self, address, sink_port: int, pipelining: bool):
        self.sock = socket.create_connection(address, timeout=120)
        self.reader = self.sock.makefile("rb")
        self.sink_port = sink_port
        self.pipelining = pipelining

    def ask(self, line: str) -> list[bytes]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def reply(self) -> list[bytes]:
        lines = [self.reader.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(self.reader.readline())
        return lines

    def collect(self) -> float:
        """Log in and ATRN; return the seconds from ATRN to its 250, then pipe."""
        self.reply()
        self.ask("EHLO customer.example")
        challenge = base64.b64decode(self.ask("AUTH CRAM-MD5")[0][4:].strip())
        digest = hmac.new(SECRET.encode(), challenge, hashlib.md5).hexdigest()
        assert self.ask(base64.b64encode(f"{USER} {digest}".encode()).decode())[0].startswith(b"235")
        started = time.perf_counter()
        reply = self.ask("ATRN " + ",".join(DOMAINS))
        took = time.perf_counter() - started
        if not reply[0].startswith(b"250"):
            raise RuntimeError(f"ATRN: {reply!r}")
        threading.Thread(target=self.pipe, daemon=True).start()
        return took

    def pipe(self) -> None:
        sink = socket.create_connection(("127.0.0.1", self.sink_port), timeout=120)
        for sock in (sink, self.sock):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        to_mailsrv = threading.Thread(target=self.replies, args=(sink.makefile("rb"),), daemon=True)
        to_mailsrv.start()
        while chunk := self.reader.read1(65536):  # mailsrv -> sink, as it comes
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)
        to_mailsrv.join()
        sink.close()
        self.sock.close()

    def replies(self, source) -> None:
        """The sink's lines to mailsrv; its EHLO reply gets PIPELINING added when asked."""
        greeted = ehlo_seen = False
        while line := source.readline():
            if self.pipelining and greeted and not ehlo_seen and line.startswith(b"250"):
                ehlo_seen = True
                line = b"250-" + line[4:] + b"250-PIPELINING\r\n"
            greeted = greeted or line.startswith(b"220")
            self.sock.sendall(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client-cpu", type=int, metavar="N", help="hold this process (customer, sink) on CPU N")
    args = parser.parse_args()
    raise_fd_limit()
    sink = Sink()
    server = Mailsrv()
    hold_on_cpu(args.client_cpu)
    turns: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    try:
        for round_ in range(args.rounds):
            for pipelining in (False, True):
                name = "with PIPELINING" if pipelining else "without PIPELINING"
                server.load(args.messages)
                sink.clear()
                took = Customer(server.address, sink.port, pipelining).collect()
                rate = sink.wait(args.messages)
                turns.setdefault(name, []).append(took * 1000)
                rates.setdefault(name, []).append(rate)
                print(f"  round {round_ + 1}, {name}: ATRN to 250 {took * 1000:.1f} ms, {rate:.1f} messages/s",
                      flush=True)
    finally:
        server.stop()
        sink.stop()
    print(f"\n{'figure':34}{'ATRN to 250, ms':>18}{'messages/s':>14}")
    for name in rates:
        print(f"{name:34}{statistics.median(turns[name]):18.1f}{statistics.median(rates[name]):14.1f}")
    print(f"\n{args.messages} held messages of 10 KB in 10 domains, one ATRN; medians of {args.rounds} rounds"
          f" (ATRN to 250, worst: {max(percentile(v, 100) for v in turns.values()):.1f} ms)")


if __name__ == "__main__":
    main()
