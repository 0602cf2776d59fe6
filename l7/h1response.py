"""Parsing responses from pods (``ResponseParser``), with the fast path for whole responses."""

from __future__ import annotations

from .h1events import NEED_DATA, HTTPError, ResponseHead
from .h1grammar import (
    FRAMING_NAMES,
    K_CL,
    K_CONNECTION,
    K_TE,
    NO_TOKENS,
    RESPONSE_START_BYTES,
    STATUS_LINE_RE,
    message_keep_alive,
    name_kind,
    name_kinds,
    parse_connection_tokens,
    parse_content_length,
    scan_response_whole,
    split_fields,
    split_tokens,
)
from .h1parser import (
    S_CHUNK_LINE,
    S_CLOSE,
    S_DONE,
    S_END,
    S_LENGTH,
    MessageParser,
)


class ResponseParser(MessageParser):
    """Parse responses from an upstream connection. Call set_request_method() before each
    response; a response arriving with no request outstanding is an error.

    Events: ResponseHead (interim 1xx heads are returned as they come, each followed directly by
    the next head, except 101 which ends the message - the rest of the stream is the tunnel),
    body bytes, EndOfMessage, then PAUSED until start_next().
    """

    __slots__ = ("_method",)
    _REQUEST = False
    _START_RE = STATUS_LINE_RE
    _START_WHAT = "status line"
    _START_BYTES = RESPONSE_START_BYTES

    def __init__(self, max_head: int = 65536, max_headers: int = 100) -> None:
        super().__init__(max_head, max_headers)
        self._method: bytes | None = None

    def set_request_method(self, method: bytes) -> None:
        self._method = method

    def start_next(self) -> None:
        super().start_next()
        self._method = None

    def _eof_between_messages(self):
        if self._method is None:
            return NEED_DATA  # an idle pooled connection closed: nothing was lost
        raise HTTPError(502, "upstream closed the connection before responding")

    def _read_head(self):
        if self._method is None and len(self._buf) > self._pos:
            raise HTTPError(502, "upstream sent data with no request outstanding")
        return super()._read_head()

    def repeat_whole(self) -> bool:
        """The caller got a response whose head bytes are identical to one ``parse_whole``
        accepted on this parser, and as long: move to the state ``parse_whole`` would leave,
        if it may run now (the request method matters: a HEAD answer has no body)."""
        method = self._method
        if method is None or method == b"HEAD" or method == b"CONNECT" or not self._whole_ok():
            return False
        self._state = S_DONE
        return True

    def parse_whole(self, data: bytes) -> tuple[ResponseHead, bytes] | None:
        """Fast path, as ``RequestParser.parse_whole``: ``data`` is exactly one complete
        response with a Content-Length body (the usual small keep-alive answer). Returns (head,
        body) - the message is then complete (next: PAUSED, ``start_next``) - or None with
        nothing consumed (then ``feed`` + ``next_event``). Same regexes and checks as the general
        path; anything else (1xx, 204, 304, HEAD or CONNECT requests, chunked or close-delimited
        bodies, repeated Content-Length or Connection, a body still to come or bytes after it,
        any error) returns None and goes the general way."""
        method = self._method
        if method is None or method == b"HEAD" or method == b"CONNECT" or not self._whole_ok():
            return None
        scan = scan_response_whole(data, self._max_head, self._max_headers)
        if scan is None:
            return None
        version, status, reason, headers, n, conns, end = scan
        tokens = NO_TOKENS if conns is None else parse_connection_tokens([conns])
        if tokens is None:
            return None
        self._state = S_DONE
        return (ResponseHead(status, reason, version, headers, n, False,
                             message_keep_alive(version, tokens), tokens),
                data[end + 4:])

    def _parse_head(self, buf: bytearray, pos: int, line_end: int, end: int) -> ResponseHead:
        m = STATUS_LINE_RE.fullmatch(buf, pos, line_end)
        headers = split_fields(buf, line_end + 2, end + 2)
        if m is None or headers is None:
            raise self._head_error(buf, pos, line_end, end, "status line")
        if len(headers) > self._max_headers:
            raise HTTPError(502, "more than %d header fields" % self._max_headers)
        version_b, status_b, reason = m.groups()
        if version_b == b"1.1":
            version = 11
        elif version_b == b"1.0":
            version = 10
        else:
            raise HTTPError(502, "upstream HTTP version not supported")
        status = int(status_b)
        if status < 100 or status > 599:
            raise HTTPError(502, "invalid status code")  # RFC 9110 §15
        cls = tes = conns = None
        kind_of = name_kinds.get
        for name, value in headers:
            kind = kind_of(name)
            if kind is None:
                kind = name_kind(name)
            if kind == K_CL:
                cls = [value] if cls is None else cls + [value]
            elif kind == K_TE:
                tes = [value] if tes is None else tes + [value]
            elif kind == K_CONNECTION:
                conns = [value] if conns is None else conns + [value]
        if cls is not None or tes is not None:
            headers = [h for h in headers if h[0].lower() not in FRAMING_NAMES]

        # Framing is validated even where the status or method means "no body" (§6.3 rule 1):
        # a response that is malformed anyway is not one to keep the connection for.
        content_length = None
        chunked = False
        if tes is not None:
            if cls is not None:
                raise HTTPError(502, "both Content-Length and Transfer-Encoding")
            if version == 10:
                raise HTTPError(502, "Transfer-Encoding in an HTTP/1.0 response")
            codings = split_tokens(tes)
            if codings != [b"chunked"]:
                # RFC 9112 §6.3 rule 4 would read a non-chunked coding until close; we could only
                # forward it undecoded under a framing of our own, so refuse (docs/http.md).
                raise HTTPError(502, "unsupported Transfer-Encoding in response")
            chunked = True
        elif cls is not None:
            content_length = parse_content_length(cls)
            if content_length is None:
                raise HTTPError(502, "invalid Content-Length")
        tokens = NO_TOKENS if conns is None else parse_connection_tokens(conns)
        if tokens is None:
            raise HTTPError(502, "invalid Connection header")

        head = ResponseHead(
            status, reason or b"", version, headers, content_length, chunked,
            message_keep_alive(version, tokens), tokens,
        )
        kind = head.body_kind(self._method)  # type: ignore[arg-type]
        if status < 200:
            head.keep_alive = head.keep_alive and status != 101
            if status == 101:
                self._state = S_END  # the rest of the stream belongs to the new protocol
            else:
                self._scan = end + 4  # interim response: the final head follows (RFC 9110 §15.2)
            return head
        if kind == "none":
            if self._method == b"CONNECT" and status < 300:
                head.keep_alive = False
            self._state = S_END
        elif kind == "chunked":
            self._state = S_CHUNK_LINE
            self._scan = end + 4
        elif kind == "length":
            if content_length:
                self._state = S_LENGTH
                self._remaining = content_length
            else:
                self._state = S_END
        else:
            head.keep_alive = False  # RFC 9112 §6.3 rule 8: the close delimits the body
            self._state = S_CLOSE
        return head
