"""Small shared helpers for the benchmark: the loopback-only rule, free ports, child processes
started and stopped by pid, and installing the tools we compare with.

Invariants kept here:
- Every process the benchmark starts goes through `Proc`, is the leader of its own session
  (``start_new_session=True``) and is stopped only through its own pid / process group.
  Nothing is ever killed by name.
- Every target address a load tool is pointed at passes `check_loopback` first: this workplace
  allows load only against 127.0.0.0/8 and ::1.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

VENV_PYTHON = sys.executable


def log(msg: str) -> None:
    """Progress and skip messages go to stderr so stdout stays the Markdown report."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- loopback rule


class NotLoopback(ValueError):
    pass


def in_bench_netns() -> bool:
    """True when this process runs inside a network namespace a benchmark made for itself
    (bench/nsutil.py names it in MESHPROXY_BENCH_NETNS): such a namespace has no link to the
    machine's network, so any address there stays inside it."""
    name = os.environ.get("MESHPROXY_BENCH_NETNS")
    if not name or "/" in name:
        return False
    try:
        return os.stat(f"/run/netns/{name}").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def check_loopback(host: str) -> str:
    """Return a literal loopback address for `host`, or raise NotLoopback.

    Accepts 127.0.0.0/8 and ::1 literals and the name ``localhost`` (resolved, and every
    resolved address must itself be loopback, so an odd /etc/hosts cannot redirect load).
    Inside a benchmark's own network namespace (``in_bench_netns``) any address literal is
    accepted.
    """
    h = host.strip("[]")
    if in_bench_netns():
        try:
            return str(ipaddress.ip_address(h))
        except ValueError:
            pass
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        if h.rstrip(".").lower() != "localhost":
            raise NotLoopback(
                f"refusing target {host!r}: only 127.0.0.0/8, ::1 and localhost are allowed"
            ) from None
        addrs = {ai[4][0] for ai in socket.getaddrinfo(h, None, proto=socket.IPPROTO_TCP)}
        if not addrs or not all(ipaddress.ip_address(a).is_loopback for a in addrs):
            raise NotLoopback(f"refusing target {host!r}: it resolves to {sorted(addrs)}") from None
        return "127.0.0.1" if "127.0.0.1" in addrs else min(addrs)
    if not ip.is_loopback:
        raise NotLoopback(
            f"refusing target {host!r}: only 127.0.0.0/8, ::1 and localhost are allowed"
        )
    return str(ip)


def split_hostport(s: str) -> tuple[str, int]:
    """'127.0.0.1:80' or '[::1]:80' -> (host, port)."""
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        return host, int(rest.lstrip(":"))
    host, _, port = s.rpartition(":")
    return host, int(port)


# --------------------------------------------------------------------------- ports


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on `host` right now (bind to port 0, read it, close).

    The small race with other programs is acceptable for a benchmark; SO_REUSEADDR is not
    set so a port in TIME_WAIT on that address is not handed out.
    """
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float, proc: Proc | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def http_get(host: str, port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """Minimal blocking HTTP/1.1 GET (no dependency, used for readiness and admin polling).

    Ends at Content-Length / the last chunk rather than waiting for the server to close, so a
    server that keeps the connection open after `Connection: close` does not stall us.
    """
    check_loopback(host)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        raw = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            raw += b
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                continue
            low = raw[:end].lower()
            i = low.find(b"\ncontent-length:")
            if i >= 0:
                n = int(low[i + 16 :].split(b"\r\n", 1)[0])
                if len(raw) - end - 4 >= n:
                    break
            elif b"\ntransfer-encoding:" in low and raw.endswith(b"0\r\n\r\n"):
                break
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head[9:12])
    except ValueError:
        return 0, raw
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, body


def _dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2
    return b"".join(out)


# --------------------------------------------------------------------------- processes


class Proc:
    """A child process we started, in its own session, with output in a log file.

    `stop()` signals only this process group (whose id is our child's pid), so helper
    processes it forked (nginx workers, meshproxy workers) go with it and nothing else does.
    """

    _all: ClassVar[list[Proc]] = []  # every live child, for stop_all()

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logfile: Path,
        *,
        cwd: Path | None = None,
        env: dict | None = None,
        cpus: str | None = None,
        stdin=subprocess.DEVNULL,
        stdout=None,
    ):
        self.name = name
        if cpus and shutil.which("taskset"):
            argv = ["taskset", "-c", cpus, *argv]
        self.argv = list(argv)
        self.logfile = logfile
        self._log = open(logfile, "ab")  # noqa: SIM115 - the child writes to it until stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=stdout if stdout is not None else self._log,
            stderr=self._log,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        self.rusage = None
        Proc._all.append(self)

    def alive(self) -> bool:
        return self.popen.returncode is None and self.popen.poll() is None

    def wait_rusage(self, timeout: float) -> tuple[int | None, object]:
        """Wait for exit collecting rusage via wait4 (CPU used by a load generator)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.returncode is not None:
                return self.popen.returncode, self.rusage
            try:
                pid, status, ru = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.popen.poll()
                return self.popen.returncode, self.rusage
            if pid == self.pid:
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                self.rusage = ru
                return self.popen.returncode, ru
            if time.monotonic() > deadline:
                return None, None
            time.sleep(0.02)

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.returncode is None:
            self._signal(signal.SIGTERM)
            rc, _ = self.wait_rusage(grace)
            if rc is None:
                self._signal(signal.SIGKILL)
                self.wait_rusage(2.0)
        # Children (e.g. nginx workers) may outlive a leader killed hard: clean the group.
        self._signal(signal.SIGKILL, group_only=True)
        try:
            self._log.close()
        except OSError:
            pass
        if self in Proc._all:
            Proc._all.remove(self)

    def _signal(self, sig: int, group_only: bool = False) -> None:
        # The group id is our child's pid; a pgid cannot be reused while the group exists.
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            if not group_only and self.popen.returncode is None:
                try:
                    self.popen.send_signal(sig)
                except ProcessLookupError:
                    pass

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + ln for ln in lines[-n:])

    @classmethod
    def stop_all(cls) -> None:
        for p in list(reversed(cls._all)):
            try:
                p.stop(grace=3.0)
            except Exception as e:  # noqa: BLE001 - cleanup must go on for the others
                log(f"stopping {p.name} (pid {p.pid}) failed: {e}")


# --------------------------------------------------------------------------- installing tools


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


_apt_updated = False


def ensure_binary(binary: str, package: str, *, install: bool = True) -> str | None:
    """Path of `binary`, installing `package` with apt-get when missing and we are root."""
    path = shutil.which(binary) or _sbin(binary)
    if path or not install:
        return path
    if not apt_install(package, why=f"{binary} not found"):
        return None
    return shutil.which(binary) or _sbin(binary)


def apt_install(package: str, why: str = "") -> bool:
    """apt-get install -y PACKAGE (apt-get update first only if the install fails)."""
    if not (is_root() and shutil.which("apt-get")):
        log(f"{why + ': ' if why else ''}cannot apt-get install {package} (not root or no apt-get)")
        return False
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    log(f"{why + ': ' if why else ''}installing {package}: {' '.join(cmd)}")
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        if r.returncode != 0 and not _apt_updated:
            _apt_updated = True
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600, check=False)
            r = subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        log(f"apt-get install {package} timed out")
        return False
    if r.returncode != 0:
        log(f"apt-get install {package} failed: {r.stderr.decode(errors='replace')[-300:]}")
        return False
    return True


def _sbin(binary: str) -> str | None:
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        p = Path(d) / binary
        if p.exists() and os.access(p, os.X_OK):
            return str(p)
    return None


def ensure_pip(module: str, requirement: str, *, install: bool = True) -> bool:
    """True when `module` imports in the benchmark's Python, pip-installing it on demand."""
    probe = [VENV_PYTHON, "-c", f"import {module}"]
    if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return True
    if not install:
        return False
    log(f"installing {requirement} into {sys.prefix} with pip")
    r = subprocess.run(
        [VENV_PYTHON, "-m", "pip", "install", "-q", requirement],
        capture_output=True,
        timeout=900, check=False,
    )
    if r.returncode != 0:
        log(f"pip install {requirement} failed: {r.stderr.decode(errors='replace')[-300:]}")
        return False
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def raise_nofile(want: int = 65536) -> int:
    """Raise our soft fd limit towards the hard limit; children inherit it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = hard if hard == resource.RLIM_INFINITY else min(max(soft, want), hard)
    if new > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            return soft
    return new
