"""A byte relay between two asyncio transports, either of which may speak TLS: opaque TCP in
the mesh (``meshproxy run --sidecar``), plain on the application's side and mutual TLS between
sidecars.

The L4 pump (``l4.pump``) splices plain sockets and is the path for Service traffic; a relay
whose bytes are encrypted cannot splice, so this one runs on ordinary asyncio transports. TLS
is done here with ``ssl.SSLObject`` over memory BIOs rather than asyncio's TLS transports,
because those cannot half-close: a client that sends its request and shuts down its writing
side (``shutdown(SHUT_WR)``, then reads to the end) must see the server's answer and its EOF.
Here an EOF on one side becomes a TLS ``close_notify`` (RFC 8446 §6.1: in TLS 1.3 it closes
one direction) followed by a TCP half-close on the other, and a ``close_notify`` or FIN
received becomes a half-close of the plain side; the other direction keeps flowing.

A ``Side`` is one transport's protocol. Its life:

1. made by ``accept_side`` (an accepted socket) or ``connect_side`` (a new connection), reading
   paused until it is linked (what arrives waits in the kernel, or - for bytes that came with
   a TLS handshake - in ``pending``);
2. optionally ``handshake(ctx, server_side)``: awaits the TLS handshake (client or server) and
   returns the ``SSLObject`` so the caller can check the peer's certificate before anything
   else happens;
3. ``link(a, b)``: from now on each side's bytes go to the other.

Invariants: flow control couples the pair (one side's full write buffer pauses the other's
reading); the relay holds at most one read of bytes per direction beyond the transports' own
buffers; when both directions have ended, or either side fails, both transports are closed (an
error resets the healthy side: its peer must not mistake a failure for a clean end); ``done``
is called exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Callable

__all__ = ["Side", "accept_side", "connect_side", "link", "RelayError"]

log = logging.getLogger("meshproxy.l4")

_READ_CHUNK = 256 * 1024


class RelayError(OSError):
    """A side failed before it was linked (handshake refused, closed early)."""


class Side(asyncio.Protocol):
    __slots__ = ("loop", "transport", "peer", "tls", "incoming", "outgoing", "handshake_waiter", "pending",
                 "eof_in", "eof_out", "closed", "linked", "on_close", "bytes_in", "name", "error", "read_paused",
                 "close_at_eof")

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str = "") -> None:
        self.loop = loop
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.tls: ssl.SSLObject | None = None
        self.incoming: ssl.MemoryBIO | None = None
        self.outgoing: ssl.MemoryBIO | None = None
        self.handshake_waiter: asyncio.Future | None = None
        self.pending: list[bytes] = []     # plaintext that arrived before the link
        self.eof_in = False                # the remote end finished sending (FIN / close_notify)
        self.eof_out = False               # we finished sending to the remote end
        self.closed = False
        self.linked = False
        self.on_close: Callable[[Side, BaseException | None], None] | None = None
        self.bytes_in = 0
        self.error: BaseException | None = None
        self.read_paused = False
        self.close_at_eof = False

    # -- setup ----------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.pause_reading()
        self.read_paused = True

    async def handshake(self, ctx: ssl.SSLContext, server_side: bool, timeout: float) -> ssl.SSLObject:
        """TLS on this side; returns once the handshake is complete. Raises RelayError."""
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side, server_hostname=None)
        # Bytes that arrived before TLS was set up are the start of the handshake (uvloop may
        # deliver a read before a pause_reading made in connection_made takes effect).
        for data in self.pending:
            self.incoming.write(data)
        self.pending = []
        self.handshake_waiter = self.loop.create_future()
        self._step_handshake()
        self._resume()
        try:
            async with asyncio.timeout(timeout):
                await self.handshake_waiter
        except TimeoutError:
            raise RelayError(f"TLS handshake not done within {timeout:g}s") from None
        finally:
            self.handshake_waiter = None
        return self.tls

    def _step_handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls()
            return
        except (ssl.SSLError, ValueError) as exc:
            self._flush_tls()                    # the alert, so the peer learns why
            self._fail_handshake(RelayError(f"TLS handshake failed: {exc}"))
            return
        self._flush_tls()
        w = self.handshake_waiter
        if w is not None and not w.done():
            w.set_result(None)
        self._pause()
        # Application bytes that came with the handshake's last flight wait for the link.
        self._read_tls()

    def _fail_handshake(self, exc: BaseException) -> None:
        w = self.handshake_waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        self.abort()

    # -- I/O ------------------------------------------------------------------------------------

    def _pause(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def _flush_tls(self) -> None:
        out = self.outgoing
        if out is not None and out.pending and not self.closed:
            self.transport.write(out.read())

    def data_received(self, data: bytes) -> None:
        try:
            if self.tls is None:
                self._deliver(data)
                return
            self.incoming.write(data)
            if self.handshake_waiter is not None and not self.handshake_waiter.done():
                self._step_handshake()
                return
            self._read_tls()
        except Exception as exc:  # noqa: BLE001 - no exception may escape a protocol callback
            log.exception("relay %s: internal error", self.name)
            self.fail(exc)

    def _read_tls(self) -> None:
        chunks = []
        eof = False
        obj = self.tls
        while True:
            try:
                chunk = obj.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:       # close_notify: the peer finished sending
                eof = True
                break
            except ssl.SSLError as exc:
                self._flush_tls()
                self.fail(exc)
                return
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
        self._flush_tls()                        # e.g. a session ticket's acknowledgement
        if chunks:
            self._deliver(b"".join(chunks))
        if eof:
            self._got_eof()

    def _deliver(self, data: bytes) -> None:
        if self.close_at_eof:
            return
        self.bytes_in += len(data)
        peer = self.peer
        if self.linked and peer is not None:
            peer.send(data)
        else:
            self.pending.append(data)
            self._pause()

    def send(self, data: bytes) -> None:
        """Bytes for the remote end of this side."""
        if self.closed or self.eof_out:
            return
        if self.tls is not None:
            try:
                self.tls.write(data)
            except ssl.SSLError as exc:
                self.fail(exc)
                return
            self._flush_tls()
        else:
            self.transport.write(data)

    def send_eof(self) -> None:
        """The other side's remote end finished sending: pass the half-close on."""
        if self.closed or self.eof_out:
            return
        self.eof_out = True
        if self.tls is not None:
            try:
                self.tls.unwrap()                # sends close_notify; the peer's comes later
            except (ssl.SSLWantReadError, ssl.SSLError):
                pass
            self._flush_tls()
        t = self.transport
        if t.can_write_eof():
            t.write_eof()
        self._maybe_done()

    def eof_received(self) -> bool:
        try:
            self._got_eof()
        except Exception as exc:  # noqa: BLE001
            log.exception("relay %s: internal error at EOF", self.name)
            self.fail(exc)
        return True                              # keep our writing side open

    def _got_eof(self) -> None:
        if self.eof_in:
            return
        self.eof_in = True
        if self.close_at_eof:
            self.close()
            return
        if self.handshake_waiter is not None and not self.handshake_waiter.done():
            self._fail_handshake(RelayError("closed during the TLS handshake"))
            return
        peer = self.peer
        if self.linked and peer is not None:
            peer.send_eof()
        self._maybe_done()

    def _maybe_done(self) -> None:
        peer = self.peer
        if self.linked and peer is not None and self.eof_in and self.eof_out and peer.eof_in and peer.eof_out:
            self.close()
            peer.close()

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None:
            peer._pause()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and self.linked:
            peer._resume()

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if exc is not None and self.error is None:
            self.error = exc
        w = self.handshake_waiter
        if w is not None and not w.done():
            w.set_exception(RelayError(f"connection lost during the TLS handshake: {exc or 'closed'}"))
        peer = self.peer
        if peer is not None and not peer.closed:
            if exc is not None or not (self.eof_in and self.eof_out):
                # Lost before both directions ended cleanly: the other side must see an error.
                peer.abort()
            else:
                peer.close()
        if not was_closed and self.on_close is not None:
            cb, self.on_close = self.on_close, None
            cb(self, exc)

    # -- ending ---------------------------------------------------------------------------------

    def finish(self, timeout: float) -> None:
        """End an unlinked side cleanly: our half-close now (TLS close_notify, then FIN), the
        transport closed when the remote end has finished too, or reset after ``timeout``."""
        self.close_at_eof = True
        self.pending = []
        self.send_eof()
        if self.eof_in:
            self.close()
            return
        self._resume()                  # to see the remote end's EOF (its bytes are dropped)
        self.loop.call_later(timeout, self.abort)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.abort()
        peer = self.peer
        if peer is not None:
            peer.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def accept_side(loop: asyncio.AbstractEventLoop, sock, name: str = "") -> Side:
    """A Side for an accepted socket (reading paused)."""
    side = Side(loop, name)
    await loop.connect_accepted_socket(lambda: side, sock)
    return side


async def connect_side(loop: asyncio.AbstractEventLoop, addr: tuple[str, int], timeout: float, name: str = "",
                       on_socket: Callable | None = None) -> Side:
    """A Side for a new connection to ``addr`` (reading paused). Raises OSError / TimeoutError."""
    side = Side(loop, name)
    async with asyncio.timeout(timeout):
        await loop.create_connection(lambda: side, addr[0], addr[1])
    if on_socket is not None:
        on_socket(side)
    return side


def link(a: Side, b: Side, done: Callable[[Side, Side], None] | None = None) -> None:
    """Relay ``a`` <-> ``b`` from now on; ``done(a, b)`` once both are closed."""
    a.peer, b.peer = b, a
    a.linked = b.linked = True
    left = [2]

    def closed(side: Side, exc) -> None:
        left[0] -= 1
        if left[0] == 0 and done is not None:
            done(a, b)
    for side in (a, b):
        if side.closed:
            left[0] -= 1
        else:
            side.on_close = closed
    for src, dst in ((a, b), (b, a)):
        if src.pending:
            data = b"".join(src.pending)
            src.pending = []
            dst.send(data)
        if src.eof_in:
            dst.send_eof()
    if a.closed or b.closed:
        for s in (a, b):
            if not s.closed:
                s.abort()
        if left[0] == 0 and done is not None:
            done(a, b)
        return
    a._resume()
    b._resume()
