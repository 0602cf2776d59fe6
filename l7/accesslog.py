"""The L7 request path's access-log call, on top of the process's log (``meshproxy.core.accesslog``).

``AccessLog.log(client, method, target, version, status, nbytes, duration, upstream, ingress,
route, attempts)`` is the call the HTTP/1.1 request path has always made; it becomes one
``HttpRecord`` queued on the process's ``meshproxy.core.accesslog.AccessLog``, which formats
it (``--access-log-format``) and writes it off the event loop. The exchange fills
``HttpRecord`` itself (request id, trace id, bytes received, flags, headers) and logs it
straight to ``runtime.access_log``; this wrapper only serves the older call until then.

``AccessLog(path)`` opens its own log (text format), as the in-process tests construct it;
``AccessLog(log)`` shares the process's log (``meshproxy.dataplane`` hands it over), which it
then neither flushes on the loop nor closes.
"""

from __future__ import annotations

from meshproxy.core.accesslog import AccessLog as ProcessLog
from meshproxy.core.logformat import HttpRecord

__all__ = ["AccessLog"]

_PROTOCOLS = {10: "HTTP/1.0", 11: "HTTP/1.1", 20: "HTTP/2"}


class AccessLog:
    __slots__ = ("path", "core", "_own")

    def __init__(self, target: str | ProcessLog) -> None:
        if isinstance(target, str):
            self.core = ProcessLog(target)
            self._own = True
        else:
            self.core = target
            self._own = False
        self.path = self.core.path

    def log(self, client: str, method: bytes, target: bytes, version: int, status: int,
            nbytes: int, duration: float, upstream: str, ingress: str, route: str,
            attempts: int) -> None:
        proto = _PROTOCOLS.get(version) or "HTTP/%d.%d" % (version // 10, version % 10)
        self.core.log(HttpRecord(method, target, b"", proto, status, 0, nbytes, duration,
                                 upstream_host=upstream, ingress=ingress, route=route,
                                 attempts=attempts, client=client))

    def flush(self) -> None:
        """The writer thread writes on its own; nothing to do on the loop."""

    def reopen(self) -> None:
        self.core.reopen()

    def close(self) -> None:
        if self._own:
            self.core.close()
