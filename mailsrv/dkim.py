"""DKIM (RFC 6376) for outbound mail: the keys and the signature.

``mailsrv dkim keygen DOMAIN`` makes a 2048-bit RSA key in ``[dkim] key_dir`` (named
``DOMAIN.SELECTOR.key``, readable by its owner only) with the system's ``openssl`` and
prints the TXT record to publish at ``SELECTOR._domainkey.DOMAIN``. The relay signs each
message whose From domain (else its envelope sender's) is in ``[dkim] domains`` with
dkimpy: relaxed/relaxed canonicalization, rsa-sha256, over the header fields that say who
and what (From, To, Cc, Subject, Date, Message-ID, Reply-To, MIME fields).
"""

from __future__ import annotations

import base64
import os
import subprocess
import threading
from pathlib import Path

import dkim

from .config import Config
from .message import addresses, split_header

SIGNED_FIELDS = [b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"in-reply-to",
                 b"references", b"mime-version", b"content-type", b"content-transfer-encoding"]
KEY_BITS = 2048


class DkimError(Exception):
    """A key cannot be made (its text is a one-line reason)."""


def key_path(config: Config, domain: str) -> Path:
    return Path(config.dkim.key_dir) / f"{domain.lower()}.{config.dkim.selector}.key"


def keygen(config: Config, domain: str) -> tuple[Path, str]:
    """Make the domain's key; return its path and the DNS record to publish."""
    domain = domain.strip().lower().rstrip(".")
    path = key_path(config, domain)
    if path.exists():
        raise DkimError(f"{path} exists already: remove it first to make a new key")
    path.parent.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        subprocess.run(["openssl", "genrsa", "-out", str(path), str(KEY_BITS)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise DkimError(f"openssl genrsa failed: {exc}") from None
    finally:
        os.umask(old)
    return path, dns_record(config, domain, path)


def dns_record(config: Config, domain: str, path: Path) -> str:
    """The TXT record that publishes the public half of the key at ``path``."""
    public = subprocess.run(["openssl", "rsa", "-in", str(path), "-pubout", "-outform", "DER"],
                            check=True, capture_output=True).stdout
    value = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
    strings = " ".join(f'"{value[i:i + 250]}"' for i in range(0, len(value), 250))  # 255 at most each
    return f"{config.dkim.selector}._domainkey.{domain}. IN TXT ( {strings} )"


class Signer:
    """Signs outbound messages of the configured domains (keys read once, then kept)."""

    def __init__(self, config: Config):
        self.config = config
        self.domains = set(config.dkim.domains)
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def domain_of(self, sender: str, body: bytes) -> str | None:
        """The domain to sign as: the From field's, else the envelope sender's; None when
        it is not one of ours."""
        fields, _ = split_header(body)
        senders = addresses(fields, ("from",))
        for address in (*senders[:1], sender):
            domain = address.rpartition("@")[2].lower()
            if domain in self.domains:
                return domain
        return None

    def sign(self, sender: str, body: bytes) -> bytes:
        """The message with a DKIM-Signature field first, or as it is when it is not ours
        to sign (or its key cannot be read: logged by the caller's retry)."""
        if not self.domains:
            return body
        domain = self.domain_of(sender, body)
        if domain is None:
            return body
        with self._lock:
            key = self._keys.get(domain)
            if key is None:
                key = self._keys[domain] = key_path(self.config, domain).read_bytes()
        signature = dkim.sign(body, self.config.dkim.selector.encode(), domain.encode(), key,
                              canonicalize=(b"relaxed", b"relaxed"), include_headers=SIGNED_FIELDS)
        return signature + body
