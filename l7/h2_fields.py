"""HTTP/2 header blocks <-> the heads and field lists the exchange works with. Pure functions.

The exchange reads request heads with the attributes of ``l7.http1.RequestHead`` and response
heads with those of ``l7.http1.ResponseHead``, and hands the shells field lists in HTTP/1.1
form (``Host`` included, names as spelt). These functions translate, keeping the rules of
RFC 9113 §8 on top of what the ``h2`` package checks already (it refuses connection-specific
fields, ``te`` other than ``trailers``, bad pseudo-header fields, upper-case names, CR / LF /
NUL in values, a Host differing from ``:authority``, and a body longer or shorter than its
content-length):

* ``:authority`` (else Host) is validated like an HTTP/1.1 Host field and forwarded as Host;
  ``:path`` must be origin-form (``*`` for OPTIONS) with the characters an HTTP/1.1 target may
  hold; the route lookup normalises it like any path.
* A request whose HEADERS frame does not end the stream has a body; without content-length it
  is forwarded to an HTTP/1.1 pod with chunked framing (``chunked`` is True).
* Fields whose name holds "_" are dropped, as from HTTP/1.1 clients.
* Towards HTTP/2 peers every name is lower-cased, ``Host`` becomes ``:authority``, and the
  ``te: trailers`` of a gRPC call is kept (the only ``te`` HTTP/2 allows; gRPC servers want it).
"""

from __future__ import annotations

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from hyperframe.frame import GoAwayFrame

from . import grpc
from .h1events import HTTPError, RequestHead
from .h1grammar import TARGET_RE, TRAILER_DROP, check_host, parse_content_length

__all__ = ["H2Conn", "send_window", "H2RequestHead", "valid_origin_target", "H2ResponseHead", "request_head", "response_block", "trailer_block",
           "request_block", "response_head", "NO_TOKENS"]

NO_TOKENS: frozenset[bytes] = frozenset()


def send_window(conn: H2Connection, sid: int, st) -> tuple[bool, bool]:
    """Hand ``conn`` what of ``st.out`` (a list of byte chunks) the stream's window and the
    peer's frame size allow, END_STREAM on the last chunk when ``st.ended`` and no trailers
    follow; ``st.out_bytes`` goes down by what was sent. Returns (anything sent, stream ended).
    Both shells' streams (client side and pod side) go through here."""
    out = st.out
    window = conn.local_flow_control_window(sid)
    size = conn.max_outbound_frame_size
    wrote = False
    while out and window > 0:
        chunk = out[0]
        n = len(chunk)
        if n > window or n > size:
            k = window if window < size else size
            out[0] = chunk[k:]
            chunk = chunk[:k]
            n = k
        else:
            out.pop(0)
        last = not out and st.ended and not st.trailers
        conn.send_data(sid, chunk, end_stream=last)
        st.out_bytes -= n
        window -= n
        wrote = True
        if last:
            return True, True
    return wrote, False


class H2Conn(H2Connection):
    """``h2``'s connection with graceful GOAWAY both ways. ``h2`` closes its state machine on
    sending or receiving GOAWAY, after which no frame of a stream in flight may pass; RFC 9113
    §6.8 wants those streams to finish. So a received GOAWAY only reports
    ``ConnectionTerminated`` (the shells stop opening streams on that connection and close it
    when its streams are done), and ``goaway`` sends one without closing."""

    # How many closed stream ids ``h2`` remembers per connection (to tell a late frame on a
    # closed stream from a protocol error): 4,096 instead of its 65,536, which cost ~10 MiB per
    # long-lived connection (a pooled pod connection closes millions of streams). A late frame
    # for a stream forgotten earlier is still only a stream error (RST_STREAM).
    MAX_CLOSED_STREAMS = 1 << 12

    def _receive_goaway_frame(self, frame):
        ev = ConnectionTerminated()
        try:
            ev.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            ev.error_code = frame.error_code
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]

    def goaway(self, error_code: int, last_stream_id: int, data: bytes = b"") -> None:
        self._prepare_for_sending([GoAwayFrame(stream_id=0, last_stream_id=last_stream_id,
                                               error_code=error_code, additional_data=data)])
_TE_TRAILERS = (b"te", b"trailers")
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
_EXPECT = b"expect"


class H2RequestHead(RequestHead):
    """A request head from an HTTP/2 stream (``version`` 20). ``grpc``: the content-type is
    application/grpc*; ``grpc_timeout``: seconds of its grpc-timeout, or None; ``te_trailers``:
    the client sent ``te: trailers``."""

    __slots__ = ("grpc", "grpc_timeout", "te_trailers")


def valid_origin_target(target: bytes) -> bool:
    """``:path`` in origin-form with the characters an HTTP/1.1 request-target may hold."""
    return target[:1] == b"/" and TARGET_RE.fullmatch(target) is not None


def request_head(block: list[tuple[bytes, bytes]], end_stream: bool, max_headers: int,
                 max_body: int | None) -> H2RequestHead:
    """The head of a request from its (h2-validated) header block. Raises HTTPError (status and
    reason) for what is refused."""
    method = path = authority = host = None
    headers: list[tuple[bytes, bytes]] = []
    cls = None
    ctype = None
    timeout = None
    te = expect = False
    for name, value in block:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            # :scheme is not used: the scheme is the listener's (as for HTTP/1.1 clients).
            continue
        if b"_" in name:
            continue
        if name == b"host":
            host = value
            continue
        if name == b"content-length":
            cls = [value] if cls is None else cls + [value]
            continue
        if name == b"te":
            te = True      # h2 let only "trailers" through
            continue
        if name == b"content-type":
            ctype = value
        elif name == b"grpc-timeout":
            timeout = grpc.parse_timeout(value)
        elif name == _EXPECT:
            expect = value.lower() == b"100-continue"
            continue
        headers.append((name, value))
    if len(headers) > max_headers:
        raise HTTPError(431, "more than %d header fields" % max_headers)
    if method is None:
        raise HTTPError(400, "missing :method")
    if method == b"CONNECT":
        # Extended CONNECT (RFC 8441) is not offered; a plain CONNECT is answered 405 by the
        # exchange, as for HTTP/1.1 clients.
        target = path = query = b""
    elif path is None:
        raise HTTPError(400, "missing :path")
    elif path == b"*":
        if method != b"OPTIONS":
            raise HTTPError(400, "asterisk-form target is only for OPTIONS")
        target = path
        query = b""
    else:
        if not valid_origin_target(path):
            raise HTTPError(400, "invalid :path")
        target = path
        q = path.find(b"?")
        if q >= 0:
            path, query = path[:q], path[q + 1:]
        else:
            query = b""
    raw_host = authority if authority is not None else host
    if raw_host is None:
        raise HTTPError(400, "missing :authority")
    checked = check_host(raw_host)
    if checked is None:
        raise HTTPError(400, "invalid :authority" if authority is not None else "invalid Host header")
    # Forwarded as the Host field (first, where HTTP/1.1 clients put it).
    headers.insert(0, (b"host", raw_host))
    content_length = None
    if cls is not None:
        content_length = parse_content_length(cls)
        if content_length is None:
            raise HTTPError(400, "invalid content-length")
        if max_body is not None and content_length > max_body:
            raise HTTPError(413, "body larger than %d bytes" % max_body)
        if end_stream and content_length:
            raise HTTPError(400, "content-length without a body")
    chunked = not end_stream and content_length is None
    head = H2RequestHead(method, target, path, query, 20, headers, checked, content_length, chunked,
                         True, None, expect and not end_stream, NO_TOKENS)
    head.grpc = grpc.is_grpc(ctype)
    head.grpc_timeout = timeout if head.grpc else None
    head.te_trailers = te
    return head


def response_block(status: int, fields: list, content_length: int | None) -> list[tuple[bytes, bytes]]:
    """A response head for an HTTP/2 client: ``fields`` (HTTP/1.1 spelling, hop-by-hop fields
    removed by the exchange) lower-cased after ``:status``."""
    out = [(b":status", b"%d" % status)]
    out += [(n.lower(), v) for n, v in fields]
    if content_length is not None:
        out.append((b"content-length", b"%d" % content_length))
    return out


def trailer_block(trailers: list) -> list[tuple[bytes, bytes]]:
    """Trailer fields for an HTTP/2 peer: lower-cased, those that may not be trailers dropped."""
    out = []
    for n, v in trailers:
        n = n.lower()
        if n not in TRAILER_DROP and n[:1] != b":":
            out.append((n, v))
    return out


def request_block(method: bytes, target: bytes, scheme: bytes, fields: list, te_trailers: bool) -> list:
    """A request head for an HTTP/2 pod from the exchange's upstream fields: Host becomes
    :authority, names lower-cased."""
    out = [(b":method", method), (b":scheme", scheme), (b":path", target)]
    authority = None
    rest = []
    for n, v in fields:
        n = n.lower()
        if n == b"host":
            if authority is None:
                authority = v
            continue
        rest.append((n, v))
    if authority is not None:
        out.append((b":authority", authority))
    if te_trailers:
        out.append(_TE_TRAILERS)
    out += rest
    return out


def h1_head_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of a serialized HTTP/1.1 response head (status line first, framing fields
    left out: the caller frames the body itself)."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        if line:
            n, _, v = line.partition(b": ")
            if n.lower() not in _FRAMING:
                out.append((n, v))
    return out


def tail_fields(tail: bytes) -> list[tuple[bytes, bytes]]:
    """The per-request fields the exchange passes as HTTP/1.1 lines (``name: value\\r\\n``)."""
    out = []
    for line in tail.split(b"\r\n"):
        if line:
            n, _, v = line.partition(b": ")
            out.append((n.lower(), v))
    return out


class H2ResponseHead:
    """A response head from an HTTP/2 pod, with the attributes of ``l7.http1.ResponseHead``.
    ``content_length`` is 0 when the HEADERS frame ended the stream (a trailers-only gRPC
    response, a 204 ...): the body is known to be empty."""

    __slots__ = ("status", "reason", "version", "headers", "content_length", "chunked", "keep_alive",
                 "connection_tokens")

    def __init__(self, status: int, reason: bytes, headers: list, content_length: int | None) -> None:
        self.status = status
        self.reason = reason
        self.version = 20
        self.headers = headers
        self.content_length = content_length
        self.chunked = False
        self.keep_alive = True
        self.connection_tokens = NO_TOKENS

    def body_kind(self, request_method: bytes) -> str:
        status = self.status
        if request_method == b"HEAD" or status < 200 or status == 204 or status == 304:
            return "none"
        if self.content_length is not None:
            return "length"
        return "close"   # delimited by END_STREAM: chunked towards an HTTP/1.1 client


def response_head(block: list[tuple[bytes, bytes]], end_stream: bool, reasons: dict) -> H2ResponseHead:
    """The head of a pod's HTTP/2 response. Raises HTTPError(502) when it is unusable."""
    status = None
    headers = []
    cls = None
    for name, value in block:
        if name == b":status":
            status = value
        elif name[:1] == b":":
            continue
        elif name == b"content-length":
            cls = [value] if cls is None else cls + [value]
        else:
            headers.append((name, value))
    if status is None or len(status) != 3 or not status.isdigit():
        raise HTTPError(502, "invalid :status from upstream")
    code = int(status)
    cl = None
    if cls is not None:
        cl = parse_content_length(cls)
        if cl is None:
            raise HTTPError(502, "invalid content-length from upstream")
    if end_stream and code >= 200:
        cl = 0 if cl is None else cl
    return H2ResponseHead(code, reasons.get(code, b""), headers, cl)
