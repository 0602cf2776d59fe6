"""Command line: ``meshproxy run | validate | get | top | stat | demo | capture | identity
serve | cleanup`` (docs/configuration.md, docs/observability.md, docs/mesh.md, docs/l4-kernel.md).

The process-layer modules (controller, process, workers, demo, top, issuer, dataplane) are
imported inside the commands that need them, never at the top: they import prometheus_client, and ``run
--workers N`` must set up multiprocess metrics before that first import
(``meshproxy.multiproc``). tests/test_layers.py allows exactly these late imports.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import sys
import urllib.parse
from typing import Sequence

from discovery.ipfamilies import parse_cidrs
from discovery.manifests import load_paths
from discovery.sources.dns import parse_servers
from discovery.sources.ingress_status import check_publish_settings
from discovery.store import ADDED, Event

from . import capture
from .core.gateway import format_problem
from .core.logformat import FormatError, compile_format
from .core.nginx_convert import ConvertOptions, convert
from .core.settings import LB_POLICIES, LOG_LEVELS, PROXY_MODES, Settings, SettingsFileError, parse_hostport, read_settings_file
from .gateway_cli import GATEWAY_TABLES, gateway_table
from .multiproc import prepare_multiprocess_metrics

__all__ = ["main", "build_parser", "settings_from_args"]


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cidrs(text: str) -> str:
    try:
        parse_cidrs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _nft_name(text: str) -> str:
    # nft identifiers: a letter or underscore, then letters, digits, '_', '-', '.'.
    if not text or len(text) > 255 or not (text[0].isalpha() or text[0] == "_") or \
            any(not (c.isalnum() or c in "_-.") for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an nftables table name")
    return text


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def _duration(text: str) -> float:
    """``24h``, ``90m``, ``60s``, ``3600`` -> seconds (at least 2)."""
    t = text.strip().lower()
    factor = {"h": 3600.0, "m": 60.0, "s": 1.0}.get(t[-1:], None)
    try:
        v = float(t[:-1] if factor else t) * (factor or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (24h, 90m, 60s)") from None
    if not v >= 2 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: at least 2 seconds")
    return v


def _add_files(p: argparse.ArgumentParser, required: bool = True, run: bool = False) -> None:
    p.add_argument("-f", "--filename", dest="paths", action="append", required=required, metavar="PATH",
                   help="manifest file or folder (repeatable); folders are read recursively (*.yaml, *.yml, *.json)")
    # run: no argparse default, so that a --config file can set it (flags win over the file).
    p.add_argument("--service-cidr", default=None if run else "127.96.0.0/16", type=_cidrs,
                   help="range for ClusterIPs, or an IPv4 and an IPv6 range separated by a comma (dual stack); "
                        "given ones must lie inside, missing ones are allocated from it (default 127.96.0.0/16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshproxy", description=(
        "Load-balancing service mesh and ingress proxy: kube-proxy style L4 (ClusterIP / NodePort) "
        "and Ingress L7 routing, configured with Kubernetes manifests."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve the manifests (watched for changes)")
    _add_files(run, required=False, run=True)
    kube = run.add_argument_group("Kubernetes API (without -f: in-cluster config, $KUBECONFIG or ~/.kube/config)")
    kube.add_argument("--kubeconfig", metavar="PATH", help="list + watch objects from the API server of this kubeconfig")
    kube.add_argument("--context", metavar="NAME", help="kubeconfig context (default: its current-context)")
    kube.add_argument("--namespace", metavar="NS", help="namespaced kinds of NS only (default: all namespaces)")
    kube.add_argument("--update-status", default=None, choices=("true", "false"),
                      help="write status.loadBalancer of the Ingresses served (default true with --ingress-listen)")
    kube.add_argument("--publish-status-address", metavar="ADDR[,ADDR]", default=None,
                      help="IPs / DNS names to write as the Ingress status (default: the --ingress-listen host, "
                           "else this node's InternalIP)")
    kube.add_argument("--publish-service", metavar="NS/NAME", default=None,
                      help="write the address of this Service (LoadBalancer ingress, externalIPs or clusterIP)")
    run.add_argument("--node", help="the Node object this instance is (default: a single implicit node on 127.0.0.1)")
    run.add_argument("--ingress-listen", type=_hostport, metavar="HOST:PORT", help="serve Ingress HTTP here (off when absent)")
    run.add_argument("--ingress-tls-listen", type=_hostport, metavar="HOST:PORT", help="serve Ingress HTTPS here")
    # Flags that a --config file may also set have no argparse default: None means "not given".
    run.add_argument("--admin-listen", type=_hostport, default=None, metavar="HOST:PORT",
                     help="admin server: /healthz /readyz /metrics /debug/snapshot (default 127.0.0.1:9901)")
    run.add_argument("--workers", type=int, default=None, help="data-plane processes sharing the listeners (default 1)")
    run.add_argument("--log-level", default=None, choices=LOG_LEVELS, help="default info")
    obs = run.add_argument_group("observability (docs/observability.md)")
    obs.add_argument("--access-log", metavar="PATH|-",
                     help="one line per HTTP request and L4 connection to PATH or stdout (-); SIGUSR1 reopens PATH")
    obs.add_argument("--access-log-format", metavar="text|json|TEMPLATE", default=None,
                     help="text (default), json (one object per line) or a template of Envoy-style operators, "
                          "e.g. '%%START_TIME%% %%REQ(:METHOD)%% %%REQ(X-REQUEST-ID)%% %%RESPONSE_CODE%% %%DURATION%%'")
    obs.add_argument("--access-log-buffer", type=int, default=None, metavar="N",
                     help="records waiting for the log writer before new ones are dropped and counted (default 16384)")
    obs.add_argument("--otlp-endpoint", metavar="URL", default=None,
                     help="export trace spans over OTLP/HTTP to URL/v1/traces (tracing is off without it)")
    obs.add_argument("--trace-sampling", type=float, default=None, metavar="RATIO",
                     help="share of traces started here that are recorded, 0..1 (default 1); incoming "
                          "traceparent headers keep their caller's decision")
    run.add_argument("--config", metavar="FILE",
                     help="settings file: a ConfigMap or a YAML mapping with these flags' names without dashes as keys; "
                          "flags win over it; re-read on SIGHUP and when it changes (docs/configuration.md)")
    run.add_argument("--lb-policy", choices=LB_POLICIES, default=None, help="default L4 balancing policy (default random)")
    run.add_argument("--l7-lb-policy", choices=LB_POLICIES, default=None, help="default L7 balancing policy (default p2c)")
    run.add_argument("--ingress-class", default=None, help="IngressClass name served besides classes with controller meshproxy.dev/ingress (default meshproxy)")
    run.add_argument("--watch-ingress-without-class", default=None, choices=("true", "false"),
                     help="serve Ingresses that name no class (default true)")
    run.add_argument("--trusted-proxies", default=None, metavar="CIDR[,CIDR]",
                     help="peers whose X-Forwarded-* / Forwarded headers are kept")
    run.add_argument("--drain-timeout", type=_positive_float, default=None, help="seconds open connections may take to finish after their endpoint or listener went away, or on SIGTERM (default 30)")
    run.add_argument("--shutdown-delay", type=_positive_float, default=None, help="seconds between SIGTERM and closing listeners (default 0)")
    run.add_argument("--connect-timeout", type=_positive_float, default=None, help="upstream connect timeout, seconds (default 5)")
    run.add_argument("--idle-timeout", type=_positive_float, default=None, help="L4 idle connection timeout, seconds (default 3600)")
    run.add_argument("--upstream-timeout", type=_positive_float, default=None, help="L7 response timeout, seconds (default 60)")
    run.add_argument("--header-timeout", type=_positive_float, default=None, help="time a client has to send a request head, seconds (default 10)")
    run.add_argument("--keepalive-timeout", type=_positive_float, default=None, help="idle keep-alive client connections, seconds (default 75)")
    run.add_argument("--send-timeout", type=_positive_float, default=None, help="close a client that reads nothing of its response for this long, seconds (default 60)")
    run.add_argument("--max-body-size", type=int, default=None, help="request body limit in bytes -> 413 (default unlimited)")
    run.add_argument("--max-connections", type=int, default=None,
                     help="open connections per listener kind (L4, L7); accepting pauses at it "
                          "(default: derived from the file-descriptor limit, docs/resilience.md)")
    run.add_argument("--request-buffer-size", type=int, default=None, metavar="BYTES",
                     help="read request bodies up to this size before an endpoint is chosen, so slow uploads "
                          "hold no upstream connection (default 0: stream them through)")
    run.add_argument("--default-tls-secret", metavar="NS/NAME", default=None, help="certificate for unknown SNI names")
    run.add_argument("--no-health-checks", action="store_true", help="do not run readinessProbes; use the pods' Ready condition")
    run.add_argument("--dns-server", action="append", metavar="HOST[:PORT]", help="resolver for DNS-backed services (repeatable; default: /etc/resolv.conf)")
    run.add_argument("--dns-min-ttl", type=_positive_float, default=None, help="shortest DNS refresh, seconds (default 5)")
    run.add_argument("--dns-max-ttl", type=_positive_float, default=None, help="longest DNS refresh, seconds (default 300)")
    run.add_argument("--dns-listen", type=_hostport, metavar="HOST:PORT", help="answer cluster DNS (<svc>.<ns>.svc.<domain>) here, UDP and TCP")
    run.add_argument("--cluster-domain", default=None, help="cluster DNS domain (default cluster.local)")
    run.add_argument("--dns-upstream", action="append", metavar="HOST[:PORT]",
                     help="where --dns-listen forwards names outside the cluster domain (repeatable; default: the "
                          "nameservers of /etc/resolv.conf)")
    run.add_argument("--proxy-mode", choices=PROXY_MODES, default=None,
                     help="L4 Services: userspace (listeners in this process) or nftables (rules in the kernel of this "
                          "network namespace, kept when the process exits; see 'meshproxy cleanup') (default userspace)")
    run.add_argument("--nft-table", type=_nft_name, default=None, metavar="NAME",
                     help="the nftables table (family inet) --proxy-mode nftables owns (default meshproxy)")
    run.add_argument("--udp-idle-timeout", type=_positive_float, default=None,
                     help="userspace mode: a UDP client's flow to its endpoint ends after this many idle seconds (default 30)")
    run.add_argument("--http-parser", choices=("auto", "compiled", "python", "compiled-strict", "python-strict", "fast", "strict"), default=None,
                     help="L7 per-message core (docs/l7.md 'Compiled core'): compiled (the Cython build of the parser "
                          "and header policy; an error if not built), python (the pure-Python reference; 'fast' is its "
                          "older name), python-strict / compiled-strict (that core without the one-call fast paths; strict is "
                          "python-strict), auto "
                          "(compiled when built, else python, unless $MESHPROXY_HTTP_PARSER says otherwise; default)")
    run.add_argument("--enable-ssl-passthrough", action="store_true",
                     help="on --ingress-tls-listen, relay TLS unterminated to the pods of Ingresses annotated "
                          "nginx.ingress.kubernetes.io/ssl-passthrough, chosen by SNI (docs/ingress-nginx.md)")
    run.add_argument("--takeover", action="store_true", help="start next to a running instance on the same ports (upgrade without dropping connections)")
    run.add_argument("--gateway-address", action="append", metavar="ADDR", default=None,
                     help="where a Gateway without spec.addresses binds its listeners (repeatable; default 0.0.0.0)")
    mesh = run.add_argument_group("mesh identity and policy (docs/mesh.md)")
    mesh.add_argument("--trust-domain", default=None, help="SPIFFE trust domain of the mesh (default cluster.local)")
    mesh.add_argument("--identity-dir", metavar="DIR", default=None,
                      help="workload SVID from DIR/svid.pem, svid_key.pem, bundle.pem (spiffe-helper's layout), watched")
    mesh.add_argument("--identity-issuer", metavar="URL", default=None,
                      help="workload SVID from `meshproxy identity serve` at URL (https://...), renewed at half-life")
    mesh.add_argument("--identity-issuer-ca", metavar="FILE", default=None,
                      help="PEM roots that verify the issuer before it handed out a trust bundle")
    mesh.add_argument("--identity-token-file", metavar="PATH", default=None,
                      help="ServiceAccount token shown to the issuer (default the projected token "
                           "/var/run/secrets/kubernetes.io/serviceaccount/token)")
    mesh.add_argument("--sidecar", action="store_true",
                      help="serve a meshed pod behind `meshproxy capture`: its outgoing TCP on --outbound-port, "
                           "incoming on --inbound-port, mutual TLS between meshed pods, PeerAuthentication and "
                           "AuthorizationPolicy (the pod from $POD_NAME, $POD_NAMESPACE, $POD_IP, $SERVICE_ACCOUNT)")
    mesh.add_argument("--outbound-port", type=int, default=None,
                      help="--sidecar: where capture sends the pod's outgoing TCP (default 15001, on 127.0.0.1 and ::1)")
    mesh.add_argument("--inbound-port", type=int, default=None,
                      help="--sidecar: where capture sends TCP to the pod's ports (default 15006)")
    mesh.add_argument("--proxy-uid", type=int, default=None,
                      help="--sidecar: the uid capture leaves alone (`meshproxy capture --proxy-uid`); the sidecar "
                           "must run as it, else it warns (its own connections would come back to it)")
    mesh.add_argument("--mesh-root-namespace", metavar="NS", default=None,
                      help="namespace whose PeerAuthentication / AuthorizationPolicy apply mesh-wide (default istio-system)")

    val = sub.add_parser("validate", help="check manifests: exit 0 when valid, 1 with one line per problem")
    _add_files(val)
    val.add_argument("--gateway-address", action="append", metavar="ADDR", default=None,
                     help="as for run: where Gateways without spec.addresses would bind")

    conv = sub.add_parser("convert", help="print the Gateway API equivalent of ingress-nginx Ingresses "
                                          "(warnings for what does not translate on stderr)")
    _add_files(conv)
    conv.add_argument("--ingress-class", default="nginx",
                      help="convert Ingresses of this class (and those without a class) (default nginx)")
    conv.add_argument("--gateway-class", default="meshproxy", help="name of the GatewayClass written (default meshproxy)")
    conv.add_argument("--gateway-name", default="nginx", help="name of the Gateway written (default nginx)")
    conv.add_argument("--gateway-namespace", default="default", help="namespace of the Gateway (default default)")
    conv.add_argument("--http-port", type=int, default=80, help="port of the Gateway's HTTP listener (default 80)")
    conv.add_argument("--https-port", type=int, default=443, help="port of its HTTPS / TLS listeners (default 443)")
    conv.add_argument("--address", action="append", default=None, metavar="IP",
                      help="spec.addresses of the Gateway (repeatable; default none: --gateway-address applies)")

    get = sub.add_parser("get", help="what the proxy would do, as a table")
    get.add_argument("what", choices=("services", "endpoints", "routes", "gateways", "httproutes", "grpcroutes",
                                      "tlsroutes", "tcproutes", "gatewayclasses"))
    _add_files(get)
    get.add_argument("-o", "--output", choices=("table", "json"), default="table")
    get.add_argument("--node", help="compute as this Node")
    get.add_argument("--gateway-address", action="append", metavar="ADDR", default=None,
                     help="as for run: where Gateways without spec.addresses would bind")

    cap = sub.add_parser("capture", help="install the pod's nftables rules that send its TCP through the sidecar "
                                         "(what the mesh's init container runs)")
    capture.add_arguments(cap)

    ident = sub.add_parser("identity", help="the mesh's certificate issuer")
    ident_sub = ident.add_subparsers(dest="identity_command", required=True, metavar="COMMAND")
    serve = ident_sub.add_parser("serve", help="sign workload CSRs after the API server confirms their ServiceAccount token")
    serve.add_argument("--listen", type=_hostport, default=("0.0.0.0", 15012), metavar="HOST:PORT",
                       help="HTTPS address of the issuer (default 0.0.0.0:15012)")
    serve.add_argument("--admin-listen", type=_hostport, default=("127.0.0.1", 15014), metavar="HOST:PORT",
                       help="plain HTTP /healthz /readyz /metrics (default 127.0.0.1:15014)")
    serve.add_argument("--ca-dir", required=True, metavar="DIR",
                       help="DIR/ca.pem (+ parents) and DIR/ca_key.pem; a new root is generated there when both are absent")
    serve.add_argument("--trust-bundle", metavar="FILE", help="more roots to hand out with every SVID (the other CA while one is rotated)")
    serve.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default %(default)s)")
    serve.add_argument("--ttl", type=_duration, default=24 * 3600.0,
                       help="lifetime of the SVIDs issued, e.g. 24h, 90m, 60s (default 24h)")
    serve.add_argument("--token-audience", action="append", metavar="AUD",
                       help="audience the workloads' tokens must carry (repeatable; default: the API server's own)")
    serve.add_argument("--dns-name", action="append", metavar="NAME",
                       help="name(s) in the issuer's serving certificate (repeatable; default localhost)")
    serve.add_argument("--kubeconfig", metavar="PATH", help="API server for TokenReviews (default: in-cluster)")
    serve.add_argument("--context", metavar="NAME", help="kubeconfig context")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    init_ca = ident_sub.add_parser("init-ca", help="generate a root CA (ca.pem, ca_key.pem) for the issuer and exit")
    init_ca.add_argument("--ca-dir", required=True, metavar="DIR", help="where to write ca.pem and ca_key.pem (must not hold them)")
    init_ca.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default %(default)s)")
    init_ca.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    clean = sub.add_parser("cleanup", help="remove the nftables rules --proxy-mode nftables left in this network namespace")
    clean.add_argument("--nft-table", type=_nft_name, default="meshproxy", metavar="NAME",
                       help="the table to delete (default %(default)s)")

    demo = sub.add_parser("demo", help="start demo pods and services and print the commands that show them")
    demo.add_argument("--check", action="store_true", help="run the tour itself and exit 0/1")
    demo.add_argument("--admin-listen", type=_hostport, default=("127.0.0.1", 9901), metavar="HOST:PORT")
    demo.add_argument("--ingress-listen", type=_hostport, default=("127.0.0.1", 8080), metavar="HOST:PORT")
    for name, helptext in (("top", "live table of the busiest routes and backends of a running instance"),
                           ("stat", "the same once, as plain tables")):
        t = sub.add_parser(name, help=helptext)
        t.add_argument("--admin", type=_hostport, default=("127.0.0.1", 9901), metavar="HOST:PORT",
                       help="admin address of the running instance (default 127.0.0.1:9901)")
        t.add_argument("--interval" if name == "top" else "--window", type=_positive_float, default=2.0 if name == "top" else 5.0,
                       dest="interval", metavar="SECONDS",
                       help="time between the two reads of /metrics that rates come from (default %(default)s)")
        t.add_argument("-n", "--limit", type=int, default=None, help="rows per table (default: what fits, or 20)")
        if name == "top":
            t.add_argument("--iterations", type=int, default=None, metavar="N",
                           help="refresh N times, then exit (default: until q / Ctrl-C on a terminal, once otherwise)")
        else:
            t.add_argument("-o", "--output", choices=("table", "json"), default="table")
    return parser


# Flags that are plain values: argparse destination -> Settings field.
_FLAG_FIELDS = {
    "node": "node", "ingress_listen": "ingress_listen", "ingress_tls_listen": "ingress_tls_listen",
    "admin_listen": "admin_listen", "workers": "workers", "log_level": "log_level", "access_log": "access_log",
    "lb_policy": "lb_policy", "l7_lb_policy": "l7_lb_policy", "ingress_class": "ingress_class",
    "drain_timeout": "drain_timeout", "shutdown_delay": "shutdown_delay", "connect_timeout": "connect_timeout",
    "idle_timeout": "idle_timeout", "upstream_timeout": "upstream_timeout", "header_timeout": "header_timeout",
    "keepalive_timeout": "keepalive_timeout", "send_timeout": "send_timeout", "max_body_size": "max_body_size",
    "request_buffer_size": "request_buffer_size",
    "max_connections": "max_connections", "default_tls_secret": "default_tls_secret", "service_cidr": "service_cidr",
    "dns_min_ttl": "dns_min_ttl", "dns_max_ttl": "dns_max_ttl", "dns_listen": "dns_listen",
    "cluster_domain": "cluster_domain", "http_parser": "http_parser",
    "proxy_mode": "proxy_mode", "nft_table": "nft_table", "udp_idle_timeout": "udp_idle_timeout",
    "kubeconfig": "kubeconfig", "context": "kube_context", "namespace": "kube_namespace",
    "publish_service": "publish_service",
    "access_log_format": "access_log_format", "access_log_buffer": "access_log_buffer",
    "otlp_endpoint": "otlp_endpoint", "trace_sampling": "trace_sampling",
    "trust_domain": "trust_domain", "identity_dir": "identity_dir", "identity_issuer": "identity_issuer",
    "identity_issuer_ca": "identity_issuer_ca", "identity_token_file": "identity_token_file",
    "mesh_root_namespace": "mesh_root_namespace",
    "outbound_port": "outbound_port", "inbound_port": "inbound_port", "proxy_uid": "proxy_uid",
}


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults, then the --config file, then the flags given. Raises ValueError (a
    SettingsFileError for the file) naming what is wrong."""
    s = Settings(paths=list(args.paths or []))
    config = getattr(args, "config", None)
    if config:
        s.config_file = os.path.abspath(config)
        for name, value in read_settings_file(config).items():
            setattr(s, name, value)
    given: dict[str, object] = {}
    for arg_name, field_name in _FLAG_FIELDS.items():
        value = getattr(args, arg_name, None)
        if value is not None:
            given[field_name] = value
    if getattr(args, "trusted_proxies", None):
        given["trusted_proxies"] = _comma_list(args.trusted_proxies)
    if getattr(args, "watch_ingress_without_class", None) is not None:
        given["watch_ingress_without_class"] = args.watch_ingress_without_class == "true"
    if getattr(args, "dns_server", None):
        given["dns_servers"] = tuple(parse_servers(args.dns_server))
    if getattr(args, "gateway_address", None):
        given["gateway_addresses"] = _gateway_addresses(args.gateway_address)
    if getattr(args, "dns_upstream", None):
        given["dns_upstreams"] = tuple(parse_servers(args.dns_upstream))
    if getattr(args, "no_health_checks", False):
        given["health_checks"] = False
    if getattr(args, "update_status", None) is not None:
        given["update_status"] = args.update_status == "true"
    if getattr(args, "publish_status_address", None):
        given["publish_status_address"] = _comma_list(args.publish_status_address)
    for name, value in given.items():
        setattr(s, name, value)
    s.from_flags = frozenset(given)
    s.takeover = bool(getattr(args, "takeover", False))
    if s.dns_min_ttl > s.dns_max_ttl:
        raise ValueError("--dns-min-ttl must not exceed --dns-max-ttl")
    if getattr(args, "no_health_checks", False):
        s.health_checks = False
    if getattr(args, "enable_ssl_passthrough", False):
        s.ssl_passthrough = True
    s.takeover = bool(getattr(args, "takeover", False))
    if getattr(args, "update_status", None) is not None:
        s.update_status = args.update_status == "true"
    if getattr(args, "publish_status_address", None):
        s.publish_status_address = tuple(v.strip() for v in args.publish_status_address.split(",") if v.strip())
    if s.publish_status_address or s.publish_service:
        check_publish_settings(s.publish_status_address, s.publish_service)   # ValueError names the bad one
    # The API is the source when asked for, or when there are no files to read.
    s.kube_api = bool(s.kubeconfig) or not s.paths
    for cidr in s.trusted_proxies:
        ipaddress.ip_network(cidr, strict=False)   # ValueError names the bad one
    parse_cidrs(s.service_cidr)
    if s.proxy_mode not in PROXY_MODES:
        raise ValueError(f"proxy-mode: {s.proxy_mode!r} is not one of {', '.join(PROXY_MODES)}")
    if s.workers < 1:
        raise ValueError("--workers must be at least 1")
    _check_observability(s)
    if not re.fullmatch(r"[a-z0-9._-]{1,255}", s.trust_domain):
        raise ValueError(f"--trust-domain {s.trust_domain!r}: lowercase letters, digits, '.', '-', '_' (a SPIFFE trust domain)")
    if getattr(args, "sidecar", False) or s.sidecar is True:
        _sidecar_settings(s)
    if s.identity_dir and s.identity_issuer:
        raise ValueError("--identity-dir and --identity-issuer are two sources of one identity: give one")
    if s.identity_issuer and not s.identity_issuer.startswith("https://"):
        raise ValueError(f"--identity-issuer {s.identity_issuer!r}: expected https://HOST[:PORT]")
    if s.identity_issuer and not s.identity_issuer_ca:
        # The issuer's certificate is signed by the mesh's own CA, which no system store holds.
        raise ValueError("--identity-issuer needs --identity-issuer-ca FILE (the mesh's root, which verifies the issuer)")
    return s


def _sidecar_settings(s: Settings, env=None) -> None:
    """``--sidecar``: the pod from the downward API, the ports checked. Raises ValueError."""
    env = os.environ if env is None else env
    s.sidecar = True
    for attr in ("outbound_port", "inbound_port"):
        v = getattr(s, attr)
        if not isinstance(v, int) or not 1 <= v <= 65535:
            raise ValueError(f"--{attr.replace('_', '-')} {v!r} is not a port (1-65535)")
    if s.outbound_port == s.inbound_port:
        raise ValueError("--outbound-port and --inbound-port must differ")
    if s.proxy_uid is not None and (not isinstance(s.proxy_uid, int) or s.proxy_uid < 0):
        raise ValueError(f"--proxy-uid {s.proxy_uid!r} is not a uid")
    if s.workers != 1:
        raise ValueError("--sidecar serves one pod: --workers must be 1")
    if s.ingress_listen or s.ingress_tls_listen:
        raise ValueError("--sidecar: the pod's traffic arrives through capture; --ingress-listen does not apply")
    if s.proxy_mode != "userspace":
        raise ValueError("--sidecar and --proxy-mode nftables are two different ways of serving; give one")
    s.pod_name = env.get("POD_NAME") or s.pod_name
    s.pod_namespace = env.get("POD_NAMESPACE") or s.pod_namespace or "default"
    s.pod_ip = env.get("POD_IP") or s.pod_ip
    s.service_account = env.get("SERVICE_ACCOUNT") or s.service_account
    if s.pod_ip:
        try:
            ipaddress.ip_address(s.pod_ip)
        except ValueError:
            raise ValueError(f"POD_IP {s.pod_ip!r} is not an IP address") from None


def _check_observability(s: Settings) -> None:
    """Values a ConfigMap holds as strings are converted; errors name the flag."""
    try:
        s.trace_sampling = float(s.trace_sampling)
    except (TypeError, ValueError):
        raise ValueError(f"--trace-sampling: {s.trace_sampling!r} is not a number") from None
    if not 0.0 <= s.trace_sampling <= 1.0:
        raise ValueError(f"--trace-sampling: {s.trace_sampling:g} is outside 0..1")
    try:
        s.access_log_buffer = int(s.access_log_buffer)
    except (TypeError, ValueError):
        raise ValueError(f"--access-log-buffer: {s.access_log_buffer!r} is not a number") from None
    if s.access_log_buffer < 1:
        raise ValueError("--access-log-buffer must be at least 1")
    try:
        compile_format(str(s.access_log_format))
    except FormatError as exc:
        raise ValueError(f"--access-log-format: {exc}") from None
    if s.otlp_endpoint is not None:
        u = urllib.parse.urlsplit(str(s.otlp_endpoint))
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError(f"--otlp-endpoint: {s.otlp_endpoint!r}: expected http(s)://HOST[:PORT][/PATH]")


def _gateway_addresses(values: Sequence[str]) -> tuple[str, ...]:
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_address(v.strip())))
        except ValueError:
            raise ValueError(f"--gateway-address {v!r}: not an IP address") from None
    return tuple(dict.fromkeys(out))


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _cmd_validate(args: argparse.Namespace) -> int:
    result = load_paths(args.paths, args.service_cidr)
    for err in result.errors:
        print(err, file=sys.stdout)
    if result.errors:
        return 1
    # What the API would accept but does not work: Gateway API objects whose status says so
    # (a missing backend, a reference without its ReferenceGrant, conflicting listeners, ...).
    try:
        ctl = _offline_controller(args, result)
    except ValueError as exc:   # a bad flag value (e.g. --gateway-address), as for get
        print(f"meshproxy: {exc}", file=sys.stderr)
        return 2
    gw = ctl.builder.gateway_result if ctl is not None else None
    lines = gw.problem_lines(with_place=True) if gw is not None else []
    # ingress-nginx annotations refused (the Ingress is not served), denied (its paths answer
    # 503) or not applied: one line each, so a migrating user sees what will not happen.
    if ctl is not None:
        for ing, f in ctl.builder.ingress_findings:
            lines.append(format_problem(ing, f"metadata.annotations[{f.annotation}]", f.message, with_place=True))
    for line in lines:
        print(line, file=sys.stdout)
    if lines:
        return 1
    print(f"ok: {len(result.objects)} objects", file=sys.stderr)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import yaml
    result = load_paths(args.paths, args.service_cidr)
    for err in result.errors:
        print(err, file=sys.stderr)
    if result.errors:
        return 1
    try:
        addresses = _gateway_addresses(args.address or ())
    except ValueError as exc:
        print(f"meshproxy: {exc}", file=sys.stderr)
        return 2
    opts = ConvertOptions(ingress_class=args.ingress_class, gateway_class=args.gateway_class,
                          gateway_name=args.gateway_name, gateway_namespace=args.gateway_namespace,
                          http_port=args.http_port, https_port=args.https_port, addresses=addresses)
    docs, warnings = convert(result.objects, opts)

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:   # each rule written out in full, no &anchors
            return True
    sys.stdout.write(yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, default_flow_style=False))
    sys.stdout.flush()
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _offline_controller(args: argparse.Namespace, result):
    from .controller import Controller   # late: see the module docstring
    # Problems are printed once, as warnings, by the caller.
    logging.getLogger("meshproxy").setLevel(logging.ERROR)
    settings = Settings(paths=list(args.paths), node=getattr(args, "node", None), service_cidr=args.service_cidr)
    if getattr(args, "gateway_address", None):
        settings.gateway_addresses = _gateway_addresses(args.gateway_address)
    ctl = Controller(settings, lambda snap: None)
    ctl.apply_events([Event(ADDED, o) for o in result.objects])
    ctl.rebuild()
    return ctl


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["   ".join(str(v).ljust(w) for v, w in zip(header, widths)).rstrip()]
    for r in rows:
        lines.append("   ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _cmd_get(args: argparse.Namespace) -> int:
    result = load_paths(args.paths, args.service_cidr)
    if result.errors:
        for err in result.errors:
            print(err, file=sys.stderr)
        return 1
    try:
        ctl = _offline_controller(args, result)
    except ValueError as exc:
        print(f"meshproxy: {exc}", file=sys.stderr)
        return 2
    snap = ctl.snapshot
    if args.what in GATEWAY_TABLES:
        print(gateway_table(args.what, snap.gateway_status, ctl.store, args.output))
        for p in snap.problems:
            print(f"warning: {p}", file=sys.stderr)
        return 0
    data = snap.to_json()
    if args.what == "services":
        items = data["services"]
        if args.output == "json":
            print(json.dumps(items, indent=2))
            return 0
        rows = []
        for s in items:
            ports = ",".join(f"{p['port']}{'/' + str(p['nodePort']) if p['nodePort'] else ''}"
                             f"{'(' + p['name'] + ')' if p['name'] else ''}" for p in s["ports"])
            ready = sum(1 for e in data["endpoints"] if e["namespace"] == s["namespace"] and e["service"] == s["name"]
                        for x in e["endpoints"] if x["ready"])
            rows.append([s["namespace"], s["name"], s["type"], s["clusterIP"] or "<none>", ports or "<none>",
                         s["sessionAffinity"], str(ready)])
        print(_table(rows, ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "PORT(S)", "AFFINITY", "READY-ENDPOINTS"]))
    elif args.what == "endpoints":
        items = data["endpoints"]
        if args.output == "json":
            print(json.dumps(items, indent=2))
            return 0
        rows = []
        for e in items:
            for x in e["endpoints"] or [None]:
                if x is None:
                    rows.append([e["namespace"], e["service"], str(e["port"]), "<none>", "", "", ""])
                    continue
                state = "ready" if x["ready"] else ("terminating" if x["terminating"] else "not-ready")
                if x["serving"] and not x["ready"]:
                    state += "(serving)"
                rows.append([e["namespace"], e["service"], str(e["port"]), f"{x['ip']}:{x['port']}",
                             x["pod"] or "", x["node"] or "", state])
        print(_table(rows, ["NAMESPACE", "SERVICE", "PORT", "ENDPOINT", "POD", "NODE", "STATE"]))
    else:
        items = data["routes"]
        if args.output == "json":
            print(json.dumps(items, indent=2))
            return 0
        rows = [[r.get("host") or "*", r.get("path", ""), r.get("pathType", ""), str(r.get("backend", "")),
                 r.get("ingress", "")] for r in items]
        print(_table(rows, ["HOST", "PATH", "PATH-TYPE", "BACKEND", "INGRESS"]))
    for p in data["problems"]:
        print(f"warning: {p}", file=sys.stderr)
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from .dataplane import NftError, cleanup   # late: see the module docstring
    try:
        found = cleanup(args.nft_table)
    except (OSError, NftError) as exc:
        print(f"meshproxy cleanup: table inet {args.nft_table}: {exc}", file=sys.stderr)
        return 1
    print(f"table inet {args.nft_table} {'deleted' if found else 'not present'}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        return _cmd_cleanup(args)
    if args.command == "validate":
        return _cmd_validate(args)
    if args.command == "get":
        return _cmd_get(args)
    if args.command == "convert":
        return _cmd_convert(args)
    if args.command in ("top", "stat"):
        from .top import run_top      # late: see the module docstring
        return run_top(args)
    if args.command == "capture":
        return capture.run_capture(args)
    if args.command == "identity":
        setup_logging(args.log_level)
        from .issuer import init_ca, serve_issuer   # late: imports prometheus_client (module docstring)
        return serve_issuer(args) if args.identity_command == "serve" else init_ca(args)
    if args.command == "demo":
        from .demo import run_demo
        setup_logging("warning")
        return run_demo(args)
    try:
        settings = settings_from_args(args)
    except SettingsFileError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"meshproxy: --config {args.config}: {len(exc.problems)} problem(s); not starting", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"meshproxy: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    if settings.workers > 1:
        # Before prometheus_client is imported: worker metrics are summed by the parent.
        prepare_multiprocess_metrics()
        # Imported only now, and only here, for that reason: the process modules import
        # prometheus_client.
        from .workers import run_workers
        return run_workers(settings)
    from .process import serve
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
