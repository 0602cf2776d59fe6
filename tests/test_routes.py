"""Table tests for the route model beyond Ingress (meshproxy.core.routes): conditions on method,
headers, query and cookies, rank order inside a slot, regular-expression paths, suffix wildcards,
hosts that do not fall through, weighted backend choice and header edits. Ingress semantics are
pinned by tests/test_router.py."""

from __future__ import annotations

import re

import pytest

from meshproxy.core.routes import (
    EXACT,
    PREFIX,
    REGEX,
    Action,
    BackendRef,
    Conditions,
    CookieMatch,
    HeaderEdits,
    HeaderMatch,
    QueryMatch,
    Route,
    RouteEntry,
    RouteTable,
)


class Req:
    """The request view conditions are tested against (what l7 hands to match())."""

    def __init__(self, method=b"GET", headers=(), query=None, cookies=None):
        self.method = method
        self._headers = [(n.lower(), v) for n, v in headers]
        self._query = query or {}
        self._cookies = cookies or {}

    def header(self, name):
        vals = [v for n, v in self._headers if n == name]
        return b", ".join(vals) if vals else None

    def query_param(self, name):
        return self._query.get(name)

    def cookie(self, name):
        return self._cookies.get(name)


def route(name, path="/", kind=PREFIX, host=None, cond=None, regex=None, regex_prefix=False, action=None):
    return Route(name=name, source=f"test {name}", host=host, path_kind=kind, path=path,
                 action=action or Action(), conditions=cond,
                 regex=re.compile(regex) if regex else None, regex_prefix=regex_prefix)


def table(*entries, **kw):
    return RouteTable.build([RouteEntry(r.host, r, rank) for r, rank in entries], **kw)


def name_of(t, host, path, req=None):
    r = t.match(host, path, req)
    return None if r is None else r.name


# -- conditions ---------------------------------------------------------------------------------

GATEWAY_LIKE = table(
    # Same path, more specific conditions ranked first (what the Gateway API compiler computes).
    (route("get-with-header", "/api", cond=Conditions(method=b"GET", headers=(HeaderMatch(b"x-env", b"canary"),))), (0,)),
    (route("header-only", "/api", cond=Conditions(headers=(HeaderMatch(b"x-env", b"canary"),))), (1,)),
    (route("post", "/api", cond=Conditions(method=b"POST")), (2,)),
    (route("query", "/api", cond=Conditions(query=(QueryMatch("v", "2"),))), (3,)),
    (route("cookie", "/api", cond=Conditions(cookies=(CookieMatch("beta", "always"),))), (4,)),
    (route("regex-header", "/api", cond=Conditions(headers=(HeaderMatch(b"x-user", regex=re.compile(r"u-\d+")),))), (5,)),
    (route("plain", "/api"), (6,)),
    (route("root", "/"), (7,)),
)


@pytest.mark.parametrize("req, path, expected", [
    (Req(b"GET", [(b"X-Env", b"canary")]), "/api/x", "get-with-header"),
    (Req(b"PUT", [(b"X-Env", b"canary")]), "/api/x", "header-only"),
    (Req(b"POST"), "/api", "post"),
    (Req(b"GET", query={"v": "2"}), "/api", "query"),
    (Req(b"GET", query={"v": "3"}), "/api", "plain"),
    (Req(b"GET", cookies={"beta": "always"}), "/api/b", "cookie"),
    (Req(b"GET", [(b"x-user", b"u-17")]), "/api", "regex-header"),
    (Req(b"GET", [(b"x-user", b"u-17x")]), "/api", "plain"),     # regex is a full match
    (Req(b"GET", [(b"x-env", b"Canary")]), "/api", "plain"),     # values are case-sensitive
    (Req(b"GET"), "/apix", "root"),                              # element-wise prefix
    (Req(b"GET"), "/other", "root"),
])
def test_first_candidate_whose_conditions_hold(req, path, expected):
    assert name_of(GATEWAY_LIKE, "any.host", path, req) == expected
    assert not GATEWAY_LIKE.plain


def test_split_header_fields_are_joined_before_matching():
    t = table((route("both", "/", cond=Conditions(headers=(HeaderMatch(b"x-a", b"1, 2"),))), ()))
    assert name_of(t, "h", "/", Req(headers=[(b"x-a", b"1"), (b"x-a", b"2")])) == "both"


def test_inverted_header_match():
    t = table((route("not-beta", "/", cond=Conditions(headers=(HeaderMatch(b"x-beta", b"1", invert=True),))), ()))
    assert name_of(t, "h", "/", Req()) == "not-beta"
    assert name_of(t, "h", "/", Req(headers=[(b"x-beta", b"1")])) is None


def test_longer_prefix_beats_conditions_on_a_shorter_one():
    t = table((route("short-post", "/a", cond=Conditions(method=b"POST")), (0,)), (route("long", "/a/b"), (1,)))
    assert name_of(t, "h", "/a/b/c", Req(b"POST")) == "long"
    assert name_of(t, "h", "/a/c", Req(b"POST")) == "short-post"


def test_exact_beats_prefix_whatever_the_rank():
    t = table((route("prefix", "/a"), (0,)), (route("exact", "/a", kind=EXACT), (9,)))
    assert name_of(t, "h", "/a") == "exact"
    assert name_of(t, "h", "/a/") == "prefix"


def test_same_match_twice_lower_rank_wins_and_the_other_is_reported():
    t = table((route("young", "/a"), (2,)), (route("old", "/a"), (1,)))
    assert name_of(t, "h", "/a") == "old"
    assert len(t.conflicts) == 1 and "test young ignored" in t.conflicts[0]


# -- regular expressions ------------------------------------------------------------------------

def test_regex_full_match_after_prefix_by_default():
    t = table((route("regex", r"/v\d+/items", kind=REGEX, regex=r"/v\d+/items"), (0,)),
              (route("prefix", "/v1"), (1,)))
    assert name_of(t, "h", "/v2/items") == "regex"
    assert name_of(t, "h", "/v1/items") == "prefix"         # Prefix first unless regex_first
    assert name_of(t, "h", "/v2/items/x") is None            # full match
    first = table((route("regex", r"/v\d+/items", kind=REGEX, regex=r"/v\d+/items"), (0,)),
                  (route("prefix", "/v1"), (1,)), regex_first=True)
    assert name_of(first, "h", "/v1/items") == "regex"


def test_regex_prefix_mode_is_case_insensitive_when_compiled_so():
    # ingress-nginx's "~*" locations: matched from the start, case-insensitively, rest may follow.
    r = Route("nginx", "test nginx", None, REGEX, "/foo/(.+)", Action(), regex=re.compile("/foo/(.+)", re.I),
              regex_prefix=True)
    t = table((r, ()))
    assert name_of(t, "h", "/FOO/bar/baz") == "nginx"
    assert name_of(t, "h", "/x/foo/bar") is None


def test_regex_candidates_keep_their_rank_order():
    t = table((route("long", "/abc.*", kind=REGEX, regex="/abc.*"), (0,)),
              (route("short", "/a.*", kind=REGEX, regex="/a.*"), (1,)))
    assert name_of(t, "h", "/abcd") == "long"
    assert name_of(t, "h", "/axyz") == "short"


# -- hosts --------------------------------------------------------------------------------------

def test_suffix_wildcards_cover_several_labels_longest_first():
    t = table((route("foo", host="*.foo.com"), ()), (route("bar-foo", host="*.bar.foo.com"), ()),
              label_wildcards=False)
    assert name_of(t, "a.foo.com", "/") == "foo"
    assert name_of(t, "a.b.foo.com", "/") == "foo"
    assert name_of(t, "a.bar.foo.com", "/") == "bar-foo"
    assert name_of(t, "foo.com", "/") is None
    assert name_of(t, "xfoo.com", "/") is None


def test_label_wildcards_cover_one_label_only():
    t = table((route("foo", host="*.foo.com"), ()))
    assert name_of(t, "a.foo.com", "/") == "foo"
    assert name_of(t, "a.b.foo.com", "/") is None


def test_without_fallthrough_the_most_specific_host_decides():
    entries = [(route("exact-a", "/a", host="x.com"), ()), (route("any-b", "/b"), ())]
    assert name_of(table(*entries), "x.com", "/b") == "any-b"
    assert name_of(table(*entries, host_fallthrough=False), "x.com", "/b") is None
    assert name_of(table(*entries, host_fallthrough=False), "y.com", "/b") == "any-b"


# -- actions ------------------------------------------------------------------------------------

def test_weighted_pick_follows_the_weights():
    a = Action(backends=(BackendRef(("ns", "a", "80"), 90), BackendRef(("ns", "b", "80"), 10)))
    picks = [a.pick_backend(i / 1000).key[1] for i in range(1000)]
    assert picks.count("a") == 900 and picks.count("b") == 100


@pytest.mark.parametrize("weights, expected", [((0, 0), None), ((), None), ((0, 3), "b"), ((5,), "a")])
def test_zero_weights_get_nothing(weights, expected):
    refs = tuple(BackendRef(("ns", n, "80"), w) for n, w in zip("ab", weights))
    picked = Action(backends=refs).pick_backend(0.5)
    assert (None if picked is None else picked.key[1]) == expected


def test_invalid_reference_is_picked_by_its_weight():
    a = Action(backends=(BackendRef(None, 1, "missing"), BackendRef(("ns", "b", "80"), 1)), invalid_status=500)
    assert a.pick_backend(0.1).key is None and a.pick_backend(0.9).key is not None


def test_header_edits_remove_set_add():
    e = HeaderEdits(set=((b"x-set", b"new"),), add=((b"x-add", b"2"),), remove=(b"x-drop",))
    out = e.apply([(b"X-Set", b"old"), (b"X-Drop", b"v"), (b"X-Add", b"1"), (b"Keep", b"k")])
    assert out == [(b"X-Add", b"1"), (b"Keep", b"k"), (b"x-set", b"new"), (b"x-add", b"2")]


def test_routes_and_describe_list_every_route_once():
    t = table((route("a", "/a", kind=EXACT, host="h.com"), ()), (route("b", "/b"), ()),
              (route("c", "/c.*", kind=REGEX, regex="/c.*"), ()))
    assert sorted(r.name for r in t.routes()) == ["a", "b", "c"]
    assert [row["route"] for row in t.describe()] == ["a", "b", "c"]
