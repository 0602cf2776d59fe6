"""Serializing HTTP/1.1: canonical output only (CRLF, "Name: value", one framing header we choose)."""

from __future__ import annotations

from .h1grammar import (
    FIELDS_OUT_RE,
    FRAMING_NAME_RE,
    MAX_CONTENT_LENGTH,
    REASON_RE,
    TARGET_RE,
    TOKEN_RE,
    TRAILER_DROP,
)

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
    if FIELDS_OUT_RE.fullmatch(fields) is None or fields.count(b"\n") != len(headers):
        raise ValueError("invalid header field for serialization: %r" % (headers,))
    if FRAMING_NAME_RE.search(fields) is not None:
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
    if TOKEN_RE.fullmatch(method) is None:
        raise ValueError("invalid method %r" % (method,))
    if TARGET_RE.fullmatch(target) is None:
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
    if REASON_RE.fullmatch(reason) is None:
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


# The proxy's own head serializers: the same bytes as serialize_request_head /
# serialize_response_head (HTTP/1.1) without their output validation (test_l7_unit.py::
# test_fast_serializers_match_http1). Safe because every input was validated by a parser
# (method, target, status, reason, each field) or is built by the proxy from validated parts
# (forwarding fields, route header edits checked when the route was compiled); the check costs
# more than the rest of the head building. Local answers still use the validating ones.

_CHUNKED_FIELD = b"Transfer-Encoding: chunked\r\n"
_FIELD_JOIN = b": ".join   # ("Name", "value") -> b"Name: value": one C call per field


def request_head_bytes(method: bytes, target: bytes, fields, content_length: int | None,
                       chunked: bool) -> bytes:
    """A request head to a pod (always HTTP/1.1), framing given as arguments."""
    if chunked:
        framing = _CHUNKED_FIELD
    elif content_length is not None:
        framing = b"Content-Length: %d\r\n" % content_length
    else:
        framing = b""
    if fields:
        return b"".join((method, b" ", target, b" HTTP/1.1\r\n",
                         b"\r\n".join(map(_FIELD_JOIN, fields)), b"\r\n", framing, b"\r\n"))
    return b"".join((method, b" ", target, b" HTTP/1.1\r\n", framing, b"\r\n"))


def response_head_bytes(status: int, reason: bytes, fields, content_length: int | None,
                        chunked: bool) -> bytes:
    """A response head to a client (always HTTP/1.1), framing given as arguments."""
    if chunked:
        framing = _CHUNKED_FIELD
    elif content_length is not None:
        framing = b"Content-Length: %d\r\n" % content_length
    else:
        framing = b""
    if fields:
        return b"".join((b"HTTP/1.1 %d %s\r\n" % (status, reason),
                         b"\r\n".join(map(_FIELD_JOIN, fields)), b"\r\n", framing, b"\r\n"))
    return b"".join((b"HTTP/1.1 %d %s\r\n" % (status, reason), framing, b"\r\n"))


# In the compiled twin both are replaced by C versions (l7/compiled/_h1scan.pyx: one allocation,
# the same bytes; the Python ones stay for fields that are not tuples of bytes).
try:
    from ._h1scan import with_fallback as _c_version
except ImportError:
    _c_version = None
if _c_version is not None:
    request_head_bytes = _c_version(request_head_bytes)
    response_head_bytes = _c_version(response_head_bytes)


def serialize_trailers(trailers) -> bytes:
    """The last chunk with a trailer section: write it instead of LAST_CHUNK. Fields that may not
    be trailers (framing, routing, hop-by-hop, auth, content metadata) are dropped."""
    kept = [(n, v) for n, v in trailers if n.lower() not in TRAILER_DROP]
    if not kept:
        return LAST_CHUNK
    fields = b"".join([name + b": " + value + b"\r\n" for name, value in kept])
    if FIELDS_OUT_RE.fullmatch(fields) is None or fields.count(b"\n") != len(kept):
        raise ValueError("invalid trailer field for serialization: %r" % (trailers,))
    return b"0\r\n" + fields + b"\r\n"
