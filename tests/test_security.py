"""No password without TLS when `plaintext_networks` is empty, on every protocol, and the
capabilities say so; TLS 1.2 at least (1.0 and 1.1 refused); TLS with real clients
(curl --ssl-reqd, mpop with TLS, swaks --tls, fetchmail with TLS)."""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest

from mailsrv.protocols.odmr import OdmrHandler
from mailsrv.protocols.smtp import SubmissionHandler

from .conftest import PASSWORD, LineClient
from .test_server import certificate  # noqa: F401  (fixture)

ANN = "ann@example.org"
LOOPBACK = (("127.0.0.1", 0),)
PLAIN = base64.b64encode(f"\0{ANN}\0{PASSWORD}".encode()).decode()


@pytest.fixture
def guarded(make_app, certificate):  # noqa: F811
    """Every protocol on, TLS configured, and no network where passwords may go in the clear."""
    cert, key = certificate
    return make_app(auth={"plaintext_networks": (), "bcrypt_rounds": 4, "failure_delay": 0.0},
                    tls={"certfile": cert, "keyfile": key},
                    pop3={"listen": LOOPBACK, "listen_tls": LOOPBACK}, mpp={"listen": LOOPBACK, "listen_tls": LOOPBACK},
                    smtp={"listen": (), "submission": LOOPBACK}, odmr={"listen": LOOPBACK})


def trusting() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def ehlo(c: LineClient) -> list[str]:
    c.send("EHLO pc.example.org")
    lines = [c.line()]
    while lines[-1][3:4] == "-":
        lines.append(c.line())
    return [line[4:] for line in lines]


def test_no_password_crosses_without_tls_on_any_protocol(guarded):
    c = LineClient(guarded.address("pop"))  # RFC 918 has no TLS: with no plaintext network, no login
    c.line()
    c.ask(f"USER {ANN}")
    assert c.ask(f"PASS {PASSWORD}").startswith("-")
    c.close()

    c = LineClient(guarded.address("mpp"))
    c.line()
    c.ask(f"USER {ANN}")
    assert c.ask(f"PASS {PASSWORD}") == "530 Authentication Failure: passwords need TLS from your network."
    c.close()
    with socket.create_connection(guarded.address("mpps"), timeout=10) as raw:  # MPP over implicit TLS
        with trusting().wrap_socket(raw) as tls:
            c = LineClient.__new__(LineClient)
            c.sock, c.file = tls, tls.makefile("rb")
            c.line()
            c.ask(f"USER {ANN}")
            assert c.ask(f"PASS {PASSWORD}").startswith("250")

    c = LineClient(guarded.address("submission"))
    c.line()
    offered = ehlo(c)
    assert "STARTTLS" in offered and not any(line.startswith("AUTH") and "PLAIN" in line for line in offered)
    assert c.ask(f"AUTH PLAIN {PLAIN}") == SubmissionHandler.REPLY_ENCRYPTION_REQUIRED
    c.close()
    with smtplib.SMTP(*guarded.address("submission"), timeout=10) as client:
        client.starttls(context=trusting())
        assert client.login(ANN, PASSWORD)[0] == 235

    c = LineClient(guarded.address("odmr"))
    c.line()
    offered = ehlo(c)
    assert "AUTH CRAM-MD5" in offered and "STARTTLS" in offered  # CRAM-MD5 sends no password
    assert c.ask(f"AUTH PLAIN {PLAIN}") == OdmrHandler.REPLY_ENCRYPTION_REQUIRED
    c.close()

    c = LineClient(guarded.address("pop3"))
    c.line()
    assert c.ask(f"USER {ANN}").startswith("-ERR [AUTH]")
    assert c.ask(f"AUTH PLAIN {PLAIN}").startswith("-ERR [AUTH]")
    c.close()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_before_1_2_is_refused_and_1_2_taken(guarded, version):
    """The client offers only the old version; the refusal is the server's own alert."""
    old = trusting()
    old.minimum_version = old.maximum_version = version
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # (so that our own OpenSSL would offer it at all)
    new = trusting()
    new.minimum_version = new.maximum_version = ssl.TLSVersion.TLSv1_2
    for name in ("pop3s", "mpps"):
        with socket.create_connection(guarded.address(name), timeout=10) as raw:
            with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
                old.wrap_socket(raw)
        with socket.create_connection(guarded.address(name), timeout=10) as raw:
            with new.wrap_socket(raw) as tls:
                assert tls.version() == "TLSv1.2"
    with socket.create_connection(guarded.address("pop3"), timeout=10) as raw:  # STLS
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"STLS\r\n")
        assert reader.readline().startswith(b"+OK")
        with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
            old.wrap_socket(raw)


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed")
    return path


@pytest.mark.interop
def test_real_clients_read_mail_over_tls_only(guarded, store, tmp_path):
    body = b"Subject: over TLS\r\n\r\nsecret plans\r\n"
    store.maildrops.deliver_local(store.directory.find_account(ANN).id, body)
    host, port = guarded.address("pop3")
    _, tls_port = guarded.address("pop3s")
    for url in (f"pop3://{host}:{port}/1", f"pop3s://{host}:{tls_port}/1"):
        result = subprocess.run([need("curl"), "-s", "-S", "-k", "--ssl-reqd", "-u", f"{ANN}:{PASSWORD}", url],
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.replace(b"\r\n", b"\n") == body.replace(b"\r\n", b"\n")
    without = subprocess.run([need("curl"), "-s", "-S", "-u", f"{ANN}:{PASSWORD}", f"pop3://{host}:{port}/1"],
                             capture_output=True, timeout=60)
    assert without.returncode != 0  # (no TLS: the password is refused)

    for starttls, used_port in (("on", port), ("off", tls_port)):
        maildir = tmp_path / f"Maildir-{starttls}"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        rc = tmp_path / f"mpoprc-{starttls}"
        rc.write_text(f"account default\nhost {host}\nport {used_port}\nuser {ANN}\npassword {PASSWORD}\n"
                      f"tls on\ntls_starttls {starttls}\ntls_certcheck off\nkeep on\ndelivery maildir {maildir}\n"
                      f"uidls_file {tmp_path / ('uidls-' + starttls)}\n")
        rc.chmod(0o600)
        result = subprocess.run([need("mpop"), "-C", str(rc), "default"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        (got,) = [p.read_bytes() for p in (maildir / "new").iterdir()]
        assert got.replace(b"\r\n", b"\n").endswith(b"secret plans\n")

    home = tmp_path / "fetchmail-home"
    home.mkdir()
    rc = home / ".fetchmailrc"
    saver = tmp_path / "fetched"
    rc.write_text(f'poll {host} protocol pop3 service {tls_port} user "{ANN}" password "{PASSWORD}" ssl'
                  f' sslproto TLS1.2+ no sslcertck keep fetchall mda "cat >> {saver}"\n')
    rc.chmod(0o600)
    result = subprocess.run([need("fetchmail"), "-f", str(rc), "-N", "--nosyslog"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HOME": str(home)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"secret plans" in saver.read_bytes()


# --- auto-ban -----------------------------------------------------------------------------


def odmr_login(address, secret: str, user: str = ANN) -> tuple[LineClient, str]:
    """An ODMR session and its answer to one CRAM-MD5 login as ``user`` (its greeting
    instead, when that is not 220: a refusal)."""
    from mailsrv.auth import cram_md5_digest

    c = LineClient(address)
    greeting = c.line()
    if not greeting.startswith("220"):
        return c, greeting
    ehlo(c)
    challenge = base64.b64decode(c.ask("AUTH CRAM-MD5")[4:])
    return c, c.ask(base64.b64encode(f"{user} {cram_md5_digest(secret, challenge)}".encode()).decode())


def test_failed_logins_ban_the_address_everywhere_until_lifted(make_app, store, db_url, tmp_path, capsys,
                                                                monkeypatch):
    from mailsrv import auth as authmod
    from mailsrv import cli
    from mailsrv.protocols.pop3 import Pop3Handler
    from mailsrv.protocols.smtp import SmtpHandler

    monkeypatch.setattr(authmod, "BAN_REFRESH", 0.0)  # (the server reads the bans again at every connection)
    app = make_app(auth={"plaintext_networks": (), "never_ban": (), "ban_after": 3, "bcrypt_rounds": 4,
                         "failure_delay": 0.0}, odmr={"listen": LOOPBACK})
    for attempt in range(3):
        c, reply = odmr_login(app.address("odmr"), "wrong")
        assert reply.startswith("535")
        if attempt == 2:  # the third failure ends its session too
            assert c.line() == ""
        c.close()
    c = LineClient(app.address("pop3"))
    assert c.line() == Pop3Handler.BANNED  # every protocol refuses the address now
    assert c.line() == ""
    c, reply = odmr_login(app.address("odmr"), PASSWORD)
    assert reply == SmtpHandler.BANNED  # (the right secret too)

    (ban,) = store.bans.active()
    assert (ban.address, ban.failures) == ("127.0.0.1", 3)
    assert ban.reason == f'3 failed logins in a row, the last on odmr as "{ANN}"'
    conf = tmp_path / "cli.conf"
    conf.write_text(f"[server]\ndatabase = {db_url}\n")
    capsys.readouterr()
    assert cli.main(["-c", str(conf), "ban", "list"]) == 0
    listing = capsys.readouterr().out
    assert "127.0.0.1" in listing and "3 failed logins in a row" in listing
    assert cli.main(["-c", str(conf), "ban", "del", "127.0.0.1"]) == 0
    assert cli.main(["-c", str(conf), "ban", "del", "127.0.0.1"]) == 1  # (not banned any more)

    for _ in range(500):  # served again once the server has read the bans again (a thread does)
        c, reply = odmr_login(app.address("odmr"), PASSWORD)
        c.close()
        if reply != SmtpHandler.BANNED:
            break
    assert reply.startswith("235")  # with a fresh count:
    c, reply = odmr_login(app.address("odmr"), "wrong")
    assert reply.startswith("535")
    c.close()
    assert store.bans.active() == []


@pytest.mark.parametrize("exempt", [{"never_ban": ("127.0.0.0/8",), "plaintext_networks": ()},
                                    {"never_ban": ()}])  # (the second: loopback is a plaintext network)
def test_the_office_is_never_banned(make_app, store, exempt):
    import ipaddress

    networks = {k: tuple(ipaddress.ip_network(n) for n in v) for k, v in exempt.items()}
    app = make_app(auth={"ban_after": 2, "bcrypt_rounds": 4, "failure_delay": 0.0, **networks},
                   odmr={"listen": LOOPBACK})
    for _ in range(5):
        c, reply = odmr_login(app.address("odmr"), "wrong")
        assert reply.startswith("535")
        c.close()
    c, reply = odmr_login(app.address("odmr"), PASSWORD)
    assert reply.startswith("235")
    c.close()
    assert store.bans.active() == []
