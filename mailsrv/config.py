"""mailsrv.conf (INI) -> frozen dataclasses.

The file is found by ``-c PATH``, else ``$MAILSRV_CONF``, else ``./mailsrv.conf``, else
``/etc/mailsrv/mailsrv.conf``. Relative paths inside it (the SQLite database, TLS files) are
relative to the file's own folder. A duration is a number with an optional unit s, m, h or d
(``600``, ``0.5s``, ``10m``, ``5d``); a size takes K, M or G (powers of 1024). A missing file,
an unknown section or key, or a bad value raises :class:`ConfigError`, whose text names the
file, section and key; the command line turns it into exit status 2.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEARCH_PATH = ("./mailsrv.conf", "/etc/mailsrv/mailsrv.conf")


class ConfigError(Exception):
    """A configuration problem; the message names file, section and key."""


Address = tuple[str, int]


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = ""
    database: str = "sqlite:///mailsrv.db"
    user: str = ""
    log_level: str = "info"
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    pin_cpu: bool = True
    database_transactions: int = 4


@dataclass(frozen=True)
class Pop3Config:
    listen: tuple[Address, ...] = (("0.0.0.0", 110),)
    listen_tls: tuple[Address, ...] = ()
    idle_timeout: float = 600.0
    enable_last: bool = True


@dataclass(frozen=True)
class PopConfig:
    listen: tuple[Address, ...] = (("0.0.0.0", 109),)
    idle_timeout: float = 600.0


@dataclass(frozen=True)
class MppConfig:
    listen: tuple[Address, ...] = (("0.0.0.0", 218),)
    listen_tls: tuple[Address, ...] = ()
    idle_timeout: float = 300.0
    max_message_size: int = 25 * 1024 * 1024
    from_policy: str = "sender"


@dataclass(frozen=True)
class OdmrConfig:
    listen: tuple[Address, ...] = (("0.0.0.0", 366),)
    idle_timeout: float = 600.0


@dataclass(frozen=True)
class SmtpConfig:
    listen: tuple[Address, ...] = (("0.0.0.0", 25),)
    submission: tuple[Address, ...] = (("0.0.0.0", 587),)
    submission_tls: tuple[Address, ...] = ()
    max_message_size: int = 25 * 1024 * 1024
    max_received_headers: int = 100


@dataclass(frozen=True)
class DeliveryConfig:
    workers: int = 2
    relayhost: str = ""
    relay_username: str = ""
    relay_password: str = ""
    relay_tls: str = "may"
    lease: float = 300.0
    min_backoff: float = 300.0
    max_backoff: float = 3600.0
    queue_lifetime: float = 5 * 86400.0
    bounce_lifetime: float = 5 * 86400.0
    resolver: str = ""
    destination_concurrency: int = 10


DEFAULT_PLAINTEXT_NETWORKS = (
    "127.0.0.0/8 ::1/128 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7"
)


@dataclass(frozen=True)
class AuthConfig:
    bcrypt_rounds: int = 12
    failure_delay: float = 2.0
    plaintext_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_PLAINTEXT_NETWORKS.split()
    )
    cram_md5: bool = False
    ban_after: int = 10
    ban_for: float = 3600.0
    never_ban: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class TlsConfig:
    certfile: str = ""
    keyfile: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.certfile)


@dataclass(frozen=True)
class DkimConfig:
    selector: str = "mailsrv"
    key_dir: str = "dkim"
    domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[Address, ...] = ()


@dataclass(frozen=True)
class Config:
    path: str = ""
    server: ServerConfig = field(default_factory=ServerConfig)
    pop3: Pop3Config = field(default_factory=Pop3Config)
    pop: PopConfig = field(default_factory=PopConfig)
    mpp: MppConfig = field(default_factory=MppConfig)
    odmr: OdmrConfig = field(default_factory=OdmrConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some keys changed, e.g. ``cfg.replace(auth={"failure_delay": 0})``."""
        changes = {
            name: dataclasses.replace(getattr(self, name), **keys) for name, keys in sections.items()
        }
        return dataclasses.replace(self, **changes)


# --- value parsers ---------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_duration(text: str) -> float:
    """``"600"`` -> 600.0, ``"0.5s"`` -> 0.5, ``"10m"`` -> 600.0, ``"5d"`` -> 432000.0."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (a number with an optional unit s, m, h, d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str) -> int:
    """``"25M"`` -> 26214400 (K, M, G are powers of 1024); a bare number is octets."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (a number with an optional unit K, M, G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"not a yes/no value: {text!r}")


def parse_int(text: str, minimum: int = 0) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise ValueError(f"must be at least {minimum}: {text!r}")
    return value


def parse_listen(text: str) -> tuple[Address, ...]:
    """``"0.0.0.0:110, [::1]:110"`` -> ``(("0.0.0.0", 110), ("::1", 110))``; empty -> ``()``."""
    result = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"not host:port: {item!r}")
        host = host.strip("[]")
        if not host:
            raise ValueError(f"missing host in {item!r}")
        result.append((host, int(port)))
    return tuple(result)


def parse_networks(text: str) -> tuple:
    try:
        return tuple(ipaddress.ip_network(n, strict=False) for n in text.replace(",", " ").split())
    except ValueError as exc:
        raise ValueError(f"not a network list: {exc}") from None


def _choice(*allowed: str):
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}: {text!r}")
        return value

    return parse


def _text(text: str) -> str:
    return text.strip()


def _rounds(text: str) -> int:
    value = parse_int(text, minimum=4)
    if value > 31:
        raise ValueError(f"bcrypt rounds must be 4..31: {text!r}")
    return value


def _positive_int(text: str) -> int:
    return parse_int(text, minimum=1)


# section -> key -> parser; a key's default comes from the dataclass.
PARSERS: dict[str, dict[str, Any]] = {
    "server": {
        "hostname": _text,
        "database": _text,
        "user": _text,
        "log_level": _choice("debug", "info", "warning", "error"),
        "max_connections": _positive_int,
        "max_connections_per_ip": _positive_int,
        "pin_cpu": parse_bool,
        "database_transactions": _positive_int,
    },
    "pop3": {
        "listen": parse_listen,
        "listen_tls": parse_listen,
        "idle_timeout": parse_duration,
        "enable_last": parse_bool,
    },
    "pop": {"listen": parse_listen, "idle_timeout": parse_duration},
    "mpp": {
        "listen": parse_listen,
        "listen_tls": parse_listen,
        "idle_timeout": parse_duration,
        "max_message_size": parse_size,
        "from_policy": _choice("sender", "reject"),
    },
    "odmr": {"listen": parse_listen, "idle_timeout": parse_duration},
    "smtp": {
        "listen": parse_listen,
        "submission": parse_listen,
        "submission_tls": parse_listen,
        "max_message_size": parse_size,
        "max_received_headers": _positive_int,
    },
    "delivery": {
        "workers": lambda t: parse_int(t, minimum=0),
        "relayhost": _text,
        "relay_username": _text,
        "relay_password": lambda t: t,
        "relay_tls": _choice("may", "starttls", "tls", "none"),
        "lease": parse_duration,
        "min_backoff": parse_duration,
        "max_backoff": parse_duration,
        "queue_lifetime": parse_duration,
        "bounce_lifetime": parse_duration,
        "resolver": _text,
        "destination_concurrency": _positive_int,
    },
    "auth": {
        "bcrypt_rounds": _rounds,
        "failure_delay": parse_duration,
        "plaintext_networks": parse_networks,
        "cram_md5": parse_bool,
        "ban_after": lambda t: parse_int(t, minimum=0),
        "ban_for": parse_duration,
        "never_ban": parse_networks,
    },
    "tls": {"certfile": _text, "keyfile": _text},
    "dkim": {"selector": _text, "key_dir": _text, "domains": lambda t: tuple(t.lower().replace(",", " ").split())},
    "metrics": {"listen": parse_listen},
}

SECTION_CLASSES = {
    "server": ServerConfig,
    "pop3": Pop3Config,
    "pop": PopConfig,
    "mpp": MppConfig,
    "odmr": OdmrConfig,
    "smtp": SmtpConfig,
    "delivery": DeliveryConfig,
    "auth": AuthConfig,
    "tls": TlsConfig,
    "dkim": DkimConfig,
    "metrics": MetricsConfig,
}


def find_config(explicit: str | None = None) -> str:
    """The path of the config file to use, by the search order in the module docstring."""
    if explicit:
        return explicit
    env = os.environ.get("MAILSRV_CONF")
    if env:
        return env
    for candidate in SEARCH_PATH:
        if os.path.exists(candidate):
            return candidate
    raise ConfigError(
        "no configuration file: give -c PATH, set MAILSRV_CONF, or create ./mailsrv.conf "
        "or /etc/mailsrv/mailsrv.conf"
    )


def load_config(path: str | None = None, problems: list[str] | None = None) -> Config:
    """Read, check and return the configuration (see the module docstring for the search).

    The first error raises ConfigError, unless ``problems`` is given (``mailsrv check``):
    then every error is added to it, naming file, section and key, a bad value is left
    at its default, and the configuration is returned as far as it could be read. An
    unreadable file raises either way."""

    def fail(message: str) -> None:
        if problems is None:
            raise ConfigError(message)
        problems.append(message)

    path = find_config(path)
    parser = configparser.ConfigParser(interpolation=None, default_section="\0no-default")
    parser.optionxform = str  # keys are case-sensitive, so a typo is caught
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except configparser.Error as exc:
        raise ConfigError(f"{path}: {exc.message if hasattr(exc, 'message') else exc}") from None

    base = Path(path).resolve().parent
    sections: dict[str, Any] = {}
    for section in parser.sections():
        if section not in PARSERS:
            fail(f"{path}: unknown section [{section}] (known: {', '.join(PARSERS)})")
            continue
        values: dict[str, Any] = {}
        for key, raw in parser.items(section):
            key_parser = PARSERS[section].get(key)
            if key_parser is None:
                fail(f"{path}: [{section}] unknown key {key!r}")
                continue
            try:
                values[key] = key_parser(raw)
            except ValueError as exc:
                fail(f"{path}: [{section}] {key}: {exc}")
        sections[section] = SECTION_CLASSES[section](**values)

    server = sections.get("server", ServerConfig())
    server = dataclasses.replace(
        server,
        hostname=server.hostname or socket.getfqdn(),
        database=resolve_database_url(server.database, base),
    )
    sections["server"] = server
    tls = sections.get("tls", TlsConfig())
    if bool(tls.certfile) != bool(tls.keyfile):
        fail(f"{path}: [tls] {'keyfile' if tls.certfile else 'certfile'}: certfile and keyfile must be given together")
        tls = TlsConfig()
    sections["tls"] = TlsConfig(
        certfile=_resolve_path(tls.certfile, base), keyfile=_resolve_path(tls.keyfile, base)
    )
    dkim = sections.get("dkim", DkimConfig())
    sections["dkim"] = dataclasses.replace(dkim, key_dir=_resolve_path(dkim.key_dir, base))
    delivery = sections.get("delivery")
    if delivery and delivery.min_backoff > delivery.max_backoff:
        fail(f"{path}: [delivery] min_backoff: larger than max_backoff")
    return Config(path=str(Path(path).resolve()), **sections)


def _resolve_path(value: str, base: Path) -> str:
    if not value:
        return ""
    return str((base / value).resolve()) if not os.path.isabs(value) else value


def resolve_database_url(url: str, base: Path) -> str:
    """Make a relative SQLite path relative to the config file's folder."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////"):
        rest = url[len(prefix):]
        if rest and rest != ":memory:" and not rest.startswith("file:"):
            return prefix + str((base / rest).resolve())
    return url
