"""Route filters applied to what an exchange forwards or answers: the redirect Location, the
rewritten target and Host, header edits. Pure functions over the route, the request head and
field lists; the exchange calls them (docs/routing.md, "Filters")."""

from __future__ import annotations

from meshproxy.core.paths import normalize_request_path

__all__ = ["filtered_request", "redirect_location", "regex_replace", "replace_prefix"]


def redirect_location(r, route, head, tls: bool, listener_port: bytes, tls_port: int) -> bytes:
    """The Location of redirect ``r`` for ``head``. Unset parts keep the request's own; the
    port is the Gateway API's rule: given, else the scheme's well-known port when the scheme
    changes, else the port the request came in on (``listener_port``) - and left out when it is
    the scheme's default (80 for http, 443 for https). The Ingress ssl-redirect
    (``only_plaintext``) goes to the TLS listener's port."""
    host = head.host
    if host.startswith(b"["):
        hostname = host[: host.find(b"]") + 1]
    else:
        hostname = host.partition(b":")[0]
    scheme = r.scheme.encode() if r.scheme else (b"https" if tls else b"http")
    if r.hostname:
        hostname = r.hostname.encode()
    if r.port is not None:
        port = b"%d" % r.port
    elif r.only_plaintext:
        port = b"%d" % tls_port if tls_port else b"443"
    elif r.scheme:
        port = b"443" if scheme == b"https" else b"80"
    else:
        port = listener_port
    if (scheme == b"https" and port == b"443") or (scheme == b"http" and port == b"80"):
        port = b""
    path = head.path
    if r.path_kind == "ReplaceFullPath":
        path = r.path.encode()
    elif r.path_kind == "ReplacePrefixMatch":
        path = replace_prefix(route, head.path, r.path).encode()
    target = path + (b"?" + head.query if head.query else b"")
    return scheme + b"://" + hostname + (b":" + port if port else b"") + target


def filtered_request(action, ref, route, head, tgt: bytes, fields: list) -> tuple[bytes, list]:
    """The route's (and the backend reference's) request filters: rewrite, header edits."""
    rw = action.rewrite
    if rw is not None:
        if rw.hostname is not None:
            host = rw.hostname.encode()
            fields = [(n, host) if n.lower() == b"host" else (n, v) for n, v in fields]
        if rw.path_kind is not None:
            if rw.path_kind == "ReplaceFullPath":
                path = rw.path.encode()
            elif rw.path_kind == "ReplacePrefixMatch":
                path = replace_prefix(route, head.path, rw.path).encode()
            else:  # RegexReplace: $1.. from the route's regular expression
                path = regex_replace(route, head.path, rw.path)
            tgt = path + (b"?" + head.query if head.query else b"")
    if action.request_headers is not None:
        fields = action.request_headers.apply(fields)
    if ref is not None and ref.request_headers is not None:
        fields = ref.request_headers.apply(fields)
    return tgt, fields


def replace_prefix(route, path: bytes, replacement: str) -> str:
    """Gateway API ReplacePrefixMatch: the part of ``path`` the route's prefix matched is
    replaced; element boundaries are kept (``/foo`` -> ``/bar`` turns ``/foo/x`` into ``/bar/x``
    and ``/foo`` into ``/bar``; replacing with ``/`` turns ``/foo/x`` into ``/x``)."""
    p = normalize_request_path(path.decode("latin-1")) or path.decode("latin-1")
    matched = route.matched_prefix(p) if route is not None else ""
    rest = p[len(matched):]
    rep = replacement.rstrip("/") if rest.startswith("/") else replacement
    out = rep + rest
    return out or "/"


def regex_replace(route, path: bytes, template: str) -> bytes:
    """ingress-nginx rewrite-target: ``$1``.. are the groups of the route's expression, matched
    against the path in the form it was routed by (canonical, as nginx matches its $uri)."""
    raw = path.decode("latin-1")
    p = normalize_request_path(raw) or raw
    m = None
    if route is not None and route.regex is not None:
        m = route.regex.match(p) if route.regex_prefix else route.regex.fullmatch(p)
    if m is None:
        return template.encode("latin-1", "replace")
    groups = m.groups()

    def group(i: int) -> str:
        return (groups[i - 1] or "") if 0 < i <= len(groups) else ""
    out = []
    i = 0
    while i < len(template):
        c = template[i]
        if c == "$" and i + 1 < len(template) and template[i + 1].isdigit():
            j = i + 1
            while j < len(template) and template[j].isdigit():
                j += 1
            out.append(group(int(template[i + 1:j])))
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out).encode("latin-1", "replace")
