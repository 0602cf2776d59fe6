"""Ingress status: tell the API where the Ingresses this instance serves are exposed.

Controllers publish ``status.loadBalancer.ingress`` ([{ip} | {hostname}]) on the Ingresses they
serve; ``kubectl get ingress`` shows it as ADDRESS, external-dns and cert-manager read it, and
the ingress-controller-conformance suite waits for it before every scenario (and checks that an
Ingress of another class gets none). Only the Kubernetes API source has somewhere to write it.

What is written, and when:

- the Ingresses of the published snapshot (``Snapshot.ingresses``: exactly the class rules the
  router applies), once that snapshot is live, that the API source holds. Nothing else is
  touched: an Ingress of another class is never written. One exception, our own leftovers: an
  Ingress this process wrote (or found already carrying our address) that it no longer serves
  (its class changed) gets its status cleared, but only while the status is still exactly ours,
  and with a resourceVersion precondition so that a concurrent write by its new controller wins;
- the address (first that applies): ``--publish-status-address A[,B]`` (an IP gives ``{ip}``,
  a DNS name ``{hostname}``); ``--publish-service NS/NAME``: that Service's load-balancer
  ingress plus its externalIPs for type LoadBalancer, externalIPs else the clusterIP for
  NodePort, the clusterIP for ClusterIP, the externalName for ExternalName (what ingress-nginx
  does); by default the host of ``--ingress-listen`` (else ``--ingress-tls-listen``) unless it
  is a wildcard, else this node's InternalIP. No address known (the Service does not exist
  yet, several Nodes and no ``--node``) -> nothing is written, and that is logged once;
- only when the status differs (the set of ip/hostname values) from what the watch last
  showed. A merge patch of the ``/status`` subresource carries the resourceVersion it was
  computed from; 409 -> the object is read again (GET .../status) and the write retried.

Rate: changes are coalesced (``coalesce`` after the first, passes at least ``min_interval``
apart), writes are limited to ``qps`` per second, and every ``resync`` seconds the whole set is
compared again. A failed write is retried with per-Ingress exponential backoff and jitter; each
kind of failure (an HTTP code, a network error) is logged once at WARNING until a write
succeeds again, the rest at DEBUG.

Several instances: there is no leader election. Every instance serving the same class computes
the same address when it comes from ``--publish-status-address`` or ``--publish-service`` (the
recommended setting for a Deployment behind a Service), so they agree and, writing only
differences, do not fight; an address taken from each instance's own node would flap, so give
such instances an explicit address or ``--update-status=false`` on all but one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from .kubeconfig import KubeConfigError
from .kubernetes import NETWORK_ERRORS, ApiError, Backoff, KubernetesSource, NsName

__all__ = [
    "RBAC_WRITES",
    "IngressStatusWriter",
    "attach_status_writer",
    "check_publish_settings",
    "listen_address",
    "parse_addresses",
    "parse_service_ref",
    "service_addresses",
    "status_entries",
]

log = logging.getLogger("meshproxy.sources.ingress_status")

# The one thing meshproxy writes, and so what deploy/rbac.yaml grants besides list + watch
# (tests/test_deploy.py checks the two agree): (API group, resource, verbs).
RBAC_WRITES = (("networking.k8s.io", "ingresses/status", ("get", "update", "patch")),)
MERGE_PATCH = "application/merge-patch+json"
INGRESS_GROUP_VERSION = "networking.k8s.io/v1"

# One load-balancer ingress point: (ip, hostname), exactly one of them non-empty. A status is
# the sorted tuple of its points, IPs first (order and unknown fields, e.g. ports, do not make
# two statuses differ).
Point = tuple[str, str]
Status = tuple[Point, ...]


def _sorted(points: Iterable[Point]) -> Status:
    return tuple(sorted(set(points), key=lambda p: (not p[0], p[0] or p[1])))

_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_FAILURES = (*NETWORK_ERRORS, KubeConfigError)   # what a write may meet besides ApiError


def _point(text: str) -> Point:
    """``"10.0.0.1"`` -> (ip, ""), ``"lb.example.com"`` -> ("", hostname). Raises ValueError."""
    text = text.strip()
    try:
        return (str(ipaddress.ip_address(text)), "")
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    if not name or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise ValueError(f"{text!r} is neither an IP address nor a DNS name")
    return ("", name)


def parse_addresses(values: str | Iterable[str]) -> Status:
    """``--publish-status-address``: comma-separated (or a list of) IPs and DNS names."""
    items = values.split(",") if isinstance(values, str) else [v for x in values for v in str(x).split(",")]
    return _sorted(_point(v) for v in items if v.strip())


def parse_service_ref(text: str) -> NsName:
    """``--publish-service NAMESPACE/NAME``. Raises ValueError."""
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise ValueError(f"--publish-service {text!r}: expected NAMESPACE/NAME")
    return ns, name


def check_publish_settings(addresses: Iterable[str], publish_service: str | None) -> None:
    """The flags' values, checked at start-up. Raises ValueError naming the bad one."""
    try:
        parse_addresses(addresses)
    except ValueError as exc:
        raise ValueError(f"--publish-status-address: {exc}") from None
    if publish_service:
        parse_service_ref(publish_service)


def status_entries(raw: Any) -> Status:
    """The points of a ``status.loadBalancer.ingress`` list as the API holds it."""
    out: set[Point] = set()
    for e in raw if isinstance(raw, list) else ():
        if not isinstance(e, dict):
            continue
        ip, host = e.get("ip"), e.get("hostname")
        if isinstance(ip, str) and ip:
            out.add((ip, ""))
        elif isinstance(host, str) and host:
            out.add(("", host))
    return _sorted(out)


def _lb_ingress(raw: dict | None) -> Any:
    status = raw.get("status") if isinstance(raw, dict) else None
    lb = status.get("loadBalancer") if isinstance(status, dict) else None
    return lb.get("ingress") if isinstance(lb, dict) else None


def _to_json(status: Status) -> list[dict[str, str]]:
    return [{"ip": ip} if ip else {"hostname": host} for ip, host in status]


def service_addresses(svc: dict) -> Status:
    """Where a Service is reachable, as ingress-nginx's --publish-service reads it."""
    spec = svc.get("spec") if isinstance(svc.get("spec"), dict) else {}
    stype = spec.get("type") or "ClusterIP"
    ext = [ip for ip in spec.get("externalIPs") or () if isinstance(ip, str) and ip]
    cluster_ip = spec.get("clusterIP")
    cluster = [cluster_ip] if isinstance(cluster_ip, str) and cluster_ip and cluster_ip != "None" else []
    if stype == "ExternalName":
        name = spec.get("externalName")
        return (("", name.lower().rstrip(".")),) if isinstance(name, str) and name else ()
    if stype == "LoadBalancer":
        return _sorted([*status_entries(_lb_ingress(svc)), *((ip, "") for ip in ext)])
    if stype == "NodePort" and ext:
        return _sorted((ip, "") for ip in ext)
    return _sorted((ip, "") for ip in cluster)


def listen_address(hosts: Iterable[str | None]) -> str | None:
    """The first listen host that names one address (not 0.0.0.0, ::, or empty)."""
    for host in hosts:
        if not host or host == "*":
            continue
        try:
            if ipaddress.ip_address(host).is_unspecified:
                continue
        except ValueError:
            pass
        return host
    return None


class IngressStatusWriter:
    """Keeps ``status.loadBalancer.ingress`` of the served Ingresses equal to the address."""

    def __init__(self, source: KubernetesSource, *, addresses: Status = (), publish_service: str | None = None,
                 listen_hosts: Iterable[str | None] = (), coalesce: float = 0.2, min_interval: float = 1.0,
                 resync: float = 60.0, qps: float = 20.0, backoff_base: float = 0.5,
                 backoff_cap: float = 60.0) -> None:
        self.source = source
        self.addresses = tuple(addresses)
        self.publish_service = parse_service_ref(publish_service) if publish_service else None
        listen = listen_address(listen_hosts)
        try:
            self.listen: Status = (_point(listen),) if listen else ()
        except ValueError:
            self.listen = ()
        self.coalesce, self.min_interval, self.resync = coalesce, min_interval, resync
        self.qps = qps
        self._backoff = (backoff_base, backoff_cap)
        # What the watch shows: Ingress key -> (resourceVersion, status points).
        self.seen: dict[NsName, tuple[str, Status]] = {}
        self.service: dict | None = None              # the --publish-service object, raw
        self.served: frozenset[NsName] = frozenset()
        self.node_address: str | None = None
        self.snapshot_version = 0
        self.ours: dict[NsName, Status] = {}           # Ingresses carrying the status we set
        self.retry_at: dict[NsName, float] = {}
        self.backoffs: dict[NsName, Backoff] = {}
        self.errors: dict[NsName, str] = {}
        self._logged_kinds: set[str] = set()
        self._no_address_logged: str | None = None
        self._announced: Status | None = None
        self.writes = 0
        self.conflicts = 0
        self.failures = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._wake.set()
        self._task: asyncio.Task | None = None
        self._tokens = qps
        self._token_time = 0.0
        source.observe("Ingress", self._on_ingress)
        if self.publish_service is not None:
            source.observe("Service", self._on_service)
        source.status_writer = self

    # -- inputs (called on the loop, by the source and by the runtime) --------------------------

    def _on_ingress(self, key: NsName, raw: dict | None) -> None:
        if raw is None:
            self.seen.pop(key, None)
            self.ours.pop(key, None)
            self._forget_failure(key)
            return
        meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
        status = status_entries(_lb_ingress(raw))
        prev = self.seen.get(key)
        self.seen[key] = (str(meta.get("resourceVersion") or ""), status)
        if (prev is None or prev[1] != status) and (key in self.served or key in self.ours):
            self._wake.set()

    def _on_service(self, key: NsName, raw: dict | None) -> None:
        if key == self.publish_service:
            self.service = raw
            self._wake.set()

    def on_snapshot(self, snap: Any) -> None:
        """A snapshot is live (subscribe this to the runtime)."""
        served = frozenset(tuple(s.split("/", 1)) for s in snap.ingresses)    # type: ignore[misc]
        node = snap.node.address
        self.snapshot_version = snap.version
        if served != self.served or node != self.node_address:
            self.served, self.node_address = served, node
            self._wake.set()

    # -- the address ------------------------------------------------------------------------------

    def desired(self) -> tuple[Status | None, str]:
        """The status to publish and where it comes from; None when no address is known."""
        if self.addresses:
            return self.addresses, "--publish-status-address"
        if self.publish_service is not None:
            where = f"--publish-service {self.publish_service[0]}/{self.publish_service[1]}"
            if self.service is None:
                return None, f"{where}: no such Service (yet)"
            found = service_addresses(self.service)
            return (found, where) if found else (None, f"{where}: the Service has no address (yet)")
        if self.listen:
            return self.listen, "the ingress listen address"
        if self.node_address:
            return (_point(self.node_address),), "this node's InternalIP"
        return None, "no address: the ingress listens on a wildcard and this node's InternalIP is unknown " \
                     "(several Nodes and no --node?); set --publish-status-address or --publish-service"

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kube-ingress-status")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        await self.source.synced.wait()
        last = float("-inf")
        while True:
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), self._idle_timeout(loop.time()))
                except asyncio.TimeoutError:
                    pass
            await asyncio.sleep(self.coalesce)
            wait = self.min_interval - (loop.time() - last)
            if wait > 0:
                await asyncio.sleep(wait)
            self._wake.clear()
            last = loop.time()
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end status updates for good
                log.exception("Ingress status: unexpected error; trying again later")
                await asyncio.sleep(self._backoff[1])

    def _idle_timeout(self, now: float) -> float:
        due = min(self.retry_at.values(), default=now + self.resync)
        return max(0.0, min(due - now, self.resync))

    # -- one pass ---------------------------------------------------------------------------------

    async def sync(self) -> int:
        """Compare every served Ingress with the address and write the differences; the number
        of writes that succeeded."""
        want, where = self.desired()
        if want is None:
            if self._no_address_logged != where:
                self._no_address_logged = where
                log.warning("Ingress status: %s; not updating Ingress status", where)
            return 0
        if want != self._announced:
            self._announced = want
            log.info("Ingress status: publishing %s (%s)", _show(want), where)
        self._no_address_logged = None
        now = asyncio.get_running_loop().time()
        done = 0
        for key in sorted(self.served):
            cur = self.seen.get(key)
            if cur is None:
                continue                        # not from the API (a file), or not seen yet
            if cur[1] == want:
                self.ours[key] = want
                self._forget_failure(key)
                continue
            if self.retry_at.get(key, 0.0) > now:
                continue
            done += await self._write(key, want)
        for key in [k for k in self.ours if k not in self.served]:
            cur = self.seen.get(key)
            if cur is None or cur[1] != self.ours[key]:
                del self.ours[key]              # someone else's now: not ours to touch
                continue
            if self.retry_at.get(key, 0.0) > now:
                continue
            done += await self._write(key, (), clearing=self.ours[key])
        return done

    def _path(self, key: NsName) -> str:
        ns, name = key
        return (f"/apis/{INGRESS_GROUP_VERSION}/namespaces/{quote(ns, safe='')}/ingresses/"
                f"{quote(name, safe='')}/status")

    async def _write(self, key: NsName, want: Status, clearing: Status | None = None) -> int:
        path = self._path(key)
        for _ in range(3):
            cur = self.seen.get(key)
            if cur is None:
                return 0
            rv, status = cur
            if status == want or (clearing is not None and status != clearing):
                if clearing is not None:
                    self.ours.pop(key, None)
                return 0
            body: dict[str, Any] = {"status": {"loadBalancer": {"ingress": _to_json(want) if want else None}}}
            if rv:
                body["metadata"] = {"resourceVersion": rv}
            try:
                await self._rate_limit()
                doc = await self.source.request_json("PATCH", path, body, MERGE_PATCH)
            except ApiError as exc:
                if exc.code == 409:
                    # Our resourceVersion is behind: read the object again and decide again.
                    self.conflicts += 1
                    try:
                        self._record(key, await self.source.request_json("GET", path))
                    except ApiError as exc2:
                        if exc2.code == 404:
                            return self._gone(key)
                        return self._failed(key, exc2)
                    except _FAILURES as exc2:
                        return self._failed(key, exc2)
                    continue
                if exc.code == 404:
                    return self._gone(key)
                return self._failed(key, exc)
            except _FAILURES as exc:
                return self._failed(key, exc)
            self._record(key, doc)
            self.writes += 1
            self._forget_failure(key)
            self._logged_kinds.clear()
            if clearing is not None:
                self.ours.pop(key, None)
                log.info("Ingress %s/%s: no longer served here; status.loadBalancer cleared", *key)
            else:
                self.ours[key] = want
                log.info("Ingress %s/%s: status.loadBalancer.ingress = %s", key[0], key[1], _show(want))
            return 1
        return self._failed(key, RuntimeError("the resourceVersion kept changing (409 three times)"))

    def _record(self, key: NsName, doc: Any) -> None:
        if isinstance(doc, dict):
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            self.seen[key] = (str(meta.get("resourceVersion") or ""), status_entries(_lb_ingress(doc)))

    def _gone(self, key: NsName) -> int:
        self.seen.pop(key, None)
        self.ours.pop(key, None)
        self._forget_failure(key)
        return 0

    def _failed(self, key: NsName, exc: BaseException) -> int:
        self.failures += 1
        if isinstance(exc, ApiError):
            kind = f"HTTP {exc.code}"
            text = str(exc)
            if exc.code == 403:
                text += " (RBAC: the service account needs get, update and patch on ingresses/status in " \
                        "networking.k8s.io; see deploy/rbac.yaml, or run with --update-status=false)"
        else:
            kind = type(exc).__name__
            text = f"{kind}: {exc}" if str(exc) else kind
        backoff = self.backoffs.get(key)
        if backoff is None:
            backoff = self.backoffs[key] = Backoff(*self._backoff)
        delay = backoff.next()
        self.retry_at[key] = asyncio.get_running_loop().time() + delay
        self.errors[key] = text
        self.last_error = text
        if kind not in self._logged_kinds:
            self._logged_kinds.add(kind)
            log.warning("Ingress %s/%s: status update failed: %s; retrying with backoff (logged once until "
                        "an update succeeds)", key[0], key[1], text)
        else:
            log.debug("Ingress %s/%s: status update failed: %s; retrying in %.1fs", key[0], key[1], text, delay)
        return 0

    def _forget_failure(self, key: NsName) -> None:
        self.retry_at.pop(key, None)
        self.backoffs.pop(key, None)
        self.errors.pop(key, None)

    async def _rate_limit(self) -> None:
        """A token bucket: ``qps`` writes per second, bursts of up to ``qps``."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._tokens = min(self.qps, self._tokens + (now - self._token_time) * self.qps)
        self._token_time = now
        if self._tokens < 1.0:
            await asyncio.sleep((1.0 - self._tokens) / self.qps)
            self._tokens = 1.0
            self._token_time = loop.time()
        self._tokens -= 1.0

    # -- introspection ----------------------------------------------------------------------------

    def state(self) -> dict:
        want, where = self.desired()
        return {"address": _to_json(want) if want is not None else None, "from": where,
                "served": len(self.served), "upToDate": sum(1 for k in self.served if k in self.ours),
                "writes": self.writes, "conflicts": self.conflicts, "failures": self.failures,
                "pending": {f"{ns}/{name}": err for (ns, name), err in sorted(self.errors.items())},
                "lastError": self.last_error}


def _show(status: Status) -> str:
    return "[" + ", ".join(ip or host for ip, host in status) + "]"


def attach_status_writer(source: KubernetesSource, settings: Any,
                         subscribe: Callable[[Callable[[Any], None]], None]) -> IngressStatusWriter | None:
    """The writer for ``settings`` (None when status updates are off: ``--update-status=false``
    or no Ingress listener), attached to ``source`` and subscribed to published snapshots."""
    if not getattr(settings, "update_status", True):
        return None
    listens = [settings.ingress_listen, settings.ingress_tls_listen]
    if not any(listens):
        return None
    writer = IngressStatusWriter(
        source, addresses=parse_addresses(getattr(settings, "publish_status_address", ()) or ()),
        publish_service=getattr(settings, "publish_service", None),
        listen_hosts=[hp[0] for hp in listens if hp])
    subscribe(writer.on_snapshot)
    return writer
