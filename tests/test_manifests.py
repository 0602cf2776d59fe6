"""Manifests -> objects: defaults, and validation messages that name file:line, object and field."""

import json
import textwrap

import pytest

from discovery import objects as o
from discovery.manifests import load_paths, load_text


def one(text: str):
    r = load_text(textwrap.dedent(text), "m.yaml")
    assert not r.errors, [str(e) for e in r.errors]
    assert len(r.objects) == 1
    return r.objects[0]


def errors(text: str, cidr: str | None = None, tmp_path=None) -> list[str]:
    r = load_text(textwrap.dedent(text), "m.yaml")
    from discovery.manifests import validate_set
    return [str(e) for e in r.errors + validate_set(r.objects, cidr)]


def test_service_defaults_as_the_api_server_sets_them():
    svc = one("""
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec:
          selector: {app: web}
          ports: [{port: 80}]
        """)
    assert isinstance(svc, o.Service)
    assert svc.namespace == "default"
    assert svc.type == "ClusterIP"
    assert svc.cluster_ip is None
    assert svc.session_affinity == "None" and svc.affinity_timeout == 10800
    assert svc.external_traffic_policy == "Cluster" and svc.internal_traffic_policy == "Cluster"
    assert svc.ports == (o.ServicePort(name="", port=80, target_port=80, node_port=None, protocol="TCP"),)
    assert svc.publish_not_ready is False


def test_pod_fields_and_probe_defaults():
    pod = one("""
        apiVersion: v1
        kind: Pod
        metadata: {name: p, namespace: shop, labels: {app: web}, deletionTimestamp: "2024-01-01T00:00:00Z"}
        spec:
          nodeName: node-a
          containers:
          - name: c
            ports: [{name: http, containerPort: 8080}, {containerPort: 9090}]
            readinessProbe: {httpGet: {path: /ready, port: http}}
        status: {podIP: 127.0.10.5, conditions: [{type: Ready, status: "True"}]}
        """)
    assert pod.namespace == "shop" and pod.node_name == "node-a"
    assert pod.named_port("http") == 8080 and pod.named_port("nope") is None
    assert pod.terminating
    assert pod.ready_condition is True
    p = pod.readiness_probe
    assert (p.action, p.port, p.path, p.period, p.timeout, p.success_threshold, p.failure_threshold) == \
        ("http", "http", "/ready", 10.0, 1.0, 1, 3)


def test_creation_timestamp_stays_text():
    ing = one("""
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata: {name: i, creationTimestamp: 2024-01-02T03:04:05Z}
        spec: {defaultBackend: {service: {name: s, port: {number: 80}}}}
        """)
    assert ing.meta.creation_timestamp == "2024-01-02T03:04:05Z"


@pytest.mark.parametrize("spec, expected", [
    ("ports: [{port: 0}]", "m.yaml:7: Service/default/s: spec.ports[0].port: 0 is outside 1-65535"),
    ("ports: [{port: 70000}]", "m.yaml:7: Service/default/s: spec.ports[0].port: 70000 is outside 1-65535"),
    ("type: NodePort\n  ports: [{port: 80, nodePort: 80}]",
     "m.yaml:8: Service/default/s: spec.ports[0].nodePort: 80 is outside 30000-32767"),
    ("ports: [{port: 80, nodePort: 30001}]",
     "m.yaml:7: Service/default/s: spec.ports[0].nodePort: may not be used when type is 'ClusterIP'"),
    ("ports: [{port: 80}, {port: 81}]",
     "m.yaml:7: Service/default/s: spec.ports[0].name: required when a service has more than one port"),
    ("ports: [{name: a, port: 80}, {name: a, port: 81}]",
     "m.yaml:7: Service/default/s: spec.ports[1].name: duplicate port name 'a' (also spec.ports[0])"),
    ("ports: [{port: 80, targetPort: Not_A_Name}]",
     "m.yaml:7: Service/default/s: spec.ports[0].targetPort: 'Not_A_Name' is not a valid port name"),
    ("type: Bogus\n  ports: [{port: 80}]",
     "m.yaml:7: Service/default/s: spec.type: unsupported value 'Bogus'"),
    ("clusterIP: None\n  type: NodePort\n  ports: [{port: 80}]",
     "m.yaml:7: Service/default/s: spec.clusterIP: may not be 'None' (headless) for type NodePort"),
    ("selector: {app: web}", "m.yaml:7: Service/default/s: spec.ports: required unless the service is headless"),
    ("clusterIP: 10.0.0.300\n  ports: [{port: 80}]", "m.yaml:7: Service/default/s: spec.clusterIP: '10.0.0.300' is not an IP address"),
    ("ports: [{port: \"80\"}]", "m.yaml:7: Service/default/s: spec.ports[0].port: must be an integer, not str"),
    ("sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n  ports: [{port: 80}]",
     "m.yaml:8: Service/default/s: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is outside 1-86400"),
    ("externalTrafficPolicy: Local\n  ports: [{port: 80}]",
     "m.yaml:7: Service/default/s: spec.externalTrafficPolicy: may only be set for externally reachable services"),
])
def test_service_validation_messages(spec, expected):
    text = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  " + spec + "\n"
    # Prepend a blank first line so line numbers are distinct from the document start.
    errs = errors("\n\n" + text)
    assert any(e.startswith(expected) for e in errs), errs


def test_headless_service_may_have_no_ports():
    svc = one("""
        apiVersion: v1
        kind: Service
        metadata: {name: db}
        spec: {clusterIP: None, selector: {app: db}}
        """)
    assert svc.headless and svc.ports == ()


def test_invalid_names_and_labels():
    errs = errors("""
        apiVersion: v1
        kind: Service
        metadata: {name: Web_1, namespace: Bad_NS, labels: {"app": "a b"}}
        spec: {ports: [{port: 80}]}
        """)
    joined = "\n".join(errs)
    assert "metadata.name: 'Web_1' is not a valid DNS-1035 label" in joined
    assert "metadata.namespace: 'Bad_NS' is not a valid DNS-1123 label" in joined
    assert "metadata.labels.app" in joined


def test_several_errors_are_reported_together_with_their_lines():
    text = textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: a}
        spec:
          type: NodePort
          ports:
          - {name: x, port: 80, nodePort: 99}
          - {name: y, port: 0}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        spec: {containers: [{name: c, ports: [{containerPort: 99999}]}]}
        """)
    r = load_text(text, "f.yaml")
    msgs = [str(e) for e in r.errors]
    assert "f.yaml:7: Service/default/a: spec.ports[0].nodePort: 99 is outside 30000-32767" in msgs
    assert "f.yaml:8: Service/default/a: spec.ports[1].port: 0 is outside 1-65535" in msgs
    assert any(m.startswith("f.yaml:13: Pod/default/p: spec.containers[0].ports[0].containerPort") for m in msgs)


def test_duplicate_node_ports_and_cluster_ips_across_files(tmp_path):
    (tmp_path / "a.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: a}
        spec: {type: NodePort, clusterIP: 127.96.0.5, ports: [{port: 80, nodePort: 30080}]}
        """))
    (tmp_path / "b.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: unrelated}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: b}
        spec:
          type: NodePort
          clusterIP: 127.96.0.5
          ports:
          - port: 80
            nodePort: 30080
        """))
    r = load_paths([str(tmp_path)], "127.96.0.0/16")
    msgs = [str(e) for e in r.errors]
    # The line of the field itself (the second document of the file is parsed on its own and
    # shifted: the field lines move with it).
    assert any("b.yaml:13: Service/default/b: spec.ports[0].nodePort: 30080 is already allocated to Service/default/a" in m for m in msgs), msgs
    assert any("b.yaml:10: Service/default/b: spec.clusterIP: 127.96.0.5 is already allocated" in m for m in msgs), msgs


def test_cluster_ip_outside_service_range(tmp_path):
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n"
                                     "spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n")
    r = load_paths([str(tmp_path)], "127.96.0.0/16")
    assert [str(e) for e in r.errors] == [
        f"{tmp_path}/a.yaml:4: Service/default/a: spec.clusterIP: 10.0.0.1 is not in the service range 127.96.0.0/16"]


def test_duplicate_object_is_an_error(tmp_path):
    doc = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n"
    (tmp_path / "a.yaml").write_text(doc + "---\n" + doc)
    r = load_paths([str(tmp_path)])
    assert [e.message for e in r.errors] == [f"defined twice (first at {tmp_path}/a.yaml:1)"]


def test_unknown_kinds_are_skipped_not_errors():
    r = load_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n"
                  "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n", "x.yaml")
    assert r.errors == [] and r.objects == []
    assert r.skipped == ["x.yaml:1: apps/v1/Deployment", "x.yaml:5: v1/ConfigMap"]


def test_invalid_yaml_names_the_line():
    r = load_text("apiVersion: v1\nkind: Pod\nmetadata: {name: [\n", "bad.yaml")
    assert len(r.errors) == 1
    assert str(r.errors[0]).startswith("bad.yaml:")
    assert "invalid YAML" in str(r.errors[0])


def test_missing_kind_and_non_mapping_documents():
    r = load_text("- a\n- b\n---\nmetadata: {name: x}\n", "x.yaml")
    msgs = [str(e) for e in r.errors]
    assert msgs[0] == "x.yaml:1: a manifest must be a mapping, not a list"
    assert msgs[1].startswith("x.yaml:4: ") and "required field is missing" in msgs[1]


def test_endpoints_and_endpointslice_nil_rules():
    r = load_text(textwrap.dedent("""\
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}
        addressType: IPv4
        ports: [{name: http, port: 8080}]
        endpoints:
        - addresses: [127.0.20.1]
        - addresses: [127.0.20.2]
          conditions: {ready: false, serving: true, terminating: true}
        ---
        apiVersion: v1
        kind: Endpoints
        metadata: {name: legacy}
        subsets:
        - addresses: [{ip: 127.0.21.1}]
          notReadyAddresses: [{ip: 127.0.21.2}]
          ports: [{port: 9000}]
        """), "e.yaml")
    assert not r.errors
    sl, ep = r.objects
    assert sl.service == "ext" and not sl.legacy
    assert (sl.endpoints[0].ready, sl.endpoints[0].serving, sl.endpoints[0].terminating) == (True, True, False)
    assert (sl.endpoints[1].ready, sl.endpoints[1].serving, sl.endpoints[1].terminating) == (False, True, True)
    assert ep.legacy and ep.service == "legacy" and ep.key[0] == "Endpoints"
    assert [(e.addresses, e.ready) for e in ep.endpoints] == [(("127.0.21.1",), True), (("127.0.21.2",), False)]


def test_ingress_parsing_and_validation():
    ing = one("""
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata: {name: i, annotations: {kubernetes.io/ingress.class: meshproxy}}
        spec:
          tls: [{hosts: [foo.bar.com], secretName: s}]
          rules:
          - host: foo.bar.com
            http:
              paths:
              - {path: /a, pathType: Prefix, backend: {service: {name: s1, port: {number: 80}}}}
              - {pathType: ImplementationSpecific, backend: {service: {name: s2, port: {name: http}}}}
        """)
    assert ing.class_name == "meshproxy"
    assert ing.rules[0].host == "foo.bar.com"
    assert ing.rules[0].paths[0] == o.IngressPath("/a", "Prefix", o.IngressBackend("s1", 80, None))
    assert ing.rules[0].paths[1].path == "/" and ing.rules[0].paths[1].backend.port_name == "http"
    assert ing.tls[0].secret_name == "s"
    errs = "\n".join(errors("""
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata: {name: i}
        spec:
          rules:
          - host: "*.*.foo.com"
            http:
              paths:
              - {path: a, pathType: Prefix, backend: {service: {name: s1, port: {number: 80}}}}
              - {path: /a/../b, pathType: Exact, backend: {service: {name: s1, port: {number: 80}}}}
              - {path: /x, pathType: Regex, backend: {service: {name: s1, port: {number: 80}}}}
          - host: 1.2.3.4
        """))
    assert "spec.rules[0].host: '*.*.foo.com' is not a valid wildcard host" in errs
    assert "spec.rules[0].http.paths[0].path: 'a' must be an absolute path" in errs
    assert "spec.rules[0].http.paths[1].path: '/a/../b' must not contain" in errs
    assert "spec.rules[0].http.paths[2].pathType: unsupported value 'Regex'" in errs
    assert "spec.rules[1].host: '1.2.3.4' must be a DNS name, not an IP address" in errs


def test_tls_secret_base64_and_string_data():
    sec = one("""
        apiVersion: v1
        kind: Secret
        metadata: {name: s}
        type: kubernetes.io/tls
        data: {tls.crt: Y2VydA==}
        stringData: {tls.key: key}
        """)
    assert sec.data == {"tls.crt": b"cert", "tls.key": b"key"}
    errs = errors("""
        apiVersion: v1
        kind: Secret
        metadata: {name: s}
        type: kubernetes.io/tls
        data: {tls.crt: "!!!"}
        """)
    assert any("data.tls.crt: is not valid base64" in e for e in errs)
    assert any("data.tls.key: required for type kubernetes.io/tls" in e for e in errs)


def test_node_and_ingress_class():
    r = load_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Node
        metadata: {name: node-a}
        status: {addresses: [{type: Hostname, address: a}, {type: InternalIP, address: 127.0.1.1}]}
        ---
        apiVersion: networking.k8s.io/v1
        kind: IngressClass
        metadata: {name: mesh, annotations: {ingressclass.kubernetes.io/is-default-class: "true"}}
        spec: {controller: meshproxy.dev/ingress}
        """), "n.yaml")
    node, cls = r.objects
    assert node.internal_ip == "127.0.1.1" and node.ref == "Node/node-a"
    assert cls.is_default and cls.controller == o.INGRESS_CONTROLLER


def test_duplicate_keys_are_refused():
    r = load_text("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nmetadata: {name: b}\n", "d.yaml")
    assert [str(e) for e in r.errors] == ["d.yaml:4: invalid YAML: found duplicate key 'metadata'"]


def test_document_cache_reparses_only_changed_documents_with_exact_lines():
    import discovery.manifests as m
    docs = ["apiVersion: v1\nkind: Pod\nmetadata: {name: p%d}\nspec: {containers: [{name: c, ports: [{containerPort: %d}]}]}\n"
            % (i, 8000 + i) for i in range(5)]
    text = "---\n".join(docs)
    cache: dict = {}
    first = m.load_text(text, "c.yaml", cache)
    assert [(o.name, o.origin.line) for o in first.objects] == [(f"p{i}", 1 + 5 * i) for i in range(5)]
    calls = []
    real = m._parse_stream
    m._parse_stream = lambda *a: (calls.append(a[2]), real(*a))[1]
    try:
        docs[3] = docs[3].replace("8003", "99999")
        again = m.load_text("---\n".join(docs), "c.yaml", cache)
    finally:
        m._parse_stream = real
    assert calls == [15]                       # only the edited document was parsed again
    assert [str(e) for e in again.errors] == [
        "c.yaml:19: Pod/default/p3: spec.containers[0].ports[0].containerPort: 99999 is outside 1-65535"]
    assert m.load_text("---\n".join(docs), "c.yaml").errors == again.errors   # same as uncached


# The API server's rules for Ingress paths (k8s.io/kubernetes pkg/apis/networking/validation,
# validateHTTPIngressPath, unchanged from 1.19 to today): Exact/Prefix must be absolute and must
# not contain "//", "/./", "/../", "%2f", "%2F" nor end with "/..", "/."; ImplementationSpecific
# must be absolute when given. Everything the API accepts is accepted here (None), whatever the
# router later makes of it; everything it refuses is refused with its reason.
API_PATH_RULES = [
    # (path, pathType, expected error fragment or None)
    ("/", "Prefix", None),
    ("/a/b/", "Exact", None),
    ("/a%25b", "Prefix", None),           # an encoded '%'
    ("/a%2eb", "Exact", None),            # an encoded '.'
    ("/%2e%2e", "Prefix", None),          # encoded dot-segment: the API does not decode
    ("/a?b=c", "Exact", None),
    ("/a#frag", "Prefix", None),
    ("/a b", "Exact", None),
    ("/ünïcode", "Prefix", None),
    ("/a/.b", "Prefix", None),
    ("/a/..b", "Exact", None),
    ("/a/b.", "Prefix", None),
    ("/.well-known/x", "Exact", None),
    ("/a%", "Prefix", None),              # a broken escape is not the API's concern
    ("/a%5Cb", "Prefix", None),           # encoded backslash: allowed by the API
    ("", "Exact", "must be an absolute path"),
    ("a", "Prefix", "must be an absolute path"),
    ("*", "Exact", "must be an absolute path"),
    ("//", "Prefix", "must not contain '//'"),
    ("/a//b", "Exact", "must not contain '//'"),
    ("/a/./b", "Prefix", "must not contain '/./'"),
    ("/a/../b", "Exact", "must not contain '/../'"),
    ("/a%2fb", "Prefix", "must not contain '%2f'"),
    ("/a%2Fb", "Exact", "must not contain '%2F'"),
    ("/a/..", "Prefix", "cannot end with '/..'"),
    ("/a/.", "Exact", "cannot end with '/.'"),
    ("/.", "Prefix", "cannot end with '/.'"),
    ("/..", "Exact", "cannot end with '/..'"),
    # ImplementationSpecific: only "absolute when given".
    ("", "ImplementationSpecific", None),
    ("/a//b/../c%2f/.", "ImplementationSpecific", None),
    ("/.*", "ImplementationSpecific", None),
    ("a", "ImplementationSpecific", "must be an absolute path"),
]


def _ingress_with_paths(*paths) -> str:
    lines = "\n".join(
        f"      - {{path: {json.dumps(p)}, pathType: {t}, backend: {{service: {{name: s{i}, port: {{number: 80}}}}}}}}"
        for i, (p, t) in enumerate(paths))
    return ("apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\n"
            "spec:\n  rules:\n  - host: a.example\n    http:\n      paths:\n" + lines + "\n")


@pytest.mark.parametrize(("path", "path_type", "expected"), API_PATH_RULES)
def test_ingress_paths_are_validated_exactly_like_the_api_server(path, path_type, expected):
    from discovery.manifests import ingress_path_errors
    errs = ingress_path_errors(path, path_type)
    r = load_text(_ingress_with_paths((path, path_type)), "m.yaml")
    if expected is None:
        assert errs == [] and not r.errors, [str(e) for e in r.errors]
        [ing] = r.objects
        assert ing.rules[0].paths[0].path == (path or "/")
    else:
        assert any(expected in e for e in errs), errs
        assert any(f"spec.rules[0].http.paths[0].path: {path!r} {expected}" in str(e) for e in r.errors), \
            [str(e) for e in r.errors]


def test_path_the_router_cannot_reach_does_not_drop_the_ingress():
    """The API accepts "/%2e%2e" and "/a%25b"; files and the Kubernetes source must too (they
    share parse_document): the Ingress stays, its valid paths are served, and the router says
    which path no request can reach."""
    from discovery.manifests import parse_document
    import yaml
    doc = yaml.safe_load(_ingress_with_paths(("/ok", "Prefix"), ("/a%25b", "Exact"), ("/%2e%2e", "Prefix")))
    ing, errs, _ = parse_document(doc, "<api>", 0)
    assert ing is not None and not errs
    assert [p.path for p in ing.rules[0].paths] == ["/ok", "/a%25b", "/%2e%2e"]
    from meshproxy.core.ingress import ingress_route
    from meshproxy.core.routes import Action, RouteTable
    entries = [ingress_route("a.example", p.path, p.path_type, Action(), "default/i") for p in ing.rules[0].paths]
    table = RouteTable.build(entries)
    assert table.match("a.example", "/ok/x") is not None
    assert table.match("a.example", "/a%25b") is not None
    assert any("%2e%2e" in s for s in table.skipped), table.skipped


def test_external_traffic_policy_allowed_with_external_ips():
    text = ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  externalTrafficPolicy: Local\n"
            "  externalIPs: [127.0.60.1]\n  ports: [{port: 80}]\n")
    r = load_text(text, "m.yaml")
    assert not r.errors, [str(e) for e in r.errors]
    assert r.objects[0].external_traffic_policy == "Local"


def test_empty_service_selector_is_no_selector():
    """`selector: {}` selects nothing (as through the API, where the empty map is omitted):
    such a Service takes its endpoints from Endpoints/EndpointSlices, not every pod."""
    r = load_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  selector: {}\n  ports: [{port: 80}]\n", "m.yaml")
    assert not r.errors
    assert r.objects[0].selector is None
