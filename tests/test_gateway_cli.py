"""``meshproxy get gateways | gatewayclasses | httproutes | grpcroutes -f FILE`` and
``meshproxy validate -f FILE`` on Gateway API manifests: the real command (``python -m
meshproxy``) in a child process, and what it prints - the status meshproxy computes offline
(Accepted / Programmed / ResolvedRefs / Conflicted with their reasons, ``attachedRoutes``) and,
for ``validate``, one ``file:line: Kind/ns/name: field: message`` line per problem and exit 1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from proc import ROOT

GOOD = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: meshproxy}
spec: {controllerName: meshproxy.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: someone-else}
spec: {controllerName: example.com/other-controller}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: 3000}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  gatewayClassName: meshproxy
  addresses: [{type: IPAddress, value: 127.0.64.1}]
  listeners:
  - {name: http, port: 18080, protocol: HTTP}
  - {name: admin, port: 18081, protocol: HTTP, hostname: admin.example.com}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: theirs, namespace: shop}
spec:
  gatewayClassName: someone-else
  listeners:
  - {name: http, port: 18082, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: http}]
  hostnames: [web.example.com]
  rules:
  - backendRefs: [{name: web, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: theirs, namespace: shop}
spec:
  parentRefs: [{name: theirs, sectionName: http}]   # another controller's Gateway: no status from us
  rules:
  - backendRefs: [{name: web, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: cart, namespace: shop}
spec:
  parentRefs: [{name: edge, port: 18080}]
  hostnames: [grpc.example.com]
  rules:
  - matches: [{method: {service: shop.Cart, method: Get}}]
    backendRefs: [{name: web, port: 8080}]
"""

# Everything here is accepted by the API server (the CRDs' schemas and CEL rules) but does not
# work: each is a status condition, a line from validate, and the rest is served.
BAD = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: meshproxy}
spec: {controllerName: meshproxy.dev/gateway-controller}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: 3000}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: vault}
spec:
  selector: {app: db}
  ports: [{name: http, port: 8080, targetPort: 3000}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  gatewayClassName: meshproxy
  addresses: [{type: IPAddress, value: 127.0.64.2}]
  listeners:
  - {name: web, port: 18080, protocol: HTTP, hostname: web.example.com}   # conflict: same port, two protocols
  - {name: raw, port: 18080, protocol: TCP}
  - {name: ok, port: 18081, protocol: HTTP, hostname: ok.example.com}
  - {name: grpc, port: 18082, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: missing, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: ok}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    backendRefs: [{name: nowhere, port: 8080}]   # missing Service
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: no-grant, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: ok}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /vault}}]
    backendRefs: [{name: db, namespace: vault, port: 8080}]   # no ReferenceGrant in vault
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cors, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: ok}]   # every rule of cors is dropped
  rules:
  - matches: [{path: {type: PathPrefix, value: /cors}}]
    filters: [{type: CORS, cors: {allowOrigins: ["https://a.example.com"]}}]   # unsupported filter
    backendRefs: [{name: web, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: elsewhere, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: ok}]   # listener for ok.example.com only
  hostnames: [other.example.org]
  rules:
  - backendRefs: [{name: web, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: stranger, namespace: guests}
spec:
  parentRefs: [{name: edge, namespace: shop, sectionName: ok}]   # allowedRoutes: Same
  rules:
  - backendRefs: [{name: web, namespace: shop, port: 8080}]   # no ReferenceGrant in shop either
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: lost, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: grpc}]
  rules:
  - matches: [{method: {service: shop.Lost}}]
    backendRefs: [{kind: ConfigMap, name: web, port: 8080}]   # not a Service
"""

LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+): (?P<kind>\w+)/(?P<ns>[^/:]+)/(?P<name>[^/:]+): "
                  r"(?P<field>[^:]+): (?P<message>.+)$")


def meshproxy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshproxy", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture
def files(tmp_path):
    out = {}
    for name, text in (("good", GOOD), ("bad", BAD)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        out[name] = str(path)
    return out


def line_of(text: str, marker: str) -> int:
    """1-based number of the only line of ``text`` containing ``marker``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


def tables(out: str) -> list[list[dict[str, str]]]:
    """The tables ``get`` prints (blank-line separated), as rows of {header: cell}; cells are
    cut at the header's columns, so empty cells and cells with spaces come out right."""
    result = []
    for block in out.strip("\n").split("\n\n"):
        lines = block.splitlines()
        header = lines[0]
        starts = [m.start() for m in re.finditer(r"\S+", header)]
        names = header.split()
        rows = []
        for line in lines[1:]:
            cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
            rows.append(dict(zip(names, cells)))
        result.append(rows)
    return result


def get(what: str, path: str) -> list[list[dict[str, str]]]:
    r = meshproxy("get", what, "-f", path)
    assert r.returncode == 0, r.stderr
    return tables(r.stdout)


def conditions(rows: list[dict[str, str]], obj: str, where: str = "") -> dict[str, tuple[str, str]]:
    return {r["CONDITION"]: (r["STATUS"], r["REASON"]) for r in rows
            if r["OBJECT"] == obj and r["PARENT/LISTENER"] == where}


# -- get --------------------------------------------------------------------------------------------

def test_get_gatewayclasses(files):
    classes, conds = get("gatewayclasses", files["good"])
    assert {r["NAME"]: r["ACCEPTED"] for r in classes} == {"meshproxy": "True (Accepted)",
                                                            "someone-else": "- (not ours)"}
    assert conditions(conds, "GatewayClass meshproxy") == {"Accepted": ("True", "Accepted")}


def test_get_gateways_good(files):
    gateways, conds = get("gateways", files["good"])
    rows = {r["NAME"]: r for r in gateways}
    edge = rows["edge"]
    assert (edge["ADDRESSES"], edge["ACCEPTED"], edge["PROGRAMMED"]) == \
        ("127.0.64.1", "True (Accepted)", "True (Programmed)")
    # The HTTPRoute (by sectionName) and the GRPCRoute (by port) attach to "http"; none to "admin".
    assert edge["LISTENERS"] == "http(18080/HTTP, 2 routes), admin(18081/HTTP, 0 routes)"
    assert rows["theirs"]["ACCEPTED"] == "- (not ours)"
    assert conditions(conds, "Gateway shop/edge") == {"Accepted": ("True", "Accepted"),
                                                       "Programmed": ("True", "Programmed")}
    for listener in ("http", "admin"):
        assert conditions(conds, "Gateway shop/edge", f"listener {listener}") == {
            "Accepted": ("True", "Accepted"), "Programmed": ("True", "Programmed"),
            "ResolvedRefs": ("True", "ResolvedRefs"), "Conflicted": ("False", "NoConflicts")}
    assert not any(r["OBJECT"] == "Gateway shop/theirs" for r in conds)    # not ours: no status at all


def test_get_gateways_json_is_the_status_field(files):
    r = meshproxy("get", "gateways", "-o", "json", "-f", files["good"])
    assert r.returncode == 0, r.stderr
    items = {(i["namespace"], i["name"]): i for i in json.loads(r.stdout)}
    assert items[("shop", "theirs")]["status"] is None
    st = items[("shop", "edge")]["status"]
    assert st["addresses"] == [{"type": "IPAddress", "value": "127.0.64.1"}]
    listeners = {ls["name"]: ls for ls in st["listeners"]}
    assert listeners["http"]["attachedRoutes"] == 2 and listeners["admin"]["attachedRoutes"] == 0
    assert [k["kind"] for k in listeners["http"]["supportedKinds"]] == ["HTTPRoute", "GRPCRoute"]


def test_get_httproutes_and_grpcroutes_good(files):
    routes, conds = get("httproutes", files["good"])
    assert routes == [
        {"NAMESPACE": "shop", "NAME": "theirs", "HOSTNAMES": "*", "PARENTS": "Gateway shop/theirs/http",
         "ACCEPTED": "- (no parent of ours)", "RESOLVEDREFS": "-"},
        {"NAMESPACE": "shop", "NAME": "web", "HOSTNAMES": "web.example.com", "PARENTS": "Gateway shop/edge/http",
         "ACCEPTED": "True (Accepted)", "RESOLVEDREFS": "True (ResolvedRefs)"}]
    assert not any(r["OBJECT"] == "HTTPRoute shop/theirs" for r in conds)
    assert conditions(conds, "HTTPRoute shop/web", "Gateway shop/edge/http") == {
        "Accepted": ("True", "Accepted"), "ResolvedRefs": ("True", "ResolvedRefs")}
    routes, conds = get("grpcroutes", files["good"])
    assert [(r["NAME"], r["PARENTS"], r["ACCEPTED"], r["RESOLVEDREFS"]) for r in routes] == [
        ("cart", "Gateway shop/edge:18080", "True (Accepted)", "True (ResolvedRefs)")]


def test_get_gateways_listener_conflict(files):
    gateways, conds = get("gateways", files["bad"])
    edge = gateways[0]
    # Some listeners are served: the Gateway is accepted with the reason saying not all are.
    assert (edge["ACCEPTED"], edge["PROGRAMMED"]) == ("True (ListenersNotValid)", "True (Programmed)")
    # missing and no-grant are accepted on "ok" (their backends answer 500); the others are not.
    assert edge["LISTENERS"] == ("web(18080/HTTP, 0 routes), raw(18080/TCP, 0 routes), ok(18081/HTTP, 2 routes), "
                                 "grpc(18082/HTTP, 1 route)")
    for listener in ("web", "raw"):
        assert conditions(conds, "Gateway shop/edge", f"listener {listener}") == {
            "Accepted": ("False", "ProtocolConflict"), "Programmed": ("False", "ProtocolConflict"),
            "ResolvedRefs": ("True", "ResolvedRefs"), "Conflicted": ("True", "ProtocolConflict")}
    assert conditions(conds, "Gateway shop/edge", "listener ok")["Conflicted"] == ("False", "NoConflicts")


def test_get_httproutes_bad_references_and_filters(files):
    routes, conds = get("httproutes", files["bad"])
    got = {(r["NAMESPACE"], r["NAME"]): (r["ACCEPTED"], r["RESOLVEDREFS"]) for r in routes}
    assert got == {
        ("shop", "missing"): ("True (Accepted)", "False (BackendNotFound)"),
        ("shop", "no-grant"): ("True (Accepted)", "False (RefNotPermitted)"),
        ("shop", "cors"): ("False (UnsupportedValue)", "True (ResolvedRefs)"),
        ("shop", "elsewhere"): ("False (NoMatchingListenerHostname)", "True (ResolvedRefs)"),
        ("guests", "stranger"): ("False (NotAllowedByListeners)", "False (RefNotPermitted)"),
    }
    cors = [r for r in conds if r["OBJECT"] == "HTTPRoute shop/cors" and r["CONDITION"] == "Accepted"]
    assert "CORS filter is not supported" in cors[0]["MESSAGE"]


def test_get_grpcroutes_bad_kind(files):
    routes, conds = get("grpcroutes", files["bad"])
    assert [(r["NAME"], r["ACCEPTED"], r["RESOLVEDREFS"]) for r in routes] == [
        ("lost", "True (Accepted)", "False (InvalidKind)")]


# -- validate ---------------------------------------------------------------------------------------

def test_validate_good_exits_0(files):
    r = meshproxy("validate", "-f", files["good"])
    assert (r.returncode, r.stdout) == (0, "")
    assert "ok: 8 objects" in r.stderr


def test_validate_bad_prints_one_located_line_per_problem(files):
    path = files["bad"]
    r = meshproxy("validate", "-f", path)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    parsed = [LINE.match(x) for x in lines]
    assert all(parsed), [x for x, m in zip(lines, parsed) if not m]
    assert {m["file"] for m in parsed} == {path}
    got = {(int(m["line"]), m["kind"], m["ns"], m["name"], m["field"]): m["message"] for m in parsed}

    def message(marker: str, kind: str, ns: str, name: str, fld: str) -> str:
        key = (line_of(BAD, marker), kind, ns, name, fld)
        assert key in got, (key, lines)
        return got[key]

    assert message("name: nowhere", "HTTPRoute", "shop", "missing", "spec.rules[0].backendRefs[0]") == \
        "Service shop/nowhere not found (BackendNotFound)"
    assert message("# no ReferenceGrant in vault", "HTTPRoute", "shop", "no-grant",
                   "spec.rules[0].backendRefs[0]").endswith("(RefNotPermitted)")
    assert message("{name: web, port: 18080", "Gateway", "shop", "edge",
                   "spec.listeners[0]").endswith("(ProtocolConflict)")
    assert message("{name: raw, port: 18080", "Gateway", "shop", "edge",
                   "spec.listeners[1]").endswith("(ProtocolConflict)")
    # The dropped rule is placed at the rule; the message names the filter.
    assert message("value: /cors", "HTTPRoute", "shop", "cors", "spec.rules[0]") == \
        "rule dropped: spec.rules[0].filters[0]: the CORS filter is not supported"
    assert message("# every rule of cors is dropped", "HTTPRoute", "shop", "cors", "spec.parentRefs[0]") \
        .endswith("no rule can be served: spec.rules[0].filters[0]: the CORS filter is not supported (UnsupportedValue)")
    assert message("# listener for ok.example.com only", "HTTPRoute", "shop", "elsewhere",
                   "spec.parentRefs[0]").endswith("(NoMatchingListenerHostname)")
    assert message("# allowedRoutes: Same", "HTTPRoute", "guests", "stranger",
                   "spec.parentRefs[0]").endswith("(NotAllowedByListeners)")
    assert message("kind: ConfigMap", "GRPCRoute", "shop", "lost",
                   "spec.rules[0].backendRefs[0]").endswith("(InvalidKind)")


@pytest.mark.parametrize("doc, reason", [
    ("""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: http}]
  rules:
  - backendRefs: [{name: web, namespace: other, port: 8080}]
""", "RefNotPermitted"),
    ("""apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: more, namespace: shop}
spec:
  gatewayClassName: meshproxy
  addresses: [{type: IPAddress, value: 127.0.64.1}]
  listeners:
  - {name: http, port: 18080, protocol: HTTP}
""", "HostnameConflict"),
    ("""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{name: edge, sectionName: http}]
  rules:
  - filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Magic, name: m}}]
    backendRefs: [{name: web, port: 8080}]
""", "InvalidKind"),
])
def test_validate_each_problem_alone_fails(tmp_path, doc, reason):
    """The good manifests plus one bad object: validate exits 1 and names it."""
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "extra.yaml").write_text(doc)
    r = meshproxy("validate", "-f", str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(LINE.match(x) for x in lines), lines
    assert any(x.endswith(f"({reason})") for x in lines), lines


def test_validate_manifest_error_names_the_field(tmp_path):
    # Refused by the CRD schema itself (ReplacePrefixMatch needs a PathPrefix match).
    path = tmp_path / "invalid.yaml"
    path.write_text(GOOD + """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rewrite, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  rules:
  - matches: [{path: {type: Exact, value: /a}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]
    backendRefs: [{name: web, port: 8080}]
""")
    r = meshproxy("validate", "-f", str(path))
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]), lines
    m = LINE.match(lines[0])
    assert (m["kind"], m["ns"], m["name"]) == ("HTTPRoute", "shop", "rewrite")
    assert m["field"].startswith("spec.rules[0]")
    # get refuses the same file with the same line rather than printing a status for it.
    g = meshproxy("get", "httproutes", "-f", str(path))
    assert g.returncode == 1 and lines[0] in g.stderr and g.stdout == ""


def test_validate_bad_gateway_address_is_a_message(files):
    r = meshproxy("validate", "--gateway-address", "not-an-ip", "-f", files["good"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--gateway-address 'not-an-ip': not an IP address" in r.stderr
