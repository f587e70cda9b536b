"""Which CPUs the server's threads run on (``[server] pin_cpu``).

Only one thread of a Python process runs Python at a time: it holds the GIL, and every
session thread gives it up while it waits for its client and takes it back when a command
arrives. When the thread that wants the GIL sleeps on another CPU, every hand-over is a
cross-CPU wake-up, which on a virtual machine means an inter-processor interrupt and often
an exit to the hypervisor; with many busy sessions those wake-ups cost more than the work.
With ``[server] pin_cpu = yes`` (the default), ``mailsrv serve`` keeps its threads on one
CPU (threads inherit the CPUs of the thread that starts them, so pinning the main thread
first pins them all), and the hand-overs become switches on one CPU. With the load
generator on a CPU of its own, on a 2-CPU virtual machine, pinning made 8 clients 1.4 to
1.9 times as fast (MPP and SMTP posting, POP3 retrieval of 10 KB messages), and one client
retrieving 1 MB messages over TLS 2 to 3 times slower, whose encryption then cannot run
beside the rest. bench/README.md has every figure.

Long work that runs without the GIL is the exception: a bcrypt check takes about 100 ms
of one CPU, and several logins at once should use every CPU. The password checks run on a
few threads of their own (one per CPU, see :class:`mailsrv.auth.Authenticator`) that
:func:`use_every_cpu`. The other CPUs are also left to the clients, the database server
and the kernel's work for other processes.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("mailsrv.cpu")

#: the CPUs the process may use, once its threads are pinned (None: they are not)
_pinned: frozenset[int] | None = None


def pin_to_one_cpu() -> int | None:
    """Keep the calling thread, and every thread it starts later, on one of the CPUs it
    may use (the highest numbered: CPU 0 often serves more interrupts). Returns the CPU,
    or None where there is one CPU only or no way to choose (not Linux)."""
    global _pinned
    try:
        allowed = frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(allowed) < 2:
        return None
    cpu = max(allowed)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        log.info("could not keep the threads on one CPU: %s", exc)
        return None
    _pinned = allowed
    return cpu


def allowed_cpus() -> frozenset[int]:
    """The CPUs the process may use (all of them, also once its threads are pinned)."""
    if _pinned is not None:
        return _pinned
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def use_every_cpu() -> None:
    """Let the calling thread run on every CPU the process may use (for long work without
    the GIL); nothing changes unless :func:`pin_to_one_cpu` pinned."""
    if _pinned is not None:
        os.sched_setaffinity(0, _pinned)
