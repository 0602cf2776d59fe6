"""Proxy settings that are not Kubernetes objects: listen addresses, identity, timeouts, limits.

They come from command-line flags (``meshproxy run --help``) and, optionally, a ConfigMap-style
YAML file (``--config FILE``) holding the same keys in their flag spelling without dashes
(``drain-timeout: 10``). Flags given on the command line win over the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Settings", "parse_hostport", "LB_POLICIES", "PROXY_MODES"]

PROXY_MODES = ("userspace", "nftables")
LB_POLICIES = ("random", "round_robin", "least_connections", "p2c", "ring_hash", "maglev")


def parse_hostport(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``[v6]:PORT`` -> (host, port). Raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected [HOST]:PORT")
        port_s = rest[1:]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: expected HOST:PORT")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{text!r}: port must be 0-65535")
    return (host or default_host, int(port_s))


@dataclass(slots=True)
class Settings:
    paths: list[str] = field(default_factory=list)
    node: str | None = None
    ingress_listen: tuple[str, int] | None = None
    ingress_tls_listen: tuple[str, int] | None = None
    admin_listen: tuple[str, int] = ("127.0.0.1", 9901)
    workers: int = 1
    log_level: str = "info"
    access_log: str | None = None          # PATH or "-" (stdout); off when None
    access_log_format: str = "text"        # text | json | a template with %OPERATORS%
    access_log_buffer: int = 16384         # records queued for the writer thread before new ones are dropped
    otlp_endpoint: str | None = None       # OTLP/HTTP base URL: spans go to <it>/v1/traces; tracing off when None
    trace_sampling: float = 1.0            # share of traces started here that are recorded (0..1)
    service_cidr: str = "127.96.0.0/16"
    node_port_range: tuple[int, int] = (30000, 32767)
    lb_policy: str = "random"              # L4 default (kube-proxy picks at random)
    l7_lb_policy: str = "p2c"              # L7 default: power of two choices, least request
    ingress_class: str = "meshproxy"
    watch_ingress_without_class: bool = True
    trusted_proxies: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0           # L4 idle connections
    drain_timeout: float = 30.0
    shutdown_delay: float = 0.0
    upstream_timeout: float = 60.0         # L7 response timeout (per Ingress: meshproxy.dev/timeout)
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    send_timeout: float = 60.0             # L7: a client that reads nothing of its response for this long is closed
    max_head_size: int = 65536
    max_headers: int = 100
    max_body_size: int | None = None
    # L7: read request bodies up to this many bytes before choosing an endpoint (0: stream them
    # through as they come). nginx's proxy_request_buffering; see docs/l7.md "Request bodies".
    request_buffer_size: int = 0
    max_connections: int | None = None
    upstream_pool_size: int = 128           # idle keep-alive connections kept per endpoint
    upstream_idle_timeout: float = 60.0
    health_checks: bool = True              # run pods' readinessProbes
    ssl_passthrough: bool = False           # --enable-ssl-passthrough: the TLS listener peeks at SNI first
    default_tls_secret: str | None = None
    coalesce_delay: float = 0.01           # how long a burst of changes may gather (s)
    poll_interval: float = 0.5             # file watch fallback when inotify is missing
    takeover: bool = False
    http_parser: str = "auto"
    kube_api: bool = False                 # read objects from the Kubernetes API (list + watch)
    kubeconfig: str | None = None          # None: in-cluster, else $KUBECONFIG / ~/.kube/config
    kube_context: str | None = None
    kube_namespace: str | None = None      # None: all namespaces
    update_status: bool = True             # write status.loadBalancer of served Ingresses (API source)
    publish_status_address: tuple[str, ...] = ()   # the address to write (IPs / DNS names)
    publish_service: str | None = None     # NS/NAME: write the address of that Service instead
    dns_servers: tuple[tuple[str, int], ...] = ()   # resolvers for the DNS source (default: system)
    dns_min_ttl: float = 5.0
    dns_max_ttl: float = 300.0
    dns_listen: tuple[str, int] | None = None        # cluster DNS server (off when absent)
    cluster_domain: str = "cluster.local"
    # mesh (docs/mesh.md)
    trust_domain: str = "cluster.local"            # SPIFFE trust domain
    identity_dir: str | None = None                 # --identity-dir: svid.pem, svid_key.pem, bundle.pem
    identity_issuer: str | None = None              # --identity-issuer URL (meshproxy identity serve)
    identity_issuer_ca: str | None = None           # roots that verify the issuer at first
    identity_token_file: str | None = None          # ServiceAccount token for the issuer
    mesh_root_namespace: str = "istio-system"       # mesh-wide PeerAuthentication / AuthorizationPolicy
    # Where a Gateway without spec.addresses binds its listeners (--gateway-address, repeatable).
    gateway_addresses: tuple[str, ...] = ("0.0.0.0",)
    # The L7 server speaks HTTP/2 (h2c prior knowledge, ALPN h2). Until it does, GRPCRoutes are
    # not accepted and Service ports with appProtocol kubernetes.io/h2c / grpc stay at L4.
    http2: bool = False
    dns_upstreams: tuple[tuple[str, int], ...] = ()  # where cluster DNS forwards other names (default: /etc/resolv.conf)
    proxy_mode: str = "userspace"          # L4: "userspace" (listeners, l4/) or "nftables" (kernel rules)
    nft_table: str = "meshproxy"           # the inet table nftables mode owns
    udp_idle_timeout: float = 30.0         # userspace UDP: a client's flow is forgotten after this long
