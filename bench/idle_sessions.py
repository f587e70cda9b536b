"""How many idle sessions one mailsrv process holds, and its resident memory.

    python bench/idle_sessions.py [--sessions 2000]

Opens N POP3 connections to one `mailsrv serve` process (each reads its greeting and then
stays idle), then prints the server's resident memory before and after, per session, and
the time one more command takes while they are all open.
"""

from __future__ import annotations

import argparse
import socket

from common import MailsrvProcess, now, percentile, raise_fd_limit, rss_mb, temp_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    args = parser.parse_args()
    raise_fd_limit(args.sessions * 2 + 1000)
    server = MailsrvProcess(temp_folder("mailsrv-idle-"), delivery={"workers": "0"}).start()
    try:
        address = server.addresses["pop3"]
        baseline = rss_mb(server.proc.pid)
        sockets = []
        started = now()
        for _ in range(args.sessions):
            s = socket.create_connection(address, timeout=30)
            sockets.append(s)
            greeting = s.recv(200)
            assert greeting.startswith(b"+OK"), greeting
        opened = now() - started
        held = rss_mb(server.proc.pid)
        latencies = []
        for s in sockets[:: max(1, len(sockets) // 200)]:
            t = now()
            s.sendall(b"CAPA\r\n")
            data = b""
            while not data.endswith(b"\r\n.\r\n"):
                data += s.recv(4096)
            latencies.append((now() - t) * 1000)
        status = open(f"/proc/{server.proc.pid}/status").read().splitlines()
        threads = int(next(line for line in status if line.startswith("Threads:")).split()[1])
        print(f"idle POP3 sessions held by one process: {len(sockets)} (opened in {opened:.2f} s)")
        print(f"server threads: {threads}")
        print(f"resident memory: {baseline:.1f} MiB before, {held:.1f} MiB with the sessions open")
        print(f"per session: {(held - baseline) * 1024 / len(sockets):.1f} KiB")
        print(f"CAPA latency with all open: p50 {percentile(latencies, 50):.2f} ms, p99 {percentile(latencies, 99):.2f} ms")
        for s in sockets:
            s.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
