"""Real POP3 clients nobody here wrote, each retrieving exactly the messages delivered:
Python's poplib, fetchmail (UIDL keep mode and its default LAST/TOP/delete mode), mpop
(auth user, auth plain), curl and getmail6. Marked `interop`; `.ci/run` installs them."""

from __future__ import annotations

import os
import poplib
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import PASSWORD, deliver

pytestmark = pytest.mark.interop

BOB = "bob@example.org"


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed (.ci/run installs it)")
        pytest.skip(f"{program} is not installed")
    return path


def messages(n: int = 3) -> list[bytes]:
    return [
        f"From: sender{i}@example.net\r\nTo: {BOB}\r\nSubject: interop {i}\r\nMessage-ID: <interop{i}@example.net>\r\n\r\nbody {i}\r\n.leading dot\r\n".encode()
        for i in range(n)
    ]


@pytest.fixture
def filled(app, store):
    bodies = messages()
    for body in bodies:
        deliver(store, BOB, body)
    return app, bodies


def bob_count(store) -> int:
    return len(store.maildrops.snapshot(store.directory.find_account(BOB).id))


def saved(folder: Path) -> list[bytes]:
    """The messages a client wrote into a folder (or Maildir new/ and cur/), sorted."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sorted(p.read_bytes().replace(b"\r\n", b"\n") for p in files)


def expect_same(found: list[bytes], bodies: list[bytes]) -> None:
    assert len(found) == len(bodies)
    for body in bodies:
        wanted = body.replace(b"\r\n", b"\n")
        assert any(wanted in f for f in found), wanted[:60]


def test_poplib(filled, store):
    app, bodies = filled
    client = poplib.POP3(*app.address("pop3"), timeout=30)
    assert "UIDL" in client.capa()
    client.user(BOB)
    client.pass_(PASSWORD)
    got = [b"\r\n".join(client.retr(i)[1]) + b"\r\n" for i in range(1, 4)]
    assert got == bodies
    client.dele(1)
    client.quit()
    assert bob_count(store) == 2


def fetchmail_rc(tmp_path: Path, port: int, out: Path) -> Path:
    out.mkdir(exist_ok=True)
    saver = tmp_path / "save.sh"
    saver.write_text(f'#!/bin/sh\ncat > "$(mktemp {out}/msg.XXXXXX)"\n')
    saver.chmod(0o755)
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f'poll 127.0.0.1 protocol pop3 service {port} user "{BOB}" password "{PASSWORD}" '
        f'sslproto \'\' mda "{saver}"\n'
    )
    rc.chmod(0o600)
    return rc


def run_fetchmail(tmp_path: Path, rc: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp_path), "FETCHMAILHOME": str(tmp_path)}
    return subprocess.run(
        [need("fetchmail"), "-f", str(rc), "--idfile", str(tmp_path / "fetchids"), "--nosyslog", *flags],
        capture_output=True, text=True, timeout=120, env=env,
    )


def test_fetchmail_keep_fetchall_uidl(filled, store, tmp_path):
    app, bodies = filled
    out = tmp_path / "out"
    rc = fetchmail_rc(tmp_path, app.address("pop3")[1], out)
    result = run_fetchmail(tmp_path, rc, "-k", "-a", "-U", "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    expect_same(saved(out), bodies)
    assert bob_count(store) == 3  # kept


def test_fetchmail_default_mode_uses_last_top_and_deletes(filled, store, tmp_path):
    app, bodies = filled
    out = tmp_path / "out"
    rc = fetchmail_rc(tmp_path, app.address("pop3")[1], out)
    result = run_fetchmail(tmp_path, rc, "-v")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    expect_same(saved(out), bodies)
    assert bob_count(store) == 0  # fetched and deleted
    assert "DELE" in log


@pytest.mark.parametrize("auth", ["user", "plain"])
def test_mpop(filled, store, tmp_path, auth):
    app, bodies = filled
    maildir = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    rc = tmp_path / "mpoprc"
    rc.write_text(
        "account default\n"
        f"host 127.0.0.1\nport {app.address('pop3')[1]}\nuser {BOB}\npassword {PASSWORD}\n"
        f"auth {auth}\ntls off\nkeep on\ndelivery maildir {maildir}\n"
        f"uidls_file {tmp_path / 'uidls'}\n"
    )
    rc.chmod(0o600)
    result = subprocess.run([need("mpop"), "-C", str(rc), "default"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    expect_same(saved(maildir), bodies)
    assert bob_count(store) == 3


def curl(app, path: str = "/", *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    host, port = app.address("pop3")
    return subprocess.run(
        [need("curl"), "-s", "-S", "-u", f"{BOB}:{PASSWORD}", *args, f"pop3://{host}:{port}{path}"],
        capture_output=True, timeout=timeout,
    )


def test_curl_list_retr_uidl_top_and_dele(filled, store):
    app, bodies = filled
    listing = curl(app)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().split() == [str(x) for n, b in enumerate(bodies, 1) for x in (n, len(b))]
    retr = curl(app, "/2")
    assert retr.returncode == 0 and retr.stdout.replace(b"\r\n", b"\n") == bodies[1].replace(b"\r\n", b"\n")
    uidl = curl(app, "/", "-X", "UIDL")
    assert [line.split()[0] for line in uidl.stdout.decode().splitlines()] == ["1", "2", "3"]
    top = curl(app, "/", "-X", "TOP 1 0")
    assert top.stdout.replace(b"\r\n", b"\n") == bodies[0].split(b"\r\n\r\n")[0].replace(b"\r\n", b"\n") + b"\n\n"
    dele = curl(app, "/1", "-X", "DELE", "-I")
    assert dele.returncode == 0, dele.stderr
    assert bob_count(store) == 2


def test_curl_dele_without_dash_i_never_quits_and_deletes_nothing(filled, store):
    app, _ = filled
    result = curl(app, "/1", "-X", "DELE", "--max-time", "2")
    assert result.returncode == 28  # curl gave up waiting for a multi-line reply: no QUIT sent
    assert bob_count(store) == 3


@pytest.fixture
def open_folder():
    """A folder that getmail's delivery, running as nobody, can reach (pytest's are 0700)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mailsrv-getmail-"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_getmail6(filled, store, tmp_path, open_folder):
    app, bodies = filled
    maildir = open_folder / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True)
    for path in [maildir, *maildir.iterdir()]:
        path.chmod(0o777)
    rc = tmp_path / "getmailrc"
    rc.write_text(
        "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
        f"port = {app.address('pop3')[1]}\nusername = {BOB}\npassword = {PASSWORD}\n\n"
        f"[destination]\ntype = Maildir\npath = {maildir}/\n"
        + ("user = nobody\n" if os.getuid() == 0 else "")
        + "\n[options]\nread_all = true\ndelete = false\nverbose = 2\n"
    )
    state = tmp_path / "getmail-state"
    state.mkdir()
    result = subprocess.run(
        [need("getmail"), "--getmaildir", str(state), "--rcfile", str(rc)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    expect_same(saved(maildir), bodies)
    assert bob_count(store) == 3
