"""Paths and hosts in the one canonical form that rules and requests are compared in.

``normalize_request_path`` turns a request path into its routing key (or refuses it: the
caller answers 400), ``canonical_rule_path`` does the same for a path as written in a rule, and
``request_host`` turns a Host / :authority value into the key host rules are looked up by. Both
sides of every comparison go through the same functions, so a rule and a request that mean the
same resource meet, and an ambiguous request is refused rather than guessed at. docs/routing.md
("Path normalisation") is the user-facing description.
"""

from __future__ import annotations

import re

__all__ = ["canonical_rule_path", "normalize_request_path", "request_host", "rule_host"]

# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------

# RFC 3986 section 2.3 unreserved characters: their percent-encoded form is equivalent to the
# character itself (section 6.2.2.2), so the canonical form decodes them.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters a path may carry unencoded (pchar minus pct-encoded, plus "/"), RFC 3986 section 3.3.
_PATH_SAFE = _UNRESERVED | frozenset("!$&'()*+,;=:@/")
# Printable ASCII that RFC 3986 does not allow in a path but clients do send raw (h11 accepts any
# VCHAR in the request-target); it can only mean its percent-encoded form, so we encode it.
_ENCODE_RAW = frozenset('"<>^`{|}')
_HEX = frozenset("0123456789abcdefABCDEF")
# Escapes that decode to a character backends disagree about: "/" (Envoy's
# path_with_escaped_slashes_action exists because of it), "\" (a separator on Windows servers)
# and NUL (C string truncation).  Requests carrying them are refused rather than guessed at.
_REFUSED_ESCAPES = frozenset({"2F", "5C", "00"})
# The common case - only safe characters, no escapes, no "//", no "/." - is returned as is.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")


def normalize_request_path(path: str) -> str | None:
    """Return the canonical routing key of a request path, or None when it must get a 400.

    ``path`` is the request-target's path (origin-form); a "?" and what follows is ignored.
    Canonical form (RFC 3986 section 6.2.2 syntax-based normalisation, plus slash merging):

    * percent-encoded unreserved characters are decoded (``/%61pi`` -> ``/api``), other escapes
      keep their encoding with upper-case hex (``%3a`` -> ``%3A``);
    * raw ``" < > ^ ` { | }`` are percent-encoded (their only meaning);
    * runs of "/" are merged into one (what nginx does, and httpd since CVE-2019-0220), so
      ``//admin`` cannot slip past a rule for ``/admin``.

    Refused (None): a path not starting with "/", control characters, space, DEL or non-ASCII,
    a raw "\\" or "#", a "%" not followed by two hex digits, ``%2F`` ``%5C`` ``%00``, and any
    "." or ".." segment (also when spelt with ``%2E``, and with path parameters: ``..;x``,
    ``.;``, ``%2e%2e;``, ``..%3B``).  Legitimate clients remove dot-segments
    before sending (RFC 3986 section 5.2.4); a proxy that routes ``/public/../admin`` one way
    while the backend resolves it another is a classic access-control bypass.

    The function is idempotent, and a rule path goes through it too (``canonical_rule_path``)
    so both sides of a comparison are in the same form.
    """
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    if _PLAIN_PATH.fullmatch(path) and "//" not in path and "/." not in path:
        return path
    if not path.startswith("/"):
        return None
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        seg = _canonical_segment(seg)
        if seg is None or _is_dot_segment(seg):
            return None
        out.append(seg)
    # Merge slashes: drop empty segments except the last one, which carries a trailing "/".
    last = out.pop()
    out = [s for s in out if s]
    out.append(last)
    return "/" + "/".join(out)


def _is_dot_segment(seg: str) -> bool:
    """``.`` or ``..``, also with path parameters: the part before the first ``;`` (or its
    escape ``%3B``) is a dot-segment.  Tomcat, Jetty and Spring strip ``;params`` from each
    segment before resolving dot-segments, so ``/public/..;/admin`` reaches ``/admin`` there
    while a prefix rule for ``/public`` would match it here (the classic ``..;`` bypass).
    ``seg`` is canonical: escaped unreserved characters (``%2e``) are decoded already."""
    if seg[:1] != ".":
        return False
    name = seg.partition(";")[0]
    p = name.find("%3B")
    if p >= 0:
        name = name[:p]
    return name == "." or name == ".."


def _canonical_segment(seg: str) -> str | None:
    """Canonical form of one path segment (no "/" inside), or None if it must be refused."""
    n = len(seg)
    parts: list[str] = []
    i = 0
    while i < n:
        c = seg[i]
        if c == "%":
            hi = seg[i + 1 : i + 3]
            if len(hi) != 2 or hi[0] not in _HEX or hi[1] not in _HEX:
                return None
            hi = hi.upper()
            if hi in _REFUSED_ESCAPES:
                return None
            ch = chr(int(hi, 16))
            parts.append(ch if ch in _UNRESERVED else "%" + hi)
            i += 3
            continue
        if c in _PATH_SAFE:
            parts.append(c)
        elif c in _ENCODE_RAW:
            parts.append("%%%02X" % ord(c))
        else:  # control, space, DEL, non-ASCII, "\", "#"
            return None
        i += 1
    return "".join(parts)


def canonical_rule_path(path: str) -> str | None:
    """Canonical form of a path as written in an Ingress, None if no request can ever match it.

    The API allows characters a URL path may not carry ("it can contain characters disallowed
    from the conventional path part of a URL"): those mean their UTF-8 percent-encoding, a "%"
    that does not start a valid escape means a literal "%", "?" and "#" mean %3F / %23 (a
    request path cannot hold them raw).  The result then goes through normalize_request_path.
    """
    if path == "":
        return "/"  # ImplementationSpecific with no path: everything
    out: list[str] = []
    for i, c in enumerate(path):
        if c == "%":
            esc = path[i + 1 : i + 3]
            if len(esc) == 2 and esc[0] in _HEX and esc[1] in _HEX:
                out.append(c)
            else:
                out.append("%25")
        elif c in _PATH_SAFE:
            out.append(c)
        else:
            out.extend("%%%02X" % b for b in c.encode("utf-8"))
    return normalize_request_path("".join(out))


def rule_host(host: str | None) -> str:
    """A rule's host as a table key: "" for any host, lower-case, without a trailing dot."""
    if not host:
        return ""
    h = host.lower()
    return h[:-1] if h.endswith(".") else h


def request_host(host: str) -> str:
    """Host header -> lookup key: port removed, lower case, one trailing dot removed.

    A non-ASCII value gives "" (it can match no rule host; ``str.lower`` would otherwise fold
    e.g. KELVIN SIGN to "k").  ``[v6]:port`` keeps the brackets.
    """
    if not host:
        return ""
    if host[0] == "[":
        end = host.find("]")
        if end > 0:
            host = host[: end + 1]
    else:
        colon = host.rfind(":")
        if colon >= 0:
            host = host[:colon]
    if host.endswith("."):
        host = host[:-1]
    if not host.isascii():
        return ""
    return host.lower()
