"""The admin server: ``/healthz``, ``/readyz``, ``/metrics``, ``/debug/snapshot``, ``/debug/identity``.

HTTP/1.1 on h11 over asyncio streams: the admin port carries a few requests a second, so
clarity wins over speed here. It runs in the control-plane process only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

import h11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .core import metrics
from .core.sockets import listen

__all__ = ["AdminServer"]

log = logging.getLogger("meshproxy.admin")

_MAX_REQUEST = 16384
_READ_TIMEOUT = 10.0


class AdminServer:
    """``state`` callbacks decide what the endpoints answer; the server owns no proxy state."""

    def __init__(self, host: str, port: int, *, is_ready: Callable[[], bool],
                 snapshot_json: Callable[[], dict | None],
                 metrics_text: Callable[[], bytes] | None = None,
                 snapshot_version: Callable[[], int | None] = lambda: None,
                 identity_json: Callable[[], dict | None] | None = None) -> None:
        self.snapshot_version = snapshot_version
        # The workload identity in force (mesh): None when this instance has no identity source.
        self.identity_json = identity_json
        self.host, self.port = host, port
        self.is_ready = is_ready
        self.snapshot_json = snapshot_json
        self.metrics_text = metrics_text or (lambda: generate_latest(metrics.REGISTRY))
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        sock = listen(self.host, self.port, 128)
        self._server = await asyncio.start_server(self._handle, sock=sock)
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _route(self, method: bytes, target: bytes) -> tuple[int, str, bytes]:
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == b"/healthz":
            return 200, "text/plain", b"ok\n"
        if path == b"/readyz":
            return (200, "text/plain", b"ready\n") if self.is_ready() else (503, "text/plain", b"not ready\n")
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics_text()
        if path == b"/debug/snapshot":
            data = self.snapshot_json()
            if data is None:
                return 503, "application/json", b'{"error": "no snapshot yet"}\n'
            return 200, "application/json", json.dumps(data, indent=1, default=str).encode() + b"\n"
        if path == b"/debug/identity":
            if self.identity_json is None:
                return 404, "application/json", b'{"error": "no identity source: run with --identity-dir or --identity-issuer"}\n'
            ident = self.identity_json()
            if ident is None:
                return 503, "application/json", b'{"error": "no identity in force yet"}\n'
            return 200, "application/json", json.dumps(ident, indent=1).encode() + b"\n"
        return 404, "text/plain", b"not found: try /healthz /readyz /metrics /debug/snapshot /debug/identity\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), _READ_TIMEOUT)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    status, ctype, body = self._route(event.method, event.target)
                    headers = [("content-type", ctype), ("content-length", str(len(body)))]
                    version = self.snapshot_version()
                    if version is not None:
                        # A cheap change signal for pollers (bench/scale.py) that need no JSON.
                        headers.append(("x-snapshot-version", str(version)))
                    writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
                    if event.method != b"HEAD":
                        writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    if conn.our_state is h11.MUST_CLOSE:   # client asked for close, or HTTP/1.0
                        break
                elif isinstance(event, h11.EndOfMessage) or isinstance(event, h11.Data):
                    continue
                elif event is h11.PAUSED:
                    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                        conn.start_next_cycle()
                        continue
                    break
                else:  # ConnectionClosed
                    break
        except h11.RemoteProtocolError as exc:
            try:
                body = f"bad request: {exc}\n".encode()
                writer.write(conn.send(h11.Response(status_code=exc.error_status_hint,
                                                    headers=[("content-length", str(len(body))),
                                                             ("connection", "close")])))
                writer.write(conn.send(h11.Data(data=body)))
                writer.write(conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
        # Client went away, timed out, or the socket broke: nothing to answer.
        except (asyncio.TimeoutError, ConnectionError, OSError, h11.LocalProtocolError):
            pass
        except Exception:  # the admin port must never take the process down
            log.exception("admin request failed")
        finally:
            writer.close()
