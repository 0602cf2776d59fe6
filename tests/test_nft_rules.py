"""The nftables ruleset computed from a snapshot, and the diff between two (l4/nftables.py):
table tests, no kernel needed. tests/test_nft_cluster.py runs the same rules in a kernel."""

from __future__ import annotations

import json

import pytest

from discovery.manifests import load_text
from discovery.store import ADDED, Event
from l4 import nftables as N
from meshproxy.controller import Controller
from meshproxy.core.settings import Settings

NODES = """
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.77.0.11}, {type: InternalIP, address: "fd77::11"}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.77.0.12}]}
"""


def pod(name, node="node-a", ip="10.244.1.2", ready=True, labels="app: web", ip6=None, deleting=False, serving=None):
    ips = f", podIPs: [{{ip: {ip}}}, {{ip: \"{ip6}\"}}]" if ip6 else ""
    dele = ", deletionTimestamp: '2026-01-01T00:00:00Z'" if deleting else ""
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{{labels}}}{dele}}}
spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 53, protocol: UDP}}]}}]}}
status: {{podIP: {ip}{ips}, conditions: [{{type: Ready, status: "{ready}"}}]}}
"""


def svc(name="web", spec="clusterIP: 10.96.0.10", ports="[{name: http, port: 80, targetPort: http}]", selector="{app: web}"):
    return f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  {spec}
  selector: {selector}
  ports: {ports}
"""


def snapshot(text: str, node: str = "node-a", cidr: str = "10.96.0.0/16,fd96::/112"):
    r = load_text(NODES + text)
    assert not r.errors, r.errors
    c = Controller(Settings(paths=["x"], node=node, service_cidr=cidr, health_checks=False), lambda s: None)
    c.apply_events([Event(ADDED, o) for o in r.objects])
    c.rebuild()
    return c, c.snapshot


def ruleset(text: str, **kw) -> N.Ruleset:
    return N.build_ruleset(snapshot(text, **kw)[1])


def chains(rs: N.Ruleset) -> dict[str, list]:
    out = {n: r for n, (_, r) in rs.base.chains.items()}
    for p in rs.parts.values():
        out.update((n, r) for n, (_, r) in p.chains.items())
    return out


def elements(rs: N.Ruleset, m: str) -> dict:
    out = dict(rs.base.elements.get(m, {}))
    for p in rs.parts.values():
        out.update(p.elements.get(m, {}))
    return out


def named(rs: N.Ruleset, prefix: str, ident: str) -> str:
    hits = [n for n in chains(rs) if n.startswith(prefix) and n.endswith("-" + ident) or
            (n.startswith(prefix) and n.split("-", 2)[-1] == ident)]
    assert len(hits) == 1, (prefix, ident, sorted(chains(rs)))
    return hits[0]


def vmap_targets(rule: list) -> list[str]:
    """Chains a ``numgen random mod N vmap {...}`` rule chooses from, in order."""
    (expr,) = [e for e in rule if "vmap" in e]
    ng = expr["vmap"]["key"]["numgen"]
    data = expr["vmap"]["data"]["set"]
    assert ng["mode"] == "random" and ng["mod"] == len(data)
    return [v["goto"]["target"] for _, v in data]


def text(obj) -> str:
    return json.dumps(obj)


# -- the layout --------------------------------------------------------------------------------


def test_clusterip_picks_at_random_among_ready_pods():
    rs = ruleset(pod("a1") + pod("a2", ip="10.244.1.3") + pod("nr", ip="10.244.1.4", ready=False) + svc())
    sc = named(rs, "service-", "default/web/tcp/http")
    assert elements(rs, "service-ips") == {("10.96.0.10", "tcp", 80): ("goto", sc)}
    (rule,) = chains(rs)[sc]
    eps = vmap_targets(rule)
    assert [e.rsplit("__", 1)[1] for e in eps] == ["10.244.1.2/8080", "10.244.1.3/8080"]   # not-ready one left out
    ep = chains(rs)[eps[0]]
    # hairpin: a pod reaching itself through its service is masqueraded, then DNAT
    assert text(ep[0]) == text([{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.244.1.2"}},
                                {"jump": {"target": "mark-for-masquerade"}}])
    assert ep[-1][-1] == {"dnat": {"family": "ip", "addr": "10.244.1.2", "port": 8080}}
    assert ep[-1][0]["match"]["right"] == "tcp"
    # ClusterIP traffic is not masqueraded otherwise (no cluster CIDR to tell pods from others)
    assert "mark-for-masquerade" not in text(chains(rs)[sc])


def test_no_endpoints_rejects():
    rs = ruleset(svc(selector="{app: nobody}"))
    assert elements(rs, "service-ips") == {}
    assert elements(rs, "no-endpoint-services") == {("10.96.0.10", "tcp", 80): ("goto", "reject-chain")}
    assert not any(n.startswith(("service-", "endpoint-")) for n in chains(rs) if "/" in n)
    reject = chains(rs)["reject-chain"]
    assert {"reject": {"type": "tcp reset"}} in reject[0] and reject[1] == [{"reject": {"type": "icmpx", "expr": "port-unreachable"}}]


def test_terminating_endpoints_serve_only_when_no_pod_is_ready():
    both = ruleset(pod("old", deleting=True) + pod("new", ip="10.244.1.3") + svc())
    sc = named(both, "service-", "default/web/tcp/http")
    assert [e.rsplit("__", 1)[1] for e in vmap_targets(chains(both)[sc][0])] == ["10.244.1.3/8080"]
    only = ruleset(pod("old", deleting=True) + svc())     # serving (Ready) but terminating: KEP-1669
    sc = named(only, "service-", "default/web/tcp/http")
    assert [e.rsplit("__", 1)[1] for e in vmap_targets(chains(only)[sc][0])] == ["10.244.1.2/8080"]


def test_client_ip_affinity_sets_and_lookups():
    rs = ruleset(pod("a1") + pod("a2", ip="10.244.1.3") +
                 svc(spec="clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}"))
    part = rs.parts[("default", "web")]
    affinity = {n: s for n, s in part.sets.items() if n.startswith("affinity-")}
    assert len(affinity) == 2 and all(s == N.SetSpec("ipv4_addr", 60) for s in affinity.values())
    sc = named(rs, "service-", "default/web/tcp/http")
    rules = chains(rs)[sc]
    assert len(rules) == 3                              # one lookup per endpoint, then the random pick
    for rule in rules[:2]:
        assert rule[0]["match"]["left"] == {"payload": {"protocol": "ip", "field": "saddr"}}
        assert rule[0]["match"]["right"].lstrip("@") in affinity and "goto" in rule[1]
    ep = chains(rs)[rules[0][1]["goto"]["target"]]
    upd = ep[1][0]["set"]
    assert upd["op"] == "update" and upd["elem"] == {"payload": {"protocol": "ip", "field": "saddr"}}
    assert upd["set"] == rules[0][0]["match"]["right"]  # the set the lookup reads is the one this endpoint fills


def test_nodeport_cluster_policy_masquerades():
    rs = ruleset(pod("a1") + pod("b1", node="node-b", ip="10.244.2.2") +
                 svc(spec="type: NodePort\n  clusterIP: 10.96.0.10", ports="[{name: http, port: 80, targetPort: http, nodePort: 30080}]"))
    ext = named(rs, "external-", "default/web/tcp/http")
    sc = named(rs, "service-", "default/web/tcp/http")
    assert elements(rs, "service-nodeports") == {("tcp", 30080): ("goto", ext)}
    assert chains(rs)[ext] == [[{"jump": {"target": "mark-for-masquerade"}}], [{"goto": {"target": sc}}]]
    assert len(vmap_targets(chains(rs)[sc][0])) == 2     # both nodes' pods
    assert rs.base.sets["nodeport-ips"].elements == frozenset({"10.77.0.11"})
    assert rs.base.sets["nodeport-ips-v6"].elements == frozenset({"fd77::11"})


def test_local_external_policy_keeps_the_client_address():
    spec = "type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local"
    ports = "[{name: http, port: 80, targetPort: http, nodePort: 30080}]"
    rs = ruleset(pod("a1") + pod("b1", node="node-b", ip="10.244.2.2") + svc(spec=spec, ports=ports))
    ext = named(rs, "external-", "default/web/tcp/http")
    local = named(rs, "local-", "default/web/tcp/http")
    rules = chains(rs)[ext]
    fib = {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["saddr"]}}, "right": "local"}}
    assert rules[0] == [fib, {"jump": {"target": "mark-for-masquerade"}}]   # only this host's own traffic
    assert rules[1][0] == fib and rules[2] == [{"goto": {"target": local}}]
    assert [e.rsplit("__", 1)[1] for e in vmap_targets(chains(rs)[local][0])] == ["10.244.1.2/8080"]   # node-a's only
    assert elements(rs, "no-endpoint-nodeports") == {}
    # on node-b the same service's local pod is b1; with none local the NodePort is refused
    rs_b = ruleset(pod("a1") + svc(spec=spec, ports=ports), node="node-b")
    assert elements(rs_b, "no-endpoint-nodeports") == {("tcp", 30080): ("goto", "reject-chain")}
    ext_b = named(rs_b, "external-", "default/web/tcp/http")
    assert elements(rs_b, "service-nodeports") == {("tcp", 30080): ("goto", ext_b)}   # own traffic still served
    assert not any(n.startswith("local-") for n in chains(rs_b))
    assert elements(rs_b, "service-ips")[("10.96.0.10", "tcp", 80)][1].startswith("service-")   # ClusterIP: Cluster


def test_internal_local_policy_without_local_endpoint_is_refused():
    rs = ruleset(pod("b1", node="node-b", ip="10.244.2.2") + svc(spec="clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local"))
    assert elements(rs, "no-endpoint-services") == {("10.96.0.10", "tcp", 80): ("goto", "reject-chain")}
    assert elements(rs, "service-ips") == {}


def test_external_and_load_balancer_ips_go_to_the_external_chain():
    text_ = pod("a1") + svc(spec="type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalIPs: [192.0.2.7]",
                            ports="[{name: http, port: 80, targetPort: http, nodePort: 30080}]")
    text_ += "status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}\n"
    rs = ruleset(text_)
    ext = named(rs, "external-", "default/web/tcp/http")
    ips = elements(rs, "service-ips")
    assert ips[("192.0.2.7", "tcp", 80)] == ("goto", ext) and ips[("198.51.100.9", "tcp", 80)] == ("goto", ext)
    assert ips[("10.96.0.10", "tcp", 80)][1].startswith("service-")


def test_udp_ports_use_udp_everywhere():
    rs = ruleset(pod("a1") + svc(ports="[{name: dns, port: 53, targetPort: dns, protocol: UDP}]"))
    sc = named(rs, "service-", "default/web/udp/dns")
    assert elements(rs, "service-ips") == {("10.96.0.10", "udp", 53): ("goto", sc)}
    ep = chains(rs)[vmap_targets(chains(rs)[sc][0])[0]]
    assert ep[-1] == [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
                      {"dnat": {"family": "ip", "addr": "10.244.1.2", "port": 53}}]


def test_sctp_is_a_problem_not_a_rule():
    c, snap = snapshot(pod("a1") + svc(ports="[{name: s, port: 99, protocol: SCTP}]"))
    assert any("spec.ports[0].protocol: SCTP is not supported" in p for p in snap.problems), snap.problems
    assert N.build_ruleset(snap).parts == {}


def test_dual_stack_service_has_rules_in_both_families():
    rs = ruleset(pod("a1", ip6="fd44:1::2") +
                 svc(spec="clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd96::10']\n  ipFamilyPolicy: RequireDualStack"))
    sc4 = named(rs, "service-", "default/web/tcp/http")
    sc6 = named(rs, "service-", "default/web/tcp6/http")
    assert elements(rs, "service-ips") == {("10.96.0.10", "tcp", 80): ("goto", sc4)}
    assert elements(rs, "service-ips-v6") == {("fd96::10", "tcp", 80): ("goto", sc6)}
    ep6 = chains(rs)[vmap_targets(chains(rs)[sc6][0])[0]]
    assert ep6[-1][-1] == {"dnat": {"family": "ip6", "addr": "fd44:1::2", "port": 8080}}
    assert ":" not in ep6[0][0]["match"]["right"] or ep6[0][0]["match"]["left"]["payload"]["protocol"] == "ip6"
    assert all(":" not in n for n in chains(rs))       # colons of IPv6 addresses never reach a name


def test_allocated_dual_stack_service_and_pods_without_an_ipv6_address():
    rs = ruleset(pod("a1") + svc(spec="ipFamilyPolicy: PreferDualStack"))
    v4 = elements(rs, "service-ips")
    v6 = elements(rs, "no-endpoint-services-v6")
    assert len(v4) == 1 and next(iter(v4))[0].startswith("10.96.")
    (key,) = v6                                         # an IPv6 ClusterIP, but no pod has an IPv6 address
    assert key[0].startswith("fd96::") and v6[key] == ("goto", "reject-chain")


def test_loopback_node_addresses_accept_no_nodeports():
    c, snap = snapshot(pod("a1") + svc(spec="type: NodePort"), node="solo")   # no Node object: 127.0.0.1
    rs = N.build_ruleset(snap)
    assert rs.base.sets["nodeport-ips"].elements == frozenset()


def test_names_are_identities():
    rs = ruleset(pod("a1") + svc() + svc("web2", spec="clusterIP: 10.96.0.11"))
    names = [n for n in chains(rs) if "/" in n]
    assert len(names) == len(set(names)) and all(len(n) < 256 for n in names)
    again = ruleset(pod("a1") + svc() + svc("web2", spec="clusterIP: 10.96.0.11"))
    assert sorted(chains(again)) == sorted(chains(rs))  # same input, same names (a restart agrees)
    long = ruleset(pod("a1") + svc("x" * 63, spec="clusterIP: 10.96.0.12", ports="[{name: " + "p" * 15 + ", port: 80, targetPort: 8080}]"))
    assert all(len(n) < 256 for n in chains(long))


# -- the diff ------------------------------------------------------------------------------------


BASE3 = pod("a1") + pod("a2", ip="10.244.1.3") + svc() + svc("other", spec="clusterIP: 10.96.0.20", selector="{app: other}") + \
    pod("o1", ip="10.244.1.9", labels="app: other")


def _names_in(cmds: list[dict]) -> set[str]:
    out = set()
    for c in cmds:
        for obj in c.values():
            for body in obj.values():
                if "name" in body:
                    out.add(body["name"])
                if "chain" in body:
                    out.add(body["chain"])
    return out


def test_same_snapshot_twice_is_no_change():
    rs = ruleset(BASE3)
    assert not N.diff("t", rs, rs)
    assert not N.diff("t", rs, ruleset(BASE3))          # equal content, other objects: still nothing


def test_first_sync_creates_before_referring():
    tx = N.diff("t", None, ruleset(BASE3))
    kinds = [(op, next(iter(obj)), next(iter(obj.values())).get("name", "")) for c in tx.commands for op, obj in c.items()]
    first_rule = next(i for i, k in enumerate(kinds) if k[:2] == ("add", "rule"))
    assert all(k[:2] != ("add", "chain") for k in kinds[first_rule:])       # every chain before any rule
    first_map_elem = next(i for i, k in enumerate(kinds) if k[:2] == ("add", "element") and not k[2].startswith("nodeport-ips"))
    assert all(k[:2] != ("add", "rule") for k in kinds[first_map_elem:])    # map elements after the chains they name
    assert tx.touched == {("default", "web"), ("default", "other")}


def test_one_endpoint_added_touches_only_its_service():
    before = ruleset(BASE3)
    after = ruleset(BASE3 + pod("a3", ip="10.244.1.4"))
    tx = N.diff("t", before, after)
    assert tx.touched == {("default", "web")}
    names = _names_in(tx.commands)
    assert all("default/other" not in n for n in names)
    sc = named(after, "service-", "default/web/tcp/http")
    new_ep = named(after, "endpoint-", "default/web/tcp/http__10.244.1.4/8080")
    ops = [(op, next(iter(obj)), next(iter(obj.values())).get("name") or next(iter(obj.values())).get("chain"))
           for c in tx.commands for op, obj in c.items()]
    assert ("add", "chain", new_ep) in ops and ("flush", "chain", sc) in ops
    # the other endpoints' chains are untouched, no map element changes
    assert not any(n.endswith("10.244.1.2/8080") for n in names)
    assert not any(k == "element" for _, k, _ in ops)
    assert tx.stale_chains == []


def test_endpoint_removed_flushes_its_chain_for_later_deletion():
    before = ruleset(BASE3 + pod("a3", ip="10.244.1.4"))
    after = ruleset(BASE3)
    tx = N.diff("t", before, after)
    gone = named(before, "endpoint-", "default/web/tcp/http__10.244.1.4/8080")
    assert tx.stale_chains == [gone]
    assert {"flush": {"chain": {"family": "inet", "table": "t", "name": gone}}} in tx.commands
    assert not any("delete" in c and "chain" in c["delete"] for c in tx.commands)   # deleted later, not now
    # taken back into use before its deletion: filled again, not created twice
    tx2 = N.diff("t", after, before, pending_delete=[gone])
    assert {"flush": {"chain": {"family": "inet", "table": "t", "name": gone}}} in tx2.commands


def test_last_endpoint_leaving_moves_the_address_to_reject():
    before = ruleset(BASE3)
    after = ruleset(BASE3.replace("labels: {app: other}", "labels: {app: gone}"))
    tx = N.diff("t", before, after)
    dels = [c for c in tx.commands if "delete" in c and "element" in c["delete"]]
    adds = [c for c in tx.commands if "add" in c and "element" in c["add"]]
    assert dels[0]["delete"]["element"]["name"] == "service-ips"
    assert adds[0]["add"]["element"]["name"] == "no-endpoint-services"
    assert tx.commands.index(dels[0]) < tx.commands.index(adds[0])
    assert len(tx.stale_chains) == 2                   # the service chain and its one endpoint chain


def test_service_deleted_removes_its_elements_and_chains():
    before = ruleset(BASE3)
    after = ruleset(pod("a1") + pod("a2", ip="10.244.1.3") + svc() + pod("o1", ip="10.244.1.9", labels="app: other"))
    tx = N.diff("t", before, after)
    assert tx.touched == {("default", "other")}
    assert {"delete": {"element": {"family": "inet", "table": "t", "name": "service-ips",
                                   "elem": [{"concat": ["10.96.0.20", "tcp", 80]}]}}} in tx.commands
    assert all("default/other" in n for n in tx.stale_chains) and len(tx.stale_chains) == 2


def test_address_moving_between_services_is_deleted_before_it_is_added():
    before = ruleset(BASE3)
    after = ruleset(pod("a1") + pod("a2", ip="10.244.1.3") + svc("web3", spec="clusterIP: 10.96.0.20") +
                    svc() + pod("o1", ip="10.244.1.9", labels="app: other"))
    tx = N.diff("t", before, after)
    key = {"concat": ["10.96.0.20", "tcp", 80]}
    d = next(i for i, c in enumerate(tx.commands) if "delete" in c and key in c["delete"].get("element", {}).get("elem", []))
    a = next(i for i, c in enumerate(tx.commands) if "add" in c and any(e[0] == key for e in c["add"].get("element", {}).get("elem", [])
                                                                      if isinstance(e, list)))
    assert d < a


def test_affinity_timeout_change_makes_new_sets():
    spec = "clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: %d}}"
    before = ruleset(pod("a1") + svc(spec=spec % 60))
    after = ruleset(pod("a1") + svc(spec=spec % 90))
    tx = N.diff("t", before, after)
    added = [c["add"]["set"] for c in tx.commands if "add" in c and "set" in c["add"]]
    deleted = [c["delete"]["set"]["name"] for c in tx.commands if "delete" in c and "set" in c["delete"]]
    assert len(added) == 1 and added[0]["timeout"] == 90 and len(deleted) == 1 and deleted[0] != added[0]["name"]
    assert tx.commands.index(next(c for c in tx.commands if "delete" in c and "set" in c["delete"])) == len(tx.commands) - 1


def test_builder_reuses_parts_of_unchanged_services():
    c, snap1 = snapshot(BASE3)
    b = N.RulesetBuilder()
    rs1 = b.build(snap1)
    r = load_text(pod("a3", ip="10.244.1.4"))
    c.apply_events([Event(ADDED, o) for o in r.objects])
    snap2 = c.rebuild()
    rs2 = b.build(snap2)
    assert rs2.parts[("default", "other")] is rs1.parts[("default", "other")]
    assert rs2.parts[("default", "web")] is not rs1.parts[("default", "web")]
    assert N.diff("t", N.build_ruleset(snap2), rs2).commands == []
    assert N.diff("t", rs1, rs2).touched == {("default", "web")}


def test_chunks_hold_whole_services_and_add_up_to_the_diff():
    text_ = "".join(pod(f"p{i}", ip=f"10.244.1.{i + 2}", labels=f"app: s{i}") + svc(f"s{i}", spec=f"clusterIP: 10.96.1.{i + 2}", selector=f"{{app: s{i}}}")
                    for i in range(12))
    rs = ruleset(text_)
    whole = N.diff("t", None, rs)
    chunks = N.diff_chunks("t", None, rs, limit=20)
    assert len(chunks) > 2
    assert sorted(map(text, whole.commands)) == sorted(text(c) for ch in chunks for c in ch.commands)
    seen: set = set()
    for ch in chunks:
        assert not (ch.touched & seen)                  # a service is in one chunk only
        seen |= ch.touched


# -- what the kernel holds ---------------------------------------------------------------------


def _listing(rs: N.Ruleset, table: str = "t") -> list[dict]:
    """What ``nft -j list table`` would show after applying ``rs`` to an empty table."""
    items: list[dict] = []
    parts = [rs.base, *rs.parts.values()]
    for p in parts:
        for name, (digest, rules) in p.chains.items():
            items.append({"chain": {"family": "inet", "table": table, "name": name}})
            for i, expr in enumerate(rules):
                r = {"family": "inet", "table": table, "chain": name, "expr": expr}
                if i == len(rules) - 1:
                    r["comment"] = N.DIGEST_PREFIX + digest
                items.append({"rule": r})
        for name, spec in p.sets.items():
            s = {"family": "inet", "table": table, "name": name, "type": spec.type}
            if spec.timeout:
                s["timeout"] = spec.timeout
            if spec.elements:
                s["elem"] = sorted(spec.elements)
            items.append({"set": s})
    maps: dict[str, list] = {}
    for p in parts:
        for m, els in p.elements.items():
            maps.setdefault(m, []).extend([{"concat": list(k)}, {"goto": {"target": v[1]}}] for k, v in els.items())
    for m, els in maps.items():
        items.append({"map": {"family": "inet", "table": table, "name": m, "type": "x", "map": "verdict",
                              **({"elem": els} if els else {})}})
    return items


def test_a_restart_diffs_against_the_kernel():
    before = ruleset(BASE3 + pod("a3", ip="10.244.1.4"))
    kernel, empty = N.ruleset_from_listing(_listing(before))
    assert empty == set()
    assert not N.diff("t", N.adopt(kernel, before), before)           # nothing changed: nothing sent
    after = ruleset(BASE3)                                           # an endpoint left while no process ran
    tx = N.diff("t", N.adopt(kernel, after), after)
    gone = named(before, "endpoint-", "default/web/tcp/http__10.244.1.4/8080")
    assert tx.stale_chains == [gone]
    assert _names_in(tx.commands) == {gone, named(after, "service-", "default/web/tcp/http")}


def test_a_restart_removes_what_nothing_wants():
    before = ruleset(BASE3)
    listing = _listing(before) + [{"chain": {"family": "inet", "table": "t", "name": "leftover"}}]
    kernel, empty = N.ruleset_from_listing(listing)
    assert empty == {"leftover"}
    after = ruleset(pod("a1") + pod("a2", ip="10.244.1.3") + svc())
    tx = N.diff("t", N.adopt(kernel, after), after, empty)
    assert "leftover" in tx.stale_chains and any("default/other" in n for n in tx.stale_chains)
    assert {"delete": {"element": {"family": "inet", "table": "t", "name": "service-ips",
                                   "elem": [{"concat": ["10.96.0.20", "tcp", 80]}]}}} in tx.commands


def test_rules_without_our_digest_are_rewritten():
    before = ruleset(BASE3)
    listing = _listing(before)
    for item in listing:
        if "rule" in item and item["rule"]["chain"] == "services":
            item["rule"].pop("comment", None)
    kernel, _ = N.ruleset_from_listing(listing)
    tx = N.diff("t", N.adopt(kernel, before), before)
    assert {"flush": {"chain": {"family": "inet", "table": "t", "name": "services"}}} in tx.commands
    assert _names_in(tx.commands) == {"services"}


@pytest.mark.parametrize("listed,key", [
    ({"concat": ["10.96.0.10", "tcp", 80]}, ("10.96.0.10", "tcp", 80)),
    ({"concat": ["fd96:0:0::10", "udp", 53]}, ("fd96::10", "udp", 53)),   # addresses compared in canonical form
    ({"concat": ["tcp", 30080]}, ("tcp", 30080)),
])
def test_listed_element_keys(listed, key):
    kernel, _ = N.ruleset_from_listing([{"map": {"name": "m", "elem": [[listed, {"goto": {"target": "c"}}]]}}])
    assert kernel.base.elements["m"] == {key: ("goto", "c")}


def test_incremental_builder_follows_the_snapshots_changes():
    """Fed each snapshot's ``changed`` set, the builder gives what a full build gives."""
    c, snap = snapshot(BASE3 + svc("np", spec="type: NodePort\n  clusterIP: 10.96.0.30", selector="{app: web}"))
    b = N.RulesetBuilder()
    b.build(snap)
    steps = [
        [Event(ADDED, o) for o in load_text(pod("a3", ip="10.244.1.4")).objects],
        [Event("MODIFIED", o) for o in load_text(pod("a1", ready=False)).objects],
        [Event("DELETED", o) for o in load_text(svc("other", spec="clusterIP: 10.96.0.20", selector="{app: other}")).objects],
        [Event(ADDED, o) for o in load_text(svc("late", spec="clusterIP: 10.96.0.40")).objects],
    ]
    published = []
    c._publish = published.append
    prev = b.build(snap)
    for events in steps:
        published.clear()
        c.apply_events(events)
        c.rebuild()
        assert all(s.changed is not None for s in published)    # incremental snapshot builds
        snap = published[-1]
        inc = b.build(snap, frozenset().union(*(s.changed for s in published)))
        full = N.build_ruleset(snap)
        assert set(inc.parts) == set(full.parts)
        assert not N.diff("t", full, inc) and not N.diff("t", inc, full)
        # the builder's hint (only the changed services) gives the same diff as a full compare
        assert inc.prev is prev and inc.changed is not None
        assert N.diff("t", prev, inc).commands == N.diff("t", N.Ruleset(prev.base, prev.parts),
                                                          N.Ruleset(inc.base, inc.parts)).commands
        prev = inc
    for key in snap.services:
        assert N.listeners_of(snap, key) == N.listeners_by_service(snap).get(key, {})


def test_kernel_mode_reports_what_it_cannot_translate():
    r = load_text(pod("a1") + svc(spec="type: NodePort\n  clusterIP: 127.96.0.10"))
    c = Controller(Settings(paths=["x"], health_checks=False, proxy_mode="nftables"), lambda s: None)
    c.apply_events([Event(ADDED, o) for o in r.objects if o.kind != "Node"])
    snap = c.rebuild()
    assert any("--service-cidr 127.96.0.0/16 is a loopback range" in p for p in snap.problems), snap.problems
    assert any("node address 127.0.0.1 is loopback" in p for p in snap.problems), snap.problems
    _, snap = snapshot(pod("a1") + svc())                 # userspace (the default): nothing to say
    assert not any("loopback" in p for p in snap.problems)


def test_gateway_listeners_are_left_to_user_space():
    """A Gateway TCP / TLS listener picks its route per connection (SNI): not a Service rule."""
    import dataclasses
    from types import MappingProxyType

    from meshproxy.core.snapshot import L4Listener
    _, snap = snapshot(pod("a1") + svc())
    gw = L4Listener("10.77.0.50", 443, ("default", "web", "http"), "gateway", False, routes=object())
    snap = dataclasses.replace(snap, l4=MappingProxyType({**snap.l4, ("10.77.0.50", 443): gw}))
    rs = N.build_ruleset(snap)
    assert set(elements(rs, "service-ips")) == {("10.96.0.10", "tcp", 80)}
    assert N.listeners_of(snap, ("default", "web")) == N.listeners_by_service(snap)[("default", "web")]
    assert all(lst.routes is None for ls in N.listeners_of(snap, ("default", "web")).values() for lst in ls)
