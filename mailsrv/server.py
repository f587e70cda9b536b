"""The server core every protocol uses: MailServer and LineHandler.

``MailServer`` is a ``socketserver.ThreadingTCPServer``: one thread per connection, with a
small stack so that thousands of sessions fit. Before a thread is spawned it enforces
``[server] max_connections`` (all protocols together) and ``max_connections_per_ip``; a
connection over a cap gets the handler's ``REFUSAL`` line and is closed at once.

``LineHandler`` is the base of every protocol handler. Methods and attributes a protocol
may override (the extension points, as socketserver's ``BaseServer`` lists its own):

- ``protocol``: the short name used in logs (``pop3``).
- ``STATES``: state -> the set of command verbs allowed in it, copied from the RFC.
  Checked before any command method runs. ``INITIAL_STATE`` is the state at connect.
- ``cmd_VERB(self, arg)``: one method per command; ``arg`` is everything after the first
  space (never None). Raise :class:`ProtocolError` with the reply to refuse.
- ``MAX_LINE``: longest command line accepted, line end included. A longer line is read
  up to the limit + 1, answered with ``REPLY_TOO_LONG`` and the rest drained unbuffered.
- ``LINE_LIMITS``: verb -> a longer limit for that command alone (an AUTH line carrying a
  SASL initial response); other verbs keep ``MAX_LINE``.
- ``READ_BUFFER``: the size of a plain session's read buffer. Every open session keeps
  one, so protocols of short command lines keep it small; one that reads message text
  (MPP) wants it large, for fewer reads.
- ``MAX_BAD_COMMANDS``: unknown, wrong-state, malformed or overlong commands allowed
  before the session is closed with ``REPLY_TOO_MANY_ERRORS``.
- ``idle_timeout()``: seconds of client silence before ``REPLY_TIMEOUT`` and hang-up.
- ``greet()``: called once when the session starts (send the greeting).
- ``on_close()``: called once when the session ends, however it ends (release locks).
- ``REPLY_*``, ``REFUSAL`` and ``BANNED`` (to an address banned after failed logins,
  ``[auth] ban_after``): the protocol's replies for the situations above;
  ``REPLY_SHUTDOWN`` is said to a session cut off because the server stops (``421`` in
  the SMTP-style protocols, ``-ERR`` in POP3 and POP).

The reading and writing (lines, dot-terminated text, multi-line replies, timeouts, TLS,
turning a connection round) is one :class:`~mailsrv.stream.LineStream` per session: see
:mod:`mailsrv.stream`. A handler reads and writes through the methods below, never the
socket.

Every session event is logged with the peer address; passwords never are.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from . import metrics
from .auth import Authenticator, auth_log
from .config import Config
from .db import DatabaseUnavailable
from .store import Store
from .stream import TOO_LONG, DotText, LineStream, _TooLong, accept_tls

if TYPE_CHECKING:
    from .delivery.worker import DeliveryPool

#: the stack of a session thread: small so that thousands fit (Python 3.11 does not use
#: the C stack for Python-to-Python calls, so this is plenty)
THREAD_STACK_SIZE = 512 * 1024
#: how long a refused connection may take to receive its one line
REFUSAL_TIMEOUT = 1.0

log = logging.getLogger("mailsrv.server")


class ProtocolError(Exception):
    """Raised anywhere in a command: ``reply`` is sent and the session goes on.

    ``bad`` counts the command against the bad-command budget; ``close`` ends the session
    after the reply.
    """

    def __init__(self, reply: str, *, bad: bool = True, close: bool = False):
        super().__init__(reply)
        self.reply = reply
        self.bad = bad
        self.close = close


class ConnectionLimiter:
    """Counts open connections in total and per peer address, across all servers."""

    def __init__(self, max_total: int, max_per_ip: int):
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, ip: str) -> bool:
        with self._lock:
            if self.total >= self.max_total or self.per_ip.get(ip, 0) >= self.max_per_ip:
                return False
            self.total += 1
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            return True

    def release(self, ip: str) -> None:
        with self._lock:
            self.total -= 1
            left = self.per_ip.get(ip, 1) - 1
            if left:
                self.per_ip[ip] = left
            else:
                self.per_ip.pop(ip, None)


@dataclass
class ServerContext:
    """What every session of every server shares."""

    config: Config
    store: Store
    auth: Authenticator
    limiter: ConnectionLimiter
    tls_context: ssl.SSLContext | None = None
    delivery: DeliveryPool | None = None  # the workers, when this process runs them
    sessions_changed: Callable[[], None] | None = None  # told when a session opens or closes

    @property
    def hostname(self) -> str:
        return self.config.server.hostname

    def post(self, sender: str, body: bytes, recipients, origin: str, account_id: int | None = None) -> int:
        """Queue a message a session accepted; return its queue id. With delivery workers
        running here, local recipients are delivered in the same transaction and a worker
        is woken for the rest (:meth:`DeliveryPool.post`); without, it is only queued, for
        the workers of another process."""
        if self.delivery is not None:
            queue_id = self.delivery.post(sender, body, recipients, origin, account_id)
        else:
            queue_id = self.store.queue.enqueue(sender, body, recipients, origin, account_id)
        metrics.ACCEPTED.labels(origin).inc()
        return queue_id


def make_tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # a read that meets the end of the connection without the peer's close_notify (a
    # client that just hangs up, or our own stop cutting the session's reading off) is
    # the end of input, not a fatal error: the session can still say goodbye over TLS
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    context.load_cert_chain(certfile, keyfile)
    return context


class MailServer(socketserver.ThreadingTCPServer):
    """A listening socket for one protocol; one thread per session.

    Override points: ``handler_class.REFUSAL`` (the line sent when a cap is reached).
    """

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 512

    def __init__(
        self,
        address: tuple[str, int],
        handler_class: type[LineHandler],
        context: ServerContext,
        *,
        implicit_tls: bool = False,
    ):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.context = context
        self.implicit_tls = implicit_tls
        self.sessions: set[LineHandler] = set()
        self._session_threads: set[threading.Thread] = set()
        self._sessions_lock = threading.Lock()
        self._sessions_done = threading.Condition(self._sessions_lock)
        threading.stack_size(THREAD_STACK_SIZE)
        super().__init__(address, handler_class)
        self.name = f"{handler_class.protocol}{'s' if implicit_tls else ''}"
        self.handler_protocol = handler_class.protocol

    @property
    def address(self) -> tuple[str, int]:
        return self.server_address[:2]

    def process_request(self, request, client_address):
        ip = client_address[0]
        if self.context.auth.banned(ip):
            log.info("%s [%s] refused: banned after failed logins", self.name, show_address(client_address))
            self._refuse(request, self.RequestHandlerClass.BANNED)
            return
        if not self.context.limiter.acquire(ip):
            log.warning("%s [%s] refused: connection limit reached", self.name, show_address(client_address))
            self._refuse(request)
            return
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self._sessions_lock:
            self._session_threads.add(thread)
        try:
            thread.start()
        except RuntimeError:  # cannot start a new thread: out of resources
            with self._sessions_lock:
                self._session_threads.discard(thread)
            self.context.limiter.release(ip)
            self._refuse(request)

    def _refuse(self, request, line: str | None = None) -> None:
        try:
            if not self.implicit_tls:
                LineStream(request, timeout=REFUSAL_TIMEOUT, read_buffer=64).send(line or self.RequestHandlerClass.REFUSAL)
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.context.limiter.release(client_address[0])
            with self._sessions_lock:
                self._session_threads.discard(threading.current_thread())
                self._sessions_done.notify_all()

    def handle_error(self, request, client_address):
        log.exception("%s [%s] session failed", self.name, show_address(client_address))

    def register(self, handler: LineHandler, active: bool) -> None:
        with self._sessions_lock:
            (self.sessions.add if active else self.sessions.discard)(handler)
        if self.context.sessions_changed is not None:
            self.context.sessions_changed()

    def close_sessions(self, force: bool = False) -> None:
        """End every open session: each says its REPLY_SHUTDOWN and ends on its own
        (``force``: its connection is cut off, for sessions that did not end in time)."""
        with self._sessions_lock:
            handlers = list(self.sessions)
        for handler in handlers:
            handler.abort(force)

    def wait_sessions(self, deadline: float) -> bool:
        """Wait until every session thread has ended or ``deadline`` (monotonic) passes."""
        with self._sessions_done:
            while self._session_threads:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._sessions_done.wait(remaining)
        return True


def show_address(address) -> str:
    """``host:port``, with an IPv6 host in brackets (logs, ``server_processes``, ``check``)."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LineHandler(socketserver.BaseRequestHandler):
    """The base of every protocol handler: see the module docstring for what to override."""

    protocol: ClassVar[str] = "line"
    STATES: ClassVar[dict[str, frozenset[str]]] = {}
    INITIAL_STATE: ClassVar[str] = ""
    MAX_LINE: ClassVar[int] = 512
    LINE_LIMITS: ClassVar[dict[str, int]] = {}
    READ_BUFFER: ClassVar[int] = 1024
    MAX_BAD_COMMANDS: ClassVar[int] = 10

    REFUSAL: ClassVar[str] = "too many connections"
    BANNED: ClassVar[str] = "too many failed logins from your address, try again later"
    REPLY_UNKNOWN: ClassVar[str] = "unknown command"
    REPLY_WRONG_STATE: ClassVar[str] = "command not allowed now"
    REPLY_TOO_LONG: ClassVar[str] = "line too long"
    REPLY_BAD_CHARS: ClassVar[str] = "invalid characters in command"
    REPLY_TOO_MANY_ERRORS: ClassVar[str] = "too many errors, closing"
    REPLY_TIMEOUT: ClassVar[str] = "idle for too long, closing"
    REPLY_INTERNAL: ClassVar[str] = "internal error"
    REPLY_UNAVAILABLE: ClassVar[str] = "temporary failure, try again later"
    REPLY_SHUTDOWN: ClassVar[str] = "server shutting down"

    commands: ClassVar[dict[str, Callable]] = {}
    longest_line: ClassVar[int] = 512

    server: MailServer
    stream: LineStream | None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.commands = {
            name[4:]: getattr(cls, name) for name in dir(cls) if name.startswith("cmd_")
        }
        for state, verbs in cls.STATES.items():
            missing = set(verbs) - set(cls.commands)
            if missing:
                raise TypeError(f"{cls.__name__}: state {state} allows {missing} with no cmd_ method")
        cls.longest_line = max([cls.MAX_LINE, *cls.LINE_LIMITS.values()])

    # --- lifecycle -------------------------------------------------------------------

    def setup(self) -> None:
        self.context: ServerContext = self.server.context
        self.config: Config = self.context.config
        self.store: Store = self.context.store
        self.auth: Authenticator = self.context.auth
        self.peer_ip: str = self.client_address[0]
        self.peer: str = show_address(self.client_address)
        self.state: str = self.INITIAL_STATE
        self.bad_commands = 0
        self.closing = False
        self.stopping = False
        self.tls_active = False
        self.started = time.monotonic()
        self.log = logging.getLogger(f"mailsrv.{self.protocol}")
        self.stream = None
        try:
            if self.server.implicit_tls:
                self.stream = accept_tls(
                    self.request, self.context.tls_context, timeout=self.idle_timeout(), read_buffer=self.READ_BUFFER
                )
                self.tls_active = True
            else:
                self.stream = LineStream(self.request, timeout=self.idle_timeout(), read_buffer=self.READ_BUFFER)
        except (OSError, ssl.SSLError) as exc:
            self.log.info("[%s] TLS handshake failed: %s", self.peer, exc)

    def handle(self) -> None:
        if self.stream is None:
            return
        self.server.register(self, True)
        metrics.SESSIONS.labels(self.protocol).inc()
        self.log.info("[%s] connect%s", self.peer, " (TLS)" if self.tls_active else "")
        try:
            self.greet()
            while not self.closing:
                line = self.read_line(self.longest_line)
                if line is None:
                    if self.stopping:
                        self.log.info("[%s] cut off: server stopping", self.peer)
                        self.send_quietly(self.REPLY_SHUTDOWN)
                    else:
                        self.log.info("[%s] connection closed by client", self.peer)
                    break
                self.dispatch(line)
        except (TimeoutError, BlockingIOError):
            self.log.info("[%s] idle timeout", self.peer)
            self.send_quietly(self.REPLY_TIMEOUT)
        except (OSError, ssl.SSLError, ValueError) as exc:
            if self.stopping:
                self.log.info("[%s] cut off: server stopping", self.peer)
                self.send_quietly(self.REPLY_SHUTDOWN)
            elif not self.closing:
                self.log.info("[%s] connection lost: %s", self.peer, exc)
        finally:
            try:
                self.on_close()
            except Exception:
                self.log.exception("[%s] cleanup failed", self.peer)
            self.server.register(self, False)
            self.log.info(
                "[%s] disconnect after %.1fs", self.peer, time.monotonic() - self.started
            )

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.close()
        try:
            self.request.close()
        except OSError:
            pass

    def abort(self, force: bool = False) -> None:
        """Called from another thread to end this session (server stop): its reads see the
        end of input, and the session thread says REPLY_SHUTDOWN and ends. ``force`` also
        cuts off writing, for a session that did not end in time."""
        self.stopping = True
        sock = self.stream.sock if self.stream is not None else self.request
        try:  # (socket's own shutdown: on a TLS socket too, below its TLS layer)
            socket.socket.shutdown(sock, socket.SHUT_RDWR if force else socket.SHUT_RD)
        except OSError:
            pass

    # --- extension points ------------------------------------------------------------

    def idle_timeout(self) -> float:
        return 600.0

    def greet(self) -> None:
        """Send the greeting (override)."""

    def on_close(self) -> None:
        """Release what the session holds (override); runs once however the session ends."""

    # --- reading and writing: the session's LineStream -------------------------------

    @property
    def tls_version(self) -> str | None:
        """The TLS version and cipher in use (for trace fields), or None."""
        if not self.tls_active:
            return None
        cipher = self.stream.sock.cipher()
        return f"{self.stream.sock.version()} {cipher[0] if cipher else ''}".strip()

    def read_line(self, limit: int | None = None) -> bytes | _TooLong | None:
        """The next line with its line end; TOO_LONG (rest drained) or None at end of input."""
        try:
            return self.stream.read_line(limit or self.MAX_LINE)
        except ConnectionAbortedError:
            self.closing = True
            raise

    def read_text(self, limit: int, *, strict: bool) -> DotText:
        """Message text up to its lone "." (:meth:`LineStream.read_text`)."""
        return self.stream.read_text(limit, strict=strict)

    def sasl_response(self, prompt: str, limit: int, too_long: str) -> str:
        """Send a SASL challenge line (``+ ...`` in POP3, ``334 ...`` in SMTP) and return
        the client's answer, stripped; ``too_long`` answers a line over ``limit``."""
        self.send(prompt)
        line = self.read_line(limit)
        if line is None:
            raise ConnectionAbortedError("client left during AUTH")
        if line is TOO_LONG:
            raise ProtocolError(too_long)
        return line.decode("ascii", "replace").strip()

    def login_checked(self, account, name: str, mechanism: str) -> bool:
        """After a password or digest was checked: True when ``account`` (None: the check
        failed) is logged in. Each failure is logged in one format on every protocol,
        ``login failed: protocol=P mechanism=M rhost=ADDRESS user="NAME"`` (the name as a
        JSON string, so nothing in it can pass for another field; never the password),
        counted, and answered only after the failure delay."""
        if account is None:
            auth_log.warning("login failed: protocol=%s mechanism=%s rhost=%s user=%s",
                             self.protocol, mechanism, self.peer_ip, json.dumps(name[:100]))
            metrics.LOGINS.labels(self.protocol, mechanism, "failed").inc()
            self.auth.fail(self.peer_ip, f"on {self.protocol} as {json.dumps(name[:100])}")
            if self.auth.banned(self.peer_ip):
                self.closing = True  # (this was the failure too many: the session ends after its reply)
            return False
        self.auth.succeeded(self.peer_ip)
        metrics.LOGINS.labels(self.protocol, mechanism, "ok").inc()
        return True

    def send(self, line: str) -> None:
        """Send one reply line (CRLF added)."""
        self.stream.send(line)

    def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        self.stream.write(data)

    def send_lines(self, lines: list[str]) -> None:
        """Send several reply lines (each gets its CRLF) in one write."""
        self.stream.send_lines(lines)

    def send_reply(self, code: int | str, lines: str | list[str]) -> None:
        """A coded reply, multi-line when several lines are given (``250-a``, ``250 b``)."""
        self.stream.send_reply(code, lines)

    def send_parts(self, parts: list[bytes]) -> None:
        """Send several pieces as one write (:meth:`LineStream.send_parts`)."""
        self.stream.send_parts(parts)

    def send_quietly(self, line: str) -> None:
        try:
            self.send(line)
        except (OSError, ValueError, ssl.SSLError):
            pass

    def close(self, reply: str | None = None) -> None:
        """Send a last reply (if any) and end the session after this command."""
        if reply is not None:
            self.send(reply)
        self.closing = True

    # --- dispatch --------------------------------------------------------------------

    def dispatch(self, raw: bytes | _TooLong) -> None:
        """Check a command line against the state table and run it."""
        if raw is TOO_LONG:
            return self.bad_command(self.REPLY_TOO_LONG)
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
        if b"\0" in line:
            return self.bad_command(self.REPLY_BAD_CHARS)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self.bad_command(self.REPLY_BAD_CHARS)
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if len(raw) > self.LINE_LIMITS.get(verb, self.MAX_LINE):
            return self.bad_command(self.REPLY_TOO_LONG)
        method = self.commands.get(verb)
        if method is None:
            return self.bad_command(self.REPLY_UNKNOWN)
        if verb not in self.STATES.get(self.state, ()):
            return self.bad_command(self.REPLY_WRONG_STATE)
        self.run_command(verb, method, arg)

    def run_command(self, verb: str, method: Callable, arg: str) -> None:
        try:
            method(self, arg)
        except ProtocolError as exc:
            if exc.bad:
                self.bad_command(exc.reply)
            else:
                self.send(exc.reply)
            if exc.close:
                self.closing = True
        except DatabaseUnavailable as exc:
            self.log.warning("[%s] %s: database unavailable: %s", self.peer, verb, exc)
            self.send(self.REPLY_UNAVAILABLE)
        except (OSError, ssl.SSLError):
            raise
        except Exception:
            self.log.exception("[%s] %s failed", self.peer, verb)
            self.send(self.REPLY_INTERNAL)

    def bad_command(self, reply: str) -> None:
        """Answer a bad command; past the budget, close the session instead."""
        self.bad_commands += 1
        if self.bad_commands >= self.MAX_BAD_COMMANDS:
            self.log.info("[%s] too many bad commands", self.peer)
            self.close(self.REPLY_TOO_MANY_ERRORS)
        else:
            self.send(reply)

    # --- TLS upgrade and turning round -----------------------------------------------

    def start_tls(self) -> None:
        """Switch the connection to TLS (after the protocol's go-ahead reply was sent).

        Whatever the client pipelined after the command is in the old read buffer and is
        discarded with it (RFC 3207 section 4.2, RFC 2595 section 4).
        """
        self.stream.start_tls(self.context.tls_context, server_side=True)
        self.tls_active = True
        self.log.info("[%s] TLS started", self.peer)

    def turn_round(self, timeout: float) -> LineStream:
        """Turn the connection round (ODMR's ATRN, RFC 2645 section 4): from now on this
        session speaks as a client over the same stream, whose read buffer keeps whatever
        the peer has already sent; ``timeout`` is how long each read or write may wait."""
        self.stream.set_timeout(timeout)
        self.stream.prompt()  # (it waits on each reply: no delayed ACK may hold one up)
        self.log.info("[%s] connection turned round", self.peer)
        return self.stream
