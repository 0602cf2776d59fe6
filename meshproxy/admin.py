"""The admin server: ``/healthz``, ``/readyz``, ``/metrics``, ``/debug/snapshot``, ``/debug/identity``.

HTTP/1.1 on h11 over asyncio streams: the admin port carries a few requests a second, so
clarity wins over speed here. It runs in the control-plane process only.

It accepts connections itself (not ``asyncio.start_server``) so that it can still answer when
the process is out of file descriptors: a failed accept is counted and logged
(``meshproxy.core.accept.AcceptErrors``), and on EMFILE / ENFILE the spare descriptor
(``ReserveFd``) is given up to accept one connection, which is answered without any further
descriptor — ``/healthz`` and ``/readyz`` as usual, anything else 503 — then closed, and the
spare taken back at once. Only when there is no spare does accepting pause for
``accept.BACKOFF`` seconds. A load balancer's or kubelet's probe therefore keeps its answer
while the data plane is exhausted.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
from typing import Callable

import h11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .core import accept, metrics
from .core.sockets import listen, release

__all__ = ["AdminServer"]

log = logging.getLogger("meshproxy.admin")

_MAX_REQUEST = 16384
_READ_TIMEOUT = 10.0
_EMERGENCY_TIMEOUT = 1.0     # to read one request head with the spare descriptor
_EMERGENCY_FIRST_BYTE = 0.025   # a probe sends its request at once; a silent connection is not kept


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
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._retry: asyncio.TimerHandle | None = None
        self._errors = accept.AcceptErrors("admin", log)
        self._reserve: accept.ReserveFd | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        sock = listen(self.host, self.port, 128)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._reserve = accept.ReserveFd()
        self._resume()

    async def close(self) -> None:
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sock is not None:
            release(self._sock)
            self._sock.close()
            self._sock = None
        if self._reserve is not None:
            self._reserve.close()

    # -- accepting ----------------------------------------------------------------------------

    def _resume(self) -> None:
        self._retry = None
        if self._sock is not None and not self._accepting:
            self._loop.add_reader(self._sock.fileno(), self._on_acceptable)  # type: ignore[union-attr]
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())  # type: ignore[union-attr]
        self._accepting = False

    def _on_acceptable(self) -> None:
        where = f"{self.host}:{self.port}"
        for _ in range(16):
            try:
                client, _ = self._sock.accept()  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                pause = self._errors.failed(exc, where)
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._reserve is not None and self._reserve.release():
                    try:
                        client, _ = self._sock.accept()  # type: ignore[union-attr]
                    except OSError:
                        self._reserve.take()
                    else:
                        _Emergency(self, client)
                        continue
                if pause:
                    self._pause()
                    self._retry = self._loop.call_later(accept.BACKOFF, self._resume)  # type: ignore[union-attr]
                return
            if self._errors.failing:
                self._errors.succeeded(where)
            client.setblocking(False)
            task = self._loop.create_task(self._serve(client))  # type: ignore[union-attr]
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, client: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=client)
        except OSError:
            client.close()
            return
        await self._handle(reader, writer)

    def _emergency_answer(self, method: bytes, target: bytes) -> tuple[int, bytes]:
        path = target.split(b"?", 1)[0]
        if method in (b"GET", b"HEAD") and path in (b"/healthz", b"/readyz"):
            status, _, body = self._route(method, target)
            return status, body
        return 503, b"out of file descriptors: only /healthz and /readyz are answered now\n"

    def reserve_returned(self) -> None:
        if self._reserve is not None:
            self._reserve.take()

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


class _Emergency:
    """One connection accepted with the spare descriptor while the process has no other. A
    connection that has sent nothing within ``_EMERGENCY_FIRST_BYTE`` seconds is closed: the
    spare is for probes, which send their request right after connecting, and an idle
    connection must not hold it (nor keep the probes behind it in the backlog waiting for
    long). Otherwise: read one request head (at most ``_MAX_REQUEST`` bytes, for at most
    ``_EMERGENCY_TIMEOUT`` seconds), answer it with ``Connection: close`` and close. Raw
    non-blocking socket and ``add_reader`` only: a transport could need descriptors the process
    does not have. The spare is taken back right after the close, before anything else can take
    that number."""

    __slots__ = ("admin", "buf", "first", "sock", "timer")

    def __init__(self, admin: AdminServer, sock: socket.socket) -> None:
        self.admin, self.sock, self.buf = admin, sock, b""
        loop = admin._loop
        assert loop is not None
        sock.setblocking(False)
        self.timer = loop.call_later(_EMERGENCY_TIMEOUT, self.finish)
        self.first = loop.call_later(_EMERGENCY_FIRST_BYTE, self._silent)
        loop.add_reader(sock.fileno(), self.readable)
        self.readable()

    def _silent(self) -> None:
        if not self.buf:
            self.finish()

    def readable(self) -> None:
        try:
            data = self.sock.recv(_MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.finish()
            return
        self.buf += data
        head, sep, _ = self.buf.partition(b"\r\n\r\n")
        if not sep:
            if len(self.buf) >= _MAX_REQUEST:
                self.finish()
            return
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        method, target = (parts[0], parts[1]) if len(parts) == 3 else (b"", b"")
        status, body = self.admin._emergency_answer(method, target)
        head_out = (f"HTTP/1.1 {status} {'OK' if status == 200 else 'Service Unavailable'}\r\n"
                    f"content-type: text/plain\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        try:
            # A few hundred bytes into an empty socket buffer: one non-blocking send does it.
            self.sock.send(head_out + (body if method != b"HEAD" else b""))
        except OSError:
            pass
        self.finish()

    def finish(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.timer.cancel()
        self.first.cancel()
        self.admin._loop.remove_reader(self.sock.fileno())  # type: ignore[union-attr]
        self.sock.close()
        self.admin.reserve_returned()
