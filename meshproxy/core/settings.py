"""Proxy settings that are not Kubernetes objects: listen addresses, identity, timeouts, limits.

They come from command-line flags (``meshproxy run --help``) and, optionally, a settings file
(``--config FILE``): a ConfigMap manifest, whose ``data`` values are all strings
(``drain-timeout: "2"``), or a plain YAML mapping with native values (``drain-timeout: 2``).
Keys are the flags' names without the leading dashes. Flags given on the command line win over
the file. Every key is converted and checked here (``SETTING_KEYS``); a bad file is refused
whole with one ``file:line: key: message`` per problem (``SettingsFileError``).

Some settings can change while the process runs (``SettingKey.live``: timeouts, limits,
balancing policies, trusted proxies, Ingress class, log level): a re-read file (SIGHUP, or the
file changed) applies them at once. The others (listen addresses, workers, sources) are
reported as needing a restart (``diff_settings``).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import yaml

from discovery.ipfamilies import parse_cidrs
from discovery.manifest_yaml import LineLoader, line_of
from discovery.sources.dns import parse_servers

from .logformat import FormatError, compile_format

__all__ = ["Settings", "parse_hostport", "parse_duration", "LB_POLICIES", "LOG_LEVELS", "SETTING_KEYS", "SettingKey",
           "SettingsFileError", "read_settings_file", "diff_settings", "setting_key", "PROXY_MODES"]

PROXY_MODES = ("userspace", "nftables")
LB_POLICIES = ("random", "round_robin", "least_connections", "p2c", "ring_hash", "maglev")
LOG_LEVELS = ("debug", "info", "warning", "error")
HTTP_PARSERS = ("auto", "strict", "fast")


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


def parse_duration(text: str) -> float:
    """``30``, ``30s``, ``1.5s``, ``250ms``, ``2m``, ``1h`` -> seconds. Raises ValueError."""
    t = text.strip().lower()
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if t.endswith(suffix):
            t, factor = t[: -len(suffix)], mult
            break
    else:
        factor = 1.0
    try:
        value = float(t) * factor
    except ValueError:
        raise ValueError(f"{text!r} is not a duration") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a duration")
    return value


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
    # run --sidecar (docs/mesh.md "The data path"): the pod's own sidecar behind `meshproxy capture`
    sidecar: bool = False
    outbound_port: int = 15001                      # captured outbound TCP arrives here (127.0.0.1, ::1)
    inbound_port: int = 15006                       # captured inbound TCP arrives here
    inbound_host: str = "::"                        # where the inbound port is bound ("::": every address, both families)
    outbound_host: str = "127.0.0.1"                # where the outbound port is bound (also ::1 when "127.0.0.1")
    proxy_uid: int | None = None                    # the uid capture leaves alone: must be ours
    # The pod this sidecar belongs to, from the downward API (POD_NAME, POD_NAMESPACE, POD_IP,
    # SERVICE_ACCOUNT); the Pod object of the store fills in what they leave out.
    pod_name: str | None = None
    pod_namespace: str | None = None
    pod_ip: str | None = None
    service_account: str | None = None
    # How long a plaintext-capable inbound port waits for the caller's first byte to tell a TLS
    # ClientHello from plaintext before treating the connection as plaintext (server-first
    # protocols, whose clients wait for the server, then still work).
    mesh_detect_timeout: float = 1.0
    # Where a Gateway without spec.addresses binds its listeners (--gateway-address, repeatable).
    gateway_addresses: tuple[str, ...] = ("0.0.0.0",)
    # The L7 server speaks HTTP/2 (h2c prior knowledge, ALPN h2) and HTTP/2 to h2c / grpc Service
    # ports (docs/http2.md). Off: GRPCRoutes are not accepted, h2c / grpc Service ports stay at
    # L4 and pods are spoken to in HTTP/1.1 only.
    http2: bool = True
    dns_upstreams: tuple[tuple[str, int], ...] = ()  # where cluster DNS forwards other names (default: /etc/resolv.conf)
    proxy_mode: str = "userspace"          # L4: "userspace" (listeners, l4/) or "nftables" (kernel rules)
    nft_table: str = "meshproxy"           # the inet table nftables mode owns
    udp_idle_timeout: float = 30.0         # userspace UDP: a client's flow is forgotten after this long
    config_file: str | None = None         # --config FILE, re-read on SIGHUP and when it changes
    from_flags: frozenset[str] = frozenset()   # fields the command line set: the file cannot change them


# --------------------------------------------------------------------------------------------
# The settings file: one converter per key. Each takes what YAML gave (a ConfigMap's string, or
# a native value) and returns the field's value or raises ValueError with a message that does
# not repeat the key (the caller adds file, line and key).


def _text(v: Any) -> str:
    if isinstance(v, (dict, list)) or isinstance(v, bool) or v is None:
        raise ValueError(f"must be a string, not {_what(v)}")
    v = str(v).strip()
    if not v:
        raise ValueError("must not be empty")
    return v


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An empty value (``""`` or null) means "off": the field's None."""
    def opt(v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return convert(v)
    return opt


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ValueError(f"must be true or false, not {_what(v)}")


def _integer(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"must be a whole number, not {_what(v)}")
    if isinstance(v, str):
        if not re.fullmatch(r"\s*[0-9]+\s*", v):
            raise ValueError(f"must be a whole number, not {_what(v)}")
        v = int(v)
    return v


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        n = _integer(v)
        if not lo <= n <= hi:
            raise ValueError(f"{n} is outside {lo}-{hi}")
        return n
    return conv


_SIZE = re.compile(r"\s*([0-9]+)\s*([kmg]?)i?b?\s*", re.I)


def _size(v: Any) -> int:
    """Bytes: ``1048576``, or with a binary suffix as nginx writes it: ``1m``, ``512k``, ``1g``."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"must be a size in bytes (1048576, 512k, 1m), not {_what(v)}")
    if isinstance(v, int):
        n = v
    else:
        m = _SIZE.fullmatch(v)
        if m is None:
            raise ValueError(f"must be a size in bytes (1048576, 512k, 1m), not {_what(v)}")
        n = int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]
    if n < 0:
        raise ValueError(f"{n} must not be negative")
    return n


def _duration(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"must be a duration in seconds (10, 2.5, 500ms, 2m), not {_what(v)}")
    if isinstance(v, (int, float)):
        if not 0 <= v < float("inf"):
            raise ValueError(f"{v} must not be negative")
        return float(v)
    try:
        return parse_duration(v)
    except ValueError:
        raise ValueError(f"must be a duration in seconds (10, 2.5, 500ms, 2m), not {_what(v)}") from None


def _choice(choices: Iterable[str]) -> Callable[[Any], str]:
    choices = tuple(choices)

    def conv(v: Any) -> str:
        t = _text(v)
        if t not in choices:
            raise ValueError(f"{t!r} is not one of {', '.join(choices)}")
        return t
    return conv


def _hostport(v: Any) -> tuple[str, int]:
    return parse_hostport(_text(v))


def _cidr(v: Any) -> str:
    t = _text(v)
    try:
        ipaddress.ip_network(t, strict=False)
    except ValueError:
        raise ValueError(f"{t!r} is not an address range (CIDR)") from None
    return t


def _service_cidr(v: Any) -> str:
    """One range, or an IPv4 and an IPv6 range separated by a comma (dual stack)."""
    t = _text(v)
    try:
        parse_cidrs(t)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("--service-cidr").lstrip(": ")) from None
    return t


def _items(v: Any) -> list[str]:
    """A comma-separated string (all a ConfigMap can hold) or a YAML list."""
    if isinstance(v, list):
        return [_text(x) for x in v]
    if v is None:
        return []
    return [x.strip() for x in _text(v).split(",") if x.strip()]


def _cidrs(v: Any) -> tuple[str, ...]:
    return tuple(_cidr(x) for x in _items(v))


def _strings(v: Any) -> tuple[str, ...]:
    return tuple(_items(v))


def _dns_servers(v: Any) -> tuple[tuple[str, int], ...]:
    try:
        return tuple(parse_servers(_items(v)))
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("--dns-server ")) from None


def _ratio(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"must be a number from 0 to 1, not {_what(v)}")
    try:
        r = float(v)
    except ValueError:
        raise ValueError(f"must be a number from 0 to 1, not {_what(v)}") from None
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"{r:g} is outside 0..1")
    return r


def _http_url(v: Any) -> str:
    t = _text(v)
    u = urllib.parse.urlsplit(t)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise ValueError(f"{t!r}: expected http(s)://HOST[:PORT][/PATH]")
    return t


def _access_log_format(v: Any) -> str:
    t = _text(v)
    try:
        compile_format(t)
    except FormatError as exc:
        raise ValueError(str(exc)) from None
    return t


def _trust_domain(v: Any) -> str:
    t = _text(v)
    if not re.fullmatch(r"[a-z0-9._-]{1,255}", t):
        raise ValueError(f"{t!r}: lowercase letters, digits, '.', '-', '_' (a SPIFFE trust domain)")
    return t


def _ip_list(v: Any) -> tuple[str, ...]:
    out = []
    for item in _items(v):
        try:
            out.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address") from None
    if not out:
        raise ValueError("must name at least one address")
    return tuple(dict.fromkeys(out))


def _nft_table(v: Any) -> str:
    t = _text(v)
    # nft identifiers: a letter or underscore, then letters, digits, '_', '-', '.'.
    if len(t) > 255 or not (t[0].isalpha() or t[0] == "_") or any(not (c.isalnum() or c in "_-.") for c in t):
        raise ValueError(f"{t!r} is not an nftables table name")
    return t


def _ns_name(v: Any) -> str:
    t = _text(v)
    ns, slash, name = t.partition("/")
    if not slash or not ns or not name or "/" in name:
        raise ValueError(f"{t!r} must be NAMESPACE/NAME")
    return t


def _what(v: Any) -> str:
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, bool):
        return "a boolean"
    if v is None:
        return "null"
    return repr(v)


@dataclass(frozen=True, slots=True)
class SettingKey:
    key: str                          # spelling in the file: the flag without its dashes
    field: str                        # Settings field
    convert: Callable[[Any], Any]
    live: bool                        # takes effect in a running process when the file changes
    rebuild: bool = False             # read by the snapshot builder: a change needs a full rebuild


def _k(key: str, fld: str, convert: Callable[[Any], Any], live: bool = False, rebuild: bool = False) -> SettingKey:
    return SettingKey(key, fld, convert, live, rebuild)


SETTING_KEYS: dict[str, SettingKey] = {k.key: k for k in (
    _k("node", "node", _text),
    _k("ingress-listen", "ingress_listen", _optional(_hostport)),
    _k("ingress-tls-listen", "ingress_tls_listen", _optional(_hostport)),
    _k("admin-listen", "admin_listen", _hostport),
    _k("workers", "workers", _int_range(1, 256)),
    _k("log-level", "log_level", _choice(LOG_LEVELS), live=True),
    _k("access-log", "access_log", _optional(_text)),
    _k("service-cidr", "service_cidr", _service_cidr),
    _k("lb-policy", "lb_policy", _choice(LB_POLICIES), live=True, rebuild=True),
    _k("l7-lb-policy", "l7_lb_policy", _choice(LB_POLICIES), live=True, rebuild=True),
    _k("ingress-class", "ingress_class", _text, live=True, rebuild=True),
    _k("watch-ingress-without-class", "watch_ingress_without_class", _bool, live=True, rebuild=True),
    _k("trusted-proxies", "trusted_proxies", _cidrs, live=True),
    _k("drain-timeout", "drain_timeout", _duration, live=True),
    _k("shutdown-delay", "shutdown_delay", _duration, live=True),
    _k("connect-timeout", "connect_timeout", _duration, live=True),
    _k("idle-timeout", "idle_timeout", _duration, live=True),
    _k("upstream-timeout", "upstream_timeout", _duration, live=True, rebuild=True),
    _k("header-timeout", "header_timeout", _duration, live=True),
    _k("keepalive-timeout", "keepalive_timeout", _duration, live=True),
    _k("send-timeout", "send_timeout", _duration, live=True),
    _k("max-body-size", "max_body_size", _optional(_size), live=True),
    _k("max-connections", "max_connections", _optional(_int_range(1, 10_000_000)), live=True),
    _k("default-tls-secret", "default_tls_secret", _optional(_ns_name), live=True, rebuild=True),
    _k("health-checks", "health_checks", _bool),
    _k("dns-server", "dns_servers", _dns_servers),
    _k("dns-min-ttl", "dns_min_ttl", _duration),
    _k("dns-max-ttl", "dns_max_ttl", _duration),
    _k("dns-listen", "dns_listen", _optional(_hostport)),
    _k("cluster-domain", "cluster_domain", _text),
    _k("http-parser", "http_parser", _choice(HTTP_PARSERS)),
    _k("kubeconfig", "kubeconfig", _optional(_text)),
    _k("context", "kube_context", _optional(_text)),
    _k("namespace", "kube_namespace", _optional(_text)),
    _k("update-status", "update_status", _bool),
    _k("publish-status-address", "publish_status_address", _strings),
    _k("publish-service", "publish_service", _optional(_ns_name)),
    _k("access-log-format", "access_log_format", _access_log_format),
    _k("access-log-buffer", "access_log_buffer", _int_range(1, 10_000_000)),
    _k("otlp-endpoint", "otlp_endpoint", _optional(_http_url)),
    _k("trace-sampling", "trace_sampling", _ratio),
    _k("trust-domain", "trust_domain", _trust_domain),
    _k("identity-dir", "identity_dir", _optional(_text)),
    _k("identity-issuer", "identity_issuer", _optional(_text)),
    _k("identity-issuer-ca", "identity_issuer_ca", _optional(_text)),
    _k("identity-token-file", "identity_token_file", _optional(_text)),
    _k("mesh-root-namespace", "mesh_root_namespace", _text),
    _k("request-buffer-size", "request_buffer_size", _size),
    _k("gateway-address", "gateway_addresses", _ip_list),
    _k("dns-upstream", "dns_upstreams", _dns_servers),
    _k("proxy-mode", "proxy_mode", _choice(PROXY_MODES)),
    _k("nft-table", "nft_table", _nft_table),
    _k("udp-idle-timeout", "udp_idle_timeout", _duration),
)}
_BY_FIELD = {k.field: k for k in SETTING_KEYS.values()}


class SettingsFileError(ValueError):
    """A settings file that cannot be used; ``problems`` are ``file:line: key: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def read_settings_file(path: str) -> dict[str, Any]:
    """The settings of ``path`` as {field: value}. Raises SettingsFileError with every problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsFileError([f"{path}: cannot read: {exc}"]) from None
    try:
        doc = yaml.load(text, Loader=LineLoader)   # noqa: S506 - LineLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise SettingsFileError([f"{path}:{line}: invalid YAML: {getattr(exc, 'problem', None) or exc}"]) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SettingsFileError([f"{path}:{line_of(doc) or 1}: expected a mapping of settings or a ConfigMap, not {_what(doc)}"])
    if doc.get("kind") == "ConfigMap":
        data = doc.get("data")
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise SettingsFileError([f"{path}:{line_of(doc, 'data') or 1}: data: must be a mapping, not {_what(data)}"])
        doc = data
    problems: list[str] = []
    out: dict[str, Any] = {}
    for key, value in doc.items():
        where = f"{path}:{line_of(doc, key) or 1}: {key}"
        spec = SETTING_KEYS.get(key) if isinstance(key, str) else None
        if spec is None:
            close = [k for k in SETTING_KEYS if isinstance(key, str) and k.replace("-", "") == key.replace("-", "").replace("_", "")]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}: unknown setting{hint}")
            continue
        try:
            out[spec.field] = spec.convert(value)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    if "dns_min_ttl" in out and "dns_max_ttl" in out and out["dns_min_ttl"] > out["dns_max_ttl"]:
        problems.append(f"{path}:{line_of(doc, 'dns-min-ttl') or 1}: dns-min-ttl: must not exceed dns-max-ttl")
    if problems:
        raise SettingsFileError(problems)
    return out


def diff_settings(current: Settings, file_values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """What a re-read file changes: ({field: new value} of live settings, [keys of settings
    that changed but need a restart]). Fields the command line set are not the file's to change;
    a key that left the file goes back to its default."""
    defaults = Settings()
    live: dict[str, Any] = {}
    restart: list[str] = []
    for spec in SETTING_KEYS.values():
        if spec.field in current.from_flags:
            continue
        new = file_values.get(spec.field, getattr(defaults, spec.field))
        if new == getattr(current, spec.field):
            continue
        if spec.live:
            live[spec.field] = new
        else:
            restart.append(spec.key)
    return live, restart


def setting_key(field_name: str) -> SettingKey:
    """The file key of a Settings field."""
    return _BY_FIELD[field_name]
