"""Gateway API routing at the route-table level: request -> route -> backend / status / redirect,
for every Core and Extended HTTPRoute feature, with the cases of the specification's own
examples and of the upstream conformance scenarios (matching, precedence, hostnames, listener
isolation, filters, redirects, rewrites, weights, cross-namespace references, 404 / 500).

Each scenario is a set of manifests played through ``meshproxy.core`` exactly as ``meshproxy
run`` builds its snapshot; ``gateway_fixtures.outcome`` plays one request through the listener's
table. The same scenarios run over real sockets in tests/test_gateway_e2e.py.
"""

from __future__ import annotations

import pytest

from gateway_fixtures import (APP, INFRA, WEB, Req, base_yaml, distribution, forwarded, outcome, route_conditions,
                              snapshot)
from meshproxy.core.gateway_rules import replace_prefix

SAME = ("127.0.40.1", 80)
ALL = ("127.0.40.2", 80)
SEL = ("127.0.40.3", 80)
V1, V2, V3 = (("backend", f"{INFRA}/infra-backend-v{i}") for i in (1, 2, 3))
NOT_FOUND = ("status", 404)
ERROR = ("status", 500)


def route(name: str, body: str, ns: str = INFRA, parent: str = "same-namespace", kind: str = "HTTPRoute",
          created: str | None = None, parent_ns: str | None = None) -> str:
    meta = f"{{name: {name}, namespace: {ns}" + (f", creationTimestamp: '{created}'" if created else "") + "}"
    pns = f", namespace: {parent_ns}" if parent_ns else ""
    return f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: {kind}
metadata: {meta}
spec:
  parentRefs: [{{name: {parent}{pns}}}]
{body}"""


def served(*routes: str, **kw):
    return snapshot(base_yaml() + "".join(routes), **kw)


def check(snap, cases, gw=SAME):
    for req, want in cases:
        assert outcome(snap, *gw, req) == want, (req.host, req.target, req.method, req._headers)


# -- matching -----------------------------------------------------------------------------------

MATCHING = route("matching", """  rules:
  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
""")


def test_matching_paths_and_headers_with_precedence():
    check(served(MATCHING), [
        (Req("/"), V1), (Req("/example"), V1), (Req("/", headers={"Version": "one"}), V1),
        (Req("/v2"), V2), (Req("/v2/example"), V2), (Req("/", headers={"Version": "two"}), V2),
        (Req("/v2/"), V2),
        (Req("/v2example"), V1),          # not a path-element prefix of /v2
        (Req("/foo/v2/example"), V1),
    ])


def test_matching_across_routes_with_hostnames():
    part1 = route("matching-part1", """  hostnames: [example.com, example.net]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
""")
    part2 = route("matching-part2", """  hostnames: [example.com]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
""")
    check(served(part1, part2), [
        (Req("/", "example.com"), V1), (Req("/example", "example.com"), V1), (Req("/example", "example.net"), V1),
        (Req("/example", "example.com", headers={"Version": "one"}), V1),
        (Req("/v2", "example.com"), V2), (Req("/v2", "example.net"), V1), (Req("/v2/example", "example.com"), V2),
        (Req("/", "example.com", headers={"Version": "two"}), V2),
        (Req("/", "other.org"), NOT_FOUND),
    ])


def test_exact_path_matching():
    r = route("exact-matching", """  rules:
  - matches: [{path: {type: Exact, value: /one}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: Exact, value: /two}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
""")
    check(served(r), [(Req("/one"), V1), (Req("/two"), V2), (Req("/"), NOT_FOUND), (Req("/one/example"), NOT_FOUND),
                      (Req("/two/"), NOT_FOUND), (Req("/Two"), NOT_FOUND)])


def test_path_match_order():
    r = route("path-matching-order", """  rules:
  - matches: [{path: {type: Exact, value: /match}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: Exact, value: /match/exact}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: Exact, value: /match/exact/one}}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /match/}}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /match/prefix/}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /match/prefix/one}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
""")
    check(served(r), [(Req("/match/exact/one"), V3), (Req("/match/exact"), V2), (Req("/match"), V1),
                      (Req("/match/prefix/one/any"), V2), (Req("/match/prefix/any"), V1), (Req("/match/any"), V3)])


def test_header_matching():
    r = route("header-matching", """  rules:
  - matches: [{headers: [{name: version, value: one}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: version, value: two}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: color, value: blue}]}, {headers: [{name: color, value: green}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: color, value: red}]}, {headers: [{name: color, value: yellow}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
""")
    h = lambda **kw: Req("/", headers={k.replace("_", "-"): v for k, v in kw.items()})  # noqa: E731
    check(served(r), [
        (h(Version="one"), V1), (h(Version="two"), V2), (h(Version="two", Color="orange"), V1),
        (h(Version="two", Color="blue"), V2),      # one header each: the earlier rule wins
        (h(Color="orange"), NOT_FOUND), (h(Some_Other_Header="one"), NOT_FOUND),
        (h(Color="blue"), V1), (h(Color="green"), V1), (h(Color="red"), V2), (h(Color="yellow"), V2),
        (h(Color="purple"), NOT_FOUND),
    ])


def test_header_regex_and_repeated_names():
    r = route("regex", """  rules:
  - matches: [{headers: [{type: RegularExpression, name: x-user, value: "u-[0-9]+"}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: X-Tier, value: gold}, {name: x-tier, value: silver}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
""")
    check(served(r), [
        (Req("/", headers={"X-User": "u-17"}), V1), (Req("/", headers={"X-User": "u-17x"}), NOT_FOUND),
        # Only the first entry of an equivalent (case-insensitive) name counts.
        (Req("/", headers={"x-tier": "gold"}), V2), (Req("/", headers={"x-tier": "silver"}), NOT_FOUND),
    ])


QUERY = route("query-param-matching", """  rules:
  - matches: [{queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: dolphin}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches:
    - queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]
    - queryParams: [{name: ANIMAL, value: Whale}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path1}, queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: version, value: one}], queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /path2}
      headers: [{name: version, value: two}]
      queryParams: [{name: animal, value: whale}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches:
    - path: {type: PathPrefix, value: /path3}
      queryParams: [{name: animal, value: shark}]
    - path: {type: PathPrefix, value: /path4}
      headers: [{name: version, value: three}]
      queryParams: [{name: animal, value: kraken}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path5}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{queryParams: [{name: animal, value: hydra}]}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{headers: [{name: version, value: four}]}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
""")


def test_query_param_matching():
    check(served(QUERY), [
        (Req("/?animal=whale"), V1), (Req("/?animal=dolphin"), V2), (Req("/?animal=dolphin&color=blue"), V3),
        (Req("/?ANIMAL=Whale"), V3), (Req("/?animal=whale&otherparam=irrelevant"), V1),
        (Req("/?animal=dolphin&color=yellow"), V2), (Req("/?color=blue"), NOT_FOUND), (Req("/?animal=dog"), NOT_FOUND),
        (Req("/?animal=whaledolphin"), NOT_FOUND), (Req("/"), NOT_FOUND),
        (Req("/path1?animal=whale"), V1), (Req("/?animal=whale", headers={"version": "one"}), V2),
        (Req("/path2?animal=whale", headers={"version": "two"}), V3),
        (Req("/path3?animal=shark"), V1), (Req("/path4?animal=kraken", headers={"version": "three"}), V1),
        (Req("/?animal=shark"), NOT_FOUND), (Req("/path4?animal=kraken"), NOT_FOUND),
        (Req("/path5?animal=hydra"), V1),                                  # longer prefix first
        (Req("/?animal=hydra", headers={"version": "four"}), V3),          # headers before query params
    ])


def test_method_matching():
    r = route("method-matching", """  rules:
  - matches: [{method: POST}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{method: GET}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path1}, method: GET}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{headers: [{name: version, value: one}], method: PUT}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path2}, headers: [{name: version, value: two}], method: POST}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches:
    - {path: {type: PathPrefix, value: /path3}, method: PATCH}
    - {path: {type: PathPrefix, value: /path4}, headers: [{name: version, value: three}], method: DELETE}
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /path5}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{method: PATCH}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{headers: [{name: version, value: four}]}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
""")
    check(served(r), [
        (Req("/", method="POST"), V1), (Req("/", method="GET"), V2), (Req("/", method="HEAD"), NOT_FOUND),
        (Req("/path1", method="GET"), V1), (Req("/", method="PUT", headers={"version": "one"}), V2),
        (Req("/path2", method="POST", headers={"version": "two"}), V3),
        (Req("/path3", method="PATCH"), V1), (Req("/path4", method="DELETE", headers={"version": "three"}), V1),
        (Req("/", method="PUT"), NOT_FOUND), (Req("/path4", method="DELETE"), NOT_FOUND),
        (Req("/path5", method="PATCH"), V1),                                    # longer prefix first
        (Req("/", method="PATCH", headers={"version": "four"}), V2),            # method before headers
    ])


def test_regular_expression_paths_come_before_prefixes():
    r = route("regex-path", """  rules:
  - matches: [{path: {type: RegularExpression, value: "/v[0-9]+/items"}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{path: {type: Exact, value: /v1/items}}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
""")
    check(served(r), [(Req("/v2/items"), V1), (Req("/v1/items"), V3), (Req("/v2/items/x"), V2), (Req("/"), V2)])


def test_older_route_wins_a_tie_then_namespace_and_name():
    a = route("zz-old", """  rules:
  - backendRefs: [{name: infra-backend-v1, port: 8080}]
""", created="2024-01-01T00:00:00Z")
    b = route("aa-new", """  rules:
  - backendRefs: [{name: infra-backend-v2, port: 8080}]
""", created="2024-06-01T00:00:00Z")
    c = route("bb", """  rules:
  - backendRefs: [{name: infra-backend-v3, port: 8080}]
""")
    assert outcome(served(a, b, c), *SAME, Req("/")) == V1
    assert outcome(served(b, c), *SAME, Req("/")) == V2          # unknown age sorts last
    assert outcome(served(c, route("ba", "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n")),
                   *SAME, Req("/")) == V1                          # "ba" < "bb"


# -- hostnames and listener isolation ---------------------------------------------------------


def test_hostname_intersection():
    gw = """---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: hi, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: meshproxy
  addresses: [{value: 127.0.41.1}]
  listeners:
  - {name: listener-1, port: 80, protocol: HTTP, hostname: very.specific.com}
  - {name: listener-2, port: 80, protocol: HTTP, hostname: "*.wildcard.io"}
  - {name: listener-3, port: 80, protocol: HTTP, hostname: "*.anotherwildcard.io"}
"""
    rs = [
        route("s1", "  hostnames: [non.matching.com, '*.nonmatchingwildcard.io', very.specific.com]\n  rules:\n"
                    "  - matches: [{path: {type: PathPrefix, value: /s1}}]\n"
                    "    backendRefs: [{name: infra-backend-v1, port: 8080}]\n", parent="hi"),
        route("s2", "  hostnames: [non.matching.com, wildcard.io, foo.wildcard.io, bar.wildcard.io, foo.bar.wildcard.io]\n"
                    "  rules:\n  - matches: [{path: {type: PathPrefix, value: /s2}}]\n"
                    "    backendRefs: [{name: infra-backend-v2, port: 8080}]\n", parent="hi"),
        route("s3", "  hostnames: [non.matching.com, '*.specific.com']\n  rules:\n"
                    "  - matches: [{path: {type: PathPrefix, value: /s3}}]\n"
                    "    backendRefs: [{name: infra-backend-v3, port: 8080}]\n", parent="hi"),
        route("s4", "  hostnames: ['*.anotherwildcard.io']\n  rules:\n"
                    "  - matches: [{path: {type: PathPrefix, value: /s4}}]\n"
                    "    backendRefs: [{name: infra-backend-v1, port: 8080}]\n", parent="hi"),
        route("s5", "  hostnames: [specific.but.wrong.com, wildcard.io]\n  rules:\n"
                    "  - matches: [{path: {type: PathPrefix, value: /s5}}]\n"
                    "    backendRefs: [{name: infra-backend-v2, port: 8080}]\n", parent="hi"),
    ]
    snap = served(gw, *rs)
    addr = ("127.0.41.1", 80)
    check(snap, [
        (Req("/s1", "very.specific.com"), V1), (Req("/s1", "very.specific.com:1234"), V1),
        (Req("/s1", "non.matching.com"), NOT_FOUND), (Req("/s1", "foo.nonmatchingwildcard.io"), NOT_FOUND),
        (Req("/s1", "foo.wildcard.io"), NOT_FOUND), (Req("/non-matching-prefix", "very.specific.com"), NOT_FOUND),
        (Req("/s2", "foo.wildcard.io"), V2), (Req("/s2", "bar.wildcard.io"), V2), (Req("/s2", "foo.bar.wildcard.io"), V2),
        (Req("/s2", "non.matching.com"), NOT_FOUND), (Req("/s2", "wildcard.io"), NOT_FOUND),
        (Req("/s2", "very.specific.com"), NOT_FOUND),
        (Req("/s3", "very.specific.com"), V3), (Req("/s3", "foo.specific.com"), NOT_FOUND),
        (Req("/s3", "foo.wildcard.io"), NOT_FOUND),
        (Req("/s4", "foo.anotherwildcard.io"), V1), (Req("/s4", "foo.bar.anotherwildcard.io"), V1),
        (Req("/s4", "anotherwildcard.io"), NOT_FOUND), (Req("/s4", "foo.wildcard.io"), NOT_FOUND),
        (Req("/s5", "specific.but.wrong.com"), NOT_FOUND), (Req("/s5", "wildcard.io"), NOT_FOUND),
    ], gw=addr)
    assert route_conditions(snap, "HTTPRoute", INFRA, "s5")["Accepted"] == ("False", "NoMatchingListenerHostname")
    for name in ("s1", "s2", "s3", "s4"):
        assert route_conditions(snap, "HTTPRoute", INFRA, name)["Accepted"] == ("True", "Accepted")


def test_route_hostnames_on_a_listener_without_hostname():
    r = route("all", "  hostnames: [first.com, sub.first.com, second.com]\n  rules:\n"
                     "  - backendRefs: [{name: infra-backend-v2, port: 8080}]\n")
    check(served(r), [(Req("/", "first.com"), V2), (Req("/", "sub.first.com"), V2), (Req("/", "second.com"), V2),
                      (Req("/", "third.com"), NOT_FOUND), (Req("/", "sub.third.com"), NOT_FOUND)])


def test_a_specific_hostname_takes_precedence_and_falls_through_to_the_catch_all():
    catch_all = route("catch-all", "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n")
    specific = route("specific", "  hostnames: [www.host.org]\n  rules:\n"
                                 "  - matches: [{path: {type: PathPrefix, value: /pathmatch}}]\n"
                                 "    backendRefs: [{name: infra-backend-v2, port: 8080}]\n")
    wildcard = route("wild", "  hostnames: ['*.host.org']\n  rules:\n"
                             "  - matches: [{path: {type: PathPrefix, value: /wild}}]\n"
                             "    backendRefs: [{name: infra-backend-v3, port: 8080}]\n")
    check(served(catch_all, specific, wildcard), [
        (Req("/pathmatch/x", "www.host.org"), V2), (Req("/other", "www.host.org"), V1),
        (Req("/wild", "www.host.org"), V3), (Req("/wild", "a.b.host.org"), V3), (Req("/pathmatch", "x.org"), V1),
    ])


ISOLATION_GW = """---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: iso, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: meshproxy
  addresses: [{value: 127.0.42.1}]
  listeners:
  - {name: empty-hostname, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
  - {name: wildcard-example-com, port: 80, protocol: HTTP, hostname: "*.example.com", allowedRoutes: {namespaces: {from: All}}}
  - {name: wildcard-foo-example-com, port: 80, protocol: HTTP, hostname: "*.foo.example.com", allowedRoutes: {namespaces: {from: All}}}
  - {name: abc-foo-example-com, port: 80, protocol: HTTP, hostname: "abc.foo.example.com", allowedRoutes: {namespaces: {from: All}}}
"""
ISOLATION_NAMES = ("empty-hostname", "wildcard-example-com", "wildcard-foo-example-com", "abc-foo-example-com")


def _isolation_routes(hostnames: str) -> list[str]:
    out = []
    for name in ISOLATION_NAMES:
        out.append(f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: attaches-to-{name}, namespace: {INFRA}}}
spec:
  parentRefs: [{{name: iso, sectionName: {name}}}]
{hostnames}  rules:
  - matches: [{{path: {{type: PathPrefix, value: /{name}}}}}]
    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
""")
    return out


@pytest.mark.parametrize("hostnames", [
    "",
    "  hostnames: [bar.com, '*.example.com', '*.foo.example.com', abc.foo.example.com]\n",
], ids=["hostnames-only-on-listeners", "intersecting-route-hostnames"])
def test_listener_isolation(hostnames):
    snap = served(ISOLATION_GW, *_isolation_routes(hostnames))
    owner = {"bar.com": "empty-hostname", "bar.example.com": "wildcard-example-com",
             "bar.foo.example.com": "wildcard-foo-example-com", "abc.foo.example.com": "abc-foo-example-com"}
    for host, listener in owner.items():
        for path in ISOLATION_NAMES:
            want = V1 if path == listener else NOT_FOUND
            assert outcome(snap, "127.0.42.1", 80, Req(f"/{path}", host)) == want, (host, path)


def test_listener_hostname_matching_by_section_name():
    gw = """---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: lhm, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: meshproxy
  addresses: [{value: 127.0.43.1}]
  listeners:
  - {name: listener-1, port: 80, protocol: HTTP, hostname: bar.com}
  - {name: listener-2, port: 80, protocol: HTTP, hostname: foo.bar.com}
  - {name: listener-3, port: 80, protocol: HTTP, hostname: "*.bar.com"}
  - {name: listener-4, port: 80, protocol: HTTP, hostname: "*.foo.com"}
"""
    rs = [route("backend-v1", "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n").replace(
              "[{name: same-namespace}]", "[{name: lhm, sectionName: listener-1}]"),
          route("backend-v2", "  rules:\n  - backendRefs: [{name: infra-backend-v2, port: 8080}]\n").replace(
              "[{name: same-namespace}]", "[{name: lhm, sectionName: listener-2}]"),
          route("backend-v3", "  rules:\n  - backendRefs: [{name: infra-backend-v3, port: 8080}]\n").replace(
              "[{name: same-namespace}]", "[{name: lhm, sectionName: listener-3}, {name: lhm, sectionName: listener-4}]")]
    check(served(gw, *rs), [
        (Req("/", "bar.com"), V1), (Req("/", "foo.bar.com"), V2), (Req("/", "baz.bar.com"), V3),
        (Req("/", "boo.bar.com"), V3), (Req("/", "multiple.prefixes.bar.com"), V3),
        (Req("/", "multiple.prefixes.foo.com"), V3), (Req("/", "foo.com"), NOT_FOUND),
        (Req("/", "no.matching.host"), NOT_FOUND),
    ], gw=("127.0.43.1", 80))


def test_listener_port_matching():
    gw = """---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: lpm, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: meshproxy
  addresses: [{value: 127.0.44.1}]
  listeners:
  - {name: listener-1, port: 80, protocol: HTTP, hostname: foo.com}
  - {name: listener-2, port: 8080, protocol: HTTP, hostname: foo.com}
  - {name: listener-3, port: 8080, protocol: HTTP, hostname: bar.com}
  - {name: listener-4, port: 8090, protocol: HTTP, hostname: foo.com}
  - {name: listener-5, port: 8090, protocol: HTTP, hostname: bar.com}
"""
    rs = [route("backend-v1", "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n").replace(
              "[{name: same-namespace}]", "[{name: lpm, port: 80}]"),
          route("backend-v2", "  rules:\n  - backendRefs: [{name: infra-backend-v2, port: 8080}]\n").replace(
              "[{name: same-namespace}]", "[{name: lpm, port: 8080}]"),
          route("backend-v3", "  rules:\n  - backendRefs: [{name: infra-backend-v3, port: 8080}]\n").replace(
              "[{name: same-namespace}]", "[{name: lpm, port: 8090, sectionName: listener-4}]")]
    snap = served(gw, *rs)
    a = "127.0.44.1"
    assert outcome(snap, a, 80, Req("/", "foo.com")) == V1
    assert outcome(snap, a, 8080, Req("/", "foo.com:8080")) == V2
    assert outcome(snap, a, 8080, Req("/", "bar.com:8080")) == V2
    assert outcome(snap, a, 8090, Req("/", "foo.com:8090")) == V3
    assert outcome(snap, a, 8090, Req("/", "bar.com:8090")) == NOT_FOUND


# -- redirects ------------------------------------------------------------------------------------

def _redirect_route(rules: str) -> str:
    return route("redirect", "  rules:\n" + rules)


def _redirect_rule(prefix: str, redirect: str) -> str:
    return (f"  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]\n"
            f"    filters: [{{type: RequestRedirect, requestRedirect: {redirect}}}]\n")


def test_redirect_path_host_and_status():
    r = _redirect_route(
        _redirect_rule("/original-prefix", "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}")
        + _redirect_rule("/full", "{path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}")
        + _redirect_rule("/path-and-host", "{hostname: example.org, path: {type: ReplacePrefixMatch, "
                                            "replacePrefixMatch: /replacement-prefix}}")
        + _redirect_rule("/path-and-status", "{path: {type: ReplacePrefixMatch, replacePrefixMatch: "
                                             "/replacement-prefix}, statusCode: 301}")
        + _redirect_rule("/full-path-and-host", "{hostname: example.org, path: {type: ReplaceFullPath, "
                                                "replaceFullPath: /replacement-full}}")
        + _redirect_rule("/full-path-and-status", "{path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}, "
                                                  "statusCode: 301}"))
    check(served(r), [
        (Req("/original-prefix/lemon"), ("redirect", 302, "http://example.com/replacement-prefix/lemon")),
        (Req("/full/path/original"), ("redirect", 302, "http://example.com/full-path-replacement")),
        (Req("/path-and-host"), ("redirect", 302, "http://example.org/replacement-prefix")),
        (Req("/path-and-status"), ("redirect", 301, "http://example.com/replacement-prefix")),
        (Req("/full-path-and-host"), ("redirect", 302, "http://example.org/replacement-full")),
        (Req("/full-path-and-status"), ("redirect", 301, "http://example.com/replacement-full")),
        (Req("/original-prefix/lemon?x=1"), ("redirect", 302, "http://example.com/replacement-prefix/lemon?x=1")),
    ])


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_status_codes(code):
    r = _redirect_route(_redirect_rule("/", f"{{hostname: example.org, statusCode: {code}}}"))
    assert outcome(served(r), *SAME, Req("/x", "example.com:8080")) == ("redirect", code, "http://example.org/x")


def test_redirect_port_and_scheme_defaults():
    rules = (_redirect_rule("/scheme-nil-and-port-nil", "{hostname: example.org}")
             + _redirect_rule("/scheme-nil-and-port-80", "{port: 80, hostname: example.org}")
             + _redirect_rule("/scheme-nil-and-port-8080", "{port: 8080, hostname: example.org}")
             + _redirect_rule("/scheme-https-and-port-nil", "{scheme: https, hostname: example.org}")
             + _redirect_rule("/scheme-https-and-port-443", "{scheme: https, port: 443, hostname: example.org}")
             + _redirect_rule("/scheme-https-and-port-8443", "{scheme: https, port: 8443, hostname: example.org}")
             + _redirect_rule("/port", "{port: 8083}")
             + _redirect_rule("/scheme", "{scheme: https}"))
    gw8080 = """---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw8080, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: meshproxy
  addresses: [{value: 127.0.45.1}]
  listeners: [{name: http, port: 8080, protocol: HTTP}]
"""
    r = route("redirect", "  rules:\n" + rules).replace("[{name: same-namespace}]",
                                                       "[{name: same-namespace}, {name: gw8080}]")
    snap = served(gw8080, r)
    on80 = [("/scheme-nil-and-port-nil", "http://example.org/scheme-nil-and-port-nil"),
            ("/scheme-nil-and-port-80", "http://example.org/scheme-nil-and-port-80"),
            ("/scheme-nil-and-port-8080", "http://example.org:8080/scheme-nil-and-port-8080"),
            ("/scheme-https-and-port-nil", "https://example.org/scheme-https-and-port-nil"),
            ("/scheme-https-and-port-443", "https://example.org/scheme-https-and-port-443"),
            ("/scheme-https-and-port-8443", "https://example.org:8443/scheme-https-and-port-8443"),
            ("/port", "http://example.com:8083/port"), ("/scheme", "https://example.com/scheme")]
    for path, loc in on80:
        assert outcome(snap, *SAME, Req(path)) == ("redirect", 302, loc)
    on8080 = [("/scheme-nil-and-port-nil", "http://example.org:8080/scheme-nil-and-port-nil"),
              ("/scheme-nil-and-port-80", "http://example.org/scheme-nil-and-port-80"),
              ("/scheme-https-and-port-nil", "https://example.org/scheme-https-and-port-nil")]
    for path, loc in on8080:
        assert outcome(snap, "127.0.45.1", 8080, Req(path, "example.com:8080")) == ("redirect", 302, loc)


@pytest.mark.parametrize("path, prefix, replacement, expected", [
    # The table of the API's HTTPPathModifier.replacePrefixMatch documentation.
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"), ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"), ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"), ("/foo/", "/foo", "/xyz", "/xyz/"), ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"), ("/foo", "/foo", "", "/"), ("/foo/", "/foo", "/", "/"), ("/foo", "/foo", "/", "/"),
])
def test_replace_prefix_match_table(path, prefix, replacement, expected):
    r = route("rw", f"""  rules:
  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: "{replacement}"}}}}}}]
    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
""")
    assert forwarded(served(r), *SAME, Req(path))["path"] == expected
    assert replace_prefix(path, prefix.rstrip("/"), replacement) == expected


# -- rewrites and header filters -------------------------------------------------------------------

_MODIFY = """    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
        remove: [X-Header-Remove]
"""


def test_rewrite_path_and_modify_headers():
    r = route("rewrite-path", f"""  rules:
  - matches: [{{path: {{type: PathPrefix, value: /prefix/one}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /one}}}}}}]
    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /strip-prefix}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}}}]
    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /full/one}}}}]
    filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /one}}}}}}]
    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
  - matches: [{{path: {{type: PathPrefix, value: /full/rewrite-path-and-modify-headers}}}}]
    filters:
    - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /test}}}}}}
{_MODIFY}    backendRefs: [{{name: infra-backend-v1, port: 8080}}]
""")
    snap = served(r)
    assert forwarded(snap, *SAME, Req("/prefix/one/two"))["path"] == "/one/two"
    assert forwarded(snap, *SAME, Req("/strip-prefix/three"))["path"] == "/three"
    assert forwarded(snap, *SAME, Req("/strip-prefix"))["path"] == "/"
    assert forwarded(snap, *SAME, Req("/full/one/two"))["path"] == "/one"
    out = forwarded(snap, *SAME, Req("/full/rewrite-path-and-modify-headers/test", headers={
        "X-Header-Remove": "remove-val", "X-Header-Add-Append": "append-val-1", "X-Header-Set": "set-val"}))
    assert out["path"] == "/test"
    assert sorted(out["headers"]) == sorted([("x-header-add-append", "append-val-1"),
                                             ("x-header-set", "set-overwrites-values"),
                                             ("x-header-add", "header-val-1"), ("x-header-add-append", "header-val-2")])


def test_rewrite_host():
    r = route("rewrite-host", """  hostnames: [rewrite.example]
  rules:
  - matches: [{path: {type: PathPrefix, value: /one}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: one.example.org}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - filters: [{type: URLRewrite, urlRewrite: {hostname: example.org}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
""")
    snap = served(r)
    assert forwarded(snap, *SAME, Req("/one", "rewrite.example"))["host"] == "one.example.org"
    out = forwarded(snap, *SAME, Req("/two", "rewrite.example"))
    assert (out["host"], out["path"], out["backend"]) == ("example.org", "/two", f"{INFRA}/infra-backend-v2")


def test_backend_ref_header_filters_apply_only_to_their_backend():
    r = route("rhm-backend-weights", """  rules:
  - backendRefs:
    - name: infra-backend-v1
      port: 8080
      weight: 10
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Backend, value: infra-backend-v1}]}}]
    - name: infra-backend-v2
      port: 8080
      weight: 10
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Backend, value: infra-backend-v2}]}}]
""")
    snap = served(r)
    for rand in (0.1, 0.3, 0.6, 0.9):
        out = forwarded(snap, *SAME, Req("/"), rand=rand)
        assert [v for n, v in out["headers"] if n == "backend"] == [out["backend"].split("/")[1]]


def test_response_header_modifier_is_compiled():
    r = route("resp", """  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: header-val-1}]
        remove: [X-Header-Remove]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
""")
    lst = served(r).http_listeners[SAME]
    edits = lst.routes.match("example.com", "/", Req("/")).action.response_headers
    out = edits.apply([(b"X-Header-Remove", b"v"), (b"X-Header-Set", b"old"), (b"keep", b"k")])
    assert out == [(b"keep", b"k"), (b"x-header-set", b"set-overwrites-values"), (b"x-header-add", b"header-val-1")]


def test_mirror_and_fraction():
    r = route("request-mirror", """  rules:
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: infra-backend-v2, port: 8080}}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /fraction}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: infra-backend-v2, port: 8080}, fraction: {numerator: 25, denominator: 50}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: infra-backend-v3, port: 8080}, percent: 20}}
    backendRefs: [{name: infra-backend-v1, port: 8080}]
""")
    t = served(r).http_listeners[SAME].routes
    m = t.match("h", "/mirror", Req("/mirror")).action.mirrors
    assert [(x.backend, x.percent) for x in m] == [((INFRA, "infra-backend-v2", "http"), 100.0)]
    m = t.match("h", "/fraction", Req("/fraction")).action.mirrors
    assert [(x.backend[1], x.percent) for x in m] == [("infra-backend-v2", 50.0), ("infra-backend-v3", 20.0)]


def test_timeouts():
    r = route("timeouts", """  rules:
  - matches: [{path: {type: PathPrefix, value: /request-timeout}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
    timeouts: {request: 500ms}
  - matches: [{path: {type: PathPrefix, value: /disable}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
    timeouts: {request: 0s}
  - matches: [{path: {type: PathPrefix, value: /backend}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
    timeouts: {request: 1m, backendRequest: 1s}
  - backendRefs: [{name: infra-backend-v1, port: 8080}]
""")
    t = served(r, upstream_timeout=42.0).http_listeners[SAME].routes
    a = lambda p: t.match("h", p, Req(p)).action  # noqa: E731
    assert (a("/request-timeout").request_timeout, a("/request-timeout").timeout) == (0.5, None)
    assert (a("/disable").request_timeout, a("/disable").per_try_timeout, a("/disable").timeout) == (None, None, None)
    assert (a("/backend").request_timeout, a("/backend").per_try_timeout) == (60.0, 1.0)
    assert (a("/").request_timeout, a("/").timeout) == (None, 42.0)


# -- weights, 500s, references --------------------------------------------------------------------

def test_weights():
    r = route("weighted-backends", """  rules:
  - backendRefs:
    - {name: infra-backend-v1, port: 8080, weight: 70}
    - {name: infra-backend-v2, port: 8080, weight: 30}
    - {name: infra-backend-v3, port: 8080, weight: 0}
""")
    d = distribution(served(r), *SAME, Req("/"))
    assert d == {f"{INFRA}/infra-backend-v1": 700, f"{INFRA}/infra-backend-v2": 300}


def test_omitted_and_empty_backend_refs_answer_500():
    r = route("omitted-backendrefs", """  rules:
  - matches: [{path: {type: Exact, value: /omitted-no-forward}}]
  - matches: [{path: {type: Exact, value: /empty-no-forward}}]
    backendRefs: []
  - matches: [{path: {type: Exact, value: /zero-weights}}]
    backendRefs: [{name: infra-backend-v1, port: 8080, weight: 0}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
""")
    snap = served(r)
    check(snap, [(Req("/forward"), V1), (Req("/omitted-no-forward"), ERROR), (Req("/empty-no-forward"), ERROR),
                 (Req("/zero-weights"), ERROR)])
    assert route_conditions(snap, "HTTPRoute", INFRA, "omitted-backendrefs")["ResolvedRefs"] == ("True", "ResolvedRefs")


@pytest.mark.parametrize("ref, reason", [
    ("{name: nonexistent, namespace: gateway-conformance-infra, port: 8080}", "BackendNotFound"),
    ("{group: unknownkind.example.com, kind: NonExistent, name: infra-backend-v1, port: 8080}", "InvalidKind"),
    ("{name: web-backend, namespace: gateway-conformance-web-backend, port: 8080}", "RefNotPermitted"),
    ("{name: infra-backend-v1, port: 9999}", "BackendNotFound"),
])
def test_invalid_backend_refs_answer_500_and_say_why(ref, reason):
    snap = served(route("invalid", f"  rules:\n  - backendRefs: [{ref}]\n"))
    assert outcome(snap, *SAME, Req("/")) == ERROR
    conds = route_conditions(snap, "HTTPRoute", INFRA, "invalid")
    assert conds["Accepted"] == ("True", "Accepted")
    assert conds["ResolvedRefs"] == ("False", reason)
    assert any(reason in p for p in snap.problems)


def test_half_invalid_backends_answer_500_in_proportion():
    r = route("half", """  rules:
  - backendRefs:
    - {name: infra-backend-v1, port: 8080}
    - {name: missing, port: 8080}
""")
    assert distribution(served(r), *SAME, Req("/")) == {f"{INFRA}/infra-backend-v1": 500, "('status', 500)": 500}


GRANT = f"""---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: reference-grant, namespace: {WEB}}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {INFRA}}}]
  to: [{{group: "", kind: Service, name: web-backend}}]
"""
CROSS = route("reference-grant", f"  rules:\n  - backendRefs: [{{name: web-backend, namespace: {WEB}, port: 8080}}]\n")


def test_reference_grant_allows_the_cross_namespace_backend():
    snap = served(GRANT, CROSS)
    assert outcome(snap, *SAME, Req("/")) == ("backend", f"{WEB}/web-backend")
    assert route_conditions(snap, "HTTPRoute", INFRA, "reference-grant")["ResolvedRefs"] == ("True", "ResolvedRefs")
    snap = served(CROSS)                 # grant deleted
    assert outcome(snap, *SAME, Req("/")) == ERROR


@pytest.mark.parametrize("broken", [
    (f"namespace: {WEB}", f"namespace: {INFRA}"),                         # grant in the wrong namespace
    ("group: gateway.networking.k8s.io, kind: HTTPRoute", "group: not-the-group, kind: HTTPRoute"),
    ("kind: HTTPRoute, namespace", "kind: Gateway, namespace"),
    (f"namespace: {INFRA}}}]", "namespace: not-the-namespace}]"),
    ('group: "", kind: Service', "group: not-the-group, kind: Service"),
    ("kind: Service, name: web-backend", "kind: Secret, name: web-backend"),
    ("name: web-backend}]", "name: not-the-service}]"),
])
def test_reference_grants_that_do_not_cover_the_reference(broken):
    snap = served(GRANT.replace(*broken), CROSS)
    assert outcome(snap, *SAME, Req("/")) == ERROR
    assert route_conditions(snap, "HTTPRoute", INFRA, "reference-grant")["ResolvedRefs"] == ("False", "RefNotPermitted")


def test_grant_without_name_covers_every_service_of_the_kind():
    snap = served(GRANT.replace(", name: web-backend", ""), CROSS)
    assert outcome(snap, *SAME, Req("/")) == ("backend", f"{WEB}/web-backend")


def test_partially_invalid_reference_grant():
    grant = f"""---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: invalid-reference-grant, namespace: {APP}}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {INFRA}}}]
  to: [{{group: "", kind: Service, name: app-backend-v1}}]
"""
    r = route("invalid-reference-grant", f"""  rules:
  - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
    backendRefs: [{{name: app-backend-v2, namespace: {APP}, port: 8080}}]
  - backendRefs: [{{name: app-backend-v1, namespace: {APP}, port: 8080}}]
""")
    snap = served(grant, r)
    assert outcome(snap, *SAME, Req("/v2")) == ERROR
    assert outcome(snap, *SAME, Req("/")) == ("backend", f"{APP}/app-backend-v1")
    assert route_conditions(snap, "HTTPRoute", INFRA, "invalid-reference-grant")["ResolvedRefs"] == \
        ("False", "RefNotPermitted")


def test_cross_namespace_route_on_a_selector_gateway():
    r = route("cross-namespace", "  rules:\n  - backendRefs: [{name: web-backend, port: 8080}]\n", ns=WEB,
              parent="backend-namespaces", parent_ns=INFRA)
    snap = served(r)
    assert outcome(snap, *SEL, Req("/")) == ("backend", f"{WEB}/web-backend")
    assert route_conditions(snap, "HTTPRoute", WEB, "cross-namespace")["Accepted"] == ("True", "Accepted")


def test_cross_namespace_parent_not_allowed():
    r = route("invalid-cross-namespace-parent-ref", "  rules:\n  - backendRefs: [{name: web-backend, port: 8080}]\n",
              ns=WEB, parent="same-namespace", parent_ns=INFRA)
    snap = served(r)
    assert outcome(snap, *SAME, Req("/")) == NOT_FOUND
    conds = route_conditions(snap, "HTTPRoute", WEB, "invalid-cross-namespace-parent-ref")
    assert conds["Accepted"] == ("False", "NotAllowedByListeners")
    assert conds["ResolvedRefs"] == ("True", "ResolvedRefs")


# -- rules that cannot be served, extension filters ------------------------------------------------

FAULT = f"""---
apiVersion: meshproxy.dev/v1alpha1
kind: FaultInjection
metadata: {{name: slow-and-flaky, namespace: {INFRA}}}
spec:
  delay: {{fixedDelay: 250ms, percentage: 50}}
  abort: {{httpStatus: 503, percentage: 10}}
"""


def test_fault_injection_extension_ref():
    r = route("faulty", """  rules:
  - matches: [{path: {type: PathPrefix, value: /fault}}]
    filters: [{type: ExtensionRef, extensionRef: {group: meshproxy.dev, kind: FaultInjection, name: slow-and-flaky}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    filters: [{type: ExtensionRef, extensionRef: {group: meshproxy.dev, kind: FaultInjection, name: nope}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /other}}]
    filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Auth, name: x}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
""")
    snap = served(FAULT, r)
    f = snap.http_listeners[SAME].routes.match("h", "/fault", Req("/fault")).action.fault
    assert (f.delay, f.delay_percent, f.abort_status, f.abort_percent) == (0.25, 50.0, 503, 10.0)
    assert outcome(snap, *SAME, Req("/missing")) == ERROR          # not skipped: answered with an error
    assert outcome(snap, *SAME, Req("/other")) == ERROR
    assert route_conditions(snap, "HTTPRoute", INFRA, "faulty")["ResolvedRefs"][0] == "False"


def test_unsupported_filters_drop_their_rule_and_the_route_says_so():
    r = route("partly", """  rules:
  - matches: [{path: {type: PathPrefix, value: /cors}}]
    filters: [{type: CORS, cors: {allowOrigins: ["*"]}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /bad-regex}, headers: [{type: RegularExpression, name: x, value: "("}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - backendRefs: [{name: infra-backend-v2, port: 8080}]
""")
    snap = served(r)
    assert outcome(snap, *SAME, Req("/cors")) == V2             # dropped: the catch-all rule answers
    assert outcome(snap, *SAME, Req("/bad-regex", headers={"x": "("})) == V2
    conds = route_conditions(snap, "HTTPRoute", INFRA, "partly")
    assert conds["Accepted"] == ("True", "Accepted")
    assert conds["PartiallyInvalid"] == ("True", "UnsupportedValue")
    only = route("only-cors", """  rules:
  - filters: [{type: CORS, cors: {allowOrigins: ["*"]}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
""")
    snap = served(only)
    assert route_conditions(snap, "HTTPRoute", INFRA, "only-cors")["Accepted"] == ("False", "UnsupportedValue")
    assert outcome(snap, *SAME, Req("/")) == NOT_FOUND


# -- GRPCRoute (compiled now; served once HTTP/2 is) ------------------------------------------------

def test_grpc_route_matches_compile_to_paths():
    r = route("grpc", """  rules:
  - matches: [{method: {service: grpc.testing.TestService, method: UnaryCall}}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
  - matches: [{method: {service: grpc.testing.TestService}}]
    backendRefs: [{name: infra-backend-v2, port: 8080}]
  - matches: [{method: {method: Ping}}]
    backendRefs: [{name: infra-backend-v3, port: 8080}]
  - matches: [{method: {type: RegularExpression, service: "grpc\\\\.health\\\\..*"}, headers: [{name: x-v, value: "2"}]}]
    backendRefs: [{name: infra-backend-v1, port: 8080}]
""", kind="GRPCRoute")
    snap = served(r, http2=True)
    check(snap, [
        (Req("/grpc.testing.TestService/UnaryCall", method="POST"), V1),
        (Req("/grpc.testing.TestService/EmptyCall", method="POST"), V2),
        (Req("/grpc.testing.TestServiceX/EmptyCall", method="POST"), NOT_FOUND),
        (Req("/other.Svc/Ping", method="POST"), V3),
        (Req("/grpc.health.v1.Health/Check", method="POST", headers={"x-v": "2"}), V1),
        (Req("/grpc.health.v1.Health/Check", method="POST"), NOT_FOUND),
    ])


def test_http_and_grpc_routes_sharing_a_hostname_the_older_one_wins():
    http = route("http", "  hostnames: [api.example.com]\n  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
                 created="2024-01-01T00:00:00Z")
    grpc = route("grpc", "  rules:\n  - backendRefs: [{name: infra-backend-v2, port: 8080}]\n", kind="GRPCRoute",
                 created="2024-02-01T00:00:00Z")
    snap = served(http, grpc, http2=True)
    assert route_conditions(snap, "GRPCRoute", INFRA, "grpc")["Accepted"] == ("False", "NotAllowedByListeners")
    assert outcome(snap, *SAME, Req("/x.Y/Z", "api.example.com")) == V1


def test_grpc_routes_wait_for_http2():
    grpc = route("grpc", "  rules:\n  - backendRefs: [{name: infra-backend-v2, port: 8080}]\n", kind="GRPCRoute")
    snap = served(grpc, http2=False)
    assert route_conditions(snap, "GRPCRoute", INFRA, "grpc")["Accepted"] == ("False", "NotAllowedByListeners")
    assert outcome(snap, *SAME, Req("/x.Y/Z")) == NOT_FOUND
