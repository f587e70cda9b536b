"""Connection floods against a `mailsrv serve` process: 2,000 connections from one address
that send nothing (or a byte and then a byte a second, never ending a line), then 2,000
more from a hundred addresses. The per-address cap and `max_connections` hold, the refused hear the
protocol's refusal line, the server's memory stays under a stated bound, and a login
from another address still succeeds while the first flood is on."""

from __future__ import annotations

import re
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from mailsrv.protocols.pop3 import Pop3Handler

from .conftest import PASSWORD, LineClient
from .test_app import Served, mailsrv, shipped_config_on_ephemeral_ports

ANN = "ann@example.org"
FLOOD = 2000
MAX_CONNECTIONS, PER_ADDRESS = 400, 50
#: the server's resident memory with MAX_CONNECTIONS sessions open may not exceed this
MEMORY_BOUND_MB = 150


class Dripper:
    """Sends a byte a second on every connection it is given (a line that never ends),
    until stopped; a connection the server closed is dropped."""

    def __init__(self):
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def add(self, socks: list[socket.socket]) -> None:
        with self.lock:
            self.socks += socks

    def run(self) -> None:
        while not self.stopped.is_set():
            second = time.monotonic() + 1
            with self.lock:
                socks = list(self.socks)
            for sock in socks:
                try:
                    sock.send(b"U", socket.MSG_DONTWAIT)
                    self.sent += 1
                except OSError:
                    with self.lock:
                        self.socks.remove(sock)
            self.stopped.wait(max(0.0, second - time.monotonic()))  # (the pace of the load)

    def wait_sent(self, more: int) -> None:
        """Until ``more`` bytes more have been sent (each second's round is one each)."""
        target = self.sent + more
        while self.sent < target and self.thread.is_alive():
            self.stopped.wait(0.1)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(10)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def first_lines(socks: list[socket.socket]) -> list[bytes]:
    """The first line each connection got (the greeting, or the refusal)."""
    lines = []
    for sock in socks:
        reader = sock.makefile("rb")
        lines.append(reader.readline())
        reader.close()
    return lines


def flood(address, count: int, sources: list[str], first_byte: bool) -> list[socket.socket]:
    socks = []
    for n in range(count):
        sock = socket.socket()
        sock.settimeout(30)
        sock.bind((sources[n % len(sources)], 0))
        try:
            sock.connect(address)
        except TimeoutError:
            raise AssertionError(f"connection {n} from {sources[n % len(sources)]} not accepted in 30 s") from None
        if first_byte:
            sock.sendall(b"U")  # a byte, and then nothing: a line that never ends
        socks.append(sock)
    return socks


def assert_office_logs_in(address) -> None:
    """A PC of the office, from another address, logs in and is answered."""
    office = LineClient.__new__(LineClient)
    office.sock = socket.socket()
    office.sock.settimeout(10)
    office.sock.bind(("127.0.0.2", 0))
    office.sock.connect(address)
    office.file = office.sock.makefile("rb")
    assert office.line().startswith("+OK")
    office.ask(f"USER {ANN}")
    assert office.ask(f"PASS {PASSWORD}").startswith("+OK")
    assert office.ask("STAT").startswith("+OK 0 ")
    office.ask("QUIT")
    office.close()


@pytest.fixture
def many_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * FLOOD + 1000
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("kind", ["silent", "byte-a-second"])
def test_a_flood_holds_the_caps_and_leaves_room_for_the_office(tmp_path, many_files, kind):
    first_byte = kind != "silent"
    dripper = Dripper() if kind == "byte-a-second" else None
    conf = shipped_config_on_ephemeral_ports(tmp_path)
    text = re.sub(r"(?m)^max_connections = \d+$", f"max_connections = {MAX_CONNECTIONS}", conf.read_text())
    conf.write_text(re.sub(r"(?m)^max_connections_per_ip = \d+$", f"max_connections_per_ip = {PER_ADDRESS}", text))
    assert mailsrv(conf, "domain", "add", "example.org").returncode == 0
    assert mailsrv(conf, "user", "add", ANN, "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    served = Served(conf)
    served.drain()  # (a line per refused connection: thousands)
    opened: list[socket.socket] = []
    try:
        address = served.addresses["pop3"]
        one = flood(address, FLOOD, ["127.0.0.1"], first_byte)
        opened += one
        lines = first_lines(one)
        assert sum(line.startswith(b"+OK") for line in lines) == PER_ADDRESS
        assert lines.count(Pop3Handler.REFUSAL.encode() + b"\r\n") == FLOOD - PER_ADDRESS
        if dripper is not None:  # the sessions dripped into for three seconds, then the office comes
            dripper.add([sock for sock, line in zip(one, lines, strict=True) if line.startswith(b"+OK")])
            dripper.wait_sent(3 * PER_ADDRESS)

        assert_office_logs_in(address)

        many = flood(address, FLOOD, [f"127.0.1.{n}" for n in range(1, 101)], first_byte)
        opened += many
        lines = first_lines(many)
        greeted = sum(line.startswith(b"+OK") for line in lines)
        assert greeted == MAX_CONNECTIONS - PER_ADDRESS  # the total cap, whoever comes
        assert lines.count(Pop3Handler.REFUSAL.encode() + b"\r\n") == FLOOD - greeted
        if dripper is not None:  # every open session dripped into for a few seconds more
            dripper.add([sock for sock, line in zip(many, lines, strict=True) if line.startswith(b"+OK")])
            dripper.wait_sent(3 * MAX_CONNECTIONS)  # three seconds of it
            with dripper.lock:
                assert len(dripper.socks) == MAX_CONNECTIONS  # none cut off for dripping
        assert rss_mb(served.proc.pid) < MEMORY_BOUND_MB
    finally:
        if dripper is not None:
            dripper.stop()
        for sock in opened:
            sock.close()
        assert served.stop(signal.SIGTERM) == 0  # (within 5 s, with every session cut off)
