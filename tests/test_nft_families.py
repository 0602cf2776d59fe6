"""IPv6 and dual-stack Services: the API server's checks, the families a Service gets, the
addresses it is given (discovery/ipfamilies.py, discovery/store.py Allocator), and the
manifests' error lines."""

from __future__ import annotations

import pytest

from discovery import ipfamilies as F
from discovery.endpoints import Endpoint
from discovery.manifests import load_text
from discovery.store import Allocator


@pytest.mark.parametrize("cip,cips,fams,policy,want", [
    (None, [], [], None, []),
    ("10.96.0.1", ["10.96.0.1", "fd96::1"], ["IPv4", "IPv6"], "RequireDualStack", []),
    ("10.96.0.1", ["10.96.0.2"], [], None, [("spec.clusterIPs[0]", "must equal spec.clusterIP")]),
    (None, ["10.96.0.1", "10.96.0.2"], [], "PreferDualStack", [("spec.clusterIPs[1]", "other family")]),
    (None, ["10.96.0.1", "fd96::1"], [], None, [("spec.clusterIPs", "SingleStack takes one address")]),
    (None, [], ["IPv4", "IPv6"], "SingleStack", [("spec.ipFamilies", "SingleStack takes one family")]),
    (None, [], ["IPv4", "IPv4"], "PreferDualStack", [("spec.ipFamilies[1]", "duplicate family")]),
    (None, [], ["IPv5"], None, [("spec.ipFamilies[0]", "must be IPv4 or IPv6")]),
    (None, [], [], "DualStack", [("spec.ipFamilyPolicy", "must be one of")]),
    (None, ["fd96::1"], ["IPv4"], None, [("spec.clusterIPs[0]", "is IPv6 but spec.ipFamilies[0] is IPv4")]),
    ("None", ["None", "fd96::1"], [], "PreferDualStack", [("spec.clusterIPs", "headless")]),
    (None, ["nope"], [], None, [("spec.clusterIPs[0]", "not an IP address")]),
])
def test_api_server_checks(cip, cips, fams, policy, want):
    got = F.check_service(cip, cips, fams, policy)
    assert len(got) == len(want), got
    for (path, msg), (wpath, wmsg) in zip(got, want):
        assert path == wpath and wmsg in msg, got


@pytest.mark.parametrize("given,fams,policy,cluster,want,problem", [
    ((), (), None, ("IPv4",), ("IPv4",), None),
    ((), (), None, ("IPv6", "IPv4"), ("IPv6",), None),                       # the cluster's primary family
    ((), (), "PreferDualStack", ("IPv4",), ("IPv4",), None),                 # prefers, gets one
    ((), (), "PreferDualStack", ("IPv4", "IPv6"), ("IPv4", "IPv6"), None),
    ((), ("IPv6",), "PreferDualStack", ("IPv4", "IPv6"), ("IPv6", "IPv4"), None),
    ((), (), "RequireDualStack", ("IPv4", "IPv6"), ("IPv4", "IPv6"), None),
    ((), (), "RequireDualStack", ("IPv4",), ("IPv4",), "RequireDualStack needs"),
    (("fd96::1",), (), None, ("IPv4", "IPv6"), ("IPv6",), None),             # the given address decides
    ((), ("IPv6",), None, ("IPv4",), (), "no IPv6 service range"),
])
def test_families_a_service_gets(given, fams, policy, cluster, want, problem):
    got, why = F.wanted_families(given, fams, policy, cluster)
    assert got == want
    assert (why is None) if problem is None else (problem in why)


def test_service_cidr_takes_one_range_or_one_of_each_family():
    assert [str(n) for n in F.parse_cidrs("10.96.0.0/16, fd96::/112")] == ["10.96.0.0/16", "fd96::/112"]
    for bad in ("10.96.0.0/16,10.97.0.0/16", "a,b,c", "", "10.96.0.0/16,fd96::/112,10.1.0.0/16"):
        with pytest.raises(ValueError):
            F.parse_cidrs(bad)


def _services(text: str):
    r = load_text(text, "svc.yaml")
    assert not r.errors, r.errors
    return {(o.namespace, o.name): o for o in r.objects}


def test_allocator_gives_every_family_an_address():
    svcs = _services("""
apiVersion: v1
kind: Service
metadata: {name: dual}
spec: {ipFamilyPolicy: RequireDualStack, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: v6first}
spec: {ipFamilyPolicy: PreferDualStack, ipFamilies: [IPv6, IPv4], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: half}
spec: {clusterIP: 10.96.0.5, ipFamilyPolicy: PreferDualStack, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: single}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ipFamilyPolicy: PreferDualStack, ports: [{port: 80}]}
""")
    a = Allocator("10.96.0.0/16,fd96::/112")
    primary, _ = a.assign(svcs)
    ips = a.cluster_ips
    fam = lambda t: tuple(F.family_of(ip) for ip in t)
    assert fam(ips[("default", "dual")]) == ("IPv4", "IPv6")
    assert fam(ips[("default", "v6first")]) == ("IPv6", "IPv4") and primary[("default", "v6first")] == ips[("default", "v6first")][0]
    assert ips[("default", "half")][0] == "10.96.0.5" and fam(ips[("default", "half")]) == ("IPv4", "IPv6")
    assert fam(ips[("default", "single")]) == ("IPv4",)
    assert ("default", "headless") not in ips
    assert len({ip for t in ips.values() for ip in t}) == sum(len(t) for t in ips.values())   # no address twice
    again = Allocator("10.96.0.0/16,fd96::/112")
    again.assign(svcs)
    assert again.cluster_ips == ips                    # deterministic: a restart agrees
    single = Allocator("10.96.0.0/16")
    single.assign(svcs)
    assert "RequireDualStack needs" in single.problems[("default", "dual")]
    assert fam(single.cluster_ips[("default", "dual")]) == ("IPv4",)


def test_manifest_errors_name_the_field():
    r = load_text("""apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  clusterIP: 10.96.0.1
  clusterIPs: [10.96.0.1, 10.96.0.2]
  ipFamilyPolicy: RequireDualStack
  ports: [{port: 80}]
""", "svc.yaml")
    msgs = [str(e) for e in r.errors]
    assert msgs == ["svc.yaml:6: Service/default/s: spec.clusterIPs[1]: must be of the other family than spec.clusterIPs[0] (IPv4)"], msgs


def test_secondary_cluster_ip_outside_the_range_is_refused():
    from discovery.manifests import validate_set
    r = load_text("""apiVersion: v1
kind: Service
metadata: {name: s}
spec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, "fd00::1"], ipFamilyPolicy: PreferDualStack, ports: [{port: 80}]}
""", "svc.yaml")
    errs = [str(e) for e in validate_set(r.objects, "10.96.0.0/16,fd96::/112")]
    assert errs == ["svc.yaml:4: Service/default/s: spec.clusterIPs[1]: fd00::1 is not in the service range 10.96.0.0/16,fd96::/112"], errs


def test_pod_ips_and_endpoint_addresses_per_family():
    (pod,) = load_text("""apiVersion: v1
kind: Pod
metadata: {name: p}
status: {podIPs: [{ip: 10.244.1.2}, {ip: "fd44::2"}]}
""").objects
    assert pod.pod_ip == "10.244.1.2" and pod.addresses == ("10.244.1.2", "fd44::2")
    e = Endpoint("10.244.1.2", 80, alt=("fd44::2",))
    assert (e.ip_of(4), e.ip_of(6)) == ("10.244.1.2", "fd44::2")
    assert Endpoint("fd44::3", 80).ip_of(4) is None
