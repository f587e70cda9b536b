"""auth.py: bcrypt with a dummy check, CRAM-MD5 and APOP (the RFC examples), penalties, plaintext."""

from __future__ import annotations

import base64
import shutil
import subprocess

import bcrypt
import pytest

from mailsrv import auth as authmod
from mailsrv.auth import Authenticator, apop_digest, cram_md5_digest, decode_plain, hash_password
from mailsrv.config import AuthConfig, parse_networks

from .conftest import PASSWORD


@pytest.fixture
def authenticator(store, accounts):
    return Authenticator(store, AuthConfig(bcrypt_rounds=4, failure_delay=2.0))


def test_rfc2195_example():
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    assert cram_md5_digest("tanstaaftanstaaf", challenge) == "b913a602c7eda7a495b4e6e7334d3890"


def test_rfc1939_apop_example():
    assert apop_digest("<1896.697170952@dbc.mtview.ca.us>", "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"


def test_hashes_are_bcrypt_2b():
    hashed = hash_password("pw", 4)
    assert hashed.startswith("$2b$04$") and bcrypt.checkpw(b"pw", hashed.encode())


def test_check_plain(authenticator, store):
    assert authenticator.check_plain("ANN@example.org", PASSWORD).address == "ann@example.org"
    assert authenticator.check_plain("ann@example.org", "wrong") is None
    assert authenticator.check_plain("nobody@example.org", PASSWORD) is None
    store.directory.set_enabled("ann@example.org", False)
    assert authenticator.check_plain("ann@example.org", PASSWORD) is None


def test_unknown_and_disabled_users_cost_one_bcrypt_check(authenticator, store, monkeypatch):
    calls = []
    real = authmod.check_password
    monkeypatch.setattr(authmod, "check_password", lambda pw, h: calls.append(h[:7].encode()) or real(pw, h))
    authenticator.check_plain("nobody@example.org", "x")
    authenticator.check_plain("no-at-sign", "x")
    store.directory.set_enabled("bob@example.org", False)
    authenticator.check_plain("bob@example.org", PASSWORD)
    assert calls == [b"$2b$04$"] * 3  # the dummy hash has the configured cost


def test_cram_and_apop(authenticator):
    challenge = b"<1.2@mail.example.org>"
    assert authenticator.check_cram("ann@example.org", challenge, cram_md5_digest(PASSWORD, challenge))
    assert authenticator.check_cram("ann@example.org", challenge, "0" * 32) is None
    # bob has no CRAM secret: even the digest of his password does not work
    assert authenticator.check_cram("bob@example.org", challenge, cram_md5_digest(PASSWORD, challenge)) is None
    assert authenticator.check_apop("ann@example.org", "<t@h>", apop_digest("<t@h>", PASSWORD))
    assert authenticator.check_apop("bob@example.org", "<t@h>", apop_digest("<t@h>", PASSWORD)) is None


def test_penalty_doubles_to_a_cap_and_is_per_peer(authenticator):
    delays = [authenticator.failure_delay("192.0.2.1") for _ in range(6)]
    assert delays == [2, 4, 8, 15, 15, 15]
    assert authenticator.failure_delay("192.0.2.2") == 2
    authenticator.succeeded("192.0.2.1")
    assert authenticator.failure_delay("192.0.2.1") == 2


def test_penalty_is_forgotten_after_a_quiet_period(authenticator, monkeypatch):
    authenticator.failure_delay("192.0.2.1")
    authenticator.failure_delay("192.0.2.1")
    monkeypatch.setattr(authmod, "PENALTY_FORGET", -1.0)
    assert authenticator.failure_delay("192.0.2.1") == 2


def test_no_delay_when_configured_off(store, accounts):
    quick = Authenticator(store, AuthConfig(bcrypt_rounds=4, failure_delay=0.0))
    assert [quick.failure_delay("192.0.2.1") for _ in range(3)] == [0, 0, 0]


def test_plaintext_only_from_trusted_networks_or_tls(store, accounts):
    auth = Authenticator(store, AuthConfig(bcrypt_rounds=4, plaintext_networks=parse_networks("127.0.0.0/8 10.0.0.0/8")))
    assert auth.plaintext_allowed("127.0.0.1", False)
    assert auth.plaintext_allowed("::ffff:10.1.2.3", False)
    assert not auth.plaintext_allowed("192.0.2.1", False)
    assert not auth.plaintext_allowed("::1", False)
    assert auth.plaintext_allowed("192.0.2.1", True)


def test_decode_plain():
    assert decode_plain(base64.b64encode(b"\0ann@example.org\0pw").decode()) == ("", "ann@example.org", "pw")
    assert decode_plain("not base64!") is None
    assert decode_plain(base64.b64encode(b"no-nuls").decode()) is None
    assert decode_plain(base64.b64encode(b"\xff\0a\0b").decode()) is None


@pytest.mark.parametrize("stored_password", ["secret", "pässwörd", "x" * 100, "a\0b"])
def test_c_library_bcrypt_answers_as_the_bcrypt_package(stored_password):
    """check_password runs in libxcrypt where the machine has it (Debian does): for right
    and wrong passwords, over-long ones, NUL, other $2 variants and broken hashes, it says
    exactly what the bcrypt package says."""
    auth = authmod
    if shutil.which("dpkg") and subprocess.run(["dpkg", "-s", "libcrypt1"], capture_output=True).returncode == 0:
        assert auth._crypt_rn is not None  # used here, not silently skipped
    hashed = auth.hash_password(stored_password, 4)
    variants = [hashed, "$2a$" + hashed[4:], "$2y$" + hashed[4:], hashed[:-1] + ("A" if hashed[-1] != "A" else "B"),
                hashed[:20], "", "plain text", "$1$abc$def"]
    for stored in variants:
        for attempt in (stored_password, stored_password + "!", stored_password[:72], "x" * 72 + "y", "a", "", "a\0b"):
            try:
                expected = bcrypt.checkpw(attempt.encode()[:72], stored.encode())
            except ValueError:
                expected = False
            assert auth.check_password(attempt, stored) is expected, (stored, attempt)
