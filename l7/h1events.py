"""What the HTTP/1.1 parsers hand over: heads, the end of a message, and the errors they raise."""

from __future__ import annotations


class HTTPError(Exception):
    """The peer sent something we refuse.

    ``status`` is the answer for a client (400, 408, 413, 431, 501, 505) or 502 for anything an
    upstream sent. ``reason`` is a short text for logs and the error body.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes, then ask again
PAUSED = _Sentinel("PAUSED")  # a message is complete; call start_next() for the next one


class EndOfMessage:
    """The body is complete. ``trailers``: trailer fields (validated, forbidden ones dropped)."""

    __slots__ = ("trailers",)

    def __init__(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.trailers = trailers if trailers is not None else []

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EndOfMessage) and other.trailers == self.trailers

    def __repr__(self) -> str:
        return f"EndOfMessage(trailers={self.trailers!r})"


class RequestHead:
    """A validated request head.

    ``headers`` keep their order, name case and values (OWS stripped) - except the framing
    fields Content-Length / Transfer-Encoding, which are dropped and reported as
    ``content_length`` / ``chunked`` only, and (by default) fields whose name contains "_".
    ``path`` is the target without "?query" ("/" for an absolute-form target with an empty
    path, "*" for asterisk-form, b"" for CONNECT's authority-form); ``query`` excludes the "?".
    ``host`` is lowercased and keeps its port; an absolute-form or CONNECT authority wins over
    the Host field. ``upgrade`` is set only for a WebSocket handshake (HTTP/1.1 bodiless GET,
    Connection lists "upgrade", Upgrade offers "websocket": that member as spelt); any other
    Upgrade leaves it None and the request is an ordinary one (docs/http.md "Upgrade").
    """

    __slots__ = (
        "method", "target", "path", "query", "version", "headers", "host", "content_length",
        "chunked", "keep_alive", "upgrade", "expect_continue", "connection_tokens",
    )

    def __init__(
        self, method: bytes, target: bytes, path: bytes, query: bytes, version: int,
        headers: list[tuple[bytes, bytes]], host: bytes, content_length: int | None,
        chunked: bool, keep_alive: bool, upgrade: bytes | None, expect_continue: bool,
        connection_tokens: frozenset[bytes],
    ) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.host = host
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.expect_continue = expect_continue
        self.connection_tokens = connection_tokens

    def __repr__(self) -> str:
        return (
            f"RequestHead({self.method!r} {self.target!r} HTTP/{self.version // 10}."
            f"{self.version % 10}, host={self.host!r}, content_length={self.content_length!r}, "
            f"chunked={self.chunked!r}, keep_alive={self.keep_alive!r}, "
            f"headers={self.headers!r})"
        )


class ResponseHead:
    """A validated response head (see :class:`RequestHead` for ``headers``)."""

    __slots__ = (
        "status", "reason", "version", "headers", "content_length", "chunked", "keep_alive",
        "connection_tokens",
    )

    def __init__(
        self, status: int, reason: bytes, version: int, headers: list[tuple[bytes, bytes]],
        content_length: int | None, chunked: bool, keep_alive: bool,
        connection_tokens: frozenset[bytes],
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.connection_tokens = connection_tokens

    def body_kind(self, request_method: bytes) -> str:
        """How this response's body is delimited (RFC 9112 §6.3, in the RFC's order):
        "none", "chunked", "length" or "close" (read until the connection closes)."""
        status = self.status
        if request_method == b"HEAD" or status < 200 or status == 204 or status == 304:
            return "none"
        if request_method == b"CONNECT" and status < 300:
            return "none"  # §6.3 rule 2: the connection becomes a tunnel after the head
        if self.chunked:
            return "chunked"
        if self.content_length is not None:
            return "length"
        return "close"

    def __repr__(self) -> str:
        return (
            f"ResponseHead(HTTP/{self.version // 10}.{self.version % 10} {self.status} "
            f"{self.reason!r}, content_length={self.content_length!r}, "
            f"chunked={self.chunked!r}, keep_alive={self.keep_alive!r}, "
            f"headers={self.headers!r})"
        )
