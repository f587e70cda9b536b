#!/usr/bin/env python3
"""A consistent online backup of the mailsrv database while the server runs.

    scripts/backup.py [-c mailsrv.conf] DEST

SQLite: the SQLite online backup API copies the database page by page into DEST, a
database file that `sqlite3 DEST` opens directly (no -wal needed). PostgreSQL: `pg_dump`
in its custom format (restore with `pg_restore`), a consistent snapshot by construction.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys

from sqlalchemy.engine import make_url

from mailsrv.config import ConfigError, load_config


def backup_sqlite(path: str, dest: str) -> None:
    source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    target = sqlite3.connect(dest)
    with target:
        source.backup(target, pages=1024)
    target.close()
    source.close()


def backup_postgresql(url: str, dest: str) -> None:
    parsed = make_url(url)
    env = dict(os.environ)
    if parsed.password:
        env["PGPASSWORD"] = parsed.password
    command = ["pg_dump", "--format=custom", "--file", dest, "--dbname", parsed.database or "postgres"]
    if parsed.host:
        command += ["--host", parsed.host]
    if parsed.port:
        command += ["--port", str(parsed.port)]
    if parsed.username:
        command += ["--username", parsed.username]
    options = parsed.query.get("options", "")
    if "search_path=" in options:
        command += ["--schema", options.split("search_path=", 1)[1].split()[0]]
    subprocess.run(command, check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config")
    parser.add_argument("dest")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"backup: {exc}", file=sys.stderr)
        return 2
    url = config.server.database
    backend = make_url(url).get_backend_name()
    try:
        if backend == "sqlite":
            backup_sqlite(make_url(url).database, args.dest)
        elif backend == "postgresql":
            backup_postgresql(url, args.dest)
        else:
            print(f"backup: no backup method for {backend}", file=sys.stderr)
            return 1
    except (OSError, sqlite3.Error, subprocess.CalledProcessError) as exc:
        print(f"backup: failed: {exc}", file=sys.stderr)
        return 1
    print(f"backup of {backend} database written to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
