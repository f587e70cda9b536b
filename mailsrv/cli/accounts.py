"""``mailsrv domain``, ``user``, ``alias``, ``odmr`` and ``mailbox``: the directory and
the mailboxes. Passwords come from ``--password-stdin`` (one line) or are asked for twice
on the terminal; never from the command line, where ``ps`` would show them."""

from __future__ import annotations

import argparse
import getpass
import sys

from ..auth import hash_password
from ..config import Config, parse_size
from ..store import Refused, Store
from .format import human_size, table, when

EXIT_OK, EXIT_REFUSED = 0, 1


class UsageError(Exception):
    """Bad usage: exit 2."""


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask for the password: use --password-stdin")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise Refused("the passwords differ")
    if not password:
        raise Refused("empty password")
    if "\0" in password:
        raise Refused("the password contains a NUL character")
    return password


def cmd_domain(store: Store, config: Config, args) -> int:
    if args.action == "add":
        info = store.directory.add_domain(args.name, "odmr" if args.odmr else "local")
        print(f"added {info.kind} domain {info.name}")
    elif args.action == "del":
        store.directory.del_domain(args.name)
        print(f"deleted domain {args.name.lower()}")
    else:
        print(table(("domain", "kind", "accounts"), [(d.name, d.kind, d.accounts) for d in store.directory.list_domains()]))
    return EXIT_OK


def cmd_user(store: Store, config: Config, args) -> int:
    action = args.action
    if action in ("add", "passwd"):
        password = read_password(args)
        hashed = hash_password(password, config.auth.bcrypt_rounds)
        secret = password if args.cram_md5 else None
        if action == "add":
            quota = parse_size(args.quota) if args.quota else None
            info = store.directory.add_account(args.address, hashed, secret, quota)
            print(f"added user {info.address}")
        else:
            store.directory.set_password(args.address, hashed, secret)
            print(f"changed the password of {args.address.lower()}")
    elif action == "del":
        removed = store.directory.del_account(args.address)
        print(f"deleted user {args.address.lower()} and {removed} message(s)")
    elif action in ("enable", "disable"):
        store.directory.set_enabled(args.address, action == "enable")
        print(f"{action}d user {args.address.lower()}")
    else:
        rows = [
            (
                a.address,
                "yes" if a.enabled else "no",
                "yes" if a.cram_secret else "no",
                human_size(a.quota_bytes),
                n,
                human_size(octets),
                when(a.last_login_at),
            )
            for a, n, octets in store.directory.list_accounts()
        ]
        print(table(("user", "enabled", "cram-md5", "quota", "messages", "size", "last login"), rows))
    return EXIT_OK


def cmd_alias(store: Store, config: Config, args) -> int:
    if args.action == "add":
        store.directory.add_alias(args.address, args.target)
        print(f"added alias {args.address.lower()} -> {args.target.lower()}")
    elif args.action == "del":
        store.directory.del_alias(args.address)
        print(f"deleted alias {args.address.lower()}")
    else:
        print(table(("alias", "target"), store.directory.list_aliases()))
    return EXIT_OK


def cmd_odmr(store: Store, config: Config, args) -> int:
    if args.action == "grant":
        store.directory.grant_odmr(args.address, args.domain)
        print(f"{args.address.lower()} may now ATRN {args.domain.lower()}")
    elif args.action == "revoke":
        store.directory.revoke_odmr(args.address, args.domain)
        print(f"{args.address.lower()} may no longer ATRN {args.domain.lower()}")
    else:
        rows = []
        for domain, accounts, messages, octets, oldest in store.directory.odmr_overview():
            for address in accounts or ["-"]:
                rows.append((address, domain, messages, human_size(octets), when(oldest)))
        print(table(("user", "domain", "waiting", "size", "oldest"), rows))
    return EXIT_OK


def cmd_mailbox(store: Store, config: Config, args) -> int:
    from pathlib import Path

    from .. import mailboxes

    if args.action == "import":
        report = mailboxes.import_mailbox(store, args.address, Path(args.path))
        print("\n".join(report.lines()))
        return EXIT_OK if not report.skipped else EXIT_REFUSED
    if args.action == "export":
        if args.mbox:
            count = mailboxes.export_mbox(store, args.address, Path(args.mbox))
        else:
            count = mailboxes.export_maildir(store, args.address, Path(args.maildir))
        print(f"exported {count} message(s) to {args.mbox or args.maildir}")
        return EXIT_OK
    rows = [
        (mid, uid, size, when(received), "yes" if seen else "no", sender or "<>")
        for mid, uid, size, received, seen, sender in store.maildrops.mailbox_list(args.address)
    ]
    print(table(("id", "uid", "size", "received", "seen", "sender"), rows))
    return EXIT_OK


def cmd_ban(store: Store, config: Config, args) -> int:
    if args.action == "del":
        if not store.bans.lift(args.address):
            raise Refused(f"{args.address} is not banned")
        print(f"lifted the ban of {args.address} (the servers see it within a few seconds)")
        return EXIT_OK
    rows = [(b.address, when(b.banned_at), when(b.until), b.failures, b.reason) for b in store.bans.active()]
    print(table(("address", "since", "until", "failures", "why"), rows))
    return EXIT_OK
