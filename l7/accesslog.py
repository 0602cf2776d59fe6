"""Access log: one line per HTTP request, buffered (``--access-log PATH|-``; off by default).

Line format (space separated, quoted where a value may hold spaces)::

    127.0.0.1 - - [22/Nov/2025:13:47:01 +0000] "GET /api/x?y=1 HTTP/1.1" 200 1234 0.0012 \
        upstream=127.0.10.1:8080 ingress=default/web route="example.com/api" attempts=1

client address, request line, status (``499``: the client went away before the response was
complete; ``-`` never happens), response body bytes sent, duration in seconds from the request
head to the response end, the upstream endpoint of the last attempt (``-`` when answered by the
proxy), the Ingress and the rule (host + path as written in the Ingress) that matched.

Cost: a line is formatted with one ``%`` and appended to a list; the list is written with one
``os.write`` when it holds 64 KiB or once a second (``flush`` is called by the server's
ticker), and on shutdown. Control characters in the request line are escaped so a client
cannot forge log lines.
"""

from __future__ import annotations

import os
import sys
import time

__all__ = ["AccessLog"]

_FLUSH_BYTES = 64 * 1024
_ESCAPE = {c: "\\x%02x" % c for c in range(32)}
_ESCAPE.update({0x22: '\\"', 0x5C: "\\\\", 0x7F: "\\x7f"})


def _clean(text: str) -> str:
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return text.translate(_ESCAPE)


class AccessLog:
    __slots__ = ("path", "_fd", "_own_fd", "_buf", "_size", "_stamp_sec", "_stamp")

    def __init__(self, path: str) -> None:
        self.path = path
        if path == "-":
            self._fd = sys.stdout.fileno()
            self._own_fd = False
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._own_fd = True
        self._buf: list[str] = []
        self._size = 0
        self._stamp_sec = -1
        self._stamp = ""

    def _now(self) -> str:
        sec = int(time.time())
        if sec != self._stamp_sec:
            self._stamp_sec = sec
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(sec))
        return self._stamp

    def log(self, client: str, method: bytes, target: bytes, version: int, status: int,
            nbytes: int, duration: float, upstream: str, ingress: str, route: str,
            attempts: int) -> None:
        request = "%s %s HTTP/%d.%d" % (method.decode("latin-1"), target.decode("latin-1"),
                                        version // 10, version % 10)
        line = '%s - - [%s] "%s" %d %d %.4f upstream=%s ingress=%s route="%s" attempts=%d\n' % (
            client, self._now(), _clean(request), status, nbytes, duration, upstream or "-",
            ingress or "-", _clean(route) if route else "-", attempts)
        self._buf.append(line)
        self._size += len(line)
        if self._size >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        data = "".join(self._buf).encode("utf-8", "replace")
        self._buf.clear()
        self._size = 0
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            # A full disk or a closed stdout must not take the proxy down; the lines are lost.
            pass

    def close(self) -> None:
        self.flush()
        if self._own_fd:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._own_fd = False
