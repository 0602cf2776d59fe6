"""The access log of one process: records in, lines out, never blocking the data path.

``AccessLog.log(record)`` is all the data path does: one length check and one
``deque.append``. A writer thread takes the records in batches, formats them
(``meshproxy.core.logformat``) and writes them with ``os.write``. So a slow disk, a full disk
or a stalled stdout pipe only ever stalls the writer thread.

Invariants:

* the queue holds at most ``capacity`` records; a record that finds it full is dropped and
  counted (``meshproxy_access_log_dropped_total{reason="queue_full"}``), never waited for;
  lines lost to a failed write are counted with ``reason="write_error"``;
* only the writer thread touches the file descriptor after start-up: ``reopen`` (SIGUSR1,
  logrotate) sets a flag and wakes the thread, which opens the path anew and then closes the
  old descriptor, so no line is written to a closed descriptor and an open that fails leaves
  the old file in use;
* lines reach the file whole: one ``os.write`` carries whole lines only, at most 64 KiB to a
  regular file (appends with O_APPEND do not interleave with other processes' writes) and at
  most PIPE_BUF (4 KiB) to a pipe or terminal, where only writes of that size are atomic —
  several ``--workers`` share one stdout;
* the thread writes what is queued at least every ``interval`` seconds (0.2 s), sooner when
  the queue is half full; ``close`` writes everything left and joins the thread.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import stat
import sys
import threading
import time

from . import metrics
from .logformat import Formatter, compile_format

__all__ = ["AccessLog", "DEFAULT_CAPACITY"]

log = logging.getLogger("meshproxy.accesslog")

DEFAULT_CAPACITY = 16384
_INTERVAL = 0.2
_FILE_CHUNK = 64 * 1024
_PIPE_CHUNK = select.PIPE_BUF if hasattr(select, "PIPE_BUF") else 4096


class AccessLog:
    __slots__ = ("path", "formatter", "capacity", "dropped", "written", "write_errors", "_queue", "_wake",
                 "_stop", "_reopen", "_fd", "_own_fd", "_chunk", "_thread", "_wake_at", "_dropped_metric",
                 "_idle", "interval")

    def __init__(self, path: str, fmt: str | Formatter = "text", capacity: int = DEFAULT_CAPACITY,
                 interval: float = _INTERVAL) -> None:
        """Opens ``path`` (``-``: stdout) for appending and starts the writer thread. Raises
        OSError when the file cannot be opened, FormatError for a bad template."""
        self.path = path
        self.formatter = compile_format(fmt) if isinstance(fmt, str) else fmt
        self.capacity = max(1, capacity)
        self.interval = interval
        self.dropped = 0          # records refused because the queue was full
        self.written = 0          # lines written
        self.write_errors = 0     # lines lost to failed writes
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._stop = False
        self._reopen = False
        self._fd, self._own_fd = self._open()
        self._chunk = self._chunk_for(self._fd)
        self._wake_at = max(1, self.capacity // 2)
        self._dropped_metric = metrics.access_log_dropped.labels("queue_full")
        self._thread = threading.Thread(target=self._run, name="meshproxy-access-log", daemon=True)
        self._thread.start()

    # -- the data path -----------------------------------------------------------------------------

    def log(self, record) -> None:
        """Queue one ``HttpRecord`` / ``TcpRecord``; drops it (and counts) when the queue is full."""
        q = self._queue
        n = len(q)
        if n >= self.capacity:
            self.dropped += 1
            self._dropped_metric.inc()
            return
        if record.start_time is None:
            record.start_time = time.time() - record.duration
        q.append(record)
        if n + 1 == self._wake_at:
            self._wake.set()

    # -- control (any thread) ----------------------------------------------------------------------

    def reopen(self) -> None:
        """Open the path anew (logrotate moved or removed the file); done by the writer thread."""
        self._reopen = True
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written (tests, shutdown). True when it was."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._queue and self._idle.is_set():
                return True
            self._idle.clear()
            self._wake.set()
            self._idle.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        return not self._queue and self._idle.is_set()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the thread, close the file."""
        if self._thread.is_alive():
            self._stop = True
            self._wake.set()
            self._thread.join(timeout)
        if self._own_fd and not self._thread.is_alive():
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._own_fd = False

    # -- the writer thread ---------------------------------------------------------------------------

    def _open(self) -> tuple[int, bool]:
        if self.path == "-":
            return sys.stdout.fileno(), False
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644), True

    @staticmethod
    def _chunk_for(fd: int) -> int:
        try:
            return _FILE_CHUNK if stat.S_ISREG(os.fstat(fd).st_mode) else _PIPE_CHUNK
        except OSError:
            return _PIPE_CHUNK

    def _do_reopen(self) -> None:
        self._reopen = False
        if self.path == "-":
            return
        try:
            fd, own = self._open()
        except OSError as exc:   # keep writing where we were: better than losing every line
            log.error("access log: cannot reopen %s: %s; still writing to the previous file", self.path, exc)
            return
        old, old_own = self._fd, self._own_fd
        self._fd, self._own_fd, self._chunk = fd, own, self._chunk_for(fd)
        if old_own:
            try:
                os.close(old)
            except OSError:
                pass
        log.info("access log: reopened %s", self.path)

    def _run(self) -> None:
        q = self._queue
        fmt = self.formatter.format
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._reopen:
                self._do_reopen()
            if q:
                self._idle.clear()   # flush() must not see "idle" while this batch is being written
            lines: list[str] = []
            size = 0
            while q:
                rec = q.popleft()
                try:
                    line = fmt(rec)
                except Exception:  # noqa: BLE001 - one bad record must not stop the log
                    log.exception("access log: cannot format a %s record", rec.kind)
                    continue
                lines.append(line)
                size += len(line)
                if size >= self._chunk:
                    self._write(lines)
                    lines, size = [], 0
            if lines:
                self._write(lines)
            if not q:
                self._idle.set()
            if self._stop and not q:
                return

    def _write(self, lines: list[str]) -> None:
        """Write whole lines in chunks of at most ``_chunk`` bytes (a longer line goes alone)."""
        chunk = self._chunk
        batch: list[bytes] = []
        size = 0
        for line in lines:
            data = line.encode("utf-8", "replace")
            if batch and size + len(data) > chunk:
                self._write_all(b"".join(batch), len(batch))
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        if batch:
            self._write_all(b"".join(batch), len(batch))

    def _write_all(self, data: bytes, nlines: int) -> None:
        view = memoryview(data)
        try:
            while view:
                try:
                    n = os.write(self._fd, view)
                except BlockingIOError:
                    # stdout shared with a process that made it non-blocking: wait, bounded.
                    if not select.select([], [self._fd], [], 1.0)[1]:
                        raise
                    continue
                view = view[n:]
        except OSError as exc:
            # A full disk or a closed pipe must not take the proxy down: count the loss.
            if not self.write_errors:
                log.error("access log: writing to %s failed: %s; lines are being lost", self.path, exc)
            self.write_errors += nlines
            metrics.access_log_dropped.labels("write_error").inc(nlines)
            return
        self.written += nlines
        metrics.access_log_lines.inc(nlines)
