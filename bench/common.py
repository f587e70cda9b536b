"""Shared pieces of the benchmarks: a mailsrv server process, users, memory, percentiles.

Benchmarks print figures; they never pass or fail anything. Every connection goes to
127.0.0.1 only, every loop is bounded in count and time.
"""

from __future__ import annotations

import base64
import os
import pwd
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LISTENING = re.compile(r"(\w+) listening on ([\d.]+):(\d+)")


def raise_fd_limit(wanted: int = 20000) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_parts_mb(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of one process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields.get("Anonymous", 0) / 1024, (fields.get("Rss", 0) - fields.get("Anonymous", 0)) / 1024


def pss_tree_mb(pid: int) -> float:
    """Proportional set size summed over a process and all its descendants, in MiB."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    result, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            result.append(child)
            todo.append(child)
    return result


def cpu_seconds(pids) -> float:
    """CPU time (user and system, every thread) used so far by these processes and by
    their children that have ended (a PostgreSQL backend that closed is counted by the
    postmaster that waited for it); a process of the list that has ended counts nothing."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def postgres_pids() -> list[int]:
    """The processes of the PostgreSQL server on this machine (its backends, WAL writer,
    checkpointer...): those of the user ``postgres``."""
    try:
        uid = pwd.getpwnam("postgres").pw_uid
    except KeyError:
        return []
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _owner(e) == uid]


def _owner(entry: Path) -> int | None:
    try:
        return entry.stat().st_uid
    except OSError:
        return None


class MailsrvProcess:
    """`mailsrv serve` in a child process on ephemeral loopback ports; ``code``: the source
    tree it runs from (another checkout, to compare commits; this one by default)."""

    def __init__(self, folder: Path, database: str | None = None, code: Path | None = None, **sections: dict[str, str]):
        self.folder = folder
        self.code = code or ROOT
        database = database or f"sqlite:///{folder / 'mailsrv.db'}"
        settings = {
            "server": {"hostname": "bench.example", "database": database, "log_level": "info",
                       "max_connections": "20000", "max_connections_per_ip": "20000"},
            "pop3": {"listen": "127.0.0.1:0"},
            "pop": {"listen": ""},
            "mpp": {"listen": "127.0.0.1:0", "max_message_size": "25M"},
            "odmr": {"listen": ""},
            "smtp": {"listen": "", "submission": ""},
            "auth": {"bcrypt_rounds": "4", "failure_delay": "0"},
            "delivery": {"workers": "2"},
        }
        for section, keys in sections.items():
            settings.setdefault(section, {}).update(keys)
        self.conf = folder / "mailsrv.conf"
        self.conf.write_text("".join(
            f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for section, keys in settings.items()
        ))
        self.database = database

    def start(self) -> MailsrvProcess:
        env = {**os.environ, "PYTHONPATH": str(self.code)}
        self.proc = subprocess.Popen(  # (run in the tree: `-m` puts the working directory
            # first on the path, so from another checkout its code would be run instead)
            [sys.executable, "-m", "mailsrv.cli", "-c", str(self.conf), "serve"],
            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=raise_fd_limit, cwd=self.code,
        )
        self.addresses: dict[str, tuple[str, int]] = {}
        ready = threading.Event()

        def drain() -> None:  # keep reading the log so the server never blocks on it
            with open(self.folder / "mailsrv.log", "w") as log:
                for line in self.proc.stderr:
                    log.write(line)
                    match = LISTENING.search(line)
                    if match:
                        self.addresses[match.group(1)] = (match.group(2), int(match.group(3)))
                    if "mailsrv ready" in line:
                        ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        ready.wait(120)
        if self.proc.poll() is not None:
            raise RuntimeError(f"mailsrv did not start: see {self.folder / 'mailsrv.log'}")
        return self

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class MailsrvWithStore:
    """A `mailsrv serve` process plus this process's own Store on its database, with one
    local domain, for benchmarks that set up users and mail directly."""

    name = "mailsrv"

    def __init__(self, folder: Path, domain: str, *, name: str = "mailsrv", database: str = "sqlite",
                 code: Path | None = None, processes: int = 1, **sections: dict[str, str]):
        from mailsrv import db as dbmod
        from mailsrv import migrate
        from mailsrv.store import Store

        self.name = name
        url, self.schema = database_url(database)
        self.process = MailsrvProcess(folder, url, code, **sections)
        #: further `mailsrv serve` processes on the same database (as further hosts would
        #: be), each with its own ports; start_all starts them with the first
        self.processes = [self.process] + [
            MailsrvProcess(temp_folder(f"{folder.name}-{n}-"), self.process.database, code, **sections)
            for n in range(1, processes)
        ]
        self.db = dbmod.Database(self.process.database)
        migrate.upgrade(self.db)
        self.store = Store(self.db)
        self.store.directory.add_domain(domain)

    def start_all(self) -> None:
        for process in self.processes:
            process.start()

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU used so far by (the `mailsrv serve` processes, the database server): on
        PostgreSQL its processes on this machine (the servers being measured take turns,
        so what PostgreSQL does meanwhile is for the one running); SQLite runs inside
        mailsrv."""
        served = cpu_seconds([p.proc.pid for p in self.processes if hasattr(p, "proc")])
        return served, cpu_seconds(postgres_pids()) if self.schema else 0.0

    def stop(self) -> None:
        for process in self.processes:
            if hasattr(process, "proc"):
                process.stop()
        self.db.dispose()
        if self.schema:
            drop_postgres_schema(self.schema)


#: the PostgreSQL of these machines (the tests' MAILSRV_TEST_POSTGRES_URL, when set)
POSTGRES_URL = os.environ.get("MAILSRV_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def database_url(database: str) -> tuple[str | None, str | None]:
    """(the URL mailsrv is to use, the PostgreSQL schema made for it) for a ``--database``
    value: ``sqlite`` (None: a new file in the server's folder), ``postgresql`` (a fresh
    schema on POSTGRES_URL), or a database URL (PostgreSQL: a fresh schema there)."""
    if database == "sqlite":
        return None, None
    if database == "postgresql" or database.startswith("postgresql"):
        return postgres_schema(POSTGRES_URL if database == "postgresql" else database)
    if database.startswith("sqlite:"):
        return database, None
    raise SystemExit(f"--database: sqlite, postgresql or a database URL, not {database!r}")


def database_label(database: str) -> str:
    """The column a ``--database`` value's figures are printed under."""
    return "postgresql" if database.startswith("postgresql") else "sqlite"


def postgres_schema(base: str = POSTGRES_URL) -> tuple[str, str]:
    """A fresh schema of its own on PostgreSQL: (the URL that uses it, its name)."""
    import uuid

    from sqlalchemy import create_engine, text

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    sep = "&" if "?" in base else "?"
    _SCHEMA_BASES[schema] = base
    return f"{base}{sep}options=-csearch_path%3D{schema}", schema


_SCHEMA_BASES: dict[str, str] = {}


def drop_postgres_schema(schema: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(_SCHEMA_BASES.get(schema, POSTGRES_URL), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


def self_signed_certificate(folder: Path) -> tuple[str, str]:
    """(certfile, keyfile) of a new self-signed certificate for localhost."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


def cram_md5_answer(user: str, secret: str, challenge_reply: bytes) -> bytes:
    """The client's line (CRLF included) to a ``334``/``+`` CRAM-MD5 challenge reply."""
    from mailsrv.auth import cram_md5_digest

    challenge = base64.b64decode(challenge_reply[4:].strip())
    return base64.b64encode(f"{user} {cram_md5_digest(secret, challenge)}".encode()) + b"\r\n"


def hold_on_cpu(cpu: int | None) -> None:
    """Keep this (load-generating) process's threads started from now on to one CPU, so
    that the servers, started before, have the others as a real office host's clients
    on other machines would leave them (None: leave the placement to the kernel)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
        print(f"load generator held on CPU {cpu} (as taskset would); the servers were started on every CPU", flush=True)


def add_variant_arguments(parser) -> None:
    """The options every benchmark has for comparing mailsrv with itself."""
    parser.add_argument("--database", action="append", metavar="sqlite|postgresql|URL",
                        help="mailsrv's database: sqlite (the default), postgresql (a fresh schema on "
                             "POSTGRES_URL) or a database URL; given twice (--database postgresql --database "
                             "sqlite), mailsrv on each, side by side, the peer left out")
    parser.add_argument("--against", type=Path, metavar="TREE",
                        help="compare with mailsrv run from another source tree (e.g. a worktree of an older "
                             "commit), named 'before', the servers taking turns; the peer is left out")
    parser.add_argument("--client-cpu", type=int, metavar="N",
                        help="hold the load generator on CPU N once the servers run (as taskset would)")


def databases(args) -> list[str]:
    """The ``--database`` values given (sqlite when none was)."""
    return args.database or ["sqlite"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on just now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def print_side_by_side(results: dict[str, dict[str, float]], width: int, decimals: int) -> None:
    """One line per figure, one column per server, and first / second when there are two."""
    names = list(results)
    print()
    header = f"{'figure':{width}}" + "".join(f"{n:>12}" for n in names) + ("       ratio" if len(names) == 2 else "")
    print(header)
    print("-" * len(header))
    for key in results[names[0]]:
        values = [results[n][key] for n in names]
        line = f"{key:{width}}" + "".join(f"{v:12.{decimals}f}" for v in values)
        if len(values) == 2 and values[1]:
            line += f"{values[0] / values[1]:12.2f}"
        print(line)


def temp_folder(prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


def read_until(sock: socket.socket, end: bytes, buffer: bytearray) -> int:
    """Read from ``sock`` until the data ends with ``end``; the data is left in ``buffer``
    (cleared first) and its length returned. Reads go into one preallocated area."""
    del buffer[:]
    chunk = bytearray(65536)
    view = memoryview(chunk)
    tail = len(end)
    while True:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("server closed")
        buffer += view[:n]
        if buffer[-tail:] == end:
            return len(buffer)


def now() -> float:
    return time.perf_counter()
