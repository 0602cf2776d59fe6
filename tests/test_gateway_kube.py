"""Gateway API status written back through a real kube-apiserver (see tests/test_kube_apiserver.py
for the server this starts and when it skips).

The Gateway API CRDs installed here are this test's own minimal ones: one structural schema per
kind that keeps every field (``x-kubernetes-preserve-unknown-fields``), the versions meshproxy
reads, and the status subresource - what the status writer needs, without the upstream
validation (which tests/test_gateway_manifests.py covers on meshproxy's side).
"""

from __future__ import annotations

import random
import time

import pytest

from conftest import unavailable
from test_kube_apiserver import Meshproxy, _skip_reason
from test_kube_apiserver import apiserver as apiserver  # noqa: F401 - the module fixture, used by name

pytestmark = [pytest.mark.slow]


@pytest.fixture(autouse=True, scope="module")
def _apiserver_binary():
    """Skips outside CI, fails in CI, when there is no kube-apiserver to start."""
    reason = _skip_reason()
    if reason is not None:
        unavailable(reason)

GROUP = "gateway.networking.k8s.io"
CONTROLLER = "meshproxy.dev/gateway-controller"
# plural -> (kind, namespaced, versions (storage first))
CRDS = {
    "gatewayclasses": ("GatewayClass", False, ("v1", "v1beta1")),
    "gateways": ("Gateway", True, ("v1", "v1beta1")),
    "httproutes": ("HTTPRoute", True, ("v1", "v1beta1")),
    "grpcroutes": ("GRPCRoute", True, ("v1",)),
    "tlsroutes": ("TLSRoute", True, ("v1", "v1alpha2")),
    "tcproutes": ("TCPRoute", True, ("v1", "v1alpha2")),
    "referencegrants": ("ReferenceGrant", True, ("v1beta1", "v1")),
}


def crd(plural: str, kind: str, namespaced: bool, versions: tuple[str, ...]) -> dict:
    schema = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        # *.k8s.io groups are protected: an "unapproved" mark is enough for a test fixture.
        "metadata": {"name": f"{plural}.{GROUP}", "annotations": {"api-approved.kubernetes.io": "unapproved, test fixture"}},
        "spec": {"group": GROUP, "scope": "Namespaced" if namespaced else "Cluster",
                 "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": f"{kind}List"},
                 "versions": [{"name": v, "served": True, "storage": i == 0, "schema": schema,
                               **({"subresources": {"status": {}}} if kind != "ReferenceGrant" else {})}
                              for i, v in enumerate(versions)]},
    }


def install_crds(api) -> None:
    for plural, (kind, namespaced, versions) in CRDS.items():
        status, doc = api.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                               crd(plural, kind, namespaced, versions))
        assert status in (201, 409), doc.get("message", doc)
    deadline = time.monotonic() + 30
    for plural in CRDS:
        while True:
            doc = api.ok("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.{GROUP}")
            conds = {c["type"]: c["status"] for c in doc.get("status", {}).get("conditions", [])}
            if conds.get("Established") == "True":
                break
            assert time.monotonic() < deadline, f"CRD {plural} not established: {doc.get('status')}"
            time.sleep(0.1)


def gw_path(ns: str, plural: str, name: str = "", version: str = "v1") -> str:
    base = f"/apis/{GROUP}/{version}/namespaces/{ns}/{plural}" if ns else f"/apis/{GROUP}/{version}/{plural}"
    return f"{base}/{name}" if name else base


def conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def our_parents(route: dict) -> list[dict]:
    return [p for p in route.get("status", {}).get("parents", []) if p.get("controllerName") == CONTROLLER]


def wait_status(api, path: str, pred, what: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = api.ok("GET", path)
        if pred(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not reached; last: {last}")


def test_status_of_gateway_api_objects_is_written_back(apiserver):
    api = apiserver
    install_crds(api)
    tag = random.randint(1000, 9999)
    ns = f"gw{tag}"
    cls = f"meshproxy-{tag}"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    api.create(f"/api/v1/namespaces/{ns}/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns},
        "spec": {"clusterIP": f"127.96.{random.randint(180, 250)}.{random.randint(2, 250)}", "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]}})
    api.create(gw_path("", "gatewayclasses"), {"apiVersion": f"{GROUP}/v1", "kind": "GatewayClass",
                                               "metadata": {"name": cls}, "spec": {"controllerName": CONTROLLER}})
    api.create(gw_path("", "gatewayclasses"), {"apiVersion": f"{GROUP}/v1", "kind": "GatewayClass",
                                               "metadata": {"name": f"other-{tag}"},
                                               "spec": {"controllerName": "example.com/other"}})
    address = f"127.0.{random.randint(70, 79)}.{random.randint(2, 250)}"
    api.create(gw_path(ns, "gateways"), {
        "apiVersion": f"{GROUP}/v1", "kind": "Gateway", "metadata": {"name": "gw", "namespace": ns},
        "spec": {"gatewayClassName": cls, "addresses": [{"type": "IPAddress", "value": address}],
                 "listeners": [{"name": "http", "port": 18080, "protocol": "HTTP"},
                               {"name": "udp", "port": 5353, "protocol": "UDP"}]}})
    api.create(gw_path(ns, "gateways"), {
        "apiVersion": f"{GROUP}/v1", "kind": "Gateway", "metadata": {"name": "foreign", "namespace": ns},
        "spec": {"gatewayClassName": f"other-{tag}", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}})
    route = {"apiVersion": f"{GROUP}/v1", "kind": "HTTPRoute", "metadata": {"name": "r", "namespace": ns},
             "spec": {"parentRefs": [{"name": "gw"}, {"name": "foreign"}],
                      "rules": [{"backendRefs": [{"name": "web", "port": 8080}]},
                                {"matches": [{"path": {"type": "PathPrefix", "value": "/later"}}],
                                 "backendRefs": [{"name": "later", "port": 8080}]}]}}
    api.create(gw_path(ns, "httproutes"), route)
    # Another controller already reports on the route: its entry must survive our writes.
    foreign_parent = {"parentRef": {"name": "foreign"}, "controllerName": "example.com/other",
                      "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "theirs",
                                      "lastTransitionTime": "2024-01-01T00:00:00Z", "observedGeneration": 1}]}
    api.patch(gw_path(ns, "httproutes", "r") + "/status", {"status": {"parents": [foreign_parent]}})

    mp = Meshproxy(api.kubeconfig)
    try:
        mp.start()
        mp.wait_ready()
        gc = wait_status(api, gw_path("", "gatewayclasses", cls), lambda o: "Accepted" in conditions(o), "GatewayClass")
        assert conditions(gc)["Accepted"]["status"] == "True"
        assert "status" not in api.ok("GET", gw_path("", "gatewayclasses", f"other-{tag}")) or \
            not conditions(api.ok("GET", gw_path("", "gatewayclasses", f"other-{tag}")))
        gw = wait_status(api, gw_path(ns, "gateways", "gw"), lambda o: "Programmed" in conditions(o), "Gateway")
        assert (conditions(gw)["Accepted"]["reason"], conditions(gw)["Programmed"]["status"]) == ("ListenersNotValid", "True")
        assert conditions(gw)["Accepted"]["observedGeneration"] == gw["metadata"]["generation"]
        assert gw["status"]["addresses"] == [{"type": "IPAddress", "value": address}]
        listeners = {ls["name"]: ls for ls in gw["status"]["listeners"]}
        assert {c["type"]: c["reason"] for c in listeners["udp"]["conditions"]}["Accepted"] == "UnsupportedProtocol"
        assert listeners["http"]["attachedRoutes"] == 1
        assert not conditions(api.ok("GET", gw_path(ns, "gateways", "foreign")))      # not ours: untouched
        r = wait_status(api, gw_path(ns, "httproutes", "r"), lambda o: our_parents(o), "HTTPRoute parents")
        parents = r["status"]["parents"]
        assert foreign_parent in parents
        mine = {c["type"]: c for c in our_parents(r)[0]["conditions"]}
        assert (mine["Accepted"]["status"], mine["ResolvedRefs"]["reason"]) == ("True", "BackendNotFound")
        accepted_since = mine["Accepted"]["lastTransitionTime"]

        # The missing Service appears: ResolvedRefs turns True; Accepted keeps its transition time.
        time.sleep(1.1)                    # lastTransitionTime has one-second resolution
        api.create(f"/api/v1/namespaces/{ns}/services", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "later", "namespace": ns},
            "spec": {"selector": {"app": "later"}, "ports": [{"port": 8080, "protocol": "TCP"}]}})
        r = wait_status(api, gw_path(ns, "httproutes", "r"), lambda o: our_parents(o) and {
            c["type"]: c["status"] for c in our_parents(o)[0]["conditions"]}.get("ResolvedRefs") == "True", "ResolvedRefs")
        mine = {c["type"]: c for c in our_parents(r)[0]["conditions"]}
        assert mine["Accepted"]["lastTransitionTime"] == accepted_since
        assert mine["ResolvedRefs"]["lastTransitionTime"] != accepted_since

        # The route leaves our Gateway: our entry is removed, the other controller's stays.
        api.patch(gw_path(ns, "httproutes", "r"), {"spec": {"parentRefs": [{"name": "foreign"}]}})
        r = wait_status(api, gw_path(ns, "httproutes", "r"), lambda o: not our_parents(o), "our parent entry removed")
        assert r["status"]["parents"] == [foreign_parent]
        gw = wait_status(api, gw_path(ns, "gateways", "gw"), lambda o: {
            ls["name"]: ls["attachedRoutes"] for ls in o["status"]["listeners"]}.get("http") == 0, "attachedRoutes 0")

        snap = mp.snapshot()
        assert f"{address}:18080" in {x["address"] for x in snap["httpListeners"]}
        writer = snap["kubernetes"]["gatewayStatus"]
        assert writer["writes"] >= 4 and writer["failures"] == 0, writer
    finally:
        mp.stop()
