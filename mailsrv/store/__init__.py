"""Every database operation the servers and the command line need, one part per concern.

:class:`Store` is the parts together; each is a plain class over the one
:class:`~mailsrv.db.Database`, and none inherits from another:

=================  ==================================================================
``directory``      domains, accounts, aliases, ODMR grants; where an address leads
                   (:meth:`Directory.resolve`, for delivery and SMTP's RCPT alike)
``maildrops``      a mailbox's messages, bodies, seen flags and the maildrop lock
``queue``          posting, the workers' local delivery, settlement, bounces' queueing
``leases``         claim and settle for work done outside the database: the relay's
                   remote recipients, an ODMR customer's held ones; dead leases
``queue_admin``    ``mailsrv queue``: list, show, flush, hold, release, delete; the
                   queue's depth, oldest deferred recipient and last errors (status)
``processes``      the running ``mailsrv serve`` processes, each announcing itself
``bans``           addresses refused after too many failed logins (``mailsrv ban``)
=================  ==================================================================

Protocol handlers call these and never SQLAlchemy. The rules that hold for every call:

- Each call is one transaction: it commits before it returns, or changes nothing and
  raises. No connection is held between calls, so no session holds one while it waits
  for its client.
- :class:`~mailsrv.db.DatabaseUnavailable` means the database could not be reached
  (temporary: answer 4xx or ``-ERR [SYS/TEMP]``); :class:`Refused` means the operation is
  not allowed (its text is a one-line reason a person can read).
- Addresses and domains are stored lower case; arguments are lowered here.
- A recipient's state is a :class:`State`; no other spelling of one is used.
- Message numbering is the caller's business: the store deals in message ids and uids
  (the UIDL), neither ever reused.

Which execution path a statement takes (``mailsrv.db`` has two):

- **Raw** (``db.read_raw``/``write_raw``/``write_grouped``, the driver's cursor): a
  statement on a path taken once per message, per recipient or per login (posting,
  delivery, settlement, leases, a maildrop session, finding an account). Such a statement
  is a module-level constant with named ``bindparam`` values and no expanding ``IN`` list,
  so it is compiled once per database; a transaction on this path is passed around as
  ``raw``. The Raw path applies no column defaults: a statement sets every value itself
  (``updated_at`` included), and tests/test_db.py fails when one does not.
- **Core** (``db.read_core``/``write_core``, a SQLAlchemy Connection): everything else,
  that is administration and the rare reads (the command line, ``queue list``, dead locks
  at start, RFC 918's mbox reads); statements may be built per call. Passed as ``conn``.

The store uses no ORM session.
"""

from __future__ import annotations

from ..db import Database
from ..models import State
from .bans import BanInfo, Bans
from .common import (
    AccountInfo,
    DomainInfo,
    MessageInfo,
    Refused,
    batches_by_size,
    header_of,
    holder_is_dead,
    lock_holder,
    new_uid,
    split_address,
    this_host,
)
from .directory import Directory, Resolution, Resolver, Route
from .leases import Leases
from .maildrop import Maildrops, StoredMessage
from .processes import Processes, ProcessInfo
from .queue import Action, Claimed, Outcome, Queue
from .queue_admin import Deferred, QueueAdmin, QueueEntry, RecipientStatus, StateDepth


class Store:
    """The parts of the store over one database (see the package docstring)."""

    def __init__(self, db: Database):
        self.db = db
        self.directory = Directory(db)
        self.maildrops = Maildrops(db)
        self.queue = Queue(db)
        self.leases = Leases(db)
        self.queue_admin = QueueAdmin(db)
        self.processes = Processes(db)
        self.bans = Bans(db)


__all__ = [
    "AccountInfo", "Action", "BanInfo", "Bans", "Claimed", "Deferred", "Directory",
    "DomainInfo", "Leases", "Maildrops", "MessageInfo", "Outcome", "ProcessInfo", "Processes",
    "Queue", "QueueAdmin", "QueueEntry", "RecipientStatus", "Refused", "Resolution", "Resolver",
    "Route", "State", "StateDepth", "Store", "StoredMessage", "batches_by_size", "header_of",
    "holder_is_dead", "lock_holder", "new_uid", "split_address", "this_host",
]
