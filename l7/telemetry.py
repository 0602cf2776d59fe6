"""What an exchange reports: its request id, its trace, its access-log record.

The exchange calls three functions (docs/observability.md):

* ``begin_trace(ex)`` when a request arrives, with ``--otlp-endpoint``: the trace of the
  request (the exchange itself takes ``x-request-id`` as it came, or makes a new UUID4, and
  returns a generated one to the client unless the pod's response names one);
* ``upstream_tail(ex)`` for each upstream attempt: the per-request fields that end the upstream
  head (a generated ``x-request-id``, our ``traceparent`` / ``tracestate``), as bytes, so that
  the rest of a repeated head stays cached;
* ``finish(ex, status, duration)`` once, when the request is accounted: the access-log record
  and the end of the trace.
"""

from __future__ import annotations

from meshproxy.core.logformat import (
    FLAG_DOWNSTREAM_TERMINATION,
    FLAG_NO_HEALTHY_UPSTREAM,
    FLAG_NO_ROUTE,
    HttpRecord,
)

from .tracecontext import trace_headers

__all__ = ["begin_trace", "finish", "strip_trace_fields", "upstream_tail"]

_PROTOCOLS = {10: "HTTP/1.0", 11: "HTTP/1.1", 20: "HTTP/2"}
_TRACE_NAMES = frozenset((b"traceparent", b"tracestate"))


def begin_trace(ex) -> None:
    """Start the request's trace (tracing is on; the exchange found the request id)."""
    head = ex.head
    tp, ts = trace_headers(head.headers)
    down = ex.down
    ex.trace = ex.ctx.tracing.start_request(tp, ts, head.method, head.target, head.host, ex.t0,
                                            peer=(down.peer_ip, down.peer_port),
                                            scheme="https" if down.tls else "http",
                                            protocol=_PROTOCOLS.get(head.version, "1.1")[5:])


def strip_trace_fields(fields: list) -> list:
    """Tracing replaces the client's traceparent / tracestate with its own (upstream_tail)."""
    return [f for f in fields if not (10 <= len(f[0]) <= 11 and f[0].lower() in _TRACE_NAMES)]


def upstream_tail(ex, endpoint: str, now: float, server_id: str = "") -> bytes:
    """The fields that end this attempt's upstream head (each with its CRLF). ``server_id``:
    the identity the pod proved (mesh mutual TLS), for the attempt's span."""
    tail = b"x-request-id: " + ex.request_id + b"\r\n" if ex.rid_generated else b""
    trace = ex.trace
    if trace is not None:
        tail += b"traceparent: " + trace.attempt(endpoint, now, server_id) + b"\r\n"
        if trace.tracestate:
            tail += b"tracestate: " + trace.tracestate + b"\r\n"
    return tail


def finish(ex, status: int, duration: float) -> None:
    ctx = ex.ctx
    r = ex.route
    head = ex.head
    down = ex.down
    trace = ex.trace
    if trace is not None:
        attrs = None
        if r is not None:
            attrs = {"http.route": r.name, "meshproxy.route": r.name}
            if ex.ref is not None and ex.ref.key is not None:
                attrs["meshproxy.backend"] = "%s/%s:%s" % ex.ref.key
            if ex.request_id:
                attrs["http.request.header.x-request-id"] = (ex.request_id.decode("latin-1"),)
        trace.finish(status, ctx.now(), attrs)
    log = ctx.access_log
    if log is None:
        return
    addr = ex.upstream_addr
    if addr is None and ex.ep is not None:
        addr = (ex.ep.ip, ex.ep.port)
    upstream = "%s:%d" % addr if addr is not None else ""
    key = ex.ref.key if ex.ref is not None else None
    flags = ex.flags
    if not flags:
        if status == 404 and r is None:
            flags = FLAG_NO_ROUTE
        elif status == 499:
            flags = FLAG_DOWNSTREAM_TERMINATION
        elif status == 503 and ex.attempts == 0 and r is not None:
            flags = FLAG_NO_HEALTHY_UPSTREAM
    log.log(HttpRecord(
        head.method, head.target, head.host, _PROTOCOLS.get(head.version, "HTTP/1.1"), status,
        ex.req_bytes, ex.resp_bytes, duration,
        scheme="https" if down.tls else "http", upstream_host=upstream if ex.attempts else "",
        upstream_service="%s/%s:%s" % key if key is not None else "",
        route=r.name if r is not None else "", ingress=r.source.partition(" ")[2] if r is not None else "",
        request_id=ex.request_id or b"", trace_id=trace.trace_id_hex if trace is not None else "",
        attempts=ex.attempts, client=down.peer_ip, client_port=down.peer_port,
        request_headers=head.headers, flags=flags))
