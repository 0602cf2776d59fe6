"""Tracing: a span per request and per upstream attempt, exported over OTLP/HTTP.

``Tracing.from_settings(settings)`` is None without ``--otlp-endpoint``: then the exchange
calls nothing here and ``traceparent`` / ``tracestate`` pass through untouched, like any other
header. With it, per request::

    trace = tracing.start_request(traceparent, tracestate, method, target, authority, now)
    # per upstream attempt, the traceparent to send with it (tracestate: trace.tracestate)
    value = trace.attempt("10.0.0.7:8080", now)
    trace.attempt_done(now, status=503)          # optional; the next attempt / finish ends it
    trace.finish(200, now, {"meshproxy.route": ..., ...})

and, in the mesh sidecar, ``trace.client_id = "spiffe://..."`` (the inbound caller's verified
identity) and ``trace.attempt(endpoint, now, server_id="spiffe://...")`` (the identity an
outbound attempt's peer proved).

``now`` is the loop's monotonic clock; wall-clock span times come from one ``time.time_ns``
taken at the start of a recorded request.

Sampling is parent-based: a valid incoming ``traceparent`` decides (sampled flag set: record,
else not); a request without one (or with an invalid one, which starts a new trace) is
recorded with probability ``--trace-sampling``, decided on the trace id the way the
OpenTelemetry ``TraceIdRatioBased`` sampler does (lower 64 bits below ratio x 2^64), so every
proxy with the same ratio takes the same decision for the same trace.

Cost: this module decides sampling and formats headers itself. An unrecorded request costs a
header parse, two random ids and one small object; the OpenTelemetry SDK is not touched.
A recorded one builds its finished spans (``ReadableSpan``) at ``finish`` and hands them to a
``BatchSpanProcessor``, whose own thread batches and posts them (``OTLPSpanExporter``,
protobuf over HTTP, to ``<endpoint>/v1/traces``, at most ``_EXPORT_DELAY_MS`` after the
request). Its queue is bounded (``_QUEUE_SIZE`` spans): when the collector cannot keep up,
spans are dropped, never waited for. The SDK is imported only when tracing is on.

Span ids: the server span's id is a fresh id per request; each attempt's CLIENT span gets its
own, and that id is the parent id the pod sees - so every hop points at a span this proxy
exported. Unrecorded requests still send a fresh parent id (with the sampled flag clear).

Attributes follow the OpenTelemetry HTTP semantic conventions (``http.request.method``,
``url.path``, ``server.address``, ``http.response.status_code`` as an integer, ...) plus
``meshproxy.*`` ones passed to ``finish`` (route, backend, request id, attempts). The mesh
identities have no OpenTelemetry convention (``tls.client.subject`` is an X.509 subject name,
which a SPIFFE certificate leaves empty): ``meshproxy.client_id`` on the server span and
``meshproxy.server_id`` on an attempt's span, the same values as the ``client_id`` metric label
(uncapped: a span is one request, not a series).
"""

from __future__ import annotations

import logging
import random
import socket
import time
from typing import Any

from .tracecontext import format_traceparent, parse_traceparent, parse_tracestate

__all__ = ["Tracing", "RequestTrace"]

log = logging.getLogger("meshproxy.tracing")

_EXPORT_DELAY_MS = 1000        # "within a few seconds": a batch leaves at most 1 s after its first span
_QUEUE_SIZE = 8192
_BATCH_SIZE = 512
_EXPORT_TIMEOUT_S = 5
_ID_MASK64 = (1 << 64) - 1


def _split_hostport(text: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port`` or a bare host -> (host, port or None)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest[:1] == ":" and rest[1:].isdigit() else None
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return text, None


class Tracing:
    """One per process (its exporter thread posts the spans)."""

    def __init__(self, endpoint: str, ratio: float, *, service_name: str = "meshproxy", processor=None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

        self.endpoint = endpoint.rstrip("/") + "/v1/traces"
        self.ratio = min(1.0, max(0.0, ratio))
        self._bound = int(self.ratio * (1 << 64))
        self._rand = random.Random()
        if processor is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exporter = OTLPSpanExporter(endpoint=self.endpoint, timeout=_EXPORT_TIMEOUT_S)
            processor = BatchSpanProcessor(exporter, max_queue_size=_QUEUE_SIZE, schedule_delay_millis=_EXPORT_DELAY_MS,
                                           max_export_batch_size=_BATCH_SIZE)
        self.processor = processor
        self.resource = Resource.create({"service.name": service_name, "host.name": socket.gethostname()})
        self.scope = InstrumentationScope("meshproxy")
        self._span = ReadableSpan
        self._ctx = SpanContext
        self._server, self._client = SpanKind.SERVER, SpanKind.CLIENT
        self._error = Status(StatusCode.ERROR)
        self._unset = Status(StatusCode.UNSET)
        self._flags = TraceFlags(TraceFlags.SAMPLED)
        self._tracestate = TraceState
        self.started = 0
        self.recorded = 0

    @classmethod
    def from_settings(cls, settings) -> Tracing | None:
        endpoint = getattr(settings, "otlp_endpoint", None)
        if not endpoint:
            return None
        return cls(endpoint, getattr(settings, "trace_sampling", 1.0))

    def new_id(self, bits: int) -> int:
        n = 0
        while not n:              # zero is the invalid id
            n = self._rand.getrandbits(bits)
        return n

    def start_request(self, traceparent, tracestate, method: bytes | str, target: bytes | str,
                      authority: bytes | str, now: float, *, peer: tuple[str, int] | None = None,
                      scheme: str = "http", protocol: str = "1.1") -> RequestTrace:
        """``traceparent`` / ``tracestate``: the incoming field value(s), None when absent
        (``l7.tracecontext.trace_headers`` finds them in a field list)."""
        self.started += 1
        parent = parse_traceparent(traceparent)
        if parent is not None:
            trace_id, parent_id, sampled = parent.trace_id, parent.parent_id, bool(parent.flags & 1)
            state = parse_tracestate(tracestate)
        else:
            trace_id, parent_id, state = self.new_id(128), 0, None
            sampled = (trace_id & _ID_MASK64) < self._bound
        trace = RequestTrace(self, trace_id, parent_id, self.new_id(64), sampled, state, now)
        if sampled:
            self.recorded += 1
            trace.wall0 = time.time_ns()
            trace.info = (method, target, authority, peer, scheme, protocol)
        return trace

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export what is queued (bounded by the exporter's timeout), stop the thread."""
        try:
            self.processor.force_flush(int(timeout * 1000))
        finally:
            self.processor.shutdown()

    # -- spans -------------------------------------------------------------------------------------

    def _emit(self, name: str, trace: RequestTrace, span_id: int, parent_id: int, remote_parent: bool,
              kind, start: float, end: float, attributes: dict, error: bool) -> None:
        state = self._tracestate.from_header([trace.tracestate.decode("latin-1")]) if trace.tracestate else None
        ctx = self._ctx(trace.trace_id, span_id, False, self._flags, state)
        parent = self._ctx(trace.trace_id, parent_id, remote_parent, self._flags) if parent_id else None
        wall0, t0 = trace.wall0, trace.t0
        self.processor.on_end(self._span(
            name=name, context=ctx, parent=parent, resource=self.resource, attributes=attributes, kind=kind,
            status=self._error if error else self._unset, start_time=wall0 + int((start - t0) * 1e9),
            end_time=wall0 + int((end - t0) * 1e9), instrumentation_scope=self.scope))


def _s(v) -> str:
    return v.decode("latin-1") if isinstance(v, (bytes, bytearray)) else str(v)


class RequestTrace:
    """The trace of one request (see the module docstring for the calls)."""

    __slots__ = ("tracing", "trace_id", "parent_id", "span_id", "sampled", "tracestate", "t0", "wall0", "info",
                 "attempts", "client_id", "_current", "_header")

    def __init__(self, tracing: Tracing, trace_id: int, parent_id: int, span_id: int, sampled: bool,
                 tracestate: bytes | None, now: float) -> None:
        self.tracing = tracing
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = span_id
        self.sampled = sampled
        self.tracestate = tracestate      # what to send upstream with every attempt (None: nothing)
        self.t0 = now
        self.wall0 = 0
        self.info: Any = None
        self.attempts: list[list] | None = None   # [span id, endpoint, start, end, status, error, server id]
        self.client_id = ""               # the caller's verified SPIFFE ID (mesh inbound), "" none
        self._current: list | None = None
        self._header: bytes | None = None

    @property
    def trace_id_hex(self) -> str:
        """For the access log (``%TRACE_ID%``, json ``trace_id``)."""
        return "%032x" % self.trace_id

    @property
    def traceparent(self) -> bytes:
        """The header naming this proxy's server span (for anything sent outside an attempt)."""
        if self._header is None:
            self._header = format_traceparent(self.trace_id, self.span_id, self.sampled)
        return self._header

    def attempt(self, endpoint: str, now: float, server_id: str = "") -> bytes:
        """An upstream attempt to ``endpoint`` (``ip:port``) starts: the ``traceparent`` value
        to send with it. Ends the previous attempt if it is still open. ``server_id``: the
        SPIFFE ID the peer proved (mesh mutual TLS), "" for none."""
        if not self.sampled:
            return self.traceparent
        if self._current is not None:
            self._current[3] = now
        span_id = self.tracing.new_id(64)
        cur = [span_id, endpoint, now, None, None, None, server_id]
        if self.attempts is None:
            self.attempts = [cur]
        else:
            self.attempts.append(cur)
        self._current = cur
        return format_traceparent(self.trace_id, span_id, True)

    def attempt_done(self, now: float, status: int | None = None, error: str | None = None) -> None:
        """The current attempt ended: the pod's status, or the error (``connect``, ``timeout``,
        ``reset``, ...) that ended it."""
        cur = self._current
        if cur is None:
            return
        cur[3], cur[4], cur[5] = now, status, error
        self._current = None

    def finish(self, status: int, now: float, attrs: dict | None = None) -> None:
        """The response is complete (or the client went away: pass the status logged). Exports
        the server span and one CLIENT span per attempt when the trace is recorded."""
        if not self.sampled or self.info is None:
            return
        tr = self.tracing
        method, target, authority, peer, scheme, protocol = self.info
        method_s = _s(method)
        path, _, _ = _s(target).partition("?")
        host, port = _split_hostport(_s(authority))
        a: dict[str, Any] = {
            "http.request.method": method_s,
            "url.path": path,
            "url.scheme": scheme,
            "network.protocol.version": protocol,
            "http.response.status_code": int(status),
        }
        if host:
            a["server.address"] = host
            if port is not None:
                a["server.port"] = port
        if peer is not None:
            a["client.address"] = a["network.peer.address"] = peer[0]
            a["network.peer.port"] = peer[1]
        if self.client_id:
            a["meshproxy.client_id"] = self.client_id
        route = None
        if attrs:
            a.update(attrs)
            route = attrs.get("http.route")
        n = len(self.attempts) if self.attempts else 0
        if n > 1:
            a["meshproxy.retries"] = n - 1
        error = status >= 500 or status == 0
        if error:
            a["error.type"] = str(status) if status else "incomplete"
        tr._emit(f"{method_s} {route}" if route else method_s, self, self.span_id, self.parent_id, True,
                 tr._server, self.t0, now, a, error)
        if self._current is not None:
            self._current[3] = now
            if self._current[4] is None and self._current[5] is None:
                self._current[4] = status
        for i, (span_id, endpoint, start, end, st, err, server_id) in enumerate(self.attempts or ()):
            ip, eport = _split_hostport(endpoint)
            ca: dict[str, Any] = {"http.request.method": method_s, "server.address": ip,
                                  "network.peer.address": ip, "url.path": path}
            if eport is not None:
                ca["server.port"] = ca["network.peer.port"] = eport
            if server_id:
                ca["meshproxy.server_id"] = server_id
            if i:
                ca["http.request.resend_count"] = i
            if st is not None:
                ca["http.response.status_code"] = int(st)
            failed = err is not None or (st is not None and st >= 500)
            if err is not None:
                ca["error.type"] = err
            elif failed:
                ca["error.type"] = str(st)
            tr._emit(method_s, self, span_id, self.span_id, False, tr._client, start, end if end is not None else now,
                     ca, failed)
        self.info = None        # finished once: a second call exports nothing
