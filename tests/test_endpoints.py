"""Endpoint computation, the incremental index, allocation, and snapshot building."""

import textwrap

import pytest

from discovery.endpoints import compute_endpoint_sets
from discovery.manifests import load_text
from discovery.store import ADDED, DELETED, MODIFIED, Allocator, EndpointIndex, Event, Store
from meshproxy.core.settings import Settings
from meshproxy.core.snapshot import SnapshotBuilder


def objs(text: str):
    r = load_text(textwrap.dedent(text), "t.yaml")
    assert not r.errors, [str(e) for e in r.errors]
    return r.objects


def pod(name, ip, labels="{app: web}", ns="default", ready="True", ports="[{name: http, containerPort: 8080}]",
        extra_meta="", node=None, probe=""):
    return textwrap.dedent(f"""\
        apiVersion: v1
        kind: Pod
        metadata: {{name: {name}, namespace: {ns}, labels: {labels}{extra_meta}}}
        spec:
          {f'nodeName: {node}' if node else ''}
          containers: [{{name: c, ports: {ports}{probe}}}]
        status: {{podIP: {ip}, conditions: [{{type: Ready, status: "{ready}"}}]}}
        ---
        """)


SVC = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 127.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: raw, port: 81, targetPort: 9000}]
"""


class Cluster:
    """Store + index + builder, the way the controller drives them."""

    def __init__(self, text: str = "", settings: Settings | None = None):
        self.store = Store()
        self.index = EndpointIndex(self.store)
        self.allocator = Allocator()
        self.builder = SnapshotBuilder(settings or Settings())
        if text:
            self.add(text)

    def events(self, evs):
        changes = self.store.apply(evs)
        self.index.on_changes(changes)
        return self.index.recompute()

    def add(self, text):
        return self.events([Event(ADDED, o) for o in objs(text)])

    def modify(self, text):
        return self.events([Event(MODIFIED, o) for o in objs(text)])

    def delete(self, text):
        return self.events([Event(DELETED, o) for o in objs(text)])

    def eps(self, svc="web", ns="default", port=0):
        return [(e.ip, e.port, e.ready, e.serving, e.terminating) for e in self.index.sets[(ns, svc)][port].endpoints]

    def usable(self, svc="web", ns="default", port=0):
        return [e.ip for e in self.index.sets[(ns, svc)][port].usable]

    def snapshot(self):
        return self.builder.build(self.store, self.index, self.allocator)


def test_named_target_port_resolved_per_pod():
    c = Cluster(pod("a", "127.0.10.1") + pod("b", "127.0.10.2", ports="[{name: http, containerPort: 9090}]")
                + pod("c", "127.0.10.3", ports="[{name: other, containerPort: 7070}]") + SVC)
    assert c.eps(port=0) == [("127.0.10.1", 8080, True, True, False), ("127.0.10.2", 9090, True, True, False)]
    # numeric targetPort applies to every pod, named or not
    assert [e[:2] for e in c.eps(port=1)] == [("127.0.10.1", 9000), ("127.0.10.2", 9000), ("127.0.10.3", 9000)]


def test_target_port_defaults_to_port():
    c = Cluster(pod("a", "127.0.10.1") + textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec: {selector: {app: web}, ports: [{port: 8081}]}
        """))
    assert c.eps()[0][:2] == ("127.0.10.1", 8081)


def test_only_ready_pods_are_usable_and_namespace_is_respected():
    c = Cluster(pod("a", "127.0.10.1") + pod("b", "127.0.10.2", ready="False")
                + pod("other-ns", "127.0.10.3", ns="shop") + pod("nolabel", "127.0.10.4", labels="{app: api}") + SVC)
    assert c.eps() == [("127.0.10.1", 8080, True, True, False), ("127.0.10.2", 8080, False, False, False)]
    assert c.usable() == ["127.0.10.1"]


def test_terminating_fallback_kep_1669():
    term = ", deletionTimestamp: '2024-01-01T00:00:00Z'"
    c = Cluster(pod("a", "127.0.10.1", extra_meta=term) + pod("b", "127.0.10.2", extra_meta=term, ready="False") + SVC)
    # terminating pods are never ready; the serving one is used because no pod is ready
    assert c.eps() == [("127.0.10.1", 8080, False, True, True), ("127.0.10.2", 8080, False, False, True)]
    assert c.usable() == ["127.0.10.1"]
    c.add(pod("c", "127.0.10.3"))
    assert c.usable() == ["127.0.10.3"]   # a ready pod exists again: terminating ones get nothing new


def test_publish_not_ready_addresses():
    c = Cluster(pod("a", "127.0.10.1", ready="False") + pod("b", "127.0.10.2")
                + SVC.replace("clusterIP: 127.96.0.10", "clusterIP: 127.96.0.10\n  publishNotReadyAddresses: true"))
    assert sorted(c.usable()) == ["127.0.10.1", "127.0.10.2"]
    # As the EndpointSlice controller writes them: ready forced, serving = the pod's readiness.
    assert sorted(c.eps()) == [("127.0.10.1", 8080, True, False, False), ("127.0.10.2", 8080, True, True, False)]


def test_pods_without_ip_or_finished_are_left_out():
    c = Cluster(pod("a", "127.0.10.1") + SVC + "---\n" + textwrap.dedent("""\
        apiVersion: v1
        kind: Pod
        metadata: {name: pending, labels: {app: web}}
        spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: done, labels: {app: web}}
        spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
        status: {podIP: 127.0.10.9, phase: Succeeded, conditions: [{type: Ready, status: "True"}]}
        """))
    assert c.usable() == ["127.0.10.1"]


def test_probe_results_override_ready_condition():
    probe = ", readinessProbe: {tcpSocket: {port: http}}"
    c = Cluster()
    c.index.probe_results = {}
    c.add(pod("a", "127.0.10.1", probe=probe, ready="False") + pod("b", "127.0.10.2", ready="False")
          + pod("c", "127.0.10.3", probe=probe) + SVC)
    # No probe result yet: the Ready condition stands in (a is not ready, c is).
    assert c.usable() == ["127.0.10.3"]
    c.index.probe_results[("default", "a")] = True
    c.index.probe_results[("default", "c")] = False
    c.index.pod_readiness_changed("default", "a")
    c.index.pod_readiness_changed("default", "c")
    assert c.index.recompute() == {("default", "web")}
    assert c.usable() == ["127.0.10.1"]   # the probe results decide from now on


def test_services_without_selector_use_endpointslices_then_endpoints():
    text = textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: ext}
        spec: {ports: [{name: http, port: 80}]}
        ---
        apiVersion: v1
        kind: Endpoints
        metadata: {name: ext}
        subsets: [{addresses: [{ip: 127.0.30.1}], ports: [{name: http, port: 7000}]}]
        """)
    c = Cluster(text)
    assert c.eps("ext") == [("127.0.30.1", 7000, True, True, False)]
    c.add(textwrap.dedent("""\
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {name: ext-abc, labels: {kubernetes.io/service-name: ext}}
        addressType: IPv4
        ports: [{name: http, port: 7001}, {name: other, port: 1}]
        endpoints:
        - {addresses: [127.0.31.1], nodeName: n1}
        - {addresses: [127.0.31.2], conditions: {ready: false}}
        - {addresses: [127.0.31.3], conditions: {ready: false, serving: true, terminating: true}}
        """))
    # slices are authoritative once present; nil conditions follow the API's rules
    assert c.eps("ext") == [("127.0.31.1", 7001, True, True, False), ("127.0.31.2", 7001, False, True, False),
                            ("127.0.31.3", 7001, False, True, True)]
    assert c.index.sets[("default", "ext")][0].endpoints[0].node == "n1"


def test_one_pod_change_recomputes_only_services_selecting_it():
    text = SVC + "---\n" + SVC.replace("name: web,", "name: api,").replace("app: web", "app: api").replace("127.96.0.10", "127.96.0.11")
    c = Cluster(text + "---\n" + pod("w", "127.0.10.1") + pod("a", "127.0.10.2", labels="{app: api}"))
    calls = []
    import discovery.store as store_mod
    real = store_mod.compute_endpoint_sets

    def spy(svc, *a, **kw):
        calls.append(svc.name)
        return real(svc, *a, **kw)
    store_mod.compute_endpoint_sets = spy
    try:
        changed = c.modify(pod("w", "127.0.10.1", ready="False"))
    finally:
        store_mod.compute_endpoint_sets = real
    assert calls == ["web"] and changed == {("default", "web")}
    # relabelling moves a pod between services: both are recomputed, nothing else
    changed = c.modify(pod("w", "127.0.10.1", labels="{app: api}"))
    assert changed == {("default", "web"), ("default", "api")}
    assert c.usable("api") == ["127.0.10.1", "127.0.10.2"] and c.usable("web") == []


def test_selector_change_rebuilds_membership():
    c = Cluster(SVC + "---\n" + pod("blue", "127.0.10.1", labels="{app: web, version: blue}")
                + pod("green", "127.0.10.2", labels="{app: web, version: green}"))
    c.modify(SVC.replace("selector: {app: web}", "selector: {app: web, version: blue}"))
    assert c.usable() == ["127.0.10.1"]
    c.modify(SVC.replace("selector: {app: web}", "selector: {app: web, version: green}"))
    assert c.usable() == ["127.0.10.2"]
    c.delete(SVC)
    assert ("default", "web") not in c.index.sets


def test_allocation_is_deterministic_and_avoids_taken_addresses():
    def svc(name, extra=""):
        return f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{type: NodePort, ports: [{{port: 80}}]{extra}}}\n---\n"
    text = "".join(svc(f"s{i}") for i in range(50)) + svc("fixed", ", clusterIP: 127.96.0.1")
    snap1 = Cluster(text).snapshot()
    snap2 = Cluster(text).snapshot()
    assert dict(snap1.allocated) == dict(snap2.allocated)
    ips = [v for k, v in snap1.allocated.items() if ":" not in k]
    ports = [v for k, v in snap1.allocated.items() if ":" in k]
    assert len(set(ips)) == 50 and "127.96.0.1" not in ips
    assert len(set(ports)) == 51 and all(30000 <= p <= 32767 for p in ports)
    # every allocated address gets a listener
    assert ("127.96.0.1", 80) in snap1.l4
    assert all((ip, 80) in snap1.l4 for ip in ips)


def test_snapshot_listeners_and_traffic_policies():
    text = textwrap.dedent("""\
        apiVersion: v1
        kind: Node
        metadata: {name: node-a}
        status: {addresses: [{type: InternalIP, address: 127.0.1.1}]}
        ---
        apiVersion: v1
        kind: Node
        metadata: {name: node-b}
        status: {addresses: [{type: InternalIP, address: 127.0.1.2}]}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec:
          type: LoadBalancer
          clusterIP: 127.96.0.10
          externalTrafficPolicy: Local
          externalIPs: [127.0.2.1]
          selector: {app: web}
          ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: db}
        spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
        ---
        """) + pod("a", "127.0.10.1", node="node-a") + pod("b", "127.0.10.2", node="node-b")
    snap = Cluster(text, Settings(node="node-a")).snapshot()
    assert snap.node.address == "127.0.1.1"
    l4 = {k: (v.scope, v.local_only) for k, v in snap.l4.items()}
    assert l4 == {("127.96.0.10", 80): ("cluster", False), ("127.0.1.1", 30080): ("node", True),
                  ("127.0.2.1", 80): ("external", True)}     # headless db: no listener
    b = snap.backends[("default", "web", "http")]
    assert [e.ip for e in b.usable] == ["127.0.10.1", "127.0.10.2"]
    assert [e.ip for e in b.local] == ["127.0.10.1"]
    snap_b = Cluster(text, Settings(node="node-b")).snapshot()
    assert ("127.0.1.2", 30080) in snap_b.l4
    assert [e.ip for e in snap_b.backends[("default", "web", "http")].local] == ["127.0.10.2"]


def test_snapshot_structural_sharing():
    c = Cluster(SVC + "---\n" + SVC.replace("name: web,", "name: api,").replace("app: web", "app: api")
                .replace("127.96.0.10", "127.96.0.11") + "---\n" + pod("w", "127.0.10.1") + pod("a", "127.0.10.2", labels="{app: api}"))
    s1 = c.snapshot()
    c.modify(pod("w", "127.0.10.1", ready="False"))
    s2 = c.snapshot()
    assert s2.version == s1.version + 1
    assert s2.backends[("default", "api", "http")] is s1.backends[("default", "api", "http")]
    assert s2.backends[("default", "web", "http")] is not s1.backends[("default", "web", "http")]
    assert s2.routes is s1.routes      # no Ingress-related change: the route table is reused
    with pytest.raises(TypeError):
        s2.backends[("x", "y", "z")] = None   # read-only


def test_ingress_class_selection():
    def ing(name, cls=""):
        spec_cls = f"ingressClassName: {cls}, " if cls else ""
        return textwrap.dedent(f"""\
            apiVersion: networking.k8s.io/v1
            kind: Ingress
            metadata: {{name: {name}}}
            spec: {{{spec_cls}rules: [{{host: {name}.example.com, http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}]}}}}]}}
            ---
            """)
    classes = textwrap.dedent("""\
        apiVersion: networking.k8s.io/v1
        kind: IngressClass
        metadata: {name: ours}
        spec: {controller: meshproxy.dev/ingress}
        ---
        apiVersion: networking.k8s.io/v1
        kind: IngressClass
        metadata: {name: nginx}
        spec: {controller: k8s.io/ingress-nginx}
        ---
        """)
    text = classes + ing("a", "ours") + ing("b", "nginx") + ing("c") + ing("d", "meshproxy") + ing("e", "unknown") + SVC
    assert Cluster(text).snapshot().ingresses == ("default/a", "default/c", "default/d")
    assert Cluster(text, Settings(watch_ingress_without_class=False)).snapshot().ingresses == ("default/a", "default/d")
    # a default class that is not ours claims class-less Ingresses
    text2 = text.replace("metadata: {name: nginx}", "metadata: {name: nginx, annotations: {ingressclass.kubernetes.io/is-default-class: 'true'}}")
    assert Cluster(text2).snapshot().ingresses == ("default/a", "default/d")


def test_broken_ingress_backend_affects_only_that_path():
    text = SVC + "---\n" + textwrap.dedent("""\
        apiVersion: networking.k8s.io/v1
        kind: Ingress
        metadata: {name: i}
        spec:
          rules:
          - http:
              paths:
              - {path: /ok, pathType: Prefix, backend: {service: {name: web, port: {name: http}}}}
              - {path: /missing, pathType: Prefix, backend: {service: {name: nope, port: {number: 80}}}}
              - {path: /badport, pathType: Prefix, backend: {service: {name: web, port: {name: grpc}}}}
        """)
    snap = Cluster(text).snapshot()
    ok = snap.routes.match("x", "/ok/1")
    assert ok.action.backends[0].key == ("default", "web", "http") and ok.action.backends[0].error is None
    assert snap.routes.match("x", "/missing").action.backends[0].error == "service default/nope not found"
    assert snap.routes.match("x", "/badport").action.backends[0].error == "service default/web has no TCP port 'grpc'"
    assert any("spec.rules[0].http.paths[1]" in p for p in snap.problems)


def test_compute_endpoint_sets_serves_tcp_and_udp_not_sctp():
    (svc,) = objs("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {selector: {a: b}, ports: [{name: dns, port: 53, protocol: UDP}, "
                  "{name: t, port: 53}, {name: s, port: 99, protocol: SCTP}]}\n")
    sets = compute_endpoint_sets(svc, [])
    assert [(s.port_name, s.protocol) for s in sets] == [("dns", "UDP"), ("t", "TCP")]


def test_incremental_builds_equal_full_builds():
    """The controller's patch-only-what-changed builds give exactly what a full build gives."""
    from meshproxy.controller import Controller
    import random
    rng = random.Random(7)

    def svc(i, port=80, extra=""):
        return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{type: NodePort, "
                f"selector: {{app: a{i % 4}}}, ports: [{{name: http, port: {port}, targetPort: 8080}}]{extra}}}\n---\n")
    snaps = []
    ctl = Controller(Settings(), snaps.append)
    ctl.apply_events([Event(ADDED, o) for o in objs("".join(svc(i) for i in range(6))
                                                     + "".join(pod(f"p{j}", f"127.0.10.{j + 1}", labels=f"{{app: a{j % 4}}}") for j in range(12)))])
    ctl.rebuild()
    for step in range(25):
        r = rng.random()
        j = rng.randrange(12)
        if r < 0.4:
            evs = [Event(MODIFIED, o) for o in objs(pod(f"p{j}", f"127.0.10.{j + 1}", labels=f"{{app: a{rng.randrange(4)}}}",
                                                      ready=rng.choice(["True", "False"])))]
        elif r < 0.6:
            evs = [Event(DELETED, o) for o in objs(pod(f"p{j}", f"127.0.10.{j + 1}"))]
        elif r < 0.8:
            i = rng.randrange(8)
            evs = [Event(ADDED, o) for o in objs(svc(i, port=rng.choice([80, 81])))]   # add or change
        else:
            evs = [Event(DELETED, o) for o in objs(svc(rng.randrange(8)))]
        ctl.apply_events(evs)
        inc = ctl.rebuild().to_json()
        full = Cluster()
        full.store, full.index = ctl.store, ctl.index
        full.builder.build(full.store, full.index, ctl.allocator)   # warm the allocation state alike
        ref = full.builder.build(full.store, full.index, ctl.allocator).to_json()
        for k in ("services", "endpoints", "backends", "listeners", "problems"):
            assert inc[k] == ref[k], (step, k)


def test_a_burst_of_changes_is_published_once():
    """Events that arrive within ``coalesce_delay`` of the first one become one snapshot, which
    holds all of them; a change after that publish makes the next one."""
    import asyncio

    from meshproxy.controller import Controller

    async def main():
        snaps = []
        ctl = Controller(Settings(coalesce_delay=0.1), snaps.append)
        ctl.apply_events([Event(ADDED, o) for o in objs(SVC)])
        for j in range(40):   # forty separate deliveries, as a watch would send them
            ctl.apply_events([Event(ADDED, o) for o in objs(pod(f"p{j}", f"127.0.10.{j + 1}"))])
        assert snaps == []    # nothing is built before the window closes
        await asyncio.sleep(0.4)
        assert len(snaps) == 1
        assert len(snaps[0].endpoint_sets[("default", "web")][0].usable) == 40
        ctl.apply_events([Event(DELETED, o) for o in objs(pod("p0", "127.0.10.1"))])
        await asyncio.sleep(0.4)
        assert len(snaps) == 2 and snaps[1].version > snaps[0].version
        assert len(snaps[1].endpoint_sets[("default", "web")][0].usable) == 39

    asyncio.run(main())


def test_big_batches_and_small_changes_apply_in_arrival_order_off_the_loop():
    """A big batch is applied a chunk per loop turn and built in the worker thread; a change
    that arrives meanwhile — from any source — waits and is applied after it, in order, so a
    newer version of an object in the batch wins; the published snapshot holds every change and
    the loop keeps turning throughout."""
    import asyncio

    from meshproxy.controller import APPLY_CHUNK, Controller

    n = 5 * APPLY_CHUNK          # enough for the build to go to the worker thread too
    batch = [Event(ADDED, o) for o in objs(SVC + "---\n" + "".join(
        pod(f"p{j}", f"127.10.{j // 250}.{j % 250 + 1}") for j in range(n)))]
    newer = [Event(MODIFIED, o) for o in objs(pod("p7", "127.10.0.8", ready="False"))]
    gone = [Event(DELETED, o) for o in objs(pod("p8", "127.10.0.9"))]

    async def main():
        snaps = []
        ctl = Controller(Settings(), snaps.append)
        turns = 0

        async def ticker():
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)
        tick = asyncio.get_running_loop().create_task(ticker())
        done = ctl.apply_events_later(batch, "kubernetes")
        assert done is not None and ctl.pending
        ctl.apply_events(newer, "kubernetes")          # queued behind the batch, not before it
        ctl.pod_readiness_changed("default", "p1")      # queued too
        assert ctl.store.get("Pod", "default", "p7") is None
        await done
        for _ in range(500):                            # the coalesced build starts off the loop
            if ctl.busy:
                break
            await asyncio.sleep(0.002)
        assert ctl.busy
        ctl.apply_events(gone, "kubernetes")            # waits for the build
        assert ctl.store.get("Pod", "default", "p8") is not None
        for _ in range(500):
            if not ctl.pending and snaps:
                break
            await asyncio.sleep(0.01)
        tick.cancel()
        assert not ctl.pending
        sets = snaps[-1].endpoint_sets[("default", "web")][0]
        ready = {e.pod for e in sets.endpoints if e.ready}
        assert len(sets.endpoints) == n - 1 and "p8" not in {e.pod for e in sets.endpoints}
        assert "p7" not in ready and len(ready) == n - 2
        assert turns > 3                                 # the loop ran while the batch went in
    asyncio.run(main())
