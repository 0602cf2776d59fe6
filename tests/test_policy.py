"""Mesh policy with Istio's meanings: PeerAuthentication composition and AuthorizationPolicy
evaluation as tables, many rows taken from the examples in Istio's documentation (the policy
reference, the HTTP / TCP / deny tasks), plus the manifest checks Istio's validation makes."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from discovery.manifests import load_text
from meshproxy.core import metrics
from meshproxy.core.identity import SpiffeId
from meshproxy.core.policy import (DISABLE, PERMISSIVE, STRICT, HttpRequest, Peer, compile_workload_policy,
                                   match_string, normalize_path, record_decision)


def objects(text: str) -> list:
    r = load_text(textwrap.dedent(text), "p.yaml")
    assert not r.errors, [str(e) for e in r.errors]
    return r.objects


def errors(text: str) -> list[str]:
    return [str(e) for e in load_text(textwrap.dedent(text), "p.yaml").errors]


def peer(sa: str | None = None, ip: str = "10.0.0.9", td: str = "cluster.local") -> Peer:
    """sa: "ns/name" for an mTLS caller, None for plaintext."""
    if sa is None:
        return Peer.of(ip)
    ns, name = sa.split("/")
    return Peer.of(ip, SpiffeId.for_service_account(td, ns, name))


def GET(path="/", host="web", **headers):
    return HttpRequest("GET", path, host, {k.replace("_", "-"): v for k, v in headers.items()})


def POST(path="/", host="web"):
    return HttpRequest("POST", path, host)


def AP(name, ns, spec, annotations=None):
    meta = {"name": name, "namespace": ns}
    if annotations:
        meta["annotations"] = annotations

    return yaml.safe_dump({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                           "metadata": meta, "spec": spec}, sort_keys=False)


def PA(name, ns, spec, created=None):
    meta = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created

    return yaml.safe_dump({"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
                           "metadata": meta, "spec": spec}, sort_keys=False)


def policy(*docs: str, ns="foo", labels=None, root="istio-system"):
    return compile_workload_policy(objects("---\n".join(docs)), ns, labels or {"app": "httpbin"}, root)


# --------------------------------------------------------------------------------------------
# String matching and path normalization

@pytest.mark.parametrize("pattern,value,want", [
    ("abc", "abc", True), ("abc", "abcd", False),
    ("abc*", "abc", True), ("abc*", "abcd", True), ("abc*", "xabc", False),
    ("*abc", "abc", True), ("*abc", "xabc", True), ("*abc", "abcx", False),
    ("*", "x", True), ("*", "", False),
    # Istio's rule: only a leading or trailing '*' is special; one inside is a character.
    ("cluster.local/ns/team-*/sa/*", "cluster.local/ns/team-*/sa/x", True),
    ("cluster.local/ns/team-*/sa/*", "cluster.local/ns/team-a/sa/x", False),
])
def test_string_match(pattern, value, want):
    assert match_string(pattern, value) is want


@pytest.mark.parametrize("raw,want", [
    ("/", "/"), ("", "/"), ("/a/b", "/a/b"), ("/a/b?x=1", "/a/b"), ("/a#frag", "/a"),
    ("/public/./data/abc/../xyz", "/public/data/xyz"),        # Istio's normalization example
    ("/a/..", "/"), ("/..", "/"), ("/../../etc", "/etc"), ("/a/.", "/a/"), ("/a/./", "/a/"),
    ("/some\\data", "/some/data"),                             # backslash -> slash (BASE)
    ("/%61dmin", "/admin"), ("/a%2Fb", "/a%2Fb"), ("/a%2fb", "/a%2Fb"),   # only unreserved decoded
    ("/a//b", "/a//b"),                                       # BASE does not merge slashes
    ("/.well-known/x", "/.well-known/x"),
])
def test_normalize_path(raw, want):
    assert normalize_path(raw) == want


# --------------------------------------------------------------------------------------------
# PeerAuthentication: workload > namespace > mesh, UNSET inherits, oldest wins

MESH_STRICT = PA("default", "istio-system", {"mtls": {"mode": "STRICT"}})
FOO_PERMISSIVE = PA("default", "foo", {"mtls": {"mode": "PERMISSIVE"}})
FINANCE_STRICT = PA("finance", "foo", {"selector": {"matchLabels": {"app": "finance"}}, "mtls": {"mode": "STRICT"}})


@pytest.mark.parametrize("docs,ns,labels,port,want", [
    ((), "foo", {}, 80, PERMISSIVE),                                      # no policy: PERMISSIVE
    ((MESH_STRICT,), "foo", {}, 80, STRICT),
    ((MESH_STRICT,), "istio-system", {}, 80, STRICT),
    ((MESH_STRICT, FOO_PERMISSIVE), "foo", {}, 80, PERMISSIVE),           # namespace beats mesh
    ((MESH_STRICT, FOO_PERMISSIVE), "bar", {}, 80, STRICT),
    ((FOO_PERMISSIVE, FINANCE_STRICT), "foo", {"app": "finance"}, 80, STRICT),   # workload beats namespace
    ((FOO_PERMISSIVE, FINANCE_STRICT), "foo", {"app": "web"}, 80, PERMISSIVE),
    ((FINANCE_STRICT,), "bar", {"app": "finance"}, 80, PERMISSIVE),       # a selector works in its namespace only
    # Istio's example: STRICT for the workload, port 8080 left to plaintext.
    ((PA("f", "foo", {"selector": {"matchLabels": {"app": "finance"}}, "mtls": {"mode": "STRICT"},
                      "portLevelMtls": {8080: {"mode": "DISABLE"}}}),), "foo", {"app": "finance"}, 8080, DISABLE),
    ((PA("f", "foo", {"selector": {"matchLabels": {"app": "finance"}}, "mtls": {"mode": "STRICT"},
                      "portLevelMtls": {8080: {"mode": "DISABLE"}}}),), "foo", {"app": "finance"}, 80, STRICT),
    # UNSET inherits the namespace's mode; the port override still applies.
    ((PA("ns", "foo", {"mtls": {"mode": "STRICT"}}),
      PA("f", "foo", {"selector": {"matchLabels": {"app": "finance"}}, "mtls": {"mode": "UNSET"},
                      "portLevelMtls": {8080: {"mode": "DISABLE"}, 9090: {"mode": "UNSET"}}})),
     "foo", {"app": "finance"}, 80, STRICT),
    ((PA("ns", "foo", {"mtls": {"mode": "STRICT"}}),
      PA("f", "foo", {"selector": {"matchLabels": {"app": "finance"}}, "mtls": {"mode": "UNSET"},
                      "portLevelMtls": {8080: {"mode": "DISABLE"}, 9090: {"mode": "UNSET"}}})),
     "foo", {"app": "finance"}, 9090, STRICT),
    ((PA("m", "istio-system", {"mtls": {"mode": "DISABLE"}}), PA("ns", "foo", {}),
      PA("w", "foo", {"selector": {"matchLabels": {"app": "x"}}})), "foo", {"app": "x"}, 80, DISABLE),
    # Several at one level: the oldest wins.
    ((PA("b", "foo", {"mtls": {"mode": "STRICT"}}, "2024-01-02T00:00:00Z"),
      PA("a", "foo", {"mtls": {"mode": "DISABLE"}}, "2024-01-03T00:00:00Z")), "foo", {}, 80, STRICT),
    # A root-namespace policy with a selector is not mesh-wide (Istio ignores it).
    ((PA("sel", "istio-system", {"selector": {"matchLabels": {"app": "x"}}, "mtls": {"mode": "STRICT"}}),),
     "foo", {"app": "x"}, 80, PERMISSIVE),
])
def test_peer_authentication(docs, ns, labels, port, want):
    wp = compile_workload_policy(objects("---\n".join(docs)) if docs else [], ns, labels, "istio-system")
    assert wp.mtls_mode(port) == want


def test_root_namespace_is_configurable():
    docs = objects(PA("default", "mesh-root", {"mtls": {"mode": "STRICT"}}))
    assert compile_workload_policy(docs, "foo", {}, "mesh-root").mtls_mode(80) == STRICT
    assert compile_workload_policy(docs, "foo", {}, "istio-system").mtls_mode(80) == PERMISSIVE


# --------------------------------------------------------------------------------------------
# AuthorizationPolicy

SLEEP, TEST_NS, OTHER = "default/sleep", "test/anyone", "other/x"

HTTPBIN_ALLOW = AP("httpbin", "foo", {
    "action": "ALLOW",
    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}},
                        {"source": {"namespaces": ["test"]}}],
               "to": [{"operation": {"methods": ["GET"], "paths": ["/info*"]}},
                      {"operation": {"methods": ["POST"], "paths": ["/data"]}}]}]})


@pytest.mark.parametrize("caller,req,allowed", [
    (SLEEP, GET("/info"), True), (SLEEP, GET("/info/x?y=1"), True), (SLEEP, POST("/data"), True),
    (SLEEP, GET("/data"), False), (SLEEP, POST("/info"), False),
    (TEST_NS, GET("/info"), True), (TEST_NS, POST("/data"), True),
    (OTHER, GET("/info"), False), (None, GET("/info"), False),     # what no rule allows is denied
])
def test_reference_allow_example(caller, req, allowed):
    d = policy(HTTPBIN_ALLOW).authorize(peer(caller), 80, req)
    assert d.allowed is allowed
    assert d.policy == ("foo/httpbin" if allowed else "")
    assert d.reason == ("allow_policy" if allowed else "not_allowed")


def test_reference_example_with_jwt_condition_allows_nothing():
    # The reference's own example adds `when: request.auth.claims[iss]`: JWT is not evaluated by
    # meshproxy, so that ALLOW rule never matches and the workload is closed (never opened).
    doc = AP("httpbin", "foo", {"rules": [{
        "from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}],
        "to": [{"operation": {"methods": ["GET"], "paths": ["/info*"]}}],
        "when": [{"key": "request.auth.claims[iss]", "values": ["https://accounts.google.com"]}]}]})
    assert not policy(doc).authorize(peer(SLEEP), 80, GET("/info")).allowed


ALLOW_NOTHING = AP("allow-nothing", "foo", {})
ALLOW_ALL = AP("allow-all", "foo", {"rules": [{}]})
DENY_DEV_POST = AP("deny-dev-post", "foo", {"action": "DENY", "rules": [
    {"from": [{"source": {"namespaces": ["dev"]}}], "to": [{"operation": {"methods": ["POST"]}}]}]})
DENY_POST_8080 = AP("deny-post-8080", "foo", {"action": "DENY", "rules": [
    {"to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]}]})


@pytest.mark.parametrize("docs,ns,labels,caller,port,req,allowed,reason", [
    ((), "foo", None, None, 80, GET(), True, "no_policy"),
    ((ALLOW_NOTHING,), "foo", None, SLEEP, 80, GET(), False, "not_allowed"),   # spec: {} denies all
    ((ALLOW_NOTHING,), "foo", None, SLEEP, 80, None, False, "not_allowed"),
    ((ALLOW_NOTHING,), "bar", None, SLEEP, 80, GET(), True, "no_policy"),      # other namespaces untouched
    ((ALLOW_ALL,), "foo", None, None, 80, GET(), True, "allow_policy"),       # rules: [{}] allows all
    ((ALLOW_ALL, ALLOW_NOTHING), "foo", None, None, 80, GET(), True, "allow_policy"),
    ((ALLOW_ALL, DENY_DEV_POST), "foo", None, "dev/x", 80, POST(), False, "deny_policy"),   # DENY first
    ((DENY_DEV_POST,), "foo", None, "dev/x", 80, GET(), True, "no_policy"),
    ((DENY_DEV_POST,), "foo", None, "prod/x", 80, POST(), True, "no_policy"),
    # The reference's port example: POST on 8080 is denied; on TCP the method cannot be read,
    # and for a DENY rule that counts as a match: all TCP to 8080 is denied.
    ((DENY_POST_8080,), "foo", None, SLEEP, 8080, POST(), False, "deny_policy"),
    ((DENY_POST_8080,), "foo", None, SLEEP, 8080, GET(), True, "no_policy"),
    ((DENY_POST_8080,), "foo", None, SLEEP, 8080, None, False, "deny_policy"),
    ((DENY_POST_8080,), "foo", None, SLEEP, 9090, None, True, "no_policy"),
    # Selector: allow-nothing for app=httpbin in bar (the reference's example).
    ((AP("allow-nothing", "bar", {"selector": {"matchLabels": {"app": "httpbin"}}}),), "bar", {"app": "httpbin"},
     SLEEP, 80, GET(), False, "not_allowed"),
    ((AP("allow-nothing", "bar", {"selector": {"matchLabels": {"app": "httpbin"}}}),), "bar", {"app": "web"},
     SLEEP, 80, GET(), True, "no_policy"),
    # In the root namespace a selector reaches every namespace (version: v1 in the reference).
    ((AP("allow-nothing", "istio-system", {"selector": {"matchLabels": {"version": "v1"}}}),), "foo",
     {"version": "v1"}, SLEEP, 80, GET(), False, "not_allowed"),
    ((AP("allow-nothing", "istio-system", {"selector": {"matchLabels": {"version": "v1"}}}),), "foo",
     {"version": "v2"}, SLEEP, 80, GET(), True, "no_policy"),
    # AUDIT never decides; dry-run and targetRefs policies do not apply to a sidecar.
    ((AP("audit", "foo", {"action": "AUDIT", "rules": [{}]}),), "foo", None, None, 80, GET(), True, "no_policy"),
    ((AP("dry", "foo", {}, {"istio.io/dry-run": "true"}),), "foo", None, None, 80, GET(), True, "no_policy"),
    ((AP("gw", "foo", {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "g"}]}),),
     "foo", None, None, 80, GET(), True, "no_policy"),
    # CUSTOM: no external authorizer here, so a matching request is denied (fail closed).
    ((AP("ext", "foo", {"action": "CUSTOM", "provider": {"name": "opa"},
                        "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),),
     "foo", None, SLEEP, 80, GET("/admin/x"), False, "custom_unsupported"),
    ((AP("ext", "foo", {"action": "CUSTOM", "provider": {"name": "opa"},
                        "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),),
     "foo", None, SLEEP, 80, GET("/public"), True, "no_policy"),
])
def test_authorization_table(docs, ns, labels, caller, port, req, allowed, reason):
    wp = policy(*docs, ns=ns, labels=labels) if docs else compile_workload_policy([], ns, {}, "istio-system")
    d = wp.authorize(peer(caller), port, req)
    assert (d.allowed, d.reason) == (allowed, reason)


# The TCP task: ALLOW ports 9000 and 9001; then an HTTP-only field (methods) makes the ALLOW rule
# unusable on TCP (9000 denied too); as a DENY rule the method is ignored and 9000 is denied.
TCP_ALLOW = AP("tcp-policy", "foo", {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": ["9000", "9001"]}}]}]})
TCP_ALLOW_WITH_METHOD = AP("tcp-policy", "foo", {"action": "ALLOW", "rules": [
    {"to": [{"operation": {"methods": ["GET"], "ports": ["9000"]}}]}]})
# One HTTP-only operation spoils the whole ALLOW rule on TCP, even beside a TCP-only one.
TCP_ALLOW_MIXED = AP("tcp-policy", "foo", {"action": "ALLOW", "rules": [
    {"to": [{"operation": {"methods": ["GET"]}}, {"operation": {"ports": ["9001"]}}]}]})
TCP_DENY_WITH_METHOD = AP("tcp-policy", "foo", {"action": "DENY", "rules": [
    {"to": [{"operation": {"methods": ["GET"], "ports": ["9000"]}}]}]})


@pytest.mark.parametrize("doc,port,allowed", [
    (TCP_ALLOW, 9000, True), (TCP_ALLOW, 9001, True), (TCP_ALLOW, 9002, False),
    (TCP_ALLOW_WITH_METHOD, 9000, False), (TCP_ALLOW_WITH_METHOD, 9001, False),
    (TCP_DENY_WITH_METHOD, 9000, False), (TCP_DENY_WITH_METHOD, 9001, True),
    (TCP_ALLOW_MIXED, 9001, False),
])
def test_tcp_task(doc, port, allowed):
    assert policy(doc).authorize(peer(SLEEP), port, None).allowed is allowed


def test_http_only_allow_rule_still_works_for_http():
    wp = policy(TCP_ALLOW_WITH_METHOD)
    assert wp.authorize(peer(SLEEP), 9000, GET()).allowed
    assert not wp.authorize(peer(SLEEP), 9000, POST()).allowed
    assert wp.needs_request


# Source fields, from the reference: principal admin or dev, namespace prod or test, not 203.0.113.4.
SOURCE_EXAMPLE = AP("src", "foo", {"rules": [{"from": [{"source": {
    "principals": ["cluster.local/ns/prod/sa/admin", "cluster.local/ns/test/sa/dev"],
    "namespaces": ["prod", "test"], "notIpBlocks": ["203.0.113.4"]}}]}]})
# Operation fields: host *.example.com, GET or HEAD, path not /admin*.
OPERATION_EXAMPLE = AP("op", "foo", {"rules": [{"to": [{"operation": {
    "hosts": ["*.example.com"], "methods": ["GET", "HEAD"], "notPaths": ["/admin*"]}}]}]})


@pytest.mark.parametrize("doc,caller,ip,req,allowed", [
    (SOURCE_EXAMPLE, "prod/admin", "10.1.1.1", GET(), True),
    (SOURCE_EXAMPLE, "test/dev", "10.1.1.1", GET(), True),
    (SOURCE_EXAMPLE, "prod/admin", "203.0.113.4", GET(), False),
    (SOURCE_EXAMPLE, "prod/other", "10.1.1.1", GET(), False),
    (SOURCE_EXAMPLE, None, "10.1.1.1", GET(), False),
    (OPERATION_EXAMPLE, SLEEP, "10.1.1.1", GET("/x", host="api.example.com"), True),
    (OPERATION_EXAMPLE, SLEEP, "10.1.1.1", GET("/x", host="API.Example.COM"), True),   # hosts: case-insensitive
    (OPERATION_EXAMPLE, SLEEP, "10.1.1.1", HttpRequest("HEAD", "/x", "a.example.com"), True),
    (OPERATION_EXAMPLE, SLEEP, "10.1.1.1", POST("/x", host="a.example.com"), False),
    (OPERATION_EXAMPLE, SLEEP, "10.1.1.1", GET("/admin/x", host="a.example.com"), False),
    (OPERATION_EXAMPLE, SLEEP, "10.1.1.1", GET("/x", host="example.org"), False),
])
def test_source_and_operation_fields(doc, caller, ip, req, allowed):
    assert policy(doc).authorize(peer(caller, ip), 80, req).allowed is allowed


REQUIRE_MTLS = AP("require-mtls", "foo", {"rules": [{"from": [{"source": {"principals": ["*"]}}]}]})
DENY_PLAINTEXT = AP("deny-plaintext", "foo", {"action": "DENY", "rules": [
    {"from": [{"source": {"notPrincipals": ["*"]}}]}]})
NOT_NS = AP("not-ns", "foo", {"rules": [{"from": [{"source": {"notNamespaces": ["dev"]}}]}]})
IPS = AP("ips", "foo", {"rules": [{"from": [{"source": {"ipBlocks": ["10.1.0.0/16", "2001:db8::/32"]}}]}]})


@pytest.mark.parametrize("doc,caller,ip,allowed", [
    (REQUIRE_MTLS, SLEEP, "10.0.0.1", True), (REQUIRE_MTLS, None, "10.0.0.1", False),
    (DENY_PLAINTEXT, None, "10.0.0.1", False), (DENY_PLAINTEXT, SLEEP, "10.0.0.1", True),
    (NOT_NS, "dev/a", "10.0.0.1", False), (NOT_NS, "prod/a", "10.0.0.1", True),
    (NOT_NS, None, "10.0.0.1", True),     # no namespace at all is "not dev"
    (IPS, None, "10.1.2.3", True), (IPS, None, "10.2.0.1", False), (IPS, None, "2001:db8::5", True),
    (IPS, None, "::ffff:10.1.2.3", True),      # a v4 caller seen on a dual-stack socket
])
def test_presence_negation_and_ip_blocks(doc, caller, ip, allowed):
    assert policy(doc).authorize(peer(caller, ip), 80, None).allowed is allowed


def cond(key, values=None, not_values=None, action="ALLOW"):
    c = {"key": key}
    if values:
        c["values"] = values
    if not_values:
        c["notValues"] = not_values
    return AP("c", "foo", {"action": action, "rules": [{"when": [c]}]})


@pytest.mark.parametrize("doc,caller,port,req,allowed", [
    (cond("request.headers[version]", ["v1", "v2"]), SLEEP, 80, GET(version="v2"), True),
    (cond("request.headers[version]", ["v1", "v2"]), SLEEP, 80, GET(version="v3"), False),
    (cond("request.headers[Version]", ["v1"]), SLEEP, 80, GET(version="v1"), True),   # header names fold
    (cond("request.headers[version]", ["v1"]), SLEEP, 80, GET(), False),
    (cond("request.headers[version]", ["v1"]), SLEEP, 80, None, False),                # HTTP-only, ALLOW, TCP
    (cond("request.headers[version]", ["v1"], action="DENY"), SLEEP, 80, None, False),  # ... DENY, TCP: matches
    (cond("source.ip", ["10.0.0.0/8"]), SLEEP, 80, None, True),
    (cond("source.ip", not_values=["10.0.0.9"]), SLEEP, 80, None, False),
    (cond("source.namespace", ["default"]), SLEEP, 80, None, True),
    (cond("source.namespace", not_values=["default"]), SLEEP, 80, None, False),
    (cond("source.principal", ["cluster.local/ns/default/*"]), SLEEP, 80, None, True),
    (cond("destination.port", ["80", "443"]), SLEEP, 443, None, True),
    (cond("destination.port", ["80"]), SLEEP, 8080, None, False),
    # Unsupported attributes: an ALLOW rule with one never matches, a DENY rule always does.
    (cond("request.auth.principal", ["a/b"]), SLEEP, 80, GET(), False),
    (cond("request.auth.principal", ["a/b"], action="DENY"), SLEEP, 80, GET(), False),
    (cond("remote.ip", ["1.2.3.4"], action="DENY"), SLEEP, 80, None, False),
    (cond("connection.sni", ["x"]), SLEEP, 80, None, False),
])
def test_when_conditions(doc, caller, port, req, allowed):
    assert policy(doc).authorize(peer(caller), port, req).allowed is allowed


@pytest.mark.parametrize("spec,req,allowed", [
    # JWT principals are not evaluated: ALLOW can only allow less, DENY only deny more.
    ({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}, GET(), False),
    ({"action": "DENY", "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}]}, GET(), False),
    ({"action": "DENY", "rules": [{"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]}]}, GET(), False),
    # Path templates (Istio 1.22's {*} / {**}): likewise.
    ({"rules": [{"to": [{"operation": {"paths": ["/foo/{*}/bar"]}}]}]}, GET("/foo/x/bar"), False),
    ({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/foo/{**}"], "methods": ["POST"]}}]}]},
     GET("/elsewhere"), True),          # the method still counts
    ({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/foo/{**}"], "methods": ["POST"]}}]}]},
     POST("/elsewhere"), False),
])
def test_unsupported_fields_fail_closed(spec, req, allowed):
    assert policy(AP("u", "foo", spec)).authorize(peer(SLEEP), 80, req).allowed is allowed


@pytest.mark.parametrize("path", ["/admin", "/admin?x=1", "/./admin", "/x/../admin", "/%61dmin", "/admin#f"])
def test_deny_path_cannot_be_dodged_by_spelling(path):
    wp = policy(AP("d", "foo", {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}))
    assert not wp.authorize(peer(SLEEP), 80, GET(path)).allowed
    assert wp.authorize(peer(SLEEP), 80, GET("/admins")).allowed


def test_trust_domain_is_part_of_the_principal():
    wp = policy(AP("p", "foo", {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}]}]}))
    assert wp.authorize(peer(SLEEP), 80, None).allowed
    assert not wp.authorize(peer(SLEEP, td="other.domain"), 80, None).allowed


def test_allows_everything_and_needs_request_flags():
    assert compile_workload_policy([], "foo", {}, "istio-system").allows_everything
    assert not policy(ALLOW_ALL).allows_everything
    assert not policy(TCP_ALLOW).needs_request
    assert policy(HTTPBIN_ALLOW).needs_request


def test_decisions_are_counted_with_the_client_identity():
    wp = policy(HTTPBIN_ALLOW)
    d = wp.authorize(peer(SLEEP), 80, GET("/data"))
    before = metrics.REGISTRY.get_sample_value("meshproxy_mesh_authz_decisions_total", {
        "protocol": "http", "decision": "deny", "reason": "not_allowed", "policy": "",
        "client_id": "spiffe://cluster.local/ns/default/sa/sleep"}) or 0
    record_decision(d, "http", peer(SLEEP))
    after = metrics.REGISTRY.get_sample_value("meshproxy_mesh_authz_decisions_total", {
        "protocol": "http", "decision": "deny", "reason": "not_allowed", "policy": "",
        "client_id": "spiffe://cluster.local/ns/default/sa/sleep"})
    assert after == before + 1
    record_decision(wp.authorize(peer(None), 80, GET("/info")), "http", peer(None))
    assert metrics.REGISTRY.get_sample_value("meshproxy_mesh_authz_decisions_total", {
        "protocol": "http", "decision": "deny", "reason": "not_allowed", "policy": "", "client_id": ""}) >= 1


def test_to_json_names_the_policies():
    wp = policy(HTTPBIN_ALLOW, DENY_DEV_POST, MESH_STRICT)
    assert wp.to_json() == {"mtls": {"mode": "STRICT", "ports": {}, "from": "istio-system/default"},
                            "custom": [], "deny": ["foo/deny-dev-post"], "allow": ["foo/httpbin"], "defaultDeny": True}


# --------------------------------------------------------------------------------------------
# Manifests: shapes and Istio's validation

def test_parsed_shapes_and_defaults():
    [ap, pa] = objects(HTTPBIN_ALLOW + "---\n" + PA("f", "foo", {"selector": {"matchLabels": {"app": "f"}},
                                                                  "portLevelMtls": {8080: {"mode": "DISABLE"}}}))
    assert ap.kind == "AuthorizationPolicy" and ap.action == "ALLOW" and ap.selector is None
    assert ap.rules[0].sources[1].namespaces == ("test",)
    assert ap.rules[0].operations[0].paths == ("/info*",)
    assert pa.mode == "UNSET" and pa.port_modes == ((8080, "DISABLE"),) and dict(pa.selector) == {"app": "f"}


@pytest.mark.parametrize("spec,message", [
    ({"action": "PERMIT"}, "spec.action: unsupported value 'PERMIT'"),
    ({"rules": [{"from": [{}]}]}, "spec.rules[0].from[0].source: required"),
    ({"rules": [{"from": [{"source": {}}]}]}, "spec.rules[0].from[0].source: must not be empty"),
    ({"rules": [{"to": [{"operation": {}}]}]}, "spec.rules[0].to[0].operation: must not be empty"),
    ({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}, "ports[0]: 'http' is not a port number"),
    ({"rules": [{"to": [{"operation": {"ports": ["70000"]}}]}]}, "ports[0]: '70000' is not a port number"),
    ({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300"]}}]}]}, "ipBlocks[0]: '10.0.0.300' is not an IP"),
    ({"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}, "source.principal: unknown field"),
    ({"rules": [{"when": [{"key": "source.ip"}]}]}, "when[0]: needs values or notValues"),
    ({"rules": [{"when": [{"key": "request.ip", "values": ["x"]}]}]}, "unknown attribute 'request.ip'"),
    ({"rules": [{"when": [{"key": "destination.port", "values": ["x"]}]}]}, "values[0]: 'x' is not a port number"),
    ({"action": "CUSTOM"}, "spec.provider: required when action is CUSTOM"),
    ({"action": "DENY", "provider": {"name": "x"}}, "spec.provider: only allowed with action CUSTOM"),
    ({"selector": {"matchLabels": {"a": "b"}}, "targetRef": {"kind": "Gateway", "name": "g"}},
     "spec.selector: may not be set together with targetRef"),
])
def test_authorization_policy_validation(spec, message):
    errs = errors(AP("bad", "foo", spec))
    assert any(message in e for e in errs), errs
    assert all(e.startswith("p.yaml:") and "AuthorizationPolicy/foo/bad" in e for e in errs)


@pytest.mark.parametrize("spec,message", [
    ({"mtls": {"mode": "ON"}}, "spec.mtls.mode: unsupported value 'ON'"),
    ({"portLevelMtls": {8080: {"mode": "DISABLE"}}}, "spec.portLevelMtls: requires spec.selector"),
    ({"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"http": {"mode": "DISABLE"}}},
     "spec.portLevelMtls.http: 'http' is not a port number"),
])
def test_peer_authentication_validation(spec, message):
    errs = errors(PA("bad", "foo", spec))
    assert any(message in e for e in errs), errs


def test_both_api_versions_are_read():
    for v in ("v1", "v1beta1"):
        [obj] = objects(f"apiVersion: security.istio.io/{v}\nkind: AuthorizationPolicy\n"
                        "metadata: {name: a, namespace: foo}\nspec: {}\n")
        assert obj.kind == "AuthorizationPolicy" and obj.rules == ()


def test_pod_service_account_is_read():
    [pod] = objects("apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {meshproxy.dev/inject: enabled}}\n"
                    "spec: {serviceAccountName: web, containers: [{name: c}]}\n")
    assert pod.service_account == "web" and pod.meta.annotations["meshproxy.dev/inject"] == "enabled"
    [pod] = objects("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n")
    assert pod.service_account == "default"
