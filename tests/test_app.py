"""`mailsrv serve` as a process: first start creates the database, SIGTERM/SIGINT stop it
cleanly within 5 s with sessions open, and a restart finds no stale maildrop lock."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mailsrv.protocols.pop3 import Pop3Handler

from .conftest import PASSWORD, LineClient

SHIPPED = Path(__file__).resolve().parent.parent / "mailsrv.conf"
LISTENING = re.compile(r"(\w+) listening on ([\d.]+):(\d+)")


def shipped_config_on_ephemeral_ports(folder: Path, database: str | None = None) -> Path:
    """The shipped mailsrv.conf with only the listen addresses changed to 127.0.0.1:0."""
    text = SHIPPED.read_text()
    text = re.sub(r"(?m)^(listen|submission) = 0\.0\.0\.0:\d+$", r"\1 = 127.0.0.1:0", text)
    text = text.replace("bcrypt_rounds = 12", "bcrypt_rounds = 4").replace("failure_delay = 2s", "failure_delay = 0")
    if database:
        text = text.replace("database = sqlite:///mailsrv.db", f"database = {database}")
    path = folder / "mailsrv.conf"
    path.write_text(text)
    return path


def mailsrv(conf: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailsrv.cli", "-c", str(conf), *args],
        input=stdin, capture_output=True, text=True, timeout=60,
    )


class Served:
    """A `mailsrv serve` child process and the addresses it logged."""

    def __init__(self, conf: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailsrv.cli", "-c", str(conf), "serve"],
            stderr=subprocess.PIPE, text=True,
        )
        self.addresses: dict[str, tuple[str, int]] = {}
        self.log: list[str] = []
        for line in self.proc.stderr:
            self.log.append(line)
            match = LISTENING.search(line)
            if match:
                self.addresses[match.group(1)] = (match.group(2), int(match.group(3)))
            if "mailsrv ready" in line:
                return
        raise AssertionError("mailsrv serve ended early:\n" + "".join(self.log))

    def drain(self) -> None:
        """Keep reading the log from now on (a busy server fills the pipe otherwise, and
        then waits on it); ``stop`` still returns with all of it in ``log``."""
        def read() -> None:
            for line in self.proc.stderr:
                self.log.append(line)

        self.drainer = threading.Thread(target=read, daemon=True)
        self.drainer.start()

    def stop(self, signum: int) -> int:
        self.proc.send_signal(signum)
        try:
            status = self.proc.wait(timeout=5)  # the promise: stopped within 5 s
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        if getattr(self, "drainer", None) is not None:
            self.drainer.join(5)
        else:
            self.log.extend(self.proc.stderr.read().splitlines(keepends=True))
        return status


def pop3_login(address) -> LineClient:
    """A POP3 session logged in as ann (the lock is free), or an AssertionError."""
    c = LineClient(address)
    c.line()
    c.ask("USER ann@example.org")
    assert c.ask(f"PASS {PASSWORD}").startswith("+OK")
    return c


@pytest.fixture
def served(tmp_path):
    conf = shipped_config_on_ephemeral_ports(tmp_path)
    assert mailsrv(conf, "domain", "add", "example.org").returncode == 0
    assert mailsrv(conf, "user", "add", "ann@example.org", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    server = Served(conf)
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


def test_first_start_creates_the_database(tmp_path):
    conf = shipped_config_on_ephemeral_ports(tmp_path)
    assert not (tmp_path / "mailsrv.db").exists()
    server = Served(conf)
    try:
        assert (tmp_path / "mailsrv.db").exists()
        assert {"pop3", "pop"} <= set(server.addresses)
    finally:
        assert server.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_sessions_open(served, signum, tmp_path):
    idle = [LineClient(served.addresses["pop3"]) for _ in range(5)]
    for c in idle:
        assert c.line().startswith("+OK")
    busy = pop3_login(served.addresses["pop3"])
    assert served.stop(signum) == 0
    for c in [*idle, busy]:
        assert c.line() == Pop3Handler.REPLY_SHUTDOWN  # cut off with a reply, then closed
        assert c.closed()
        c.close()
    assert any("stopped" in line for line in served.log)
    assert not any("(some sessions did not end in time)" in line for line in served.log)
    # a restart finds the mailbox free at once
    again = Served(tmp_path / "mailsrv.conf")
    try:
        pop3_login(again.addresses["pop3"]).close()
    finally:
        assert again.stop(signal.SIGTERM) == 0


def test_sigkill_leaves_a_lock_that_the_restart_takes_back(served, tmp_path):
    c = pop3_login(served.addresses["pop3"])
    served.proc.kill()
    served.proc.wait()
    c.close()
    again = Served(tmp_path / "mailsrv.conf")
    try:
        assert any("released 1 maildrop lock" in line for line in again.log)
        pop3_login(again.addresses["pop3"]).close()
    finally:
        assert again.stop(signal.SIGTERM) == 0


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    conf = shipped_config_on_ephemeral_ports(tmp_path)
    text = conf.read_text()
    assert "listen = 127.0.0.1:0" in text
    conf.write_text(text.replace("listen = 127.0.0.1:0", f"listen = 127.0.0.1:{port}", 1))
    result = subprocess.run([sys.executable, "-m", "mailsrv.cli", "-c", str(conf), "serve"], capture_output=True, text=True, timeout=60)
    blocker.close()
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr



@pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root")
def test_root_binds_then_runs_as_the_configured_user():
    """Started as root with [server] user = nobody: the ports are bound, the process then
    runs as nobody, and the SQLite database (given to nobody) still takes writes."""
    import pwd
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mailsrv-drop-"))
    folder.chmod(0o755)  # pytest's own folders are closed to nobody
    try:
        conf = shipped_config_on_ephemeral_ports(folder)
        conf.write_text(conf.read_text().replace("\nuser =\n", "\nuser = nobody\n"))
        assert mailsrv(conf, "domain", "add", "example.org").returncode == 0
        assert mailsrv(conf, "user", "add", "ann@example.org", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
        server = Served(conf)
        try:
            status = Path(f"/proc/{server.proc.pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert set(uid_line.split()[1:]) == {str(pwd.getpwnam("nobody").pw_uid)}
            pop3_login(server.addresses["pop3"]).close()  # a login writes the lock row
            # post to an unknown user: the queue, a worker and the bounce all run as nobody
            c = LineClient(server.addresses["mpp"])
            c.line()
            c.ask("USER ann@example.org")
            c.ask(f"PASS {PASSWORD}")
            c.ask("DATA")
            assert c.ask(b"To: nobody@example.org\r\n\r\nhello\r\n.\r\n").startswith("250")
            c.close()
            for line in server.proc.stderr:  # the server says when it has delivered the bounce
                server.log.append(line)
                assert "Traceback" not in line, "".join(server.log)
                if "<ann@example.org> deliver" in line:
                    break
            reader = pop3_login(server.addresses["pop3"])
            assert reader.ask("STAT").startswith("+OK 1 ")
            reader.close()
        finally:
            assert server.stop(signal.SIGTERM) == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _thread_cpus(pid: int) -> dict[str, str]:
    """Each thread of the process -> its Cpus_allowed_list."""
    cpus = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                cpus[task.name] = line.split(":", 1)[1].strip()
    return cpus


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("pin", ["yes", "no"])
def test_pin_cpu_keeps_the_session_threads_on_one_cpu(tmp_path, pin):
    """pin_cpu = yes: every thread on the highest CPU but the one password-check thread a
    login started, which runs on all of them; pin_cpu = no: every thread on all of them."""
    conf = shipped_config_on_ephemeral_ports(tmp_path)
    conf.write_text(conf.read_text().replace("pin_cpu = yes", f"pin_cpu = {pin}"))
    assert mailsrv(conf, "domain", "add", "example.org").returncode == 0
    assert mailsrv(conf, "user", "add", "ann@example.org", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    server = Served(conf)
    try:
        session = pop3_login(server.addresses["pop3"])  # (a session thread, and a check)
        cpus = list(_thread_cpus(server.proc.pid).values())
        session.ask("QUIT")
        everything = _thread_cpus(os.getpid())[str(threading.get_native_id())]
        highest = str(max(os.sched_getaffinity(0)))
        if pin == "yes":
            assert sorted(set(cpus)) == sorted({highest, everything})
            assert cpus.count(everything) == 1
            assert any(f"threads kept on CPU {highest}" in line for line in server.log)
        else:
            assert set(cpus) == {everything}
            assert not any("threads kept on CPU" in line for line in server.log)
    finally:
        assert server.stop(signal.SIGTERM) == 0
