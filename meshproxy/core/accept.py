"""Accepting connections near the file-descriptor limit: shared by every listener kind.

- ``connection_limits``: the default ``--max-connections`` of each listener kind, derived from
  the soft ``RLIMIT_NOFILE``, so that in normal operation the process never runs out of
  descriptors (connections past the limit wait in the kernel's backlog instead).
- ``AcceptErrors``: one per listener kind. A failed ``accept()`` is counted in
  ``meshproxy_accept_errors_total{listener, reason}`` and logged at most once per ``LOG_EVERY``
  seconds per reason (with how many were not logged), and the first success after failures
  logs that accepting works again. Resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) tell the
  caller to pause accepting for ``BACKOFF`` seconds: the pending connection stays in the
  backlog and the socket stays readable, so retrying at once would spin at 100 % CPU.
- ``ReserveFd``: one descriptor held open for the day there is none left (the old trick of
  nginx-era servers and libuv): given up to accept one connection on a listener that must
  answer even then (the admin server's ``/healthz`` and ``/readyz``), taken back as soon as
  that connection is closed.

Invariant: nothing here blocks or allocates per connection on the success path; the cost of a
working accept is one attribute test (``AcceptErrors.failing``).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time
from typing import Callable

from . import metrics
from .settings import Settings

__all__ = ["AcceptErrors", "LogLimiter", "ReserveFd", "connection_limits", "raise_fd_limit", "RESOURCE_ERRORS", "BACKOFF", "LOG_EVERY",
           "FDS_PER_L4_CONNECTION", "FDS_PER_L7_CONNECTION", "fd_reserve_for"]

# errno -> reason label. These are the process's (or the system's) limits, not the peer's doing.
RESOURCE_ERRORS = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE", errno.ENOBUFS: "ENOBUFS", errno.ENOMEM: "ENOMEM"}
# The peer's doing (it reset or gave up before we accepted): not counted, the next one is tried.
_PEER_ERRORS = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM)

BACKOFF = 0.1          # seconds accepting pauses after a resource error (nginx: 500 ms)
LOG_EVERY = 10.0       # seconds between log lines for the same listener kind and reason

# Descriptors one connection can hold at once. L4: client and pod sockets, plus a splice pipe
# (two descriptors) per direction while bytes are in flight. L7: client and upstream sockets.
FDS_PER_L4_CONNECTION = 6
FDS_PER_L7_CONNECTION = 2


def raise_fd_limit(cap: int = 1 << 20) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (at most ``cap``), as Go programs do at
    start: the soft limit (often 1024) is a guard for programs that use select(), which this
    one does not. Returns (before, after); never lowers it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return soft, want
        except (ValueError, OSError):    # e.g. above fs.nr_open: keep what we have
            pass
    return soft, soft


def fd_reserve_for(soft: int) -> int:
    """Descriptors kept out of the connection budget: listeners, the admin server, pooled idle
    upstream connections, probes, DNS, inotify, log files, the interpreter's own."""
    return max(64, soft // 16)


def connection_limits(settings: Settings, soft: int | None = None) -> tuple[int | None, int | None]:
    """(L4, L7) open-connection limits of one process, each for all listeners of that kind.

    ``--max-connections N`` applies N to each kind. Without it: the budget is the soft
    RLIMIT_NOFILE minus ``fd_reserve_for(soft)``; with an Ingress listener configured it is
    split evenly between L4 and L7, else L4 has all of it; each kind's share is divided by the
    descriptors one of its connections can hold. No limit when RLIMIT_NOFILE is unlimited."""
    if settings.max_connections is not None:
        return settings.max_connections, settings.max_connections
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return None, None
    budget = max(0, soft - fd_reserve_for(soft))
    l7_on = bool(settings.ingress_listen or settings.ingress_tls_listen)
    l4_share = budget // 2 if l7_on else budget
    l4 = max(1, l4_share // FDS_PER_L4_CONNECTION)
    l7 = max(1, (budget - l4_share) // FDS_PER_L7_CONNECTION) if l7_on else None
    return l4, l7


class LogLimiter:
    """At most one log line per ``every`` seconds per key; says how many were held back."""

    __slots__ = ("_clock", "_every", "_last", "_suppressed")

    def __init__(self, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> str | None:
        """None: do not log now. Else a suffix for the line ("" or " (N more since ...)")."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        return f" ({more} more since the last message)" if more else ""


class AcceptErrors:
    """Failed accepts of one listener kind (``l4``, ``l7``, ``admin``): counted, logged with a
    rate limit, and a verdict on whether to pause."""

    __slots__ = ("_counters", "_limiter", "_log", "failing", "kind", "total")

    def __init__(self, kind: str, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self.kind = kind
        self._log = logger
        self._limiter = LogLimiter(LOG_EVERY, clock)
        self._counters: dict[str, object] = {}
        self.failing = 0          # resource errors since the last successful accept
        self.total = 0            # all counted failures, for tests and /debug

    def failed(self, exc: OSError, where: str, what: str = "accept") -> bool:
        """Record that ``accept()`` on ``where`` (``host:port``) raised ``exc`` (or, ``what``,
        another step without which an accepted connection cannot be served). Returns True
        when the caller should pause accepting for ``BACKOFF`` seconds."""
        if exc.errno in _PEER_ERRORS:
            return False
        reason = RESOURCE_ERRORS.get(exc.errno, "other")
        counter = self._counters.get(reason)
        if counter is None:
            counter = self._counters[reason] = metrics.accept_errors.labels(self.kind, reason)
        counter.inc()  # type: ignore[attr-defined]
        self.total += 1
        pause = reason != "other"
        if pause:
            self.failing += 1
        extra = self._limiter.allow(reason)
        if extra is None:
            return pause
        if pause:
            self._log.error("%s: %s on %s: %s (%s); accepting paused, retried every %.1fs%s",
                            self.kind, what, where, _what(exc), reason, BACKOFF, extra)
        else:
            self._log.error("%s: %s on %s: %s%s", self.kind, what, where, _what(exc), extra)
        return pause

    def succeeded(self, where: str) -> None:
        """The first connection accepted and served after resource errors: say so once (and at
        most once per ``LOG_EVERY``: near the limit, success and failure can alternate)."""
        if self.failing and self._limiter.allow("recovered") is not None:
            self._log.warning("%s: accepting on %s again after %d failed attempts", self.kind, where, self.failing)
            self.failing = 0


def _what(exc: OSError) -> str:
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return f"out of file descriptors: {exc.strerror}"
    return exc.strerror or str(exc)


class ReserveFd:
    """One spare descriptor (``/dev/null``), given up to accept a connection when the process
    has no other, and taken back when that connection is closed."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd: int | None = None
        self.take()

    def take(self) -> bool:
        """Hold a descriptor again (False: none free yet; try after the next close)."""
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def release(self) -> bool:
        """Free the descriptor for one accept (False: there is none to give)."""
        if self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        return True

    def close(self) -> None:
        self.release()
