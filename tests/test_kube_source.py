"""The Kubernetes API source against a tiny fake API server, and its pure parts table-driven.

The fake (``FakeAPI``) speaks just enough of the API server's HTTP: paginated lists with a
resourceVersion and ``continue`` tokens, chunked watch streams from a global event history
(like etcd's), 410 ERROR events for resourceVersions older than the compacted history, bearer
token checks, 404 for group versions it does not serve, TLS. Tests drive it (add / change /
delete objects, bookmarks, compaction, dropped connections) and assert the events the source
emits. ``tests/data/kube/*.jsonl`` are watch streams recorded from kube-apiserver 1.20.2
(scripts/kube-apiserver.sh); they are replayed byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import ssl
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from discovery.sources import kubeconfig as kc
from discovery.sources.kubernetes import (
    RESOURCES,
    Backoff,
    KindState,
    KubernetesSource,
    Resource,
    WatchExpired,
    WatchFailed,
    collection_path,
)
from discovery.store import ADDED, DELETED, MODIFIED
from meshproxy.core import metrics
from meshproxy.observe import MetricSignals

DATA = Path(__file__).parent / "data" / "kube"
TOKEN = "s3cr3t-token"


# ============================================================================================
# The fake API server


def pod(name, ns="default", ip="127.0.10.1", labels=None, ready=True):
    return {"metadata": {"name": name, "namespace": ns, "labels": labels or {"app": "web"}},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def service(name, ns="default", ip="127.96.0.10"):
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


_PATH = re.compile(r"^(?P<gv>/api/v1|/apis/[^/]+/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[a-z]+)$")
_STATUS_PATH = re.compile(r"^(?P<gv>/api/v1|/apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[a-z]+)/(?P<name>[^/]+)/status$")


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out

KIND_OF = {"pods": "Pod", "services": "Service", "nodes": "Node", "endpoints": "Endpoints",
           "endpointslices": "EndpointSlice", "ingresses": "Ingress", "ingressclasses": "IngressClass",
           "secrets": "Secret", "namespaces": "Namespace", "gatewayclasses": "GatewayClass", "gateways": "Gateway",
           "httproutes": "HTTPRoute", "grpcroutes": "GRPCRoute", "tlsroutes": "TLSRoute", "tcproutes": "TCPRoute",
           "referencegrants": "ReferenceGrant", "faultinjections": "FaultInjection",
           "ingressnginxfilters": "IngressNginxFilter",
           "peerauthentications": "PeerAuthentication", "authorizationpolicies": "AuthorizationPolicy"}


class FakeAPI:
    """A global resourceVersion counter and history, collections by (group-version path, plural)."""

    def __init__(self, *, token: str | None = TOKEN, ssl_ctx: ssl.SSLContext | None = None,
                 serve: tuple[str, ...] = ("/api/v1", "/apis/discovery.k8s.io/v1", "/apis/networking.k8s.io/v1",
                                           "/apis/gateway.networking.k8s.io/v1", "/apis/meshproxy.dev/v1alpha1",
                                           "/apis/security.istio.io/v1")):
        self.token = token
        self.ssl_ctx = ssl_ctx
        self.serve = set(serve)
        self.rv = 100
        self.objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self.history: list[tuple[int, tuple[str, str], str, dict]] = []
        self.oldest = 0                      # watches / continues from an rv below this get 410
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.watchers: list[tuple[tuple[str, str], str | None, asyncio.Queue, asyncio.StreamWriter]] = []
        self.scripts: dict[tuple[str, str], list[list[bytes]]] = {}   # replayed watch bodies
        self.list_scripts: dict[tuple[str, str], dict] = {}
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.changed = asyncio.Event()
        # The status subresource: PATCH (merge patch, resourceVersion precondition) and GET.
        self.patches: list[tuple[str, str, dict]] = []    # (path, content type, body)
        self.patch_failures: list[int] = []               # answer the next PATCHes with these codes

    # -- control ---------------------------------------------------------------------------------

    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def put(self, coll: tuple[str, str], obj: dict, api_version: str = "v1") -> dict:
        obj = json.loads(json.dumps(obj))
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        bucket = self.objects.setdefault(coll, {})
        etype = MODIFIED if key in bucket else ADDED
        meta["resourceVersion"] = str(self._bump())
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta.setdefault("creationTimestamp", "2024-01-01T00:00:00Z")
        obj["apiVersion"], obj["kind"] = api_version, KIND_OF[coll[1]]
        bucket[key] = obj
        self._publish(coll, etype, obj)
        return obj

    def delete(self, coll: tuple[str, str], name: str, ns: str = "default") -> None:
        obj = self.objects[coll].pop((ns, name))
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self._bump())
        self._publish(coll, DELETED, obj)

    def _publish(self, coll, etype, obj) -> None:
        self.history.append((self.rv, coll, etype, obj))
        for wcoll, wns, q, _ in self.watchers:
            if wcoll == coll and (wns is None or obj["metadata"].get("namespace") == wns):
                q.put_nowait({"type": etype, "object": obj})

    def bookmark(self, coll) -> str:
        rv = str(self._bump())
        for wcoll, _, q, _ in self.watchers:
            if wcoll == coll:
                q.put_nowait({"type": "BOOKMARK", "object": {"kind": KIND_OF[coll[1]], "apiVersion": "v1",
                                                             "metadata": {"resourceVersion": rv}}})
        return rv

    def compact(self) -> None:
        """etcd compaction: every resourceVersion so far is too old to watch from."""
        self.oldest = self.rv

    def expire(self, coll) -> None:
        """Send an in-stream 410 to the open watches of ``coll`` (what a compaction does to them)."""
        self.compact()
        for wcoll, _, q, _ in self.watchers:
            if wcoll == coll:
                q.put_nowait({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "too old resource version: 1 (2)", "reason": "Expired", "code": 410}})

    def drop_watches(self) -> None:
        """Cut every open watch connection (RST), as a dying API server or a proxy would."""
        for _, _, _, w in list(self.watchers):
            w.transport.abort()

    def end_watches(self) -> None:
        """End open watches cleanly (what timeoutSeconds does)."""
        for _, _, q, _ in self.watchers:
            q.put_nowait(None)

    def watch_requests(self, plural: str) -> list[dict[str, list[str]]]:
        out = []
        for target, _ in self.requests:
            u = urlsplit(target)
            q = parse_qs(u.query)
            if u.path.endswith("/" + plural) and q.get("watch"):
                out.append(q)
        return out

    # -- serving ---------------------------------------------------------------------------------

    async def start(self) -> FakeAPI:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.drop_watches()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_ctx else 'http'}://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                self.requests.append((target, headers))
                self.changed.set()
                if _STATUS_PATH.match(urlsplit(target).path):
                    self._status_subresource(method, target, headers, body, writer)
                    continue
                keep = await self._respond(method, target, headers, reader, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def _send_json(self, writer, code: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        reason = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict", 410: "Gone",
                  415: "Unsupported Media Type", 500: "Internal Server Error"}[code]
        writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    @staticmethod
    def _status(code, reason, message):
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}

    def _status_subresource(self, method, target, headers, body, writer) -> None:
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            self._send_json(writer, 401, self._status(401, "Unauthorized", "Unauthorized"))
            return
        m = _STATUS_PATH.match(urlsplit(target).path)
        coll = (m["gv"], m["plural"])
        obj = self.objects.get(coll, {}).get((m["ns"], m["name"]))
        if obj is None:
            self._send_json(writer, 404, self._status(404, "NotFound", f"{m['plural']} {m['name']!r} not found"))
            return
        if method == "GET":
            self._send_json(writer, 200, obj)
            return
        if method != "PATCH":
            self._send_json(writer, 404, self._status(404, "NotFound", "the server could not find the requested resource"))
            return
        ctype = headers.get("content-type", "")
        patch = json.loads(body)
        self.patches.append((urlsplit(target).path, ctype, patch))
        if ctype != "application/merge-patch+json":
            self._send_json(writer, 415, self._status(415, "UnsupportedMediaType", ctype))
            return
        if self.patch_failures:
            code = self.patch_failures.pop(0)
            self._send_json(writer, code, self._status(code, "Injected", f"injected {code}"))
            return
        want_rv = (patch.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != obj["metadata"]["resourceVersion"]:
            self._send_json(writer, 409, self._status(
                409, "Conflict", "Operation cannot be fulfilled: the object has been modified; "
                                 "please apply your changes to the latest version and try again"))
            return
        new = json.loads(json.dumps(obj))
        new["status"] = merge_patch(new.get("status"), patch.get("status"))
        self._send_json(writer, 200, self.put(coll, new, obj["apiVersion"]))

    async def _respond(self, method, target, headers, reader, writer) -> bool:
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            self._send_json(writer, 401, self._status(401, "Unauthorized", "Unauthorized"))
            return True
        u = urlsplit(target)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        m = _PATH.match(u.path)
        if method != "GET" or m is None or m["gv"] not in self.serve:
            self._send_json(writer, 404, self._status(404, "NotFound", "the server could not find the requested resource"))
            return True
        coll = (m["gv"], m["plural"])
        ns = m["ns"]
        if q.get("watch") in ("1", "true"):
            await self._watch(coll, ns, q, reader, writer)
            return False
        if coll in self.list_scripts:
            self._send_json(writer, 200, self.list_scripts.pop(coll))
            return True
        items = [o for (ons, _), o in sorted(self.objects.get(coll, {}).items()) if ns is None or ons == ns]
        sel = q.get("fieldSelector")
        if sel:
            field, _, value = sel.partition("=")
            assert field == "type", sel
            items = [o for o in items if o.get("type") == value]
        start = 0
        if q.get("continue"):
            crv, _, off = q["continue"].partition(":")
            if int(crv) < self.oldest:
                self._send_json(writer, 410, self._status(410, "Expired", "The provided continue parameter is too old"))
                return True
            start = int(off)
        limit = int(q.get("limit") or 0) or len(items) or 1
        page = items[start:start + limit]
        meta = {"resourceVersion": str(self.rv)}
        if start + limit < len(items):
            meta["continue"] = f"{self.rv}:{start + limit}"
        stripped = []
        for o in page:
            o = dict(o)
            o.pop("apiVersion"), o.pop("kind")     # list items carry neither, like the real server
            stripped.append(o)
        kind = KIND_OF[coll[1]]
        self._send_json(writer, 200, {"kind": f"{kind}List", "apiVersion": m["gv"].removeprefix("/api/").removeprefix("/apis/"),
                                      "metadata": meta, "items": stripped})
        return True

    async def _watch(self, coll, ns, q, reader, writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")

        def chunk(data: bytes) -> None:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))

        scripts = self.scripts.get(coll)
        if scripts:
            for line in scripts.pop(0):
                chunk(line)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        rv = int(q.get("resourceVersion") or 0)
        if rv and rv < self.oldest:
            chunk(json.dumps({"type": "ERROR", "object": self._status(
                410, "Expired", f"too old resource version: {rv} ({self.oldest})")}).encode() + b"\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return
        qq: asyncio.Queue = asyncio.Queue()
        for erv, ecoll, etype, obj in self.history:
            if erv > rv and ecoll == coll and (ns is None or obj["metadata"].get("namespace") == ns):
                qq.put_nowait({"type": etype, "object": obj})
        entry = (coll, ns, qq, writer)
        self.watchers.append(entry)
        try:
            timeout = float(q.get("timeoutSeconds") or 3600)
            deadline = asyncio.get_running_loop().time() + timeout
            client_gone = asyncio.ensure_future(reader.read(1))    # the client closing its end
            try:
                while True:
                    getter = asyncio.ensure_future(qq.get())
                    remaining = max(0.0, deadline - asyncio.get_running_loop().time())
                    done, _ = await asyncio.wait({getter, client_gone}, timeout=remaining,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        if client_gone in done:
                            return
                        break                        # timeoutSeconds
                    ev = getter.result()
                    if ev is None:
                        break
                    chunk(json.dumps(ev).encode() + b"\n")
                    await writer.drain()
                    if ev["type"] == "ERROR":
                        break
            finally:
                client_gone.cancel()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self.watchers.remove(entry)


PODS = ("/api/v1", "pods")
SERVICES = ("/api/v1", "services")
SECRETS = ("/api/v1", "secrets")
SLICES_V1 = ("/apis/discovery.k8s.io/v1", "endpointslices")
SLICES_V1BETA1 = ("/apis/discovery.k8s.io/v1beta1", "endpointslices")
NODES = ("/api/v1", "nodes")

POD_ONLY = (Resource("Pod", ("v1",), "pods", True),)


class Recorder:
    def __init__(self):
        self.batches: list[list] = []
        self.changed = asyncio.Event()

    def __call__(self, events):
        self.batches.append(list(events))
        self.changed.set()

    @property
    def events(self):
        return [(e.type, e.obj.key[0], e.obj.key[2]) for b in self.batches for e in b]

    def take(self):
        out = self.events
        self.batches.clear()
        return out

    async def wait(self, pred, timeout=5.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while not pred():
            self.changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out; events so far: {self.events}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.05))


def config_for(api: FakeAPI, **kw) -> kc.KubeConfig:
    return kc.KubeConfig(server=api.url, token=TOKEN if api.token else None, origin="test", **kw)


@contextlib.asynccontextmanager
async def running(api: FakeAPI, resources=POD_ONLY, namespace=None, config=None, **kw):
    await api.start()
    rec = Recorder()
    src = KubernetesSource(config or config_for(api), rec, namespace, resources=resources,
                           backoff_base=0.02, backoff_cap=0.1, **kw)
    src.start()
    try:
        yield src, rec
    finally:
        await src.stop()
        await api.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def until(pred, timeout=5.0, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ============================================================================================
# KindState: the watch state machine without sockets


def _ev(etype, name, rv, **kw):
    obj = pod(name, **kw)
    obj["metadata"]["resourceVersion"] = str(rv)
    obj["apiVersion"], obj["kind"] = "v1", "Pod"
    return {"type": etype, "object": obj}


def _items(*pairs):
    out = []
    for name, rv in pairs:
        p = pod(name)
        p["metadata"]["resourceVersion"] = str(rv)
        out.append(p)
    return out


def _names(events):
    return [(e.type, e.obj.name) for e in events]


def test_kindstate_list_then_watch_events():
    ks = KindState("Pod")
    assert _names(ks.replace(_items(("a", 1), ("b", 2)), "10", "v1")) == [(ADDED, "a"), (ADDED, "b")]
    assert ks.resource_version == "10"
    assert _names(ks.apply(_ev(MODIFIED, "a", 11, ip="127.0.10.9"), "v1")) == [(MODIFIED, "a")]
    assert _names(ks.apply(_ev(ADDED, "c", 12), "v1")) == [(ADDED, "c")]
    assert _names(ks.apply(_ev(DELETED, "b", 13), "v1")) == [(DELETED, "b")]
    assert ks.resource_version == "13"
    assert sorted(n for _, n in ks.items) == ["a", "c"]


@pytest.mark.parametrize("case, events, expect", [
    # The same event seen twice (a re-watch from an older rv): applied once.
    ("repeat", [(ADDED, "c", 12), (ADDED, "c", 12)], [(ADDED, "c")]),
    # A MODIFIED for an object we never saw counts as ADDED (we joined late).
    ("late-modified", [(MODIFIED, "z", 12)], [(ADDED, "z")]),
    # Deleting what we do not have says nothing.
    ("delete-unknown", [(DELETED, "z", 12)], []),
    # A change that leaves our view equal but moves the rv still updates (new resourceVersion).
    ("rv-only", [(MODIFIED, "a", 12)], [(MODIFIED, "a")]),
])
def test_kindstate_watch_edge_cases(case, events, expect):
    ks = KindState("Pod")
    ks.replace(_items(("a", 1)), "10", "v1")
    out = []
    for etype, name, rv in events:
        out += ks.apply(_ev(etype, name, rv), "v1")
    assert _names(out) == expect, case


def test_kindstate_bookmark_moves_only_the_resource_version():
    ks = KindState("Pod")
    ks.replace(_items(("a", 1)), "10", "v1")
    before = dict(ks.items)
    assert ks.apply({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                                    "metadata": {"resourceVersion": "57"}}}, "v1") == []
    assert ks.resource_version == "57" and ks.items == before


def test_kindstate_error_events():
    ks = KindState("Pod")
    with pytest.raises(WatchExpired):
        ks.apply({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                              "message": "too old resource version: 5 (9)"}}, "v1")
    with pytest.raises(WatchFailed, match="504"):
        ks.apply({"type": "ERROR", "object": {"kind": "Status", "code": 504, "reason": "Timeout",
                                              "message": "Too large resource version"}}, "v1")


def test_kindstate_relist_diff():
    ks = KindState("Pod")
    ks.replace(_items(("a", 1), ("b", 2), ("c", 3)), "10", "v1")
    # While disconnected: b deleted, c changed, d added; a untouched.
    events = ks.replace(_items(("a", 1), ("c", 7), ("d", 8)), "20", "v1")
    assert sorted(_names(events)) == [(ADDED, "d"), (DELETED, "b"), (MODIFIED, "c")]
    # The same list again: nothing.
    assert ks.replace(_items(("a", 1), ("c", 7), ("d", 8)), "21", "v1") == []
    assert ks.resource_version == "21"


def test_kindstate_invalid_objects_are_skipped_and_logged_once(caplog):
    ks = KindState("Pod")
    bad = pod("bad")
    bad["metadata"]["resourceVersion"] = "5"
    bad["status"]["podIP"] = "not-an-ip"
    with caplog.at_level(logging.WARNING, "meshproxy.sources.kubernetes"):
        assert ks.replace([bad], "10", "v1") == []
        assert ks.replace([bad], "11", "v1") == []       # same version: no new log line
        ev = {"type": MODIFIED, "object": dict(bad, apiVersion="v1", kind="Pod")}
        assert ks.apply(ev, "v1") == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "Pod/default/bad (resourceVersion 5): status.podIP" in lines[0], lines
    assert ks.count() == (0, 1)
    # A valid object that turns invalid is removed from the store (the API no longer has the
    # version we applied), and comes back when fixed.
    ks.apply(_ev(ADDED, "x", 20), "v1")
    broken = _ev(MODIFIED, "x", 21)
    broken["object"]["status"]["podIP"] = "999.1.1.1"
    with caplog.at_level(logging.WARNING, "meshproxy.sources.kubernetes"):
        assert _names(ks.apply(broken, "v1")) == [(DELETED, "x")]
    assert _names(ks.apply(_ev(MODIFIED, "x", 22), "v1")) == [(ADDED, "x")]


def test_kindstate_cluster_scoped_keys_ignore_namespace():
    ks = KindState("Node")
    node = {"metadata": {"name": "n1", "resourceVersion": "3"},
            "status": {"addresses": [{"type": "InternalIP", "address": "127.0.1.1"}]}}
    [ev] = ks.replace([node], "5", "v1")
    assert ev.obj.key == ("Node", "", "n1")


def test_backoff_grows_with_jitter_and_caps():
    import random
    b = Backoff(0.5, 30.0, random.Random(1))
    delays = [b.next() for _ in range(12)]
    for i, d in enumerate(delays):
        nominal = min(30.0, 0.5 * 2 ** i)
        assert nominal / 2 <= d <= nominal
    assert max(delays) <= 30.0 and len(set(delays)) == len(delays)
    b.reset()
    assert b.next() <= 0.5


def test_collection_paths():
    res = {r.kind: r for r in RESOURCES}
    assert collection_path(res["Pod"], "v1", None) == "/api/v1/pods"
    assert collection_path(res["Pod"], "v1", "team-a") == "/api/v1/namespaces/team-a/pods"
    assert collection_path(res["Node"], "v1", "team-a") == "/api/v1/nodes"
    assert collection_path(res["IngressClass"], "networking.k8s.io/v1", "x") == "/apis/networking.k8s.io/v1/ingressclasses"
    assert collection_path(res["EndpointSlice"], "discovery.k8s.io/v1beta1", "x") == \
        "/apis/discovery.k8s.io/v1beta1/namespaces/x/endpointslices"


# ============================================================================================
# Against the fake server


def test_paginated_list_then_watch_add_change_delete():
    async def main():
        api = FakeAPI()
        for i in range(5):
            api.put(PODS, pod(f"p{i}", ip=f"127.0.10.{i + 1}"))
        async with running(api, page_size=2) as (src, rec):
            await asyncio.wait_for(src.synced.wait(), 5)
            assert sorted(rec.take()) == [(ADDED, "Pod", f"p{i}") for i in range(5)]
            lists = [t for t, _ in api.requests if "watch" not in t]
            assert len(lists) == 3 and "limit=2" in lists[0] and "continue=" in lists[1]
            await until(lambda: api.watchers, what="watch open")
            [w] = api.watch_requests("pods")
            assert w["resourceVersion"] == [str(api.rv)] and w["allowWatchBookmarks"] == ["true"]
            assert 300 <= int(w["timeoutSeconds"][0]) < 600
            api.put(PODS, pod("p9", ip="127.0.10.9"))
            api.put(PODS, pod("p0", ip="127.0.10.50"))
            api.delete(PODS, "p1")
            await rec.wait(lambda: len(rec.events) == 3)
            assert rec.take() == [(ADDED, "Pod", "p9"), (MODIFIED, "Pod", "p0"), (DELETED, "Pod", "p1")]
            st = src.state()
            assert st["synced"] and st["up"] and st["kinds"]["Pod"]["objects"] == 5
            assert st["kinds"]["Pod"]["phase"] == "watching"
            assert all(h.get("authorization") == f"Bearer {TOKEN}" for _, h in api.requests)
    run(main())


def test_dropped_connection_rewatches_from_last_version_without_duplicates():
    async def main():
        api = FakeAPI()
        api.put(PODS, pod("a"))
        async with running(api) as (src, rec):
            await src.synced.wait()
            await until(lambda: api.watchers, what="watch open")
            api.put(PODS, pod("b"))
            await rec.wait(lambda: len(rec.events) == 2)
            rv_after_b = api.rv
            rec.take()
            api.drop_watches()
            # Changes while the connection is down are in the server's history: the re-watch
            # from our last resourceVersion delivers them, once.
            api.put(PODS, pod("c"))
            api.delete(PODS, "a")
            await rec.wait(lambda: len(rec.events) == 2)
            await asyncio.sleep(0.1)
            assert rec.take() == [(ADDED, "Pod", "c"), (DELETED, "Pod", "a")]
            watches = api.watch_requests("pods")
            assert len(watches) == 2 and watches[1]["resourceVersion"] == [str(rv_after_b)]
            assert src.state()["kinds"]["Pod"]["relists"] == 0
    run(main())


def test_dropped_connection_with_compacted_history_relists_and_emits_deletions():
    async def main():
        api = FakeAPI()
        for n in "abc":
            api.put(PODS, pod(n))
        signals = MetricSignals()   # what the process passes: the relist reaches the metric
        async with running(api, signals=signals) as (src, rec):
            await src.synced.wait()
            await until(lambda: api.watchers, what="watch open")
            rec.take()
            before = metrics.REGISTRY.get_sample_value("meshproxy_source_relists_total", {"source": "kubernetes"}) or 0
            api.drop_watches()
            api.delete(PODS, "a")                 # deleted while disconnected
            api.put(PODS, pod("b", ip="127.0.10.7"))   # changed while disconnected
            api.put(PODS, pod("d"))               # added while disconnected
            api.compact()                         # ...and the history is gone: 410 on re-watch
            await rec.wait(lambda: len(rec.events) >= 3)
            await asyncio.sleep(0.1)
            assert sorted(rec.take()) == [(ADDED, "Pod", "d"), (DELETED, "Pod", "a"), (MODIFIED, "Pod", "b")]
            assert metrics.REGISTRY.get_sample_value("meshproxy_source_relists_total", {"source": "kubernetes"}) == before + 1
            st = src.state()["kinds"]["Pod"]
            assert st["relists"] == 1 and st["objects"] == 3
            # Later changes come through the new watch, once.
            await until(lambda: api.watchers, what="watch reopened")
            api.delete(PODS, "c")
            await rec.wait(lambda: rec.events)
            assert rec.take() == [(DELETED, "Pod", "c")]
    run(main())


def test_in_stream_410_relists():
    async def main():
        api = FakeAPI()
        api.put(PODS, pod("a"))
        api.put(PODS, pod("b"))
        async with running(api) as (src, rec):
            await src.synced.wait()
            await until(lambda: api.watchers, what="watch open")
            rec.take()
            # Delete without telling the watcher, then expire its watch: only a relist finds it.
            api.objects[PODS].pop(("default", "b"))
            api.expire(PODS)
            await rec.wait(lambda: rec.events)
            assert rec.take() == [(DELETED, "Pod", "b")]
            await until(lambda: src.state()["kinds"]["Pod"]["relists"] == 1, what="relist counted")
            lists = [t for t, _ in api.requests if "watch" not in t]
            assert len(lists) == 2
    run(main())


def test_bookmarks_move_the_watch_position():
    async def main():
        api = FakeAPI()
        api.put(PODS, pod("a"))
        async with running(api, resources=(Resource("Pod", ("v1",), "pods", True),
                                           Resource("Service", ("v1",), "services", True))) as (src, rec):
            await src.synced.wait()
            await until(lambda: len(api.watchers) == 2, what="watches open")
            api.put(SERVICES, service("web"))        # moves the global rv past the pods' list
            rv = api.bookmark(PODS)
            await until(lambda: src.state()["kinds"]["Pod"]["resourceVersion"] == rv, what="bookmark applied")
            assert [e for e in rec.take() if e[1] == "Pod"] == [(ADDED, "Pod", "a")]
            api.end_watches()                        # timeoutSeconds: re-watch, no relist
            await until(lambda: len(api.watch_requests("pods")) == 2, what="re-watch")
            assert api.watch_requests("pods")[1]["resourceVersion"] == [rv]
            assert src.state()["kinds"]["Pod"]["relists"] == 0
            assert [e for e in rec.take() if e[1] == "Pod"] == []
    run(main())


def test_endpointslices_fall_back_to_v1beta1():
    async def main():
        api = FakeAPI(serve=("/api/v1", "/apis/discovery.k8s.io/v1beta1"))
        api.put(SLICES_V1BETA1, {
            "metadata": {"name": "web-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.10.1"], "conditions": {"ready": True},
                                                   "topology": {"kubernetes.io/hostname": "n1"}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}, api_version="discovery.k8s.io/v1beta1")
        res = tuple(r for r in RESOURCES if r.kind == "EndpointSlice")
        async with running(api, resources=res) as (src, rec):
            await src.synced.wait()
            assert rec.take() == [(ADDED, "EndpointSlice", "web-abc")]
            st = src.state()["kinds"]["EndpointSlice"]
            assert st["apiVersion"] == "discovery.k8s.io/v1beta1" and st["objects"] == 1
            await until(lambda: api.watchers, what="watch open")
            watch_paths = [urlsplit(t).path for t, _ in api.requests if "watch=1" in t]
            assert watch_paths == ["/apis/discovery.k8s.io/v1beta1/endpointslices"]
    run(main())


def test_a_kind_the_server_does_not_serve_counts_as_synced(caplog):
    async def main():
        api = FakeAPI(serve=("/api/v1",))
        res = (Resource("Pod", ("v1",), "pods", True),
               Resource("IngressClass", ("networking.k8s.io/v1",), "ingressclasses", False))
        async with running(api, resources=res) as (src, _rec):
            await asyncio.wait_for(src.synced.wait(), 5)
            assert src.state()["kinds"]["IngressClass"]["phase"] == "unavailable"
            await until(lambda: src.state()["up"], what="up")
    with caplog.at_level(logging.WARNING, "meshproxy.sources.kubernetes"):
        run(main())
    assert any("IngressClass: not served" in r.getMessage() for r in caplog.records)


def test_wrong_token_is_retried_with_backoff_and_not_synced(caplog):
    async def main():
        api = FakeAPI()
        api.put(PODS, pod("a"))
        cfg = kc.KubeConfig(server="", token="wrong", origin="test")
        await api.start()
        cfg.server = api.url
        rec = Recorder()
        src = KubernetesSource(cfg, rec, resources=POD_ONLY, backoff_base=0.02, backoff_cap=0.05)
        src.start()
        await until(lambda: len(api.requests) >= 3, what="retries")
        assert not src.synced.is_set() and rec.events == []
        assert "401" in src.state()["kinds"]["Pod"]["lastError"]
        cfg.token = TOKEN                         # fixed (say, the token file was rotated)
        await asyncio.wait_for(src.synced.wait(), 5)
        assert rec.take() == [(ADDED, "Pod", "a")]
        await src.stop()
        await api.close()
    with caplog.at_level(logging.WARNING, "meshproxy.sources.kubernetes"):
        run(main())
    # One warning for a repeating error, not one per retry.
    assert len([r for r in caplog.records if "401" in r.getMessage()]) == 1


def test_namespace_restricts_namespaced_kinds_only():
    async def main():
        api = FakeAPI()
        api.put(PODS, pod("mine", ns="team-a"))
        api.put(PODS, pod("theirs", ns="team-b"))
        api.put(NODES, {"metadata": {"name": "n1"},
                        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.1.1"}]}})
        res = tuple(r for r in RESOURCES if r.kind in ("Pod", "Node"))
        async with running(api, resources=res, namespace="team-a") as (src, rec):
            await src.synced.wait()
            assert sorted(rec.take()) == [(ADDED, "Node", "n1"), (ADDED, "Pod", "mine")]
            paths = {urlsplit(t).path for t, _ in api.requests}
            assert paths == {"/api/v1/namespaces/team-a/pods", "/api/v1/nodes"}
    run(main())


def test_only_tls_secrets_are_requested():
    async def main():
        api = FakeAPI()
        crt = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
        api.put(SECRETS, {"metadata": {"name": "tls", "namespace": "default"}, "type": "kubernetes.io/tls",
                          "data": {"tls.crt": crt, "tls.key": crt}})
        api.put(SECRETS, {"metadata": {"name": "password", "namespace": "default"}, "type": "Opaque",
                          "data": {"pw": "aHVudGVyMg=="}})
        res = tuple(r for r in RESOURCES if r.kind == "Secret")
        async with running(api, resources=res) as (src, rec):
            await src.synced.wait()
            assert rec.take() == [(ADDED, "Secret", "tls")]
            await until(lambda: api.watchers, what="watch open")
            for target, _ in api.requests:
                assert parse_qs(urlsplit(target).query)["fieldSelector"] == ["type=kubernetes.io/tls"]
    run(main())


def test_invalid_objects_from_the_api_do_not_stop_the_watch(caplog):
    async def main():
        api = FakeAPI()
        bad = pod("bad")
        bad["spec"]["containers"][0]["ports"][0]["containerPort"] = 700000
        api.put(PODS, bad)
        api.put(PODS, pod("good"))
        async with running(api) as (src, rec):
            await src.synced.wait()
            assert rec.take() == [(ADDED, "Pod", "good")]
            await until(lambda: api.watchers, what="watch open")
            api.put(PODS, pod("later"))
            await rec.wait(lambda: rec.events)
            assert rec.take() == [(ADDED, "Pod", "later")]
            assert src.state()["kinds"]["Pod"]["invalid"] == 1
    with caplog.at_level(logging.WARNING, "meshproxy.sources.kubernetes"):
        run(main())
    assert len([r for r in caplog.records if "Pod/default/bad" in r.getMessage()]) == 1


def test_server_that_closes_watches_at_once_is_backed_off():
    async def main():
        api = FakeAPI()
        async with running(api) as (src, _rec):
            await src.synced.wait()
            # Every watch answers 200 and ends with no event: without a backoff this would spin.
            api.scripts[PODS] = [[] for _ in range(1000)]
            api.end_watches()
            await asyncio.sleep(0.5)
            n = len(api.watch_requests("pods"))
            assert 3 <= n < 40, n
    run(main())


def test_tls_with_ca_and_client_certificate_from_data(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("meshproxy-client")
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(sctx)
    ca.configure_trust(sctx)
    sctx.verify_mode = ssl.CERT_REQUIRED           # the server insists on a client certificate

    async def main():
        api = FakeAPI(token=None, ssl_ctx=sctx)
        api.put(PODS, pod("a"))
        await api.start()
        path = tmp_path / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}],
            "clusters": [{"name": "c", "cluster": {
                "server": api.url, "certificate-authority-data": base64.b64encode(ca.cert_pem.bytes()).decode()}}],
            "users": [{"name": "u", "user": {
                "client-certificate-data": base64.b64encode(client_cert.cert_chain_pems[0].bytes()).decode(),
                "client-key-data": base64.b64encode(client_cert.private_key_pem.bytes()).decode()}}],
        }))
        cfg = kc.load_kubeconfig(str(path))
        rec = Recorder()
        src = KubernetesSource(cfg, rec, resources=POD_ONLY)
        src.start()
        await asyncio.wait_for(src.synced.wait(), 5)
        assert rec.take() == [(ADDED, "Pod", "a")]
        await src.stop()
        await api.close()

        # A CA that did not sign the server's certificate: refused, retried, never synced.
        other = trustme.CA()
        await api.start()
        bad = kc.KubeConfig(server=api.url, ca_data=other.cert_pem.bytes(), origin="test",
                            client_cert_data=client_cert.cert_chain_pems[0].bytes(),
                            client_key_data=client_cert.private_key_pem.bytes())
        src = KubernetesSource(bad, rec, resources=POD_ONLY, backoff_base=0.02, backoff_cap=0.05)
        src.start()
        await until(lambda: "CERTIFICATE_VERIFY_FAILED" in (src.state()["kinds"]["Pod"]["lastError"] or ""),
                    what="verification failure")
        assert not src.synced.is_set()
        await src.stop()
        await api.close()
    run(main())


def test_stop_ends_every_connection():
    async def main():
        api = FakeAPI()
        async with running(api, resources=RESOURCES) as (src, _rec):
            await src.synced.wait()
            await until(lambda: len(api.watchers) == len(RESOURCES), what="all watches open")
            await src.stop()
            await until(lambda: not api.watchers, what="watches closed")
            assert src.state()["up"] is False
    run(main())


# --------------------------------------------------------------------------------------------
# Recorded streams (kube-apiserver 1.20.2, see tests/data/kube/README.md)


def _recorded(name):
    return [line.encode() + b"\n" for line in (DATA / name).read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not (DATA / "pods-watch.jsonl").exists(), reason="recorded stream missing")
def test_recorded_pod_stream_replays_to_the_right_events():
    """A real watch stream: a pod created, scheduled, given an IP and Ready, relabelled,
    deleted gracefully (deletionTimestamp, then DELETED), with a BOOKMARK between, then the
    410 the server sent after a compaction. Replayed byte for byte."""
    async def main():
        api = FakeAPI()
        api.list_scripts[PODS] = json.loads((DATA / "pods-list.json").read_text())
        api.scripts[PODS] = [_recorded("pods-watch.jsonl")]
        expect = json.loads((DATA / "pods-expected.json").read_text())
        async with running(api) as (src, rec):
            await src.synced.wait()
            await rec.wait(lambda: len(rec.events) >= len(expect["events"]))
            # After the 410 the source relists: the second list is the live (empty) one.
            await until(lambda: src.state()["kinds"]["Pod"]["relists"] == 1, what="relist after 410")
            events = [[e[0], e[2]] for e in rec.events]
            assert events[:len(expect["events"])] == expect["events"]
            assert events[len(expect["events"]):] == [[DELETED, n] for n in expect["deleted_by_relist"]]
            bookmarks = [json.loads(x)["object"]["metadata"]["resourceVersion"]
                         for x in _recorded("pods-watch.jsonl") if b'"BOOKMARK"' in x]
            assert bookmarks, "the recording has a bookmark"
            ready = [e.obj for b in rec.batches for e in b if e.type == MODIFIED and e.obj.ready_condition]
            assert ready and ready[0].pod_ip
    run(main())


# ============================================================================================
# kubeconfig and in-cluster config


def _write_kubeconfig(path, **overrides):
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "dev",
        "clusters": [
            {"name": "dev-cluster", "cluster": {"server": "https://127.0.0.1:6443", "certificate-authority": "ca.crt"}},
            {"name": "prod-cluster", "cluster": {"server": "https://10.0.0.1", "insecure-skip-tls-verify": True,
                                                 "tls-server-name": "kubernetes.default"}},
        ],
        "users": [
            {"name": "dev-user", "user": {"token": "dev-token"}},
            {"name": "prod-user", "user": {"tokenFile": "/nonexistent/token"}},
            {"name": "cert-user", "user": {"client-certificate": "c.crt", "client-key": "c.key"}},
            {"name": "plugin-user", "user": {"exec": {"command": "aws"}}},
        ],
        "contexts": [
            {"name": "dev", "context": {"cluster": "dev-cluster", "user": "dev-user", "namespace": "team-a"}},
            {"name": "prod", "context": {"cluster": "prod-cluster", "user": "prod-user"}},
            {"name": "cert", "context": {"cluster": "dev-cluster", "user": "cert-user"}},
            {"name": "plugin", "context": {"cluster": "dev-cluster", "user": "plugin-user"}},
        ],
    }
    doc.update(overrides)
    import yaml
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_kubeconfig_current_context_and_override(tmp_path):
    p = _write_kubeconfig(tmp_path / "config")
    cfg = kc.load_kubeconfig(p)
    assert (cfg.server, cfg.host, cfg.port, cfg.namespace) == ("https://127.0.0.1:6443", "127.0.0.1", 6443, "team-a")
    assert cfg.ca_file == str(tmp_path / "ca.crt")            # relative to the kubeconfig's folder
    assert cfg.auth_header() == "Bearer dev-token"
    prod = kc.load_kubeconfig(p, "prod")
    assert prod.insecure and prod.port == 443 and prod.server_hostname() == "kubernetes.default"
    assert prod.host_header == "10.0.0.1"
    with pytest.raises(kc.KubeConfigError, match="cannot read token file /nonexistent/token"):
        prod.auth_header()
    cert = kc.load_kubeconfig(p, "cert")
    assert cert.client_cert_file == str(tmp_path / "c.crt") and cert.client_key_file == str(tmp_path / "c.key")


@pytest.mark.parametrize("overrides, context, message", [
    ({}, "nope", "contexts: no entry named 'nope'"),
    ({}, "plugin", "exec: credential plugins are not supported"),
    ({"current-context": ""}, None, "no current-context set"),
    ({"clusters": [{"name": "dev-cluster", "cluster": {"server": "ftp://x"}}]}, None, "is not an http(s) URL"),
    ({"clusters": [{"name": "dev-cluster", "cluster": {"certificate-authority-data": "!!!", "server": "https://x"}}]},
     None, "certificate-authority-data: is not valid base64"),
])
def test_kubeconfig_errors_name_the_place(tmp_path, overrides, context, message):
    p = _write_kubeconfig(tmp_path / "config", **overrides)
    with pytest.raises(kc.KubeConfigError) as info:
        kc.load_kubeconfig(p, context)
    assert message in str(info.value) and p in str(info.value)


def test_kubeconfig_data_certificates_go_through_private_temp_files(tmp_path, monkeypatch):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("client")
    cfg = kc.KubeConfig(server="https://127.0.0.1:1", ca_data=ca.cert_pem.bytes(),
                        client_cert_data=leaf.cert_chain_pems[0].bytes(),
                        client_key_data=leaf.private_key_pem.bytes(), origin="t")
    seen = []
    real = ssl.SSLContext.load_cert_chain

    def spy(self, certfile, keyfile=None, password=None):
        for f in (certfile, keyfile):
            seen.append((f, stat.S_IMODE(os.stat(f).st_mode)))
        return real(self, certfile, keyfile, password)
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    ctx = cfg.ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert [m for _, m in seen] == [0o600, 0o600]
    assert not any(os.path.exists(f) for f, _ in seen)       # removed right after loading
    # A key that does not match its certificate is a configuration error, with the origin.
    other = ca.issue_cert("other")
    cfg.client_key_data = other.private_key_pem.bytes()
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", real)
    with pytest.raises(kc.KubeConfigError, match="t: client certificate"):
        cfg.ssl_context()


def test_in_cluster_config(tmp_path):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("pod-token\n")
    (sa / "ca.crt").write_text("x")
    (sa / "namespace").write_text("mesh-system")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert kc.in_cluster_available(env, str(sa))
    cfg = kc.in_cluster_config(str(sa), env)
    assert cfg.server == "https://10.96.0.1:443" and cfg.namespace == "mesh-system"
    assert cfg.auth_header() == "Bearer pod-token" and cfg.ca_file == str(sa / "ca.crt")
    v6 = kc.in_cluster_config(str(sa), {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"})
    assert v6.server == "https://[fd00::1]:6443" and v6.host == "fd00::1" and v6.host_header == "[fd00::1]:6443"
    # load_config: explicit file > in-cluster > $KUBECONFIG.
    p = _write_kubeconfig(tmp_path / "config")
    assert kc.load_config(None, None, str(sa), env).origin.startswith("in-cluster")
    assert kc.load_config(p, None, str(sa), env).server == "https://127.0.0.1:6443"
    assert kc.load_config(None, None, str(tmp_path / "none"), {"KUBECONFIG": p}).namespace == "team-a"
    with pytest.raises(kc.KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
        kc.in_cluster_config(str(sa), {})
    (sa / "token").unlink()
    assert not kc.in_cluster_available(env, str(sa))
    with pytest.raises(kc.KubeConfigError, match="token is missing"):
        kc.in_cluster_config(str(sa), env)


def test_token_file_is_reread_after_rotation(tmp_path, monkeypatch):
    tok = tmp_path / "token"
    tok.write_text("one")
    cfg = kc.KubeConfig(server="https://x", token_file=str(tok), origin="t")
    assert cfg.bearer_token() == "one"
    tok.write_text("two")
    assert cfg.bearer_token() == "one"                # cached within TOKEN_REFRESH
    monkeypatch.setattr(kc, "TOKEN_REFRESH", 0.0)
    assert cfg.bearer_token() == "two"
    tok.unlink()
    assert cfg.bearer_token() == "two"                # mid-rotation: keep the last one


# ============================================================================================
# Ingress status (discovery/sources/ingress_status.py) against the fake server

from types import SimpleNamespace  # noqa: E402

from discovery.sources.ingress_status import (  # noqa: E402
    IngressStatusWriter,
    attach_status_writer,
    listen_address,
    parse_addresses,
    service_addresses,
    status_entries,
)

INGRESSES = ("/apis/networking.k8s.io/v1", "ingresses")
NET_V1 = "networking.k8s.io/v1"
INGRESS_AND_SERVICES = (Resource("Ingress", (NET_V1,), "ingresses", True), Resource("Service", ("v1",), "services", True))


def ingress(name, cls="meshproxy", ns="default", status=None):
    obj = {"metadata": {"name": name, "namespace": ns},
           "spec": {"ingressClassName": cls, "rules": [{"host": f"{name}.example", "http": {"paths": [
               {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}}
    if status is not None:
        obj["status"] = {"loadBalancer": {"ingress": status}}
    return obj


def snap(*served, node="127.0.0.1", version=1):
    return SimpleNamespace(ingresses=tuple(served), node=SimpleNamespace(address=node), version=version)


def lb_of(api, name, ns="default"):
    obj = api.objects[INGRESSES].get((ns, name))
    return ((obj or {}).get("status") or {}).get("loadBalancer", {}).get("ingress")


@contextlib.asynccontextmanager
async def writer_running(api, *, served=("default/ours",), node="127.0.0.1", **kw):
    await api.start()
    rec = Recorder()
    src = KubernetesSource(config_for(api), rec, None, resources=INGRESS_AND_SERVICES,
                           backoff_base=0.02, backoff_cap=0.1)
    kw = {"coalesce": 0.01, "min_interval": 0.02, "backoff_base": 0.02, "backoff_cap": 0.1, **kw}
    writer = IngressStatusWriter(src, **kw)
    writer.on_snapshot(snap(*served, node=node))
    src.start()
    try:
        yield src, writer
    finally:
        await src.stop()
        await api.close()


def test_status_is_written_for_served_ingresses_only_and_only_when_it_differs():
    async def main():
        api = FakeAPI()
        api.put(INGRESSES, ingress("ours"), NET_V1)
        api.put(INGRESSES, ingress("foreign", cls="other"), NET_V1)
        api.put(INGRESSES, ingress("taken", cls="other", status=[{"hostname": "lb.other.example"}]), NET_V1)
        async with writer_running(api, addresses=parse_addresses("127.0.0.9,gw.example.com")) as (src, writer):
            await until(lambda: lb_of(api, "ours") is not None, what="status of ours")
            assert lb_of(api, "ours") == [{"ip": "127.0.0.9"}, {"hostname": "gw.example.com"}]
            [(path, ctype, body)] = api.patches
            assert path == "/apis/networking.k8s.io/v1/namespaces/default/ingresses/ours/status"
            assert ctype == "application/merge-patch+json"
            assert body["metadata"]["resourceVersion"]          # optimistic concurrency
            # The watch brings our own write back: equal, so nothing more is written.
            await asyncio.sleep(0.3)
            assert len(api.patches) == 1
            assert lb_of(api, "foreign") is None
            assert lb_of(api, "taken") == [{"hostname": "lb.other.example"}]
            # A new Ingress of our class served by the next snapshot gets it too.
            api.put(INGRESSES, ingress("second"), NET_V1)
            writer.on_snapshot(snap("default/ours", "default/second", version=2))
            await until(lambda: lb_of(api, "second") is not None, what="status of the second Ingress")
            # Someone overwrites ours: it is put back.
            obj = json.loads(json.dumps(api.objects[INGRESSES][("default", "ours")]))
            obj["status"] = {"loadBalancer": {"ingress": [{"ip": "10.9.9.9"}]}}
            api.put(INGRESSES, obj, NET_V1)
            await until(lambda: {"ip": "127.0.0.9"} in (lb_of(api, "ours") or []), what="status restored")
            st = src.state()["ingressStatus"]
            assert st["served"] == 2 and st["upToDate"] == 2 and st["failures"] == 0
            # "ours" leaves our class: our status is taken back; "foreign" still untouched.
            writer.on_snapshot(snap("default/second", version=3))
            await until(lambda: lb_of(api, "ours") is None, what="status cleared")
            assert lb_of(api, "foreign") is None and lb_of(api, "second") is not None
            assert api.patches[-1][2]["status"] == {"loadBalancer": {"ingress": None}}
    run(main())


def test_an_ingress_that_left_us_and_was_taken_by_another_controller_is_not_touched():
    async def main():
        api = FakeAPI()
        api.put(INGRESSES, ingress("ours"), NET_V1)
        async with writer_running(api, addresses=parse_addresses("127.0.0.9")) as (src, writer):
            await until(lambda: lb_of(api, "ours") is not None, what="status")
            obj = json.loads(json.dumps(api.objects[INGRESSES][("default", "ours")]))
            obj["spec"]["ingressClassName"] = "other"
            obj["status"] = {"loadBalancer": {"ingress": [{"ip": "10.1.1.1"}]}}
            api.put(INGRESSES, obj, NET_V1)
            writer.on_snapshot(snap(version=2))
            await asyncio.sleep(0.3)
            assert lb_of(api, "ours") == [{"ip": "10.1.1.1"}] and len(api.patches) == 1
    run(main())


def test_conflict_rereads_and_retries():
    async def main():
        api = FakeAPI()
        api.put(INGRESSES, ingress("ours"), NET_V1)
        async with writer_running(api, addresses=parse_addresses("127.0.0.9")) as (src, writer):
            await asyncio.wait_for(src.synced.wait(), 5)
            # The server moves on without the watch telling us (a stale cache): bump the
            # object's resourceVersion behind the source's back.
            with_status = writer.seen[("default", "ours")]
            writer.seen[("default", "ours")] = ("1", with_status[1])
            await until(lambda: lb_of(api, "ours") is not None, what="status after a 409")
            gets = [t for t, _ in api.requests if t.endswith("/ours/status") and "watch" not in t]
            assert len(api.patches) == 2 and len(gets) >= 3   # PATCH(409), GET, PATCH
            assert writer.conflicts == 1 and writer.failures == 0
    run(main())


def test_errors_are_retried_with_backoff_and_logged_once(caplog):
    async def main():
        api = FakeAPI()
        api.put(INGRESSES, ingress("ours"), NET_V1)
        api.patch_failures = [500, 500, 403, 500]
        with caplog.at_level(logging.DEBUG, logger="meshproxy.sources.ingress_status"):
            async with writer_running(api, addresses=parse_addresses("127.0.0.9")) as (src, writer):
                # The fake server stores the status before the writer has read its answer:
                # wait for the writer's own count too.
                await until(lambda: lb_of(api, "ours") is not None and writer.writes == 1,
                            what="status after errors")
                assert writer.failures == 4
                await until(lambda: src.state()["ingressStatus"]["pending"] == {}, what="nothing pending")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len([w for w in warnings if "HTTP 500" in w]) == 1, warnings
        [forbidden] = [w for w in warnings if "HTTP 403" in w]
        assert "ingresses/status" in forbidden and "rbac.yaml" in forbidden
    run(main())


def test_publish_service_address_follows_the_service():
    async def main():
        api = FakeAPI()
        api.put(INGRESSES, ingress("ours"), NET_V1)
        svc = service("gw", ns="ingress", ip="127.96.0.50")
        svc["spec"]["type"] = "LoadBalancer"
        api.put(SERVICES, svc)
        async with writer_running(api, publish_service="ingress/gw") as (src, writer):
            # No LB address yet: a LoadBalancer Service without status publishes nothing.
            await asyncio.sleep(0.2)
            assert lb_of(api, "ours") is None
            assert "no address" in src.state()["ingressStatus"]["from"]
            svc = json.loads(json.dumps(api.objects[SERVICES][("ingress", "gw")]))
            svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}, {"hostname": "lb.example"}]}}
            api.put(SERVICES, svc)
            await until(lambda: lb_of(api, "ours") is not None, what="status from the Service")
            assert lb_of(api, "ours") == [{"ip": "203.0.113.7"}, {"hostname": "lb.example"}]
            svc["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.8"}]}}
            api.put(SERVICES, svc)
            await until(lambda: lb_of(api, "ours") == [{"ip": "203.0.113.8"}], what="status follows the Service")
    run(main())


def test_default_address_is_the_listen_host_else_the_node():
    async def main():
        api = FakeAPI()
        api.put(INGRESSES, ingress("ours"), NET_V1)
        async with writer_running(api, listen_hosts=["0.0.0.0"], node="127.0.0.77") as (src, writer):
            await until(lambda: lb_of(api, "ours") == [{"ip": "127.0.0.77"}], what="node address")
        api = FakeAPI()
        api.put(INGRESSES, ingress("ours"), NET_V1)
        async with writer_running(api, listen_hosts=["127.0.0.5"], node="127.0.0.77") as (src, writer):
            await until(lambda: lb_of(api, "ours") == [{"ip": "127.0.0.5"}], what="listen address")
    run(main())


SERVICE_ADDRESS_CASES = [
    ({"type": "ClusterIP", "clusterIP": "10.0.0.1"}, None, (("10.0.0.1", ""),)),
    ({"type": "ClusterIP", "clusterIP": "None"}, None, ()),
    ({"type": "NodePort", "clusterIP": "10.0.0.1"}, None, (("10.0.0.1", ""),)),
    ({"type": "NodePort", "clusterIP": "10.0.0.1", "externalIPs": ["1.2.3.4"]}, None, (("1.2.3.4", ""),)),
    ({"type": "LoadBalancer", "clusterIP": "10.0.0.1"}, None, ()),
    ({"type": "LoadBalancer", "clusterIP": "10.0.0.1", "externalIPs": ["1.2.3.4"]},
     [{"ip": "5.6.7.8"}, {"hostname": "lb.example"}], (("1.2.3.4", ""), ("5.6.7.8", ""), ("", "lb.example"))),
    ({"type": "ExternalName", "externalName": "Proxy.Example."}, None, (("", "proxy.example"),)),
]


@pytest.mark.parametrize(("spec", "lb", "expected"), SERVICE_ADDRESS_CASES)
def test_service_addresses_as_ingress_nginx_reads_them(spec, lb, expected):
    svc = {"metadata": {"name": "gw", "namespace": "x"}, "spec": spec}
    if lb is not None:
        svc["status"] = {"loadBalancer": {"ingress": lb}}
    assert service_addresses(svc) == expected


def test_address_parsing_and_listen_hosts():
    assert parse_addresses("10.0.0.1, LB.Example.com.,::1") == (("10.0.0.1", ""), ("::1", ""), ("", "lb.example.com"))
    assert parse_addresses(["1.1.1.1,2.2.2.2"]) == (("1.1.1.1", ""), ("2.2.2.2", ""))
    for bad in ("not_a_name", "a..b", "-x.example"):
        with pytest.raises(ValueError):
            parse_addresses(bad)
    assert listen_address(["0.0.0.0", "::", "", None, "127.0.0.3"]) == "127.0.0.3"
    assert listen_address(["0.0.0.0"]) is None
    assert status_entries([{"ip": "1.1.1.1", "ports": [{"port": 80}]}, {"hostname": "h"}, "junk", {}]) == \
        (("1.1.1.1", ""), ("", "h"))


def test_writer_is_attached_only_when_serving_ingresses_and_not_disabled():
    from meshproxy.cli import build_parser, settings_from_args
    src = KubernetesSource(kc.KubeConfig(server="http://127.0.0.1:1", origin="test"), lambda ev: None,
                           resources=INGRESS_AND_SERVICES)

    def settings(*argv):
        return settings_from_args(build_parser().parse_args(["run", "--kubeconfig", "x", *argv]))
    subs = []
    assert attach_status_writer(src, settings(), subs.append) is None                 # no ingress listener
    assert attach_status_writer(src, settings("--ingress-listen", "127.0.0.1:1", "--update-status", "false"),
                                subs.append) is None
    w = attach_status_writer(src, settings("--ingress-listen", "127.0.0.1:1", "--publish-status-address", "1.2.3.4"),
                             subs.append)
    assert w is not None and subs == [w.on_snapshot] and src.status_writer is w
    assert w.desired()[0] == (("1.2.3.4", ""),)
    with pytest.raises(ValueError, match="publish-status-address"):
        settings("--publish-status-address", "bad_name")
    with pytest.raises(ValueError, match="NAMESPACE/NAME"):
        settings("--publish-service", "just-a-name")


def test_kindstate_observers_see_raw_versions_and_deletions():
    st = KindState("Pod")
    seen = []
    st.observers.append(lambda key, raw: seen.append((key, raw["metadata"]["resourceVersion"] if raw else None)))
    st.replace(_items(("a", 1), ("b", 2)), "10", "v1")
    st.replace(_items(("a", 1), ("b", 3)), "11", "v1")       # a unchanged: not observed again
    st.apply(_ev(DELETED, "a", 12), "v1")
    st.apply(_ev(ADDED, "c", 13), "v1")
    st.replace(_items(("c", 13)), "14", "v1")                # b vanished
    assert seen == [(("default", "a"), "1"), (("default", "b"), "2"), (("default", "b"), "3"),
                    (("default", "a"), None), (("default", "c"), "13"), (("default", "b"), None)]
