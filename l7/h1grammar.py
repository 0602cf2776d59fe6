"""The HTTP/1.1 grammar the parsers check, as compiled patterns, limits and field helpers.

RFC 9110 §5.6.2 tokens, §5.5 field values, §5.6.4 quoted strings; RFC 9112 §3 (request line), §4
(status line), §5 (field lines), §7.1 (chunks). Every line is matched whole by one precompiled
pattern; the character classes exclude CR, LF, NUL and the other CTLs, so a bare CR or LF anywhere
fails its line. The caches here are bounded (``CACHE_LIMIT``). docs/http.md has the rule table.
"""

from __future__ import annotations

import ipaddress
import re

# --------------------------------------------------------------------------------------------
# Limits. Each is far above what real clients send and low enough to bound work per connection.

# Content-Length and the running chunked total must fit a signed 64-bit integer, like every
# other proxy on the path (nginx, HAProxy, Envoy use off_t / int64); 19 digits max.
MAX_CONTENT_LENGTH = 2**63 - 1
# RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request-line (old
# clients send a CRLF after a POST body). Ignore a few, refuse a stream of them.
MAX_LEADING_EMPTY_LINES = 4
# chunk-size is at most 16 HEXDIG (64 bits); a longer size is refused, not truncated.
MAX_CHUNK_SIZE_DIGITS = 16
# chunk-size line (size + extensions) and the sum of extension bytes per message: extensions are
# parsed and dropped, so without a bound they are free bandwidth for a client (CVE-2024-22019).
MAX_CHUNK_LINE = 4096
MAX_CHUNK_EXT_TOTAL = 16384

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
FIELDS_OUT_RE = re.compile(rb"(?:" + _TOKEN + rb": " + _FIELD_VALUE + rb"\r\n)*")
FRAMING_NAME_RE = re.compile(rb"^(?:content-length|transfer-encoding):", re.I | re.M)

# request-line = method SP request-target SP HTTP-version (RFC 9112 §3). The target is any run of
# visible ASCII except "#" (a fragment is never part of a request-target); the form is checked
# afterwards. HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive (§2.3).
REQUEST_LINE_RE = re.compile(
    rb"(" + _TOKEN + rb") ([\x21\x22\x24-\x7e]+) HTTP/([0-9]\.[0-9])"
)
# status-line = HTTP-version SP status-code SP [ reason-phrase ] (RFC 9112 §4). We also take a
# line that ends right after the status code: common in the wild, and the reason is ignorable.
STATUS_LINE_RE = re.compile(
    rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?"
)
REASON_RE = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")
TOKEN_RE = re.compile(_TOKEN)
# Bytes a head may start with: a method's first tchar (request) or the "H" of "HTTP/" (response),
# or CR/LF (empty lines before the start line, or a bad line end: decided by its own rule).
REQUEST_START_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                                 b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n")
RESPONSE_START_BYTES = frozenset(b"H\r\n")
TARGET_RE = re.compile(rb"[\x21\x22\x24-\x7e]+")

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
# with _HOST_RE, the rest was checked by TARGET_RE.
ABSOLUTE_RE = re.compile(rb"[hH][tT][tT][pP][sS]?://([^/?]*)([^?]*)(?:\?(.*))?", re.S)

_DIGITS_RE = re.compile(rb"[0-9]{1,19}")
_QUOTED = rb'"(?:[\t !\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] )
# (RFC 9112 §7.1.1); the value is a token or a quoted-string.
CHUNK_LINE_RE = re.compile(
    rb"([0-9A-Fa-f]{1,%d})" % MAX_CHUNK_SIZE_DIGITS
    + rb"(?:[ \t]*;[ \t]*" + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)
HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
HEX_PREFIX_RE = re.compile(rb"[0-9A-Fa-f]+")
# A bare CR (CR not followed by LF) or a lone LF (LF not preceded by CR).
BAD_EOL_RE = re.compile(rb"\r[^\n]|(?<!\r)\n")

# Header names the head interpretation looks at (compared lowercased).
_K_PLAIN, K_HOST, K_CL, K_TE, K_CONNECTION, K_UPGRADE, _K_EXPECT = range(7)
_K_UNDERSCORE = -1
_SPECIAL = {
    b"host": K_HOST,
    b"content-length": K_CL,
    b"transfer-encoding": K_TE,
    b"connection": K_CONNECTION,
    b"upgrade": K_UPGRADE,
    b"expect": _K_EXPECT,
}
# Raw field name -> kind. Clients repeat the same few dozen names, so one dict hit replaces a
# lower() + lookup + "_" scan per field. Bounded: past the limit names are classified uncached,
# so a client inventing names cannot grow it. Same for validated Host values.
_CACHE_LIMIT = 4096
name_kinds: dict[bytes, int] = {}
_host_cache: dict[bytes, bytes | None] = {}
_connection_cache: dict[bytes, frozenset[bytes] | None] = {}

# Fields that must not come from a trailer section (RFC 9110 §6.5.1): framing, routing,
# hop-by-hop, authentication and content metadata that a recipient would otherwise merge into the
# head. They are dropped on parse and on serialize.
TRAILER_DROP = frozenset(
    (
        b"content-length", b"transfer-encoding", b"trailer", b"host", b"connection",
        b"keep-alive", b"proxy-connection", b"te", b"upgrade", b"expect", b"max-forwards",
        b"authorization", b"proxy-authorization", b"proxy-authenticate", b"www-authenticate",
        b"cookie", b"set-cookie", b"content-encoding", b"content-type", b"content-range",
        b"range", b"cache-control", b"pragma", b"age", b"expires", b"date", b"location",
        b"retry-after", b"vary",
    )
)

FRAMING_NAMES = frozenset((b"content-length", b"transfer-encoding"))

# The only protocol a request may switch to through the proxy (docs/http.md "Upgrade"). Anything
# else - above all "h2c", whose upgraded connection would carry HTTP/2 requests for any path
# straight to the pod, past the routing rules - is a plain request with Upgrade removed.
_TUNNEL_PROTOCOL = b"websocket"
NO_TOKENS: frozenset[bytes] = frozenset()
# The versions the fast paths take (anything else goes the general way).
WHOLE_VERSIONS = {b"1.1": 11, b"1.0": 10}


# --------------------------------------------------------------------------------------------
# Field helpers shared by both directions.


def split_fields(buf, start: int, end: int) -> list[tuple[bytes, bytes]] | None:
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


def split_fields_fast(buf: bytes, start: int, end: int) -> list[tuple[bytes, bytes]] | None:
    """split_fields for the fast paths, without the regex engine: the same grammar, checked as
    (1) no byte outside _FIELD_BLOCK_BYTES (so values hold VCHAR / obs-text / SP / HTAB only),
    (2) every CR is followed by LF and every LF preceded by CR (equal counts of CR, LF, CRLF),
    (3) each line is "name:value" with name a token: a name already in ``name_kinds`` is one
    (that cache is only ever filled with names that passed this check or _FIELD_LINE_RE),
    others go through TOKEN_RE. obs-fold and "name : v" fail (3): the name would hold SP/HTAB.
    Values are OWS-stripped like split_fields does. None: not that simple - the caller falls
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
    known = name_kinds
    out = []
    append = out.append
    for line in block[:-2].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        if name not in known and TOKEN_RE.fullmatch(name) is None:
            return None
        append((name, value.strip(b" \t")))
    return out


def scan_request_whole(data: bytes, max_head: int, max_headers: int):
    """The scanning half of ``RequestParser.parse_whole``: is ``data`` exactly one request head
    (nothing after its blank line) within the limits, with a request line REQUEST_LINE_RE
    accepts (HTTP/1.1 or 1.0, origin-form, not CONNECT), field lines split_fields_fast accepts,
    exactly one Host, at most one Connection, and no other field the head interpretation
    looks at (framing, Upgrade, Expect, a "_" in a name)? Returns (method, target, version,
    fields, Host value, Connection value or None), else None. Pure: the parser's state and
    the Host / Connection checks are the caller's."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 != len(data) or end + 4 > max_head:
        return None
    line_end = data.find(b"\r\n")
    m = REQUEST_LINE_RE.fullmatch(data, 0, line_end)
    if m is None:
        return None
    method, target, version_b = m.groups()
    version = WHOLE_VERSIONS.get(version_b)
    if version is None or target[0] != 47 or method == b"CONNECT":  # origin-form only
        return None
    headers = split_fields_fast(data, line_end + 2, end + 2)
    if headers is None or len(headers) > max_headers:
        return None
    hosts = conns = None
    kind_of = name_kinds.get
    for name, value in headers:
        kind = kind_of(name)
        if kind is None:
            kind = name_kind(name)
        if kind:
            if kind == K_HOST and hosts is None:
                hosts = value
            elif kind == K_CONNECTION and conns is None:
                conns = value
            else:  # framing, Upgrade, Expect, "_", or a repeated Host / Connection
                return None
    if hosts is None:
        return None
    return method, target, version, headers, hosts, conns


def scan_response_whole(data: bytes, max_head: int, max_headers: int):
    """The scanning half of ``ResponseParser.parse_whole``: is ``data`` exactly one final
    response (200-599 but 204 and 304, HTTP/1.1 or 1.0) with one Content-Length (1*DIGIT, at
    most 19 digits, at most MAX_CONTENT_LENGTH) and exactly that many body bytes after the
    head, at most one Connection and no Transfer-Encoding, every line as STATUS_LINE_RE /
    split_fields_fast accept it? Returns (version, status, reason, fields without the
    Content-Length field, body length, Connection value or None, offset of the blank line),
    else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > max_head:
        return None
    line_end = data.find(b"\r\n")
    m = STATUS_LINE_RE.fullmatch(data, 0, line_end)
    if m is None:
        return None
    version_b, status_b, reason = m.groups()
    version = WHOLE_VERSIONS.get(version_b)
    if version is None:
        return None
    status = int(status_b)
    if status < 200 or status > 599 or status == 204 or status == 304:
        return None
    headers = split_fields_fast(data, line_end + 2, end + 2)
    if headers is None or len(headers) > max_headers:
        return None
    cl = conns = cl_item = None
    kind_of = name_kinds.get
    for item in headers:
        kind = kind_of(item[0])
        if kind is None:
            kind = name_kind(item[0])
        if kind > 0:  # most fields are plain (0) or merely carry "_" (-1)
            if kind == K_CL:
                if cl is not None:
                    return None
                cl = item[1]
                cl_item = item
            elif kind == K_TE:
                return None
            elif kind == K_CONNECTION:
                if conns is not None:
                    return None
                conns = item[1]
    # 1*DIGIT, at most 19 digits and <= 2**63-1: what parse_content_length accepts for a
    # single value (bytes.isdigit() is ASCII-only); a comma list goes the general way.
    if cl is None or not cl.isdigit() or len(cl) > 19:
        return None
    n = int(cl)
    if n > MAX_CONTENT_LENGTH or len(data) != end + 4 + n:
        return None
    headers.remove(cl_item)  # framing is reported as content_length only (headers is ours)
    return version, status, reason or b"", headers, n, conns, end


# In the compiled twin (l7.compiled, built from this very file) the three functions above are
# replaced by their C versions (l7/compiled/_h1scan.pyx: the same inputs accepted, the same
# results; the Python ones stay for input that is not ``bytes``). The pure package has no
# ``_h1scan``: the import fails there and the Python functions stay.
try:
    from ._h1scan import with_fallback as _c_version
except ImportError:
    _c_version = None
if _c_version is not None:
    split_fields_fast = _c_version(split_fields_fast)
    scan_request_whole = _c_version(scan_request_whole)
    scan_response_whole = _c_version(scan_response_whole)


def diagnose_fields(block: bytes, what: str) -> str:
    """Slow path: name the first problem in a field block that split_fields refused."""
    if block[:1] == b"\n" or BAD_EOL_RE.search(block) is not None:
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
        if TOKEN_RE.fullmatch(name) is None:
            return "invalid character in header name"
        if _FIELDS_RE.fullmatch(line + b"\r\n") is None:
            return "invalid character in header value"
    return "malformed header section"


def name_kind(name: bytes) -> int:
    kind = _SPECIAL.get(name.lower(), _K_PLAIN)
    if not kind and b"_" in name:
        kind = _K_UNDERSCORE
    if len(name_kinds) < _CACHE_LIMIT:
        name_kinds[name] = kind
    return kind


def parse_content_length(values: list[bytes]) -> int | None:
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


def split_tokens(values: list[bytes]) -> list[bytes] | None:
    """A #token list (RFC 9110 §5.6.1), lowercased; empty members are ignored as the RFC
    requires. None if a member is not a token."""
    out = []
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if not part:
                continue
            if TOKEN_RE.fullmatch(part) is None:
                return None
            out.append(part.lower())
    return out


def parse_connection_tokens(values: list[bytes]) -> frozenset[bytes] | None:
    """Connection field value(s) -> lowercased option set (None if a member is not a token).
    A single value is cached: clients send the same "keep-alive" / "close" every time."""
    if len(values) == 1:
        try:
            return _connection_cache[values[0]]
        except KeyError:
            pass
    tokens = split_tokens(values)
    result = None if tokens is None else frozenset(tokens)
    if len(values) == 1 and len(_connection_cache) < _CACHE_LIMIT:
        _connection_cache[values[0]] = result
    return result


def websocket_offer(values: list[bytes]) -> bytes | None:
    """The "websocket" member of Upgrade field value(s), as spelt (case-insensitive match on a
    bare protocol-name, RFC 9110 §7.8 / RFC 6455 §4.1), or None when it is not offered."""
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if part.lower() == _TUNNEL_PROTOCOL:
                return part
    return None


def check_host(value: bytes, require_port: bool = False) -> bytes | None:
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



def message_keep_alive(version: int, tokens: frozenset[bytes]) -> bool:
    # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive".
    if b"close" in tokens:
        return False
    return version == 11 or b"keep-alive" in tokens
