"""The outbound relay: mailsrv and Postfix relaying the same queue to the same SMTP sink.

    python bench/relay.py [--messages 2000] [--rounds 1] [--only mailsrv] [--client-cpu 0]

(mailsrv with 2 and with 8 relay workers are "mailsrv w2" and "mailsrv w8".)

Each server gets N queued 10 KB messages, to recipients in 10 remote domains, held until
the run starts; then its queue is released and everything goes to one local SMTP sink
(aiosmtpd, in this process) as the server's relayhost, without TLS. The figure is the
sink's: messages per second from the first message it received to the last, so neither
server's polling or queue scan before the first delivery counts. mailsrv runs with 2
relay workers (as shipped) and with 8; Postfix with Debian's defaults (its own concurrency
of 20 sessions per destination). Postfix is set up with its own config directory: its
smtpd on a loopback port takes the load with `defer_transports = smtp`, which is then
lifted, and `postqueue -f` sends the queue.
"""

from __future__ import annotations

import argparse
import shutil
import smtplib
import statistics
import subprocess
import threading
import time

from aiosmtpd.controller import Controller
from common import (
    MailsrvWithStore,
    free_port,
    hold_on_cpu,
    print_side_by_side,
    raise_fd_limit,
    temp_folder,
)

DOMAIN = "bench.example"
SENDER = f"sender@{DOMAIN}"
DOMAINS = [f"remote{i}.example" for i in range(10)]


def message(n: int, size: int = 10 * 1024) -> bytes:
    header = f"From: {SENDER}\r\nTo: user{n}@{DOMAINS[n % 10]}\r\nSubject: relay {n}\r\n\r\n".encode()
    line = b"Dear colleagues, the quarterly figures are attached to this message as promised.\r\n"
    return header + line * ((size - len(header)) // len(line))


class Sink:
    """An SMTP server that takes everything and notes when each message came; with
    ``pipelining`` its EHLO reply offers PIPELINING (aiosmtpd reads pipelined commands in
    order whether offered or not)."""

    def __init__(self, pipelining: bool = False):
        self.pipelining = pipelining
        self.times: list[float] = []
        self.done = threading.Condition()
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())
        self.controller.start()
        self.port = self.controller.port

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]] if self.pipelining else responses

    async def handle_DATA(self, server, session, envelope):
        with self.done:
            self.times.append(time.perf_counter())
            self.done.notify_all()
        return "250 2.0.0 OK"

    def clear(self) -> None:
        with self.done:
            self.times.clear()

    def wait(self, count: int, timeout: float = 600) -> float:
        """Wait for ``count`` messages; return messages/s from the first to the last."""
        with self.done:
            if not self.done.wait_for(lambda: len(self.times) >= count, timeout):
                raise RuntimeError(f"the sink got {len(self.times)} of {count} messages")
            first, last = self.times[0], self.times[count - 1]
        return (count - 1) / (last - first)

    def stop(self) -> None:
        self.controller.stop()


class Mailsrv(MailsrvWithStore):
    def __init__(self, sink: Sink, workers: int, sessions: int = 20):
        super().__init__(temp_folder("bench-relay-"), DOMAIN, name=f"mailsrv w{workers}", delivery={
            "workers": str(workers), "relayhost": f"127.0.0.1:{sink.port}", "relay_tls": "none",
            "destination_concurrency": str(sessions)})
        self.process.start()

    def load(self, count: int) -> None:
        """Queue ``count`` messages, held until :meth:`release` (in one transaction, so
        the running relay sees none of them before)."""
        from sqlalchemy import text

        from mailsrv.models import utcnow
        from mailsrv.store.queue import enqueue_in

        with self.db.write_raw() as raw:
            for n in range(count):
                enqueue_in(raw, SENDER, message(n), [f"user{n}@{DOMAINS[n % 10]}"], "mpp", None, utcnow())
            raw.execute(text("UPDATE queue_recipients SET state = 'held'"))

    def release(self) -> None:
        from sqlalchemy import text

        with self.db.write_core() as conn:
            conn.execute(text("UPDATE queue_recipients SET state = 'queued' WHERE state = 'held'"))

    def clear(self) -> None:
        from sqlalchemy import text

        with self.db.write_core() as conn:
            conn.execute(text("DELETE FROM queue"))


class Postfix:
    """Postfix with its own config directory, relaying everything to the sink."""

    name = "postfix"

    def __init__(self, sink: Sink):
        if shutil.which("postfix") is None:
            raise SystemExit("Postfix is not installed: apt-get install -y postfix")
        folder = temp_folder("bench-relay-postfix-")
        self.conf = folder / "postfix"
        shutil.copytree("/etc/postfix", self.conf)
        if not (self.conf / "main.cf").exists():
            shutil.copy("/usr/share/postfix/main.cf.debian", self.conf / "main.cf")
        self.port = free_port()
        settings = {
            "inet_interfaces": "loopback-only", "myhostname": f"mx.{DOMAIN}", "mydestination": "",
            "relayhost": f"[127.0.0.1]:{sink.port}", "default_transport": "smtp", "mynetworks": "127.0.0.0/8",
            "smtp_tls_security_level": "none", "alias_maps": "", "alias_database": "",
            "compatibility_level": "3.6",
        }
        for key, value in settings.items():
            self.postconf("-e", f"{key} = {value}")
        self.postconf("-M", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd")
        self.postconf("-F", "*/*/chroot = n")
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True, capture_output=True)

    def postconf(self, *args: str) -> None:
        subprocess.run(["postconf", "-c", str(self.conf), *args], check=True)

    def load(self, count: int) -> None:
        self.postconf("-e", "defer_transports = smtp")
        subprocess.run(["postfix", "-c", str(self.conf), "reload"], check=True, capture_output=True)
        with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
            for n in range(count):
                client.sendmail(SENDER, [f"user{n}@{DOMAINS[n % 10]}"], message(n))

    def release(self) -> None:
        self.postconf("-e", "defer_transports =")
        subprocess.run(["postfix", "-c", str(self.conf), "reload"], check=True, capture_output=True)
        subprocess.run(["postqueue", "-c", str(self.conf), "-f"], check=True, capture_output=True)

    def clear(self) -> None:
        subprocess.run(["postsuper", "-c", str(self.conf), "-d", "ALL"], capture_output=True, check=False)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each figure (the median is printed)")
    parser.add_argument("--only", choices=("mailsrv", "postfix"))
    parser.add_argument("--client-cpu", type=int, metavar="N", help="hold this process (the sink) on CPU N")
    args = parser.parse_args()
    raise_fd_limit()
    sink = Sink()
    servers: list = []
    try:
        if args.only != "postfix":
            servers += [Mailsrv(sink, 2), Mailsrv(sink, 8)]
        if args.only != "mailsrv":
            servers.append(Postfix(sink))
        hold_on_cpu(args.client_cpu)
        runs: dict[str, list[float]] = {}
        for round_ in range(args.rounds):  # the servers take turns, so all see the same machine
            for server in servers:
                server.clear()
                server.load(args.messages)
                sink.clear()
                server.release()
                rate = sink.wait(args.messages)
                runs.setdefault(server.name, []).append(rate)
                print(f"  round {round_ + 1}, {server.name}: {rate:.1f} messages/s", flush=True)
    finally:
        for server in servers:
            server.stop()
        sink.stop()
    results = {name: {"relayed messages/s": statistics.median(v)} for name, v in runs.items()}
    print_side_by_side(results, 24, 1)
    if "postfix" in results:
        for name in results:
            if name != "postfix":
                print(f"{name} / postfix: {results[name]['relayed messages/s'] / results['postfix']['relayed messages/s']:.2f}")
    print(f"\n{args.messages} messages of 10 KB to 10 domains, to one local sink; "
          f"{'median of ' + str(args.rounds) + ' rounds' if args.rounds > 1 else 'one round'}")


if __name__ == "__main__":
    main()

