"""The I/O layer every protocol uses: one connection's buffered reading and writing.

A :class:`LineStream` wraps one socket (plain or TLS) and offers what the protocols of
mailsrv read and write:

- command lines with a length limit (:meth:`LineStream.read_line`; an overlong line is
  answered by the caller and the rest of it drained unbuffered);
- dot-terminated text (:meth:`LineStream.read_text`), in two modes: **strict**, for SMTP,
  where only ``CRLF . CRLF`` ends the text and a bare CR or LF anywhere in it makes it
  refused (as Postfix's ``smtpd_forbid_bare_newline``), so no message can smuggle
  another; and **lenient**, for MPP, where a bare LF is a line end (stored as CRLF). In
  both the size limit holds while reading: past it the rest is read and dropped;
- replies: one line, several lines in one write, multi-line coded replies
  (``250-first`` ... ``250 last``), and large bodies in pieces without a joined copy;
- the client side of SMTP-style exchanges over the same buffered stream
  (:meth:`LineStream.read_reply`): a session that turns its connection round (ODMR's
  ATRN) keeps whatever the peer already sent, and the relay uses the same code over a
  socket of its own (:func:`connect`);
- timeouts, set in one place (:meth:`LineStream.set_timeout`), and the TLS upgrade.

A plain socket's reads and writes time out in the kernel (SO_RCVTIMEO, SO_SNDTIMEO)
rather than through Python's socket timeout, which would poll() before every recv and
send. A read that times out raises TimeoutError, as a Python socket timeout would.
"""

from __future__ import annotations

import collections
import ctypes
import io
import itertools
import socket
import ssl
import struct
from dataclasses import dataclass

from .message import dot_stuff_parts, to_crlf

#: how much of an overlong line is read and dropped before the peer is given up on
MAX_DRAIN = 1024 * 1024
#: most buffers one sendmsg() takes (POSIX IOV_MAX on Linux)
IOV_MAX = 1024
#: replies up to this size are first offered to the kernel without giving up the GIL
#: (see SocketWriter); larger ones go through sendall/sendmsg, which give it up
QUICK_SEND_MAX = 65536
#: longest piece of message text looked at at once; longer lines are read in pieces
TEXT_CHUNK = 65536
#: longest reply line read as a client (RFC 5321 section 4.5.3.1.5: 512 with CRLF; be generous)
MAX_REPLY_LINE = 2048
#: most lines of one multi-line reply read as a client
MAX_REPLY_LINES = 100


class _TooLong:
    """Marker returned by :meth:`LineStream.read_line` for an overlong line."""

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG = _TooLong()


@dataclass(frozen=True)
class DotText:
    """Text read up to its lone ".": ``text`` has CRLF line ends and is dot-unstuffed;
    empty when ``too_large`` (past the limit, read and dropped) or ``bare_newline``
    (strict mode: a CR or LF not in a CRLF pair; read and dropped)."""

    text: bytes
    too_large: bool = False
    bare_newline: bool = False


@dataclass(frozen=True)
class Reply:
    """An SMTP-style reply read as a client: its code and the text of each line."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)


class ReplyError(ConnectionError):
    """The peer's reply was not a well-formed SMTP-style reply (or never came)."""


# --- the socket under a stream ---------------------------------------------------------


class SocketReader(io.RawIOBase):
    """The raw reader under a plain stream's buffer: a read that times out in the kernel
    (BlockingIOError from recv) raises TimeoutError."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self._sock = sock
        self.quickack = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            if self.quickack:  # (Linux leaves quick-ACK mode by itself: asked again each read)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            return self._sock.recv_into(buffer)
        except BlockingIOError:
            raise TimeoutError("idle timeout") from None


def _send_keeping_gil():
    """libc's ``send`` called through ``ctypes.PyDLL``, which keeps the GIL during the
    call; None where there is no such function or no MSG_NOSIGNAL (then every write goes
    through Python's sendall)."""
    if not hasattr(socket, "MSG_NOSIGNAL"):
        return None
    try:
        send = ctypes.PyDLL(None, use_errno=True).send
    except (OSError, AttributeError):
        return None
    send.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    send.restype = ctypes.c_ssize_t
    return send


_SEND_KEEPING_GIL = _send_keeping_gil()
_QUICK_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)


class SocketWriter:
    """The writer of a stream: every write is sent whole before it returns (no buffer).

    On a plain socket, Python's ``sendall`` gives the GIL up for the system call and must
    take it back afterwards. While other sessions are busy that costs two thread switches
    per reply, more than the send itself: on loopback a 10 KB reply takes about 20 us in
    the kernel, a hand-over of the GIL and back about as much again. So a reply up to
    QUICK_SEND_MAX octets is first offered to the kernel with a non-blocking ``send`` that
    keeps the GIL; it never waits, it only copies what the socket buffer takes. Whatever
    it did not take (a slow peer, a full buffer, an error to report) goes through
    ``sendall``, which waits without the GIL under the socket's send timeout. Measured
    with ``bench/pop3.py``: 15-20% less server CPU per 10 KB RETR at 8 clients. A TLS
    socket always goes through ``sendall``.
    """

    def __init__(self, sock, quick: bool = True):
        self._sock = sock
        self._quick = quick and _SEND_KEEPING_GIL is not None

    def write(self, data) -> int:
        if self._quick and type(data) is bytes and 0 < len(data) <= QUICK_SEND_MAX:
            sent = _SEND_KEEPING_GIL(self._sock.fileno(), data, len(data), _QUICK_SEND_FLAGS)
            if sent == len(data):
                return sent
            if sent > 0:
                self._sock.sendall(memoryview(data)[sent:])
                return len(data)
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""


def set_kernel_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose reads and writes give up after ``seconds`` (see SocketReader)."""
    sock.settimeout(None)
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


# --- dot-terminated text ---------------------------------------------------------------


def _text_end(window: bytes, strict: bool) -> tuple[int, bool]:
    """Where the line that ends the text (a lone ".") starts in ``window``, less one (the
    LF before it), or -1; and whether a stuffed line (one starting with "." that is not
    the end) came before it. Strict: only ``CRLF . CRLF``; lenient: LF before the "."
    and LF or CRLF after it. One scan: lines starting with "." are rare."""
    stuffed = False
    at = window.find(b"\n.")
    while at >= 0:
        after = window[at + 2 : at + 4]
        if strict:
            if after == b"\r\n" and window[at - 1 : at] == b"\r":
                return at, stuffed
        elif after == b"\r\n" or after[:1] == b"\n":
            return at, stuffed
        if after not in (b"", b"\r"):  # else the window ends before we can tell: next time
            stuffed = True
        at = window.find(b"\n.", at + 2)
    return -1, stuffed


def _has_bare_newline(text: bytes) -> bool:
    """A CR or LF that is not part of a CRLF pair."""
    pairs = text.count(b"\r\n")
    return text.count(b"\n") != pairs or text.count(b"\r") != pairs


def unstuff(raw: bytes, stuffed: bool) -> bytes:
    """Remove the dot that starts a stuffed line (RFC 5321 section 4.5.2)."""
    if not stuffed:
        return raw
    if raw.startswith(b"."):
        raw = raw[1:]
    return raw.replace(b"\n.", b"\n")


# --- the stream ------------------------------------------------------------------------


class LineStream:
    """One connection's reader and writer (see the module docstring)."""

    def __init__(self, sock: socket.socket, *, timeout: float, read_buffer: int = 8192):
        self.sock = sock
        # Each write is a whole reply or command, sent at once: without TCP_NODELAY, a
        # reply that follows another not yet ACKed (a pipelined client: USER, PASS, STAT
        # in one packet) waits for the peer's delayed ACK, 40 ms on Linux (Nagle).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # (not TCP)
            pass
        self.read_buffer = read_buffer
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.timeout = timeout
        self._open(timeout)

    def _open(self, timeout: float) -> None:
        self.set_timeout(timeout)
        if self.tls:
            self.rfile = self.sock.makefile("rb", self.read_buffer)
        else:
            self.rfile = io.BufferedReader(SocketReader(self.sock), self.read_buffer)
        self.wfile = SocketWriter(self.sock, quick=not self.tls)

    def set_timeout(self, seconds: float) -> None:
        """How long a read or a write may wait for the peer (the one place it is set)."""
        self.timeout = seconds
        if self.tls:
            self.sock.settimeout(seconds)
        else:
            set_kernel_timeout(self.sock, seconds)

    def prompt(self) -> None:
        """The peer is not to wait on this side's delayed ACK: on a plain connection,
        what is read is ACKed at once (TCP_QUICKACK, Linux; the writes of every stream
        go out at once, TCP_NODELAY). For a peer that answers in several small writes,
        as a customer relaying its MTA's replies line by line does (fetchmail's ODMR),
        each waiting on the ACK of the one before (Nagle)."""
        raw = getattr(self.rfile, "raw", None)
        if isinstance(raw, SocketReader) and hasattr(socket, "TCP_QUICKACK"):
            raw.quickack = True

    def start_tls(self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None) -> None:
        """Switch to TLS. Whatever the peer sent before the handshake and is still in the
        read buffer is discarded with it (RFC 3207 section 4.2, RFC 2595 section 4)."""
        self.sock.settimeout(self.timeout)
        self.sock = context.wrap_socket(self.sock, server_side=server_side, server_hostname=server_hostname)
        self.tls = True
        self._open(self.timeout)

    # --- reading -----------------------------------------------------------------------

    def read_line(self, limit: int) -> bytes | _TooLong | None:
        """The next line with its line end; TOO_LONG (rest drained) or None at end of input."""
        line = self.rfile.readline(limit + 1)
        if not line:
            return None
        if len(line) > limit:
            if not line.endswith(b"\n"):
                self.drain_line()
            return TOO_LONG
        return line

    def drain_line(self) -> None:
        """Read and drop input up to the next line end (the rest of an overlong line)."""
        drained = 0
        while drained < MAX_DRAIN:
            chunk = self.rfile.readline(8192)
            if not chunk or chunk.endswith(b"\n"):
                return
            drained += len(chunk)
        raise ConnectionAbortedError("line without end")

    def read_text(self, limit: int, *, strict: bool) -> DotText:
        """Read message text up to its lone "." (see the module docstring for the modes).

        The input is looked at where it lies in the read buffer (``peek``) and taken up to
        the end of the "." line exactly, so a command pipelined after it stays for the
        command reader. Past ``limit`` octets the rest is read and dropped. The end of
        input before the "." raises ConnectionAbortedError: the caller keeps nothing.
        """
        kept = bytearray()
        size = 0
        stuffed = False  # a line starting with "." was seen (its dot is removed at the end)
        tail = b"\r\n"  # the end of what was taken before: the text starts at a line start
        while True:
            chunk = self.rfile.peek(TEXT_CHUNK)
            if not chunk:
                raise ConnectionAbortedError("peer left during the message text")
            window = tail + chunk
            end, dots = _text_end(window, strict)
            stuffed = stuffed or dots
            if end >= 0:
                at = end - len(tail) + 1  # where the "." line starts in chunk
                line_end = chunk.index(b"\n", max(at, 0)) + 1
                piece = self.rfile.read(line_end)[: max(at, 0)]
            else:
                piece = self.rfile.read(len(chunk))
            if end >= 0 and at < 0:  # the "." line began in the piece taken before: untake it
                del kept[at:]
                size += at
            size += len(piece)
            if size > limit:
                kept.clear()
            else:
                kept += piece
            if end >= 0:
                break
            tail = (tail + piece)[-4:]
        if size > limit:
            return DotText(b"", too_large=True)
        raw = bytes(kept)
        if strict and _has_bare_newline(raw):
            return DotText(b"", bare_newline=True)
        text = unstuff(raw, stuffed)
        if strict:
            return DotText(text)
        text = to_crlf(text)  # (each bare LF or CR one octet more: the limit holds for what is kept)
        return DotText(b"", too_large=True) if len(text) > limit else DotText(text)

    def read_reply(self) -> Reply:
        """An SMTP-style reply (``250-a``, ``250 b``) read as a client."""
        code, lines = None, []
        while len(lines) < MAX_REPLY_LINES:
            line = self.read_line(MAX_REPLY_LINE)
            if line is None:
                raise ReplyError("connection closed before the reply")
            if line is TOO_LONG:
                raise ReplyError("reply line too long")
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            head, sep = text[:3], text[3:4]
            if not (head.isascii() and head.isdigit()) or sep not in ("", " ", "-"):
                raise ReplyError(f"not a reply: {text[:80]!r}")
            if code is not None and int(head) != code:
                raise ReplyError(f"reply code changed within a reply: {text[:80]!r}")
            code = int(head)
            lines.append(text[4:])
            if sep != "-":
                return Reply(code, tuple(lines))
        raise ReplyError("reply of too many lines")

    # --- writing -----------------------------------------------------------------------

    def write(self, data) -> None:
        self.wfile.write(data)

    def send(self, line: str) -> None:
        """One reply line (CRLF added)."""
        self.wfile.write(line.encode("utf-8") + b"\r\n")

    def send_lines(self, lines: list[str]) -> None:
        """Several lines (each gets its CRLF) in one write."""
        self.wfile.write("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def send_reply(self, code: int | str, lines: str | list[str]) -> None:
        """A coded reply, multi-line when several lines are given (RFC 5321 section
        4.2.1): ``250-first``, ..., ``250 last``, in one write."""
        lines = [lines] if isinstance(lines, str) else list(lines) or [""]
        self.send_lines([f"{code}-{text}" for text in lines[:-1]] + [f"{code} {lines[-1]}"])

    def send_parts(self, parts: list[bytes | memoryview]) -> None:
        """Several pieces as one write: joined when small (one quick send, see
        SocketWriter), else by sendmsg without a joined copy."""
        if self.tls or sum(map(len, parts)) <= QUICK_SEND_MAX:
            self.wfile.write(b"".join(parts))
            return
        views = collections.deque(memoryview(p) for p in parts if len(p))
        while views:
            batch = list(itertools.islice(views, IOV_MAX))
            sent = self.sock.sendmsg(batch)
            while views and sent >= len(views[0]):
                sent -= len(views.popleft())
            if views and sent:
                views[0] = views[0][sent:]

    def send_text(self, text: bytes | memoryview) -> None:
        """Message text as a client sends it after DATA: dot-stuffed, ended by ``CRLF . CRLF``."""
        self.send_parts(dot_stuff_parts(bytes(text)))

    def close(self) -> None:
        for closing in (self.rfile.close, self.sock.close):
            try:
                closing()
            except OSError:
                pass


def accept_tls(sock: socket.socket, context: ssl.SSLContext, *, timeout: float, read_buffer: int) -> LineStream:
    """A server stream over implicit TLS: the handshake, under ``timeout``, comes first."""
    sock.settimeout(timeout)
    return LineStream(context.wrap_socket(sock, server_side=True), timeout=timeout, read_buffer=read_buffer)


def connect(address: tuple[str, int], timeout: float, source: str | None = None) -> LineStream:
    """A client stream over a new connection (the relay's), with the same reading and
    writing as a session's."""
    sock = socket.create_connection(address, timeout=timeout, source_address=(source, 0) if source else None)
    return LineStream(sock, timeout=timeout)
