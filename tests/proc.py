"""Running the real ``meshproxy`` process in tests: start, wait for /readyz, stop by pid.

``free_port`` is the one port helper of tests/conftest.py, re-exported here for the modules that
import it with ``Meshproxy``."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from conftest import free_port

__all__ = ["ROOT", "Meshproxy", "free_port", "http_get", "wait_for"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Meshproxy:
    def __init__(self, paths: list[str], *args: str, admin_port: int | None = None, env: dict | None = None,
                 nofile: int | None = None):
        # Held until the test ends: the admin listener (SO_REUSEPORT) binds beside the reservation.
        self.admin_port = admin_port or free_port(hold=True)
        self.nofile = nofile          # RLIMIT_NOFILE (soft and hard) of the child only
        self.cmd = [sys.executable, "-m", "meshproxy", "run", *sum((["-f", p] for p in paths), []),
                    "--admin-listen", f"127.0.0.1:{self.admin_port}", *args]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.log_path = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, wait: bool = True, timeout: float = 15.0) -> "Meshproxy":
        import tempfile
        self.log = tempfile.NamedTemporaryFile(prefix="meshproxy-test-", suffix=".log", delete=False)
        self.log_path = self.log.name
        limit = None
        if self.nofile is not None:
            n = self.nofile

            def limit():   # runs in the child between fork and exec
                resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=limit)
        if wait:
            self.wait_ready(timeout)
        return self

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"meshproxy exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if http_get(self.admin + "/readyz", 1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"meshproxy not ready after {timeout}s:\n{self.output()}")

    def snapshot(self) -> dict:
        st, body = http_get(self.admin + "/debug/snapshot")
        assert st == 200, body
        return json.loads(body)

    def metrics(self) -> str:
        return http_get(self.admin + "/metrics")[1].decode()

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> int:
        try:
            if self.proc is None or self.proc.poll() is not None:
                return self.proc.returncode if self.proc else 0
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        finally:
            if getattr(self, "log", None) is not None:
                self.log.close()

    def __enter__(self) -> "Meshproxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


def wait_for(pred, timeout: float = 5.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
