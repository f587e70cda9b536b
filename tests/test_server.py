"""The server core through a small test protocol: line limits, encodings, state table, budgets,
idle timeout, connection caps, pipelining, TLS (implicit and upgrade), stopping."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time

import pytest

from mailsrv.auth import Authenticator
from mailsrv.config import AuthConfig
from mailsrv.db import Database, DatabaseUnavailable
from mailsrv.migrate import upgrade
from mailsrv.server import (
    ConnectionLimiter,
    LineHandler,
    MailServer,
    ProtocolError,
    ServerContext,
    make_tls_context,
)
from mailsrv.store import Store

from .conftest import LineClient, make_config


class EchoHandler(LineHandler):
    """A test protocol: LOGIN moves from 'start' to 'in'; WHO only works after it."""

    protocol = "echo"
    STATES = {
        "start": frozenset({"ECHO", "LOGIN", "QUIT", "STARTTLS", "CRASH", "DBDOWN", "AUTH", "TURN"}),
        "in": frozenset({"ECHO", "WHO", "QUIT"}),
    }
    INITIAL_STATE = "start"
    MAX_LINE = 64
    LINE_LIMITS = {"AUTH": 12288}
    MAX_BAD_COMMANDS = 5
    REFUSAL = "BUSY too many connections"
    REPLY_UNKNOWN = "ERR unknown command"
    REPLY_WRONG_STATE = "ERR not now"
    REPLY_TOO_LONG = "ERR line too long"
    REPLY_BAD_CHARS = "ERR bad characters"
    REPLY_TOO_MANY_ERRORS = "BYE too many errors"
    REPLY_TIMEOUT = "BYE idle"
    REPLY_INTERNAL = "ERR internal error"
    REPLY_UNAVAILABLE = "ERR try later"
    REPLY_SHUTDOWN = "BYE shutting down"

    def idle_timeout(self) -> float:
        return self.server.test_idle_timeout

    def greet(self) -> None:
        self.send("HELLO")

    def cmd_ECHO(self, arg: str) -> None:
        self.send(f"OK {arg}")

    def cmd_LOGIN(self, arg: str) -> None:
        if not arg:
            raise ProtocolError("ERR LOGIN needs a name")
        self.state = "in"
        self.send("OK in")

    def cmd_WHO(self, arg: str) -> None:
        self.send("OK you")

    def cmd_QUIT(self, arg: str) -> None:
        self.close("BYE")

    def cmd_STARTTLS(self, arg: str) -> None:
        self.send("OK go ahead")
        self.start_tls()

    def cmd_AUTH(self, arg: str) -> None:
        self.send(f"OK {len(arg)}")

    def cmd_TURN(self, arg: str) -> None:
        """Turn round and speak as an SMTP client to the peer (as ODMR's ATRN does)."""
        self.send("OK turning")
        stream = self.turn_round(5.0)
        greeting = stream.read_reply()
        stream.send("EHLO echo.example")
        ehlo = stream.read_reply()
        stream.send_reply(250, [f"greeting {greeting.code} {greeting.text}", f"ehlo {ehlo.code} {'|'.join(ehlo.lines)}"])
        self.close()

    def cmd_CRASH(self, arg: str) -> None:
        raise KeyError("secret-internal-detail")

    def cmd_DBDOWN(self, arg: str) -> None:
        raise DatabaseUnavailable("down")


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture
def context(tmp_path, certificate):
    url = f"sqlite:///{tmp_path / 'core.db'}"
    database = Database(url)
    upgrade(database)
    store = Store(database)
    config = make_config(url, tmp_path)
    tls = make_tls_context(*certificate)
    yield ServerContext(
        config=config, store=store, auth=Authenticator(store, AuthConfig(bcrypt_rounds=4)),
        limiter=ConnectionLimiter(1000, 50), tls_context=tls,
    )
    database.dispose()


@pytest.fixture
def serve(context):
    """Start an EchoHandler server: serve(idle=..., implicit_tls=...) -> MailServer."""
    import threading

    servers = []

    def start(idle: float = 30.0, implicit_tls: bool = False) -> MailServer:
        server = MailServer(("127.0.0.1", 0), EchoHandler, context, implicit_tls=implicit_tls)
        server.test_idle_timeout = idle
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
        server.close_sessions()
        server.wait_sessions(time.monotonic() + 5)


def connect(server, source: str = "127.0.0.1") -> LineClient:
    client = LineClient.__new__(LineClient)
    client.sock = socket.create_connection(server.address, timeout=10, source_address=(source, 0))
    client.file = client.sock.makefile("rb")
    return client


def test_pipelined_lines_are_answered_in_order(serve):
    server = serve()
    with connect(server) as c:
        assert c.line() == "HELLO"
        c.send(b"".join(f"ECHO {i}\r\n".encode() for i in range(200)))
        assert [c.line() for _ in range(200)] == [f"OK {i}" for i in range(200)]


def test_overlong_line_is_answered_and_drained(serve):
    server = serve()
    with connect(server) as c:
        c.line()
        c.send(b"ECHO " + b"x" * 5000 + b"\r\nECHO after\r\n")
        assert c.line() == "ERR line too long"
        assert c.line() == "OK after"
        c.send(b"ECHO " + b"y" * 57 + b"\r\n")  # 64 octets with CRLF: just fits
        assert c.line() == "OK " + "y" * 57
        c.send(b"ECHO " + b"y" * 58 + b"\r\n")  # 65: one too many
        assert c.line() == "ERR line too long"


def test_per_command_line_limit(serve):
    """AUTH may carry a 12 KB SASL initial response; every other command keeps MAX_LINE."""
    server = serve()
    with connect(server) as c:
        c.line()
        assert c.ask(b"AUTH " + b"A" * 12000 + b"\r\n") == "OK 12000"
        assert c.ask(b"ECHO " + b"A" * 12000 + b"\r\n") == "ERR line too long"
        assert c.ask(b"AUTH " + b"A" * 13000 + b"\r\n") == "ERR line too long"
        assert c.ask("ECHO still here") == "OK still here"


def test_turned_round_session_speaks_as_a_client_keeping_what_was_buffered(serve):
    """The peer's 220 arrives in the same packet as its TURN command: it is in the
    session's read buffer when the session turns round, and is read from there."""
    server = serve()
    with connect(server) as c:
        c.line()
        c.send(b"TURN\r\n220 customer.example ESMTP\r\n")
        assert c.line() == "OK turning"
        assert c.line() == "EHLO echo.example"
        c.send(b"250-customer.example\r\n250 PIPELINING\r\n")
        assert c.line() == "250-greeting 220 customer.example ESMTP"
        assert c.line() == "250 ehlo 250 customer.example|PIPELINING"
        assert c.closed()


def test_endless_line_ends_the_session(serve):
    server = serve()
    with connect(server) as c:
        c.line()
        chunk = b"z" * 65536
        try:
            for _ in range(40):  # 2.5 MiB without a line end
                c.sock.sendall(chunk)
        except OSError:
            pass  # the server hung up while we were still sending
        assert c.closed()


@pytest.mark.parametrize("raw", [b"ECHO a\0b\r\n", b"ECHO \xff\xfe\r\n", b"\xc3\x28\r\n"])
def test_nul_and_invalid_utf8_get_a_clear_reply(serve, raw):
    server = serve()
    with connect(server) as c:
        c.line()
        assert c.ask(raw) == "ERR bad characters"
        assert c.ask("ECHO still here") == "OK still here"


def test_state_table_is_checked_before_the_command(serve):
    server = serve()
    with connect(server) as c:
        c.line()
        assert c.ask("WHO") == "ERR not now"
        assert c.ask("FROB") == "ERR unknown command"
        assert c.ask("login ann") == "OK in"  # verbs are case-insensitive
        assert c.ask("LOGIN again") == "ERR not now"
        assert c.ask("WHO") == "OK you"


def test_bad_command_budget_closes_the_session(serve):
    server = serve()
    with connect(server) as c:
        c.line()
        assert c.ask("NOPE") == "ERR unknown command"
        assert c.ask("ECHO fine") == "OK fine"  # good commands do not count
        assert c.ask("LOGIN") == "ERR LOGIN needs a name"
        assert c.ask("WHO") == "ERR not now"
        assert c.ask("") == "ERR unknown command"
        assert c.ask(b"ECHO \0\r\n") == "BYE too many errors"
        assert c.closed()


def test_idle_timeout_says_goodbye_and_closes(serve):
    server = serve(idle=0.3)
    with connect(server) as c:
        assert c.line() == "HELLO"
        assert c.line() == "BYE idle"  # blocks until the server gives up on us
        assert c.closed()


def test_internal_errors_do_not_leak(serve):
    server = serve()
    with connect(server) as c:
        c.line()
        assert c.ask("CRASH") == "ERR internal error"
        assert c.ask("DBDOWN") == "ERR try later"
        assert c.ask("ECHO alive") == "OK alive"


def test_connection_caps_refuse_the_extra_connection_only(serve, context):
    context.limiter.max_per_ip = 2
    context.limiter.max_total = 3
    server = serve()
    first, second = connect(server), connect(server)
    assert first.line() == "HELLO" and second.line() == "HELLO"
    third = connect(server)
    assert third.line() == "BUSY too many connections"
    assert third.closed()
    other_ip = connect(server, source="127.0.0.2")
    assert other_ip.line() == "HELLO"
    over_total = connect(server, source="127.0.0.3")
    assert over_total.line() == "BUSY too many connections"
    assert first.ask("ECHO 1") == "OK 1" and second.ask("ECHO 2") == "OK 2"
    assert other_ip.ask("ECHO 3") == "OK 3"
    for c in (first, second, third, other_ip, over_total):
        c.close()


def test_starttls_discards_pipelined_plaintext(serve):
    server = serve()
    raw = socket.create_connection(server.address, timeout=10)
    reader = raw.makefile("rb")
    assert reader.readline() == b"HELLO\r\n"
    raw.sendall(b"STARTTLS\r\nECHO injected\r\n")
    assert reader.readline() == b"OK go ahead\r\n"
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    tls = client_ctx.wrap_socket(raw, server_hostname="localhost")
    tls_reader = tls.makefile("rb")
    tls.sendall(b"ECHO after\r\n")
    assert tls_reader.readline() == b"OK after\r\n"
    tls.close()


def test_implicit_tls(serve):
    server = serve(implicit_tls=True)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    with client_ctx.wrap_socket(socket.create_connection(server.address, timeout=10), server_hostname="localhost") as tls:
        reader = tls.makefile("rb")
        assert reader.readline() == b"HELLO\r\n"
        tls.sendall(b"ECHO secure\r\n")
        assert reader.readline() == b"OK secure\r\n"


def test_failed_tls_handshake_does_not_disturb_others(serve):
    server = serve(implicit_tls=True)
    with socket.create_connection(server.address, timeout=10) as plain:
        plain.sendall(b"ECHO not tls\r\n")
        try:
            answer = plain.makefile("rb").read()  # a TLS alert at most, then the server hangs up
        except ConnectionResetError:
            answer = b""
        assert b"HELLO" not in answer and b"OK" not in answer
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    with client_ctx.wrap_socket(socket.create_connection(server.address, timeout=10), server_hostname="localhost") as tls:
        assert tls.makefile("rb").readline() == b"HELLO\r\n"


def test_stop_closes_sessions(serve):
    server = serve()
    clients = [connect(server) for _ in range(20)]
    for c in clients:
        assert c.line() == "HELLO"
    server.shutdown()
    server.server_close()
    server.close_sessions()
    assert server.wait_sessions(time.monotonic() + 5)
    for c in clients:
        assert c.line() == "BYE shutting down"
        assert c.closed()
        c.close()


def test_stop_tells_tls_sessions_too(serve):
    """A session over implicit TLS and one upgraded with STARTTLS hear the shutdown reply
    over TLS, then the connection closes."""
    plain, implicit = serve(), serve(implicit_tls=True)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    first = client_ctx.wrap_socket(socket.create_connection(implicit.address, timeout=10), server_hostname="localhost")
    raw = socket.create_connection(plain.address, timeout=10)
    raw.sendall(b"STARTTLS\r\n")
    got = b""
    while got.count(b"\r\n") < 2 and (chunk := raw.recv(4096)):  # (the greeting and the reply may come apart)
        got += chunk
    assert got == b"HELLO\r\nOK go ahead\r\n"
    second = client_ctx.wrap_socket(raw, server_hostname="localhost")
    readers = [first.makefile("rb"), second.makefile("rb")]
    assert readers[0].readline() == b"HELLO\r\n"
    second.sendall(b"ECHO upgraded\r\n")
    assert readers[1].readline() == b"OK upgraded\r\n"
    for server in (plain, implicit):
        server.shutdown()
        server.close_sessions()
        assert server.wait_sessions(time.monotonic() + 5)
    for reader in readers:
        assert reader.readline() == b"BYE shutting down\r\n"
        assert reader.read() == b""
    first.close()
    second.close()


class _RecordingSocket:
    """A real socket whose sendall calls are seen (the writer's fallback)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fell_back = threading.Event()

    def fileno(self) -> int:
        return self.sock.fileno()

    def sendall(self, data) -> None:
        self.fell_back.set()
        self.sock.sendall(data)


def test_session_writer_sends_what_the_socket_takes_then_waits_for_the_rest():
    """A reply larger than the socket buffer: the quick send takes part, sendall the rest
    once the reader reads, and the reader gets every octet once, in order."""
    from mailsrv.stream import QUICK_SEND_MAX, SocketWriter

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * (QUICK_SEND_MAX // 256)
    recording = _RecordingSocket(ours)
    writer = threading.Thread(target=SocketWriter(recording).write, args=(payload,))
    writer.start()
    assert recording.fell_back.wait(10)  # nothing read yet: the quick send cannot take it all
    received = bytearray()
    while len(received) < len(payload):
        received += theirs.recv(65536)
    writer.join()
    assert received == payload
    ours.close()
    theirs.close()


def test_session_writer_reports_a_vanished_peer():
    from mailsrv.stream import SocketWriter

    ours, theirs = socket.socketpair()
    theirs.close()
    with pytest.raises(OSError):
        SocketWriter(ours).write(b"+OK nobody listens\r\n")
    ours.close()
