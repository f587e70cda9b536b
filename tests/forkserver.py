"""Start `mailsrv serve` quickly, many times: a helper process for tests/test_crash.py.

It imports mailsrv once, then for each line ``serve CONF`` on its standard input forks a
child that runs ``mailsrv -c CONF serve`` (0.1-0.3 s to "ready" instead of the 0.7-1 s a new
interpreter spends importing SQLAlchemy). It runs no thread of its own, so forking is safe.
On its standard output, one line each:

- ``line PID TEXT``: a line the child logged (standard error);
- ``exit PID STATUS``: the child ended (its log closed), with its wait status.

    python tests/forkserver.py
"""

from __future__ import annotations

import os
import select
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailsrv.app import App  # noqa: E402, F401  (imported once, before any fork, with what
from mailsrv.cli.main import main  # noqa: E402    serve loads on its first use)
from mailsrv.delivery.relay import load_everything  # noqa: E402

load_everything()
try:  # (SQLAlchemy loads its PostgreSQL driver when an engine first asks for it)
    import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401
except ImportError:
    pass


def serve(conf: str, keep: set[int]) -> tuple[int, int]:
    """Fork a child serving ``conf``; return (its pid, the read end of its log)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its log into the pipe, nothing else of the parent's kept
        try:
            os.dup2(write, 2)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            for fd in (read, write, devnull, *keep):
                os.close(fd)
            status = main(["-c", conf, "serve"])
        except BaseException:  # noqa: BLE001  (whatever happens, never back into the loop)
            import traceback

            traceback.print_exc()
            status = 70
        sys.stderr.flush()
        os._exit(status if isinstance(status, int) else 1)
    os.close(write)
    return pid, read


def run() -> None:
    out = sys.stdout
    children: dict[int, int] = {}  # log fd -> pid
    partial: dict[int, bytes] = {}
    commands = sys.stdin.buffer.raw
    pending = b""
    while True:
        ready, _, _ = select.select([commands, *children], [], [])
        for fd in ready:
            if fd is commands:
                data = os.read(commands.fileno(), 4096)
                if not data:
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    verb, _, conf = line.decode().partition(" ")
                    if verb == "serve":
                        pid, log = serve(conf, set(children))
                        children[log] = pid
                        out.write(f"started {pid}\n")
                        out.flush()
                continue
            data = os.read(fd, 65536)
            pid = children[fd]
            if data:
                lines = (partial.pop(fd, b"") + data).split(b"\n")
                partial[fd] = lines.pop()
                for text in lines:
                    out.write(f"line {pid} {text.decode(errors='replace')}\n")
                out.flush()
                continue
            os.close(fd)
            del children[fd]
            partial.pop(fd, None)
            _, status = os.waitpid(pid, 0)
            out.write(f"exit {pid} {status}\n")
            out.flush()


if __name__ == "__main__":
    run()
