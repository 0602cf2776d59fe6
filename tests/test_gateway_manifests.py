"""Gateway API manifests: what is refused (the CRDs' OpenAPI constraints and CEL rules, as the API
server refuses them), with the line and field each message names, and the defaults applied."""

from __future__ import annotations

import textwrap

import pytest

from discovery import gateway_objects as g
from discovery.gateway_api import parse_duration
from discovery.manifests import load_text


def errors(text: str) -> list[str]:
    return [f"{e.line}: {e.field}: {e.message}" for e in load_text(textwrap.dedent(text), "t.yaml").errors]


def one(text: str):
    r = load_text(textwrap.dedent(text), "t.yaml")
    assert not r.errors, r.errors
    assert len(r.objects) == 1
    return r.objects[0]


ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: ns}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - {rule}
"""

GW = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: ns}}
spec:
  gatewayClassName: c
  listeners:
  {listeners}
"""


@pytest.mark.parametrize("rule, message", [
    ("matches: [{path: {type: PathPrefix, value: foo}}]", "value must be an absolute path and start with '/'"),
    ("matches: [{path: {type: Exact, value: /a//b}}]", "must not contain '//'"),
    ("matches: [{path: {type: Exact, value: /a/./b}}]", "must not contain '/./'"),
    ("matches: [{path: {type: Exact, value: /a/%2fb}}]", "must not contain '%2f'"),
    ("matches: [{path: {type: Exact, value: /a#b}}]", "must not contain '#'"),
    ("matches: [{path: {type: Exact, value: /a/..}}]", "must not end with '/..'"),
    ("matches: [{path: {type: Exact, value: '/a b'}}]", "must only contain valid characters"),
    ("matches: [{path: {type: Regex, value: /a}}]", "type must be one of ['Exact', 'PathPrefix', 'RegularExpression']"),
    ("matches: [{headers: [{name: 'bad name', value: x}]}]", "is not a valid header name"),
    ("matches: [{headers: [{name: x, value: a}, {name: x, value: b}]}]", "duplicate entry 'x'"),
    ("matches: [{method: FETCH}]", "unsupported value 'FETCH'"),
    ("backendRefs: [{name: s, port: 80, weight: 1000001}]", "1000001 is outside 0-1000000"),
    ("backendRefs: [{name: s, port: 80, weight: -1}]", "-1 is outside 0-1000000"),
    ("backendRefs: [{name: s}]", "Must have port for Service reference"),
    ("{backendRefs: [{name: s, port: 80}], filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]}",
     "RequestRedirect filter must not be used together with backendRefs"),
    ("filters: [{type: RequestRedirect, requestRedirect: {statusCode: 300}}]", "unsupported value 300"),
    ("filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]", "unsupported value 'ftp'"),
    ("filters: [{type: RequestRedirect, requestRedirect: {hostname: '*.a.com'}}]", "precise hostname"),
    ("{matches: [{path: {type: Exact, value: /a}}], filters: [{type: RequestRedirect, requestRedirect: "
     "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}",
     "When using RequestRedirect filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified"),
    ("{matches: [{path: {value: /a}}, {path: {value: /b}}], filters: [{type: URLRewrite, urlRewrite: "
     "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}",
     "When using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match"),
    ("filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replacePrefixMatch: /x}}}]",
     "replaceFullPath must be specified when type is set to 'ReplaceFullPath'"),
    ("filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}]",
     "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both"),
    ("filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}}, "
     "{type: RequestHeaderModifier, requestHeaderModifier: {}}]", "RequestHeaderModifier filter cannot be repeated"),
    ("filters: [{type: RequestHeaderModifier, responseHeaderModifier: {}}]",
     "filter.responseHeaderModifier must be nil if the filter.type is not ResponseHeaderModifier"),
    ("filters: [{type: RequestMirror}]", "filter.requestMirror must be specified for RequestMirror filter.type"),
    ("filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s, port: 80}, percent: 10, "
     "fraction: {numerator: 1}}}]", "Only one of percent or fraction may be specified"),
    ("filters: [{type: RequestMirror, requestMirror: {backendRef: {name: s, port: 80}, fraction: "
     "{numerator: 3, denominator: 2}}}]", "numerator must be less than or equal to denominator"),
    ("filters: [{type: Unknown}]", "unsupported value 'Unknown'"),
    ("timeouts: {request: 1s, backendRequest: 2s}", "backendRequest timeout cannot be longer than request timeout"),
    ("timeouts: {request: 1.5s}", "'1.5s' is not a duration"),
    ("{name: Bad_Name, backendRefs: [{name: s, port: 80}]}", "is not a valid rule name"),
])
def test_http_route_rules_refused(rule, message):
    errs = errors(ROUTE.format(rule=rule))
    assert any(message in e for e in errs), errs
    assert all(e.startswith("7: ") or e.startswith("8: ") for e in errs), errs


def test_messages_name_file_line_kind_and_field():
    r = load_text(ROUTE.format(rule="matches: [{path: {type: Exact, value: nope}}]"), "routes.yaml")
    assert str(r.errors[0]) == ("routes.yaml:7: HTTPRoute/ns/r: spec.rules[0].matches[0].path.value: value must be an "
                                "absolute path and start with '/' when type one of ['Exact', 'PathPrefix']")


@pytest.mark.parametrize("spec, message", [
    ("parentRefs: [{name: gw}, {name: gw}]", "sectionName or port must be unique when parentRefs includes 2 or more"),
    ("parentRefs: [{name: gw, sectionName: a}, {name: gw}]", "sectionName or port must be specified when parentRefs"),
    ("parentRefs: [{name: gw, sectionName: a}, {name: gw, sectionName: b}, {name: gw, namespace: x}]", "!ok"),
    ("parentRefs: [{name: gw, sectionName: a}, {name: gw, sectionName: a}]", "sectionName or port must be unique"),
    ("parentRefs: [{name: gw, port: 0}]", "0 is outside 1-65535"),
    ("hostnames: ['1.2.3.4']", "IP addresses are not allowed"),
    ("hostnames: ['foo.*.com']", "is not a valid hostname"),
    ("hostnames: [Foo.com]", "is not a valid hostname"),
    ("rules: []", "must have at least 1 item"),
])
def test_http_route_spec_refused(spec, message):
    text = f"apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: ns}}\nspec:\n  {spec}\n"
    if message == "!ok":
        assert errors(text) == []
    else:
        assert any(message in e for e in errors(text)), errors(text)


def test_http_route_defaults():
    route = one("""\
        apiVersion: gateway.networking.k8s.io/v1beta1
        kind: HTTPRoute
        metadata: {name: r, namespace: ns, generation: 7}
        spec:
          parentRefs: [{name: gw}]
          rules:
          - backendRefs: [{name: s, port: 80}]
          - matches: [{headers: [{name: a, value: b}]}]
            filters: [{type: RequestRedirect, requestRedirect: {}}]
        """)
    assert route.generation == 7
    assert route.parents == (g.ParentRef(g.GROUP, "Gateway", "gw"),)
    assert route.rules[0].matches == (g.HTTPMatch(),)
    assert route.rules[0].backends[0] == g.BackendRef(g.ObjectRef("", "Service", "s"), 80, 1)
    assert route.rules[1].matches[0].path == g.PathMatch("PathPrefix", "/")
    assert route.rules[1].filters[0].redirect == g.RedirectFilter(status_code=302)
    assert one("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {}\n").rules == \
        (g.HTTPRule(),)


@pytest.mark.parametrize("listeners, message", [
    ("- {name: a, port: 80, protocol: HTTP, tls: {certificateRefs: [{name: c}]}}",
     "tls must not be specified for protocols ['HTTP', 'TCP', 'UDP']"),
    ("- {name: a, port: 443, protocol: HTTPS, tls: {mode: Passthrough}}", "tls mode must be Terminate for protocol HTTPS"),
    ("- {name: a, port: 443, protocol: TLS}", "tls mode must be set for protocol TLS"),
    ("- {name: a, port: 443, protocol: HTTPS, tls: {}}", "certificateRefs or options must be specified when mode is Terminate"),
    ("- {name: a, port: 9000, protocol: TCP, hostname: a.com}", "hostname must not be specified for protocols ['TCP', 'UDP']"),
    ("- {name: a, port: 80, protocol: HTTP}\n  - {name: a, port: 81, protocol: HTTP}", "Listener name must be unique"),
    ("- {name: a, port: 80, protocol: HTTP}\n  - {name: b, port: 80, protocol: HTTP}",
     "Combination of port, protocol and hostname must be unique"),
    ("- {name: a, port: 70000, protocol: HTTP}", "70000 is outside 1-65535"),
    ("- {name: a, port: 80, protocol: 'not a protocol'}", "is not a valid protocol"),
    ("- {name: a, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Some}}}", "unsupported value 'Some'"),
    ("- {name: a, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector, selector: {matchLabel: {}}}}}",
     "unknown label selector field"),
    ("- {name: a, port: 80, protocol: HTTP, hostname: '*'}", "is not a valid hostname"),
])
def test_gateway_listeners_refused(listeners, message):
    errs = errors(GW.format(listeners=listeners))
    assert any(message in e for e in errs), errs


def test_gateway_addresses_refused():
    text = GW.format(listeners="- {name: a, port: 80, protocol: HTTP}") + \
        "  addresses: [{value: 10.0.0.1}, {type: IPAddress, value: 10.0.0.1}, {type: Hostname, value: 'Bad Name'}]\n"
    errs = errors(text)
    assert any("IPAddress values must be unique" in e for e in errs), errs
    assert any("Hostname value must be empty or contain only valid characters" in e for e in errs), errs


def test_gateway_defaults():
    gw = one(GW.format(listeners="- {name: a, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: c}]}}"))
    lst = gw.listeners[0]
    assert lst.tls == g.ListenerTLS("Terminate", (g.ObjectRef("", "Secret", "c"),))
    assert lst.allowed == g.AllowedRoutes("Same")


@pytest.mark.parametrize("doc, message", [
    ("kind: GatewayClass\nmetadata: {name: c}\nspec: {controllerName: nopath}", "is not a valid controller name"),
    ("kind: ReferenceGrant\nmetadata: {name: g, namespace: n}\nspec: {from: [], to: [{group: '', kind: Service}]}",
     "must have at least 1 item"),
    ("kind: ReferenceGrant\nmetadata: {name: g, namespace: n}\nspec: {from: [{group: '', kind: HTTPRoute}], "
     "to: [{group: '', kind: Service}]}", "spec.from[0].namespace: required field is missing"),
    ("kind: TLSRoute\nmetadata: {name: t, namespace: n}\nspec: {parentRefs: [{name: gw}], rules: [{backendRefs: "
     "[{name: s, port: 443}]}]}", "spec.hostnames: required field is missing"),
    ("kind: TCPRoute\nmetadata: {name: t, namespace: n}\nspec: {rules: [{backendRefs: [{name: s, port: 1}]}, "
     "{backendRefs: [{name: s, port: 1}]}]}", "must have at most 1 items"),
    ("kind: TCPRoute\nmetadata: {name: t, namespace: n}\nspec: {rules: [{backendRefs: []}]}", "must have at least 1 item"),
    ("kind: GRPCRoute\nmetadata: {name: t, namespace: n}\nspec: {rules: [{matches: [{method: {}}]}]}",
     "One or both of 'service' or 'method' must be specified"),
    ("kind: GRPCRoute\nmetadata: {name: t, namespace: n}\nspec: {rules: [{matches: [{method: {service: 'a/b'}}]}]}",
     "service must only contain valid characters"),
    ("kind: GRPCRoute\nmetadata: {name: t, namespace: n}\nspec: {rules: [{filters: [{type: RequestRedirect}]}]}",
     "unsupported value 'RequestRedirect'"),
])
def test_other_kinds_refused(doc, message):
    errs = errors("apiVersion: gateway.networking.k8s.io/v1\n" + doc + "\n")
    assert any(message in e for e in errs), errs


def test_older_versions_keep_their_own_limits():
    tls = one("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: t}\n"
              "spec: {rules: [{backendRefs: [{name: s, port: 443}]}, {backendRefs: [{name: s, port: 443}]}]}\n")
    assert tls.hostnames == () and len(tls.rules) == 2
    assert one("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: ReferenceGrant\nmetadata: {name: g}\n"
               "spec: {from: [{group: '', kind: HTTPRoute, namespace: a}], to: [{group: '', kind: Service}]}\n")


def test_fault_injection():
    f = one("apiVersion: meshproxy.dev/v1alpha1\nkind: FaultInjection\nmetadata: {name: f}\n"
            "spec: {delay: {fixedDelay: 1s500ms, percentage: 25}, abort: {httpStatus: 503}}\n")
    assert (f.delay, f.delay_percent, f.abort_status, f.abort_percent) == (1.5, 25.0, 503, 100.0)
    errs = errors("apiVersion: meshproxy.dev/v1alpha1\nkind: FaultInjection\nmetadata: {name: f}\n"
                  "spec: {abort: {httpStatus: 700, percentage: 101}}\n")
    assert any("700 is outside 200-599" in e for e in errs) and any("101 is outside 0-100" in e for e in errs)


@pytest.mark.parametrize("text, seconds", [("1h", 3600.0), ("1h30m", 5400.0), ("500ms", 0.5), ("0s", 0.0),
                                           ("1m1s1ms", 61.001), ("1.5s", None), ("1d", None), ("", None),
                                           ("123456s", None), ("1s2s3s4s5s", None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_service_app_protocol_and_namespace():
    svc = one("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, appProtocol: "
              "kubernetes.io/h2c}], selector: {a: b}}\n")
    assert svc.ports[0].app_protocol == "kubernetes.io/h2c"
    ns = one("apiVersion: v1\nkind: Namespace\nmetadata: {name: 1team, labels: {env: prod}}\n")
    assert (ns.ref, ns.meta.labels["env"]) == ("Namespace/1team", "prod")
