"""mailsrv.conf: values, search order, and every kind of error (exit 2 naming file, section, key)."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

import pytest

from mailsrv import cli
from mailsrv.config import (
    Config,
    ConfigError,
    load_config,
    parse_duration,
    parse_listen,
    parse_size,
)

SHIPPED = Path(__file__).resolve().parent.parent / "mailsrv.conf"


@pytest.mark.parametrize(
    "text, seconds",
    [("600", 600), ("0.5s", 0.5), ("10m", 600), ("2h", 7200), ("5d", 432000), (" 3 s ", 3)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "5w", "-1", "1.2.3", "5 minutes"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, octets", [("25M", 25 * 1024**2), ("512", 512), ("4K", 4096), ("1G", 1024**3), ("2m", 2 * 1024**2)]
)
def test_sizes_are_powers_of_1024(text, octets):
    assert parse_size(text) == octets


@pytest.mark.parametrize("text", ["", "big", "1T", "1.5M", "-3K"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_listen_lists():
    assert parse_listen("") == ()
    assert parse_listen("0.0.0.0:110, [::1]:110") == (("0.0.0.0", 110), ("::1", 110))
    for bad in ("110", "host:", "host:port", ":110", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_shipped_config_loads_with_the_design_defaults(tmp_path):
    copy = tmp_path / "mailsrv.conf"
    shutil.copy(SHIPPED, copy)
    config = load_config(str(copy))
    default = Config()
    for section in ("pop3", "pop", "mpp", "odmr", "smtp", "delivery", "auth", "tls"):
        assert getattr(config, section) == getattr(default, section), section
    assert config.server.database == f"sqlite:///{tmp_path / 'mailsrv.db'}"
    assert config.server.hostname  # the FQDN when empty
    assert config.pop3.listen == (("0.0.0.0", 110),)
    assert config.mpp.max_message_size == 25 * 1024 * 1024
    assert config.delivery.queue_lifetime == 5 * 86400
    assert ipaddress.ip_network("192.168.0.0/16") in config.auth.plaintext_networks


def test_shipped_config_names_every_key():
    text = SHIPPED.read_text()
    from mailsrv.config import PARSERS

    for section, keys in PARSERS.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} =" in text, f"[{section}] {key} missing from mailsrv.conf"


def write(tmp_path, body: str) -> str:
    path = tmp_path / "mailsrv.conf"
    path.write_text(body)
    return str(path)


def test_relative_paths_are_relative_to_the_config_folder(tmp_path):
    path = write(tmp_path, "[server]\ndatabase = sqlite:///data/m.db\n[tls]\ncertfile = c.pem\nkeyfile = k.pem\n")
    config = load_config(path)
    assert config.server.database == f"sqlite:///{tmp_path / 'data' / 'm.db'}"
    assert config.tls.certfile == str(tmp_path / "c.pem")


def test_search_order(tmp_path, monkeypatch):
    explicit = write(tmp_path, "[server]\nhostname = explicit.example\n")
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    (env_dir / "e.conf").write_text("[server]\nhostname = env.example\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "mailsrv.conf").write_text("[server]\nhostname = cwd.example\n")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MAILSRV_CONF", str(env_dir / "e.conf"))
    assert load_config(explicit).server.hostname == "explicit.example"
    assert load_config().server.hostname == "env.example"
    monkeypatch.delenv("MAILSRV_CONF")
    assert load_config().server.hostname == "cwd.example"


@pytest.mark.parametrize(
    "body, words",
    [
        ("[nonsense]\na = b\n", ["[nonsense]", "unknown section"]),
        ("[pop3]\nlisten_port = 110\n", ["[pop3]", "listen_port", "unknown key"]),
        ("[pop3]\nidle_timeout = soon\n", ["[pop3]", "idle_timeout", "soon"]),
        ("[mpp]\nmax_message_size = huge\n", ["[mpp]", "max_message_size"]),
        ("[mpp]\nfrom_policy = maybe\n", ["[mpp]", "from_policy"]),
        ("[auth]\nbcrypt_rounds = 3\n", ["[auth]", "bcrypt_rounds"]),
        ("[auth]\ncram_md5 = perhaps\n", ["[auth]", "cram_md5"]),
        ("[auth]\nplaintext_networks = 10.0.0.0/33\n", ["[auth]", "plaintext_networks"]),
        ("[server]\nmax_connections = 0\n", ["[server]", "max_connections"]),
        ("[delivery]\nrelay_tls = sometimes\n", ["[delivery]", "relay_tls"]),
        ("[pop]\nlisten = nowhere\n", ["[pop]", "listen"]),
        ("[tls]\ncertfile = c.pem\n", ["[tls]", "keyfile"]),
        ("[server\n", []),
        ("key = value\n", []),
    ],
)
def test_config_errors_exit_2_naming_file_section_and_key(tmp_path, capsys, body, words):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert path in message
    for word in words:
        assert word in message
    assert cli.main(["-c", path, "domain", "list"]) == 2
    assert path in capsys.readouterr().err


def test_missing_file_exits_2(tmp_path, capsys):
    missing = str(tmp_path / "absent.conf")
    assert cli.main(["-c", missing, "user", "list"]) == 2
    assert "absent.conf" in capsys.readouterr().err


def test_no_config_anywhere_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAILSRV_CONF", raising=False)
    monkeypatch.setattr("mailsrv.config.SEARCH_PATH", ("./mailsrv.conf",))
    assert cli.main(["domain", "list"]) == 2
    assert "no configuration file" in capsys.readouterr().err
