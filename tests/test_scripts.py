"""The operator scripts: bulk import reports per line; backups are consistent copies."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def conf(tmp_path, db_url):
    path = tmp_path / "mailsrv.conf"
    path.write_text(f"[server]\ndatabase = {db_url}\n[auth]\nbcrypt_rounds = 4\n")
    return path


def script(name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_import_reports_each_line(conf, store):
    store.directory.add_domain("example.org")
    csv_text = "address,password\nann@example.org,pw1\nbob@example.org,\"p,w 2\"\nann@example.org,again\nzed@unknown.example,pw\nbroken line\n"
    result = script("import-accounts.py", "-c", str(conf), "-", stdin=csv_text)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "line 2: ann@example.org: added",
        "line 3: bob@example.org: added",
        "line 4: ann@example.org: exists",
        "line 5: zed@unknown.example: refused: unknown domain unknown.example: add it first with `mailsrv domain add`",
        "line 6: refused: expected address,password",
    ]
    from mailsrv.auth import check_password

    assert check_password("p,w 2", store.directory.find_account("bob@example.org").password_hash)


def test_import_can_create_domains(conf, store):
    result = script("import-accounts.py", "-c", str(conf), "--create-domains", "-", stdin="x@new.example,pw\n")
    assert result.returncode == 0 and "added" in result.stdout
    assert store.directory.domain_kind("new.example") == "local"


def test_backup_is_a_consistent_copy(conf, store, accounts, tmp_path, db_url):
    from .conftest import deliver

    for i in range(20):
        deliver(store, "ann@example.org", f"Subject: {i}\r\n\r\nx\r\n".encode())
    dest = tmp_path / "backup.out"
    if db_url.startswith("postgresql") and shutil.which("pg_dump") is None:
        pytest.skip("pg_dump is not installed")
    result = script("backup.py", "-c", str(conf), str(dest))
    assert result.returncode == 0, result.stderr
    if db_url.startswith("sqlite"):
        copy = sqlite3.connect(dest)
        assert copy.execute("SELECT count(*) FROM messages").fetchone() == (20,)
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        copy.close()
    else:
        listing = subprocess.run(["pg_restore", "--list", str(dest)], capture_output=True, text=True)
        assert "TABLE DATA" in listing.stdout and "messages" in listing.stdout
