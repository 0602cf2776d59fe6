"""What an exchange (``l7.exchange``) needs from the shells around it, as typing Protocols.

A downstream shell (HTTP/1.1: ``l7.downstream.ClientConnection``; an HTTP/2 stream adapter
implements the same) creates one ``Exchange`` per request and feeds it the request's events; an
upstream connection (HTTP/1.1: ``l7.upstream.UpstreamConnection``) carries one attempt and feeds
the response's events. Both only translate between bytes and these calls; every decision is the
exchange's. Nothing here runs: the Protocols document the seams and let a type checker hold new
shells to them.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Downstream", "Upstream"]


class Downstream(Protocol):
    """The client side of one exchange."""

    tls: bool                      # the client spoke TLS to us
    client: Any                    # l7.headers.ClientInfo of the connection
    peer_ip: str
    processing: bool               # inside the shell's read handling (it flushes at the end)
    memo_head: Any                 # a request head eligible for the repeated-head shortcut, or None
    memo_up: Any                   # (via, upstream kind, head bytes) the exchange stored for it

    def send_continue(self) -> None: ...
    def send_interim(self, status: int, reason: bytes, fields: list) -> None: ...
    def send_head(self, status: int, reason: bytes, fields: list, kind: str, content_length: int | None,
                  chunked_up: bool, complete: bool) -> None:
        """The final response head. ``kind``: how the upstream delimits the body ("none",
        "length", "chunked", "close"); ``complete``: the request has been read to its end."""
    def send_whole(self, status: int, reason: bytes, fields: list, content_length: int, body: bytes,
                   complete: bool) -> None: ...
    def send_data(self, data: bytes) -> None: ...
    def send_end(self, trailers: list | None) -> None: ...
    def flush(self) -> None:
        """Write what send_* collected during one upstream read."""
    def retract(self) -> bool:
        """Drop a head not yet written; True when nothing of the response reached the client."""
    def send_local(self, status: int, body: bytes, extra: tuple, keep: bool) -> None:
        """An answer made by the proxy; ``keep``: the connection may stay open after it."""
    def backlog(self) -> int:
        """Response bytes the client has not taken yet (buffered by us or by the kernel)."""
    def pause_request(self, why: str) -> None: ...
    def resume_request(self, why: str) -> None: ...
    def start_tunnel(self, status: int, reason: bytes, fields: list, conn: Any) -> None: ...
    def tunnel_write(self, data: bytes) -> None: ...
    def tunnel_eof(self) -> bool: ...
    def set_deadline(self, when: float) -> None:
        """The exchange's deadline may now be earlier than any timer the shell has armed."""
    def abort(self) -> None:
        """Reset the client: a response that cannot be completed must not look complete."""
    def exchange_done(self, keep: bool) -> None: ...
    def internal_error(self, exc: BaseException) -> None: ...


class Upstream(Protocol):
    """One attempt's connection (or, for HTTP/2, stream) to a pod."""

    addr: tuple[str, int]
    kind: str                      # protocol: head bytes cached for one kind are not sent on another
    reused: bool                   # served a request before this one
    received: bool                 # got a byte of this attempt's response

    def send_head(self, exchange: Any, target: bytes, fields: list | None, cached: bytes | None,
                  tail: bytes, end: bool) -> bytes | None:
        """Start serving ``exchange`` with its head (method, framing from ``exchange.head``);
        ``end``: the request ends with the head."""
    def send_data(self, data: bytes) -> None: ...
    def send_end(self, trailers: list | None) -> None: ...
    def flush(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def discard_rest(self) -> bool: ...
    def tunnel_write(self, data: bytes) -> None: ...
    def write_eof(self) -> bool: ...
    def abort(self) -> None: ...
