"""deploy/: the Dockerfile and the Kubernetes manifests.

Always: every manifest parses (pyyaml) and keeps the essentials — RBAC grants list/watch on
exactly the kinds the Kubernetes source reads, probes hit /readyz and /healthz on the admin
port the arguments name, every container requests resources, meshproxy runs as non-root
(except the node proxy, root with NET_BIND_SERVICE only), the node proxy is a hostNetwork
DaemonSet that learns its node from the downward API, the gateway has its LoadBalancer
Service, IngressClass and PodDisruptionBudget.

With the test API server (see tests/test_kube_apiserver.py): a server-side dry run of every
manifest — `kubectl apply --dry-run=server` when a kubectl that can talk to it is installed,
else the equivalent POST with ?dryRun=All (the same admission and validation, nothing stored).
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import yaml
from conftest import unavailable
from proc import ROOT

from discovery.sources.kubernetes import RESOURCES

DEPLOY = os.path.join(ROOT, "deploy")
MANIFESTS = sorted(glob.glob(os.path.join(DEPLOY, "*.yaml")))


def _docs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _all() -> list[tuple[str, dict]]:
    return [(os.path.basename(p), d) for p in MANIFESTS for d in _docs(p)]


def _find(kind: str, name: str) -> dict:
    for _, d in _all():
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind}/{name} in deploy/")


def _workloads() -> list[tuple[str, dict]]:
    return [(f, d) for f, d in _all() if d["kind"] in ("Deployment", "DaemonSet")]


def _meshproxy_containers():
    """Long-running meshproxy containers: regular ones and native sidecars (init containers
    with restartPolicy: Always); not run-to-completion init containers such as capture."""
    for f, d in _workloads():
        spec = d["spec"]["template"]["spec"]
        sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
        for c in spec["containers"] + sidecars:
            if c["image"].startswith("meshproxy"):
                yield f, d, c


def _arg(container: dict, flag: str) -> str | None:
    for a in container.get("args", []):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def test_manifests_parse_and_name_everything():
    assert {os.path.basename(p) for p in MANIFESTS} >= {"rbac.yaml", "node-proxy.yaml", "gateway.yaml",
                                                        "sidecar-example.yaml", "mesh-issuer.yaml", "mesh-example.yaml"}
    for f, d in _all():
        assert isinstance(d.get("apiVersion"), str) and isinstance(d.get("kind"), str), f
        assert d["metadata"].get("name"), f
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding", "IngressClass"):
            assert d["metadata"].get("namespace"), f"{f}: {d['kind']}/{d['metadata']['name']} has no namespace"


def _rules(role: dict) -> set[tuple[str, str, frozenset]]:
    out = set()
    for r in role["rules"]:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                out.add((g, res, frozenset(r["verbs"])))
    return out


def test_rbac_grants_exactly_what_the_source_reads():
    read = {(r.group, r.plural, frozenset({"list", "watch"})) for r in RESOURCES}
    from discovery.sources.gateway_status import RBAC_WRITES as GATEWAY_WRITES
    from discovery.sources.ingress_status import RBAC_WRITES
    written = {(g, res, frozenset(verbs)) for g, res, verbs in (*RBAC_WRITES, *GATEWAY_WRITES)}
    assert _rules(_find("ClusterRole", "meshproxy")) == read | written
    cluster_scoped = {(r.group, r.plural, frozenset({"list", "watch"})) for r in RESOURCES if not r.namespaced}
    assert _rules(_find("ClusterRole", "meshproxy-cluster-scoped")) == cluster_scoped
    binding = _find("ClusterRoleBinding", "meshproxy")
    assert binding["roleRef"]["name"] == "meshproxy"
    assert {"kind": "ServiceAccount", "name": "meshproxy", "namespace": "meshproxy-system"} in binding["subjects"]
    sa = _find("ServiceAccount", "meshproxy")
    for name in ("meshproxy-node", "meshproxy-gateway"):
        kind = "DaemonSet" if name == "meshproxy-node" else "Deployment"
        assert _find(kind, name)["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_probes_point_at_the_admin_port():
    seen = 0
    for f, _, c in _meshproxy_containers():
        admin = _arg(c, "--admin-listen")
        assert admin, f"{f}: {c['name']} has no --admin-listen"
        admin_port = int(admin.rsplit(":", 1)[1])
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path, f"{f}: {probe}"
            port = ports.get(get["port"], get["port"])
            assert port == admin_port, f"{f}: {probe} port {get['port']} is not the admin port {admin_port}"
        seen += 1
    assert seen == 5     # node proxy, gateway, sidecar example, issuer, mesh sidecar


def test_every_container_requests_resources():
    for f, d in _workloads():
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            req = c.get("resources", {}).get("requests", {})
            assert "cpu" in req and "memory" in req, f"{f}: {c['name']} requests no cpu/memory"


def test_meshproxy_runs_as_non_root():
    for f, d, c in _meshproxy_containers():
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, f
        assert "ALL" in sc["capabilities"]["drop"], f
        if d["kind"] == "DaemonSet":
            # The node proxy: root for low ports in the host network namespace, nothing else.
            assert sc["capabilities"].get("add") == ["NET_BIND_SERVICE"], f
        else:
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, f
            assert not sc["capabilities"].get("add"), f
    with open(os.path.join(DEPLOY, "Dockerfile"), encoding="utf-8") as fh:
        dockerfile = fh.read()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0", \
        "the image's user must be numeric (runAsNonRoot can only check a number) and not root"
    assert re.search(r"pip install [^\n]*\.", dockerfile)
    assert 'ENTRYPOINT ["meshproxy", "run"]' in dockerfile


def test_node_proxy_daemonset():
    ds = _find("DaemonSet", "meshproxy-node")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    [c] = [c for c in spec["containers"] if c["name"] == "meshproxy"]
    assert _arg(c, "--node") == "$(NODE_NAME)"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # The init container makes the same range local that meshproxy is told about.
    [init] = spec["initContainers"]
    init_env = {e["name"]: e.get("value") for e in init["env"]}
    assert init_env["SERVICE_CIDR"] == _arg(c, "--service-cidr")


def test_gateway_service_class_and_budget():
    dep = _find("Deployment", "meshproxy-gateway")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    [c] = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"] for p in c["ports"]}
    svc = _find("Service", "meshproxy-gateway")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    ic = _find("IngressClass", "meshproxy")
    assert ic["spec"]["controller"] == "meshproxy.dev/ingress"
    assert _arg(c, "--ingress-class") == "meshproxy"
    pdb = _find("PodDisruptionBudget", "meshproxy-gateway")
    assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    assert dep["spec"]["replicas"] > pdb["spec"]["minAvailable"]


def test_sidecar_is_scoped_to_its_namespace():
    dep = _find("Deployment", "checkout")
    [c] = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "meshproxy"]
    assert _arg(c, "--namespace") == "$(POD_NAMESPACE)"
    rb = _find("RoleBinding", "checkout-meshproxy")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "meshproxy"}


def _cli_run_parser():
    from meshproxy.cli import build_parser
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices["run"]


def _cli_parser(command: list[str]):
    """The argparse parser of ``meshproxy COMMAND...`` (the image's entrypoint is ``meshproxy run``)."""
    from meshproxy.cli import build_parser
    parser = build_parser()
    for word in command[1:] or ["run"]:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    return parser


def _all_meshproxy_containers():
    for f, d in _workloads():
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["image"].startswith("meshproxy") and c.get("command", ["meshproxy"])[0] == "meshproxy":
                yield f, c


def test_arguments_are_meshproxy_flags():
    run = _cli_run_parser()
    flags = {o for a in run._actions for o in a.option_strings}
    assert {"--kubeconfig", "--namespace", "--publish-service"} <= flags
    seen = set()
    for f, c in _all_meshproxy_containers():
        command = c.get("command", ["meshproxy", "run"])
        assert command[0] == "meshproxy", f"{f}: {c['name']}: {command}"
        parser = _cli_parser(command)
        flags = {o for a in parser._actions for o in a.option_strings}
        for a in c.get("args", []):
            assert a.split("=", 1)[0] in flags, f"{f}: {c['name']}: unknown flag {a} for {' '.join(command)}"
        seen.add(" ".join(command[1:]) or "run")
    assert seen == {"run", "capture", "identity serve"}


def test_mesh_pod_shape():
    dep = _find("Deployment", "web")
    tmpl = dep["spec"]["template"]
    assert tmpl["metadata"]["annotations"]["meshproxy.dev/inject"] == "enabled"
    spec = tmpl["spec"]
    capture, sidecar = spec["initContainers"]
    # Capture first, as root with NET_ADMIN only, and it runs to completion.
    assert capture["command"] == ["meshproxy", "capture"] and "restartPolicy" not in capture
    assert capture["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert capture["securityContext"]["runAsUser"] == 0
    # The sidecar is native (restartPolicy: Always) and runs as the uid capture leaves alone.
    assert sidecar["restartPolicy"] == "Always"
    assert _arg(capture, "--proxy-uid") == str(sidecar["securityContext"]["runAsUser"])
    admin_port = _arg(sidecar, "--admin-listen").rsplit(":", 1)[1]
    assert admin_port in _arg(capture, "--exclude-ports").split(",")
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP",
                   "SERVICE_ACCOUNT": "spec.serviceAccountName"}
    assert "--sidecar" in sidecar["args"]
    # The sidecar serves the ports capture redirects to and knows the uid capture skips.
    for flag in ("--outbound-port", "--inbound-port", "--proxy-uid"):
        assert _arg(sidecar, flag) == _arg(capture, flag), flag
    # The manifest's flags are ones `meshproxy run` accepts.
    from meshproxy.cli import build_parser
    build_parser().parse_args(["run", *[a for a in sidecar["args"] if "$(" not in a]])
    # The token shown to the issuer is made for the issuer's audience, which the issuer demands.
    [token_vol] = [v for v in spec["volumes"] if v["name"] == "meshproxy-token"]
    audience = token_vol["projected"]["sources"][0]["serviceAccountToken"]["audience"]
    [issuer] = _find("Deployment", "meshproxy-issuer")["spec"]["template"]["spec"]["containers"]
    assert _arg(issuer, "--token-audience") == audience
    mount = next(m["mountPath"] for m in sidecar["volumeMounts"] if m["name"] == "meshproxy-token")
    assert _arg(sidecar, "--identity-token-file") == f"{mount}/token"
    svc = _find("Service", "meshproxy-issuer")
    assert _arg(sidecar, "--identity-issuer") == f"https://meshproxy-issuer.meshproxy-system.svc:{svc['spec']['ports'][0]['port']}"
    assert "meshproxy-issuer.meshproxy-system.svc" in [a.split("=", 1)[1] for a in issuer["args"] if a.startswith("--dns-name=")]


def test_issuer_rbac_is_tokenreviews_only():
    assert _rules(_find("ClusterRole", "meshproxy-issuer")) == {
        ("authentication.k8s.io", "tokenreviews", frozenset({"create"}))}
    binding = _find("ClusterRoleBinding", "meshproxy-issuer")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "meshproxy-issuer", "namespace": "meshproxy-system"}]
    dep = _find("Deployment", "meshproxy-issuer")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "meshproxy-issuer"


def test_mesh_policies_in_deploy_are_valid():
    # Istio's kinds are not served by a plain API server: meshproxy's own validation (the same
    # checks as Istio's webhook) stands in for the server-side dry run.
    from discovery.manifests import load_paths
    result = load_paths([os.path.join(DEPLOY, "mesh-example.yaml")])
    assert not result.errors, [str(e) for e in result.errors]
    assert {o.kind for o in result.objects} >= {"AuthorizationPolicy", "PeerAuthentication"}


# --------------------------------------------------------------------------------------------
# Server-side dry run against the test API server


def _kubectl_for(server_env: dict) -> list[str] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "--kubeconfig", server_env["KUBECONFIG"], "version", "-o", "json"],
                         check=False, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return None
    return [kubectl, "--kubeconfig", server_env["KUBECONFIG"]]


def _for_test_server(doc: dict) -> dict:
    # The test API server is 1.20: PodDisruptionBudget is policy/v1beta1 there (v1 from 1.21).
    if doc["kind"] == "PodDisruptionBudget" and doc["apiVersion"] == "policy/v1":
        doc = dict(doc, apiVersion="policy/v1beta1")
    if doc["kind"] in ("Deployment", "DaemonSet"):
        # Native sidecars (an init container's restartPolicy: Always, with probes) arrived in
        # 1.28: the 1.20 schema knows neither, so the test server sees plain init containers.
        doc = copy.deepcopy(doc)
        for c in doc["spec"]["template"]["spec"].get("initContainers", []):
            if c.pop("restartPolicy", None) == "Always":
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    c.pop(probe, None)
    return doc


_PLURAL = {"Namespace": "namespaces", "ServiceAccount": "serviceaccounts", "ClusterRole": "clusterroles",
           "ClusterRoleBinding": "clusterrolebindings", "RoleBinding": "rolebindings", "DaemonSet": "daemonsets",
           "Deployment": "deployments", "Service": "services", "IngressClass": "ingressclasses",
           "PodDisruptionBudget": "poddisruptionbudgets"}


def _collection(doc: dict) -> str:
    api = doc["apiVersion"]
    base = "/api/v1" if api == "v1" else f"/apis/{api}"
    ns = doc["metadata"].get("namespace")
    return f"{base}/namespaces/{ns}/{_PLURAL[doc['kind']]}" if ns else f"{base}/{_PLURAL[doc['kind']]}"


@pytest.mark.slow
def test_server_side_dry_run():
    from test_kube_apiserver import ApiServer, _skip_reason
    reason = _skip_reason()
    if reason:
        unavailable(reason)
    directory = tempfile.mkdtemp(prefix="meshproxy-kube-deploy-")
    api = ApiServer(directory)
    api.build()
    api.start()
    try:
        # Istio's kinds have no CRDs on the test server: test_mesh_policies_in_deploy_are_valid.
        docs = [(f, _for_test_server(d)) for f, d in _all() if not d["apiVersion"].startswith("security.istio.io/")]
        # A dry-run Namespace is not stored, so objects in it would be refused: create the
        # namespaces for real first (the one thing this test writes).
        for _, d in docs:
            if d["kind"] == "Namespace":
                api.ok("POST", "/api/v1/namespaces", d)
        kubectl = _kubectl_for(api.env)
        rest = [(f, d) for f, d in docs if d["kind"] != "Namespace"]
        if kubectl is not None:
            # One kubectl run for all of them (kubectl is slow to start); it names the culprit.
            out = subprocess.run([*kubectl, "apply", "--dry-run=server", "-f", "-"],
                                 input=yaml.safe_dump_all([d for _, d in rest]), check=False,
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            assert out.stdout.count("(server dry run)") == len(rest), out.stdout
            used = "kubectl apply --dry-run=server"
        else:
            for f, d in rest:
                status, body = api.call("POST", _collection(d), d, query="dryRun=All")
                assert status == 201, f"{f}: {d['kind']}/{d['metadata']['name']}: {status} {body.get('message')}"
            used = "POST ?dryRun=All"
        # Nothing but the namespaces was stored.
        status, body = api.call("GET", "/apis/apps/v1/namespaces/meshproxy-system/daemonsets")
        assert status == 200 and body["items"] == []
        print(f"server-side dry run of {len(rest)} objects with {used}")
    finally:
        api.stop()
        shutil.rmtree(directory, ignore_errors=True)
