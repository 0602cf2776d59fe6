"""Network namespaces for benchmarks that need the kernel's NAT (``--proxy-mode nftables``):
make one, run things inside, open sockets inside, delete it. Root only.

Sockets are made inside by a short-lived thread that joins the namespace with setns(2); a
socket stays in the namespace it was made in, so the benchmark's own code then uses it like
any other. Everything a benchmark makes is deleted by ``close()`` (also on error)."""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import threading

__all__ = ["Netns", "netns_available"]

_CLONE_NEWNET = 0x40000000


def netns_available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for prog in ("ip", "nft"):
        if shutil.which(prog) is None:
            return f"{prog} is not installed (scripts/system-deps.sh)"
    return None


class Netns:
    def __init__(self, tag: str = "bench") -> None:
        self.name = f"mpb{secrets.token_hex(3)}-{tag}"
        self._made: list[str] = []
        self.add(self.name)
        self.ip("link", "set", "lo", "up")

    def add(self, name: str) -> None:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        self._made.append(name)

    def ip(self, *args: str, ns: str | None = None) -> None:
        r = subprocess.run(["ip", "-n", ns or self.name, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def exec_argv(self, argv: list[str], ns: str | None = None) -> list[str]:
        """``argv`` run inside; MESHPROXY_BENCH_NETNS tells bench tools where they are
        (bench._util.in_bench_netns lets them use the namespace's own addresses)."""
        ns = ns or self.name
        return ["ip", "netns", "exec", ns, "env", f"MESHPROXY_BENCH_NETNS={ns}", *argv]

    def run(self, *argv: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_argv(list(argv), ns), capture_output=True, text=True, check=check, timeout=600)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, ns: str | None = None) -> socket.socket:
        path = f"/run/netns/{ns or self.name}"
        out: list = []

        def make() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(path, os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns {path}")
                finally:
                    os.close(fd)
                out.append(socket.socket(family, type))
            except BaseException as exc:       # handed back to the caller's thread
                out.append(exc)

        t = threading.Thread(target=make)
        t.start()
        t.join()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def veth(self, peer_ns: str, here: str, there: str) -> None:
        """A veth pair: ``here`` in this namespace, ``there`` in ``peer_ns``."""
        self.ip("link", "add", here, "type", "veth", "peer", "name", there, "netns", peer_ns)
        self.ip("link", "set", here, "up")
        self.ip("link", "set", there, "up", ns=peer_ns)

    def close(self) -> None:
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self._made.clear()
