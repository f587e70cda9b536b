"""The ``mailsrv`` command: run the server and manage domains, users, aliases, ODMR grants.

Exit status: 0 done; 1 refused (a one-line reason on stderr, nothing changed); 2 bad usage
or a bad configuration. Passwords come from ``--password-stdin`` (one line) or are asked
for twice on the terminal; they are never taken from the command line, where ``ps`` would
show them. The schema is created on first use, so ``mailsrv db init`` is optional.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from .. import __version__, migrate
from .. import db as dbmod
from ..config import Config, ConfigError, load_config
from ..store import Refused, Store
from .accounts import (
    EXIT_OK,
    UsageError,
    cmd_alias,
    cmd_ban,
    cmd_domain,
    cmd_mailbox,
    cmd_odmr,
    cmd_user,
)
from .operations import cmd_check, cmd_status
from .queue import cmd_queue

EXIT_REFUSED, EXIT_USAGE = 1, 2


# --- commands ---------------------------------------------------------------------------


def cmd_serve(config: Config, args) -> int:
    from ..app import App, setup_logging

    setup_logging(config.server.log_level)
    return App(config).serve()


def cmd_db(config: Config | None, args) -> int:
    if args.action == "schema":
        dialect = args.dialect or dbmod.Database(config.server.database).dialect
        sys.stdout.write(migrate.schema_ddl(dialect))
        return EXIT_OK
    if args.action == "copy":
        return cmd_db_copy(config, args)
    database = dbmod.Database(config.server.database)
    before = migrate.current_revision(database)
    after = migrate.upgrade(database)
    if before == after:
        print(f"database already at revision {after}")
    else:
        print(f"database at revision {after} (was {before or 'empty'})")
    return EXIT_OK


def cmd_db_copy(config: Config, args) -> int:
    from ..dbcopy import copy_database

    if args.to == config.server.database:
        raise Refused("--to names this configuration's own database")
    source, target = dbmod.Database(config.server.database), dbmod.Database(args.to)
    try:
        if migrate.current_revision(source) != migrate.HEAD_REVISION:
            raise Refused("the source database is not at this mailsrv's schema: run mailsrv db upgrade first")
        copied = copy_database(source, target)
    finally:
        source.dispose()
        target.dispose()
    for table, rows in copied.items():
        print(f"{table}: {rows} row(s)")
    print(f"copied into {make_url(args.to).render_as_string()}; point [server] database at it to use it")
    return EXIT_OK


def cmd_dkim(config: Config, args) -> int:
    from .. import dkim

    try:
        path, record = dkim.keygen(config, args.domain)
    except dkim.DkimError as exc:
        raise Refused(str(exc)) from None
    print(f"key written to {path}")
    if args.domain.strip().lower().rstrip(".") not in config.dkim.domains:
        print(f"add {args.domain.lower()} to [dkim] domains to sign its mail; publish this record:")
    print(record)
    return EXIT_OK


STORE_COMMANDS = {
    "domain": cmd_domain,
    "user": cmd_user,
    "alias": cmd_alias,
    "odmr": cmd_odmr,
    "mailbox": cmd_mailbox,
    "queue": cmd_queue,
    "ban": cmd_ban,
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
    s = dbsub.add_parser("copy", help="copy every table, ids kept, into another (empty) database")
    s.add_argument("--to", required=True, metavar="URL", help="the target, e.g. postgresql+psycopg://mailsrv@dbhost/mailsrv")

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

    p = sub.add_parser("dkim", help="DKIM keys of the domains whose outbound mail is signed")
    ksub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ksub.add_parser("keygen", help="make the domain's key; print the DNS record to publish").add_argument("domain")

    p = sub.add_parser("ban", help="addresses refused after too many failed logins ([auth] ban_after)")
    bsub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    bsub.add_parser("list")
    bsub.add_parser("del", help="lift a ban").add_argument("address")

    sub.add_parser("check", help="validate the configuration, database, TLS files, ports, domains; change nothing")
    p = sub.add_parser("status", help="processes running, sessions, the queue by state, oldest deferred, errors")
    p.add_argument("--json", action="store_true", help="the same as JSON, for scripts")

    p = sub.add_parser("mailbox", help="mailbox contents")
    msub = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    msub.add_parser("list").add_argument("address")
    a = msub.add_parser("import", help="a Maildir or mbox file into the mailbox, order, dates and seen flags kept")
    a.add_argument("address")
    a.add_argument("path", help="a Maildir folder or an mbox file")
    a = msub.add_parser("export", help="the mailbox into a new mbox file or Maildir")
    a.add_argument("address")
    to = a.add_mutually_exclusive_group(required=True)
    to.add_argument("--mbox", metavar="FILE", help="a new mboxrd file")
    to.add_argument("--maildir", metavar="DIR", help="a new (or empty) Maildir")
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
        if args.command == "check":
            return cmd_check(args.config)
        config = load_config(args.config)
        if args.command == "status":
            return cmd_status(config, args)
        if args.command == "serve":
            return cmd_serve(config, args)
        if args.command == "db":
            return cmd_db(config, args)
        if args.command == "dkim":
            return cmd_dkim(config, args)
        database = dbmod.Database(config.server.database)
        try:
            if not migrate.schema_ready(database):
                migrate.upgrade(database)
            return STORE_COMMANDS[args.command](Store(database), config, args)
        finally:
            database.dispose()
    except ConfigError as exc:
        print(f"mailsrv: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"mailsrv: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FileExistsError as exc:  # export never writes over a file
        print(f"mailsrv: {exc.filename}: exists already; export into a new file", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as exc:  # a path that cannot be read or written (import, export)
        print(f"mailsrv: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return EXIT_REFUSED
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
