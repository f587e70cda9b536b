"""`mailsrv queue ...`: list, show, flush, hold, release and delete queued mail."""

from __future__ import annotations

from ..config import Config
from ..store import Store


def run(store: Store, config: Config, args) -> int:
    from ..cli import human_size, table, when

    action = args.action
    if action == "list":
        rows = []
        for qid, sender, size, created, origin, recipients in store.queue_list():
            for rcpt, state, attempts, error, next_at in recipients:
                if state in ("delivered", "failed"):
                    continue
                rows.append((qid, sender or "<>", human_size(size), when(created), origin, rcpt, state, attempts, when(next_at), (error or "")[:60]))
        print(table(("id", "sender", "size", "queued", "origin", "recipient", "state", "tries", "next try", "last error"), rows))
    elif action == "show":
        qid, sender, size, created, origin, recipients, body = store.queue_show(args.id)
        print(f"id: {qid}\nsender: {sender or '<>'}\nsize: {size}\nqueued: {when(created)}\norigin: {origin}\n")
        print(table(("recipient", "state", "tries", "last error", "next try"), [(r, s, a, e or "", when(n)) for r, s, a, e, n in recipients]))
        header = body.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        print("\n" + header)
    elif action == "flush":
        print(f"{store.queue_set_state(None, ('queued',), 'queued')} recipient(s) due now")
    elif action == "hold":
        print(f"held {store.queue_set_state(args.id, ('queued',), 'held')} recipient(s) of {args.id}")
    elif action == "release":
        print(f"released {store.queue_set_state(args.id, ('held',), 'queued')} recipient(s) of {args.id}")
    elif action == "del":
        store.queue_delete(args.id)
        print(f"deleted queued message {args.id}")
    return 0
