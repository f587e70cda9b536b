"""The `mailsrv` command: every subcommand, its refusals and exit codes, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from sqlalchemy import text

from mailsrv import cli, migrate
from mailsrv import db as dbmod


@pytest.fixture
def conf(tmp_path, db_url):
    path = tmp_path / "mailsrv.conf"
    path.write_text(f"[server]\ndatabase = {db_url}\n[auth]\nbcrypt_rounds = 4\n")
    return str(path)


@pytest.fixture
def run(conf, capsys, monkeypatch):
    """Run `mailsrv -c conf ARGS` in-process: (exit status, stdout, stderr)."""

    def invoke(*args: str, stdin: str | None = None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        status = cli.main(["-c", conf, *args])
        out, err = capsys.readouterr()
        return status, out, err

    return invoke


def rows(db_url: str, sql: str):
    database = dbmod.Database(db_url)
    try:
        with database.read() as s:
            return [tuple(r) for r in s.execute(text(sql))]
    finally:
        database.dispose()


def test_db_init_and_upgrade_are_idempotent(run):
    status, out, _ = run("db", "init")
    assert status == 0 and f"revision {migrate.HEAD_REVISION}" in out
    status, out, _ = run("db", "init")
    assert status == 0 and f"already at revision {migrate.HEAD_REVISION}" in out
    status, out, _ = run("db", "upgrade")
    assert status == 0 and "already" in out


def test_domains(run):
    assert run("domain", "add", "Example.ORG")[0] == 0
    assert run("domain", "add", "customer.example", "--odmr")[0] == 0
    status, _, err = run("domain", "add", "example.org")
    assert status == 1 and "exists already" in err
    status, out, _ = run("domain", "list")
    assert status == 0
    assert "example.org" in out and "customer.example  odmr" in out
    status, _, err = run("domain", "del", "nowhere.example")
    assert status == 1 and "no such domain" in err
    assert run("domain", "del", "customer.example")[0] == 0
    assert "customer.example" not in run("domain", "list")[1]


def test_users_store_bcrypt_hashes_and_never_the_password(run, db_url, tmp_path):
    run("domain", "add", "example.org")
    status, out, _ = run("user", "add", "Ann@Example.org", "--password-stdin", "--quota", "10M", stdin="s3cret-ann\n")
    assert status == 0 and "ann@example.org" in out
    status, _, _ = run("user", "add", "cram@example.org", "--password-stdin", "--cram-md5", stdin="s3cret-cram\n")
    assert status == 0
    table = dict((a, (h, c, q)) for a, h, c, q in rows(db_url, "SELECT address, password_hash, cram_secret, quota_bytes FROM accounts"))
    ann_hash, ann_cram, ann_quota = table["ann@example.org"]
    assert ann_hash.startswith("$2b$04$") and "s3cret" not in ann_hash
    assert ann_cram is None and ann_quota == 10 * 1024 * 1024
    cram_hash, cram_secret, _ = table["cram@example.org"]
    assert cram_hash.startswith("$2b$04$") and "s3cret" not in cram_hash
    assert cram_secret == "s3cret-cram"  # plaintext-equivalent by design, only with --cram-md5
    if db_url.startswith("sqlite"):
        raw = b"".join(p.read_bytes() for p in tmp_path.glob("mailsrv.db*"))
        assert b"s3cret-ann" not in raw


def test_user_refusals(run):
    run("domain", "add", "example.org")
    run("domain", "add", "odmr.example", "--odmr")
    assert run("user", "add", "ann@example.org", "--password-stdin", stdin="pw\n")[0] == 0
    status, _, err = run("user", "add", "ann@example.org", "--password-stdin", stdin="pw\n")
    assert status == 1 and "exists already" in err
    status, _, err = run("user", "add", "zed@unknown.example", "--password-stdin", stdin="pw\n")
    assert status == 1 and "unknown domain" in err
    status, _, err = run("user", "add", "zed@odmr.example", "--password-stdin", stdin="pw\n")
    assert status == 1 and "ODMR" in err
    status, _, err = run("user", "add", "not-an-address", "--password-stdin", stdin="pw\n")
    assert status == 1 and "not an address" in err
    status, _, err = run("user", "add", "eve@example.org", "--password-stdin", stdin="\n")
    assert status == 1 and "empty password" in err
    for action in ("del", "disable", "enable"):
        status, _, err = run("user", action, "nobody@example.org")
        assert status == 1 and "no such user" in err
    status, _, err = run("user", "passwd", "nobody@example.org", "--password-stdin", stdin="pw\n")
    assert status == 1 and "no such user" in err
    status, _, err = run("user", "add", "eve@example.org", "--password-stdin", "--quota", "lots", stdin="pw\n")
    assert status == 2
    assert "eve@" not in run("user", "list")[1]


def test_user_passwd_disable_enable_del(run, db_url):
    run("domain", "add", "example.org")
    run("user", "add", "ann@example.org", "--password-stdin", stdin="one\n")
    (before,) = rows(db_url, "SELECT password_hash FROM accounts")
    assert run("user", "passwd", "ann@example.org", "--password-stdin", "--cram-md5", stdin="two\n")[0] == 0
    (after,) = rows(db_url, "SELECT password_hash, cram_secret FROM accounts")
    assert after[0] != before[0] and after[1] == "two"
    assert run("user", "disable", "ann@example.org")[0] == 0
    assert rows(db_url, "SELECT enabled FROM accounts") == [(False,)]
    assert "ann@example.org  no" in run("user", "list")[1]
    assert run("user", "enable", "ann@example.org")[0] == 0
    assert rows(db_url, "SELECT enabled FROM accounts") == [(True,)]
    assert run("user", "del", "ann@example.org")[0] == 0
    assert rows(db_url, "SELECT count(*) FROM accounts") == [(0,)]


def test_password_without_terminal_is_a_usage_error(run):
    run("domain", "add", "example.org")
    status, _, err = run("user", "add", "ann@example.org", stdin="")
    assert status == 2 and "--password-stdin" in err


def test_aliases(run):
    run("domain", "add", "example.org")
    run("user", "add", "ann@example.org", "--password-stdin", stdin="pw\n")
    assert run("alias", "add", "Sales@example.org", "ann@example.org")[0] == 0
    assert run("alias", "add", "fwd@example.org", "someone@elsewhere.example")[0] == 0
    status, _, err = run("alias", "add", "sales@example.org", "ann@example.org")
    assert status == 1 and "exists already" in err
    status, _, err = run("alias", "add", "ann@example.org", "bob@example.org")
    assert status == 1 and "is a user" in err
    status, _, err = run("alias", "add", "x@unknown.example", "ann@example.org")
    assert status == 1 and "not a local domain" in err
    out = run("alias", "list")[1]
    assert "sales@example.org  ann@example.org" in out
    assert run("alias", "del", "sales@example.org")[0] == 0
    status, _, err = run("alias", "del", "sales@example.org")
    assert status == 1 and "no such alias" in err
    status, _, err = run("user", "add", "fwd@example.org", "--password-stdin", stdin="pw\n")
    assert status == 1 and "alias" in err


def test_odmr_grants(run):
    run("domain", "add", "example.org")
    run("domain", "add", "customer.example", "--odmr")
    run("user", "add", "cust@example.org", "--password-stdin", "--cram-md5", stdin="pw\n")
    assert run("odmr", "grant", "cust@example.org", "customer.example")[0] == 0
    status, _, err = run("odmr", "grant", "cust@example.org", "customer.example")
    assert status == 1 and "already" in err
    status, _, err = run("odmr", "grant", "cust@example.org", "example.org")
    assert status == 1 and "local domain" in err
    status, _, err = run("odmr", "grant", "nobody@example.org", "customer.example")
    assert status == 1 and "no such user" in err
    status, _, err = run("odmr", "grant", "cust@example.org", "unknown.example")
    assert status == 1 and "unknown domain" in err
    assert "cust@example.org  customer.example" in run("odmr", "list")[1]
    assert run("odmr", "revoke", "cust@example.org", "customer.example")[0] == 0
    status, _, err = run("odmr", "revoke", "cust@example.org", "customer.example")
    assert status == 1 and "no grant" in err


def test_mailbox_list(run, db_url):
    run("domain", "add", "example.org")
    run("user", "add", "ann@example.org", "--password-stdin", stdin="pw\n")
    database = dbmod.Database(db_url)
    from mailsrv.store import Store

    store = Store(database)
    account = store.directory.find_account("ann@example.org")
    store.maildrops.deliver_local(account.id, b"Subject: hi\r\n\r\nhello\r\n", sender="bob@example.org")
    database.dispose()
    status, out, _ = run("mailbox", "list", "ann@example.org")
    assert status == 0 and "bob@example.org" in out and " 22 " in out
    status, _, err = run("mailbox", "list", "nobody@example.org")
    assert status == 1 and "no such user" in err


@pytest.mark.parametrize("argv", [[], ["user"], ["user", "frobnicate"], ["domain", "add"], ["queue", "show", "x"]])
def test_usage_errors_exit_2(run, argv):
    assert run(*argv)[0] == 2


def test_db_schema_prints_runnable_ddl(run):
    status, out, _ = run("db", "schema", "--dialect", "postgresql")
    assert status == 0 and "CREATE TABLE queue_recipients" in out and "TIMESTAMP WITH TIME ZONE" in out


def test_console_script_is_installed():
    """The `mailsrv` entry point exists (pip install put it next to this Python)."""
    result = subprocess.run(
        [sys.executable, "-m", "mailsrv.cli", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "mailsrv 0.1.0" in result.stdout


def run_on_terminal(conf: str, args: list[str], answers: list[str]) -> tuple[int, str]:
    """Run the command with a pseudo-terminal as its controlling terminal, typing each
    answer when asked; return (exit status, what the terminal showed)."""
    import os
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its terminal
        os.execv(sys.executable, [sys.executable, "-m", "mailsrv.cli", "-c", conf, *args])
    shown = b""
    for answer in answers:
        while b":" not in shown.rsplit(b"\n", 1)[-1]:
            shown += os.read(fd, 1024)
        os.write(fd, answer.encode() + b"\n")
        shown += b"\n"
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_password_asked_twice_on_a_terminal(conf, run, db_url):
    run("domain", "add", "example.org")
    status, shown = run_on_terminal(conf, ["user", "add", "tty@example.org"], ["typed-secret", "typed-secret"])
    assert status == 0, shown
    assert "Password:" in shown and "Again:" in shown and "typed-secret" not in shown  # not echoed
    from mailsrv.auth import check_password

    ((hashed,),) = rows(db_url, "SELECT password_hash FROM accounts WHERE address = 'tty@example.org'")
    assert check_password("typed-secret", hashed)
    status, shown = run_on_terminal(conf, ["user", "add", "typo@example.org"], ["one", "two"])
    assert status == 1 and "differ" in shown
    assert rows(db_url, "SELECT count(*) FROM accounts WHERE address = 'typo@example.org'") == [(0,)]


def test_dkim_keygen_writes_a_private_key_and_prints_the_record(run, tmp_path):
    status, out, _ = run("dkim", "keygen", "Example.ORG")
    key = tmp_path / "dkim" / "example.org.mailsrv.key"  # [dkim] key_dir, beside the config
    assert status == 0 and f"key written to {key}" in out
    assert 'mailsrv._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=' in out
    assert key.stat().st_mode & 0o777 == 0o600
    status, _, err = run("dkim", "keygen", "example.org")
    assert status == 1 and "exists already" in err  # never overwritten


def test_odmr_list_shows_what_waits_for_each_domain(run, db_url, tmp_path):
    from mailsrv.delivery.worker import Worker
    from mailsrv.store import Store

    from .conftest import make_config

    run("domain", "add", "example.org")
    run("domain", "add", "customer.example", "--odmr")
    run("domain", "add", "idle.example", "--odmr")
    run("user", "add", "cust@example.org", "--password-stdin", "--cram-md5", stdin="pw\n")
    run("odmr", "grant", "cust@example.org", "customer.example")
    database = dbmod.Database(db_url)
    store = Store(database)
    store.queue.enqueue("a@b.example", b"x" * 1000 + b"\r\n", ["p@customer.example", "q@customer.example"], "smtp")
    store.queue.enqueue("a@b.example", b"y" * 2000 + b"\r\n", ["r@customer.example"], "smtp")
    Worker(store, make_config(db_url, tmp_path), "t").run_once()
    database.dispose()
    out = run("odmr", "list")[1].splitlines()
    assert out[0].split() == ["user", "domain", "waiting", "size", "oldest"]
    assert out[2].split()[:4] == ["cust@example.org", "customer.example", "2", "2.9K"]
    assert out[3].split()[:5] == ["-", "idle.example", "0", "0", "-"]
