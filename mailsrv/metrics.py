"""Prometheus metrics: the counters the servers and workers move, and ``[metrics] listen``.

The counters live in this module, one set per process, and every part of mailsrv moves
them where the thing happens (a session starts, a login is checked, a message is
accepted, a recipient is settled, an ATRN is answered, a database call fails). Gauges of
the moment (sessions open, the queue by state and the age of its oldest recipient) are
read when scraped: :class:`LiveState` asks the running servers and the database.

``[metrics] listen`` (empty by default: off) serves them in Prometheus's text format at
``/metrics`` with ``prometheus_client``'s own HTTP server, on each address given; the
sample configuration names a loopback address, since the figures tell a stranger more
than an office would want (how many logins fail, which destinations defer).

Every name, with its labels:

- ``mailsrv_sessions_started_total{protocol}``, ``mailsrv_sessions_open{protocol}``
- ``mailsrv_logins_total{protocol,mechanism,result}``: result ``ok`` or ``failed``
- ``mailsrv_messages_accepted_total{origin}``: ``mpp``, ``smtp``, ``submission``
- ``mailsrv_recipients_total{destination,result}``: destination ``local``, ``alias``,
  ``remote`` or ``odmr``; result ``delivered``, ``deferred`` or ``bounced``
- ``mailsrv_relay_attempts_total{result}``: each recipient the relay tried: ``sent``,
  ``deferred``, ``failed``
- ``mailsrv_odmr_turns_total{result}``: each ATRN: ``turned``, ``busy``, ``no_mail``,
  ``not_granted``, ``unavailable``
- ``mailsrv_queue_recipients{state}``, ``mailsrv_queue_oldest_seconds{state}``: recipients
  queued, held or in flight, and how long the oldest of each has waited
- ``mailsrv_database_errors_total``: database calls that failed (unreachable, locked)
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server

log = logging.getLogger("mailsrv.metrics")

SESSIONS = Counter("mailsrv_sessions_started", "Sessions started", ["protocol"], registry=None)
LOGINS = Counter("mailsrv_logins", "Login attempts checked", ["protocol", "mechanism", "result"], registry=None)
ACCEPTED = Counter("mailsrv_messages_accepted", "Messages accepted (250 or +OK given)", ["origin"], registry=None)
RECIPIENTS = Counter("mailsrv_recipients", "Recipients settled", ["destination", "result"], registry=None)
RELAY_ATTEMPTS = Counter("mailsrv_relay_attempts", "Recipients the relay tried to send", ["result"], registry=None)
ODMR_TURNS = Counter("mailsrv_odmr_turns", "ATRN commands answered", ["result"], registry=None)
DATABASE_ERRORS = Counter("mailsrv_database_errors", "Database calls that failed (unreachable, locked)",
                          registry=None)

COUNTERS = (SESSIONS, LOGINS, ACCEPTED, RECIPIENTS, RELAY_ATTEMPTS, ODMR_TURNS, DATABASE_ERRORS)

#: the queue states whose recipients are still waiting (gauges are given for these)
WAITING = ("queued", "held", "inflight")


def count_settled(applied, destination: str) -> None:
    """Count settled recipients (``mailsrv_recipients_total``) by the kind of work that
    settled them (``local``, ``remote``, ``odmr``); a forward counts as ``alias``, and a
    recipient held again with a reason (an ODMR customer's 4xx) as deferred; a recipient
    given back untried counts not at all."""
    from .store import Action  # (here: the store imports the database, which imports this module)

    for outcome in applied:
        action = outcome.action
        if action == Action.FORWARD:
            RECIPIENTS.labels("alias", "delivered").inc()
        elif action in (Action.DELIVER, Action.SENT):
            RECIPIENTS.labels(destination, "delivered").inc()
        elif action == Action.RETRY or (action == Action.HOLD and outcome.error):
            RECIPIENTS.labels(destination, "deferred").inc()
        elif action == Action.FAIL:
            RECIPIENTS.labels(destination, "bounced").inc()


class LiveState:
    """A collector of what is true now: the open sessions of this process (``open_sessions``
    gives them by protocol), and the queue as the database has it (left out of a scrape
    when the database cannot be read, which the error counter then shows)."""

    def __init__(self, open_sessions: Callable[[], dict[str, int]], store):
        self.open_sessions = open_sessions
        self.store = store

    def collect(self):
        sessions = GaugeMetricFamily("mailsrv_sessions_open", "Sessions open now", labels=["protocol"])
        for protocol, count in sorted(self.open_sessions().items()):
            sessions.add_metric([protocol], count)
        yield sessions
        from .db import DatabaseUnavailable

        try:
            depth = {row.state: row for row in self.store.queue_admin.depth()}
        except DatabaseUnavailable:
            return
        waiting = GaugeMetricFamily("mailsrv_queue_recipients", "Recipients waiting, by state", labels=["state"])
        oldest = GaugeMetricFamily("mailsrv_queue_oldest_seconds", "How long the oldest recipient has waited",
                                   labels=["state"])
        for state in WAITING:
            row = depth.get(state)
            waiting.add_metric([state], row.count if row else 0)
            oldest.add_metric([state], row.oldest_seconds if row else 0)
        yield waiting
        yield oldest


def start(addresses, open_sessions: Callable[[], dict[str, int]], store) -> list:
    """Serve the metrics on each (host, port); return the HTTP servers (for
    :func:`stop`; each one's ``server_address`` is the bound address)."""
    registry = CollectorRegistry(auto_describe=True)
    for counter in COUNTERS:
        registry.register(counter)
    registry.register(LiveState(open_sessions, store))
    started = []
    for host, port in addresses:
        try:
            httpd, _thread = start_http_server(port, host, registry)
        except OSError as exc:
            stop(started)
            raise SystemExit(f"cannot listen on {host}:{port} for metrics: {exc.strerror}") from None
        started.append(httpd)
        log.info("metrics listening on %s:%d", *httpd.server_address[:2])
    return started


def stop(httpds: list) -> None:
    for httpd in httpds:
        httpd.shutdown()
        httpd.server_close()
