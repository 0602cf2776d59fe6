"""proxy.py (PyPI `proxy.py`) reverse-proxy plugin for the `proxypy` benchmark peer.

Loaded by proxy.py itself, not imported by the harness:

    BENCH_PROXYPY_UPSTREAM=127.0.0.1:PORT python -m proxy --enable-reverse-proxy \\
        --disable-http-proxy --plugins bench.proxypy_plugin.BenchReverseProxyPlugin ...

One dynamic route matches every path and sends the request, path and query unchanged, to the
backend named by BENCH_PROXYPY_UPSTREAM (HOST:PORT, loopback only).

Why the route hands proxy.py a connection rather than a URL: with a URL (or a static route)
proxy.py 2.4's reverse-proxy core opens a new upstream connection for *every* request and drops
the previous one without unregistering it, so on a keep-alive client connection the threadless
executor soon fails (`selector.modify` on a closed, reused fd: FileNotFoundError) and serves
nothing more. A static route would also replace the request path with the URL's own path. So
the plugin — proxy.py makes one plugin instance per client connection — opens one upstream
connection on that client's first request, queues each request on it and returns it (the
`TcpServerConnection` form of `handle_route`); proxy.py relays the upstream bytes to the client.
That is upstream keep-alive, one backend connection per client connection, as the other peers
get. The connection is closed when the client connection ends (after proxy.py has unregistered
its descriptors). No access log is written (returning None from on_access_log tells proxy.py the
plugin has logged the request), like every other peer.
"""

from __future__ import annotations

import os

from proxy.core.connection import TcpServerConnection
from proxy.http.server import ReverseProxyBasePlugin

from bench._util import check_loopback, split_hostport

ENV = "BENCH_PROXYPY_UPSTREAM"


def _upstream() -> tuple[str, int]:
    raw = os.environ.get(ENV, "")
    if not raw:
        raise RuntimeError(f"{ENV}=HOST:PORT is not set")
    host, port = split_hostport(raw)
    return check_loopback(host), port


UPSTREAM = _upstream()


class BenchReverseProxyPlugin(ReverseProxyBasePlugin):
    """Every path to the benchmark's backend nginx, over one upstream connection per client
    connection."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._conn: TcpServerConnection | None = None

    def routes(self):
        return [r"/"]  # a dynamic route (a str) matching every path: handle_route serves it

    def handle_route(self, request, pattern):
        if self._conn is None or self._conn.closed:
            self._conn = TcpServerConnection(*UPSTREAM)
            self._conn.connect()
        self._conn.queue(memoryview(request.build()))
        return self._conn

    def on_access_log(self, context):
        # Called once, when the client connection ends: close our upstream connection too.
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None
        return None
