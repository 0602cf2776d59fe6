"""Every Prometheus metric meshproxy exports, defined once, on one registry.

Names follow ``meshproxy_<area>_<what>_<unit>``, counters end in ``_total``, and labels are
bounded: namespace / service / port / ingress / route / code class — never a pod IP, a client
address, a request id or a raw path, which would grow without limit. ``route`` names a rule as
it is written in its object (an Ingress rule as ``host/path``), so there are
as many values as rules in the configuration, whatever the clients send. The value is the
matched route's ``name`` (``meshproxy.core.routes.Route``). ``client_id`` (a mesh caller's
verified identity) is bounded by the ServiceAccounts that exist and capped per process
(``client_id_label``).

With ``--workers N`` every worker process keeps its own values; the control plane's
``/metrics`` adds them up (``meshproxy.workers``), so this module must stay importable in a
freshly forked process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["REGISTRY", "L4_DURATION_BUCKETS", "HTTP_DURATION_BUCKETS", "CLIENT_ID_LIMIT", "CLIENT_ID_OTHER",
           "BoundedLabel", "client_id_label"]  # plus the metric objects below

REGISTRY = CollectorRegistry(auto_describe=True)

_SVC = ("namespace", "service", "port")

# -- the build ------------------------------------------------------------------------------------
build_info = Gauge("meshproxy_build_info", "Always 1; the labels say what runs: version, python, and http_core "
                   "(the L7 HTTP/1.1 per-message core: compiled or python, -strict without the fast paths).",
                   ["version", "python", "http_core"], registry=REGISTRY, multiprocess_mode="max")

# -- control plane --------------------------------------------------------------------------------
config_reloads = Counter("meshproxy_config_reloads_total", "Configuration loads by result (ok / error).",
                         ["result"], registry=REGISTRY)
snapshot_version = Gauge("meshproxy_snapshot_version", "Version of the routing snapshot in force.",
                         registry=REGISTRY, multiprocess_mode="max")
snapshot_build_seconds = Histogram("meshproxy_snapshot_build_seconds", "Time to build one snapshot.",
                                   buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                   registry=REGISTRY)
endpoints = Gauge("meshproxy_endpoints", "Endpoints per service by state (ready / serving / terminating / not_ready).",
                  ["namespace", "service", "state"], registry=REGISTRY, multiprocess_mode="mostrecent")
problems = Gauge("meshproxy_config_problems", "Problems in the snapshot in force (broken routes, missing secrets, ...).",
                 registry=REGISTRY, multiprocess_mode="mostrecent")
source_events = Counter("meshproxy_source_events_total", "Object events received from sources.",
                        ["source", "kind", "type"], registry=REGISTRY)
source_relists = Counter("meshproxy_source_relists_total", "Full relists by source.", ["source"], registry=REGISTRY)
source_up = Gauge("meshproxy_source_up", "1 while a source is connected and synced.", ["source"], registry=REGISTRY,
                  multiprocess_mode="mostrecent")

# -- accepting (every listener kind) ----------------------------------------------------------------
accept_errors = Counter("meshproxy_accept_errors_total",
                        "Connections that could not be accepted (a failed accept(), or an accepted L4 connection that "
                        "could not open its pod socket or pipe), by listener kind (l4 / l7 / admin) and reason (EMFILE, "
                        "ENFILE, ENOBUFS, ENOMEM: accepting pauses; other).", ["listener", "reason"], registry=REGISTRY)

# -- L4 ------------------------------------------------------------------------------------------
l4_connections = Counter("meshproxy_l4_connections_total", "Accepted L4 connections.", _SVC, registry=REGISTRY)
l4_active = Gauge("meshproxy_l4_active_connections", "Open L4 connections.", _SVC, registry=REGISTRY,
                  multiprocess_mode="livesum")
l4_bytes = Counter("meshproxy_l4_bytes_total", "Bytes moved by L4 connections.", _SVC + ("direction",), registry=REGISTRY)
l4_connect_failures = Counter("meshproxy_l4_connect_failures_total", "Failed connects to endpoints.", _SVC, registry=REGISTRY)
l4_no_endpoints = Counter("meshproxy_l4_no_endpoints_total", "Connections closed because no endpoint could take them.",
                          _SVC, registry=REGISTRY)
l4_listener_errors = Counter("meshproxy_l4_listener_errors_total", "Listeners that could not be bound.",
                             _SVC, registry=REGISTRY)
l4_listeners = Gauge("meshproxy_l4_listeners", "Bound L4 listeners.", registry=REGISTRY, multiprocess_mode="livesum")
# L4 connections live from milliseconds (a health check) to hours (a database session).
L4_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
l4_duration = Histogram("meshproxy_l4_connection_duration_seconds", "Time from accept to close of L4 connections.",
                        _SVC, buckets=L4_DURATION_BUCKETS, registry=REGISTRY)

# -- caller identity ---------------------------------------------------------------------------
# The ``client_id`` label of the golden metrics (L7, below): the verified
# SPIFFE ID of the caller of an inbound mesh request ("" for a plaintext caller and on every
# server that is not a sidecar's inbound side). Identities are ServiceAccounts, so the values
# are few, but a process also caps them: the first CLIENT_ID_LIMIT distinct IDs it sees get
# their own value, any later one is counted as "other" - a mesh that grows (or a CA that signs
# more than it should) cannot grow the series without bound.
CLIENT_ID_LIMIT = 64
CLIENT_ID_OTHER = "other"


class BoundedLabel:
    """The first ``limit`` distinct non-empty values pass as they are, then ``other``. ""
    always passes and takes no place. Admitted values stay admitted for the process's life (a
    series, once exported, keeps its name)."""

    __slots__ = ("limit", "other", "seen")

    def __init__(self, limit: int, other: str) -> None:
        self.limit = limit
        self.other = other
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if not value or value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return self.other
        self.seen.add(value)
        return value


client_id_label = BoundedLabel(CLIENT_ID_LIMIT, CLIENT_ID_OTHER)

# -- L7 ------------------------------------------------------------------------------------------
# Golden metrics: per route (the rule that matched) and per backend Service (namespace + service
# of the same series): requests by status class, and latency. Success rate is derived:
# 1 - rate(code="5xx") / rate(all). client_id: the caller's identity (above).
_HTTP = ("namespace", "ingress", "service", "route", "client_id")
HTTP_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
http_requests = Counter("meshproxy_http_requests_total", "HTTP requests answered, by status class.",
                        _HTTP + ("code",), registry=REGISTRY)
http_duration = Histogram("meshproxy_http_request_duration_seconds", "Time from request head to response end.",
                          _HTTP, buckets=HTTP_DURATION_BUCKETS, registry=REGISTRY)
http_active = Gauge("meshproxy_http_active_requests", "Requests in progress.", registry=REGISTRY,
                    multiprocess_mode="livesum")
http_send_timeouts = Counter("meshproxy_http_send_timeouts_total",
                             "Client connections closed because they read nothing of their response for --send-timeout.",
                             registry=REGISTRY)
http_interim_floods = Counter("meshproxy_http_interim_floods_total",
                              "Upstream attempts failed (502) for sending more interim (1xx) responses than allowed.",
                              registry=REGISTRY)
http_mirror = Counter("meshproxy_http_mirror_requests_total",
                      "Mirrored request copies (RequestMirror) by result: ok, skipped (body too large to keep), "
                      "no_endpoint, connect, reset, protocol, timeout, error.", ["result"], registry=REGISTRY)
http_no_route = Counter("meshproxy_http_no_route_total", "Requests that matched no Ingress rule.", registry=REGISTRY)
http_bad_requests = Counter("meshproxy_http_bad_requests_total", "Requests refused before routing, by status.",
                            ["code"], registry=REGISTRY)
http_downstream_connections = Gauge("meshproxy_http_downstream_connections", "Open client connections.",
                                    registry=REGISTRY, multiprocess_mode="livesum")
upstream_connections = Gauge("meshproxy_upstream_connections", "Upstream connections by state (active / idle).",
                             ["namespace", "service", "state"], registry=REGISTRY, multiprocess_mode="livesum")
upstream_errors = Counter("meshproxy_upstream_errors_total", "Upstream failures by kind (connect / reset / timeout / protocol).",
                          ["namespace", "service", "kind"], registry=REGISTRY)
http_retries = Counter("meshproxy_http_retries_total", "Retried upstream attempts.", ["namespace", "service"], registry=REGISTRY)

# -- HTTP/2 and gRPC ---------------------------------------------------------------------------
# gRPC calls by the route's service / method (never the raw path: labels stay bounded, see
# docs/http2.md) and grpc-status (a code 0-16, or "none" when a response carried none).
grpc_requests = Counter("meshproxy_grpc_requests_total", "gRPC calls answered, by gRPC service, method and grpc-status.",
                        ["namespace", "service", "grpc_service", "grpc_method", "grpc_status"], registry=REGISTRY)
# HTTP/2 connections closed by the proxy for abusing the protocol, by kind (rapid_reset,
# control_flood, empty_data_flood, header_flood, stream_ids, protocol).
http2_abuse = Counter("meshproxy_http2_connections_refused_total",
                      "HTTP/2 client connections ended with GOAWAY for abusing the protocol, by kind.",
                      ["kind"], registry=REGISTRY)
http2_streams = Counter("meshproxy_http2_streams_total", "HTTP/2 streams opened by clients.", registry=REGISTRY)

# -- access log -------------------------------------------------------------------------------
access_log_lines = Counter("meshproxy_access_log_lines_total", "Access-log lines written.", registry=REGISTRY)
access_log_dropped = Counter("meshproxy_access_log_dropped_total",
                             "Access-log lines lost: queue_full (the writer could not keep up: slow disk) or write_error.",
                             ["reason"], registry=REGISTRY)

# -- health ------------------------------------------------------------------------------------
probes = Counter("meshproxy_health_probes_total", "Readiness probes run, by result.", ["result"], registry=REGISTRY)
outlier_ejections = Counter("meshproxy_outlier_ejections_total", "Endpoints ejected by passive outlier detection.",
                            ["namespace", "service"], registry=REGISTRY)

# -- mesh: identity, policy, issuer -----------------------------------------------------------------
# client_id is the caller's SPIFFE ID ("" for a plaintext caller), as Linkerd labels by client
# identity: bounded, because only identities our CA signed get that far (one per ServiceAccount).
identity_expiry = Gauge("meshproxy_identity_expiry_timestamp_seconds",
                        "notAfter of the workload certificate (SVID) in force, Unix time.",
                        registry=REGISTRY, multiprocess_mode="max")
identity_updates = Counter("meshproxy_identity_updates_total",
                           "SVID loads and renewals by source (files / issuer) and result (ok / error).",
                           ["source", "result"], registry=REGISTRY)
mesh_authz = Counter("meshproxy_mesh_authz_decisions_total",
                     "Inbound authorization decisions by protocol (http / tcp), decision (allow / deny), reason and "
                     "deciding policy (namespace/name, '' for the default).",
                     ["protocol", "decision", "reason", "policy", "client_id"], registry=REGISTRY)
mesh_peer_auth = Counter("meshproxy_mesh_peer_authentication_total",
                         "Inbound connections by mTLS mode in force and what the caller spoke (mtls / plaintext) and result.",
                         ["mode", "tls", "result"], registry=REGISTRY)
mesh_connections = Counter("meshproxy_mesh_connections_total",
                           "Connections the sidecar accepted on its captured ports, by direction (inbound / outbound), "
                           "protocol (http / tcp), what the connection to the peer sidecar or caller is (mtls / "
                           "plaintext, '-' when decided per request) and result (accepted / refused / denied / "
                           "no_endpoint).", ["direction", "protocol", "tls", "result"], registry=REGISTRY)
issuer_requests = Counter("meshproxy_issuer_requests_total",
                          "Certificate requests answered by `meshproxy identity serve`, by result.",
                          ["result"], registry=REGISTRY)
