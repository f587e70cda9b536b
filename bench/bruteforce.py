"""Password guessing from one address, with and without mailsrv's defences.

    python bench/bruteforce.py [--seconds 10] [--parallel 8] [--rounds 1]

A guesser on 127.0.0.1 tries wrong passwords for a real account as fast as it can, with
`--parallel` connections at once, each trying again after every refusal, for `--seconds`,
over POP3 (USER/PASS over implicit TLS), MPP (over implicit TLS), submission (AUTH PLAIN
over implicit TLS) and ODMR (AUTH CRAM-MD5). Three servers, the shipped bcrypt cost (12):

- "none": `failure_delay = 0`, `ban_after = 0`;
- "delay": the shipped failure delay (2 s, doubling per failure from the address up to
  15 s), no ban;
- "shipped": the delay and the ban after 10 failures (`ban_after = 10`).

Loopback is a plaintext network and never banned in the shipped configuration; here
`plaintext_networks` names another network and TLS carries the passwords, so the guesser
is treated as a stranger would be. Figures: guesses answered per second, and for
"shipped" how many were answered at all before the address was refused.
"""

from __future__ import annotations

import argparse
import base64
import poplib
import smtplib
import socket
import ssl
import threading
import time

from common import MailsrvWithStore, cram_md5_answer, self_signed_certificate, temp_folder

USER, SECRET = "ann@bench.example", "the-real-one"
VARIANTS = {
    "none": {"failure_delay": "0", "ban_after": "0"},
    "delay": {"failure_delay": "2s", "ban_after": "0"},
    "shipped": {"failure_delay": "2s", "ban_after": "10"},
}


def trusting() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def guess_pop3(address) -> bool:
    """One wrong guess; True if it was answered (False: refused or cut off)."""
    try:
        client = poplib.POP3_SSL(*address, timeout=60, context=trusting())
    except (poplib.error_proto, OSError):
        return False
    try:
        client.user(USER)
        client.pass_("wrong")
    except poplib.error_proto:
        return True
    except OSError:
        return False
    finally:
        client.sock.close()
    raise RuntimeError("a wrong password was taken")


def line_session(address, tls: bool):
    sock = socket.create_connection(address, timeout=60)
    if tls:
        sock = trusting().wrap_socket(sock)
    return sock, sock.makefile("rb")


def guess_mpp(address) -> bool:
    try:
        sock, reader = line_session(address, True)
        if not reader.readline().startswith(b"2"):
            return False
        sock.sendall(f"USER {USER}\r\n".encode())
        reader.readline()
        sock.sendall(b"PASS wrong\r\n")
        answered = reader.readline().startswith(b"530")
        sock.close()
        return answered
    except OSError:
        return False


def guess_submission(address) -> bool:
    try:
        with smtplib.SMTP_SSL(*address, timeout=60, context=trusting()) as client:
            client.ehlo()
            code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0wrong".encode()).decode())
            return code == 535
    except (smtplib.SMTPException, OSError):
        return False


def guess_odmr(address) -> bool:
    try:
        sock, reader = line_session(address, False)
        if not reader.readline().startswith(b"220"):
            return False
        sock.sendall(b"EHLO guesser.example\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        sock.sendall(b"AUTH CRAM-MD5\r\n")
        sock.sendall(cram_md5_answer(USER, "wrong", reader.readline()))
        answered = reader.readline().startswith(b"535")
        sock.close()
        return answered
    except OSError:
        return False


PROTOCOLS = {"pop3": ("pop3s", guess_pop3), "mpp": ("mpps", guess_mpp),
             "submission": ("submissions", guess_submission), "odmr": ("odmr", guess_odmr)}


class Server:
    def __init__(self, variant: str, cert: tuple[str, str]):
        from mailsrv.auth import hash_password

        folder = temp_folder(f"bench-brute-{variant}-")
        self.server = MailsrvWithStore(
            folder, "bench.example", name=variant,
            server={"max_connections_per_ip": "50"},
            pop3={"listen": "", "listen_tls": "127.0.0.1:0"}, mpp={"listen": "", "listen_tls": "127.0.0.1:0"},
            smtp={"listen": "", "submission": "", "submission_tls": "127.0.0.1:0"}, odmr={"listen": "127.0.0.1:0"},
            tls={"certfile": cert[0], "keyfile": cert[1]},
            auth={"bcrypt_rounds": "12", "plaintext_networks": "192.0.2.0/24", "never_ban": "", **VARIANTS[variant]},
        )
        self.server.store.directory.add_account(USER, hash_password(SECRET, 12), cram_secret=SECRET)
        self.server.process.start()
        self.addresses = self.server.process.addresses

    def stop(self) -> None:
        self.server.stop()


def attack(address, guess, seconds: float, parallel: int) -> tuple[int, int]:
    """(guesses answered, attempts refused) in ``seconds`` with ``parallel`` guessers."""
    answered, refused = [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def guesser() -> None:
        while time.monotonic() < deadline:
            ok = guess(address)
            with lock:
                (answered if ok else refused)[0] += 1

    threads = [threading.Thread(target=guesser) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answered[0], refused[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    cert = self_signed_certificate(temp_folder("bench-brute-tls-"))
    results: dict[str, dict[str, tuple[int, int]]] = {}
    for variant in VARIANTS:
        server = Server(variant, cert)
        try:
            for protocol, (listener, guess) in PROTOCOLS.items():
                if variant == "shipped":  # (each protocol against an address with no ban yet)
                    server.server.store.bans.lift("127.0.0.1")
                    server.stop()
                    server = Server(variant, cert)
                answered, refused = attack(server.addresses[listener], guess, args.seconds, args.parallel)
                results.setdefault(protocol, {})[variant] = (answered, refused)
                print(f"  {variant:8} {protocol:11} {answered / args.seconds:7.2f} guesses/s answered"
                      f" ({answered} answered, {refused} refused)", flush=True)
        finally:
            server.stop()
    print(f"\n{'protocol':12}{'none, /s':>12}{'delay, /s':>12}{'shipped: answered in all':>28}")
    for protocol, by in results.items():
        print(f"{protocol:12}{by['none'][0] / args.seconds:12.2f}{by['delay'][0] / args.seconds:12.2f}"
              f"{by['shipped'][0]:>28}")
    print(f"\none address, {args.parallel} guessers at once, {args.seconds:.0f} s per figure, bcrypt cost 12")


if __name__ == "__main__":
    main()
