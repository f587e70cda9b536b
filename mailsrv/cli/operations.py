"""``mailsrv check`` and ``mailsrv status``: what an administrator asks before and while
mailsrv runs. Neither changes anything; both read the database and the files as they are
(no schema is created or migrated).

``check`` finds every problem it can and prints one line for each (``problem: ...``),
with a line for each part that is fine (``ok: ...``); it exits 0 when there is no
problem, 1 when there is any. It looks at:

- the configuration: every bad section, key or value, each naming file, section and key;
- the database: that it answers, and that its schema is at this mailsrv's revision
  (else ``mailsrv db upgrade`` is named);
- TLS: that the certificate and key load and belong together, and that the certificate
  does not expire within :data:`EXPIRY_WARNING_DAYS` days;
- every ``listen`` address: that it can be bound now, or is bound by a mailsrv that runs
  (it announces its listeners in ``server_processes``);
- the domains: a local domain with neither account nor alias, an ODMR domain that no
  account may collect.

``status`` prints what runs and what waits: each ``mailsrv serve`` process (from the row
it writes every few seconds: listeners, sessions open by protocol), the queue by state
with the age of its oldest, the oldest deferred recipient with its reason, the ODMR
domains with mail waiting, the last delivery error per destination, and the addresses
banned after failed logins; ``--json`` gives the same for scripts.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
from datetime import UTC, datetime

from .. import db as dbmod
from .. import migrate
from ..config import ConfigError, load_config
from ..store import Store, this_host
from .format import human_size, table, when

EXIT_OK, EXIT_PROBLEMS = 0, 1
#: a certificate expiring sooner than this is a problem for ``check``
EXPIRY_WARNING_DAYS = 14
#: a process silent for longer than this many announcement periods is taken for dead
SILENT_PERIODS = 3


# --- status -----------------------------------------------------------------------------


def running(process, announce_every: float) -> bool:
    return process.silent_for() <= SILENT_PERIODS * announce_every


def gather_status(store: Store) -> dict:
    """Everything ``status`` shows, as plain data (what ``--json`` prints)."""
    from ..app import ANNOUNCE_EVERY

    processes = [
        {
            "holder": p.holder, "host": p.host, "pid": p.pid, "started_at": p.started_at.isoformat(),
            "seen_at": p.seen_at.isoformat(), "running": running(p, ANNOUNCE_EVERY),
            "listeners": p.listeners, "sessions": p.sessions,
        }
        for p in store.processes.all()
    ]
    queue = {
        d.state.value: {"recipients": d.count, "oldest_seconds": round(d.oldest_seconds, 1)}
        for d in store.queue_admin.depth()
    }
    deferred = store.queue_admin.oldest_deferred()
    odmr = [
        {"domain": name, "accounts": accounts, "messages": messages, "octets": octets,
         "oldest": oldest.isoformat() if oldest else None}
        for name, accounts, messages, octets, oldest in store.directory.odmr_overview()
        if messages
    ]
    errors = {
        domain: {"at": at.isoformat(), "error": error} for domain, (at, error) in store.queue_admin.last_errors().items()
    }
    return {
        "processes": processes,
        "queue": queue,
        "oldest_deferred": None if deferred is None else {
            "queue_id": deferred.queue_id, "recipient": deferred.recipient,
            "queued_at": deferred.created_at.isoformat(), "attempts": deferred.attempts,
            "last_error": deferred.last_error,
            "next_attempt_at": deferred.next_attempt_at.isoformat() if deferred.next_attempt_at else None,
        },
        "odmr_waiting": odmr,
        "last_errors": errors,
        "bans": [{"address": b.address, "until": b.until.isoformat(), "failures": b.failures, "reason": b.reason}
                 for b in store.bans.active()],
    }


def age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``: how long, roughly, for a person."""
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _time(text: str | None) -> str:
    return when(datetime.fromisoformat(text)) if text else "-"


def print_status(status: dict) -> None:
    print("processes")
    if status["processes"]:
        rows = [
            (p["holder"], _time(p["started_at"]),
             "running" if p["running"] else f"silent since {_time(p['seen_at'])}",
             ", ".join(f"{item['name']} {item['address']}" for item in p["listeners"]),
             ", ".join(f"{name} {count}" for name, count in sorted(p["sessions"].items()) if count) or "none")
            for p in status["processes"]
        ]
        print(table(("process", "started", "state", "listening", "sessions open"), rows))
    else:
        print("no mailsrv serve process uses this database now")
    print("\nqueue (recipients by state)")
    rows = [(state, q["recipients"], age(q["oldest_seconds"])) for state, q in status["queue"].items()]
    print(table(("state", "recipients", "oldest"), rows))
    deferred = status["oldest_deferred"]
    if deferred:
        print(f"\noldest deferred: queue {deferred['queue_id']} <{deferred['recipient']}>, queued "
              f"{_time(deferred['queued_at'])}, {deferred['attempts']} attempt(s), next {_time(deferred['next_attempt_at'])}:"
              f" {deferred['last_error'] or '-'}")
    else:
        print("\noldest deferred: none")
    print("\nODMR domains with mail waiting")
    rows = [(o["domain"], ", ".join(o["accounts"]) or "-", o["messages"], human_size(o["octets"]), _time(o["oldest"]))
            for o in status["odmr_waiting"]]
    print(table(("domain", "may collect", "messages", "size", "oldest"), rows))
    print("\nlast delivery error per destination")
    rows = [(domain, _time(e["at"]), e["error"][:100]) for domain, e in status["last_errors"].items()]
    print(table(("destination", "when", "error"), rows))
    print("\naddresses banned after failed logins (mailsrv ban del ADDRESS lifts one)")
    rows = [(b["address"], _time(b["until"]), b["reason"]) for b in status["bans"]]
    print(table(("address", "until", "why"), rows))


def cmd_status(config, args) -> int:
    database = dbmod.Database(config.server.database)
    try:
        revision = migrate.current_revision(database)
        if revision != migrate.HEAD_REVISION:
            print(f"mailsrv: the database is at revision {revision or 'none'}, not {migrate.HEAD_REVISION}:"
                  " run mailsrv db upgrade (or start mailsrv serve)")
            return EXIT_PROBLEMS
        status = gather_status(Store(database))
    finally:
        database.dispose()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print_status(status)
    return EXIT_OK


# --- check ------------------------------------------------------------------------------


class Report:
    def __init__(self):
        self.problems = 0

    def ok(self, text: str) -> None:
        print(f"ok: {text}")

    def problem(self, text: str) -> None:
        self.problems += 1
        print(f"problem: {text}")


def certificate_expiry(certfile: str) -> datetime | None:
    """When the certificate in ``certfile`` expires (None when this Python cannot say)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)  # (the stdlib's own reader)
    if decode is None:
        return None
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(decode(certfile)["notAfter"]), UTC)


def check_tls(config, report: Report) -> None:
    from ..server import make_tls_context

    if not config.tls.enabled:
        report.ok("TLS is not configured ([tls] certfile, keyfile): no TLS is offered")
        return
    try:
        make_tls_context(config.tls.certfile, config.tls.keyfile)
    except ssl.SSLError as exc:  # (an OSError too: first)
        report.problem(f"{config.path}: [tls]: {config.tls.certfile} and {config.tls.keyfile} do not load together"
                       f" (not a certificate and its key?): {exc.reason or exc}")
        return
    except OSError as exc:
        report.problem(f"{config.path}: [tls]: cannot read {exc.filename or config.tls.certfile}: {exc.strerror}")
        return
    expires = certificate_expiry(config.tls.certfile)
    if expires is None:
        report.ok(f"TLS certificate {config.tls.certfile} and its key load (expiry not checked)")
        return
    days = (expires - datetime.now(UTC)).total_seconds() / 86400
    if days < 0:
        report.problem(f"TLS certificate {config.tls.certfile} expired on {when(expires)} UTC")
    elif days < EXPIRY_WARNING_DAYS:
        report.problem(f"TLS certificate {config.tls.certfile} expires on {when(expires)} UTC, in {days:.0f} day(s)")
    else:
        report.ok(f"TLS certificate {config.tls.certfile} and its key load; it expires on {when(expires)} UTC")


def listen_addresses(config) -> list[tuple[str, str, str, int]]:
    """Every configured listener: (section, key, host, port)."""
    from ..app import LISTENERS

    found = []
    for section, key, *_ in (*LISTENERS, ("metrics", "listen")):
        for host, port in getattr(getattr(config, section), key):
            found.append((section, key, host, port))
    return found


def check_listeners(config, store: Store | None, report: Report) -> None:
    from ..server import show_address

    ours = set()  # addresses a running mailsrv on this host announced
    if store is not None:
        from ..app import ANNOUNCE_EVERY

        try:
            for process in store.processes.all():
                if process.host == this_host() and running(process, ANNOUNCE_EVERY):
                    ours |= {(item["address"], process.pid) for item in process.listeners}
        except dbmod.DatabaseUnavailable:
            pass
    for section, key, host, port in listen_addresses(config):
        shown = show_address((host, port))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as mailsrv binds)
            try:
                probe.bind((host, port))
            except OSError as exc:
                owners = [pid for address, pid in ours if address == shown]
                if exc.errno == errno.EADDRINUSE and owners:
                    report.ok(f"[{section}] {key} {shown}: bound by the running mailsrv (pid {owners[0]})")
                elif exc.errno == errno.EACCES:
                    report.problem(f"[{section}] {key} {shown}: a port below 1024 needs root"
                                   " (mailsrv serve binds as root, then runs as [server] user)")
                else:
                    report.problem(f"[{section}] {key} {shown}: cannot be bound: {exc.strerror}")
            else:
                report.ok(f"[{section}] {key} {shown}: free")


def check_domains(store: Store, report: Report) -> None:
    domains = store.directory.list_domains()
    aliased = {address.rpartition("@")[2] for address, _ in store.directory.list_aliases()}
    collectors = {name: accounts for name, accounts, *_ in store.directory.odmr_overview()}
    unused = 0
    for domain in domains:
        if domain.kind == "local" and not domain.accounts and domain.name not in aliased:
            unused += 1
            report.problem(f"local domain {domain.name} has no account and no alias: its mail is refused"
                           f" (mailsrv user add ADDRESS)")
        elif domain.kind == "odmr" and not collectors.get(domain.name):
            unused += 1
            report.problem(f"ODMR domain {domain.name} is granted to no account: its mail waits for no one"
                           f" (mailsrv odmr grant ADDRESS {domain.name})")
    if not unused:
        report.ok(f"{len(domains)} domain(s), each with an account, an alias or an ODMR grant")


def check_database(database: dbmod.Database, report: Report) -> Store | None:
    """Does the database answer, at this mailsrv's schema? Its store when it does."""
    try:
        revision = migrate.current_revision(database)
    except dbmod.DatabaseUnavailable as exc:
        report.problem(f"database {database.engine.url.render_as_string()}: cannot be reached: {exc}")
        return None
    if revision is None:
        report.problem("the database has no schema yet: mailsrv db upgrade (or the first mailsrv serve) creates it")
    elif revision != migrate.HEAD_REVISION:
        report.problem(f"the database schema is at revision {revision}, this mailsrv needs"
                       f" {migrate.HEAD_REVISION}: run mailsrv db upgrade")
    else:
        report.ok(f"database answers, schema at revision {revision}")
        return Store(database)
    return None


def cmd_check(config_path: str | None) -> int:
    report = Report()
    problems: list[str] = []
    try:
        config = load_config(config_path, problems)
    except ConfigError as exc:
        report.problem(str(exc))
        return EXIT_PROBLEMS
    for text in problems:
        report.problem(text)
    if not problems:
        report.ok(f"configuration {config.path} reads")
    database = store = None
    path = dbmod.sqlite_path(config.server.database)
    if path and not os.path.exists(path):  # (opening it would create it: check changes nothing)
        report.problem(f"no database at {path} yet: mailsrv db upgrade (or the first mailsrv serve) creates it")
    else:
        database = dbmod.Database(config.server.database)
    try:
        if database is not None:
            store = check_database(database, report)
        check_tls(config, report)
        check_listeners(config, store, report)
        if store is not None:
            check_domains(store, report)
    finally:
        if database is not None:
            database.dispose()
    print(f"{report.problems} problem(s)" if report.problems else "no problems")
    return EXIT_PROBLEMS if report.problems else EXIT_OK
