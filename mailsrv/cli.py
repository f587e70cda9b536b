"""The ``mailsrv`` command: run the server and manage domains, users, aliases, ODMR grants.

Exit status: 0 done; 1 refused (a one-line reason on stderr, nothing changed); 2 bad usage
or a bad configuration. Passwords come from ``--password-stdin`` (one line) or are asked
for twice on the terminal; they are never taken from the command line, where ``ps`` would
show them. The schema is created on first use, so ``mailsrv db init`` is optional.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from sqlalchemy.exc import OperationalError

from . import __version__
from . import db as dbmod
from .auth import hash_password
from .config import Config, ConfigError, load_config, parse_size
from .store import Refused, Store

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage: exit 2."""


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Format rows as a plain text table with a header line (empty rows: header only)."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_size(octets: int | None) -> str:
    if octets is None:
        return "-"
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if octets >= factor:
            return f"{octets / factor:.1f}{unit}"
    return str(octets)


def when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


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


# --- commands ---------------------------------------------------------------------------


def cmd_serve(config: Config, args) -> int:
    from .app import App, setup_logging

    setup_logging(config.server.log_level)
    return App(config).serve()


def cmd_db(config: Config | None, args) -> int:
    if args.action == "schema":
        dialect = args.dialect or dbmod.Database(config.server.database).dialect
        sys.stdout.write(dbmod.schema_ddl(dialect))
        return EXIT_OK
    database = dbmod.Database(config.server.database)
    before = dbmod.current_revision(database)
    after = dbmod.upgrade(database)
    if before == after:
        print(f"database already at revision {after}")
    else:
        print(f"database at revision {after} (was {before or 'empty'})")
    return EXIT_OK


def cmd_domain(store: Store, config: Config, args) -> int:
    if args.action == "add":
        info = store.add_domain(args.name, "odmr" if args.odmr else "local")
        print(f"added {info.kind} domain {info.name}")
    elif args.action == "del":
        store.del_domain(args.name)
        print(f"deleted domain {args.name.lower()}")
    else:
        print(table(("domain", "kind", "accounts"), [(d.name, d.kind, d.accounts) for d in store.list_domains()]))
    return EXIT_OK


def cmd_user(store: Store, config: Config, args) -> int:
    action = args.action
    if action in ("add", "passwd"):
        password = read_password(args)
        hashed = hash_password(password, config.auth.bcrypt_rounds)
        secret = password if args.cram_md5 else None
        if action == "add":
            quota = parse_size(args.quota) if args.quota else None
            info = store.add_account(args.address, hashed, secret, quota)
            print(f"added user {info.address}")
        else:
            store.set_password(args.address, hashed, secret)
            print(f"changed the password of {args.address.lower()}")
    elif action == "del":
        removed = store.del_account(args.address)
        print(f"deleted user {args.address.lower()} and {removed} message(s)")
    elif action in ("enable", "disable"):
        store.set_enabled(args.address, action == "enable")
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
            for a, n, octets in store.list_accounts()
        ]
        print(table(("user", "enabled", "cram-md5", "quota", "messages", "size", "last login"), rows))
    return EXIT_OK


def cmd_alias(store: Store, config: Config, args) -> int:
    if args.action == "add":
        store.add_alias(args.address, args.target)
        print(f"added alias {args.address.lower()} -> {args.target.lower()}")
    elif args.action == "del":
        store.del_alias(args.address)
        print(f"deleted alias {args.address.lower()}")
    else:
        print(table(("alias", "target"), store.list_aliases()))
    return EXIT_OK


def cmd_odmr(store: Store, config: Config, args) -> int:
    if args.action == "grant":
        store.grant_odmr(args.address, args.domain)
        print(f"{args.address.lower()} may now ATRN {args.domain.lower()}")
    elif args.action == "revoke":
        store.revoke_odmr(args.address, args.domain)
        print(f"{args.address.lower()} may no longer ATRN {args.domain.lower()}")
    else:
        print(table(("user", "domain"), store.list_odmr()))
    return EXIT_OK


def cmd_mailbox(store: Store, config: Config, args) -> int:
    rows = [
        (mid, uid, size, when(received), "yes" if seen else "no", sender or "<>")
        for mid, uid, size, received, seen, sender in store.mailbox_list(args.address)
    ]
    print(table(("id", "uid", "size", "received", "seen", "sender"), rows))
    return EXIT_OK


def cmd_queue(store: Store, config: Config, args) -> int:
    from .delivery import admin

    return admin.run(store, config, args)


STORE_COMMANDS = {
    "domain": cmd_domain,
    "user": cmd_user,
    "alias": cmd_alias,
    "odmr": cmd_odmr,
    "mailbox": cmd_mailbox,
    "queue": cmd_queue,
}


# --- argument parsing -------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mailsrv", description="mailsrv: mail server for a small office host")
    parser.add_argument("-c", "--config", metavar="CONF", help="the configuration file")
    parser.add_argument("--version", action="version", version=f"mailsrv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("serve", help="run every enabled server and the delivery workers")

    p = sub.add_parser("db", help="the database schema")
    dbsub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dbsub.add_parser("init", help="create the schema (idempotent)")
    dbsub.add_parser("upgrade", help="migrate the schema to this version (idempotent)")
    s = dbsub.add_parser("schema", help="print the DDL")
    s.add_argument("--dialect", choices=("sqlite", "postgresql"))

    p = sub.add_parser("domain", help="mail domains")
    dsub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    a = dsub.add_parser("add")
    a.add_argument("name")
    a.add_argument("--odmr", action="store_true", help="mail is held for an ODMR customer")
    dsub.add_parser("del").add_argument("name")
    dsub.add_parser("list")

    p = sub.add_parser("user", help="accounts (mailboxes)")
    usub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for name in ("add", "passwd"):
        a = usub.add_parser(name)
        a.add_argument("address")
        a.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        a.add_argument("--cram-md5", action="store_true", help="also store a CRAM-MD5/APOP secret")
        if name == "add":
            a.add_argument("--quota", metavar="SIZE", help="mailbox quota, e.g. 500M")
    for name in ("del", "disable", "enable"):
        usub.add_parser(name).add_argument("address")
    usub.add_parser("list")

    p = sub.add_parser("alias", help="aliases")
    asub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    a = asub.add_parser("add")
    a.add_argument("address")
    a.add_argument("target")
    asub.add_parser("del").add_argument("address")
    asub.add_parser("list")

    p = sub.add_parser("odmr", help="which account may ATRN which ODMR domain")
    osub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for name in ("grant", "revoke"):
        a = osub.add_parser(name)
        a.add_argument("address")
        a.add_argument("domain")
    osub.add_parser("list")

    p = sub.add_parser("queue", help="the delivery queue")
    qsub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    qsub.add_parser("list")
    qsub.add_parser("flush")
    for name in ("show", "hold", "release", "del"):
        qsub.add_parser(name).add_argument("id", type=int)

    p = sub.add_parser("mailbox", help="mailbox contents")
    msub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    msub.add_parser("list").add_argument("address")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "db" and args.action == "schema" and args.dialect:
            return cmd_db(None, args)
        config = load_config(args.config)
        if args.command == "serve":
            return cmd_serve(config, args)
        if args.command == "db":
            return cmd_db(config, args)
        database = dbmod.Database(config.server.database)
        try:
            if not dbmod.schema_ready(database):
                dbmod.upgrade(database)
            return STORE_COMMANDS[args.command](Store(database), config, args)
        finally:
            database.dispose()
    except ConfigError as exc:
        print(f"mailsrv: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"mailsrv: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # a bad --quota
        print(f"mailsrv: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Refused as exc:
        print(f"mailsrv: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (dbmod.DatabaseUnavailable, OperationalError) as exc:
        print(f"mailsrv: database unavailable: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
