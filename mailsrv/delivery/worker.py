"""The delivery workers: background threads that work the queue.

``Worker.run_once()`` takes a batch of due recipients in our own domains and settles each
(see :meth:`mailsrv.store.queue.Queue.deliver_due`):

- a local account: the message (with ``Return-Path`` and ``Delivered-To`` added) is written
  to the mailbox in the same transaction that marks the recipient delivered, so it is
  delivered exactly once whatever the number of workers, processes or crashes;
- an alias: new recipients of the same message (its envelope sender kept), which may be
  remote ones for the relay;
- an ODMR domain: ``held`` until the customer's ATRN;
- an unknown local address, or a mailbox over quota that the message cannot fit before the
  queue lifetime ends: ``failed``, with one RFC 3464 bounce per message to the sender
  (never for the empty sender).

Every destination here is decided without network I/O, so a batch is read and decided
without the write lock and then applied in one durable transaction in which each
recipient's update is conditional on its still being due: that update is the claim, and
there is no window in which a crash could leave a recipient half done. Leases are kept
for work done outside the database: the relay and ODMR claim with
``store.leases.claim_remote``/``claim_held`` and settle with ``store.leases.settle``
(docs/design.md, "Delivery", says why the local part takes no lease). Remote recipients
stay ``queued`` for the relay.

A message posted in this process (:meth:`DeliveryPool.post`) does not wait for a worker
where it need not: its recipients in local mailboxes are delivered in the transaction that
queues it, with the same decisions (quota included), so the poster's 250 means the mail is
readable and no worker reads it back; what is left wakes a worker. (docs/design.md,
"Delivery", explains this departure from "the workers deliver everything": it keeps
"250 = committed" and exactly-once, and halves the transactions and flushes per
message, as bench/mpp.py measures.) Once every recipient of a message is done with, the queue keeps only its
header (``store.header_of``).

A lease names its holder (``host:pid:worker``). At start the leases of dead processes on
this host are taken back at once; a recipient whose lease ran out (another host's, or a
hung worker's) is taken again, looked for when nothing else is due and at least every
POLL seconds. Queuing a message wakes one worker at once (:meth:`DeliveryPool.wake`);
the workers also look every POLL seconds, for retries and for mail queued by other
processes.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from .. import metrics
from ..config import Config
from ..db import DatabaseUnavailable
from ..models import utcnow
from ..store import Action, Claimed, Outcome, Resolver, Route, Store, lock_holder
from .bounce import build_bounce
from .relay import Destinations, Relay

log = logging.getLogger("mailsrv.delivery")

POLL = 1.0
BATCH = 100
#: how often a worker looks for held mail past the queue lifetime (ODMR mail not collected)
UNCOLLECTED_EVERY = 60.0
MAX_ALIAS_HOPS = 10


class Worker:
    """One worker: ``run_once()`` handles one batch; ``loop()`` runs until stopped."""

    def __init__(self, store: Store, config: Config, name: str = "w1"):
        self.store = store
        self.config = config
        self.owner = lock_holder(name)
        self.expired_checked = 0.0
        self.uncollected_checked = 0.0

    def run_once(self) -> int:
        """Deliver one batch (every destination here is decided without network I/O, so
        no lease is needed: see Queue.deliver_due); return how many were handled.
        Recipients whose lease ran out are looked for when nothing else is due, and at
        least every POLL seconds."""
        now = time.monotonic()
        expired = now - self.expired_checked > POLL
        if expired:
            self.expired_checked = now
        handled, applied = self.store.queue.deliver_due(BATCH, self.decide_all, self.local_copy, self.bounce, expired)
        if not handled and not expired:
            self.expired_checked = now
            handled, applied = self.store.queue.deliver_due(BATCH, self.decide_all, self.local_copy, self.bounce, True)
        metrics.count_settled(applied, "local")
        if now - self.uncollected_checked > UNCOLLECTED_EVERY:
            self.uncollected_checked = now
            uncollected = self.fail_uncollected()
            metrics.count_settled(uncollected, "odmr")
            applied += uncollected
        for outcome in applied:
            c = outcome.claimed
            log.info(
                "queue %d: <%s> %s%s", c.queue_id, c.recipient, outcome.action,
                f" ({outcome.status or ''} {outcome.error})" if outcome.error else "",
            )
        return handled

    def fail_uncollected(self) -> list[Outcome]:
        """Held mail older than the queue lifetime fails, with a bounce to its sender:
        the ODMR customer did not collect it."""
        lifetime = self.config.delivery.queue_lifetime
        stale = self.store.leases.claim_uncollected(self.owner, utcnow() - timedelta(seconds=lifetime), 60.0)
        reason = f"the customer did not collect it within {timedelta(seconds=int(lifetime))}"
        outcomes = [Outcome(c, Action.FAIL, status="4.4.7", error=reason) for c in stale]
        return self.store.leases.settle(self.owner, outcomes, self.local_copy, self.bounce) if outcomes else []

    def decide_all(self, claimed: list[Claimed], resolver: Resolver) -> list[Outcome]:
        """Decide a batch (on any thread: nothing is kept on the worker)."""
        pending: dict[int, int] = {}  # octets this batch will add, per account
        return [self.decide(c, resolver, pending) for c in claimed]

    def decide(self, c: Claimed, resolver: Resolver, pending: dict[int, int]) -> Outcome:
        address = c.recipient
        for _ in range(MAX_ALIAS_HOPS):
            where = resolver.resolve(address)
            if where.route == Route.ACCOUNT:
                return self.to_mailbox(c, where.account, resolver, pending)
            if where.route == Route.ODMR:
                return Outcome(c, Action.HOLD) if address == c.recipient else Outcome(c, Action.FORWARD, targets=(address,))
            if where.route == Route.REMOTE:
                return Outcome(c, Action.FORWARD, targets=(address,))
            if where.route == Route.UNKNOWN:
                return Outcome(c, Action.FAIL, status="5.1.1", error=f"no such user here: {address}")
            address = where.target.lower()
        return Outcome(c, Action.FAIL, status="5.4.6", error=f"alias loop at {address}")

    def to_mailbox(self, c: Claimed, account, resolver: Resolver, pending: dict[int, int]) -> Outcome:
        quota = account.quota_bytes
        size = c.size + len(c.sender) + len(c.recipient) + 40  # with the trace fields
        if quota is not None:
            if size > quota:
                return Outcome(c, Action.FAIL, status="5.2.2", error=f"message larger than the mailbox quota of {account.address}")
            _, used = resolver.mailbox_usage(account.id)
            if used + pending.get(account.id, 0) + size > quota:
                delay = self.backoff(c.attempts)
                expires = c.created_at + timedelta(seconds=self.config.delivery.queue_lifetime)
                if utcnow() + timedelta(seconds=delay) > expires:
                    return Outcome(c, Action.FAIL, status="5.2.2", error=f"mailbox of {account.address} is full")
                return Outcome(c, Action.RETRY, delay=delay, status="4.2.2", error="mailbox full")
        pending[account.id] = pending.get(account.id, 0) + size
        return Outcome(c, Action.DELIVER, account_id=account.id)

    def backoff(self, attempts: int) -> float:
        d = self.config.delivery
        return min(d.max_backoff, d.min_backoff * 2 ** min(attempts, 30))

    @staticmethod
    def local_copy(outcome: Outcome, body: bytes) -> bytes:
        c = outcome.claimed
        return f"Return-Path: <{c.sender}>\r\nDelivered-To: {c.recipient}\r\n".encode() + body

    def bounce(self, c: Claimed, failed: list[Outcome], body: bytes) -> bytes | None:
        if c.origin == "bounce" or not c.sender:
            return None
        return build_bounce(
            self.config.server.hostname, c.sender, c.created_at, body,
            [(o.claimed.recipient, o.status, o.error) for o in failed],
        )


class DeliveryPool:
    """``[delivery] workers`` threads running :class:`Worker` loops, and as many running
    :class:`~mailsrv.delivery.relay.Relay` loops for mail to other domains."""

    def __init__(self, store: Store, config: Config):
        self.store = store
        self.config = config
        self.workers = [Worker(store, config, f"w{i + 1}") for i in range(config.delivery.workers)]
        self.poster = Worker(store, config, "post")  # decides for sessions' posts (no state)
        destinations = Destinations(config)
        self.relays = [
            Relay(store, config, destinations, f"r{i + 1}", bounce=self.poster.bounce)
            for i in range(config.delivery.workers)
        ]
        self._wake = threading.Semaphore(0)  # one token per wake-up: one worker per message
        self._relay_wake = threading.Semaphore(0)
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._threads: list[threading.Thread] = []

    def wake(self) -> None:
        """Something was queued: one worker and one relay look now."""
        self._wake.release()
        self._relay_wake.release()

    def post(self, sender: str, body: bytes, recipients, origin: str, account_id: int | None = None) -> int:
        """Queue a message from a session (MPP, SMTP), delivering it to local mailboxes in
        the same transaction where it can (:meth:`Queue.post`: the poster's thread makes
        the decisions a worker would); wake a worker for whatever is left queued. Return
        the queue id."""
        queue_id, left = self.store.queue.post(
            sender, body, recipients, origin, account_id, self.poster.decide_all, Worker.local_copy
        )
        delivered_now = len({r.lower() for r in recipients}) - left
        if delivered_now:
            metrics.RECIPIENTS.labels("local", "delivered").inc(delivered_now)
        if left:
            self.wake()
        return queue_id

    def wait_until(self, predicate, timeout: float) -> bool:
        """Wait until ``predicate()`` holds, checking after each batch the workers finish
        (for tests and scripts); False if ``timeout`` seconds pass first."""
        with self._progress:
            return self._progress.wait_for(predicate, timeout)

    def start(self) -> None:
        runners = [(w, self._wake, f"delivery-{w.owner}") for w in self.workers]
        runners += [(r, self._relay_wake, f"relay-{r.owner}") for r in self.relays]
        for runner, wake, name in runners:
            thread = threading.Thread(target=self._loop, args=(runner, wake), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _loop(self, runner, wake: threading.Semaphore) -> None:
        while not self._stop.is_set():
            try:
                handled = runner.run_once()
            except DatabaseUnavailable as exc:
                log.warning("delivery paused: database unavailable: %s", exc)
                handled = 0
                self._stop.wait(POLL)
            except Exception:
                log.exception("delivery worker failed; going on")
                handled = 0
                self._stop.wait(POLL)
            with self._progress:
                self._progress.notify_all()
            if not handled:
                wake.acquire(timeout=POLL)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for _ in self._threads:
            self._wake.release()
            self._relay_wake.release()
        for thread in self._threads:
            thread.join(timeout)
