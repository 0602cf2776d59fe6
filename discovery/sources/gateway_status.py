"""Gateway API status: write back what meshproxy decided about GatewayClasses, Gateways and routes.

The snapshot carries the status every object meshproxy is responsible for should have
(``Snapshot.gateway_status``, computed by ``meshproxy.core.gateway_status``). This writer keeps
the API in step with it, following the API's rules for status writers:

* read-modify-write: the object as the watch last showed it (``observe``), merged with ours,
  patched on ``/status`` with a JSON merge patch that carries that ``resourceVersion``; 409 ->
  read the object again (GET .../status) and merge again;
* conditions: ours replace the same types, conditions of other types are kept in their order,
  ``lastTransitionTime`` changes only when a condition's status changes; a condition the API
  holds with an ``observedGeneration`` newer than ours is left alone (our view is stale: the
  next snapshot will be newer);
* route ``status.parents``: entries are namespaced by ``controllerName``. Ours (controller
  ``meshproxy.dev/gateway-controller``) are replaced; entries of other controllers are never
  touched; our entries for parents the route no longer names (or that are no longer ours)
  are removed;
* GatewayClass and Gateway: ``status`` is ours whole for the classes we serve (conditions
  merged as above, ``addresses`` and ``listeners`` replaced);
* only differences are written; changes are coalesced, writes limited to ``qps`` per second,
  failures retried per object with jittered exponential backoff, each kind of failure logged
  once until a write succeeds; every ``resync`` seconds everything is compared again.

Several instances (no leader election) compute the same status from the same objects, and
writing only differences they do not fight; only the wildcard address that a Gateway without
``spec.addresses`` publishes (this node's) differs between nodes - give such Gateways
addresses, or run the writer on one instance (``--update-status=false`` on the others).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Callable
from typing import Any

from .kubeconfig import KubeConfigError
from .kubernetes import NETWORK_ERRORS, ApiError, Backoff, KubernetesSource

__all__ = ["RBAC_WRITES", "KINDS", "GatewayStatusWriter", "attach_gateway_status_writer", "merge_status"]

log = logging.getLogger("meshproxy.sources.gateway_status")

CONTROLLER = "meshproxy.dev/gateway-controller"
MERGE_PATCH = "application/merge-patch+json"
KINDS = ("GatewayClass", "Gateway", "HTTPRoute", "GRPCRoute", "TLSRoute", "TCPRoute")
_GROUP = "gateway.networking.k8s.io"
RBAC_WRITES = tuple((_GROUP, f"{plural}/status", ("get", "update", "patch")) for plural in
                    ("gatewayclasses", "gateways", "httproutes", "grpcroutes", "tlsroutes", "tcproutes"))
_FAILURES = (*NETWORK_ERRORS, KubeConfigError)

Key = tuple[str, str, str]          # (kind, namespace, name); namespace "" for GatewayClass


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _merge_conditions(current: Any, ours: list[dict], now: str) -> list[dict]:
    """``current`` conditions with ours merged in (see the module docstring)."""
    cur = [c for c in current if isinstance(c, dict)] if isinstance(current, list) else []
    by_type = {c.get("type"): c for c in cur}
    out = []
    ours_by_type = {c["type"]: c for c in ours}
    for c in cur:
        t = c.get("type")
        if t not in ours_by_type:
            out.append(c)                                  # someone else's: kept as it is
            continue
        mine = ours_by_type.pop(t)
        gen = c.get("observedGeneration")
        if isinstance(gen, int) and gen > mine.get("observedGeneration", 0):
            out.append(c)                                  # newer than what we know: not ours to change
            continue
        out.append(_stamped(mine, c, now))
    for t, mine in ours_by_type.items():
        out.append(_stamped(mine, by_type.get(t), now))
    return out


def _stamped(mine: dict, old: dict | None, now: str) -> dict:
    ltt = old.get("lastTransitionTime") if old is not None and old.get("status") == mine["status"] else None
    return {**mine, "lastTransitionTime": ltt or now}


def _same_parent(a: dict, b: dict, ns: str) -> bool:
    def norm(r: dict) -> tuple:
        return (r.get("group", _GROUP), r.get("kind", "Gateway"), r.get("namespace") or ns, r.get("name"),
                r.get("sectionName"), r.get("port"))
    return norm(a) == norm(b)


def merge_status(kind: str, namespace: str, current: Any, ours: dict | None, now: str) -> dict | None:
    """The status to write: ``current`` (the object's status as the API holds it) with ours
    merged in; None when nothing is ours to write (no status of ours, none to clean up)."""
    current = current if isinstance(current, dict) else {}
    if kind in ("GatewayClass", "Gateway"):
        if ours is None:
            return None
        out = dict(current)
        out["conditions"] = _merge_conditions(current.get("conditions"), ours["conditions"], now)
        if kind == "Gateway":
            out["addresses"] = ours["addresses"]
            old = {ls.get("name"): ls for ls in current.get("listeners") or () if isinstance(ls, dict)}
            out["listeners"] = [{**ls, "conditions": _merge_conditions((old.get(ls["name"]) or {}).get("conditions"),
                                                                          ls["conditions"], now)}
                                for ls in ours["listeners"]]
        return out
    parents = [p for p in current.get("parents") or () if isinstance(p, dict)]
    others = [p for p in parents if p.get("controllerName") != CONTROLLER]
    mine_before = [p for p in parents if p.get("controllerName") == CONTROLLER]
    if ours is None and not mine_before:
        return None
    merged = []
    for p in (ours or {}).get("parents", ()):
        old = next((q for q in mine_before if _same_parent(q.get("parentRef") or {}, p["parentRef"], namespace)), None)
        merged.append({**p, "conditions": _merge_conditions((old or {}).get("conditions"), p["conditions"], now)})
    out = dict(current)
    out["parents"] = others + merged
    return out


def _comparable(status: Any) -> str:
    """Two statuses that differ only in lastTransitionTime stamps the same way compare equal."""
    return json.dumps(status, sort_keys=True, default=str)


class GatewayStatusWriter:
    """Keeps the status of our Gateway API objects equal to the published snapshot's."""

    def __init__(self, source: KubernetesSource, *, coalesce: float = 0.2, min_interval: float = 0.5,
                 resync: float = 60.0, qps: float = 20.0, backoff_base: float = 0.5, backoff_cap: float = 60.0,
                 clock: Callable[[], str] = _now) -> None:
        self.source = source
        self.coalesce, self.min_interval, self.resync, self.qps = coalesce, min_interval, resync, qps
        self._backoff = (backoff_base, backoff_cap)
        self._clock = clock
        # What the watch shows: key -> (resourceVersion, status)
        self.seen: dict[Key, tuple[str, Any]] = {}
        self.desired: dict[Key, dict] = {}
        self.retry_at: dict[Key, float] = {}
        self.backoffs: dict[Key, Backoff] = {}
        self.errors: dict[Key, str] = {}
        self._logged: set[str] = set()
        self.writes = self.conflicts = self.failures = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._wake.set()
        self._task: asyncio.Task | None = None
        self._tokens, self._token_time = qps, 0.0
        for kind in KINDS:
            source.observe(kind, self._observer(kind))
        source.writers["gatewayStatus"] = self

    def _observer(self, kind: str) -> Callable[[tuple[str, str], dict | None], None]:
        def on_object(key: tuple[str, str], raw: dict | None) -> None:
            k = (kind, key[0], key[1])
            if raw is None:
                self.seen.pop(k, None)
                self._forget(k)
                return
            meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
            self.seen[k] = (str(meta.get("resourceVersion") or ""), raw.get("status"))
            self._wake.set()
        return on_object

    def on_snapshot(self, snap: Any) -> None:
        """A snapshot is live (subscribe this to the runtime)."""
        desired = dict(snap.gateway_status)
        if desired != self.desired:
            self.desired = desired
            self._wake.set()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kube-gateway-status")

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
                due = min(self.retry_at.values(), default=loop.time() + self.resync)
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, min(due - loop.time(), self.resync)))
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
                log.exception("Gateway API status: unexpected error; trying again later")
                await asyncio.sleep(self._backoff[1])

    # -- one pass -------------------------------------------------------------------------------

    def pending(self) -> list[Key]:
        """Objects whose status differs from ours (for tests and state())."""
        out = []
        for key, (_, status) in self.seen.items():
            want = merge_status(key[0], key[1], status, self.desired.get(key), "")
            if want is not None and _strip(want) != _strip(status):
                out.append(key)
        return out

    async def sync(self) -> int:
        now = asyncio.get_running_loop().time()
        done = 0
        for key in sorted(self.seen):
            if self.retry_at.get(key, 0.0) > now:
                continue
            done += await self._write(key)
        return done

    async def _write(self, key: Key) -> int:
        kind, ns, name = key
        path = self.source.object_path(kind, ns, name, "status")
        if path is None:
            return 0
        for _ in range(3):
            cur = self.seen.get(key)
            if cur is None:
                return 0
            rv, status = cur
            want = merge_status(kind, ns, status, self.desired.get(key), self._clock())
            if want is None or _strip(want) == _strip(status):
                self._forget(key)
                return 0
            body: dict[str, Any] = {"status": want}
            if rv:
                body["metadata"] = {"resourceVersion": rv}
            try:
                await self._rate_limit()
                doc = await self.source.request_json("PATCH", path, body, MERGE_PATCH)
            except ApiError as exc:
                if exc.code == 409:
                    self.conflicts += 1
                    try:
                        self._record(key, await self.source.request_json("GET", path))
                    except ApiError as exc2:
                        return self._gone(key) if exc2.code == 404 else self._failed(key, exc2)
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
            self._forget(key)
            self._logged.clear()
            log.info("%s %s: status updated", kind, f"{ns}/{name}" if ns else name)
            return 1
        return self._failed(key, RuntimeError("the resourceVersion kept changing (409 three times)"))

    def _record(self, key: Key, doc: Any) -> None:
        if isinstance(doc, dict):
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            self.seen[key] = (str(meta.get("resourceVersion") or ""), doc.get("status"))

    def _gone(self, key: Key) -> int:
        self.seen.pop(key, None)
        self._forget(key)
        return 0

    def _failed(self, key: Key, exc: BaseException) -> int:
        self.failures += 1
        if isinstance(exc, ApiError):
            what = f"HTTP {exc.code}"
            text = str(exc)
            if exc.code == 403:
                text += " (RBAC: the service account needs get, update and patch on the */status of the Gateway " \
                        "API kinds; see deploy/rbac.yaml, or run with --update-status=false)"
        else:
            what = type(exc).__name__
            text = f"{what}: {exc}" if str(exc) else what
        backoff = self.backoffs.setdefault(key, Backoff(*self._backoff))
        delay = backoff.next()
        self.retry_at[key] = asyncio.get_running_loop().time() + delay
        self.errors[key] = text
        self.last_error = text
        if what not in self._logged:
            self._logged.add(what)
            log.warning("%s %s/%s: status update failed: %s; retrying with backoff (logged once until an update "
                        "succeeds)", *key, text)
        else:
            log.debug("%s %s/%s: status update failed: %s; retrying in %.1fs", *key, text, delay)
        return 0

    def _forget(self, key: Key) -> None:
        self.retry_at.pop(key, None)
        self.backoffs.pop(key, None)
        self.errors.pop(key, None)

    async def _rate_limit(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._tokens = min(self.qps, self._tokens + (now - self._token_time) * self.qps)
        self._token_time = now
        if self._tokens < 1.0:
            await asyncio.sleep((1.0 - self._tokens) / self.qps)
            self._tokens = 1.0
            self._token_time = loop.time()
        self._tokens -= 1.0

    def state(self) -> dict:
        return {"objects": len(self.desired), "writes": self.writes, "conflicts": self.conflicts,
                "failures": self.failures, "lastError": self.last_error,
                "pending": {"/".join(x for x in k if x): e for k, e in sorted(self.errors.items())}}


def _strip(status: Any) -> str:
    """A status without lastTransitionTime stamps, for "does it differ" (a merged status
    keeps the stamps of unchanged conditions, so equal content means nothing to write)."""
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items() if k != "lastTransitionTime"}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x
    return _comparable(walk(status))


def attach_gateway_status_writer(source: KubernetesSource, settings: Any,
                                 subscribe: Callable[[Callable[[Any], None]], None]) -> GatewayStatusWriter | None:
    """The writer (None with ``--update-status=false``), attached to ``source`` and subscribed
    to published snapshots."""
    if not getattr(settings, "update_status", True):
        return None
    writer = GatewayStatusWriter(source)
    subscribe(writer.on_snapshot)
    return writer
