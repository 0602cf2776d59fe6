"""Gateway API hostnames: matching, intersection and specificity.

A hostname here is a precise DNS name (``www.example.com``), a wildcard (``*.example.com``:
one *or more* labels before the suffix, never the suffix alone), or ``ANY`` ("*", what an unset
listener or route hostname means). These are the rules of the Gateway API's "Hostnames"
concept page, which listener selection, route attachment and routing all follow:

* ``intersect(listener, route)``: the hostname both accept (``None``: none). Two precise names
  intersect when equal; a wildcard and a precise name when the name ends with the wildcard's
  suffix; two wildcards when one suffix ends with the other (the more specific one is the
  result); ``ANY`` intersects everything and yields the other.
* ``covers(pattern, host)``: does ``pattern`` accept the precise ``host``.
* ``specificity(pattern)``: sort key, most specific first: precise names, then wildcards by
  suffix length (a longer suffix that matches a host has more labels), then ``ANY``.
"""

from __future__ import annotations

__all__ = ["ANY", "covers", "intersect", "specificity"]

ANY = "*"


def covers(pattern: str, host: str) -> bool:
    """``pattern`` (precise, wildcard or ANY) accepts the precise ``host`` (lower case)."""
    if pattern == ANY:
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]                 # ".example.com"
        return len(host) > len(suffix) and host.endswith(suffix)
    return pattern == host


def intersect(listener: str | None, route: str | None) -> str | None:
    """The intersected hostname of a listener's and a route's hostname (None or ANY for
    unset), or None when they do not intersect."""
    a = listener or ANY
    b = route or ANY
    if a == ANY:
        return b
    if b == ANY:
        return a
    aw, bw = a.startswith("*."), b.startswith("*.")
    if not aw and not bw:
        return a if a == b else None
    if aw and not bw:
        return b if covers(a, b) else None
    if bw and not aw:
        return a if covers(b, a) else None
    # Two wildcards: the one whose suffix ends with the other's is the intersection.
    sa, sb = a[1:], b[1:]
    if sa == sb or sa.endswith(sb):
        return a
    if sb.endswith(sa):
        return b
    return None


def specificity(pattern: str) -> tuple[int, int]:
    """Sort key: precise names first, then wildcards with longer suffixes, then ANY."""
    if pattern == ANY:
        return (2, 0)
    if pattern.startswith("*."):
        return (1, -len(pattern))
    return (0, -len(pattern))
