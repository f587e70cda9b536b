"""The directory: domains, accounts, aliases, ODMR grants, and where an address leads.

:meth:`Directory.resolve` (and :class:`Resolver`, the same on a transaction the caller
holds) is the one answer to "where does mail for this address go" that delivery and an
SMTP receiver's RCPT both use.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import ARRAY, String, bindparam, delete, func, insert, select, update

from ..db import Database
from ..models import (
    Account,
    Alias,
    Domain,
    MaildropLock,
    Message,
    OdmrGrant,
    QueuedMessage,
    QueueRecipient,
    State,
    utcnow,
)
from .common import AccountInfo, DomainInfo, Refused, split_address

ACCOUNT_COLUMNS = (
    Account.id, Account.address, Account.domain_id, Account.password_hash, Account.cram_secret,
    Account.enabled, Account.quota_bytes, Account.last_login_at,
)
#: (Raw) the statements of a login and of resolving an address
ACCOUNT_BY_ADDRESS = select(*ACCOUNT_COLUMNS).where(Account.address == bindparam("address"))
MARK_LOGIN = update(Account).where(Account.id == bindparam("account")).values(last_login_at=bindparam("now"))
DOMAIN_KIND = select(Domain.kind).where(Domain.name == bindparam("name"))
#: (Raw) where an address leads, in one statement: its domain's kind, with the account
#: and the alias of that address (NULLs where there is none); no row: not our domain
ROUTE_OF = (
    select(Domain.kind, *ACCOUNT_COLUMNS, Alias.target)
    .select_from(Domain)
    .outerjoin(Account, Account.address == bindparam("address"))
    .outerjoin(Alias, Alias.address == bindparam("address"))
    .where(Domain.name == bindparam("name"))
)
#: (Raw, PostgreSQL) :data:`ROUTE_OF` for many addresses at once (given with their
#: domains, in the same order), each row led by its address: a group of posts reads
#: every route it needs in one round trip (:func:`read_routes`)
_WANTED = func.unnest(
    bindparam("addresses", type_=ARRAY(String)), bindparam("names", type_=ARRAY(String))
).table_valued("address", "name").render_derived(name="wanted")
ROUTES_OF = (
    select(_WANTED.c.address, Domain.kind, *ACCOUNT_COLUMNS, Alias.target)
    .select_from(_WANTED)
    .join(Domain, Domain.name == _WANTED.c.name)
    .outerjoin(Account, Account.address == _WANTED.c.address)
    .outerjoin(Alias, Alias.address == _WANTED.c.address)
)
MAILBOX_USAGE = select(func.count(Message.id), func.coalesce(func.sum(Message.size), 0)).where(
    Message.account_id == bindparam("account")
)


class Route(StrEnum):
    """Where mail for an address goes."""

    ACCOUNT = "account"  # a mailbox here
    ALIAS = "alias"  # another address (``Resolution.target``)
    ODMR = "odmr"  # held for an ODMR customer
    REMOTE = "remote"  # a domain we do not serve
    UNKNOWN = "unknown"  # a local domain without such a user or alias


@dataclass(frozen=True)
class Resolution:
    route: Route
    account: AccountInfo | None = None
    target: str = ""


def read_routes(raw, groups: list[list[str]]) -> None:
    """Read the routes of every address in ``groups`` (lists of addresses, lower case) in
    one statement, into the transaction's memo, where :meth:`Resolver.resolve` finds them:
    the ``prime`` of a group of posts (:meth:`Database.write_grouped`). PostgreSQL only."""
    wanted = list(dict.fromkeys(a for group in groups for a in group))
    found = {row[0]: row[1:] for row in raw.execute(
        ROUTES_OF, {"addresses": wanted, "names": [a.rpartition("@")[2] for a in wanted]}
    )}
    for address in wanted:
        raw.memo[("route", address)] = found.get(address)


class Resolver:
    """Directory reads inside a transaction the caller holds (a :class:`~mailsrv.raw.Raw`):
    delivery decides a whole batch on one. A route already read in that transaction
    (:func:`read_routes`) is not read again."""

    def __init__(self, raw):
        self.raw = raw

    def resolve(self, address: str) -> Resolution:
        """Where mail for ``address`` goes: an account, an alias, an ODMR domain, elsewhere."""
        address = address.strip().lower()
        key = ("route", address)
        if key in self.raw.memo:
            row = self.raw.memo[key]
        else:
            row = self.raw.execute(ROUTE_OF, {"address": address, "name": address.rpartition("@")[2]}).first()
        if row is None:
            return Resolution(Route.REMOTE)
        if row[0] == "odmr":
            return Resolution(Route.ODMR)
        if row[1] is not None:
            return Resolution(Route.ACCOUNT, account=AccountInfo(*row[1:-1]))
        target = row[-1]
        return Resolution(Route.ALIAS, target=target) if target else Resolution(Route.UNKNOWN)

    def mailbox_usage(self, account_id: int) -> tuple[int, int]:
        """(messages, octets) in the account's mailbox."""
        row = self.raw.execute(MAILBOX_USAGE, {"account": account_id}).one()
        return int(row[0]), int(row[1])


class Directory:
    """Domains, accounts, aliases and ODMR grants (see the package docstring)."""

    def __init__(self, db: Database):
        self.db = db

    # --- the paths of a login and of a recipient -------------------------------------

    def find_account(self, address: str) -> AccountInfo | None:
        """The account with this address (any case), enabled or not; None if there is none."""
        with self.db.read_raw(snapshot=False) as raw:
            row = raw.execute(ACCOUNT_BY_ADDRESS, {"address": address.strip().lower()}).first()
            return AccountInfo(*row) if row else None

    def record_login(self, account_id: int) -> None:
        """Set ``last_login_at`` to now."""
        with self.db.write_raw(durable=False) as raw:
            raw.execute(MARK_LOGIN, {"account": account_id, "now": utcnow()})

    def resolve(self, address: str) -> Resolution:
        """:meth:`Resolver.resolve` in a transaction of its own."""
        with self.db.read_raw() as raw:
            return Resolver(raw).resolve(address)

    def domain_kind(self, name: str) -> str | None:
        """``local``, ``odmr`` or None for a domain we do not serve."""
        with self.db.read_raw(snapshot=False) as raw:
            return raw.scalar(DOMAIN_KIND, {"name": name.strip().lower()})

    # --- domains ---------------------------------------------------------------------

    def add_domain(self, name: str, kind: str = "local") -> DomainInfo:
        """Add a domain; Refused if it exists."""
        name = name.strip().lower().rstrip(".")
        if not name or "@" in name or " " in name:
            raise Refused(f"not a domain name: {name!r}")
        with self.db.write_core() as conn:
            if conn.scalar(select(Domain.id).where(Domain.name == name)) is not None:
                raise Refused(f"domain {name} exists already")
            domain_id = conn.execute(insert(Domain).values(name=name, kind=kind).returning(Domain.id)).scalar_one()
            return DomainInfo(domain_id, name, kind)

    def del_domain(self, name: str) -> None:
        """Delete a domain that has no accounts; Refused otherwise."""
        name = name.strip().lower()
        with self.db.write_core() as conn:
            domain_id = conn.scalar(select(Domain.id).where(Domain.name == name))
            if domain_id is None:
                raise Refused(f"no such domain: {name}")
            users = conn.scalar(select(func.count(Account.id)).where(Account.domain_id == domain_id))
            if users:
                raise Refused(f"domain {name} still has {users} account(s); delete them first")
            conn.execute(delete(OdmrGrant).where(OdmrGrant.domain_id == domain_id))
            conn.execute(delete(Domain).where(Domain.id == domain_id))

    def list_domains(self) -> list[DomainInfo]:
        with self.db.read_core() as conn:
            counts = (
                select(Account.domain_id, func.count(Account.id).label("n")).group_by(Account.domain_id).subquery()
            )
            rows = conn.execute(
                select(Domain.id, Domain.name, Domain.kind, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.domain_id == Domain.id)
                .order_by(Domain.name)
            )
            return [DomainInfo(r[0], r[1], r[2], int(r[3])) for r in rows]

    # --- accounts --------------------------------------------------------------------

    def add_account(
        self, address: str, password_hash: str, cram_secret: str | None = None, quota_bytes: int | None = None
    ) -> AccountInfo:
        """Create an account in an existing local domain; Refused if it or an alias exists."""
        local, domain = split_address(address)
        address = f"{local}@{domain}"
        with self.db.write_core() as conn:
            found = conn.execute(select(Domain.id, Domain.kind).where(Domain.name == domain)).first()
            if found is None:
                raise Refused(f"unknown domain {domain}: add it first with `mailsrv domain add`")
            if found.kind != "local":
                raise Refused(f"{domain} is an ODMR domain: accounts live in local domains")
            if conn.scalar(select(Account.id).where(Account.address == address)) is not None:
                raise Refused(f"user {address} exists already")
            if conn.scalar(select(Alias.id).where(Alias.address == address)) is not None:
                raise Refused(f"{address} is an alias already")
            conn.execute(
                insert(Account).values(
                    address=address, domain_id=found.id, password_hash=password_hash,
                    cram_secret=cram_secret, quota_bytes=quota_bytes,
                )
            )
            return AccountInfo(*conn.execute(ACCOUNT_BY_ADDRESS, {"address": address}).one())

    @staticmethod
    def _account_id(conn, address: str) -> int:
        """The id of the account with this address; Refused if there is none."""
        address = address.strip().lower()
        account_id = conn.scalar(select(Account.id).where(Account.address == address))
        if account_id is None:
            raise Refused(f"no such user: {address}")
        return account_id

    def _update_account(self, address: str, **values) -> None:
        with self.db.write_core() as conn:
            account_id = self._account_id(conn, address)
            conn.execute(update(Account).where(Account.id == account_id).values(**values))

    def set_password(self, address: str, password_hash: str, cram_secret: str | None) -> None:
        """Replace an account's password (and CRAM-MD5 secret: None removes it)."""
        self._update_account(address, password_hash=password_hash, cram_secret=cram_secret)

    def set_enabled(self, address: str, enabled: bool) -> None:
        self._update_account(address, enabled=enabled)

    def del_account(self, address: str) -> int:
        """Delete an account and its mailbox; return how many messages went with it."""
        with self.db.write_core() as conn:
            account_id = self._account_id(conn, address)
            count = conn.scalar(select(func.count(Message.id)).where(Message.account_id == account_id))
            for table in (Message, MaildropLock, OdmrGrant):
                conn.execute(delete(table).where(table.account_id == account_id))
            conn.execute(delete(Account).where(Account.id == account_id))
            return int(count or 0)

    def list_accounts(self) -> list[tuple[AccountInfo, int, int]]:
        """Every account with its (messages, octets)."""
        with self.db.read_core() as conn:
            usage = (
                select(Message.account_id, func.count(Message.id).label("n"), func.sum(Message.size).label("octets"))
                .group_by(Message.account_id)
                .subquery()
            )
            rows = conn.execute(
                select(*ACCOUNT_COLUMNS, func.coalesce(usage.c.n, 0), func.coalesce(usage.c.octets, 0))
                .outerjoin(usage, usage.c.account_id == Account.id)
                .order_by(Account.address)
            )
            return [(AccountInfo(*r[:-2]), int(r[-2]), int(r[-1])) for r in rows]

    # --- aliases ---------------------------------------------------------------------

    def add_alias(self, address: str, target: str) -> None:
        """Mail for ``address`` (in a local domain) goes to ``target`` (any address)."""
        local, domain = split_address(address)
        address = f"{local}@{domain}"
        target_local, target_domain = split_address(target)
        with self.db.write_core() as conn:
            if conn.scalar(select(Domain.kind).where(Domain.name == domain)) != "local":
                raise Refused(f"{domain} is not a local domain: add it first with `mailsrv domain add`")
            if conn.scalar(select(Alias.id).where(Alias.address == address)) is not None:
                raise Refused(f"alias {address} exists already")
            if conn.scalar(select(Account.id).where(Account.address == address)) is not None:
                raise Refused(f"{address} is a user: an alias cannot shadow it")
            conn.execute(insert(Alias).values(address=address, target=f"{target_local}@{target_domain}"))

    def del_alias(self, address: str) -> None:
        address = address.strip().lower()
        with self.db.write_core() as conn:
            if conn.execute(delete(Alias).where(Alias.address == address)).rowcount == 0:
                raise Refused(f"no such alias: {address}")

    def list_aliases(self) -> list[tuple[str, str]]:
        with self.db.read_core() as conn:
            return [(r[0], r[1]) for r in conn.execute(select(Alias.address, Alias.target).order_by(Alias.address))]

    # --- ODMR grants -----------------------------------------------------------------

    def grant_odmr(self, address: str, domain: str) -> None:
        """Let the account ATRN this ``odmr`` domain."""
        domain = domain.strip().lower()
        with self.db.write_core() as conn:
            account_id = self._account_id(conn, address)
            found = conn.execute(select(Domain.id, Domain.kind).where(Domain.name == domain)).first()
            if found is None:
                raise Refused(f"unknown domain {domain}: add it with `mailsrv domain add {domain} --odmr`")
            if found.kind != "odmr":
                raise Refused(f"{domain} is a local domain: only ODMR domains can be granted")
            if self._grant_exists(conn, account_id, found.id):
                raise Refused(f"{address.strip().lower()} may ATRN {domain} already")
            conn.execute(insert(OdmrGrant).values(account_id=account_id, domain_id=found.id))

    def revoke_odmr(self, address: str, domain: str) -> None:
        domain = domain.strip().lower()
        with self.db.write_core() as conn:
            account_id = self._account_id(conn, address)
            domain_id = conn.scalar(select(Domain.id).where(Domain.name == domain))
            if domain_id is None or not self._grant_exists(conn, account_id, domain_id):
                raise Refused(f"{address.strip().lower()} has no grant for {domain}")
            conn.execute(
                delete(OdmrGrant).where(OdmrGrant.account_id == account_id, OdmrGrant.domain_id == domain_id)
            )

    @staticmethod
    def _grant_exists(conn, account_id: int, domain_id: int) -> bool:
        return conn.scalar(
            select(func.count()).where(OdmrGrant.account_id == account_id, OdmrGrant.domain_id == domain_id)
        ) > 0

    def odmr_overview(self) -> list[tuple[str, list[str], int, int, object]]:
        """Each ODMR domain: (name, the accounts granted it, messages waiting, their
        octets, when the oldest came); waiting means held or being turned round now."""
        with self.db.read_core() as conn:
            names = conn.execute(select(Domain.name).where(Domain.kind == "odmr").order_by(Domain.name)).scalars().all()
            grants: dict[str, list[str]] = {name: [] for name in names}
            for address, domain in conn.execute(
                select(Account.address, Domain.name).join(OdmrGrant, OdmrGrant.account_id == Account.id)
                .join(Domain, Domain.id == OdmrGrant.domain_id).order_by(Account.address)
            ):
                grants.setdefault(domain, []).append(address)
            waiting = (
                select(QueueRecipient.domain, QueuedMessage.id, QueuedMessage.size, QueuedMessage.created_at)
                .join(QueuedMessage, QueuedMessage.id == QueueRecipient.queue_id)
                .where(QueueRecipient.state.in_((State.HELD, State.INFLIGHT)), QueueRecipient.domain.in_(names))
                .distinct()
                .subquery()
            )
            totals = {
                r[0]: (int(r[1]), int(r[2] or 0), r[3])
                for r in conn.execute(
                    select(waiting.c.domain, func.count(waiting.c.id), func.sum(waiting.c.size), func.min(waiting.c.created_at))
                    .group_by(waiting.c.domain)
                )
            }
        return [(name, grants[name], *totals.get(name, (0, 0, None))) for name in names]

    def granted_domains(self, account_id: int) -> list[str]:
        """The ODMR domains this account may ATRN, by name."""
        with self.db.read_core() as conn:
            rows = conn.execute(
                select(Domain.name)
                .join(OdmrGrant, OdmrGrant.domain_id == Domain.id)
                .where(OdmrGrant.account_id == account_id)
                .order_by(Domain.name)
            )
            return [r[0] for r in rows]
