"""``mailsrv queue``: list, show, flush, hold, release and delete queued mail."""

from __future__ import annotations

from ..config import Config
from ..store import Store
from .format import human_size, table, when


def cmd_queue(store: Store, config: Config, args) -> int:
    admin = store.queue_admin
    action = args.action
    if action == "list":
        rows = [
            (e.id, e.sender or "<>", human_size(e.size), when(e.created_at), e.origin, r.recipient, r.state,
             r.attempts, when(r.next_attempt_at), (r.last_error or "")[:60])
            for e in admin.list()
            for r in e.pending
        ]
        headers = ("id", "sender", "size", "queued", "origin", "recipient", "state", "tries", "next try", "last error")
        print(table(headers, rows))
    elif action == "show":
        e = admin.show(args.id)
        print(f"id: {e.id}\nsender: {e.sender or '<>'}\nsize: {e.size}\nqueued: {when(e.created_at)}\norigin: {e.origin}\n")
        rows = [(r.recipient, r.state, r.attempts, r.last_error or "", when(r.next_attempt_at)) for r in e.recipients]
        print(table(("recipient", "state", "tries", "last error", "next try"), rows))
        print("\n" + e.body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace"))
    elif action == "flush":
        print(f"{admin.flush()} recipient(s) due now")
    elif action == "hold":
        print(f"held {admin.hold(args.id)} recipient(s) of {args.id}")
    elif action == "release":
        print(f"released {admin.release(args.id)} recipient(s) of {args.id}")
    elif action == "del":
        admin.delete(args.id)
        print(f"deleted queued message {args.id}")
    return 0
