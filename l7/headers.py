"""Header policy of the L7 proxy: what crosses it, what is removed, what is added. Pure functions.

The parser (``l7.http1``) hands over field lists of ``(name, value)`` bytes in their original
order and case, framing fields included; these functions build the lists that the serializers
write on the other side. docs/l7.md has the table of every decision and its reason.

Rules kept here:

* Hop-by-hop fields never cross (RFC 9110 §7.6.1): ``Connection`` and every field it names,
  ``Keep-Alive``, ``TE``, ``Transfer-Encoding``, ``Upgrade`` (unless the exchange becomes a
  tunnel), ``Proxy-Connection``, ``HTTP2-Settings`` (RFC 7540 §3.2.1: a connection-specific
  field of the h2c upgrade, which we never forward - always removed); and ``Trailer``
  (hop-by-hop in RFC 2616 §13.5.1 and in the L7 issue; trailers themselves are still forwarded
  when both sides are chunked).
* A tunnelled upgrade offers the pod ``websocket`` only: other members of the client's
  ``Upgrade`` (``h2c``, ...) are removed, so the pod cannot pick a protocol the proxy does not
  tunnel (an h2c connection would carry requests for any path past the routing rules).
  ``Content-Length`` is removed too: framing is re-written from parsed fields by the
  serializers, never copied.
* ``Proxy-*`` and ``Proxy``: ``Proxy-Authorization`` / ``Proxy-Authenticate`` carry
  credentials and challenges for a proxy the *client* chose (RFC 9110 §11.7.1, §11.7.2: they
  apply to the next hop only). A gateway is not that proxy and its backends are not proxies of
  the client, so both are removed rather than leaked to (or accepted from) a backend. ``Proxy``
  is removed from requests because CGI-style backends turn it into ``HTTP_PROXY`` (httpoxy,
  CVE-2016-5385).
* ``Expect`` is removed from requests: the proxy answers ``100-continue`` itself.
* ``Host`` is never removed, even when ``Connection`` names it: a backend must see the
  original Host (for an absolute-form target, the target's authority, RFC 9112 §3.2.2).
* Forwarding fields (``X-Forwarded-For`` / ``-Proto`` / ``-Host`` / ``-Port``, ``X-Real-IP``,
  ``Forwarded``) sent by the client are kept only when the peer is a trusted proxy
  (``--trusted-proxies``); then the peer is appended to ``X-Forwarded-For`` and ``Forwarded``
  and the other incoming values are kept. From anyone else they are dropped and replaced, so a
  client cannot spoof its address or scheme.
* ``Via`` is not added by default (many proxies leave it off: it reveals the proxy); the
  ``via`` argument turns it on (RFC 9110 §7.6.3, appended to any incoming value).

The common request (no Connection field, an untrusted client) is one pass over the field list
with one dict probe per field (on the name as spelt, see ``_REQUEST_SEEN``), plus the
per-connection fields built once in ``ClientInfo``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

__all__ = [
    "ClientInfo",
    "ClientInfoCache",
    "TrustedProxies",
    "forwarded_node",
    "forwarded_element",
    "request_headers",
    "response_headers",
    "IDEMPOTENT_METHODS",
]

# RFC 9110 §9.2.2.
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

# The one protocol a request is tunnelled for (l7.http1 sets ``RequestHead.upgrade`` only then).
_TUNNEL_PROTOCOL = b"websocket"

# What the one pass does with a field, by lowercased name (0: nothing special, keep it).
_PLAIN, _DROP, _KEEP_HOST, _XFF, _XFP, _XFH, _XFPORT, _XRIP, _FWD, _VIA, _UPGRADE = range(11)

_COMMON_DROP = (
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"content-length",
    b"proxy-connection", b"proxy-authorization", b"proxy-authenticate", b"http2-settings",
)
_REQUEST_ACTIONS: dict[bytes, int] = {name: _DROP for name in _COMMON_DROP}
_REQUEST_ACTIONS.update({
    b"proxy": _DROP,
    b"expect": _DROP,
    b"host": _KEEP_HOST,
    b"upgrade": _UPGRADE,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"x-forwarded-host": _XFH,
    b"x-forwarded-port": _XFPORT,
    b"x-real-ip": _XRIP,
    b"forwarded": _FWD,
    b"via": _VIA,
})
_RESPONSE_ACTIONS: dict[bytes, int] = {name: _DROP for name in _COMMON_DROP}
_RESPONSE_ACTIONS.update({b"upgrade": _UPGRADE, b"via": _VIA})

# The action of each field name *as spelt*, learned on first sight: the same few spellings
# ("Host", "User-Agent", "Content-Type", ...) come in every message, and one dict probe on the
# raw name saves a lower() per field. Bounded: names up to _SEEN_NAME_MAX bytes, at most
# _SEEN_MAX spellings per direction (then no more are learned; lookups still work).
_SEEN_MAX = 4096
_SEEN_NAME_MAX = 64
_REQUEST_SEEN: dict[bytes, int] = {}
_RESPONSE_SEEN: dict[bytes, int] = {}


def _classify(name: bytes, actions: dict[bytes, int], seen: dict[bytes, int]) -> int:
    action = actions.get(name.lower(), _PLAIN)
    if len(name) <= _SEEN_NAME_MAX and len(seen) < _SEEN_MAX:
        seen[name] = action
    return action


# Response fast path (no Upgrade, no Via of ours, no field named by Connection): name as
# spelt -> kept (plain fields and an incoming Via) or dropped. Same bounds as above.
_KEEP_ALIVE_ONLY = frozenset((b"keep-alive",))


class _KeepByName(dict):
    """``keep[name]``: learned on first sight (``__missing__``), so the comprehension below is
    one subscript per field. (An assignment expression there would do the same, but Cython
    3.x mis-compiles it inside a comprehension: the compiled core kept no field at all.)"""

    def __missing__(self, name: bytes) -> bool:
        action = _RESPONSE_ACTIONS.get(name.lower(), _PLAIN)
        kept = action == _PLAIN or action == _VIA
        if len(name) <= _SEEN_NAME_MAX and len(self) < _SEEN_MAX:
            self[name] = kept
        return kept


_RESPONSE_KEEP = _KeepByName()


# RFC 9110 §5.6.2 token: a Forwarded parameter value that is a token needs no quotes.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class TrustedProxies:
    """``--trusted-proxies`` CIDRs, parsed once. ``contains(ip)`` is evaluated once per client
    connection, not per request."""

    __slots__ = ("_nets",)

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        self._nets = tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())

    def __bool__(self) -> bool:
        return bool(self._nets)

    def contains(self, ip: str | None) -> bool:
        if not self._nets or not ip:
            return False
        try:
            addr = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self._nets)


def forwarded_node(ip: str) -> bytes:
    """RFC 7239 §6 node for ``for=``: IPv4 as is, IPv6 in brackets and quotes, unknown else."""
    if not ip:
        return b"unknown"
    if ":" in ip:
        return b'"[' + ip.encode("ascii", "replace") + b']"'
    return ip.encode("ascii", "replace")


def _quote_if_needed(value: bytes) -> bytes:
    if _TOKEN_RE.fullmatch(value) is not None:
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def forwarded_element(client_node: bytes, host: bytes, proto: bytes) -> bytes:
    """One RFC 7239 forwarded-element: ``for=...;host=...;proto=...`` (host quoted when it
    holds a ":" or other non-token characters)."""
    if host:
        return b"for=" + client_node + b";host=" + _quote_if_needed(host) + b";proto=" + proto
    return b"for=" + client_node + b";proto=" + proto


class ClientInfo:
    """What the forwarding fields say about one client connection, computed once per
    connection: ``ip`` (peer address), ``trusted`` (peer in ``--trusted-proxies``), ``proto``
    (b"http" / b"https"), ``port`` (the local port it connected to), ``default_host`` (sent as
    Host when a request has none: HTTP/1.0)."""

    __slots__ = ("ip", "node", "trusted", "proto", "port", "default_host", "fixed",
                 "_fwd_host", "_fwd")

    def __init__(self, ip: str, trusted: bool = False, proto: bytes = b"http", port: bytes = b"",
                 default_host: bytes = b"") -> None:
        ip_b = ip.encode("ascii", "replace")
        self.ip = ip_b
        self.node = forwarded_node(ip)
        self.trusted = trusted
        self.proto = proto
        self.port = port
        self.default_host = default_host
        # The fields that do not depend on the request (untrusted peer): built once.
        self.fixed = ((b"X-Forwarded-For", ip_b), (b"X-Forwarded-Proto", proto),
                      (b"X-Forwarded-Port", port), (b"X-Real-IP", ip_b))
        self._fwd_host: bytes | None = None
        self._fwd = b""

    def forwarded(self, host: bytes) -> bytes:
        """Our Forwarded element for a request with this Host (the last one is cached)."""
        if host != self._fwd_host:
            self._fwd = forwarded_element(self.node, host, self.proto)
            self._fwd_host = host
        return self._fwd


class ClientInfoCache:
    """One ``ClientInfo`` per (peer address, scheme, local port, default Host), shared by every
    connection with those four: a client opening a connection per request (or a fleet behind
    one NAT address) costs a dict hit instead of a ``ClientInfo`` (its forwarding fields, the
    ``--trusted-proxies`` check) per connection. Sharing is safe: a ClientInfo is a function of
    those four values (its ``forwarded`` cache too). Bounded: at ``limit`` entries it starts
    over, so clients from endless addresses cost at most that many."""

    __slots__ = ("_trusted", "_make", "_limit", "_cache")

    def __init__(self, trusted: TrustedProxies, make=ClientInfo, limit: int = 4096) -> None:
        self._trusted = trusted
        self._make = make
        self._limit = limit
        self._cache: dict[tuple, ClientInfo] = {}

    def get(self, ip: str, proto: bytes, port: bytes, default_host: bytes) -> ClientInfo:
        key = (ip, proto, port, default_host)
        info = self._cache.get(key)
        if info is None:
            trusted = self._trusted.contains(ip) if self._trusted else False
            info = self._make(ip, trusted, proto, port, default_host)
            if len(self._cache) >= self._limit:
                self._cache.clear()
            self._cache[key] = info
        return info


def request_headers(
    headers: list[tuple[bytes, bytes]],
    connection_tokens: frozenset[bytes],
    client: ClientInfo,
    upgrade: bool = False,
    host: bytes | None = None,
    via: bytes | None = None,
) -> list[tuple[bytes, bytes]]:
    """The fields to send upstream for a client request from ``client``.

    ``upgrade``: send ``Upgrade: websocket`` (the member as the client spelt it; other offered
    protocols are dropped) and ``Connection: upgrade``. ``host``: replaces the Host
    field (absolute-form target authority). ``via``: our Via entry (None: do not add one).
    Order: the request's fields as sent (minus the removed ones), then ours.
    """
    out: list[tuple[bytes, bytes]] = []
    append = out.append
    seen = _REQUEST_SEEN
    tokens = connection_tokens
    trusted = client.trusted
    xff = xfp = xfh = xfport = xrip = fwd = via_in = None
    upgrade_value = None
    host_value = None
    for item in headers:
        name = item[0]
        action = seen.get(name)
        if action is None:
            action = _classify(name, _REQUEST_ACTIONS, seen)
        if action == _PLAIN:
            if tokens and name.lower() in tokens:
                continue  # named by Connection: hop-by-hop (RFC 9110 §7.6.1)
            append(item)
        elif action == _KEEP_HOST:
            host_value = item[1]
            append((name, host) if host is not None else item)
        elif action == _DROP:
            continue
        elif action == _UPGRADE:
            if upgrade and upgrade_value is None:
                for part in item[1].split(b","):
                    part = part.strip(b" \t")
                    if part.lower() == _TUNNEL_PROTOCOL:
                        upgrade_value = part
                        break
        elif action == _VIA:
            via_in = item[1] if via_in is None else via_in + b", " + item[1]
        elif not trusted:
            continue  # a client's own forwarding fields: dropped, ours replace them
        elif action == _XFF:
            xff = item[1] if xff is None else xff + b", " + item[1]
        elif action == _FWD:
            fwd = item[1] if fwd is None else fwd + b", " + item[1]
        elif action == _XFP:
            xfp = xfp or item[1]
        elif action == _XFH:
            xfh = xfh or item[1]
        elif action == _XFPORT:
            xfport = xfport or item[1]
        else:  # _XRIP
            xrip = xrip or item[1]
    if host is not None:
        original_host = host
    elif host_value is not None:
        original_host = host_value
    else:
        original_host = client.default_host
        if original_host:
            out.insert(0, (b"Host", original_host))
    if upgrade and upgrade_value is not None:
        append((b"Connection", b"upgrade"))
        append((b"Upgrade", upgrade_value))
    element = client.forwarded(original_host)
    if not trusted:
        out += client.fixed
        append((b"X-Forwarded-Host", original_host))
        append((b"Forwarded", element))
    else:
        ip = client.ip
        append((b"X-Forwarded-For", ip if xff is None else xff + b", " + ip))
        append((b"X-Forwarded-Proto", xfp or client.proto))
        append((b"X-Forwarded-Port", xfport or client.port))
        append((b"X-Real-IP", xrip or ip))
        append((b"X-Forwarded-Host", xfh or original_host))
        append((b"Forwarded", element if fwd is None else fwd + b", " + element))
    if via is not None:
        append((b"Via", via if via_in is None else via_in + b", " + via))
    elif via_in is not None:
        append((b"Via", via_in))
    return out


def response_headers(
    headers: list[tuple[bytes, bytes]],
    connection_tokens: frozenset[bytes],
    upgrade: bool = False,
    via: bytes | None = None,
) -> list[tuple[bytes, bytes]]:
    """The fields to send to the client for an upstream response (framing and ``Connection``
    are added by the caller). ``upgrade`` (a 101): keep ``Upgrade`` and add
    ``Connection: upgrade``."""
    seen = _RESPONSE_SEEN
    tokens = connection_tokens
    if not upgrade and via is None and (not tokens or tokens == _KEEP_ALIVE_ONLY):
        # The usual response: every field is either kept as is or dropped, decided by its
        # name alone ("Connection: keep-alive" names no field we would keep: Keep-Alive is
        # dropped anyway). One dict probe per field, no per-field branching.
        keep = _RESPONSE_KEEP
        return [item for item in headers if keep[item[0]]]
    out: list[tuple[bytes, bytes]] = []
    append = out.append
    via_in = None
    upgrade_values = None
    for item in headers:
        name = item[0]
        action = seen.get(name)
        if action is None:
            action = _classify(name, _RESPONSE_ACTIONS, seen)
        if action == _PLAIN:
            if tokens and name.lower() in tokens:
                continue
            append(item)
        elif action == _DROP:
            continue
        elif action == _UPGRADE:
            if upgrade:
                upgrade_values = [item[1]] if upgrade_values is None else upgrade_values + [item[1]]
        else:  # _VIA
            via_in = item[1] if via_in is None else via_in + b", " + item[1]
    if upgrade:
        append((b"Connection", b"upgrade"))
        if upgrade_values is not None:
            append((b"Upgrade", b", ".join(upgrade_values)))
    if via is not None:
        append((b"Via", via if via_in is None else via_in + b", " + via))
    elif via_in is not None:
        append((b"Via", via_in))
    return out
