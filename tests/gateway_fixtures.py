"""Gateway API test fixtures: a small "cluster" shaped like the one the upstream conformance
suite runs against (an infra namespace with three backend Services, a web and an app backend
namespace, Gateways that take routes from the same namespace, from all, or from namespaces
labelled ``gateway-conformance: backend``), written as manifests for meshproxy.

``base_yaml(...)`` gives the manifests, with each Gateway on its own loopback address;
``snapshot(text)`` builds the snapshot meshproxy would serve; ``Req`` / ``outcome`` play
one request through an HTTP listener's route table the way the L7 exchange does, and say
what it answers: ``("backend", "ns/service")``, ``("status", 404 | 500)`` or
``("redirect", status, location)``. The end-to-end tests use the same manifests with real
pods (tests/backends.py).
"""

from __future__ import annotations

import random
from urllib.parse import parse_qsl

from discovery.manifests import load_text
from discovery.store import ADDED, Event
from meshproxy.controller import Controller
from meshproxy.core.gateway_rules import redirect_location, rewritten_path
from meshproxy.core.paths import normalize_request_path
from meshproxy.core.settings import Settings

INFRA, WEB, APP = "gateway-conformance-infra", "gateway-conformance-web-backend", "gateway-conformance-app-backend"
CLASS = "meshproxy"

# Gateway name -> (address, port) in the default layout.
GATEWAYS = {"same-namespace": ("127.0.40.1", 80), "all-namespaces": ("127.0.40.2", 80),
            "backend-namespaces": ("127.0.40.3", 80)}


def service_yaml(name: str, ns: str, port: int = 8080, target: int = 3000, app: str | None = None,
                 extra_ports: str = "") -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{app: {app or name}}}
  ports:
  - {{name: http, port: {port}, targetPort: {target}}}
{extra_ports}"""


def gateway_yaml(name: str, address: str, listeners: str, ns: str = INFRA, cls: str = CLASS) -> str:
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {ns}}}
spec:
  gatewayClassName: {cls}
  addresses: [{{type: IPAddress, value: {address}}}]
  listeners:
{listeners}"""


def http_listener(port: int, frm: str = "Same", name: str = "http", extra: str = "") -> str:
    return f"""  - name: {name}
    port: {port}
    protocol: HTTP
    allowedRoutes:
      namespaces:
        from: {frm}
{extra}"""


def base_yaml(gateways: dict[str, tuple[str, int]] | None = None, pods: str = "") -> str:
    gws = gateways or GATEWAYS
    docs = [
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {INFRA}, labels: {{gateway-conformance: infra}}}}",
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {WEB}, labels: {{gateway-conformance: backend}}}}",
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {APP}, labels: {{gateway-conformance: backend}}}}",
        f"apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {CLASS}}}\n"
        "spec: {controllerName: meshproxy.dev/gateway-controller}",
        service_yaml("infra-backend-v1", INFRA), service_yaml("infra-backend-v2", INFRA),
        service_yaml("infra-backend-v3", INFRA), service_yaml("web-backend", WEB),
        service_yaml("app-backend-v1", APP), service_yaml("app-backend-v2", APP),
    ]
    sel = "        selector: {matchLabels: {gateway-conformance: backend}}\n"
    for name, (addr, port) in gws.items():
        frm = {"same-namespace": "Same", "all-namespaces": "All", "backend-namespaces": "Selector"}.get(name, "Same")
        docs.append(gateway_yaml(name, addr, http_listener(port, frm, extra=sel if frm == "Selector" else "")))
    if pods:
        docs.append(pods)
    return "\n---\n".join(docs) + "\n"


def snapshot(text: str, **settings):
    """The snapshot meshproxy builds for these manifests (errors fail the test)."""
    result = load_text(text, "test.yaml")
    assert not result.errors, "\n".join(map(str, result.errors))
    ctl = Controller(Settings(**settings), lambda s: None)
    ctl.apply_events([Event(ADDED, o) for o in result.objects])
    ctl.rebuild()
    return ctl.snapshot


def status_of(snap, kind: str, ns: str, name: str) -> dict | None:
    return snap.gateway_status.get((kind, ns, name))


def route_conditions(snap, kind: str, ns: str, name: str, parent: str | None = None) -> dict[str, tuple[str, str]]:
    """{type: (status, reason)} of a route's (only, or named) parent."""
    st = status_of(snap, kind, ns, name)
    assert st is not None, f"{kind} {ns}/{name} has no status"
    parents = st["parents"]
    if parent is not None:
        parents = [p for p in parents if p["parentRef"]["name"] == parent]
    assert len(parents) == 1, parents
    return {c["type"]: (c["status"], c["reason"]) for c in parents[0]["conditions"]}


def listener_status(snap, ns: str, gw: str, listener: str) -> dict:
    st = status_of(snap, "Gateway", ns, gw)
    assert st is not None
    for ls in st["listeners"]:
        if ls["name"] == listener:
            return {"attached": ls["attachedRoutes"], "kinds": [k["kind"] for k in ls["supportedKinds"]],
                    **{c["type"]: (c["status"], c["reason"]) for c in ls["conditions"]}}
    raise AssertionError(f"no listener {listener}")


def gateway_conditions(snap, ns: str, name: str) -> dict[str, tuple[str, str]]:
    st = status_of(snap, "Gateway", ns, name)
    assert st is not None
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


class Req:
    """The request view the route model tests conditions against (l7's RequestView)."""

    def __init__(self, path: str = "/", host: str = "example.com", method: str = "GET",
                 headers: dict[str, str] | None = None) -> None:
        self.target = path
        self.raw_path, _, self.query = path.partition("?")
        self.host = host
        self.method = method.encode()
        self._headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self._query = parse_qsl(self.query, keep_blank_values=True)

    def header(self, name: bytes) -> bytes | None:
        vals = [v for n, v in self._headers if n == name]
        return b", ".join(vals) if vals else None

    def query_param(self, name: str) -> str | None:
        for k, v in self._query:
            if k == name:
                return v
        return None

    def cookie(self, name: str) -> str | None:
        return None


def outcome(snap, address: str, port: int, req: Req, rand: float = 0.5, scheme: str = "http"):
    """What the listener at address:port answers ``req`` with (see the module docstring)."""
    lst = snap.http_listeners.get((address, port))
    if lst is None:
        return ("no listener",)
    path = normalize_request_path(req.raw_path)
    route = lst.routes.match(req.host, path, req)
    if route is None:
        return ("status", 404)
    a = route.action
    if a.fault is not None and a.fault.abort_percent >= 100:
        return ("status", a.fault.abort_status)
    if a.redirect is not None:
        return ("redirect", a.redirect.status, redirect_location(a.redirect, route, scheme, req.host, path, req.query))
    b = a.pick_backend(rand)
    if b is None or b.key is None:
        return ("status", a.invalid_status)
    return ("backend", f"{b.key[0]}/{b.key[1]}")


def forwarded(snap, address: str, port: int, req: Req, rand: float = 0.5) -> dict:
    """What reaches the backend: path, Host, and the header edits of the route and backendRef."""
    lst = snap.http_listeners[(address, port)]
    path = normalize_request_path(req.raw_path)
    route = lst.routes.match(req.host, path, req)
    assert route is not None
    a = route.action
    b = a.pick_backend(rand)
    fields = [(n, v) for n, v in req._headers]
    if a.request_headers is not None:
        fields = a.request_headers.apply(fields)
    if b is not None and b.request_headers is not None:
        fields = b.request_headers.apply(fields)
    out_path = rewritten_path(a.rewrite, route, path) if a.rewrite is not None else path
    host = a.rewrite.hostname if a.rewrite is not None and a.rewrite.hostname else req.host
    return {"path": out_path, "host": host, "headers": [(n.decode(), v.decode()) for n, v in fields],
            "backend": None if b is None or b.key is None else f"{b.key[0]}/{b.key[1]}"}


def distribution(snap, address: str, port: int, req: Req, n: int = 1000) -> dict[str, int]:
    """How ``n`` evenly spread picks fall over the backends."""
    out: dict[str, int] = {}
    for i in range(n):
        o = outcome(snap, address, port, req, rand=(i + 0.5) / n)
        k = o[1] if o[0] == "backend" else str(o)
        out[k] = out.get(k, 0) + 1
    return out


def random_ports(n: int) -> list[int]:
    return random.sample(range(20000, 30000), n)
