"""Assemble mailsrv from its configuration: servers, delivery workers, start and stop.

``mailsrv serve`` builds an :class:`App`, which creates (or migrates) the schema, binds
every enabled listener (logging each bound address: port 0 binds an ephemeral port), drops
privileges to ``[server] user`` when started as root, starts the delivery workers and
serves until SIGTERM or SIGINT. SIGHUP reloads (:meth:`App.reload`): the TLS certificate
and key are read again, for sessions that start from then on, and the log level.
Stopping closes the listeners at once, then tells every session (each says its
REPLY_SHUTDOWN and ends), waits up to 5 s for them, cuts off any left, stops the workers
and exits 0.

Tests and scripts use the same class: ``App(config).start()`` then ``app.address("pop3")``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import logging
import os
import pwd
import signal
import ssl
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from . import db as dbmod
from . import metrics, migrate
from .auth import Authenticator
from .config import Config, ConfigError, load_config
from .cpu import pin_to_one_cpu
from .db import DatabaseUnavailable
from .delivery.bounce import build_bounce
from .delivery.worker import DeliveryPool
from .message import posting_recipients, split_header
from .server import ConnectionLimiter, MailServer, ServerContext, make_tls_context, show_address
from .store import Store, holder_is_dead, lock_holder

log = logging.getLogger("mailsrv.app")

STOP_GRACE = 5.0
#: how often a running process writes its row of ``server_processes`` (``mailsrv status``);
#: a session opening or closing brings the next one forward, to at most one a second
ANNOUNCE_EVERY = 10.0
ANNOUNCE_GAP = 1.0
#: the log line format (scripts/fail2ban/filter.d/mailsrv.conf reads it: keep it stable)
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
M_ARENA_MAX = -8  # glibc mallopt parameter

#: every listener: (config section, its key, module, handler class, implicit TLS)
LISTENERS: tuple[tuple[str, str, str, str, bool], ...] = (
    ("pop3", "listen", "mailsrv.protocols.pop3", "Pop3Handler", False),
    ("pop3", "listen_tls", "mailsrv.protocols.pop3", "Pop3Handler", True),
    ("pop", "listen", "mailsrv.protocols.pop", "PopHandler", False),
    ("mpp", "listen", "mailsrv.protocols.mpp", "MppHandler", False),
    ("mpp", "listen_tls", "mailsrv.protocols.mpp", "MppHandler", True),
    ("smtp", "listen", "mailsrv.protocols.smtp", "SmtpHandler", False),
    ("smtp", "submission", "mailsrv.protocols.smtp", "SubmissionHandler", False),
    ("smtp", "submission_tls", "mailsrv.protocols.smtp", "SubmissionHandler", True),
    ("odmr", "listen", "mailsrv.protocols.odmr", "OdmrHandler", False),
)


def tune_malloc() -> None:
    """glibc malloc for thousands of threads: two arenas instead of one per thread, so the
    threads share memory instead of each growing an arena. Nothing happens where glibc
    is not the allocator."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass


def log_level(name: str) -> int:
    """The logging level a ``[server] log_level`` names."""
    return getattr(logging, name.upper(), logging.INFO)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=log_level(level), format=LOG_FORMAT)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


class App:
    """Every server and worker of one mailsrv process."""

    def __init__(self, config: Config, *, workers: bool = True):
        self.config = config
        self.db = dbmod.Database(config.server.database, transactions=config.server.database_transactions)
        self.store = Store(self.db)
        self.auth = Authenticator(self.store, config.auth)
        tls = make_tls_context(config.tls.certfile, config.tls.keyfile) if config.tls.enabled else None
        self.context = ServerContext(
            config=config,
            store=self.store,
            auth=self.auth,
            limiter=ConnectionLimiter(
                config.server.max_connections, config.server.max_connections_per_ip
            ),
            tls_context=tls,
            sessions_changed=self._note_sessions_changed,
        )
        self.servers: list[MailServer] = []
        self.metrics_servers: list = []
        self.workers_enabled = workers
        self.delivery = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = threading.Event()
        self._announcing = threading.Event()  # set: stop announcing
        self._sessions_changed = threading.Event()
        self.holder = lock_holder()
        self.started_at = datetime.now(UTC)

    # --- building --------------------------------------------------------------------

    def prepare_database(self) -> None:
        revision = migrate.upgrade(self.db)
        released = self.store.maildrops.release_dead_locks()
        log.info("database ready at revision %s (%s)", revision, self.db.engine.url.render_as_string())
        if released:
            log.info("released %d maildrop lock(s) of dead processes", released)
        taken = self.store.leases.reclaim_dead_leases()
        if taken:
            log.info("took back %d delivery lease(s) of dead processes", taken)
        for process in self.store.processes.all():
            if holder_is_dead(process.holder):
                self.store.processes.withdraw(process.holder)
        self.auth.refresh_bans()

    def bind(self) -> None:
        for section, key, module_name, class_name, implicit_tls in LISTENERS:
            addresses = getattr(getattr(self.config, section), key)
            if not addresses:
                continue
            if implicit_tls and self.context.tls_context is None:
                raise SystemExit(f"[{section}] {key} needs [tls] certfile and keyfile")
            handler = getattr(importlib.import_module(module_name), class_name)
            for address in addresses:
                self._bind_one(address, handler, implicit_tls=implicit_tls)
        if self.config.metrics.listen:
            self.metrics_servers = metrics.start(self.config.metrics.listen, self.open_sessions, self.store)

    def _bind_one(self, address, handler, *, implicit_tls: bool) -> None:
        try:
            server = MailServer(address, handler, self.context, implicit_tls=implicit_tls)
        except OSError as exc:
            raise SystemExit(
                f"cannot listen on {address[0]}:{address[1]} for {handler.protocol}: {exc.strerror}"
            ) from None
        self.servers.append(server)
        host, port = server.address
        log.info("%s listening on %s:%d", server.name, host, port)

    def address(self, name: str) -> tuple[str, int]:
        """The bound (host, port) of the first server called ``name`` (``pop3``, ``pop3s``…,
        and ``metrics``)."""
        for server in self.servers:
            if server.name == name:
                return server.address
        if name == "metrics" and self.metrics_servers:
            return self.metrics_servers[0].server_address[:2]
        raise KeyError(name)

    @staticmethod
    def load_everything() -> None:
        """Run the paths that import more on first use (the standard library's email
        package does) once, so that nothing needs the Python installation after the
        privileges are gone: it may not be readable by the unprivileged user."""
        from .delivery import relay

        relay.load_everything()
        sample = b"To: a@example.org\r\n\r\nx\r\n"
        posting_recipients(split_header(sample)[0])
        build_bounce("localhost", "a@example.org", datetime.now(UTC), sample, [("b@example.org", "5.1.1", "x")])

    def drop_privileges(self) -> None:
        user = self.config.server.user
        if os.getuid() != 0 or not user:
            return
        self.load_everything()
        entry = pwd.getpwnam(user)
        path = dbmod.sqlite_path(self.db.url)
        if path:
            for target in (Path(path).parent, *Path(path).parent.glob(Path(path).name + "*")):
                os.chown(target, entry.pw_uid, entry.pw_gid)
        self.db.dispose()  # reopen the database as the new user
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
        log.info("running as %s", user)

    # --- running ---------------------------------------------------------------------

    def start(self) -> App:
        """Prepare the database, bind, start serving and the workers; return self."""
        self.prepare_database()
        self.bind()
        self.drop_privileges()
        for server in self.servers:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.2},
                name=f"serve-{server.name}", daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        if self.workers_enabled and self.config.delivery.workers:
            self.start_workers()
        self.announce()
        announcer = threading.Thread(target=self._announce_loop, name="announce", daemon=True)
        announcer.start()
        self._threads.append(announcer)
        return self

    # --- what runs (``server_processes``, for ``mailsrv status``) ----------------------

    def listeners(self) -> list[dict]:
        """Every bound address: [{"name": "pop3", "address": "0.0.0.0:110"}, ...]."""
        bound = [(server.name, server.address) for server in self.servers]
        bound += [("metrics", httpd.server_address[:2]) for httpd in self.metrics_servers]
        return [{"name": name, "address": show_address(address)} for name, address in bound]

    def open_sessions(self) -> dict[str, int]:
        """Sessions open now, by protocol."""
        counts: dict[str, int] = {}
        for server in self.servers:
            counts[server.handler_protocol] = counts.get(server.handler_protocol, 0) + len(server.sessions)
        return counts

    def _note_sessions_changed(self) -> None:
        self._sessions_changed.set()

    def announce(self) -> None:
        """Write this process's row of ``server_processes`` (a database that cannot be
        reached now is logged; the next announcement tries again)."""
        try:
            self.store.processes.announce(self.holder, self.started_at, self.listeners(), self.open_sessions())
        except DatabaseUnavailable as exc:
            log.warning("cannot record this process in server_processes: %s", exc)

    def _announce_loop(self) -> None:
        while not self._announcing.is_set():
            self._sessions_changed.wait(ANNOUNCE_EVERY)
            self._sessions_changed.clear()
            if self._announcing.is_set():
                return
            self.announce()
            self._announcing.wait(ANNOUNCE_GAP)

    def start_workers(self) -> None:
        self.delivery = DeliveryPool(self.store, self.config)
        self.context.delivery = self.delivery
        self.delivery.start()

    def stop(self, grace: float = STOP_GRACE) -> bool:
        """Close listeners at once, sessions within ``grace`` seconds; True if all ended."""
        stoppers = [threading.Thread(target=s.shutdown) for s in self.servers]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        for server in self.servers:
            server.server_close()
        deadline = time.monotonic() + grace
        for server in self.servers:
            server.close_sessions()  # each session says its REPLY_SHUTDOWN and ends
        clean = all(server.wait_sessions(deadline) for server in self.servers)
        if not clean:  # a session that did not end in time (a client that reads nothing)
            for server in self.servers:
                server.close_sessions(force=True)
        if self.delivery is not None:
            self.delivery.stop(max(0.1, deadline - time.monotonic()))
        metrics.stop(self.metrics_servers)
        self._announcing.set()
        self._sessions_changed.set()
        try:
            self.store.processes.withdraw(self.holder)
        except DatabaseUnavailable as exc:
            log.warning("cannot remove this process from server_processes: %s", exc)
        self.db.dispose()
        log.info("stopped%s", "" if clean else " (some sessions did not end in time)")
        return clean

    def reload(self) -> None:
        """What SIGHUP does: read the configuration file again and take from it the TLS
        certificate and key (new sessions get them; open ones keep theirs) and the log
        level. A file that no longer reads, or a certificate that does not load, is logged
        and the old one kept. Everything else needs a restart, as the log says."""
        try:
            config = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload: %s; nothing changed", exc)
            return
        logging.getLogger().setLevel(log_level(config.server.log_level))
        if config.tls.enabled != (self.context.tls_context is not None):
            log.error("reload: TLS turned %s in the configuration: that takes a restart",
                      "on" if config.tls.enabled else "off")
        elif config.tls.enabled:
            try:
                self.context.tls_context = make_tls_context(config.tls.certfile, config.tls.keyfile)
            except (OSError, ssl.SSLError) as exc:
                log.error("reload: the TLS certificate in %s did not load, the old one stays: %s",
                          config.tls.certfile, exc)
            else:
                log.info("reload: TLS certificate loaded from %s", config.tls.certfile)
        log.info("reloaded (log level %s)", config.server.log_level)

    def serve(self) -> int:
        """Run until SIGTERM or SIGINT, reloading on SIGHUP; return the exit status."""
        tune_malloc()
        if self.config.server.pin_cpu:  # (before any thread starts: they all inherit it)
            cpu = pin_to_one_cpu()
            if cpu is not None:
                log.info("threads kept on CPU %d ([server] pin_cpu)", cpu)
        def asked(event: threading.Event):
            def handler(*_):
                event.set()
                self._wake.set()
            return handler

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, asked(self._stop))
        signal.signal(signal.SIGHUP, asked(self._reload))
        self.start()
        log.info("mailsrv ready on %s", self.config.server.hostname)
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                self.reload()
        log.info("stopping")
        self.stop()
        return 0
