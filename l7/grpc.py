"""gRPC over the L7 proxy: what the proxy itself has to know about it. Pure functions and tables.

The proxy forwards gRPC calls as ordinary HTTP/2 requests (trailers included); only three things
are gRPC-specific, all here:

* Answers made by the proxy (no route, no endpoint, a reset or timed-out upstream ...) go to a
  gRPC client as a *trailers-only* response: one HEADERS frame with ``:status 200``,
  ``content-type: application/grpc``, ``grpc-status`` and ``grpc-message``, END_STREAM set.
  A gRPC client reads its status from there; an HTTP error status would be mapped by the
  client library itself, losing the reason. ``STATUS_FOR_HTTP`` is the mapping of the gRPC
  project's "HTTP to gRPC Status Code Mapping" document, with two choices of ours: 504 made by
  the proxy is its own deadline (``DEADLINE_EXCEEDED``, the call ran out of time here) and 413
  is ``RESOURCE_EXHAUSTED``.
* ``grpc-timeout`` (``1*8DIGIT unit``, units H M S m u n) bounds the call's upstream attempts
  (``parse_timeout``).
* Metric labels: a call is counted by the gRPC service and method *of the route that matched*
  (``route_labels``), so a client inventing paths cannot create new series.
"""

from __future__ import annotations

from urllib.parse import quote

__all__ = [
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "UNAUTHENTICATED",
    "STATUS_FOR_HTTP", "is_grpc", "parse_timeout", "status_for", "trailers_only", "route_labels", "status_label",
]

OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = 7, 8, 12, 13, 14, 16

# HTTP status of an answer made by the proxy -> grpc-status (see the module docstring).
STATUS_FOR_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    405: UNIMPLEMENTED,
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    429: UNAVAILABLE,
    431: RESOURCE_EXHAUSTED,
    500: INTERNAL,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}

# grpc-timeout units in seconds (gRPC over HTTP/2, "Timeout").
_UNITS = {72: 3600.0, 77: 60.0, 83: 1.0, 109: 1e-3, 117: 1e-6, 110: 1e-9}   # H M S m u n
# The ceiling we apply: 8 digits of hours is 11,000 years; nothing needs more than this.
_MAX_TIMEOUT = 100_000_000.0


def is_grpc(content_type: bytes | None) -> bool:
    """``application/grpc`` and its ``+proto`` / ``+json`` / ``;params`` variants."""
    return content_type is not None and content_type[:16].lower() == b"application/grpc"


def parse_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` value, or None when it is not valid (then it is ignored,
    as the gRPC libraries do)."""
    if not 2 <= len(value) <= 9:
        return None
    unit = _UNITS.get(value[-1])
    digits = value[:-1]
    if unit is None or not digits.isdigit():
        return None
    return min(int(digits) * unit, _MAX_TIMEOUT)


def status_for(http_status: int) -> int:
    return STATUS_FOR_HTTP.get(http_status, UNKNOWN)


def _message(body: bytes) -> bytes:
    # grpc-message is percent-encoded (only printable ASCII but "%" travels as is).
    text = body.decode("utf-8", "replace").strip()
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def trailers_only(http_status: int, body: bytes, grpc_status: int | None = None) -> list[tuple[bytes, bytes]]:
    """The header block of a trailers-only response for an answer the proxy made with
    ``http_status`` and the text ``body`` (``:status`` first)."""
    code = status_for(http_status) if grpc_status is None else grpc_status
    return [(b":status", b"200"), (b"content-type", b"application/grpc"),
            (b"grpc-status", b"%d" % code), (b"grpc-message", _message(body))]


def route_labels(route) -> tuple[str, str]:
    """(gRPC service, method) labels of a call matched by ``route``: what the route names
    (an exact "/service/method" path, or a "/service" prefix), else ("", "")."""
    if route is None:
        return "", ""
    path = route.path
    kind = route.path_kind
    if kind == "Exact" and path.count("/") == 2:
        service, _, method = path[1:].partition("/")
        return service, method
    if kind == "Prefix":
        path = path.rstrip("/")
        if len(path) > 1 and path.count("/") == 1:
            return path[1:], ""
    return "", ""


def status_label(value: bytes | None) -> str:
    """A grpc-status value as a bounded label: "0".."16", "other" or "none"."""
    if value is None:
        return "none"
    if value.isdigit() and len(value) <= 2 and int(value) <= 16:
        return str(int(value))
    return "other"
