"""The HTTP/1.1 parsers' shared core: the buffer, the state machine and body framing.

``MessageParser`` keeps what the two directions share (docs/http.md, "Parser"); the request and
response heads are parsed by ``l7.h1request.RequestParser`` and ``l7.h1response.ResponseParser``.
"""

from __future__ import annotations

from .h1events import (
    NEED_DATA,
    PAUSED,
    EndOfMessage,
    HTTPError,
)
from .h1grammar import (
    BAD_EOL_RE,
    CHUNK_LINE_RE,
    HEX_PREFIX_RE,
    HEXDIGITS,
    MAX_CHUNK_EXT_TOTAL,
    MAX_CHUNK_LINE,
    MAX_CHUNK_SIZE_DIGITS,
    MAX_CONTENT_LENGTH,
    MAX_LEADING_EMPTY_LINES,
    REQUEST_LINE_RE,
    REQUEST_START_BYTES,
    TRAILER_DROP,
    diagnose_fields,
    split_fields,
)

# --------------------------------------------------------------------------------------------
# Parser core

_HEAD, S_LENGTH, S_CHUNK_LINE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, S_CLOSE, S_END, S_DONE, _ERROR = (
    range(10)
)


class MessageParser:
    """Buffer, state machine and body framing shared by both directions.

    ``_buf[_pos:]`` is unconsumed input. ``_scan`` is how far an incomplete head, trailer
    section or chunk line has already been searched, so re-searching after each feed is O(new
    bytes), not O(buffer).
    """

    __slots__ = (
        "_buf", "_pos", "_scan", "_state", "_remaining", "_error", "_eof", "_max_head",
        "_max_headers", "_blank_lines", "_body_total", "_ext_total", "_trailers", "_line_ok",
    )

    _REQUEST = True
    _START_RE = REQUEST_LINE_RE
    _START_WHAT = "request line"
    _START_BYTES = REQUEST_START_BYTES

    def __init__(self, max_head: int, max_headers: int) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._scan = 0
        self._state = _HEAD
        self._remaining = 0
        self._error: HTTPError | None = None
        self._eof = False
        self._max_head = max_head
        self._max_headers = max_headers
        self._blank_lines = 0
        self._body_total = 0
        self._ext_total = 0
        self._trailers: list[tuple[bytes, bytes]] = []
        self._line_ok = False  # the start line of the incomplete head passed _check_start_line

    # ---- public API

    def feed(self, data: bytes) -> None:
        """Append received bytes. No parsing happens here; call next_event()."""
        if not data:
            return
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        buf = self._buf
        pos = self._pos
        if pos:
            # Drop consumed bytes. Deleting a bytearray's prefix is O(1) amortized in CPython
            # (it moves the start pointer), so this does not make byte-by-byte feeding quadratic.
            del buf[:pos]
            self._pos = 0
            self._scan = self._scan - pos if self._scan > pos else 0
        buf += data

    def take_body(self, data: bytes) -> bytes | None:
        """``feed(data)`` plus the ``next_event`` that returns body bytes, without the copies,
        for the bulk of a body: when the parser is inside a Content-Length body or a chunk's
        data with nothing buffered, returns the part of ``data`` that belongs to it - the read
        object itself when it all does - and buffers any rest (the next chunk line, the next
        message) for ``next_event``. Otherwise returns None having done nothing: then ``feed``.
        Why: the general way copies every body byte three times (into the buffer, a slice, a
        bytes object); a 1 MiB response is ~16-64 reads of which all but the first take this
        path. Sizes were checked when the head or the chunk line was parsed, so nothing is
        left unchecked here."""
        state = self._state
        if (state != S_LENGTH and state != _CHUNK_DATA) or self._pos != len(self._buf) or not data:
            return None
        n = self._remaining
        if len(data) > n:
            body = data[:n]
            self.feed(data[n:])
        else:
            body = data
            n = len(data)
        self._remaining -= n
        if not self._remaining:
            self._state = S_END if state == S_LENGTH else _CHUNK_CRLF
        return body

    def feed_eof(self) -> None:
        """The peer closed its sending side. next_event() then ends a close-delimited body, or
        raises HTTPError if a message was cut short. Never raises itself."""
        self._eof = True

    def next_event(self):
        if self._state == _ERROR:
            raise self._error  # type: ignore[misc]
        try:
            while True:
                state = self._state
                if state == _HEAD:
                    event = self._read_head()
                elif state == S_LENGTH or state == _CHUNK_DATA:
                    event = self._read_data()
                elif state == S_CHUNK_LINE:
                    event = self._read_chunk_line()
                elif state == _CHUNK_CRLF:
                    event = self._read_chunk_crlf()
                elif state == S_END:
                    self._state = S_DONE
                    return EndOfMessage(self._trailers)
                elif state == S_DONE:
                    return PAUSED
                elif state == _TRAILERS:
                    event = self._read_trailers()
                else:  # S_CLOSE
                    event = self._read_until_close()
                if event is not None:
                    return event
        except HTTPError as exc:
            self._state = _ERROR
            self._error = exc
            raise

    def start_next(self) -> None:
        """Begin the next message on this connection (after EndOfMessage / PAUSED)."""
        if self._state != S_DONE:
            raise RuntimeError("start_next() before the current message ended")
        self._state = _HEAD
        self._scan = self._pos
        self._blank_lines = 0
        self._body_total = 0
        self._ext_total = 0
        self._trailers = []

    @property
    def trailing(self) -> bytes:
        """Buffered bytes not parsed yet (after an Upgrade/CONNECT: the start of the tunnel)."""
        return bytes(self._buf[self._pos :])

    @property
    def buffered(self) -> int:
        """How many bytes ``trailing`` would return, without copying them (hot path)."""
        return len(self._buf) - self._pos

    def _whole_ok(self) -> bool:
        """May ``parse_whole`` run: between messages, nothing buffered, no EOF seen."""
        return (self._state == _HEAD and self._pos == len(self._buf) and not self._eof
                and not self._blank_lines)

    # ---- helpers

    def _error_for(self, status: int, reason: str) -> HTTPError:
        # Anything an upstream sends wrong is a 502 for the client, whatever the cause.
        return HTTPError(status if self._REQUEST else 502, reason)

    def _need_data(self):
        if self._eof:
            raise self._error_for(400, "connection closed in the middle of a message")
        return NEED_DATA

    def _incomplete_block(self, pos: int, what: str):
        """A head or trailer section without its final CRLFCRLF yet. Refuse what can already be
        refused, exactly as the complete block would be (see _refuse_oversize)."""
        buf = self._buf
        n = len(buf)
        stop = pos + self._max_head
        if stop > n:
            stop = n
        scan = self._scan - 1
        if scan < pos:
            scan = pos
            # The look-behind of BAD_EOL_RE would see the byte before the block.
            if n > pos and buf[pos] == 10:
                raise self._error_for(400, "bare CR or LF in " + what)
        if scan < stop and BAD_EOL_RE.search(buf, scan, stop) is not None:
            raise self._error_for(400, "bare CR or LF in " + what)
        if n - pos > self._max_head:
            raise self._error_for(431, what + " larger than %d bytes" % self._max_head)
        self._scan = n
        if self._eof and n > pos:
            raise self._error_for(400, "connection closed in the middle of the " + what)
        return NEED_DATA

    def _check_start_line(self, pos: int, start: int, stop: int) -> None:
        """Refuse a start line as soon as it is complete (its CRLF within buf[start:stop]) and
        invalid, without waiting for the rest of the head: "GET /" CRLF (HTTP/0.9) or a garbage
        line is 400 (502 for a status line) at once, not a header timeout; so is a first byte
        that can start no start line (a TLS ClientHello, a NUL). Verdict order, the same for a
        head fed whole (_head_error, _refuse_oversize) or piecemeal: that first byte, a bad line
        end within the start line, the start-line grammar, then the rest of the head. The
        search starts at ``start`` (new bytes only), the line is checked once per head."""
        buf = self._buf
        if buf[pos] not in self._START_BYTES:
            raise self._error_for(400, "malformed " + self._START_WHAT)
        le = buf.find(b"\r\n", start, stop)
        if le < 0:
            return
        if buf[pos] == 10 or BAD_EOL_RE.search(buf, pos, le + 2) is not None:
            raise self._error_for(400, "bare CR or LF in head")
        if self._START_RE.fullmatch(buf, pos, le) is None:
            raise self._error_for(400, "malformed " + self._START_WHAT)
        self._line_ok = True

    def _refuse_oversize(self, pos: int, what: str) -> None:
        """A complete head/trailer section over max_head: the same verdict _incomplete_block
        would have given had it arrived piecemeal (a complete start line within max_head bytes
        is checked first, then bad line ends within max_head bytes win)."""
        if what == "head":
            stop = pos + self._max_head
            self._check_start_line(pos, pos, stop if stop < len(self._buf) else len(self._buf))
        block = bytes(self._buf[pos : pos + self._max_head])
        if block[:1] == b"\n" or BAD_EOL_RE.search(block) is not None:
            raise self._error_for(400, "bare CR or LF in " + what)
        raise self._error_for(431, what + " larger than %d bytes" % self._max_head)

    def _read_head(self):
        buf = self._buf
        pos = self._pos
        # RFC 9112 §2.2: ignore a few empty lines before the start line.
        while buf.startswith(b"\r\n", pos):
            self._blank_lines += 1
            if self._blank_lines > MAX_LEADING_EMPTY_LINES:
                raise self._error_for(400, "too many empty lines before the start line")
            pos += 2
            self._pos = pos
        if pos >= len(buf):
            if self._eof and self._blank_lines == 0:
                return self._eof_between_messages()
            return self._need_data()
        scan = self._scan - 3
        end = buf.find(b"\r\n\r\n", scan if scan > pos else pos)
        if end < 0:
            if not self._line_ok:
                scan += 2  # the CRLF may straddle the previous feed
                stop = pos + self._max_head
                n = len(buf)
                self._check_start_line(pos, scan if scan > pos else pos, stop if stop < n else n)
            return self._incomplete_block(pos, "head")
        if end + 4 - pos > self._max_head:
            self._refuse_oversize(pos, "head")
        head = self._parse_head(buf, pos, buf.find(b"\r\n", pos), end)
        self._pos = end + 4
        self._blank_lines = 0
        self._line_ok = False
        return head

    def _eof_between_messages(self):
        return NEED_DATA

    def _parse_head(self, buf: bytearray, pos: int, line_end: int, end: int):
        raise NotImplementedError

    def _fields(self, buf: bytearray, start: int, end: int, what: str):
        """Validate and split the field lines in buf[start:end] (each ending in CRLF)."""
        fields = split_fields(buf, start, end)
        if fields is None:
            raise self._error_for(400, diagnose_fields(bytes(buf[start:end]), what))
        if len(fields) > self._max_headers:
            raise self._error_for(431, "more than %d fields in %s" % (self._max_headers, what))
        return fields

    def _head_error(self, buf: bytearray, pos: int, line_end: int, end: int, what: str):
        """Slow path: the start line or the fields failed; say which, in a fixed order."""
        self._check_start_line(pos, pos, line_end + 2)
        head = bytes(buf[pos : end + 2])
        if head[:1] == b"\n" or BAD_EOL_RE.search(head) is not None:
            return self._error_for(400, "bare CR or LF in head")
        if split_fields(buf, line_end + 2, end + 2) is None:
            return self._error_for(
                400, diagnose_fields(bytes(buf[line_end + 2 : end + 2]), "head")
            )
        return self._error_for(400, "malformed " + what)

    def _read_data(self):
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail <= 0:
            return self._need_data()
        n = self._remaining
        if avail < n:
            n = avail
        end = pos + n
        data = bytes(buf[pos:end])
        self._pos = end
        self._remaining -= n
        if not self._remaining:
            self._state = S_END if self._state == S_LENGTH else _CHUNK_CRLF
        return data

    def _read_chunk_line(self):
        buf = self._buf
        pos = self._pos
        n = len(buf)
        if pos >= n:
            return self._need_data()
        # Refuse at once what can never become a chunk-size (e.g. "-5", "0x5" fails below,
        # " 5", a body mistaken for chunks); the complete line gets the same answer.
        if buf[pos] not in HEXDIGITS:
            raise self._error_for(400, "invalid chunk size")
        limit = pos + MAX_CHUNK_LINE + 2
        scan = self._scan
        lf = buf.find(b"\n", scan if scan > pos else pos, limit)
        if lf < 0:
            if n >= limit:
                raise self._error_for(400, "chunk-size line too long")
            self._scan = n
            return self._need_data()
        if buf[lf - 1] != 13:
            raise self._error_for(400, "chunk-size line not terminated by CRLF")
        m = CHUNK_LINE_RE.fullmatch(buf, pos, lf - 1)
        if m is None:
            m = HEX_PREFIX_RE.match(buf, pos, lf - 1)
            if m is not None and m.end() - pos > MAX_CHUNK_SIZE_DIGITS:
                raise self._error_for(400, "chunk size longer than 16 hex digits")
            raise self._error_for(400, "invalid chunk size or chunk extension")
        size_end = m.end(1)
        size = int(m.group(1), 16)
        ext = lf - 1 - size_end
        if ext:
            self._ext_total += ext
            if self._ext_total > MAX_CHUNK_EXT_TOTAL:
                raise self._error_for(400, "too many chunk-extension bytes")
        self._pos = lf + 1
        if size == 0:
            self._state = _TRAILERS
            self._scan = lf + 1
            return None
        self._body_total += size
        self._check_body_size()
        self._remaining = size
        self._state = _CHUNK_DATA
        return None

    def _check_body_size(self) -> None:
        if self._body_total > MAX_CONTENT_LENGTH:
            raise self._error_for(400, "chunked body larger than 2**63-1 bytes")

    def _read_chunk_crlf(self):
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail and buf[pos] != 13 or avail > 1 and buf[pos + 1] != 10:
            raise self._error_for(400, "chunk data not followed by CRLF")
        if avail < 2:
            return self._need_data()
        self._pos = pos + 2
        self._state = S_CHUNK_LINE
        self._scan = pos + 2
        return None

    def _read_trailers(self):
        buf = self._buf
        pos = self._pos
        if buf.startswith(b"\r\n", pos):
            self._pos = pos + 2
            self._state = S_END
            return None
        if len(buf) - pos < 2:
            if len(buf) > pos and buf[pos] == 10:
                raise self._error_for(400, "bare CR or LF in trailer section")
            return self._need_data()
        scan = self._scan - 3
        end = buf.find(b"\r\n\r\n", scan if scan > pos else pos)
        if end < 0:
            return self._incomplete_block(pos, "trailer section")
        if end + 4 - pos > self._max_head:
            self._refuse_oversize(pos, "trailer section")
        fields = self._fields(buf, pos, end + 2, "trailer section")
        drop_underscore = self._drop_underscores()
        self._trailers = [
            (name, value)
            for name, value in fields
            if name.lower() not in TRAILER_DROP and not (drop_underscore and b"_" in name)
        ]
        self._pos = end + 4
        self._state = S_END
        return None

    def _drop_underscores(self) -> bool:
        return False

    def _read_until_close(self):
        buf = self._buf
        pos = self._pos
        if len(buf) > pos:
            data = bytes(buf[pos:])
            self._pos = len(buf)
            return data
        if self._eof:
            self._state = S_END
            return None
        return NEED_DATA
