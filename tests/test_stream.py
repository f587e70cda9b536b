"""The I/O layer (mailsrv.stream) on its own: the strict text reader that SMTP uses (no
smuggling), multi-line coded replies written and read, and a client stream over a new
connection. The lenient reader is MPP's: tests/test_mpp.py drives it."""

from __future__ import annotations

import socket
import threading

import pytest

from mailsrv.stream import LineStream, Reply, ReplyError, connect

from .test_mpp import read_text_with

HEADER = b"From: a@example.org\r\nTo: b@example.org\r\n\r\n"
SMUGGLED = b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nforged\r\n"


def strict(text: bytes, max_size: int = 1 << 20, cut: int | None = None):
    chunks = [text] if cut is None else [text[:cut], text[cut:]]
    (body, too_large, _), rest, bare = read_text_with(chunks, max_size, strict=True)
    return body, too_large, bare, rest


def test_strict_text_ends_only_at_crlf_dot_crlf_across_every_chunk_boundary():
    text = HEADER + b"..stuffed\r\nend.\r\n.x\r\nlast\r\n.\r\nQUIT\r\n"
    for cut in range(1, len(text)):
        body, too_large, bare, rest = strict(text, cut=cut)
        assert body == HEADER + b".stuffed\r\nend.\r\nx\r\nlast\r\n", cut
        assert rest == b"QUIT\r\n" and not too_large and not bare


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"])
def test_strict_text_is_not_ended_by_a_smuggled_end_and_is_refused(fake_end):
    """The 2023 SMTP smuggling forms: a "." between bare line ends does not end the text
    (so the commands after it are text, never commands), and the text is refused for its
    bare CR or LF; only the real CRLF . CRLF ends it, and what follows is left unread."""
    text = HEADER + b"hello" + fake_end + SMUGGLED + b".\r\nNOOP\r\n"
    for cut in range(1, len(text), 7):
        body, too_large, bare, rest = strict(text, cut=cut)
        assert bare and body == b"" and not too_large, cut
        assert rest == b"NOOP\r\n", cut


@pytest.mark.parametrize("line", [b"bare LF\n", b"bare CR\r", b"CR inside\rthe line\r\n", b"\n"])
def test_strict_text_with_any_bare_line_end_is_refused(line):
    body, _, bare, rest = strict(HEADER + line + b"x\r\n.\r\nRSET\r\n")
    assert bare and body == b"" and rest == b"RSET\r\n"


def test_strict_size_limit_holds_while_reading():
    text = HEADER + b"x" * 5000 + b"\r\n" + b"y" * 5000 + b"\r\n.\r\nQUIT\r\n"
    body, too_large, bare, rest = strict(text, max_size=4096)
    assert too_large and body == b"" and rest == b"QUIT\r\n"
    assert strict(b".\r\nNOOP\r\n") == (b"", False, False, b"NOOP\r\n")  # an empty text


def test_strict_peer_leaving_mid_text_raises():
    with pytest.raises(ConnectionAbortedError):
        strict(HEADER + b"half\r\n.")


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    stream, peer = LineStream(ours, timeout=10), LineStream(theirs, timeout=10)
    yield stream, peer, theirs
    stream.close()
    peer.close()


def test_multiline_reply_is_written_and_read(pair):
    stream, peer, raw = pair
    stream.send_reply(250, ["mail.example.org", "PIPELINING", "SIZE 1000"])
    stream.send_reply("354", "go ahead")
    stream.send_reply(221, [])
    assert raw.recv(4096) == b"250-mail.example.org\r\n250-PIPELINING\r\n250 SIZE 1000\r\n354 go ahead\r\n221 \r\n"
    stream.send_reply(250, ["a", "b"])
    stream.send_reply(550, "5.1.1 no such user")
    assert peer.read_reply() == Reply(250, ("a", "b"))
    assert peer.read_reply() == Reply(550, ("5.1.1 no such user",))


@pytest.mark.parametrize("reply", [b"hello\r\n", b"25 short\r\n", b"250-a\r\n251 b\r\n", b"250_x\r\n", b"250-a\r\n"])
def test_malformed_replies_raise(pair, reply):
    stream, peer, raw = pair
    stream.write(reply)
    stream.close()
    with pytest.raises(ReplyError):
        peer.read_reply()


def test_text_sent_as_a_client_is_stuffed_and_ended(pair):
    stream, peer, _ = pair
    stream.send_text(b".starts with a dot\r\nplain\r\n")
    stream.send_text(b"no final line end")
    assert peer.read_text(1 << 20, strict=True).text == b".starts with a dot\r\nplain\r\n"
    assert peer.read_text(1 << 20, strict=True).text == b"no final line end\r\n"


def test_connect_gives_a_client_stream_over_a_new_socket():
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def server() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"220-mx.example\r\n220 ready\r\n")
            seen.append(conn.makefile("rb").readline())
            conn.sendall(b"221 bye\r\n")

    thread = threading.Thread(target=server)
    thread.start()
    client = connect(listener.getsockname(), timeout=10)
    assert client.read_reply() == Reply(220, ("mx.example", "ready"))
    client.send("QUIT")
    assert client.read_reply().code == 221
    client.close()
    thread.join(10)
    listener.close()
    assert seen == [b"QUIT\r\n"]


def test_every_stream_sends_at_once():
    """Nagle off on every stream: a reply that follows one not yet ACKed (a pipelining
    client's USER, PASS and STAT) must not wait for the client's delayed ACK."""
    listener = socket.create_server(("127.0.0.1", 0))
    theirs = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    LineStream(ours, timeout=5)
    assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    client = connect(listener.getsockname(), timeout=5)  # (and the client side's)
    assert client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    for s in (theirs, ours, listener, client.sock):
        s.close()


def test_a_prompt_stream_acks_at_once_and_still_reads():
    """An ODMR turn's stream (LineStream.prompt): each read asks for a quick ACK, so a
    customer that relays its MTA's replies line by line is not held up."""
    listener = socket.create_server(("127.0.0.1", 0))
    theirs = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    stream = LineStream(ours, timeout=5)
    assert stream.rfile.raw.quickack is False
    stream.prompt()
    assert stream.rfile.raw.quickack == hasattr(socket, "TCP_QUICKACK")
    theirs.sendall(b"250-first\r\n")
    theirs.sendall(b"250 second\r\n")
    assert stream.read_reply() == Reply(250, ("first", "second"))
    for s in (theirs, ours, listener):
        s.close()
