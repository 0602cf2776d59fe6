"""Table tests for the route table with Ingress rules (meshproxy.core.routes + ingress): Ingress (networking.k8s.io/v1) host and path matching.

Sources of the expected values: the Kubernetes "Ingress" concept page (path-matching examples
table, hostname wildcards table, multiple matches), the HTTPIngressPath / IngressRule API
reference, and the scenarios of kubernetes-sigs/ingress-controller-conformance (host_rules,
path_rules, default_backend).  Choices the spec leaves open are pinned to docs/routing.md.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from meshproxy.core.ingress import check_path, default_route, ingress_route
from meshproxy.core.paths import normalize_request_path
from meshproxy.core.routes import Action, RouteTable

ING = "default/ing"


# The tests below are written in Ingress terms (host, path, pathType, backend, ingress, age):
# ``build`` compiles such entries exactly as the snapshot builder does (meshproxy.core.ingress)
# and the wrapper hands back, for each match, the entry that won.


@dataclasses.dataclass(frozen=True)
class RouteEntry:
    host: str | None
    path: str
    path_type: str
    backend: object
    ingress: str
    created: str = ""


@dataclasses.dataclass(frozen=True)
class RouteMatch:
    backend: object
    ingress: str
    host: str | None
    path: str
    path_type: str


def check_entry(e: RouteEntry) -> str | None:
    return check_path(e.host, e.path, e.path_type)


class Built:
    def __init__(self, table: RouteTable, tokens: dict) -> None:
        self.table = table
        self.tokens = tokens
        self.conflicts = table.conflicts
        self.skipped = table.skipped

    def match(self, host, path):
        r = self.table.match(host, path)
        if r is None:
            return None
        backend, ingress = self.tokens[id(r)]
        return RouteMatch(backend, ingress, r.host, r.path, r.written_kind or r.path_kind)

    def describe(self):
        return [{"host": row["host"], "path": row["path"], "pathType": row["pathType"],
                 "ingress": row["source"].partition(" ")[2], "backend": row["route"]}
                for row in self.table.describe()]


def build(entries, default_backend=None, default_ingress=""):
    tokens = {}
    out = []
    for e in entries:
        bad = check_entry(e)
        if bad:
            raise ValueError(f"Ingress {e.ingress}: {bad}")
        ent = ingress_route(e.host, e.path, e.path_type, Action(), e.ingress, e.created)
        ent = dataclasses.replace(ent, route=dataclasses.replace(ent.route, name=str(e.backend)))
        tokens[id(ent.route)] = (e.backend, e.ingress)
        out.append(ent)
    default = None
    if default_backend is not None:
        default = dataclasses.replace(default_route(Action(), default_ingress), name=str(default_backend))
        tokens[id(default)] = (default_backend, default_ingress)
    return Built(RouteTable.build(out, default=default), tokens)


def entry(path, path_type="Prefix", backend=None, *, host=None, ingress=ING, created=""):
    return RouteEntry(
        host=host,
        path=path,
        path_type=path_type,
        backend=backend if backend is not None else f"{path_type}:{path}",
        ingress=ingress,
        created=created,
    )


def routed(table: RouteTable, host: str, raw_path: str):
    """What the proxy does: normalise (None -> 400), then match (None -> 404)."""
    path = normalize_request_path(raw_path)
    assert path is not None, f"{raw_path!r} unexpectedly refused"
    m = table.match(host, path)
    return None if m is None else m.backend


# ---------------------------------------------------------------------------------------------
# The Kubernetes docs' path-matching examples table, row by row.  Each case lists the rules
# (path, pathType), the request path and the rule that must answer (None = no rule matches; the
# "uses default backend" row is checked with a defaultBackend below).
# ---------------------------------------------------------------------------------------------

P, E = "Prefix", "Exact"
DOCS_PATH_TABLE = [
    # kind, rules, request, winner
    ("Prefix / matches all paths", [("/", P)], "/", ("/", P)),
    ("Prefix / matches all paths", [("/", P)], "/foo", ("/", P)),
    ("Prefix / matches all paths", [("/", P)], "/foo/", ("/", P)),
    ("Prefix / matches all paths", [("/", P)], "/aaa/bbb/ccc", ("/", P)),
    ("Exact /foo vs /foo", [("/foo", E)], "/foo", ("/foo", E)),
    ("Exact /foo vs /bar", [("/foo", E)], "/bar", None),
    ("Exact /foo vs /foo/", [("/foo", E)], "/foo/", None),
    ("Exact /foo/ vs /foo", [("/foo/", E)], "/foo", None),
    ("Prefix /foo vs /foo", [("/foo", P)], "/foo", ("/foo", P)),
    ("Prefix /foo vs /foo/", [("/foo", P)], "/foo/", ("/foo", P)),
    ("Prefix /foo/ vs /foo", [("/foo/", P)], "/foo", ("/foo/", P)),
    ("Prefix /foo/ vs /foo/", [("/foo/", P)], "/foo/", ("/foo/", P)),
    ("Prefix /aaa/bb vs /aaa/bbb", [("/aaa/bb", P)], "/aaa/bbb", None),
    ("Prefix /aaa/bbb vs /aaa/bbb", [("/aaa/bbb", P)], "/aaa/bbb", ("/aaa/bbb", P)),
    ("Prefix /aaa/bbb/ vs /aaa/bbb", [("/aaa/bbb/", P)], "/aaa/bbb", ("/aaa/bbb/", P)),
    ("Prefix /aaa/bbb vs /aaa/bbb/", [("/aaa/bbb", P)], "/aaa/bbb/", ("/aaa/bbb", P)),
    ("Prefix /aaa/bbb vs /aaa/bbb/ccc", [("/aaa/bbb", P)], "/aaa/bbb/ccc", ("/aaa/bbb", P)),
    ("Prefix /aaa/bbb vs /aaa/bbbxyz", [("/aaa/bbb", P)], "/aaa/bbbxyz", None),
    ("Prefix /, /aaa vs /aaa/ccc", [("/", P), ("/aaa", P)], "/aaa/ccc", ("/aaa", P)),
    (
        "Prefix /, /aaa, /aaa/bbb vs /aaa/bbb",
        [("/", P), ("/aaa", P), ("/aaa/bbb", P)],
        "/aaa/bbb",
        ("/aaa/bbb", P),
    ),
    (
        "Prefix /, /aaa, /aaa/bbb vs /ccc",
        [("/", P), ("/aaa", P), ("/aaa/bbb", P)],
        "/ccc",
        ("/", P),
    ),
    ("Prefix /aaa vs /ccc (default backend)", [("/aaa", P)], "/ccc", None),
    ("Mixed /foo Prefix + /foo Exact vs /foo", [("/foo", P), ("/foo", E)], "/foo", ("/foo", E)),
    # Rows implied by the same text ("element-wise", "case-sensitive", "longest wins").
    ("Prefix /aaa/bbb vs /aaa/bbb/ccc/ddd", [("/aaa/bbb", P)], "/aaa/bbb/ccc/ddd", ("/aaa/bbb", P)),
    ("Prefix /aaa/bbb vs /aaa", [("/aaa/bbb", P)], "/aaa", None),
    ("Prefix /foo is case-sensitive", [("/foo", P)], "/FOO", None),
    ("Exact /foo is case-sensitive", [("/foo", E)], "/Foo", None),
    ("Exact / vs /", [("/", E)], "/", ("/", E)),
    ("Exact / vs /foo", [("/", E)], "/foo", None),
    ("Mixed /foo Prefix + /foo Exact vs /foo/", [("/foo", P), ("/foo", E)], "/foo/", ("/foo", P)),
    ("Mixed /foo/ Prefix + /foo Exact vs /foo", [("/foo/", P), ("/foo", E)], "/foo", ("/foo", E)),
    ("Mixed /foo/ Exact, /foo Prefix vs /foo/", [("/foo", P), ("/foo/", E)], "/foo/", ("/foo/", E)),
    ("longest wins over Exact", [("/foo", E), ("/foo/bar", P)], "/foo/bar", ("/foo/bar", P)),
    ("Exact on deeper path wins", [("/foo", P), ("/foo/bar", E)], "/foo/bar", ("/foo/bar", E)),
    ("Exact miss falls to Prefix", [("/foo", P), ("/foo/bar", E)], "/foo/bar/baz", ("/foo", P)),
]


@pytest.mark.parametrize("reverse", [False, True], ids=["as-listed", "reversed"])
@pytest.mark.parametrize("host", [None, "foo.bar.com"], ids=["any-host", "with-host"])
@pytest.mark.parametrize(
    "rules, request_path, winner",
    [c[1:] for c in DOCS_PATH_TABLE],
    ids=[f"{i}-{c[0]}" for i, c in enumerate(DOCS_PATH_TABLE)],
)
def test_docs_path_table(rules, request_path, winner, host, reverse):
    entries = [entry(path, typ, host=host) for path, typ in rules]
    if reverse:  # order in the Ingress never matters
        entries.reverse()
    table = build(entries)
    expected = None if winner is None else f"{winner[1]}:{winner[0]}"
    assert routed(table, "foo.bar.com", request_path) == expected


def test_docs_row_prefix_aaa_vs_ccc_uses_default_backend():
    table = build([entry("/aaa")], default_backend="default-svc", default_ingress="ns/d")
    assert table.match("x", "/ccc") == RouteMatch("default-svc", "ns/d", None, "", "Default")
    assert routed(table, "x", "/aaa/ccc") == "Prefix:/aaa"


def test_match_result_is_the_winning_entry_as_written():
    e = entry("/aaa/bbb/", P, backend=object(), host="Foo.Bar.com", ingress="ns/x")
    m = build([e]).match("foo.bar.com", "/aaa/bbb/ccc")
    assert m == RouteMatch(e.backend, "ns/x", "Foo.Bar.com", "/aaa/bbb/", "Prefix")
    assert m.backend is e.backend


# ---------------------------------------------------------------------------------------------
# Hosts
# ---------------------------------------------------------------------------------------------

# The docs' "Hostname wildcards" table, plus the exact-host cases of the host_rules feature.
HOST_TABLE = [
    ("*.foo.com", "bar.foo.com", True),  # matches based on shared suffix
    ("*.foo.com", "baz.bar.foo.com", False),  # wildcard covers a single DNS label only
    ("*.foo.com", "foo.com", False),  # ... and not zero labels
    ("*.foo.com", ".foo.com", False),  # an empty label is not a label
    ("*.foo.com", "barfoo.com", False),
    ("*.foo.com", "bar.foo.com.evil", False),
    ("foo.bar.com", "foo.bar.com", True),
    ("foo.bar.com", "subdomain.bar.com", False),
    ("foo.bar.com", "bar.com", False),
    ("foo.bar.com", "x.foo.bar.com", False),
    (None, "anything.example", True),
    ("", "anything.example", True),
    (None, "", True),  # HTTP/1.0 without Host
    ("foo.bar.com", "", False),
]


@pytest.mark.parametrize("rule_host, request_host, matches", HOST_TABLE)
def test_host_table(rule_host, request_host, matches):
    table = build([entry("/", host=rule_host, backend="svc")])
    assert (table.match(request_host, "/") is not None) is matches


@pytest.mark.parametrize(
    "request_host",
    [
        "foo.bar.com",
        "FOO.BAR.COM",
        "Foo.Bar.Com",
        "foo.bar.com:80",
        "foo.bar.com:8443",
        "FOO.bar.com:",
        "foo.bar.com.",
        "FOO.BAR.COM.:443",
    ],
)
def test_host_case_port_and_trailing_dot_ignored(request_host):
    table = build([entry("/", host="foo.bar.com", backend="svc")])
    assert routed(table, request_host, "/x") == "svc"


@pytest.mark.parametrize(
    "request_host, expected",
    [
        ("a.foo.com:8080", "wild"),
        ("A.FOO.COM.", "wild"),
        ("a.b.foo.com:8080", None),
        ("foo.com:80", None),
    ],
)
def test_wildcard_host_with_port_case_dot(request_host, expected):
    table = build([entry("/", host="*.foo.com", backend="wild")])
    assert routed(table, request_host, "/") == expected


@pytest.mark.parametrize(
    "request_host, expected",
    [
        ("[::1]:8080", "any"),
        ("[::1]", "any"),
        ("127.0.0.1:80", "any"),
        ("bar.com", "bar"),
        ("bar.com:1", "bar"),
        ("b\u0430r.com", "any"),  # Cyrillic "a": not folded onto an ASCII rule
        ("\u212a.foo.com", "any"),  # KELVIN SIGN must not lower() to "k"
        ("k.foo.com", "k"),
    ],
)
def test_host_literals_and_non_ascii(request_host, expected):
    table = build(
        [
            entry("/", host="bar.com", backend="bar"),
            entry("/", host="k.foo.com", backend="k"),
            entry("/", backend="any"),
        ]
    )
    assert routed(table, request_host, "/") == expected


def test_rule_host_case_and_trailing_dot_normalised():
    table = build([entry("/", host="Foo.Bar.COM.", backend="svc")])
    assert routed(table, "foo.bar.com", "/") == "svc"
    assert table.describe()[0]["host"] == "foo.bar.com"


def test_exact_host_beats_wildcard_beats_hostless():
    table = build(
        [
            entry("/", host=None, backend="any"),
            entry("/", host="*.foo.com", backend="wild"),
            entry("/", host="bar.foo.com", backend="exact"),
        ]
    )
    assert routed(table, "bar.foo.com", "/x") == "exact"
    assert routed(table, "baz.foo.com", "/x") == "wild"
    assert routed(table, "baz.bar.foo.com", "/x") == "any"
    assert routed(table, "foo.com", "/x") == "any"


# ---------------------------------------------------------------------------------------------
# Fall-through between host levels (our choice, docs/routing.md "Host levels")
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def layered():
    return [
        entry("/only", E, host="bar.foo.com", backend="exact-host"),
        entry("/w", P, host="*.foo.com", backend="wildcard"),
        entry("/", P, host=None, backend="hostless"),
    ]


@pytest.mark.parametrize(
    "request_host, path, expected",
    [
        ("bar.foo.com", "/only", "exact-host"),
        ("bar.foo.com", "/w/1", "wildcard"),  # exact host has no matching path: fall through
        ("bar.foo.com", "/only/x", "hostless"),  # Exact /only does not match, nor /w
        ("bar.foo.com", "/other", "hostless"),
        ("baz.foo.com", "/only", "hostless"),  # exact-host rule is not for this host
        ("baz.foo.com", "/w", "wildcard"),
    ],
)
def test_fall_through_to_less_specific_host(layered, request_host, path, expected):
    assert routed(build(layered), request_host, path) == expected


def test_fall_through_ends_at_default_then_none(layered):
    without_hostless = layered[:2]
    with_default = build(
        without_hostless, default_backend="dflt", default_ingress="ns/d"
    )
    assert routed(with_default, "bar.foo.com", "/other") == "dflt"
    assert with_default.match("bar.foo.com", "/other").path_type == "Default"
    assert routed(build(without_hostless), "bar.foo.com", "/other") is None


def test_more_specific_host_wins_over_longer_path_at_less_specific_host():
    table = build(
        [
            entry("/", P, host="foo.com", backend="host-root"),
            entry("/very/long/path", P, host=None, backend="hostless-long"),
        ]
    )
    assert routed(table, "foo.com", "/very/long/path/x") == "host-root"
    assert routed(table, "other.com", "/very/long/path/x") == "hostless-long"


# ---------------------------------------------------------------------------------------------
# The conformance suite's features, as tables (kubernetes-sigs/ingress-controller-conformance)
# ---------------------------------------------------------------------------------------------


def test_conformance_host_rules():
    table = build(
        [
            entry("/", host="*.foo.com", backend="wildcard-foo-com"),
            entry("/", host="foo.bar.com", backend="foo-bar-com"),
        ]
    )
    assert routed(table, "foo.bar.com", "/") == "foo-bar-com"
    assert routed(table, "subdomain.bar.com", "/") is None
    assert routed(table, "bar.foo.com", "/") == "wildcard-foo-com"
    assert routed(table, "baz.bar.foo.com", "/") is None
    assert routed(table, "foo.com", "/") is None


CONFORMANCE_PATH_RULES = [
    entry("/foo", E, "foo-exact", host="exact-path-rules"),
    entry("/foo", P, "foo-prefix", host="prefix-path-rules"),
    entry("/aaa/bbb", P, "aaa-slash-bbb-prefix", host="prefix-path-rules"),
    entry("/aaa", P, "aaa-prefix", host="prefix-path-rules"),
    entry("/foo", P, "foo-prefix", host="mixed-path-rules"),
    entry("/foo", E, "foo-exact", host="mixed-path-rules"),
    entry("/aaa/bbb/", P, "aaa-slash-bbb-slash-prefix", host="trailing-slash-path-rules"),
    entry("/foo/", E, "foo-slash-exact", host="trailing-slash-path-rules"),
]


@pytest.mark.parametrize(
    "host, path, service",
    [
        ("exact-path-rules", "/foo", "foo-exact"),
        ("exact-path-rules", "/foo/", None),
        ("exact-path-rules", "/FOO", None),
        ("exact-path-rules", "/bar", None),
        ("prefix-path-rules", "/foo", "foo-prefix"),
        ("prefix-path-rules", "/foo/", "foo-prefix"),
        ("prefix-path-rules", "/FOO", None),
        ("prefix-path-rules", "/aaa/bbb", "aaa-slash-bbb-prefix"),
        ("prefix-path-rules", "/aaa/bbb/ccc", "aaa-slash-bbb-prefix"),
        ("prefix-path-rules", "/aaa/ccc", "aaa-prefix"),
        ("prefix-path-rules", "/aaaccc", None),
        ("mixed-path-rules", "/foo", "foo-exact"),
        ("trailing-slash-path-rules", "/aaa/bbb", "aaa-slash-bbb-slash-prefix"),
        ("trailing-slash-path-rules", "/aaa/bbb/", "aaa-slash-bbb-slash-prefix"),
        ("trailing-slash-path-rules", "/foo", None),
        ("trailing-slash-path-rules", "/foo/", "foo-slash-exact"),
    ],
)
def test_conformance_path_rules(host, path, service):
    assert routed(build(CONFORMANCE_PATH_RULES), host, path) == service


@pytest.mark.parametrize(
    "host, path",
    [
        ("my-host", "/"),
        ("my-host", "/sub-path"),
        ("some-host", "/"),
        ("", "/resource"),
        ("x:1", "/a/b"),
    ],
)
def test_conformance_default_backend_only(host, path):
    table = build(
        [], default_backend="echo-service", default_ingress="ns/default-backend"
    )
    m = table.match(host, normalize_request_path(path))
    assert m == RouteMatch("echo-service", "ns/default-backend", None, "", "Default")


def test_empty_table_matches_nothing():
    table = build([])
    assert table.match("foo.com", "/") is None
    assert table.describe() == []
    assert table.conflicts == () and table.skipped == ()


# ---------------------------------------------------------------------------------------------
# ImplementationSpecific
# ---------------------------------------------------------------------------------------------

IS = "ImplementationSpecific"


@pytest.mark.parametrize(
    "rule, request_path, matches",
    [
        ("/foo", "/foo", True),
        ("/foo", "/foo/", True),
        ("/foo", "/foo/bar", True),
        ("/foo", "/foobar", False),
        ("/foo/", "/foo", True),
        ("", "/", True),  # empty path means "/"
        ("", "/anything/at/all", True),
        ("/", "/x", True),
        # Not a regex: the characters are matched literally, element-wise.
        ("/foo.*", "/foobar", False),
        ("/foo.*", "/foo.*", True),
        ("/foo.*", "/foo.*/x", True),
        ("/api/v[0-9]+", "/api/v1", False),
        ("/api/v[0-9]+", "/api/v%5B0-9%5D+", True),
        ("/(.*)", "/x", False),
    ],
)
def test_implementation_specific_is_literal_prefix(rule, request_path, matches):
    table = build([entry(rule, IS, backend="svc")])
    assert (routed(table, "h", request_path) == "svc") is matches


def test_implementation_specific_reports_its_own_type():
    m = build([entry("", IS, backend="svc")]).match("h", "/x")
    assert (m.path, m.path_type) == ("", IS)


def test_exact_beats_implementation_specific_on_tie():
    table = build([entry("/foo", IS), entry("/foo", E)])
    assert routed(table, "h", "/foo") == "Exact:/foo"
    assert routed(table, "h", "/foo/x") == "ImplementationSpecific:/foo"


# ---------------------------------------------------------------------------------------------
# Precedence between Ingresses (same host + path + type): oldest, then namespace/name
# ---------------------------------------------------------------------------------------------

OLD, NEW = "2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z"


def rival(ingress, created, path="/api", path_type=P, host="foo.com"):
    return entry(path, path_type, backend=ingress, host=host, ingress=ingress, created=created)


@pytest.mark.parametrize(
    "rivals, request_path, winner",
    [
        ([rival("ns/zzz", OLD), rival("ns/aaa", NEW)], "/api", "ns/zzz"),  # age before name
        ([rival("ns/aaa", ""), rival("ns/zzz", NEW)], "/api", "ns/zzz"),  # unknown age: last
        ([rival("ns/aaa", "garbage"), rival("ns/zzz", NEW)], "/api", "ns/zzz"),  # = unknown
        ([rival("ns/b", OLD), rival("ns/a", OLD)], "/api", "ns/a"),  # same age: name
        ([rival("b/a", OLD), rival("a/z", OLD)], "/api", "a/z"),  # namespace first
        ([rival("a-b/a", OLD), rival("a/z", OLD)], "/api", "a/z"),  # (namespace, name) order
        ([rival("ns/b", ""), rival("ns/a", "")], "/api/x", "ns/a"),
        # The same instant written two ways is a tie, decided by name.
        ([rival("ns/b", OLD), rival("ns/a", "2024-01-01T01:00:00+01:00")], "/api", "ns/a"),
        ([rival("ns/b", OLD), rival("ns/a", "2024-01-01T00:00:01Z")], "/api", "ns/b"),
        ([rival("ns/b", "2024-01-01t00:00:00z"), rival("ns/a", NEW)], "/api", "ns/b"),
        # Prefix "/api" and "/api/" are the same rule.
        ([rival("ns/new", NEW, "/api"), rival("ns/old", OLD, "/api/")], "/api/x", "ns/old"),
        # ImplementationSpecific is Prefix: it competes for the same slot.
        ([rival("ns/new", NEW, path_type=P), rival("ns/old", OLD, path_type=IS)], "/api", "ns/old"),
        # Equivalent spellings of one path compete too.
        ([rival("ns/new", NEW, "/~u"), rival("ns/old", OLD, "/%7Eu")], "/~u/x", "ns/old"),
        ([rival("ns/new", NEW, "/~u", E), rival("ns/old", OLD, "/%7eu", E)], "/%7Eu", "ns/old"),
        # Host spelling does not matter.
        ([rival("ns/new", NEW), rival("ns/old", OLD, host="FOO.com.")], "/api", "ns/old"),
        (
            [rival("ns/new", NEW, host="*.foo.com"), rival("ns/old", OLD, host="*.FOO.com")],
            "/api",
            "ns/old",
        ),
        ([rival("ns/new", NEW, host=None), rival("ns/old", OLD, host="")], "/api", "ns/old"),
    ],
)
def test_conflict_resolution(rivals, request_path, winner):
    loser = next(r.ingress for r in rivals if r.ingress != winner)
    host = "x.foo.com"  # served by every rival host above, exact "foo.com" aside
    for order in (rivals, rivals[::-1]):  # input order never decides between Ingresses
        table = build(order)
        req_host = "foo.com" if any(r.host and "*" not in r.host for r in rivals) else host
        assert routed(table, req_host, request_path) == winner
        assert len(table.conflicts) == 1
        assert loser in table.conflicts[0] and winner in table.conflicts[0]
        assert [row["ingress"] for row in table.describe()] == [winner]


def test_same_path_twice_in_one_ingress_first_wins():
    table = build([entry("/a", backend="first"), entry("/a", backend="second")])
    assert routed(table, "h", "/a") == "first"
    assert len(table.conflicts) == 1 and "first one wins" in table.conflicts[0]


@pytest.mark.parametrize(
    "entries",
    [
        [rival("ns/a", OLD, "/api", E), rival("ns/b", NEW, "/api", P)],  # different types
        [rival("ns/a", OLD, host="a.com"), rival("ns/b", NEW, host="b.com")],  # different hosts
        [rival("ns/a", OLD, host="*.foo.com"), rival("ns/b", NEW, host="x.foo.com")],
        [rival("ns/a", OLD, host=None), rival("ns/b", NEW, host="foo.com")],
        [rival("ns/a", OLD, "/api"), rival("ns/b", NEW, "/api/v1")],
        [rival("ns/a", OLD, "/api", E), rival("ns/b", NEW, "/api/", E)],  # Exact keeps the "/"
    ],
)
def test_no_conflict(entries):
    table = build(entries)
    assert table.conflicts == ()
    assert len(table.describe()) == 2


def test_conflict_across_ingresses_merges_other_paths():
    """Rules of all Ingresses are merged; only the contested slot is decided by age."""
    table = build(
        [
            rival("ns/new", NEW, "/api"),
            rival("ns/new", NEW, "/new-only"),
            rival("ns/old", OLD, "/api"),
            rival("ns/old", OLD, "/old-only"),
        ]
    )
    assert routed(table, "foo.com", "/api") == "ns/old"
    assert routed(table, "foo.com", "/new-only/x") == "ns/new"
    assert routed(table, "foo.com", "/old-only") == "ns/old"


# ---------------------------------------------------------------------------------------------
# Request path canonicalisation (docs/routing.md "Request paths")
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("/", "/"),
        ("/foo", "/foo"),
        ("/foo/", "/foo/"),
        ("/foo/bar?x=1&y=/..", "/foo/bar"),  # query is not part of the path
        ("/.well-known/acme", "/.well-known/acme"),  # a dot inside a segment is fine
        ("/a..b/c.", "/a..b/c."),
        ("/...", "/..."),
        ("/%61%62c", "/abc"),  # unreserved escapes decoded (RFC 3986 6.2.2.2)
        ("/%7euser", "/~user"),
        ("/a%2Db%5F%2e", "/a-b_."),
        ("/a%3ab", "/a%3Ab"),  # reserved escapes kept, hex upper-cased (6.2.2.1)
        ("/a%20b", "/a%20b"),
        ("/%25", "/%25"),
        ("/%252e%252e/", "/%252e%252e/"),  # decoded once only: it is "%2e%2e", not ".."
        ("/a|b", "/a%7Cb"),  # raw characters a path may not carry mean their escape
        ('/{x}"^`<>', "/%7Bx%7D%22%5E%60%3C%3E"),
        ("//", "/"),  # slashes merged
        ("//admin", "/admin"),
        ("/a//b///c", "/a/b/c"),
        ("/a/b//", "/a/b/"),
        ("/a:b@c!$&'()*+,;=", "/a:b@c!$&'()*+,;="),
        # path parameters are kept; only a dot-segment before the ";" is refused (below)
        ("/a;jsessionid=1/b", "/a;jsessionid=1/b"),
        ("/a/...;/b", "/a/...;/b"),
        ("/a/..x;/b", "/a/..x;/b"),
        ("/a/;../b", "/a/;../b"),
        ("/a/b;..", "/a/b;.."),
        ("/a/.x%3B/b", "/a/.x%3B/b"),
    ],
)
def test_normalize_request_path_canonical(raw, canonical):
    assert normalize_request_path(raw) == canonical
    assert normalize_request_path(canonical) == canonical  # idempotent


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "foo",
        "*",
        "http://h/x",  # absolute-form is the proxy's to split first
        "?x",
        "/a/../b",
        "/..",
        "/a/..",
        "/a/.",
        "/./a",
        "/.",
        "/a/%2e%2e/b",  # encoded dot-segments
        "/a/%2E%2E",
        "/a/.%2e/b",
        "/a/%2e/b",
        # dot-segments with path parameters: Tomcat/Jetty/Spring strip ";..." first, so
        # "/public/..;/admin" is "/admin" there (the "..;" access-control bypass)
        "/public/..;/admin",
        "/public/%2e%2e;/admin",
        "/public/%2E%2e;x/admin",
        "/public/.%2E;/admin",
        "/a/..;x=1/b",
        "/a/..;",
        "/..;",
        "/a/.;/b",
        "/a/.;jsessionid=1/b",
        "/.;/admin",
        "/a/..%3B/b",  # escaped ";" too (decode-then-strip frameworks)
        "/a/%2e%2e%3bx/b",
        "/a/..;/..;/b",
        "/a%2fb",  # encoded slash
        "/a%2Fb",
        "/a%5cb",  # encoded backslash
        "/a%00b",  # encoded NUL
        "/a\\b",  # raw backslash
        "/a\\..\\b",
        "/a%",  # broken escapes
        "/a%4",
        "/a%zz",
        "/a%%41",
        "/a b",  # space, controls, DEL, non-ASCII
        "/a\tb",
        "/a\x00b",
        "/a\x7fb",
        "/caf\u00e9",
        "/a#frag",
    ],
)
def test_normalize_request_path_refuses(raw):
    assert normalize_request_path(raw) is None


# (rule, request, matches); the request is the rule's whole path, so all three types apply.
CANONICAL_EQUIVALENCE = [
    ("/admin", "//admin", True),
    ("/admin", "/%61dmin", True),
    ("/admin", "/ADMIN", False),
    ("/admin", "/%2561dmin", False),  # decoded once only
    ("/%7Euser", "/~user", True),  # rules are canonicalised the same way
    ("/%7euser", "/~user", True),
    ("/~user", "/%7Euser", True),
    ("/a%3ab", "/a%3Ab", True),
    ("/a%3Ab", "/a:b", False),  # ":" and "%3A" differ (reserved character)
    ("/a b", "/a%20b", True),  # the API allows characters a URL path may not hold
    ("/caf\u00e9", "/caf%C3%A9", True),
    ("/caf\u00e9", "/caf%c3%a9", True),
    ("/100%", "/100%25", True),  # a "%" that starts no escape is a literal "%"
    ("/a|b", "/a|b", True),
    ("/a|b", "/a%7cb", True),
    ("/q?", "/q%3F", True),
]


@pytest.mark.parametrize("path_type", [P, E, IS])
@pytest.mark.parametrize("rule, request_path, matches", CANONICAL_EQUIVALENCE)
def test_rule_and_request_paths_compared_canonically(rule, request_path, matches, path_type):
    table = build([entry(rule, path_type, backend="svc")])
    assert (routed(table, "h", request_path) == "svc") is matches
    if path_type != E and matches:
        assert routed(table, "h", request_path + "/sub") == "svc"


def test_dot_dot_semicolon_cannot_reach_another_prefix():
    """The Tomcat/Spring "..;" bypass: a client allowed /public must not reach /admin."""
    table = build([entry("/public", backend="pub"), entry("/admin", backend="adm")])
    assert routed(table, "h", "/public/x;y") == "pub"
    for raw in ("/public/..;/admin", "/public/%2e%2e;/admin", "/public/..%3b/admin", "/public/.;/../admin"):
        assert normalize_request_path(raw) is None, raw


def test_match_on_raw_path_compares_exactly_as_sent():
    table = build([entry("/foo", backend="svc")])
    assert table.match("h", "/foo/bar").backend == "svc"
    assert table.match("h", "/fo%6f") is None  # not canonicalised by match() itself


# ---------------------------------------------------------------------------------------------
# Entry validation and unreachable entries
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        (entry("/a", "Regex"), "pathType"),
        (entry("/a", ""), "pathType"),
        (entry("a", P), "absolute"),
        (entry("", P), "absolute"),
        (entry("", E), "absolute"),
        (entry("a", IS), "absolute"),
        (entry("/a//b", P), "'//'"),
        (entry("/a/./b", E), "'/./'"),
        (entry("/a/../b", P), "'/../'"),
        (entry("/a%2fb", E), "'%2f'"),
        (entry("/a%2Fb", P), "'%2F'"),
        (entry("/a/..", P), "'/..'"),
        (entry("/a/.", E), "'/.'"),
        (entry("/", host="*"), "wildcard"),
        (entry("/", host="*foo.com"), "wildcard"),
        (entry("/", host="foo.*.com"), "wildcard"),
        (entry("/", host="*.*.foo.com"), "wildcard"),
        (entry("/", host="foo_bar.com"), "DNS name"),
        (entry("/", host="foo.com:80"), "DNS name"),
        (entry("/", host="-foo.com"), "DNS name"),
        (entry("/", host="a" * 64 + ".com"), "DNS name"),
        (entry("/", host="\u212a.com"), "DNS name"),  # KELVIN SIGN, lower() gives "k"
        (entry("/", host="b\u00fccher.example"), "DNS name"),  # IDNs are written as xn--
    ],
)
def test_entries_the_api_would_refuse(bad, message):
    problem = check_entry(bad)
    assert problem is not None and message in problem
    with pytest.raises(ValueError, match=r"Ingress default/ing: "):
        build([entry("/ok"), bad])


@pytest.mark.parametrize(
    "good",
    [
        entry("/a", E),
        entry("/", P),
        entry("", IS),
        entry("/a//b", IS),  # the API does not check ImplementationSpecific paths
        entry("/", host="foo.com"),
        entry("/", host="*.foo.com"),
        entry("/", host="FOO.com."),
        entry("/", host=""),
        entry("/", host="xn--bcher-kva.example"),
    ],
)
def test_entries_the_api_accepts(good):
    assert check_entry(good) is None
    assert len(build([good]).describe()) == 1


@pytest.mark.parametrize(
    "path, path_type",
    [
        ("/a/%2e%2e/b", E),  # API-valid, but such a request is refused before routing
        ("/a/%2E/b", P),
        ("/a/../b", IS),
        ("/a/..;/b", IS),
        ("/a/%2e%2e;x/b", P),
        ("/a%2Fb", IS),
        ("/a\\b", IS),
        ("/a%00", P),
    ],
)
def test_unreachable_entries_are_skipped_and_reported(path, path_type):
    table = build([entry(path, path_type, ingress="ns/odd"), entry("/", backend="root")])
    assert len(table.skipped) == 1 and "ns/odd" in table.skipped[0]
    assert [r["path"] for r in table.describe()] == ["/"]


def test_implementation_specific_double_slash_is_merged():
    table = build([entry("/a//b", IS, backend="svc")])
    assert routed(table, "h", "/a/b/c") == "svc"


# ---------------------------------------------------------------------------------------------
# describe() and immutability
# ---------------------------------------------------------------------------------------------


def test_describe_lists_winners_in_evaluation_order():
    table = build(
        [
            entry("/", P, "root", host=None, ingress="ns/a"),
            entry("/x", E, "wx", host="*.foo.com", ingress="ns/a"),
            entry("/a", P, "a", host="b.com", ingress="ns/a"),
            entry("/a/b", P, "ab", host="b.com", ingress="ns/a"),
            entry("/a/b", E, "abx", host="b.com", ingress="ns/a"),
            entry("/", P, "aroot", host="a.com", ingress="ns/b"),
        ],
        default_backend="dflt",
        default_ingress="ns/d",
    )
    rows = table.describe()
    assert [(r["host"], r["path"], r["pathType"]) for r in rows] == [
        ("a.com", "/", P),
        ("b.com", "/a/b", E),
        ("b.com", "/a/b", P),
        ("b.com", "/a", P),
        ("*.foo.com", "/x", E),
        (None, "/", P),
        (None, "", "Default"),
    ]
    assert rows[0] == {
        "host": "a.com",
        "path": "/",
        "pathType": P,
        "ingress": "ns/b",
        "backend": "aroot",
    }
    assert rows[-1]["ingress"] == "ns/d" and rows[-1]["backend"] == "dflt"
    json.dumps(rows)  # JSON-able
    rows[0]["host"] = "mutated"
    assert table.describe()[0]["host"] == "a.com"  # callers get copies


def test_describe_stringifies_backends():
    class Backend:
        def __str__(self):
            return "default/web:http"

    table = build([entry("/", backend=Backend())])
    assert table.describe()[0]["backend"] == "default/web:http"


def test_table_is_immutable():
    table = build([entry("/a", host="foo.com"), entry("/b")])
    raw = table.table
    with pytest.raises(dataclasses.FrozenInstanceError):
        raw.conflicts = ("x",)
    with pytest.raises(TypeError):
        raw._exact_hosts["evil.com"] = raw._any_host  # type: ignore[index]
    with pytest.raises(TypeError):
        raw._any_host.prefix["/evil"] = None  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        raw.match("foo.com", "/a").name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.match("foo.com", "/a").backend = "other"  # type: ignore[misc]


def test_build_consumes_any_iterable_once():
    table = build(entry(p, backend=p) for p in ("/a", "/b"))
    assert routed(table, "h", "/b/c") == "/b"


# ---------------------------------------------------------------------------------------------
# Scale: 10,000 rules.  match() is a handful of dict probes per path element (see the module
# docstring); this checks the answers at that size, timing belongs in bench/.
# ---------------------------------------------------------------------------------------------


def ten_thousand_entries():
    entries = []
    for i in range(1000):  # 5,000 entries on 1,000 exact hosts
        h = f"h{i}.example.com"
        entries += [
            entry(f"/p{i}", P, f"h{i}:p", host=h),
            entry(f"/p{i}/deep/er", P, f"h{i}:deep", host=h),
            entry(f"/p{i}/x", E, f"h{i}:x", host=h),
            entry("/shared", P, f"h{i}:shared", host=h),
            entry("/", E, f"h{i}:root", host=h),
        ]
    for i in range(1000):  # 2,000 entries on 1,000 wildcard hosts
        w = f"*.w{i}.example.com"
        entries += [entry("/w", P, f"w{i}:w", host=w), entry(f"/w{i}", E, f"w{i}:exact", host=w)]
    for k in range(3000):  # 3,000 entries without host
        entries.append(entry(f"/any/{k}", P, f"any:{k}"))
    assert len(entries) == 10_000
    return entries


def test_ten_thousand_rules():
    table = build(ten_thousand_entries(), default_backend="dflt")
    assert table.conflicts == () and table.skipped == ()
    assert len(table.describe()) == 10_001
    for i in range(0, 1000, 37):
        h = f"h{i}.example.com"
        cases = [
            (h, f"/p{i}", f"h{i}:p"),
            (h, f"/p{i}/x", f"h{i}:x"),
            (h, f"/p{i}/x/", f"h{i}:p"),
            (h, f"/p{i}/x/y", f"h{i}:p"),
            (h, f"/p{i}/deep", f"h{i}:p"),
            (h, f"/p{i}/deep/er/more/and/more", f"h{i}:deep"),
            (h, "/shared/thing", f"h{i}:shared"),
            (h, "/", f"h{i}:root"),
            (h.upper() + ".:443", f"/p{i}/", f"h{i}:p"),
            (h, f"/p{i + 1}", "dflt"),  # another host's path
            (h, f"/any/{i}/x", f"any:{i}"),  # falls through to hostless
            (f"x.w{i}.example.com", "/w/z", f"w{i}:w"),
            (f"x.w{i}.example.com", f"/w{i}", f"w{i}:exact"),
            (f"x.w{i}.example.com", f"/any/{i * 3}", f"any:{i * 3}"),
            (f"a.b.w{i}.example.com", "/w", "dflt"),  # two labels: wildcard does not cover
            (f"w{i}.example.com", "/w", "dflt"),
            ("unknown.example.com", f"/any/{2999 - i}/", f"any:{2999 - i}"),
        ]
        for host, path, expected in cases:
            assert routed(table, host, path) == expected, (host, path)


def test_very_deep_and_very_long_paths():
    table = build([entry("/a", backend="a"), entry("/a/a/a", E, backend="aaa")])
    deep = "/a" * 20_000
    assert routed(table, "h", deep) == "a"
    assert routed(table, "h", "/a/a/a") == "aaa"
    assert routed(table, "h", "/b" + "/a" * 20_000) is None
    assert routed(table, "h", "/" + "a" * 100_000) is None


# ---------------------------------------------------------------------------------------------
# Differential test against a direct transcription of the spec (O(rules) per request)
# ---------------------------------------------------------------------------------------------


def reference_match(entries, default, host, path):
    """The spec, written naively: plain paths only (no escapes, no '//')."""
    h = host.rsplit(":", 1)[0].lower() if not host.startswith("[") else host
    h = h[:-1] if h.endswith(".") else h
    req_elems = [x for x in path.split("/") if x]

    def level_of(e):
        rh = (e.host or "").lower().rstrip(".")
        if not rh:
            return 2
        if rh.startswith("*."):
            label, _, rest = h.partition(".")
            return 1 if label and rest == rh[2:] else None
        return 0 if rh == h else None

    def matched_length(e):
        if e.path_type == E:
            return len(e.path) if e.path == path else None
        rule_elems = [x for x in e.path.split("/") if x]
        if req_elems[: len(rule_elems)] == rule_elems:
            return len("/" + "/".join(rule_elems)) if rule_elems else 0
        return None

    for level in (0, 1, 2):
        best = None
        for index, e in enumerate(entries):
            if level_of(e) != level:
                continue
            length = matched_length(e)
            if length is None:
                continue
            # Higher is better: length, Exact; then older (unknown last), name, input order.
            age = (0, e.created) if e.created else (1, "")
            ns, _, name = e.ingress.partition("/")
            key = (length, e.path_type == E)
            rank = (age, (ns, name), index)
            if best is None or key > best[0] or (key == best[0] and rank < best[1]):
                best = (key, rank, e)
        if best is not None:
            return best[2].backend
    return default


@pytest.mark.parametrize("seed", range(12))
def test_against_reference(seed):
    rnd = random.Random(seed)
    words = ["a", "b", "ab", "c"]
    hosts = [None, "", "x.com", "y.x.com", "*.x.com", "Z.x.com", "*.y.x.com"]
    ingresses = ["ns/a", "ns/b", "other/a"]
    times = ["", "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z"]

    def rand_path():
        depth = rnd.randint(0, 3)
        p = "/" + "/".join(rnd.choice(words) for _ in range(depth))
        if depth and rnd.random() < 0.3:
            p += "/"
        return p

    entries = [
        RouteEntry(
            host=rnd.choice(hosts),
            path=rand_path(),
            path_type=rnd.choice([E, P, IS]),
            backend=f"b{n}",
            ingress=rnd.choice(ingresses),
            created=rnd.choice(times),
        )
        for n in range(rnd.randint(1, 40))
    ]
    default = rnd.choice([None, "dflt"])
    table = build(entries, default_backend=default)
    req_hosts = ["x.com", "X.COM:80", "y.x.com", "z.x.com.", "w.y.x.com", "q.w.y.x.com", "o", ""]
    for _ in range(200):
        host, path = rnd.choice(req_hosts), rand_path()
        got = table.match(host, normalize_request_path(path))
        expected = reference_match(entries, default, host, path)
        assert (None if got is None else got.backend) == expected, (host, path, entries)


@pytest.mark.parametrize("seed", range(4))
def test_match_never_raises(seed):
    rnd = random.Random(seed)
    table = build(
        [entry("/", host="*.x.com"), entry("/a", E, host="x.com"), entry("/b")], default_backend="d"
    )
    alphabet = "/.%:[]aA0\\?#\x00 \u00e9\u212a2fF"
    for _ in range(2000):
        host = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 8)))
        path = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12)))
        canonical = normalize_request_path(path)
        if canonical is not None:
            assert normalize_request_path(canonical) == canonical
            assert table.match(host, canonical) is not None
        assert table.match(host, path) is not None  # raw strings too: never raises
