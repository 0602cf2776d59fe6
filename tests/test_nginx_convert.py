"""``meshproxy convert``: the Gateway API objects written for a set of ingress-nginx Ingresses route
the same requests the same way. Two real processes serve the same pods - one the Ingresses (an
IngressClass ``nginx``), one the converted Gateway, HTTPRoutes and IngressNginxFilters - and
every request gets the same answer from both (status, pod, path and fields the pod saw,
Location, CORS). Plus what the converter writes and warns about, as tables."""

from __future__ import annotations

import base64
import http.client
import json
import os
import subprocess
import sys

import pytest
import yaml

from backends import Backend
from discovery.manifests import load_text
from meshproxy.core.nginx_convert import ConvertOptions, convert
from nginx_fixtures import CLASS, ingress, secret, service
from proc import ROOT, Meshproxy, free_port

INGRESSES = [
    ingress("plain", "a.com", None, "", paths=[("/foo", "Prefix", "web"), ("/exact", "Exact", "other")],
            created="2024-01-01T00:00:00Z"),
    ingress("regex", "r.com", "/api/(v[0-9])/(.*)", "web", {"use-regex": "true", "rewrite-target": "/$2/$1"},
            ptype="ImplementationSpecific", created="2024-01-02T00:00:00Z"),
    ingress("regex-other", "r.com", "/api/v1/special", "other", created="2024-01-03T00:00:00Z"),
    ingress("approot", "root.com", "/app", "web", {"app-root": "/app/home"}),
    ingress("moved", "moved.com", "/", "web", {"permanent-redirect": "https://new.example.org/landing",
                                               "permanent-redirect-code": "308"}),
    ingress("vhost", "vhost.com", "/", "web", {"upstream-vhost": "internal.local", "rewrite-target": "/v2",
                                               "x-forwarded-prefix": "/public"}),
    ingress("main", "canary.com", "/", "web"),
    ingress("canary", "canary.com", "/", "other", {"canary": "true", "canary-by-header": "X-Canary"}),
    ingress("cors", "cors.com", "/", "web", {"enable-cors": "true", "cors-allow-origin": "https://*.ok.org"}),
    ingress("basic", "basic.com", "/", "web", {"auth-type": "basic", "auth-secret": "users", "auth-realm": "r"}),
    ingress("errors", "errors.com", "/", "web", {"custom-http-errors": "404", "default-backend": "other"}),
    ingress("limited", "limit.com", "/", "web", {"limit-rpm": "1"}),
    ingress("force", "force.com", "/", "web", {"force-ssl-redirect": "true"}),
]

REQUESTS = [   # (method, path, host, headers)
    ("GET", "/foo", "a.com", {}), ("GET", "/foo/x?q=1", "a.com", {}), ("GET", "/foobar", "a.com", {}),
    ("GET", "/exact", "a.com", {}), ("GET", "/exact/no", "a.com", {}),
    ("GET", "/api/v2/users/7", "r.com", {}), ("GET", "/API/V3/x", "r.com", {}), ("GET", "/api/v1/special", "r.com", {}),
    ("GET", "/api/v1/special/more", "r.com", {}), ("GET", "/other", "r.com", {}),
    ("GET", "/", "root.com:{port}", {}), ("GET", "/app/x", "root.com", {}),
    ("GET", "/anything", "moved.com", {}),
    ("GET", "/some/path?x=1", "vhost.com", {}),
    ("GET", "/", "canary.com", {}), ("GET", "/", "canary.com", {"X-Canary": "always"}),
    ("GET", "/", "canary.com", {"X-Canary": "never"}), ("GET", "/", "canary.com", {"X-Canary": "maybe"}),
    ("OPTIONS", "/", "cors.com", {"Origin": "https://a.ok.org"}), ("GET", "/", "cors.com", {"Origin": "https://a.ok.org"}),
    ("GET", "/", "cors.com", {"Origin": "https://bad.org"}),
    ("GET", "/", "basic.com", {}), ("GET", "/", "basic.com", {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}),
    ("GET", "/", "basic.com", {"Authorization": "Basic " + base64.b64encode(b"u:x").decode()}),
    ("GET", "/status/404", "errors.com", {}), ("GET", "/status/500", "errors.com", {}),
    *[("GET", "/", "limit.com", {})] * 7,
    ("GET", "/x/", "force.com", {}),
]


def answer(port: int, method: str, path: str, host: str, headers: dict) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, headers={"Host": host.replace("{port}", str(port)), **headers})
        r = c.getresponse()
        body = r.read()
        out = {"status": r.status, "location": (r.getheader("Location") or "").replace(str(port), "PORT"),
               "acao": r.getheader("Access-Control-Allow-Origin"), "acam": r.getheader("Access-Control-Allow-Methods")}
        if r.getheader("Content-Type") == "application/json":
            d = json.loads(body)
            hdrs = {n.lower(): v for n, v in d["headers"]}
            out.update(pod=d["backend"], target=d["target"], host=hdrs.get("host", "").replace(str(port), "PORT"),
                       xfp=hdrs.get("x-forwarded-prefix"), xcode=hdrs.get("x-code"),
                       auth="authorization" in hdrs)
        return out
    finally:
        c.close()


@pytest.fixture
def pods():
    web, other = Backend("127.0.10.61", name="web"), Backend("127.0.10.62", name="other")
    yield web, other
    web.stop()
    other.stop()


def test_converted_objects_route_the_same_requests_the_same_way(tmp_path, pods):
    web, other = pods
    users = secret("users", {"auth": b"u:{PLAIN}p\n"})
    common = "---\n".join([service("web", [(web.host, web.port)]), service("other", [(other.host, other.port)]),
                           users])
    source = tmp_path / "ingresses.yaml"
    source.write_text("---\n".join([CLASS, common, *INGRESSES]))
    gw_port = free_port()
    conv = subprocess.run([sys.executable, "-m", "meshproxy", "convert", "-f", str(source), "--http-port",
                           str(gw_port), "--address", "127.0.0.1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert conv.returncode == 0, conv.stderr
    docs = list(yaml.safe_load_all(conv.stdout))
    assert {d["kind"] for d in docs} == {"GatewayClass", "Gateway", "HTTPRoute", "IngressNginxFilter"}
    converted = tmp_path / "gateway.yaml"
    converted.write_text(common + "---\n" + conv.stdout)
    ingress_port = free_port()
    with Meshproxy([str(source)], "--ingress-listen", f"127.0.0.1:{ingress_port}", "--no-health-checks") as a, \
            Meshproxy([str(converted)], "--no-health-checks") as b:
        assert not [p for p in b.snapshot()["problems"]], b.snapshot()["problems"]
        for method, path, host, headers in REQUESTS:
            want = answer(ingress_port, method, path, host, headers)
            got = answer(gw_port, method, path, host, headers)
            assert got == want, (method, path, host, headers)
        assert a.snapshot()["problems"] == []


def objects(*docs: str):
    r = load_text("---\n".join((CLASS,) + docs))
    assert not r.errors, r.errors
    return r.objects


def test_what_does_not_translate_is_warned_once_per_thing():
    docs, warnings = convert(objects(
        service("web", [("127.0.10.1", 8080)]),
        ingress("a", "a.com", "/", "web", {"configuration-snippet": "x", "custom-headers": "d/c", "new-thing": "1"}),
        ingress("b", "b.com", "/", "web", {"permanent-redirect": "https://x.org/p?q=1", "permanent-redirect-code": "300"}),
        ingress("c", "c.com", "/", "web", {"canary": "true", "canary-by-header": "X"}),
        ingress("d", "d.com", "/", "web", {"backend-protocol": "HTTPS", "proxy-send-timeout": "5"})))
    p = "nginx.ingress.kubernetes.io/"
    assert warnings == [
        f"Ingress default/a: {p}configuration-snippet: holds nginx configuration, which meshproxy cannot apply; "
        "not converted; write what it does with Gateway API filters",
        f"Ingress default/a: {p}custom-headers: has no Gateway API or meshproxy equivalent; not converted",
        f"Ingress default/a: {p}new-thing: unknown annotation; not converted",
        "Ingress default/c: canary: no main Ingress has the same host, path and type; not converted",
        f"Ingress default/b: {p}permanent-redirect-code: 300 is not a redirect status Gateway API allows "
        "(301, 302, 303, 307, 308); 302 instead",
        f"Ingress default/b: {p}permanent-redirect: the query of the redirect URL has no Gateway API field; left out",
        f"Ingress default/d: {p}backend-protocol: HTTPS to the pods needs a BackendTLSPolicy, which meshproxy's "
        "Gateway does not implement yet; the routes send plain HTTP",
        f"Ingress default/d: {p}proxy-send-timeout: has no Gateway API field; not converted",
    ]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("HTTPRoute", "a-com") not in names and ("HTTPRoute", "b-com") in names
    rr = [d for d in docs if d["metadata"]["name"] == "b-com"][0]["spec"]["rules"][0]["filters"][0]["requestRedirect"]
    assert rr == {"scheme": "https", "statusCode": 302, "hostname": "x.org", "port": 443,
                  "path": {"type": "ReplaceFullPath", "replaceFullPath": "/p"}}


def test_tls_hosts_get_an_https_listener_and_a_redirect_route():
    docs, warnings = convert(objects(
        service("web", [("127.0.10.1", 8080)]),
        ingress("tls", "secure.com", "/", "web", tls=["secure.com"], secret="cert"),
        ingress("notls", "plain.com", "/", "web"),
        ingress("pass", "pass.com", "/", "web", {"ssl-passthrough": "true"}, tls=["pass.com"], secret="cert")),
        ConvertOptions(http_port=8080, https_port=8443))
    gw = [d for d in docs if d["kind"] == "Gateway"][0]
    assert [(x["name"], x.get("hostname"), x["port"], x["protocol"]) for x in gw["spec"]["listeners"]] == [
        ("http", None, 8080, "HTTP"), ("https-0", "secure.com", 8443, "HTTPS"), ("passthrough-0", "pass.com", 8443, "TLS")]
    routes = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("HTTPRoute", "TLSRoute")}
    assert routes["secure-com-http-redirect"]["spec"]["rules"] == [
        {"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 308}}]}]
    assert routes["secure-com"]["spec"]["parentRefs"] == [{"name": "nginx", "namespace": "default", "sectionName": "https-0"}]
    assert routes["plain-com"]["spec"]["parentRefs"][0]["sectionName"] == "http"
    assert routes["pass-com"]["kind"] == "TLSRoute"
    assert any("trailing '/'" in w for w in warnings)


def test_refusal_is_a_problem_a_log_line_and_a_validate_line(tmp_path, pods):
    web, _ = pods
    text = "---\n".join([CLASS, service("web", [(web.host, web.port)]),
                         ingress("good", "a.com", "/good", "web"),
                         ingress("bad", "a.com", "/bad", "web", {"server-snippet": "return 200;", "what-is-this": "1"})])
    path = tmp_path / "ingresses.yaml"
    path.write_text(text)
    port = free_port()
    with Meshproxy([str(path)], "--ingress-listen", f"127.0.0.1:{port}", "--no-health-checks") as p:
        problems = p.snapshot()["problems"]
        refusal = ("Ingress/default/bad: metadata.annotations[nginx.ingress.kubernetes.io/server-snippet]: holds nginx "
                   "configuration, which meshproxy cannot apply; the Ingress is not served")
        unknown = ("Ingress/default/bad: metadata.annotations[nginx.ingress.kubernetes.io/what-is-this]: not an "
                   "ingress-nginx annotation meshproxy knows; ignored")
        assert refusal in problems and unknown in problems
        assert answer(port, "GET", "/good", "a.com", {})["status"] == 200
        assert answer(port, "GET", "/bad", "a.com", {})["status"] == 404
        log = p.output()
        assert log.count(refusal) == 1 and log.count(unknown) == 1
    out = subprocess.run([sys.executable, "-m", "meshproxy", "validate", "-f", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    line = text.splitlines().index([x for x in text.splitlines() if "server-snippet" in x][0]) + 1
    assert f"{path}:{line}: {refusal}" in lines
    assert any(x.endswith(unknown) for x in lines)


def test_ingress_nginx_filter_manifests_and_references(tmp_path):
    bad = load_text("""apiVersion: meshproxy.dev/v1alpha1
kind: IngressNginxFilter
metadata: {name: f, namespace: default}
spec:
  annotations: {other.io/x: "1", enable-cors: true}
""")
    assert [str(e).split(": ", 1)[1] for e in bad.errors] == [
        "IngressNginxFilter/default/f: spec.annotations.other.io/x: must be an ingress-nginx annotation "
        "(nginx.ingress.kubernetes.io/...)",
        "IngressNginxFilter/default/f: spec.annotations.enable-cors: must be a string"]
    route = """apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: meshproxy}
spec: {controllerName: meshproxy.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  gatewayClassName: meshproxy
  addresses: [{type: IPAddress, value: 127.0.0.1}]
  listeners: [{name: http, port: PORT, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{name: gw}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /missing}}]
    filters: [{type: ExtensionRef, extensionRef: {group: meshproxy.dev, kind: IngressNginxFilter, name: nope}}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /snippet}}]
    filters: [{type: ExtensionRef, extensionRef: {group: meshproxy.dev, kind: IngressNginxFilter, name: snippet}}]
    backendRefs: [{name: web, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /allow}}]
    filters: [{type: ExtensionRef, extensionRef: {group: meshproxy.dev, kind: IngressNginxFilter, name: allow}}]
    backendRefs: [{name: web, port: 80}]
---
apiVersion: meshproxy.dev/v1alpha1
kind: IngressNginxFilter
metadata: {name: snippet, namespace: default}
spec: {annotations: {configuration-snippet: "return 200;"}}
---
apiVersion: meshproxy.dev/v1alpha1
kind: IngressNginxFilter
metadata: {name: allow, namespace: default}
spec: {annotations: {nginx.ingress.kubernetes.io/whitelist-source-range: 10.0.0.0/8}}
"""
    with Backend("127.0.10.63", name="web") as web:
        port = free_port()
        path = tmp_path / "gw.yaml"
        path.write_text(service("web", [(web.host, web.port)]) + "---\n" + route.replace("PORT", str(port)))
        with Meshproxy([str(path)], "--no-health-checks") as p:
            assert answer(port, "GET", "/missing", "x", {})["status"] == 500
            assert answer(port, "GET", "/snippet", "x", {})["status"] == 500
            assert answer(port, "GET", "/allow", "x", {})["status"] == 403
            problems = "\n".join(p.snapshot()["problems"])
            assert "IngressNginxFilter default/nope not found" in problems
            assert "configuration-snippet" in problems
