"""Gateway API status as tables: GatewayClass, Gateway and listener conditions, route parents,
attachedRoutes, supportedKinds, status.addresses, certificates, conflicts, addresses, the mesh
(GAMMA) attachments and the listeners they produce - what meshproxy writes back to the API and
prints with ``meshproxy get``, computed from manifests (meshproxy.core.gateway_status)."""

from __future__ import annotations

import pytest

from gateway_fixtures import (INFRA, WEB, base_yaml, gateway_conditions, listener_status, route_conditions, snapshot,
                              status_of)

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def cert():
    ca = trustme.CA()
    leaf = ca.issue_cert("*.example.com", "example.com")
    return leaf.cert_chain_pems[0].bytes().decode(), leaf.private_key_pem.bytes().decode()


def secret(name: str, ns: str, cert_key: tuple[str, str]) -> str:
    crt, key = cert_key
    ind = lambda s: "\n".join("    " + line for line in s.strip().splitlines())  # noqa: E731
    return f"""---
apiVersion: v1
kind: Secret
metadata: {{name: {name}, namespace: {ns}}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{ind(crt)}
  tls.key: |
{ind(key)}
"""


def gateway(name: str, listeners: str, addresses: str = "[{value: 127.0.50.1}]", ns: str = INFRA,
            cls: str = "meshproxy", extra: str = "") -> str:
    return f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {ns}, generation: 3}}
spec:
  gatewayClassName: {cls}
  addresses: {addresses}
{extra}  listeners:
{listeners}"""


def httproute(name: str, parent: str, ns: str = INFRA, hostnames: str = "", extra_parent: str = "") -> str:
    return f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}}}
spec:
  parentRefs: [{{name: {parent}, namespace: {INFRA}{extra_parent}}}]
{hostnames}  rules:
  - backendRefs: [{{name: infra-backend-v1, namespace: {INFRA}, port: 8080}}]
"""


def served(*docs: str, **kw):
    return snapshot(base_yaml() + "".join(docs), **kw)


# -- GatewayClass ----------------------------------------------------------------------------------

def test_gateway_class_accepted_only_when_ours():
    other = """---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: other}
spec: {controllerName: example.com/other}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: with-params}
spec:
  controllerName: meshproxy.dev/gateway-controller
  parametersRef: {group: example.com, kind: Config, name: x}
"""
    snap = served(other, gateway("foreign", "  - {name: http, port: 80, protocol: HTTP}\n", cls="other"))
    st = status_of(snap, "GatewayClass", "", "meshproxy")["conditions"][0]
    assert (st["type"], st["status"], st["reason"]) == ("Accepted", "True", "Accepted")
    assert status_of(snap, "GatewayClass", "", "other") is None
    assert status_of(snap, "Gateway", INFRA, "foreign") is None           # not ours: no status, not served
    assert ("127.0.50.1", 80) not in snap.http_listeners
    bad = status_of(snap, "GatewayClass", "", "with-params")["conditions"][0]
    assert (bad["status"], bad["reason"]) == ("False", "InvalidParameters")


# -- Gateway and listeners -------------------------------------------------------------------------

def test_accepted_programmed_addresses_and_observed_generation():
    snap = served(gateway("gw", "  - {name: http, port: 80, protocol: HTTP}\n"))
    st = status_of(snap, "Gateway", INFRA, "gw")
    assert st["addresses"] == [{"type": "IPAddress", "value": "127.0.50.1"}]
    assert {c["type"]: (c["status"], c["reason"], c["observedGeneration"]) for c in st["conditions"]} == {
        "Accepted": ("True", "Accepted", 3), "Programmed": ("True", "Programmed", 3)}
    ls = listener_status(snap, INFRA, "gw", "http")
    assert ls == {"attached": 0, "kinds": ["HTTPRoute", "GRPCRoute"], "Accepted": ("True", "Accepted"),
                  "Programmed": ("True", "Programmed"), "ResolvedRefs": ("True", "ResolvedRefs"),
                  "Conflicted": ("False", "NoConflicts")}


def test_grpc_route_kinds_with_and_without_http2():
    gw = gateway("gw", "  - {name: http, port: 80, protocol: HTTP}\n"
                       "  - {name: g, port: 81, protocol: HTTP, allowedRoutes: {kinds: [{kind: GRPCRoute}]}}\n")
    assert listener_status(served(gw), INFRA, "gw", "http")["kinds"] == ["HTTPRoute", "GRPCRoute"]
    snap = served(gw, http2=False)
    assert listener_status(snap, INFRA, "gw", "http")["kinds"] == ["HTTPRoute"]
    assert listener_status(snap, INFRA, "gw", "g")["ResolvedRefs"] == ("False", "InvalidRouteKinds")


def test_gateway_without_addresses_binds_the_gateway_addresses():
    snap = served(gateway("gw", "  - {name: http, port: 18001, protocol: HTTP}\n", addresses="[]"),
                  gateway_addresses=("127.0.50.7", "127.0.50.8"))
    assert {("127.0.50.7", 18001), ("127.0.50.8", 18001)} <= set(snap.http_listeners)
    assert [a["value"] for a in status_of(snap, "Gateway", INFRA, "gw")["addresses"]] == ["127.0.50.7", "127.0.50.8"]
    snap = served(gateway("gw", "  - {name: http, port: 18001, protocol: HTTP}\n", addresses="[{type: IPAddress}]"),
                  gateway_addresses=("127.0.50.9",))
    assert ("127.0.50.9", 18001) in snap.http_listeners


def test_wildcard_gateway_address_is_published_as_the_node_address():
    snap = served(gateway("gw", "  - {name: http, port: 18002, protocol: HTTP}\n", addresses="[]"))
    assert ("0.0.0.0", 18002) in snap.http_listeners
    assert status_of(snap, "Gateway", INFRA, "gw")["addresses"] == [{"type": "IPAddress", "value": "127.0.0.1"}]


def test_unsupported_and_unusable_addresses():
    snap = served(gateway("gw", "  - {name: http, port: 80, protocol: HTTP}\n",
                          addresses="[{type: test/fake-invalid-type, value: 'fake address'}, {value: 127.0.50.1}]"))
    assert gateway_conditions(snap, INFRA, "gw")["Accepted"] == ("False", "UnsupportedAddress")
    assert ("127.0.50.1", 80) not in snap.http_listeners
    snap = served(gateway("gw", "  - {name: http, port: 80, protocol: HTTP}\n",
                          addresses="[{value: 192.0.2.77}, {value: 127.0.50.1}]"))
    conds = gateway_conditions(snap, INFRA, "gw")
    assert conds["Accepted"] == ("True", "Accepted")
    assert conds["Programmed"] == ("False", "AddressNotUsable")
    assert [a["value"] for a in status_of(snap, "Gateway", INFRA, "gw")["addresses"]] == ["127.0.50.1"]
    assert ("127.0.50.1", 80) in snap.http_listeners and ("192.0.2.77", 80) not in snap.http_listeners


def test_unsupported_protocol_and_tls_termination_of_tls_routes():
    snap = served(gateway("gw", "  - {name: udp, port: 53, protocol: UDP}\n"
                                "  - {name: http, port: 80, protocol: HTTP}\n"
                                "  - {name: tls, port: 8443, protocol: TLS, hostname: t.example.com, "
                                "tls: {mode: Terminate, certificateRefs: [{name: x}]}}\n"))
    assert listener_status(snap, INFRA, "gw", "udp")["Accepted"] == ("False", "UnsupportedProtocol")
    assert listener_status(snap, INFRA, "gw", "tls")["Accepted"] == ("False", "UnsupportedValue")
    assert gateway_conditions(snap, INFRA, "gw")["Accepted"] == ("True", "ListenersNotValid")
    assert listener_status(snap, INFRA, "gw", "http")["Programmed"] == ("True", "Programmed")


def test_invalid_route_kinds():
    snap = served(gateway("only-invalid", "  - {name: http, port: 80, protocol: HTTP, "
                                          "allowedRoutes: {namespaces: {from: All}, kinds: [{kind: InvalidRoute}]}}\n"),
                  gateway("mixed", "  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}, "
                                   "kinds: [{kind: InvalidRoute}, {kind: HTTPRoute}]}}\n",
                          addresses="[{value: 127.0.50.2}]"))
    a = listener_status(snap, INFRA, "only-invalid", "http")
    assert (a["kinds"], a["ResolvedRefs"]) == ([], ("False", "InvalidRouteKinds"))
    b = listener_status(snap, INFRA, "mixed", "http")
    assert (b["kinds"], b["ResolvedRefs"]) == (["HTTPRoute"], ("False", "InvalidRouteKinds"))


HTTPS = "  - {{name: https, port: 443, protocol: HTTPS, tls: {{certificateRefs: [{ref}]}}}}\n"


@pytest.mark.parametrize("ref, reason", [
    ("{name: nonexistent-certificate}", "InvalidCertificateRef"),
    ("{group: wrong.group.company.io, kind: Secret, name: good}", "InvalidCertificateRef"),
    ("{group: '', kind: WrongKind, name: good}", "InvalidCertificateRef"),
    ("{name: malformed}", "InvalidCertificateRef"),
    (f"{{name: good, namespace: {WEB}}}", "RefNotPermitted"),
])
def test_invalid_certificate_refs(cert, ref, reason):
    malformed = """---
apiVersion: v1
kind: Secret
metadata: {name: malformed, namespace: gateway-conformance-infra}
type: kubernetes.io/tls
data: {tls.crt: SGVsbG8gd29ybGQK, tls.key: SGVsbG8gd29ybGQK}
"""
    snap = served(secret("good", INFRA, cert), secret("good", WEB, cert), malformed,
                  gateway("gw", HTTPS.format(ref=ref)), httproute("r", "gw"))
    ls = listener_status(snap, INFRA, "gw", "https")
    assert ls["ResolvedRefs"] == ("False", reason)
    assert ls["Programmed"][0] == "False"
    assert ls["attached"] == 1                      # attachment counts even on an unresolved listener
    assert ("127.0.50.1", 443) not in snap.http_listeners


def test_certificate_in_another_namespace_with_a_reference_grant(cert):
    grant = f"""---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: certs, namespace: {WEB}}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: Gateway, namespace: {INFRA}}}]
  to: [{{group: "", kind: Secret}}]
"""
    snap = served(secret("good", WEB, cert), grant, gateway("gw", HTTPS.format(ref=f"{{name: good, namespace: {WEB}}}")))
    assert listener_status(snap, INFRA, "gw", "https")["ResolvedRefs"] == ("True", "ResolvedRefs")
    lst = snap.http_listeners[("127.0.50.1", 443)]
    assert lst.tls and dict(lst.tls_hosts) == {"": (WEB, "good")}
    assert (WEB, "good") in snap.secrets


def test_https_listeners_sharing_a_port_get_their_certificates_by_hostname(cert):
    listeners = ("  - {name: a, port: 443, protocol: HTTPS, hostname: a.example.com, tls: {certificateRefs: [{name: c1}]}}\n"
                 "  - {name: w, port: 443, protocol: HTTPS, hostname: '*.example.com', tls: {certificateRefs: [{name: c2}]}}\n"
                 "  - {name: d, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: c1}]}}\n")
    snap = served(secret("c1", INFRA, cert), secret("c2", INFRA, cert), gateway("gw", listeners))
    lst = snap.http_listeners[("127.0.50.1", 443)]
    assert dict(lst.tls_hosts) == {"a.example.com": (INFRA, "c1"), "*.example.com": (INFRA, "c2"), "": (INFRA, "c1")}
    assert lst.routes.listener_of("a.example.com") == f"{INFRA}/gw/a"
    assert lst.routes.listener_of("b.c.example.com") == f"{INFRA}/gw/w"
    assert lst.routes.listener_of("other.org:443") == f"{INFRA}/gw/d"


def test_protocol_and_hostname_conflicts():
    snap = served(gateway("gw", "  - {name: h, port: 80, protocol: HTTP}\n"
                                "  - {name: t, port: 80, protocol: TCP}\n"
                                "  - {name: ok, port: 81, protocol: HTTP}\n"))
    for name in ("h", "t"):
        ls = listener_status(snap, INFRA, "gw", name)
        assert ls["Conflicted"] == ("True", "ProtocolConflict")
        assert ls["Accepted"] == ("False", "ProtocolConflict") and ls["Programmed"] == ("False", "ProtocolConflict")
    assert listener_status(snap, INFRA, "gw", "ok")["Conflicted"] == ("False", "NoConflicts")
    assert ("127.0.50.1", 80) not in snap.http_listeners and ("127.0.50.1", 81) in snap.http_listeners


def test_gateways_sharing_an_address_merge_or_conflict():
    older = gateway("older", "  - {name: a, port: 80, protocol: HTTP, hostname: a.example.com}\n").replace(
        "generation: 3", "generation: 3, creationTimestamp: '2024-01-01T00:00:00Z'")
    merged = gateway("merged", "  - {name: b, port: 80, protocol: HTTP, hostname: b.example.com}\n").replace(
        "generation: 3", "generation: 3, creationTimestamp: '2024-02-01T00:00:00Z'")
    clash = gateway("clash", "  - {name: a2, port: 80, protocol: HTTP, hostname: a.example.com}\n"
                             "  - {name: t, port: 81, protocol: HTTP}\n").replace(
        "generation: 3", "generation: 3, creationTimestamp: '2024-03-01T00:00:00Z'")
    snap = served(older, merged, clash, httproute("ra", "older"), httproute("rb", "merged"))
    lst = snap.http_listeners[("127.0.50.1", 80)]
    assert lst.name == f"Gateway {INFRA}/older, Gateway {INFRA}/merged"
    assert lst.routes.listener_of("b.example.com") == f"{INFRA}/merged/b"
    assert listener_status(snap, INFRA, "clash", "a2")["Conflicted"] == ("True", "HostnameConflict")
    assert listener_status(snap, INFRA, "older", "a")["Conflicted"] == ("False", "NoConflicts")
    assert listener_status(snap, INFRA, "clash", "t")["Programmed"] == ("True", "Programmed")


def test_port_taken_by_a_service_is_unavailable():
    svc = """---
apiVersion: v1
kind: Service
metadata: {name: taken, namespace: default}
spec: {clusterIP: 127.0.50.1, ports: [{port: 80}], selector: {app: x}}
"""
    snap = served(svc, gateway("gw", "  - {name: http, port: 80, protocol: HTTP}\n"), service_cidr="127.0.0.0/8")
    assert listener_status(snap, INFRA, "gw", "http")["Accepted"] == ("False", "PortUnavailable")


# -- routes ------------------------------------------------------------------------------------------

def test_attached_routes_counts_only_accepted_ones():
    gw = gateway("two", "  - {name: http, port: 80, protocol: HTTP, hostname: foo.example.com}\n")
    snap = served(gw, httproute("r2", "two"), httproute("r3", "two"),
                  httproute("not-accepted", "two", hostnames="  hostnames: [not-accepted.test.com]\n"))
    assert listener_status(snap, INFRA, "two", "http")["attached"] == 2
    assert route_conditions(snap, "HTTPRoute", INFRA, "not-accepted")["Accepted"] == \
        ("False", "NoMatchingListenerHostname")


@pytest.mark.parametrize("extra, reason", [
    (", port: 81", "NoMatchingParent"),
    (", sectionName: nope", "NoMatchingParent"),
    (", sectionName: http, port: 81", "NoMatchingParent"),
    (", sectionName: http, port: 80", "Accepted"),
])
def test_parent_ref_section_name_and_port(extra, reason):
    snap = served(gateway("gw", "  - {name: http, port: 80, protocol: HTTP}\n"), httproute("r", "gw", extra_parent=extra))
    assert route_conditions(snap, "HTTPRoute", INFRA, "r")["Accepted"][1] == reason
    assert listener_status(snap, INFRA, "gw", "http")["attached"] == (1 if reason == "Accepted" else 0)


def test_disallowed_kind_and_namespace():
    gw = gateway("tls-only", "  - {name: tls, port: 443, protocol: TLS, tls: {mode: Passthrough}, "
                             "allowedRoutes: {kinds: [{kind: TLSRoute}]}}\n")
    snap = served(gw, httproute("disallowed-kind", "tls-only"))
    conds = route_conditions(snap, "HTTPRoute", INFRA, "disallowed-kind")
    assert conds == {"Accepted": ("False", "NotAllowedByListeners"), "ResolvedRefs": ("True", "ResolvedRefs")}


def test_selector_namespaces_use_the_automatic_name_label():
    gw = gateway("sel", "  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector, "
                        "selector: {matchLabels: {kubernetes.io/metadata.name: gateway-conformance-infra}}}}}\n")
    snap = served(gw, httproute("here", "sel"), httproute("there", "sel", ns=WEB))
    assert route_conditions(snap, "HTTPRoute", INFRA, "here")["Accepted"] == ("True", "Accepted")
    assert route_conditions(snap, "HTTPRoute", WEB, "there")["Accepted"] == ("False", "NotAllowedByListeners")


def test_routes_to_other_controllers_gateways_get_no_status_from_us():
    snap = served(httproute("elsewhere", "nonexistent-gateway"))
    assert status_of(snap, "HTTPRoute", INFRA, "elsewhere") is None


def test_problems_name_the_object_and_field():
    snap = served(gateway("gw", "  - {name: udp, port: 53, protocol: UDP}\n  - {name: http, port: 80, protocol: HTTP}\n"),
                  httproute("r", "gw", extra_parent=", sectionName: nope"))
    assert f"Gateway/{INFRA}/gw: spec.listeners[0]: listener udp: protocol UDP is not supported " \
           "(HTTP, HTTPS, TLS, TCP) (UnsupportedProtocol)" in snap.problems
    assert any(p.startswith(f"HTTPRoute/{INFRA}/r: spec.parentRefs[0]: not accepted by Gateway") for p in snap.problems)


# -- mesh (GAMMA) ------------------------------------------------------------------------------------

MESH = """---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: mesh}
spec:
  clusterIP: 127.96.5.1
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: mesh}
spec:
  clusterIP: 127.96.5.2
  selector: {app: echo-v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: typed, namespace: mesh}
spec:
  clusterIP: 127.96.5.3
  selector: {app: typed}
  ports: [{name: web, port: 80, appProtocol: http}, {name: raw, port: 81}]
"""
SPLIT = """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "true"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo, port: 80, weight: 90}, {name: echo-v2, port: 80, weight: 10}]
"""


def test_mesh_route_governs_the_service_port_at_l7():
    snap = snapshot(MESH + SPLIT)
    lst = snap.http_listeners[("127.96.5.1", 80)]
    assert lst.name == "Service mesh/echo:http"
    assert ("127.96.5.1", 80) not in snap.l4                    # served per request, not per connection
    assert ("127.96.5.1", 9000) in snap.l4                      # the port the route does not name stays L4
    assert ("127.96.5.2", 80) in snap.l4
    assert route_conditions(snap, "HTTPRoute", "mesh", "canary")["Accepted"] == ("True", "Accepted")


def test_mesh_h2c_and_grpc_ports_wait_for_http2():
    svc = MESH + """---
apiVersion: v1
kind: Service
metadata: {name: rpc, namespace: mesh}
spec:
  clusterIP: 127.96.5.4
  selector: {app: rpc}
  ports: [{name: grpc, port: 50051, appProtocol: grpc}, {name: h2c, port: 8081, appProtocol: kubernetes.io/h2c}]
"""
    snap = snapshot(svc, http2=False)
    assert {("127.96.5.4", 50051), ("127.96.5.4", 8081)} <= set(snap.l4)
    snap = snapshot(svc)
    assert {("127.96.5.4", 50051), ("127.96.5.4", 8081)} <= set(snap.http_listeners)


def test_mesh_app_protocol_ports_are_l7_without_routes():
    snap = snapshot(MESH)
    assert ("127.96.5.3", 80) in snap.http_listeners and ("127.96.5.3", 80) not in snap.l4
    assert ("127.96.5.3", 81) in snap.l4
    r = snap.http_listeners[("127.96.5.3", 80)].routes.match("anything", "/x")
    assert r.action.backends[0].key == ("mesh", "typed", "web")


@pytest.mark.parametrize("parent, reason", [
    ('{group: "", kind: Service, name: missing}', "NoMatchingParent"),
    ('{group: "", kind: Service, name: echo, port: 81}', "NoMatchingParent"),
    ('{group: "", kind: Service, name: echo, namespace: other}', "UnsupportedValue"),
])
def test_mesh_parent_problems(parent, reason):
    r = SPLIT.replace('[{group: "", kind: Service, name: echo, port: 80}]', f"[{parent}]")
    snap = snapshot(MESH + r)
    assert route_conditions(snap, "HTTPRoute", "mesh", "canary")["Accepted"] == ("False", reason)
    assert ("127.96.5.1", 80) in snap.l4


def test_mesh_canary_by_header_and_90_10_split():
    from gateway_fixtures import Req, distribution, outcome
    snap = snapshot(MESH + SPLIT)
    assert outcome(snap, "127.96.5.1", 80, Req("/", "echo", headers={"x-canary": "true"})) == ("backend", "mesh/echo-v2")
    assert distribution(snap, "127.96.5.1", 80, Req("/", "whatever.host")) == {"mesh/echo": 900, "mesh/echo-v2": 100}


# -- merging our status into what the API holds (the status writer) ------------------------------

from discovery.sources.gateway_status import CONTROLLER, merge_status  # noqa: E402


def _c(t, s, reason="R", gen=1, ltt=None):
    c = {"type": t, "status": s, "reason": reason, "message": "", "observedGeneration": gen}
    if ltt:
        c["lastTransitionTime"] = ltt
    return c


def test_merge_keeps_foreign_conditions_and_transition_times():
    current = {"conditions": [_c("Accepted", "True", ltt="T0"), _c("vendor.io/Extra", "True", ltt="T0")]}
    ours = {"conditions": [_c("Accepted", "True", "Accepted", gen=2), _c("Programmed", "False", "Invalid", gen=2)]}
    out = merge_status("GatewayClass", "", current, ours, "T1")
    assert out["conditions"] == [{**_c("Accepted", "True", "Accepted", gen=2), "lastTransitionTime": "T0"},
                                 _c("vendor.io/Extra", "True", ltt="T0"),
                                 {**_c("Programmed", "False", "Invalid", gen=2), "lastTransitionTime": "T1"}]
    flipped = merge_status("GatewayClass", "", out, {"conditions": [_c("Accepted", "False", "X", gen=2)]}, "T2")
    assert flipped["conditions"][0]["lastTransitionTime"] == "T2"


def test_merge_leaves_a_newer_generation_alone():
    current = {"conditions": [_c("Accepted", "True", gen=5, ltt="T0")]}
    out = merge_status("GatewayClass", "", current, {"conditions": [_c("Accepted", "False", gen=4)]}, "T1")
    assert out["conditions"] == current["conditions"]


def test_merge_route_parents_by_controller():
    theirs = {"parentRef": {"name": "gw2"}, "controllerName": "example.com/x", "conditions": [_c("Accepted", "True")]}
    old_mine = {"parentRef": {"name": "gone"}, "controllerName": CONTROLLER, "conditions": [_c("Accepted", "True")]}
    ours = {"parents": [{"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"},
                         "controllerName": CONTROLLER, "conditions": [_c("Accepted", "True")]}]}
    out = merge_status("HTTPRoute", "ns", {"parents": [theirs, old_mine]}, ours, "T")
    assert [p["parentRef"]["name"] for p in out["parents"]] == ["gw2", "gw"]
    assert out["parents"][0] is theirs
    cleared = merge_status("HTTPRoute", "ns", {"parents": [theirs, old_mine]}, None, "T")
    assert cleared["parents"] == [theirs]
    assert merge_status("HTTPRoute", "ns", {"parents": [theirs]}, None, "T") is None
