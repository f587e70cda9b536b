"""Importing old mail: `mailsrv mailbox import` beside `doveadm import` into Dovecot.

    python bench/import.py [--messages 10000] [--rounds 3] [--database sqlite|postgresql]

A Maildir of N messages of 10 KB (a third of them seen, each with its own arrival time)
is imported into one mailbox, by `mailsrv mailbox import ADDRESS MAILDIR` (the real
command, its own process) and by `doveadm import -u USER maildir:MAILDIR "" all` into a
Dovecot configured as in bench/pop3.py (Maildir mail_location; Dovecot runs, with no
protocol, for its auth service, which answers doveadm's user lookup). Figures: messages per second over the command's
whole run (start to exit), and the command's peak memory (its maximum resident set, from
wait4). The two take turns, each round into an empty mailbox.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, MailsrvWithStore, print_side_by_side, temp_folder

USER = "bench@bench.example"


def make_maildir(folder: Path, count: int) -> Path:
    maildir = folder / "source" / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    line = b"Dear colleagues, the quarterly figures are attached to this message as promised.\n"
    start = time.time() - count * 60
    for n in range(count):
        header = f"From: sender{n}@example.net\nTo: {USER}\nSubject: old mail {n}\nMessage-ID: <{n}@example.net>\n\n"
        body = header.encode() + line * ((10 * 1024 - len(header)) // len(line))
        name = f"{int(start) + n * 60}.M{n}P1.oldhost:2,{'S' if n % 3 == 0 else ''}"
        path = maildir / "cur" / name
        path.write_bytes(body)
        os.utime(path, (start + n * 60, start + n * 60))
    nobody = pwd.getpwnam("nobody")
    for p in [folder / "source", *(folder / "source").rglob("*")]:  # (doveadm works on it as the mail
        os.chown(p, nobody.pw_uid, nobody.pw_gid)                     # user, and writes its index there)
    return maildir


def timed(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run a command; return (seconds, peak resident MiB) of that process alone."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    took = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {process.returncode}: {process.stderr.read().decode()[-2000:]}")
    return took, usage.ru_maxrss / 1024


class Mailsrv:
    def __init__(self, folder: Path, database: str):
        from mailsrv.auth import hash_password

        self.name = "mailsrv" if database == "sqlite" else "mailsrv (PostgreSQL)"
        (folder / "mailsrv").mkdir()
        self.server = MailsrvWithStore(folder / "mailsrv", "bench.example", database=database)
        self.account = self.server.store.directory.add_account(USER, hash_password("x", 4))

    def clear(self) -> None:
        from sqlalchemy import text

        with self.server.db.write_core() as conn:
            conn.execute(text("DELETE FROM messages"))

    def run(self, maildir: Path) -> tuple[float, float]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return timed([sys.executable, "-m", "mailsrv.cli", "-c", str(self.server.process.conf), "mailbox", "import",
                      USER, str(maildir)], env)

    def count(self) -> int:
        return len(self.server.store.maildrops.snapshot(self.account.id))

    def stop(self) -> None:
        self.server.db.dispose()
        if self.server.schema:
            from common import drop_postgres_schema

            drop_postgres_schema(self.server.schema)


class Dovecot:
    name = "dovecot"

    def __init__(self, folder: Path):
        if shutil.which("doveadm") is None:
            raise SystemExit("Dovecot is not installed: apt-get install -y dovecot-pop3d (for doveadm)")
        nobody = pwd.getpwnam("nobody")
        self.folder = folder / "dovecot"
        for sub in ("home", "run", "state"):
            (self.folder / sub).mkdir(parents=True)
        (self.folder / "home").chmod(0o777)
        (self.folder / "passwd").write_text(f"{USER}:{{PLAIN}}x::::::\n")
        self.home = self.folder / "home" / USER
        self.conf = self.folder / "dovecot.conf"
        self.conf.write_text(f"""
instance_name = mailsrv-bench-import
base_dir = {self.folder}/run
state_dir = {self.folder}/state
log_path = {self.folder}/dovecot.log
protocols =
ssl = no
mail_location = maildir:~/Maildir
first_valid_uid = 1
last_valid_uid = 0
passdb {{
  driver = passwd-file
  args = {self.folder}/passwd
}}
userdb {{
  driver = passwd-file
  args = {self.folder}/passwd
  default_fields = uid={nobody.pw_uid} gid={nobody.pw_gid} home={self.folder}/home/%u
}}
""")
        subprocess.run(["dovecot", "-c", str(self.conf)], check=True)  # (its auth service answers doveadm's lookups)

    def clear(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    def run(self, maildir: Path) -> tuple[float, float]:
        return timed(["doveadm", "-c", str(self.conf), "import", "-u", USER, f"maildir:{maildir}", "", "all"])

    def count(self) -> int:
        box = self.home / "Maildir"
        return sum(len(os.listdir(box / sub)) for sub in ("cur", "new") if (box / sub).is_dir())

    def stop(self) -> None:
        subprocess.run(["dovecot", "-c", str(self.conf), "stop"], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    folder = temp_folder("bench-import-")
    maildir = make_maildir(folder, args.messages)
    size = sum(p.stat().st_size for p in (maildir / "cur").iterdir())
    print(f"source: {args.messages} messages, {size / 1024 / 1024:.0f} MiB, in {maildir}", flush=True)
    importers = [Mailsrv(folder, args.database), Dovecot(folder)]
    rates: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {}
    try:
        for round_ in range(args.rounds):
            for importer in importers:  # (they take turns, so both see the same machine)
                importer.clear()
                took, peak = importer.run(maildir)
                got = importer.count()
                if got != args.messages:
                    raise RuntimeError(f"{importer.name} imported {got} of {args.messages}")
                rates.setdefault(importer.name, []).append(args.messages / took)
                peaks.setdefault(importer.name, []).append(peak)
                print(f"  round {round_ + 1}, {importer.name}: {args.messages / took:.0f} messages/s,"
                      f" peak {peak:.0f} MiB", flush=True)
    finally:
        for importer in importers:
            importer.stop()
        shutil.rmtree(folder, ignore_errors=True)
    results = {name: {"imported messages/s": statistics.median(rates[name]),
                      "peak memory, MiB": statistics.median(peaks[name])} for name in rates}
    print_side_by_side(results, 24, 0)
    print(f"\n{args.messages} messages of 10 KB from one Maildir into one mailbox; medians of {args.rounds} rounds")


if __name__ == "__main__":
    main()
