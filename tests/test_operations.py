"""Running mailsrv like an office server: metrics (judged by prometheus_client's own
parser), fail2ban (judged by Debian's fail2ban-regex with the shipped filter), SIGHUP
reloading the TLS certificate, `mailsrv status` and `mailsrv check`."""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from mailsrv.app import LOG_FORMAT

from .conftest import PASSWORD, LineClient
from .test_app import Served, mailsrv, shipped_config_on_ephemeral_ports
from .test_relay import Script, free_port
from .test_security import odmr_login

ROOT = Path(__file__).resolve().parent.parent
FILTER = ROOT / "scripts" / "fail2ban" / "filter.d" / "mailsrv.conf"
ANN = "ann@example.org"
GUESS = "Tr0ub4dor-guess"  # a wrong password, to look for in the logs
LOOPBACK = (("127.0.0.1", 0),)


def scrape(app) -> dict[tuple[str, frozenset], float]:
    host, port = app.address("metrics")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        body = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def moved(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def pop3_login(address, password: str) -> tuple[LineClient, str]:
    c = LineClient(address)
    c.line()
    c.ask(f"USER {ANN}")
    return c, c.ask(f"PASS {password}")


# --- metrics ----------------------------------------------------------------------------


def test_metrics_count_real_traffic(make_app, store, database):
    store.directory.add_domain("customer.example", "odmr")
    store.directory.add_domain("other.example", "odmr")
    store.directory.grant_odmr(ANN, "other.example")
    sink = Script()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        app = make_app(metrics={"listen": LOOPBACK}, smtp={"listen": LOOPBACK, "submission": LOOPBACK},
                       odmr={"listen": LOOPBACK},
                       delivery={"workers": 1, "relayhost": f"127.0.0.1:{controller.port}", "relay_tls": "none"})
        before = scrape(app)

        failed, reply = pop3_login(app.address("pop3"), "wrong")
        assert reply.startswith("-ERR")
        failed.close()
        reader, reply = pop3_login(app.address("pop3"), PASSWORD)  # stays open over the scrape
        assert reply.startswith("+OK")
        with smtplib.SMTP(*app.address("submission"), timeout=10) as client:
            client.login(ANN, PASSWORD)
            client.sendmail(ANN, ["bob@example.org", "far@remote.example"], b"Subject: two ways\r\n\r\nx\r\n")
        with smtplib.SMTP(*app.address("smtp"), timeout=10) as client:
            client.sendmail("someone@example.net", ["x@customer.example"], b"Subject: held\r\n\r\ny\r\n")
        customer, reply = odmr_login(app.address("odmr"), PASSWORD)
        assert reply.startswith("235")
        assert customer.ask("ATRN other.example").startswith("453")
        customer.close()
        assert app.delivery.wait_until(lambda: len(sink.received) == 1, 30)

        def held() -> bool:
            with database.read_core() as conn:
                return conn.execute(text("SELECT state FROM queue_recipients WHERE domain = 'customer.example'")).scalar() == "held"
        assert app.delivery.wait_until(held, 30)
        after = scrape(app)
        reader.close()
    finally:
        controller.stop()

    assert moved(before, after, "mailsrv_logins_total", protocol="pop3", mechanism="USER", result="failed") == 1
    assert moved(before, after, "mailsrv_logins_total", protocol="pop3", mechanism="USER", result="ok") == 1
    assert moved(before, after, "mailsrv_logins_total", protocol="submission", mechanism="PLAIN", result="ok") == 1
    assert moved(before, after, "mailsrv_logins_total", protocol="odmr", mechanism="CRAM-MD5", result="ok") == 1
    assert moved(before, after, "mailsrv_sessions_started_total", protocol="pop3") == 2
    assert moved(before, after, "mailsrv_sessions_started_total", protocol="submission") == 1
    assert after[("mailsrv_sessions_open", frozenset({("protocol", "pop3")}))] == 1  # the reader
    assert moved(before, after, "mailsrv_messages_accepted_total", origin="submission") == 1
    assert moved(before, after, "mailsrv_messages_accepted_total", origin="smtp") == 1
    assert moved(before, after, "mailsrv_recipients_total", destination="local", result="delivered") == 1
    assert moved(before, after, "mailsrv_recipients_total", destination="remote", result="delivered") == 1
    assert moved(before, after, "mailsrv_relay_attempts_total", result="sent") == 1
    assert moved(before, after, "mailsrv_odmr_turns_total", result="no_mail") == 1
    assert after[("mailsrv_queue_recipients", frozenset({("state", "held")}))] == 1
    assert after[("mailsrv_queue_recipients", frozenset({("state", "queued")}))] == 0
    assert after[("mailsrv_queue_oldest_seconds", frozenset({("state", "held")}))] >= 0
    assert ("mailsrv_database_errors_total", frozenset()) in after


def test_metrics_are_off_unless_configured(app):
    with pytest.raises(KeyError):
        app.address("metrics")


# --- fail2ban ---------------------------------------------------------------------------


FAIL2BAN_REGEX = shutil.which("fail2ban-regex")


@pytest.mark.interop
@pytest.mark.skipif(FAIL2BAN_REGEX is None, reason="fail2ban is not installed")
def test_fail2ban_counts_exactly_the_failed_logins(make_app, store, tmp_path):
    store.directory.add_domain("customer.example", "odmr")
    store.directory.grant_odmr(ANN, "customer.example")
    log = tmp_path / "mailsrv.log"
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    failures = 0
    try:
        app = make_app(smtp={"listen": (), "submission": LOOPBACK}, odmr={"listen": LOOPBACK})
        for password in (GUESS, PASSWORD):  # a failure and a success on POP3, MPP and submission
            c, reply = pop3_login(app.address("pop3"), password)
            assert reply.startswith("+OK" if password == PASSWORD else "-ERR")
            c.close()
            c = LineClient(app.address("mpp"))
            c.line()
            c.ask(f"USER {ANN}")
            assert c.ask(f"PASS {password}").startswith("250" if password == PASSWORD else "530")
            c.close()
            with smtplib.SMTP(*app.address("submission"), timeout=10) as client:
                try:
                    client.login(ANN, password)
                except smtplib.SMTPAuthenticationError:
                    assert password == GUESS
            failures += 4 if password == GUESS else 0  # (smtplib tries PLAIN, then LOGIN: two failures)
        c = LineClient(app.address("pop"))  # RFC 918
        c.line()
        c.ask(f"USER {ANN}")
        assert c.ask(f"PASS {GUESS}").startswith("-")
        c.close()
        c, reply = odmr_login(app.address("odmr"), GUESS)
        assert reply.startswith("535")
        c.close()
        c, reply = pop3_login(app.address("pop3"), GUESS)  # then a name that tries to frame another address
        smuggler = base64.b64encode(f'\0x" rhost=10.9.8.7 user="y\0{GUESS}'.encode()).decode()
        assert c.ask(f"AUTH PLAIN {smuggler}").startswith("-ERR")
        c.close()
        failures += 4
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    assert GUESS not in log.read_text() and PASSWORD not in log.read_text()  # no password is ever logged
    result = subprocess.run([FAIL2BAN_REGEX, "-v", str(log), str(FILTER)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Failregex: {failures} total" in result.stdout, result.stdout
    hosts = {m.group(1) for m in re.finditer(r"(?m)^\|\s+(\S+)\s+\w{3} \w{3} +\d+ ", result.stdout)}
    assert hosts == {"127.0.0.1"}, result.stdout  # never the address a login name tried to smuggle in


# --- SIGHUP -----------------------------------------------------------------------------


def make_certificate(folder: Path, name: str, days: int = 30) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
                    "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def peer_certificate(address, starttls: bool = False) -> tuple[ssl.SSLSocket, bytes]:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    sock = socket.create_connection(address, timeout=10)
    if starttls:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"STLS\r\n")
        assert reader.readline().startswith(b"+OK")
    tls = context.wrap_socket(sock)
    return tls, tls.getpeercert(binary_form=True)


def wait_for_log(served: Served, needle: str) -> str:
    for line in served.proc.stderr:
        served.log.append(line)
        if needle in line:
            return line
    raise AssertionError(f"mailsrv ended without logging {needle!r}:\n" + "".join(served.log))


def test_sighup_reloads_the_certificate_for_new_sessions_only(tmp_path, db_url):
    old_cert, old_key = make_certificate(tmp_path, "old")
    new_cert, new_key = make_certificate(tmp_path, "new")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(old_cert, cert)
    shutil.copy(old_key, key)
    conf = shipped_config_on_ephemeral_ports(tmp_path, db_url)
    conf.write_text(conf.read_text().replace("listen_tls =\n", "listen_tls = 127.0.0.1:0\n", 1)
                    .replace("certfile =\nkeyfile =\n", f"certfile = {cert}\nkeyfile = {key}\n"))
    served = Served(conf)
    try:
        old_session, seen = peer_certificate(served.addresses["pop3s"])
        assert seen == der(old_cert)
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        served.proc.send_signal(signal.SIGHUP)
        wait_for_log(served, "reload: TLS certificate loaded")
        for starttls, address in ((False, served.addresses["pop3s"]), (True, served.addresses["pop3"])):
            session, seen = peer_certificate(address, starttls)
            assert seen == der(new_cert)
            session.close()
        assert old_session.getpeercert(binary_form=True) == der(old_cert)
        lines = old_session.makefile("rb")
        assert lines.readline().startswith(b"+OK")  # its greeting
        old_session.sendall(b"CAPA\r\n")  # the old session goes on
        assert lines.readline().startswith(b"+OK")

        cert.write_text("not a certificate\n")  # a bad one: logged, the current one stays
        served.proc.send_signal(signal.SIGHUP)
        assert "the old one stays" in wait_for_log(served, "reload:")
        session, seen = peer_certificate(served.addresses["pop3s"])
        assert seen == der(new_cert)
        session.close()
        old_session.close()
    finally:
        assert served.stop(signal.SIGTERM) == 0


def test_the_systemd_unit_reloads_with_sighup():
    unit = (ROOT / "scripts" / "mailsrv.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


# --- status and check -------------------------------------------------------------------


def status(conf) -> dict:
    result = mailsrv(conf, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def office(tmp_path):
    """The shipped configuration with a database URL from the tests (SQLite or
    PostgreSQL), a domain, ann, an ODMR domain granted to her."""
    def make(db_url: str) -> Path:
        conf = shipped_config_on_ephemeral_ports(tmp_path, db_url)
        for command in (["domain", "add", "example.org"], ["domain", "add", "customer.example", "--odmr"]):
            assert mailsrv(conf, *command).returncode == 0
        assert mailsrv(conf, "user", "add", ANN, "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
        assert mailsrv(conf, "odmr", "grant", ANN, "customer.example").returncode == 0
        return conf
    return make


def test_status_shows_processes_sessions_and_the_queue(office, db_url, store):
    conf = office(db_url)
    served = Served(conf)
    try:
        c, reply = pop3_login(served.addresses["pop3"], PASSWORD)
        assert reply.startswith("+OK")
        for _ in range(60):  # (each look is a `mailsrv status` run; the server announces within a second)
            now = status(conf)
            if now["processes"] and now["processes"][0]["sessions"].get("pop3") == 1:
                break
        (process,) = now["processes"]
        assert process["running"] and process["pid"] == served.proc.pid
        assert process["sessions"]["pop3"] == 1
        assert {"name": "pop3", "address": "{}:{}".format(*served.addresses["pop3"])} in process["listeners"]
        c.close()
        with smtplib.SMTP(*served.addresses["smtp"], timeout=10) as client:
            client.sendmail("a@example.net", ["x@customer.example"], b"Subject: held\r\n\r\ny\r\n")
        later = "CURRENT_TIMESTAMP + INTERVAL '1 hour'" if store.db.dialect == "postgresql" else "datetime('now', '+1 hour')"
        with store.db.write_core() as conn:  # a deferred recipient, as the relay leaves one
            queue_id = conn.execute(text("INSERT INTO queue (sender, body, size, origin, created_at) VALUES"
                                         " ('ann@example.org', 'x', 1, 'mpp', CURRENT_TIMESTAMP) RETURNING id")).scalar()
            conn.execute(text("INSERT INTO queue_recipients (queue_id, recipient, domain, state, attempts, next_attempt_at,"
                              f" last_error, updated_at) VALUES (:q, 'far@remote.example', 'remote.example', 'queued', 2,"
                              f" {later}, '451 4.7.1 greylisted', CURRENT_TIMESTAMP)"), {"q": queue_id})
        for _ in range(60):
            now = status(conf)
            if now["odmr_waiting"]:
                break
        assert now["odmr_waiting"][0]["domain"] == "customer.example"
        assert now["odmr_waiting"][0]["accounts"] == [ANN] and now["odmr_waiting"][0]["messages"] == 1
        assert now["queue"]["held"]["recipients"] == 1
        assert now["oldest_deferred"]["recipient"] == "far@remote.example"
        assert now["oldest_deferred"]["last_error"] == "451 4.7.1 greylisted"
        assert now["last_errors"]["remote.example"]["error"] == "451 4.7.1 greylisted"
        readable = mailsrv(conf, "status")
        assert readable.returncode == 0
        for words in ("running", "pop3 ", "held", "customer.example", "greylisted"):
            assert words in readable.stdout
    finally:
        assert served.stop(signal.SIGTERM) == 0
    assert status(conf)["processes"] == []  # a stopped process takes its row away


def test_check_passes_a_good_office_and_knows_its_own_ports(office, db_url, tmp_path):
    conf = office(db_url)
    port = free_port()
    conf.write_text(conf.read_text().replace("listen = 127.0.0.1:0\n", f"listen = 127.0.0.1:{port}\n", 1))
    result = mailsrv(conf, "check")
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-1] == "no problems"
    assert f"ok: [pop3] listen 127.0.0.1:{port}: free" in result.stdout
    served = Served(conf)
    try:
        assert served.addresses["pop3"] == ("127.0.0.1", port)
        for _ in range(60):  # (until the server has announced its listeners)
            result = mailsrv(conf, "check")
            if "bound by the running mailsrv" in result.stdout:
                break
        assert result.returncode == 0, result.stdout
        assert f"ok: [pop3] listen 127.0.0.1:{port}: bound by the running mailsrv (pid {served.proc.pid})" in result.stdout
    finally:
        assert served.stop(signal.SIGTERM) == 0
    with socket.create_server(("127.0.0.1", port)):  # another program on the port
        result = mailsrv(conf, "check")
    assert result.returncode == 1
    assert f"problem: [pop3] listen 127.0.0.1:{port}: cannot be bound: Address already in use" in result.stdout


def test_check_names_every_problem_and_changes_nothing(tmp_path):
    conf = shipped_config_on_ephemeral_ports(tmp_path)
    soon_cert, soon_key = make_certificate(tmp_path, "soon", days=1)
    _, other_key = make_certificate(tmp_path, "other")
    conf.write_text(conf.read_text().replace("bcrypt_rounds = 4", "bcrypt_rounds = 99")
                    .replace("workers = 2", "workers = 2\nworkerz = 3")
                    .replace("certfile =\nkeyfile =\n", f"certfile = {soon_cert}\nkeyfile = {other_key}\n"))
    result = mailsrv(conf, "check")
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert f"problem: {conf}: [auth] bcrypt_rounds: bcrypt rounds must be 4..31: '99'" in problems
    assert f"problem: {conf}: [delivery] unknown key 'workerz'" in problems
    assert any("no database at" in p and "mailsrv db upgrade" in p for p in problems)
    assert any(f"{soon_cert} and {other_key} do not load together" in p for p in problems)
    assert result.stdout.splitlines()[-1] == f"{len(problems)} problem(s)"
    assert not (tmp_path / "mailsrv.db").exists()  # check made nothing

    conf.write_text(conf.read_text().replace("bcrypt_rounds = 99", "bcrypt_rounds = 4").replace("workerz = 3\n", "")
                    .replace(f"keyfile = {other_key}", f"keyfile = {soon_key}"))
    assert mailsrv(conf, "domain", "add", "empty.example").returncode == 0  # (this creates the database)
    assert mailsrv(conf, "domain", "add", "nobody.example", "--odmr").returncode == 0
    result = mailsrv(conf, "check")
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 3, result.stdout
    assert any(f"TLS certificate {soon_cert} expires on" in p and "in 1 day(s)" in p for p in problems)
    assert any("local domain empty.example has no account and no alias" in p for p in problems)
    assert any("ODMR domain nobody.example is granted to no account" in p for p in problems)
    assert "ok: database answers, schema at revision" in result.stdout
