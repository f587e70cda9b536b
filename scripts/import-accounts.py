#!/usr/bin/env python3
"""Bulk account import: one `address,password` per CSV line (a header line is allowed).

    scripts/import-accounts.py [-c mailsrv.conf] [--cram-md5] [--create-domains] accounts.csv

Each account is added with the `mailsrv` command (so the same rules and messages apply) and
each line gets one report line: `added`, `exists`, or `refused: reason`. The password goes
to the command on its standard input, never on a command line. Exit status: 0 when every
line was added or existed already, 1 when any was refused, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys


def mailsrv(conf: list[str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailsrv.cli", *conf, *args], input=stdin, capture_output=True, text=True
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", help="the mailsrv configuration file")
    parser.add_argument("--cram-md5", action="store_true", help="also store CRAM-MD5/APOP secrets")
    parser.add_argument("--create-domains", action="store_true", help="add missing local domains")
    parser.add_argument("csvfile", help="address,password lines ('-' for standard input)")
    args = parser.parse_args(argv)
    conf = ["-c", args.config] if args.config else []
    handle = sys.stdin if args.csvfile == "-" else open(args.csvfile, newline="", encoding="utf-8")
    refused = 0
    with handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row or not "".join(row).strip():
                continue
            if number == 1 and [c.strip().lower() for c in row[:2]] == ["address", "password"]:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1]:
                print(f"line {number}: refused: expected address,password")
                refused += 1
                continue
            address, password = row[0].strip(), row[1]
            if args.create_domains and "@" in address:
                mailsrv(conf, "domain", "add", address.rpartition("@")[2])
            extra = ["--cram-md5"] if args.cram_md5 else []
            result = mailsrv(conf, "user", "add", address, "--password-stdin", *extra, stdin=password + "\n")
            reason = result.stderr.strip().removeprefix("mailsrv: ")
            if result.returncode == 0:
                print(f"line {number}: {address}: added")
            elif "exists already" in reason:
                print(f"line {number}: {address}: exists")
            else:
                print(f"line {number}: {address}: refused: {reason}")
                refused += 1
                if result.returncode == 2:
                    return 2
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
