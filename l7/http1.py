"""Strict, sans-I/O HTTP/1.1 message layer for both sides of the L7 proxy.

The proxy reads requests from clients with :class:`RequestParser` and responses from pods with
:class:`ResponseParser`; it writes both with the ``serialize_*`` functions. Nothing here touches a
socket: the I/O layer feeds bytes in and asks for events.

Invariants this module keeps (docs/http.md has the rule-by-rule table with RFC sections):

* One framing, or none. A message is accepted only when its body length is unambiguous under
  RFC 9112 §6: never both Content-Length and Transfer-Encoding, never a Transfer-Encoding other
  than a single final ``chunked``, never disagreeing Content-Length values. Everything that could
  make two HTTP implementations see different message boundaries is refused with
  :class:`HTTPError` - request smuggling needs exactly such a disagreement.
* Nothing of the peer's framing is forwarded. The parser reports framing as numbers/flags and
  removes the framing from the body; the serializers write a canonical head (CRLF, one framing
  header) and canonical chunks, so a forwarded message is re-framed by us, never relayed raw.
* Every head line is validated against the RFC 9110/9112 grammar as a whole line (one
  precompiled regex per line kind): tokens for names and methods, no CTL (except HTAB) in values,
  CRLF line ends only, no obs-fold. Field values are returned with their OWS stripped.
* Bounded memory: the head (and the trailer section) may not exceed ``max_head`` bytes and the
  parser refuses as soon as more than that is buffered without a complete head; chunk lines are
  bounded too. Bodies are streamed as they arrive, never accumulated.
* Split-invariant: feeding a message whole, byte by byte or cut anywhere yields the same
  events (body bytes may come in different pieces) and the same error (status and reason).
  Incomplete heads and chunk lines are rescanned only from where the previous scan stopped, so
  byte-by-byte feeding stays O(n).
* Errors are sticky: after an :class:`HTTPError` every later ``next_event`` raises it again; the
  connection must be closed (RFC 9112 §11.2: a framing error leaves no safe resume point).
* Request-side errors carry 400/413/431/501/505; response-side errors always carry 502 (the pod
  sent something we refuse; the proxy answers 502 and never reuses that connection).
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "HTTPError",
    "RequestHead",
    "ResponseHead",
    "RequestParser",
    "ResponseParser",
    "EndOfMessage",
    "NEED_DATA",
    "PAUSED",
    "LAST_CHUNK",
    "MAX_CONTENT_LENGTH",
    "chunk",
    "serialize_request_head",
    "serialize_response_head",
    "serialize_trailers",
]

# --------------------------------------------------------------------------------------------
# Limits. Each is far above what real clients send and low enough to bound work per connection.

# Content-Length and the running chunked total must fit a signed 64-bit integer, like every
# other proxy on the path (nginx, HAProxy, Envoy use off_t / int64); 19 digits max.
MAX_CONTENT_LENGTH = 2**63 - 1
# RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request-line (old
# clients send a CRLF after a POST body). Ignore a few, refuse a stream of them.
_MAX_LEADING_EMPTY_LINES = 4
# chunk-size is at most 16 HEXDIG (64 bits); a longer size is refused, not truncated.
_MAX_CHUNK_SIZE_DIGITS = 16
# chunk-size line (size + extensions) and the sum of extension bytes per message: extensions are
# parsed and dropped, so without a bound they are free bandwidth for a client (CVE-2024-22019).
_MAX_CHUNK_LINE = 4096
_MAX_CHUNK_EXT_TOTAL = 16384

# --------------------------------------------------------------------------------------------
# Grammar (RFC 9110 §5.6.2 token, §5.5 field-value, §5.6.4 quoted-string; RFC 9112 §3, §4, §5,
# §7.1). Every line is matched whole by one precompiled pattern (fullmatch, or the anchored
# findall below); the character classes exclude CR, LF, NUL and the other CTLs, so a bare CR or
# LF anywhere fails its line.

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = rb"[" + _TCHAR + rb"]+"
_VCHAR_OBS = rb"\x21-\x7e\x80-\xff"  # field-vchar = VCHAR / obs-text
# field-value with OWS excluded from both ends (the surrounding [ \t]* eat it).
_FIELD_VALUE = rb"(?:[" + _VCHAR_OBS + rb"](?:[ \t" + _VCHAR_OBS + rb"]*[" + _VCHAR_OBS + rb"])?)?"
# field-line = field-name ":" OWS field-value OWS  (RFC 9112 §5). No space before the colon.
# Hot path: one findall over the whole field block. "^" (multiline) pins every match to a line
# start and a match always ends with CRLF, so "matches == number of LF" proves that every line
# matched in full - a line with a bad byte, a bare CR, a lone LF, obs-fold or "name : v" leaves a
# line unmatched. The value class has no CTL but HTAB; trailing OWS is stripped afterwards (rare;
# a backtracking "strip" in the regex costs ~20% on every header).
_FIELD_LINE_RE = re.compile(
    rb"^(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*)\r\n", re.M
)
# The same grammar as one anchored pattern, for diagnosing a rejected line (slow path only).
_FIELDS_RE = re.compile(rb"(?:" + _TOKEN + rb":[ \t]*" + _FIELD_VALUE + rb"[ \t]*\r\n)*")
# What the serializers emit: exactly "name: value" with no OWS to strip.
_FIELDS_OUT_RE = re.compile(rb"(?:" + _TOKEN + rb": " + _FIELD_VALUE + rb"\r\n)*")
_FRAMING_NAME_RE = re.compile(rb"^(?:content-length|transfer-encoding):", re.I | re.M)

# request-line = method SP request-target SP HTTP-version (RFC 9112 §3). The target is any run of
# visible ASCII except "#" (a fragment is never part of a request-target); the form is checked
# afterwards. HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive (§2.3).
_REQUEST_LINE_RE = re.compile(
    rb"(" + _TOKEN + rb") ([\x21\x22\x24-\x7e]+) HTTP/([0-9]\.[0-9])"
)
# status-line = HTTP-version SP status-code SP [ reason-phrase ] (RFC 9112 §4). We also take a
# line that ends right after the status code: common in the wild, and the reason is ignorable.
_STATUS_LINE_RE = re.compile(
    rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?"
)
_REASON_RE = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")
_TOKEN_RE = re.compile(_TOKEN)
# Bytes a head may start with: a method's first tchar (request) or the "H" of "HTTP/" (response),
# or CR/LF (empty lines before the start line, or a bad line end: decided by its own rule).
_REQUEST_START_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                                 b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")
_RESPONSE_START_BYTES = frozenset(b"H\r\n")
_TARGET_RE = re.compile(rb"[\x21\x22\x24-\x7e]+")

# Host = uri-host [ ":" port ] (RFC 9110 §7.2, RFC 3986 §3.2.2): IP-literal or reg-name (which
# covers IPv4address). No userinfo: RFC 9110 §4.2.4 forbids it in http(s) URIs. Narrower than
# RFC 3986 on purpose (docs/http.md "Host"): no "," (frameworks split Host on it, and a list is
# never one host) and no ";" (a parameter separator to some; no DNS name holds either), and no
# percent-escape of a CTL, DEL, "," or ";" (_HOST_BAD_ESCAPE_RE): a decoded "%00" truncates.
_HOST_RE = re.compile(
    rb"(?:\[([0-9A-Fa-f:.]+|[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+=:]+)\]"
    rb"|(?:[A-Za-z0-9\-._~!$&'()*+=]|%[0-9A-Fa-f]{2})+)"
    rb"(?::([0-9]*))?"
)
_HOST_BAD_ESCAPE_RE = re.compile(rb"%(?:[01][0-9A-Fa-f]|7[Ff]|2[Cc]|3[Bb])")
# absolute-form (RFC 9112 §3.2.2) for the http and https schemes; the authority is checked
# with _HOST_RE, the rest was checked by _TARGET_RE.
_ABSOLUTE_RE = re.compile(rb"[hH][tT][tT][pP][sS]?://([^/?]*)([^?]*)(?:\?(.*))?", re.S)

_DIGITS_RE = re.compile(rb"[0-9]{1,19}")
_QUOTED = rb'"(?:[\t !\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] )
# (RFC 9112 §7.1.1); the value is a token or a quoted-string.
_CHUNK_LINE_RE = re.compile(
    rb"([0-9A-Fa-f]{1,%d})" % _MAX_CHUNK_SIZE_DIGITS
    + rb"(?:[ \t]*;[ \t]*" + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)
_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
_HEX_PREFIX_RE = re.compile(rb"[0-9A-Fa-f]+")
# A bare CR (CR not followed by LF) or a lone LF (LF not preceded by CR).
_BAD_EOL_RE = re.compile(rb"\r[^\n]|(?<!\r)\n")

# Header names the head interpretation looks at (compared lowercased).
_K_PLAIN, _K_HOST, _K_CL, _K_TE, _K_CONNECTION, _K_UPGRADE, _K_EXPECT = range(7)
_K_UNDERSCORE = -1
_SPECIAL = {
    b"host": _K_HOST,
    b"content-length": _K_CL,
    b"transfer-encoding": _K_TE,
    b"connection": _K_CONNECTION,
    b"upgrade": _K_UPGRADE,
    b"expect": _K_EXPECT,
}
# Raw field name -> kind. Clients repeat the same few dozen names, so one dict hit replaces a
# lower() + lookup + "_" scan per field. Bounded: past the limit names are classified uncached,
# so a client inventing names cannot grow it. Same for validated Host values.
_CACHE_LIMIT = 4096
_name_kinds: dict[bytes, int] = {}
_host_cache: dict[bytes, bytes | None] = {}
_connection_cache: dict[bytes, frozenset[bytes] | None] = {}

# Fields that must not come from a trailer section (RFC 9110 §6.5.1): framing, routing,
# hop-by-hop, authentication and content metadata that a recipient would otherwise merge into the
# head. They are dropped on parse and on serialize.
_TRAILER_DROP = frozenset(
    (
        b"content-length", b"transfer-encoding", b"trailer", b"host", b"connection",
        b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"expect", b"max-forwards",
        b"authorization", b"proxy-authorization", b"proxy-authenticate", b"www-authenticate",
        b"cookie", b"set-cookie", b"content-encoding", b"content-type", b"content-range",
        b"range", b"cache-control", b"pragma", b"age", b"expires", b"date", b"location",
        b"retry-after", b"vary",
    )
)

_FRAMING_NAMES = frozenset((b"content-length", b"transfer-encoding"))

# The only protocol a request may switch to through the proxy (docs/http.md "Upgrade"). Anything
# else - above all "h2c", whose upgraded connection would carry HTTP/2 requests for any path
# straight to the pod, past the routing rules - is a plain request with Upgrade removed.
_TUNNEL_PROTOCOL = b"websocket"
_NO_TOKENS: frozenset[bytes] = frozenset()
# The versions the fast paths take (anything else goes the general way).
_WHOLE_VERSIONS = {b"1.1": 11, b"1.0": 10}


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


# --------------------------------------------------------------------------------------------
# Field helpers shared by both directions.


def _split_fields(buf, start: int, end: int) -> list[tuple[bytes, bytes]] | None:
    """Validate and split the field lines in buf[start:end] (each ending in CRLF; buf[start-1]
    is LF). Returns [(name, value)] with OWS stripped, or None if any line is invalid."""
    fields = _FIELD_LINE_RE.findall(buf, start, end)
    if len(fields) != buf.count(b"\n", start, end):
        return None
    if buf.find(b" \r\n", start, end) >= 0 or buf.find(b"\t\r\n", start, end) >= 0:
        fields = [(name, value.rstrip(b" \t")) for name, value in fields]
    return fields


# Bytes a field block may hold at all: HTAB, CR, LF, SP-"~", obs-text. bytes.translate(None, it)
# deletes them, so what is left is a CTL or DEL (refused by the field grammar).
_FIELD_BLOCK_BYTES = bytes([9, 10, 13]) + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))


def _split_fields_fast(buf: bytes, start: int, end: int) -> list[tuple[bytes, bytes]] | None:
    """_split_fields for the fast paths, without the regex engine: the same grammar, checked as
    (1) no byte outside _FIELD_BLOCK_BYTES (so values hold VCHAR / obs-text / SP / HTAB only),
    (2) every CR is followed by LF and every LF preceded by CR (equal counts of CR, LF, CRLF),
    (3) each line is "name:value" with name a token: a name already in ``_name_kinds`` is one
    (that cache is only ever filled with names that passed this check or _FIELD_LINE_RE),
    others go through _TOKEN_RE. obs-fold and "name : v" fail (3): the name would hold SP/HTAB.
    Values are OWS-stripped like _split_fields does. None: not that simple - the caller falls
    back to the general path, which decides (and words the error) as always. Why: the regex
    findall costs ~1 us per field line; this ~0.3 us (C-level translate/count/split)."""
    block = buf[start:end]
    if block.translate(None, _FIELD_BLOCK_BYTES):
        return None
    n = block.count(b"\n")
    if block.count(b"\r") != n or block.count(b"\r\n") != n:
        return None
    if not n:
        return []
    known = _name_kinds
    out = []
    append = out.append
    for line in block[:-2].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        if name not in known and _TOKEN_RE.fullmatch(name) is None:
            return None
        append((name, value.strip(b" \t")))
    return out


def _diagnose_fields(block: bytes, what: str) -> str:
    """Slow path: name the first problem in a field block that _split_fields refused."""
    if block[:1] == b"\n" or _BAD_EOL_RE.search(block) is not None:
        return "bare CR or LF in " + what
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[0] in b" \t":
            # RFC 9112 §5.2 obs-fold, or whitespace before the first field line (§2.2).
            return "obsolete line folding (line starts with whitespace)"
        colon = line.find(b":")
        if colon < 0:
            return "header line without colon"
        name = line[:colon]
        if not name:
            return "empty header name"
        if name[-1] in b" \t":
            return "whitespace between header name and colon"  # RFC 9112 §5.1
        if _TOKEN_RE.fullmatch(name) is None:
            return "invalid character in header name"
        if _FIELDS_RE.fullmatch(line + b"\r\n") is None:
            return "invalid character in header value"
    return "malformed header section"


def _name_kind(name: bytes) -> int:
    kind = _SPECIAL.get(name.lower(), _K_PLAIN)
    if not kind and b"_" in name:
        kind = _K_UNDERSCORE
    if len(_name_kinds) < _CACHE_LIMIT:
        _name_kinds[name] = kind
    return kind


def _parse_content_length(values: list[bytes]) -> int | None:
    """RFC 9110 §8.6 / RFC 9112 §6.3 rule 5: 1*DIGIT; repeated fields or a comma list are
    accepted only when every member is the same number. Returns None when invalid."""
    result = None
    for value in values:
        parts = value.split(b",") if b"," in value else (value,)
        for part in parts:
            part = part.strip(b" \t")
            if _DIGITS_RE.fullmatch(part) is None:
                return None
            n = int(part)
            if n > MAX_CONTENT_LENGTH or (result is not None and n != result):
                return None
            result = n
    return result


def _split_tokens(values: list[bytes]) -> list[bytes] | None:
    """A #token list (RFC 9110 §5.6.1), lowercased; empty members are ignored as the RFC
    requires. None if a member is not a token."""
    out = []
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if not part:
                continue
            if _TOKEN_RE.fullmatch(part) is None:
                return None
            out.append(part.lower())
    return out


def _connection_tokens(values: list[bytes]) -> frozenset[bytes] | None:
    """Connection field value(s) -> lowercased option set (None if a member is not a token).
    A single value is cached: clients send the same "keep-alive" / "close" every time."""
    if len(values) == 1:
        try:
            return _connection_cache[values[0]]
        except KeyError:
            pass
    tokens = _split_tokens(values)
    result = None if tokens is None else frozenset(tokens)
    if len(values) == 1 and len(_connection_cache) < _CACHE_LIMIT:
        _connection_cache[values[0]] = result
    return result


def _websocket_offer(values: list[bytes]) -> bytes | None:
    """The "websocket" member of Upgrade field value(s), as spelt (case-insensitive match on a
    bare protocol-name, RFC 9110 §7.8 / RFC 6455 §4.1), or None when it is not offered."""
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if part.lower() == _TUNNEL_PROTOCOL:
                return part
    return None


def _check_host(value: bytes, require_port: bool = False) -> bytes | None:
    """Validate uri-host [":" port]; return it lowercased, or None when invalid."""
    if not require_port:
        try:
            return _host_cache[value]
        except KeyError:
            pass
    result = None
    m = _HOST_RE.fullmatch(value)
    if m is not None and b"%" in value and _HOST_BAD_ESCAPE_RE.search(value) is not None:
        m = None
    if m is not None:
        literal, port = m.groups()
        result = value.lower()
        if literal is not None and literal[:1] not in (b"v", b"V"):
            try:
                ipaddress.IPv6Address(literal.decode("ascii"))
            except ValueError:
                result = None
        if not port:
            if require_port:
                result = None
        elif len(port) > 5 or int(port) > 65535:
            result = None
    if not require_port and len(_host_cache) < _CACHE_LIMIT:
        _host_cache[value] = result
    return result


# --------------------------------------------------------------------------------------------
# Parser core

_HEAD, _LENGTH, _CHUNK_LINE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _CLOSE, _END, _DONE, _ERROR = (
    range(10)
)


class _Parser:
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
    _START_RE = _REQUEST_LINE_RE
    _START_WHAT = "request line"
    _START_BYTES = _REQUEST_START_BYTES

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
        if (state != _LENGTH and state != _CHUNK_DATA) or self._pos != len(self._buf) or not data:
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
            self._state = _END if state == _LENGTH else _CHUNK_CRLF
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
                elif state == _LENGTH or state == _CHUNK_DATA:
                    event = self._read_data()
                elif state == _CHUNK_LINE:
                    event = self._read_chunk_line()
                elif state == _CHUNK_CRLF:
                    event = self._read_chunk_crlf()
                elif state == _END:
                    self._state = _DONE
                    return EndOfMessage(self._trailers)
                elif state == _DONE:
                    return PAUSED
                elif state == _TRAILERS:
                    event = self._read_trailers()
                else:  # _CLOSE
                    event = self._read_until_close()
                if event is not None:
                    return event
        except HTTPError as exc:
            self._state = _ERROR
            self._error = exc
            raise

    def start_next(self) -> None:
        """Begin the next message on this connection (after EndOfMessage / PAUSED)."""
        if self._state != _DONE:
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

    def _whole_head(self, data: bytes, line_re):
        """The first half of both ``parse_whole`` paths: may they run, and does ``data`` start
        with a complete head whose start line matches ``line_re`` and whose field block passes
        the strict field checks within the limits? Returns (start-line groups, fields, offset
        of the blank line) or None (then the general path decides). Consumes nothing."""
        if not self._whole_ok():
            return None
        end = data.find(b"\r\n\r\n")
        if end < 0 or end + 4 > self._max_head:
            return None
        line_end = data.find(b"\r\n")
        m = line_re.fullmatch(data, 0, line_end)
        if m is None:
            return None
        headers = _split_fields_fast(data, line_end + 2, end + 2)
        if headers is None or len(headers) > self._max_headers:
            return None
        return m.groups(), headers, end

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
            # The look-behind of _BAD_EOL_RE would see the byte before the block.
            if n > pos and buf[pos] == 10:
                raise self._error_for(400, "bare CR or LF in " + what)
        if scan < stop and _BAD_EOL_RE.search(buf, scan, stop) is not None:
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
        if buf[pos] == 10 or _BAD_EOL_RE.search(buf, pos, le + 2) is not None:
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
        if block[:1] == b"\n" or _BAD_EOL_RE.search(block) is not None:
            raise self._error_for(400, "bare CR or LF in " + what)
        raise self._error_for(431, what + " larger than %d bytes" % self._max_head)

    def _read_head(self):
        buf = self._buf
        pos = self._pos
        # RFC 9112 §2.2: ignore a few empty lines before the start line.
        while buf.startswith(b"\r\n", pos):
            self._blank_lines += 1
            if self._blank_lines > _MAX_LEADING_EMPTY_LINES:
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
        fields = _split_fields(buf, start, end)
        if fields is None:
            raise self._error_for(400, _diagnose_fields(bytes(buf[start:end]), what))
        if len(fields) > self._max_headers:
            raise self._error_for(431, "more than %d fields in %s" % (self._max_headers, what))
        return fields

    def _head_error(self, buf: bytearray, pos: int, line_end: int, end: int, what: str):
        """Slow path: the start line or the fields failed; say which, in a fixed order."""
        self._check_start_line(pos, pos, line_end + 2)
        head = bytes(buf[pos : end + 2])
        if head[:1] == b"\n" or _BAD_EOL_RE.search(head) is not None:
            return self._error_for(400, "bare CR or LF in head")
        if _split_fields(buf, line_end + 2, end + 2) is None:
            return self._error_for(
                400, _diagnose_fields(bytes(buf[line_end + 2 : end + 2]), "head")
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
            self._state = _END if self._state == _LENGTH else _CHUNK_CRLF
        return data

    def _read_chunk_line(self):
        buf = self._buf
        pos = self._pos
        n = len(buf)
        if pos >= n:
            return self._need_data()
        # Refuse at once what can never become a chunk-size (e.g. "-5", "0x5" fails below,
        # " 5", a body mistaken for chunks); the complete line gets the same answer.
        if buf[pos] not in _HEXDIGITS:
            raise self._error_for(400, "invalid chunk size")
        limit = pos + _MAX_CHUNK_LINE + 2
        scan = self._scan
        lf = buf.find(b"\n", scan if scan > pos else pos, limit)
        if lf < 0:
            if n >= limit:
                raise self._error_for(400, "chunk-size line too long")
            self._scan = n
            return self._need_data()
        if buf[lf - 1] != 13:
            raise self._error_for(400, "chunk-size line not terminated by CRLF")
        m = _CHUNK_LINE_RE.fullmatch(buf, pos, lf - 1)
        if m is None:
            m = _HEX_PREFIX_RE.match(buf, pos, lf - 1)
            if m is not None and m.end() - pos > _MAX_CHUNK_SIZE_DIGITS:
                raise self._error_for(400, "chunk size longer than 16 hex digits")
            raise self._error_for(400, "invalid chunk size or chunk extension")
        size_end = m.end(1)
        size = int(m.group(1), 16)
        ext = lf - 1 - size_end
        if ext:
            self._ext_total += ext
            if self._ext_total > _MAX_CHUNK_EXT_TOTAL:
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
        self._state = _CHUNK_LINE
        self._scan = pos + 2
        return None

    def _read_trailers(self):
        buf = self._buf
        pos = self._pos
        if buf.startswith(b"\r\n", pos):
            self._pos = pos + 2
            self._state = _END
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
            if name.lower() not in _TRAILER_DROP and not (drop_underscore and b"_" in name)
        ]
        self._pos = end + 4
        self._state = _END
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
            self._state = _END
            return None
        return NEED_DATA


def _keep_alive(version: int, tokens: frozenset[bytes]) -> bool:
    # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive".
    if b"close" in tokens:
        return False
    return version == 11 or b"keep-alive" in tokens


class RequestParser(_Parser):
    """Parse requests from a client connection, one at a time.

    Events: RequestHead, then body bytes (possibly none), then EndOfMessage, then PAUSED until
    start_next(); NEED_DATA whenever more input is needed. ``max_body`` bounds the body (413).
    ``drop_underscore_headers`` (default on, like nginx's ``underscores_in_headers off``) drops
    request fields whose name contains "_" so that no CGI/WSGI-style backend can confuse e.g.
    ``X_Forwarded_For`` with ``X-Forwarded-For`` or ``Content_Length`` with ``Content-Length``.
    """

    __slots__ = ("_max_body", "_drop_underscore")

    def __init__(
        self,
        max_head: int = 65536,
        max_headers: int = 100,
        max_body: int | None = None,
        *,
        drop_underscore_headers: bool = True,
    ) -> None:
        super().__init__(max_head, max_headers)
        self._max_body = max_body
        self._drop_underscore = drop_underscore_headers

    def _drop_underscores(self) -> bool:
        return self._drop_underscore

    def _check_body_size(self) -> None:
        if self._max_body is not None and self._body_total > self._max_body:
            raise HTTPError(413, "body larger than %d bytes" % self._max_body)
        super()._check_body_size()

    def repeat_whole(self) -> bool:
        """The caller got bytes identical to a message ``parse_whole`` accepted earlier on
        this parser (so the same head, by construction: parsing is a function of the bytes and
        the limits, which do not change): move to the state ``parse_whole`` would leave, if it
        may run now. False: parse normally."""
        if not self._whole_ok():
            return False
        self._state = _DONE
        return True

    def parse_whole(self, data: bytes) -> RequestHead | None:
        """Fast path for the most common input: ``data`` (the next read, nothing buffered) is
        exactly one complete request head without a body. Returns its head - the message is then
        complete, as if ``next_event`` had returned the head and ``EndOfMessage`` (next: PAUSED,
        ``start_next``) - or None, having consumed nothing: then ``feed(data)`` and use
        ``next_event`` as usual.

        It is the strict parser, not a lenient one: the same regexes validate the request line
        and every field line (_REQUEST_LINE_RE, _split_fields), Host goes through _check_host,
        Connection through _connection_tokens. Whatever is not the plain case - a body or any
        framing field, Upgrade, Expect, "_" in a name, a repeated Host or Connection, a form
        other than origin-form, CONNECT, a version other than 1.0/1.1, a head over the limits,
        bytes after the head, an error of any kind - returns None, so the general path decides
        it (and raises the very same HTTPError it always did). Why: the general path costs three
        next_event calls, a bytearray copy and a generic field pass per request; this is one
        function over the received bytes (measured ~2x faster per request).
        """
        whole = self._whole_head(data, _REQUEST_LINE_RE)
        if whole is None:
            return None
        (method, target, version_b), headers, end = whole
        version = _WHOLE_VERSIONS.get(version_b)
        if version is None or end + 4 != len(data):   # a body or a pipelined request follows
            return None
        if target[0] != 47 or method == b"CONNECT":  # origin-form only
            return None
        hosts = conns = None
        kind_of = _name_kinds.get
        for name, value in headers:
            kind = kind_of(name)
            if kind is None:
                kind = _name_kind(name)
            if kind:
                if kind == _K_HOST and hosts is None:
                    hosts = value
                elif kind == _K_CONNECTION and conns is None:
                    conns = value
                else:  # framing, Upgrade, Expect, "_", or a repeated Host / Connection
                    return None
        if hosts is None:
            return None
        host = _check_host(hosts)
        if host is None:
            return None
        tokens = _NO_TOKENS if conns is None else _connection_tokens([conns])
        if tokens is None:
            return None
        q = target.find(b"?")
        if q < 0:
            path = target
            query = b""
        else:
            path = target[:q]
            query = target[q + 1 :]
        self._state = _DONE
        return RequestHead(
            method, target, path, query, version, headers, host, None, False,
            b"close" not in tokens and (version == 11 or b"keep-alive" in tokens), None, False,
            tokens,
        )

    def _parse_head(self, buf: bytearray, pos: int, line_end: int, end: int) -> RequestHead:
        m = _REQUEST_LINE_RE.fullmatch(buf, pos, line_end)
        headers = _split_fields(buf, line_end + 2, end + 2)
        if m is None or headers is None:
            raise self._head_error(buf, pos, line_end, end, "request line")
        if len(headers) > self._max_headers:
            raise HTTPError(431, "more than %d header fields" % self._max_headers)
        method, target, version_b = m.groups()
        if version_b == b"1.1":
            version = 11
        elif version_b == b"1.0":
            version = 10
        else:
            # Also "PRI * HTTP/2.0", the HTTP/2 prior-knowledge preface: we speak HTTP/1.x only.
            raise HTTPError(505, "HTTP version not supported")

        # One pass over the fields: collect the few that matter, flag "_" names.
        special = None
        underscore = False
        kind_of = _name_kinds.get
        for name, value in headers:
            kind = kind_of(name)
            if kind is None:
                kind = _name_kind(name)
            if kind:
                if kind < 0:
                    underscore = True
                elif special is None:
                    special = [(kind, value)]
                else:
                    special.append((kind, value))
        hosts = cls = tes = conns = upgrades = expects = None
        if special is not None:
            for kind, value in special:
                if kind == _K_HOST:
                    if hosts is not None:
                        raise HTTPError(400, "more than one Host header")  # RFC 9112 §3.2
                    hosts = value
                elif kind == _K_CL:
                    cls = [value] if cls is None else cls + [value]
                elif kind == _K_TE:
                    tes = [value] if tes is None else tes + [value]
                elif kind == _K_CONNECTION:
                    conns = [value] if conns is None else conns + [value]
                elif kind == _K_UPGRADE:
                    upgrades = [value] if upgrades is None else upgrades + [value]
                else:
                    expects = [value] if expects is None else expects + [value]
        if cls is not None or tes is not None:
            # Framing is reported as content_length/chunked; the fields themselves are dropped so
            # that nothing can forward them (the serializers add the one framing header).
            drop = underscore and self._drop_underscore
            headers = [
                h for h in headers
                if h[0].lower() not in _FRAMING_NAMES and not (drop and b"_" in h[0])
            ]
        elif underscore and self._drop_underscore:
            headers = [h for h in headers if b"_" not in h[0]]

        # request-target forms, RFC 9112 §3.2.
        authority = None
        first = target[0]
        if first == 47:  # "/": origin-form
            if method == b"CONNECT":
                raise HTTPError(400, "CONNECT needs an authority-form target")
            q = target.find(b"?")
            if q < 0:
                path = target
                query = b""
            else:
                path = target[:q]
                query = target[q + 1 :]
        elif method == b"CONNECT":  # authority-form, §3.2.3
            authority = _check_host(target, require_port=True)
            if authority is None:
                raise HTTPError(400, "invalid CONNECT target")
            path = query = b""
        elif target == b"*":  # asterisk-form, §3.2.4
            if method != b"OPTIONS":
                raise HTTPError(400, "asterisk-form target is only for OPTIONS")
            path = target
            query = b""
        else:  # absolute-form, §3.2.2
            am = _ABSOLUTE_RE.fullmatch(target)
            if am is None:
                raise HTTPError(400, "invalid request target")
            auth, path, query = am.groups()
            # RFC 9110 §4.2.1: an http(s) URI with an empty host is invalid.
            authority = _check_host(auth) if auth else None
            if authority is None:
                raise HTTPError(400, "invalid authority in request target")
            if not path:
                path = b"/"
            if query is None:
                query = b""

        # Host, RFC 9112 §3.2: required in HTTP/1.1, exactly one, valid. For absolute-form and
        # authority-form the target's authority replaces it (§3.2.2).
        if hosts is None:
            if version == 11:
                raise HTTPError(400, "missing Host header")
            host = authority if authority is not None else b""
        else:
            host = _check_host(hosts)  # type: ignore[arg-type]
            if host is None:
                raise HTTPError(400, "invalid Host header")
            if authority is not None:
                host = authority

        # Framing, RFC 9112 §6.1-6.3.
        content_length = None
        chunked = False
        if tes is not None:
            if cls is not None:
                # RFC 9112 §6.1 lets a server process TE and close after the response; an
                # intermediary that forwards anything at all on such a request is the classic
                # CL.TE / TE.CL desync, so refuse.
                raise HTTPError(400, "both Content-Length and Transfer-Encoding")
            if version == 10:
                raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")  # §6.1
            codings = _split_tokens(tes)
            if not codings:
                raise HTTPError(400, "invalid Transfer-Encoding")
            if codings.count(b"chunked") > 1:
                raise HTTPError(400, "chunked applied more than once")  # §7.1: MUST NOT
            if codings[-1] != b"chunked":
                raise HTTPError(400, "final transfer coding is not chunked")  # §6.3 rule 4
            if len(codings) > 1:
                # We would have to forward the coding undecoded with a new framing; we don't.
                raise HTTPError(501, "unsupported transfer coding")
            chunked = True
        elif cls is not None:
            content_length = _parse_content_length(cls)
            if content_length is None:
                raise HTTPError(400, "invalid Content-Length")
            if self._max_body is not None and content_length > self._max_body:
                raise HTTPError(413, "body larger than %d bytes" % self._max_body)
        if method == b"CONNECT" and (chunked or content_length):
            # After a CONNECT head the bytes belong to the tunnel; a body would be ambiguous.
            raise HTTPError(400, "CONNECT request with a body")

        tokens = _NO_TOKENS if conns is None else _connection_tokens(conns)
        if tokens is None:
            raise HTTPError(400, "invalid Connection header")
        keep_alive = b"close" not in tokens and (version == 11 or b"keep-alive" in tokens)
        upgrade = None
        if (upgrades is not None and version == 11 and b"upgrade" in tokens
                and method == b"GET" and not chunked and not content_length):
            # RFC 9110 §7.8: Upgrade only counts when listed in Connection, never in HTTP/1.0.
            # Only a bodiless GET offering "websocket" (RFC 6455 §4.1) becomes a tunnel.
            upgrade = _websocket_offer(upgrades)
        expect_continue = False
        if expects is not None and version == 11:
            # RFC 9110 §10.1.1: ignore 100-continue from HTTP/1.0; other expectations ignored.
            expect_continue = b"100-continue" in (_split_tokens(expects) or ())

        if chunked:
            self._state = _CHUNK_LINE
            self._scan = end + 4
        elif content_length:
            self._state = _LENGTH
            self._remaining = content_length
        else:
            self._state = _END  # RFC 9112 §6.3 rule 7: no framing, no body
        return RequestHead(
            method, target, path, query, version, headers, host, content_length, chunked,
            keep_alive, upgrade, expect_continue, tokens,
        )


class ResponseParser(_Parser):
    """Parse responses from an upstream connection. Call set_request_method() before each
    response; a response arriving with no request outstanding is an error.

    Events: ResponseHead (interim 1xx heads are returned as they come, each followed directly by
    the next head, except 101 which ends the message - the rest of the stream is the tunnel),
    body bytes, EndOfMessage, then PAUSED until start_next().
    """

    __slots__ = ("_method",)
    _REQUEST = False
    _START_RE = _STATUS_LINE_RE
    _START_WHAT = "status line"
    _START_BYTES = _RESPONSE_START_BYTES

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

    def parse_whole(self, data: bytes) -> tuple[ResponseHead, bytes] | None:
        """Fast path, as ``RequestParser.parse_whole``: ``data`` is exactly one complete
        response with a Content-Length body (the usual small keep-alive answer). Returns (head,
        body) - the message is then complete (next: PAUSED, ``start_next``) - or None with
        nothing consumed (then ``feed`` + ``next_event``). Same regexes and checks as the general
        path; anything else (1xx, 204, 304, HEAD or CONNECT requests, chunked or close-delimited
        bodies, repeated Content-Length or Connection, a body still to come or bytes after it,
        any error) returns None and goes the general way."""
        method = self._method
        if method is None or method == b"HEAD" or method == b"CONNECT":
            return None
        whole = self._whole_head(data, _STATUS_LINE_RE)
        if whole is None:
            return None
        (version_b, status_b, reason), headers, end = whole
        version = _WHOLE_VERSIONS.get(version_b)
        if version is None:
            return None
        status = int(status_b)
        if status < 200 or status > 599 or status == 204 or status == 304:
            return None
        cl = conns = cl_item = None
        kind_of = _name_kinds.get
        for item in headers:
            kind = kind_of(item[0])
            if kind is None:
                kind = _name_kind(item[0])
            if kind > 0:  # most fields are plain (0) or merely carry "_" (-1)
                if kind == _K_CL:
                    if cl is not None:
                        return None
                    cl = item[1]
                    cl_item = item
                elif kind == _K_TE:
                    return None
                elif kind == _K_CONNECTION:
                    if conns is not None:
                        return None
                    conns = item[1]
        # 1*DIGIT, at most 19 digits and <= 2**63-1: what _parse_content_length accepts for a
        # single value (bytes.isdigit() is ASCII-only); a comma list goes the general way.
        if cl is None or not cl.isdigit() or len(cl) > 19:
            return None
        n = int(cl)
        if n > MAX_CONTENT_LENGTH or len(data) != end + 4 + n:
            return None
        tokens = _NO_TOKENS if conns is None else _connection_tokens([conns])
        if tokens is None:
            return None
        headers.remove(cl_item)  # framing is reported as content_length only (headers is ours)
        self._state = _DONE
        return (ResponseHead(status, reason or b"", version, headers, n, False,
                             _keep_alive(version, tokens), tokens),
                data[end + 4:])

    def _parse_head(self, buf: bytearray, pos: int, line_end: int, end: int) -> ResponseHead:
        m = _STATUS_LINE_RE.fullmatch(buf, pos, line_end)
        headers = _split_fields(buf, line_end + 2, end + 2)
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
        kind_of = _name_kinds.get
        for name, value in headers:
            kind = kind_of(name)
            if kind is None:
                kind = _name_kind(name)
            if kind == _K_CL:
                cls = [value] if cls is None else cls + [value]
            elif kind == _K_TE:
                tes = [value] if tes is None else tes + [value]
            elif kind == _K_CONNECTION:
                conns = [value] if conns is None else conns + [value]
        if cls is not None or tes is not None:
            headers = [h for h in headers if h[0].lower() not in _FRAMING_NAMES]

        # Framing is validated even where the status or method means "no body" (§6.3 rule 1):
        # a response that is malformed anyway is not one to keep the connection for.
        content_length = None
        chunked = False
        if tes is not None:
            if cls is not None:
                raise HTTPError(502, "both Content-Length and Transfer-Encoding")
            if version == 10:
                raise HTTPError(502, "Transfer-Encoding in an HTTP/1.0 response")
            codings = _split_tokens(tes)
            if codings != [b"chunked"]:
                # RFC 9112 §6.3 rule 4 would read a non-chunked coding until close; we could only
                # forward it undecoded under a framing of our own, so refuse (docs/http.md).
                raise HTTPError(502, "unsupported Transfer-Encoding in response")
            chunked = True
        elif cls is not None:
            content_length = _parse_content_length(cls)
            if content_length is None:
                raise HTTPError(502, "invalid Content-Length")
        tokens = _NO_TOKENS if conns is None else _connection_tokens(conns)
        if tokens is None:
            raise HTTPError(502, "invalid Connection header")

        head = ResponseHead(
            status, reason or b"", version, headers, content_length, chunked,
            _keep_alive(version, tokens), tokens,
        )
        kind = head.body_kind(self._method)  # type: ignore[arg-type]
        if status < 200:
            head.keep_alive = head.keep_alive and status != 101
            if status == 101:
                self._state = _END  # the rest of the stream belongs to the new protocol
            else:
                self._scan = end + 4  # interim response: the final head follows (RFC 9110 §15.2)
            return head
        if kind == "none":
            if self._method == b"CONNECT" and status < 300:
                head.keep_alive = False
            self._state = _END
        elif kind == "chunked":
            self._state = _CHUNK_LINE
            self._scan = end + 4
        elif kind == "length":
            if content_length:
                self._state = _LENGTH
                self._remaining = content_length
            else:
                self._state = _END
        else:
            head.keep_alive = False  # RFC 9112 §6.3 rule 8: the close delimits the body
            self._state = _CLOSE
        return head


# --------------------------------------------------------------------------------------------
# Serializers: canonical output only (CRLF, "Name: value", one framing header we choose).

LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; b"" for empty data (an empty chunk would end the body)."""
    n = len(data)
    if not n:
        return b""
    return b"".join((b"%x\r\n" % n, data, b"\r\n"))


def _serialize_fields(headers) -> bytes:
    fields = b"".join([name + b": " + value + b"\r\n" for name, value in headers])
    # One regex over the block validates every line; the LF count proves that no name or value
    # smuggled a line of its own ("a\r\nInjected: 1" would be two valid lines).
    if _FIELDS_OUT_RE.fullmatch(fields) is None or fields.count(b"\n") != len(headers):
        raise ValueError("invalid header field for serialization: %r" % (headers,))
    if _FRAMING_NAME_RE.search(fields) is not None:
        raise ValueError("Content-Length/Transfer-Encoding must be given as arguments")
    return fields


def _framing(content_length: int | None, chunked: bool) -> bytes:
    if chunked:
        if content_length is not None:
            raise ValueError("both content_length and chunked")
        return b"Transfer-Encoding: chunked\r\n"
    if content_length is None:
        return b""
    if not 0 <= content_length <= MAX_CONTENT_LENGTH:
        raise ValueError("content_length out of range")
    return b"Content-Length: %d\r\n" % content_length


def serialize_request_head(
    method: bytes, target: bytes, headers, *, content_length: int | None, chunked: bool
) -> bytes:
    """An HTTP/1.1 request head. ``headers`` must not hold Content-Length/Transfer-Encoding."""
    if _TOKEN_RE.fullmatch(method) is None:
        raise ValueError("invalid method %r" % (method,))
    if _TARGET_RE.fullmatch(target) is None:
        raise ValueError("invalid request target %r" % (target,))
    return b"".join(
        (
            method, b" ", target, b" HTTP/1.1\r\n", _serialize_fields(headers),
            _framing(content_length, chunked), b"\r\n",
        )
    )


def serialize_response_head(
    status: int, reason: bytes, headers, *, content_length: int | None, chunked: bool,
    version: int = 11,
) -> bytes:
    """A response head. ``version`` 10 is for answering HTTP/1.0 clients (no chunked then)."""
    if not 100 <= status <= 599:
        raise ValueError("invalid status %r" % (status,))
    if _REASON_RE.fullmatch(reason) is None:
        raise ValueError("invalid reason phrase %r" % (reason,))
    if version == 11:
        start = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    elif version == 10:
        if chunked:
            raise ValueError("chunked is not available in HTTP/1.0")
        start = b"HTTP/1.0 %d %s\r\n" % (status, reason)
    else:
        raise ValueError("invalid version %r" % (version,))
    return b"".join(
        (start, _serialize_fields(headers), _framing(content_length, chunked), b"\r\n")
    )


def serialize_trailers(trailers) -> bytes:
    """The last chunk with a trailer section: write it instead of LAST_CHUNK. Fields that may not
    be trailers (framing, routing, hop-by-hop, auth, content metadata) are dropped."""
    kept = [(n, v) for n, v in trailers if n.lower() not in _TRAILER_DROP]
    if not kept:
        return LAST_CHUNK
    fields = b"".join([name + b": " + value + b"\r\n" for name, value in kept])
    if _FIELDS_OUT_RE.fullmatch(fields) is None or fields.count(b"\n") != len(kept):
        raise ValueError("invalid trailer field for serialization: %r" % (trailers,))
    return b"0\r\n" + fields + b"\r\n"
