"""Leases: recipients taken for work done outside the database.

Delivery that waits on the network (the relay to another domain's MX or a smarthost, an
ODMR customer collecting its domains) cannot hold a transaction open, so it first leases
its recipients: ``state = inflight``, ``lease_owner`` (``host:pid:name``) and
``lease_expires_at``. It then settles each with :meth:`Leases.settle`, which applies an
outcome only while the settling owner still holds that lease. A lease that runs out (a
hung worker, a dead host) is taken over by the next claim, and the old holder's late
settlement then changes nothing. The leases of dead processes of this host are taken back
at once at start (:meth:`Leases.reclaim_dead_leases`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import timedelta

from sqlalchemy import bindparam, func, select, text, update

from ..db import Database
from ..models import Domain, QueuedMessage, QueueRecipient, State, utcnow
from .common import holder_is_dead, this_host
from .queue import OUR_DOMAINS, Bounce, Claimed, LocalCopy, Outcome, due, due_in, settle_in

#: due recipients in other domains: queued ones whose time has come, and those whose lease ran out
_REMOTE = QueueRecipient.domain.not_in(OUR_DOMAINS)
REMOTE_QUEUED = due(QueueRecipient.state == State.QUEUED, QueueRecipient.next_attempt_at <= bindparam("now"), _REMOTE)
REMOTE_EXPIRED = due(
    QueueRecipient.state == State.INFLIGHT, QueueRecipient.lease_expires_at < bindparam("now"), _REMOTE,
    order=(QueueRecipient.id,),
)
#: one ODMR domain's recipients waiting for the customer (and those whose lease ran out)
HELD_IN_DOMAIN = due(
    QueueRecipient.domain == bindparam("domain"),
    (QueueRecipient.state == State.HELD)
    | ((QueueRecipient.state == State.INFLIGHT) & (QueueRecipient.lease_expires_at < bindparam("now"))),
    QueueRecipient.domain.in_(select(Domain.name).where(Domain.kind == "odmr")),
    order=(QueueRecipient.queue_id, QueueRecipient.id),
)
#: held recipients whose message came before a time: mail the customer did not collect
UNCOLLECTED = due(
    QueueRecipient.state == State.HELD, QueuedMessage.created_at < bindparam("before"),
    order=(QueueRecipient.queue_id, QueueRecipient.id),
)
#: another holder's live lease in one ODMR domain: someone is turning it round
TURNING = select(func.count(QueueRecipient.id)).where(
    QueueRecipient.domain == bindparam("domain"), QueueRecipient.state == State.INFLIGHT,
    QueueRecipient.lease_expires_at >= bindparam("now"), QueueRecipient.lease_owner != bindparam("owner"),
)
#: PostgreSQL: claims for one domain take turns, across processes and hosts
DOMAIN_TURN = text("SELECT pg_advisory_xact_lock(hashtext(:domain))")
TAKE_LEASE = (
    update(QueueRecipient)
    .where(QueueRecipient.id == bindparam("rid"))
    .values(
        state=State.INFLIGHT, lease_owner=bindparam("owner"), lease_expires_at=bindparam("expires"),
        updated_at=bindparam("now"),
    )
)
#: a lease made longer by its holder
RENEW_LEASE = (
    update(QueueRecipient)
    .where(QueueRecipient.id == bindparam("rid"), QueueRecipient.state == State.INFLIGHT,
           QueueRecipient.lease_owner == bindparam("owner"))
    .values(lease_expires_at=bindparam("expires"), updated_at=bindparam("now"))  # (no onupdate on Raw)
)
LEASES_OF_THIS_HOST = select(QueueRecipient.id, QueueRecipient.lease_owner, QueueRecipient.domain).where(
    QueueRecipient.state == State.INFLIGHT, QueueRecipient.lease_owner.like(bindparam("host"))
)
ODMR_DOMAIN = select(Domain.id).where(Domain.name == bindparam("name"), Domain.kind == "odmr")
#: a dead holder's lease given back: held again in an ODMR domain, else queued and due now
GIVE_BACK = (
    update(QueueRecipient)
    .where(QueueRecipient.id == bindparam("rid"), QueueRecipient.lease_owner == bindparam("owner"))
    .values(
        state=bindparam("state"), lease_owner=None, lease_expires_at=None, next_attempt_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
)


def _held_in(domains: Iterable[str]) -> list[tuple]:
    """The queries of the held recipients of these ODMR domains, one domain at a time."""
    return [((HELD_IN_DOMAIN,), {"domain": name}) for name in sorted({d.strip().lower() for d in domains})]


class Leases:
    """Claims and settlements of leased recipients (see the module docstring)."""

    def __init__(self, db: Database):
        self.db = db

    def claim_remote(self, owner: str, lease: float, limit: int = 100) -> list[Claimed]:
        """Lease up to ``limit`` due recipients in domains we do not serve (the relay's
        work) to ``owner`` for ``lease`` seconds: queued ones whose time has come, then
        those whose lease ran out. PostgreSQL skips rows another claim has locked. A plain
        read looks first, so an idle relay takes no write lock."""
        with self.db.read_raw(snapshot=False) as raw:
            if not due_in(raw, (REMOTE_QUEUED, REMOTE_EXPIRED), {"now": utcnow()}, 1, lock=False):
                return []
        return self._claim(owner, lease, limit, [((REMOTE_QUEUED, REMOTE_EXPIRED), {})])

    def claim_held(self, owner: str, domains: Iterable[str], lease: float, limit: int = 1000) -> list[Claimed]:
        """Lease up to ``limit`` recipients held for these ODMR domains (an ATRN's work), in
        the order their messages came, so that one message's recipients come together."""
        return self._claim(owner, lease, limit, _held_in(domains))

    def claim_for_turn(self, owner: str, domains: Iterable[str], lease: float, limit: int = 100_000
                       ) -> list[Claimed] | None:
        """An ATRN's claim: every recipient held for these ODMR domains, leased to
        ``owner``; None (and nothing taken) when another session holds a live lease in
        one of them, that is, is turning it round now, on this host or another. The check
        and the claim are one transaction; on PostgreSQL claims for one domain also take
        turns on an advisory lock, so two ATRNs at once cannot both pass the check."""
        queries = _held_in(domains)
        names = [params["domain"] for _, params in queries]
        now = utcnow()
        with self.db.write_raw(durable=False) as raw:
            if self.db.dialect == "postgresql":
                for name in names:
                    raw.execute(DOMAIN_TURN, {"domain": name})
            if any(raw.scalar(TURNING, {"domain": n, "now": now, "owner": owner}) for n in names):
                return None
            return self._take_in(raw, owner, lease, limit, queries, now)

    def claim_uncollected(self, owner: str, before, lease: float, limit: int = 100) -> list[Claimed]:
        """Lease held recipients whose message was queued before ``before`` (held past the
        queue lifetime: the caller fails them). A plain read looks first."""
        with self.db.read_raw(snapshot=False) as raw:
            if not due_in(raw, (UNCOLLECTED,), {"before": before, "now": utcnow()}, 1, lock=False):
                return []
        return self._claim(owner, lease, limit, [((UNCOLLECTED,), {"before": before})])

    def _claim(self, owner: str, lease: float, limit: int, queries) -> list[Claimed]:
        """:meth:`_take_in` in a transaction of its own."""
        with self.db.write_raw(durable=False) as raw:
            return self._take_in(raw, owner, lease, limit, queries, utcnow())

    def _take_in(self, raw, owner: str, lease: float, limit: int, queries, now) -> list[Claimed]:
        """Lease to ``owner``, in the caller's transaction, up to ``limit`` recipients that
        the queries name in turn (each ``(due statement pairs, parameters)``). PostgreSQL
        skips rows another claim has locked."""
        claimed: list[Claimed] = []
        for statements, params in queries:
            if len(claimed) < limit:
                claimed += due_in(raw, statements, {**params, "now": now}, limit - len(claimed),
                                  lock=self.db.dialect == "postgresql")
        if claimed:
            expires = now + timedelta(seconds=lease)
            raw.execute(TAKE_LEASE, [{"rid": c.id, "owner": owner, "expires": expires, "now": now} for c in claimed])
        return claimed

    def renew(self, owner: str, claimed: Sequence[Claimed], lease: float) -> int:
        """Extend ``owner``'s leases of these recipients to ``lease`` seconds from now;
        return how many it still held."""
        if not claimed:
            return 0
        now = utcnow()
        expires = now + timedelta(seconds=lease)
        with self.db.write_raw(durable=False) as raw:
            return raw.execute(
                RENEW_LEASE, [{"rid": c.id, "owner": owner, "expires": expires, "now": now} for c in claimed]
            ).rowcount

    def settle(self, owner: str, outcomes: Sequence[Outcome], local_copy: LocalCopy, bounce: Bounce,
               bodies: dict[int, bytes] | None = None, durable: bool = True) -> list[Outcome]:
        """Apply outcomes in one transaction, each only while ``owner`` still holds its
        lease; return those applied (see :func:`~mailsrv.store.queue.settle_in`).
        ``bodies``, when the caller has them, saves reading the messages again.
        ``durable=False`` is for recording what the next hop took (``sent``) the moment it
        said so: a power cut may undo it, and then the message goes again (a duplicate,
        never a loss), but a killed mailsrv never forgets it."""
        with self.db.write_raw(durable=durable) as raw:
            return settle_in(raw, owner, outcomes, local_copy, bounce, utcnow(), bodies)

    def reclaim_dead_leases(self) -> int:
        """Give the leases of dead processes of this host back at once: a recipient in an
        ODMR domain is held again, any other is queued and due now. Returns how many."""
        now = utcnow()
        with self.db.write_raw() as raw:
            rows = raw.execute(LEASES_OF_THIS_HOST, {"host": f"{this_host()}:%"}).all()
            dead = [(rid, owner, domain) for rid, owner, domain in rows if holder_is_dead(owner)]
            odmr = {domain for _, _, domain in dead if raw.scalar(ODMR_DOMAIN, {"name": domain}) is not None}
            if dead:
                raw.execute(GIVE_BACK, [
                    {"rid": rid, "owner": owner, "now": now, "state": State.HELD if domain in odmr else State.QUEUED}
                    for rid, owner, domain in dead
                ])
            return len(dead)
