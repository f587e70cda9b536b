"""Authentication: bcrypt, CRAM-MD5 (RFC 2195), APOP, failure delays and where plaintext may go.

- Password checks always run one bcrypt verification, against a dummy hash of the configured
  cost when the account is unknown or disabled, so the time taken tells nothing about which
  addresses exist. The check gives up the GIL, so checks on several threads use every
  core; it runs in the C library's bcrypt where there is one (:func:`check_password`).
- After a failure the caller waits :meth:`Authenticator.failure_delay` before answering. The
  delay grows per peer address as Dovecot's auth penalty does: ``[auth] failure_delay``
  (2 s), doubling on each further failure to a cap of 15 s, forgotten after
  :data:`PENALTY_FORGET` seconds without a failure. ``failure_delay = 0`` turns it off.
- CRAM-MD5 and APOP need the password in a form equivalent to plaintext (``cram_secret``),
  stored only for accounts created with ``--cram-md5``.
- Plaintext passwords (USER/PASS, AUTH PLAIN) are accepted only from ``plaintext_networks``
  or over TLS (RFC 2595 section 2.1).
- After ``[auth] ban_after`` failures from one address with no success between (and none
  forgotten: see the penalty), the address is banned for ``ban_for``: a row of ``bans``,
  honoured by every process sharing the database, which refuse its connections on every
  protocol. Addresses in ``plaintext_networks`` or ``never_ban`` are never banned, so an
  office cannot lock itself out. :meth:`Authenticator.banned` reads the bans again at
  most every :data:`BAN_REFRESH` seconds, so ``mailsrv ban del`` takes effect that soon.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import bcrypt

from .config import AuthConfig
from .cpu import allowed_cpus, use_every_cpu
from .db import DatabaseUnavailable
from .models import utcnow
from .store import AccountInfo, Store

PENALTY_CAP = 15.0
PENALTY_FORGET = 3600.0
BAN_REFRESH = 5.0

#: failed logins and bans, one line each (scripts/fail2ban/ reads "login failed" lines)
auth_log = logging.getLogger("mailsrv.auth")


def hash_password(password: str, rounds: int) -> str:
    """A ``$2b$`` bcrypt hash of the password (UTF-8; bcrypt looks at 72 octets at most)."""
    return bcrypt.hashpw(password.encode("utf-8")[:72], bcrypt.gensalt(rounds)).decode("ascii")


def check_password(password: str, hashed: str) -> bool:
    """Does the password match the bcrypt hash? (Constant time; False for a hash that is
    not one.) Checked by the C library's bcrypt where it has one (see :func:`_c_bcrypt`),
    else by the ``bcrypt`` package; both give the same answer for every input."""
    secret = password.encode("utf-8")[:72]
    try:
        stored = hashed.encode("ascii")
    except UnicodeEncodeError:
        return False
    if _crypt_rn is not None and b"\0" not in secret and stored[:4] in (b"$2a$", b"$2b$", b"$2y$"):
        work = ctypes.create_string_buffer(CRYPT_DATA_SIZE)
        result = _crypt_rn(secret, stored, work, CRYPT_DATA_SIZE)
        return result is not None and hmac.compare_digest(result, stored)
    try:
        return bcrypt.checkpw(secret, stored)
    except ValueError:
        return False


#: the size of libxcrypt's ``struct crypt_data``, the work area of crypt_rn
CRYPT_DATA_SIZE = 32768


def _c_bcrypt():
    """libxcrypt's ``crypt_rn`` (Debian's libcrypt1, always installed there), if it checks
    bcrypt hashes as the ``bcrypt`` package does, else None.

    It is the Openwall crypt_blowfish code that Dovecot uses, about 13% faster here than
    the ``bcrypt`` package's Rust, and ctypes gives up the GIL while it runs, so checks on
    several threads still use every core. Hashes are still made by the ``bcrypt``
    package; a library that fails the self-check below is not used."""
    try:
        library = ctypes.CDLL(ctypes.util.find_library("crypt") or "libcrypt.so.1")
        function = library.crypt_rn
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    function.restype = ctypes.c_char_p
    work = ctypes.create_string_buffer(CRYPT_DATA_SIZE)
    sample = bcrypt.hashpw(b"self-check", bcrypt.gensalt(4))
    if function(b"self-check", sample, work, CRYPT_DATA_SIZE) != sample:
        return None
    if function(b"self-checK", sample, work, CRYPT_DATA_SIZE) == sample:
        return None
    return function


_crypt_rn = _c_bcrypt()


def cram_md5_digest(secret: str, challenge: bytes) -> str:
    """HMAC-MD5 of the challenge keyed by the secret, in lower-case hex (RFC 2195)."""
    return hmac.new(secret.encode("utf-8"), challenge, hashlib.md5).hexdigest()


def apop_digest(timestamp: str, secret: str) -> str:
    """MD5 of the greeting timestamp followed by the secret, lower-case hex (RFC 1939 s. 7)."""
    return hashlib.md5((timestamp + secret).encode("utf-8")).hexdigest()


def new_challenge(hostname: str) -> str:
    """A fresh ``<random.time@host>`` string for CRAM-MD5 and the APOP greeting."""
    return f"<{secrets.randbelow(10**12)}.{int(time.time())}@{hostname}>"


def decode_plain(initial: str) -> tuple[str, str, str] | None:
    """Decode an AUTH PLAIN response (RFC 4616): (authzid, authcid, password) or None."""
    try:
        raw = base64.b64decode(initial, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    parts = raw.split("\0")
    if len(parts) != 3 or not parts[1]:
        return None
    return parts[0], parts[1], parts[2]


@dataclass
class _Penalty:
    failures: int
    last: float


class Authenticator:
    """Checks passwords against the store and keeps the per-peer failure penalty.

    Password checks run on a pool of their own, one thread per CPU the process may use:
    a bcrypt check is about 100 ms of one CPU without the GIL, so more at once would not
    finish sooner. The pool's threads run on every CPU even when the server keeps its
    other threads on one (``[server] pin_cpu``), and the deep stack of a check (the
    account lookup, bcrypt's 4 KB of key schedule) is touched on these few threads only,
    not on every session's, where it would stay resident for the session's life.
    """

    def __init__(self, store: Store, config: AuthConfig):
        self.store = store
        self.config = config
        self._dummy_hash = hash_password(secrets.token_urlsafe(16), config.bcrypt_rounds)
        self._penalties: dict[str, _Penalty] = {}
        self._lock = threading.Lock()
        self._banned: dict[str, datetime] = {}  # address -> until, as last read (and made here)
        self._bans_read = float("-inf")
        self._bans_lock = threading.Lock()  # held while a thread reads the bans again
        self._bans_made = 0  # bans this process made (a read that overlaps one is not taken)
        self._checks = ThreadPoolExecutor(
            max_workers=len(allowed_cpus()), thread_name_prefix="password-check", initializer=use_every_cpu
        )

    # --- password checks -------------------------------------------------------------

    def check_plain(self, address: str, password: str) -> AccountInfo | None:
        """The enabled account if the password is right, else None (always one bcrypt check)."""
        return self._checks.submit(self._check_plain, address, password).result()

    def _check_plain(self, address: str, password: str) -> AccountInfo | None:
        account = self.store.directory.find_account(address) if "@" in address else None
        if account is None or not account.enabled:
            check_password(password, self._dummy_hash)
            return None
        return account if check_password(password, account.password_hash) else None

    def check_sasl_plain(self, response: str) -> tuple[str, AccountInfo | None] | None:
        """An AUTH PLAIN response (RFC 4616) checked: (the login name, the account or None);
        None when the response is malformed. An authorization identity other than the
        account itself fails: no one may act as another."""
        decoded = decode_plain(response)
        if decoded is None:
            return None
        authzid, name, password = decoded
        account = self.check_plain(name, password)
        if account and authzid and authzid.lower() != account.address:
            account = None
        return name, account

    def check_cram(self, address: str, challenge: bytes, digest: str) -> AccountInfo | None:
        """The account if ``digest`` is the CRAM-MD5 answer to ``challenge``, else None."""
        account = self.store.directory.find_account(address) if "@" in address else None
        secret = account.cram_secret if account and account.enabled else None
        expected = cram_md5_digest(secret or self._dummy_hash, challenge)
        if hmac.compare_digest(expected, digest.strip().lower()) and secret:
            return account
        return None

    def check_apop(self, address: str, timestamp: str, digest: str) -> AccountInfo | None:
        """The account if ``digest`` is MD5(timestamp + secret), else None."""
        account = self.store.directory.find_account(address) if "@" in address else None
        secret = account.cram_secret if account and account.enabled else None
        expected = apop_digest(timestamp, secret or self._dummy_hash)
        if hmac.compare_digest(expected, digest.strip().lower()) and secret:
            return account
        return None

    # --- failure penalty -------------------------------------------------------------

    def failure_delay(self, peer: str) -> float:
        """Record a failed login from ``peer`` and return how long to wait before answering."""
        return self._record_failure(peer)[0]

    def _record_failure(self, peer: str) -> tuple[float, int]:
        """(the delay before answering, failures from ``peer`` since its last success)."""
        base = self.config.failure_delay
        now = time.monotonic()
        with self._lock:
            penalty = self._penalties.get(peer)
            if penalty is None or now - penalty.last > PENALTY_FORGET:
                penalty = self._penalties[peer] = _Penalty(0, now)
            penalty.failures += 1
            penalty.last = now
            if len(self._penalties) > 10_000:
                self._forget_old(now)
            if base <= 0:
                return 0.0, penalty.failures
            return min(base * 2 ** (penalty.failures - 1), max(PENALTY_CAP, base)), penalty.failures

    def succeeded(self, peer: str) -> None:
        """A successful login from ``peer`` clears its penalty."""
        with self._lock:
            self._penalties.pop(peer, None)

    def _forget_old(self, now: float) -> None:
        for peer in [p for p, v in self._penalties.items() if now - v.last > PENALTY_FORGET]:
            del self._penalties[peer]

    def fail(self, peer: str, what: str = "") -> None:
        """Record a failed login from ``peer`` (``what``: protocol and name, for the ban's
        reason), ban it when that makes ``ban_after``, and wait the failure delay (call
        before answering)."""
        delay, failures = self._record_failure(peer)
        after = self.config.ban_after
        if after and failures >= after and not self.never_banned(peer) and not self.banned(peer):
            self._ban(peer, failures, what)
        if delay:
            time.sleep(delay)

    # --- bans ------------------------------------------------------------------------

    def never_banned(self, peer: str) -> bool:
        address = _address(peer)
        return address is not None and any(
            address in network for network in (*self.config.plaintext_networks, *self.config.never_ban)
        )

    def banned(self, peer: str) -> bool:
        """Is ``peer`` banned now? From the bans as last read from the database: when that
        was more than :data:`BAN_REFRESH` seconds ago, a thread reads them again, so no
        connection waits on the database (one that cannot be read keeps the last list)."""
        if time.monotonic() - self._bans_read > BAN_REFRESH and self._bans_lock.acquire(blocking=False):
            threading.Thread(target=self.refresh_bans, args=(True,), name="bans", daemon=True).start()
        until = self._banned.get(peer)
        return until is not None and until > utcnow()

    def refresh_bans(self, locked: bool = False) -> None:
        """Read the bans from the database (at start, and from :meth:`banned`)."""
        try:
            with self._lock:
                made = self._bans_made
            current = self.store.bans.addresses()
            with self._lock:
                if self._bans_made == made:  # (else a ban made meanwhile may be missing: keep ours this time)
                    for lifted in self._banned.keys() - current.keys():  # mailsrv ban del: a fresh start
                        self._penalties.pop(lifted, None)
                    self._banned = current
        except DatabaseUnavailable:
            pass
        finally:
            self._bans_read = time.monotonic()
            if locked:
                self._bans_lock.release()

    def _ban(self, peer: str, failures: int, what: str) -> None:
        until = utcnow() + timedelta(seconds=self.config.ban_for)
        reason = f"{failures} failed logins in a row, the last {what}".rstrip()
        with self._lock:
            self._banned = {**self._banned, peer: until}
            self._bans_made += 1
        auth_log.warning("banned: rhost=%s until %s UTC: %s", peer, until.strftime("%Y-%m-%d %H:%M:%S"), reason)
        try:
            self.store.bans.ban(peer, until, failures, reason)
        except DatabaseUnavailable as exc:
            auth_log.warning("the ban of %s is kept by this process only: %s", peer, exc)
        with self._lock:
            self._bans_made += 1  # (again: a read begun before the row was written does not count)

    # --- where plaintext may go ------------------------------------------------------

    def plaintext_allowed(self, peer: str, tls_active: bool) -> bool:
        """May a password cross this connection in the clear (RFC 2595 section 2.1)?"""
        if tls_active:
            return True
        address = _address(peer)
        return address is not None and any(address in network for network in self.config.plaintext_networks)


def _address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP address (an IPv4-mapped IPv6 one as IPv4), None if it is not one."""
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address
