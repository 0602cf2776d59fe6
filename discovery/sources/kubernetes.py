"""The Kubernetes API source: list + watch the kinds meshproxy uses, as store events.

For each kind (``RESOURCES``) one task runs the reflector loop client-go made familiar:

    list (paginated, ?limit=500&continue=...)  ->  diff against what this source had  ->  emit
    watch from the list's resourceVersion      ->  apply each event                   ->  emit
    the watch ends (timeoutSeconds, EOF)       ->  watch again from the last resourceVersion
    ERROR 410 Gone / Expired, HTTP 410         ->  list again (a "relist")
    connection or server error                 ->  back off (exponential, jittered, capped) and
                                                   watch again from the last resourceVersion

Invariants (``KindState`` keeps them; it does no I/O and is tested without sockets):
- ``KindState.items`` is exactly what this source believes the server holds for the kind: every
  object's resourceVersion, and its parsed form (None when it failed our validation);
- the events emitted are exactly the differences between successive beliefs, so nothing is
  applied twice (an object seen again at the same resourceVersion emits nothing; a relist that
  finds an object unchanged emits nothing) and nothing is lost (a relist emits DELETED for every
  object that vanished while we were not watching);
- an object that fails validation counts as absent: it is logged once per resourceVersion, and
  if a valid earlier version was applied, that one is DELETED (the API no longer has it);
- ``resource_version`` only moves forward through what the server sent: the list's, then each
  event's (BOOKMARK events move it and nothing else).

``synced`` is set once every kind has completed its first list (kinds the server does not
serve count as synced, with a warning). EndpointSlices are read as discovery.k8s.io/v1 and, on
a 404 (servers before 1.21), as v1beta1. TLS Secrets are listed with
``fieldSelector=type=kubernetes.io/tls``, so other Secrets never reach this process's memory.

HTTP/1.1 is spoken with h11 over asyncio streams (TLS from ``KubeConfig.ssl_context``): one
connection per list page, one per watch, closed when done. JSON watch events arrive one per
line in a chunked body and are decoded as the bytes arrive.

The one write, the Ingress status, lives in ``ingress_status.py``: it reads raw objects through
``observe()`` (fields the typed objects leave out), writes with ``request_json()``, and is
started, stopped and shown (``state()``) with this source.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import h11

from ..manifests import parse_document
from ..signals import NO_SIGNALS, Signals
from ..store import ADDED, DELETED, MODIFIED, Event
from .kubeconfig import KubeConfig, KubeConfigError

__all__ = [
    "CLUSTER_SCOPED",
    "RESOURCES",
    "ApiError",
    "Backoff",
    "KindState",
    "KubernetesSource",
    "Resource",
    "WatchExpired",
    "WatchFailed",
    "collection_path",
]

log = logging.getLogger("meshproxy.sources.kubernetes")

SOURCE = "kubernetes"
USER_AGENT = "meshproxy/0.1.0"
# The largest single watch event / list page we accept (a guard against a runaway stream; a
# 500-item page of big Pods is a few MiB).
MAX_BODY = 256 * 1024 * 1024
# The read deadline beyond the watch's own timeoutSeconds: the server closes the stream at
# timeoutSeconds, so silence much longer than that means the connection is dead (a partition,
# a host that vanished without a FIN).
WATCH_IDLE_GRACE = 30.0

NsName = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    group_versions: tuple[str, ...]     # preferred first; the rest are fallbacks on 404
    plural: str
    namespaced: bool
    field_selector: str | None = None

    @property
    def group(self) -> str:
        gv = self.group_versions[0]
        return gv.rpartition("/")[0]      # "" for the core group


_GW = "gateway.networking.k8s.io"
# Exactly the kinds read, and so exactly what deploy/rbac.yaml grants (tests/test_deploy.py
# checks the two agree).
RESOURCES: tuple[Resource, ...] = (
    Resource("Node", ("v1",), "nodes", False),
    Resource("Pod", ("v1",), "pods", True),
    Resource("Service", ("v1",), "services", True),
    Resource("Endpoints", ("v1",), "endpoints", True),
    Resource("EndpointSlice", ("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"), "endpointslices", True),
    Resource("Ingress", ("networking.k8s.io/v1",), "ingresses", True),
    Resource("IngressClass", ("networking.k8s.io/v1",), "ingressclasses", False),
    Resource("Secret", ("v1",), "secrets", True, "type=kubernetes.io/tls"),
    # Gateway API (when its CRDs are installed; a kind the server does not serve is empty) and
    # the Namespaces its listeners select routes by.
    Resource("Namespace", ("v1",), "namespaces", False),
    Resource("GatewayClass", (f"{_GW}/v1", f"{_GW}/v1beta1"), "gatewayclasses", False),
    Resource("Gateway", (f"{_GW}/v1", f"{_GW}/v1beta1"), "gateways", True),
    Resource("HTTPRoute", (f"{_GW}/v1", f"{_GW}/v1beta1"), "httproutes", True),
    Resource("GRPCRoute", (f"{_GW}/v1",), "grpcroutes", True),
    Resource("TLSRoute", (f"{_GW}/v1", f"{_GW}/v1alpha3", f"{_GW}/v1alpha2"), "tlsroutes", True),
    Resource("TCPRoute", (f"{_GW}/v1", f"{_GW}/v1alpha2"), "tcproutes", True),
    Resource("ReferenceGrant", (f"{_GW}/v1", f"{_GW}/v1beta1", f"{_GW}/v1alpha2"), "referencegrants", True),
    Resource("FaultInjection", ("meshproxy.dev/v1alpha1",), "faultinjections", True),
    Resource("IngressNginxFilter", ("meshproxy.dev/v1alpha1",), "ingressnginxfilters", True),
    # Mesh policy, with Istio's kinds (when their CRDs are installed).
    Resource("PeerAuthentication", ("security.istio.io/v1", "security.istio.io/v1beta1"), "peerauthentications", True),
    Resource("AuthorizationPolicy", ("security.istio.io/v1", "security.istio.io/v1beta1"), "authorizationpolicies", True),
)
CLUSTER_SCOPED = frozenset(r.kind for r in RESOURCES if not r.namespaced)


def collection_path(res: Resource, group_version: str, namespace: str | None) -> str:
    base = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    if res.namespaced and namespace:
        return f"{base}/namespaces/{quote(namespace, safe='')}/{res.plural}"
    return f"{base}/{res.plural}"


# --------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """A non-2xx answer. ``status`` is the decoded Status object when the server sent one."""

    def __init__(self, code: int, path: str, status: dict | None = None, method: str = "GET") -> None:
        self.code = code
        self.path = path
        self.status = status or {}
        msg = self.status.get("message") or self.status.get("reason") or ""
        super().__init__(f"{method} {path}: HTTP {code}{': ' + msg if msg else ''}")


class WatchExpired(Exception):
    """The resourceVersion we watch from is gone (410): list again."""


class WatchFailed(Exception):
    """An ERROR event other than 410 (e.g. 500, 504 "Too large resource version")."""


class _ProtocolError(Exception):
    """The server broke HTTP or JSON framing."""


# The failures that mean "this connection / this server is not usable right now": back off and
# try again. Anything else is a bug and is logged with a traceback (and retried too).
NETWORK_ERRORS = (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                   h11.RemoteProtocolError, _ProtocolError, EOFError)


# --------------------------------------------------------------------------------------------
# The pure part: what one kind looks like to this source


def _meta_of(raw: Any) -> tuple[NsName, str] | None:
    if not isinstance(raw, dict):
        return None
    meta = raw.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    ns = meta.get("namespace") or ""
    return (ns if isinstance(ns, str) else "", meta["name"]), str(meta.get("resourceVersion") or "")


class KindState:
    """One kind's objects as this source last saw them, and the events that move the store
    from one view to the next. No I/O."""

    __slots__ = ("_logged", "cluster_scoped", "items", "kind", "observers", "resource_version")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.cluster_scoped = kind in CLUSTER_SCOPED
        self.items: dict[NsName, tuple[str, object | None]] = {}   # key -> (resourceVersion, obj)
        self.resource_version = ""
        self._logged: dict[NsName, str] = {}    # invalid objects already logged, by version
        # Called with (key, raw object) for every new version, (key, None) when it is gone: for
        # readers of fields the typed objects leave out (the Ingress status writer).
        self.observers: list[Callable[[NsName, dict | None], None]] = []

    def _observe(self, key: NsName, raw: dict | None) -> None:
        for fn in self.observers:
            try:
                fn(key, raw)
            except Exception:  # an observer's bug must not stop the watch
                log.exception("%s: observer failed", self.kind)

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, raw: dict, api_version: str) -> object | None:
        """The typed object, or None (logged once per resourceVersion) when it is invalid."""
        doc = dict(raw)
        # List items carry no apiVersion/kind; watch objects do. Ours name the collection's.
        doc["apiVersion"] = raw.get("apiVersion") or api_version
        doc["kind"] = raw.get("kind") or self.kind
        if self.cluster_scoped and isinstance(doc.get("metadata"), dict) and doc["metadata"].get("namespace"):
            doc["metadata"] = {k: v for k, v in doc["metadata"].items() if k != "namespace"}
        obj, errors, skipped = parse_document(doc, "<api>", 0)
        if obj is not None:
            return obj
        ident = _meta_of(raw)
        key, rv = ident if ident is not None else (("", "?"), "")
        if self._logged.get(key) != rv:
            self._logged[key] = rv
            ref = f"{self.kind}/{key[1]}" if self.cluster_scoped else f"{self.kind}/{key[0]}/{key[1]}"
            if skipped:
                log.warning("%s: %s is not a kind meshproxy reads; skipped", ref, skipped)
            for err in errors[:5]:
                field = f"{err.field}: " if err.field else ""
                log.warning("%s (resourceVersion %s): %s%s; skipped", ref, rv or "?", field, err.message)
        return None

    # -- transitions ----------------------------------------------------------------------------

    def _transition(self, old: object | None, new: object | None) -> list[Event]:
        if old is None:
            return [] if new is None else [Event(ADDED, new)]
        if new is None:
            return [Event(DELETED, old)]
        return [] if old == new else [Event(MODIFIED, new)]

    def replace(self, raw_items: Iterable[dict], resource_version: str, api_version: str) -> list[Event]:
        """A full list: the events that turn the previous view into this one."""
        events: list[Event] = []
        seen: set[NsName] = set()
        for raw in raw_items:
            ident = _meta_of(raw)
            if ident is None:
                log.warning("%s list: an item without metadata.name; skipped", self.kind)
                continue
            key, rv = ident
            if self.cluster_scoped:
                key = ("", key[1])
            seen.add(key)
            prev = self.items.get(key)
            if prev is not None and rv and prev[0] == rv:
                continue                               # unchanged: nothing to say
            obj = self.decode(raw, api_version)
            self.items[key] = (rv, obj)
            self._observe(key, raw)
            events.extend(self._transition(prev[1] if prev else None, obj))
        for key in [k for k in self.items if k not in seen]:
            _, obj = self.items.pop(key)
            self._logged.pop(key, None)
            self._observe(key, None)
            if obj is not None:
                events.append(Event(DELETED, obj))     # deleted while we were not watching
        self.resource_version = resource_version
        return events

    def apply(self, event: Any, api_version: str) -> list[Event]:
        """One watch event (the decoded JSON line). Raises WatchExpired / WatchFailed for ERROR."""
        if not isinstance(event, dict):
            raise _ProtocolError(f"watch event is not an object: {event!r:.200}")
        etype, raw = event.get("type"), event.get("object")
        if etype == "ERROR":
            status = raw if isinstance(raw, dict) else {}
            if status.get("code") == 410:
                raise WatchExpired(status.get("message") or "resource version too old")
            raise WatchFailed(f"HTTP {status.get('code')}: {status.get('message') or status.get('reason') or status}")
        if etype == "BOOKMARK":
            # Only metadata.resourceVersion is meaningful in a bookmark (the object is empty).
            meta = raw.get("metadata") if isinstance(raw, dict) else None
            rv = str(meta.get("resourceVersion") or "") if isinstance(meta, dict) else ""
            if rv:
                self.resource_version = rv
            return []
        ident = _meta_of(raw)
        if ident is None:
            raise _ProtocolError(f"{etype} event without object metadata")
        key, rv = ident
        if self.cluster_scoped:
            key = ("", key[1])
        if etype not in (ADDED, MODIFIED, DELETED):
            raise _ProtocolError(f"unknown watch event type {etype!r}")
        if rv:
            self.resource_version = rv
        prev = self.items.get(key)
        if etype == DELETED:
            if prev is None:
                return []
            del self.items[key]
            self._logged.pop(key, None)
            self._observe(key, None)
            return self._transition(prev[1], None)
        if prev is not None and rv and prev[0] == rv:
            return []                                  # a repeat of what we have
        obj = self.decode(raw, api_version)
        self.items[key] = (rv, obj)
        self._observe(key, raw)
        return self._transition(prev[1] if prev else None, obj)

    def count(self) -> tuple[int, int]:
        valid = sum(1 for _, obj in self.items.values() if obj is not None)
        return valid, len(self.items) - valid


class Backoff:
    """Exponential backoff with jitter: base * 2^n, capped, each delay drawn from
    [delay/2, delay] so that many clients restarting together spread out."""

    __slots__ = ("_rand", "attempts", "base", "cap")

    def __init__(self, base: float = 0.5, cap: float = 30.0, rand: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.attempts = 0
        self._rand = rand or random.Random()

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return delay * (0.5 + 0.5 * self._rand.random())

    def reset(self) -> None:
        self.attempts = 0


# --------------------------------------------------------------------------------------------
# HTTP/1.1 on h11


class _Response:
    """One GET on its own connection: the head is read; the body is read or streamed."""

    def __init__(self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 status: int, read_timeout: float) -> None:
        self.conn, self.reader, self.writer = conn, reader, writer
        self.status = status
        self.read_timeout = read_timeout
        self.eof = False

    async def _next(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            if self.conn.their_state is h11.CLOSED:
                raise EOFError("connection closed")
            data = await asyncio.wait_for(self.reader.read(65536), self.read_timeout)
            if not data and self.eof:
                raise EOFError("connection closed")
            self.eof = not data
            self.conn.receive_data(data)      # b"" is EOF: h11 then raises if the body was cut short

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            ev = await self._next()
            if isinstance(ev, h11.Data):
                yield bytes(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return
            elif isinstance(ev, h11.ConnectionClosed):
                raise EOFError("connection closed in the response body")  # noqa: TRY004 - not a type error: the peer hung up

    async def read(self) -> bytes:
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) > MAX_BODY:
                raise _ProtocolError(f"response body over {MAX_BODY} bytes")
        return bytes(body)

    async def json(self) -> Any:
        body = await self.read()
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _ProtocolError(f"response is not JSON: {exc}") from None

    def close(self) -> None:
        self.writer.close()


class _Client:
    def __init__(self, config: KubeConfig, connect_timeout: float = 10.0, request_timeout: float = 60.0) -> None:
        self.config = config
        self.ssl = config.ssl_context()
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.open_writers: set[asyncio.StreamWriter] = set()

    async def get(self, path: str, read_timeout: float | None = None) -> _Response:
        return await self.request("GET", path, read_timeout=read_timeout)

    async def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                      read_timeout: float | None = None) -> _Response:
        cfg = self.config
        target = cfg.path_prefix + path
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(cfg.host, cfg.port, ssl=self.ssl,
                                    server_hostname=cfg.server_hostname() if self.ssl else None,
                                    limit=1 << 20),
            self.connect_timeout)
        self.open_writers.add(writer)
        try:
            conn = h11.Connection(h11.CLIENT)
            headers = [("Host", cfg.host_header), ("User-Agent", USER_AGENT),
                       ("Accept", "application/json"), ("Accept-Encoding", "identity")]
            auth = cfg.auth_header()
            if auth:
                headers.append(("Authorization", auth))
            if body is not None:
                headers += [("Content-Type", content_type or "application/json"), ("Content-Length", str(len(body)))]
            writer.write(conn.send(h11.Request(method=method, target=target, headers=headers)))
            if body:
                writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            resp = _Response(conn, reader, writer, 0, read_timeout or self.request_timeout)
            ev = await asyncio.wait_for(resp._next(), self.request_timeout)
            if not isinstance(ev, h11.Response):
                raise _ProtocolError(f"expected a response head, got {type(ev).__name__}")
            resp.status = ev.status_code
            return resp
        except BaseException:
            self.release(writer)
            raise

    def release(self, writer: asyncio.StreamWriter) -> None:
        self.open_writers.discard(writer)
        writer.close()

    async def get_json(self, path: str) -> Any:
        return await self.request_json("GET", path)

    async def request_json(self, method: str, path: str, body: Any = None,
                           content_type: str = "application/json") -> Any:
        """One request with an optional JSON body; the decoded 2xx answer, else ApiError."""
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        resp = await self.request(method, path, data, content_type)
        try:
            if not 200 <= resp.status < 300:
                raise ApiError(resp.status, path, await self._status(resp), method)
            return await resp.json()
        finally:
            self.release(resp.writer)

    @staticmethod
    async def _status(resp: _Response) -> dict | None:
        try:
            body = await resp.read()
            doc = json.loads(body)
            return doc if isinstance(doc, dict) else {"message": body[:200].decode(errors="replace")}
        except (ValueError, *NETWORK_ERRORS):
            return None

    def close_all(self) -> None:
        for w in list(self.open_writers):
            w.close()
        self.open_writers.clear()


# --------------------------------------------------------------------------------------------
# The source


class _Kind:
    """The running state of one kind (besides its KindState)."""

    __slots__ = (
        "backoff",
        "events",
        "expired_streak",
        "gv_index",
        "last_error",
        "last_sync",
        "listed",
        "lists",
        "need_list",
        "phase",
        "relists",
        "res",
        "state",
        "synced",
        "unavailable",
        "watches",
    )

    def __init__(self, res: Resource, backoff: Backoff) -> None:
        self.res = res
        self.state = KindState(res.kind)
        self.gv_index = 0
        self.phase = "starting"          # listing / watching / backoff / unavailable / stopped
        self.synced = False
        self.listed = False
        self.lists = 0
        self.relists = 0
        self.watches = 0
        self.events = 0
        self.last_error: str | None = None
        self.last_sync: float | None = None
        self.need_list = True
        self.backoff = backoff
        self.unavailable = False
        self.expired_streak = 0          # 410s in a row without a watch event between them

    @property
    def group_version(self) -> str:
        return self.res.group_versions[self.gv_index]


class KubernetesSource:
    """List + watch the API server; ``emit`` gets lists of ``Event`` (one batch per list or per
    received chunk of watch events)."""

    name = SOURCE

    def __init__(self, config: KubeConfig, emit: Callable[[list[Event]], None], namespace: str | None = None,
                 *, resources: Iterable[Resource] = RESOURCES, watch_timeout: float = 300.0,
                 backoff_base: float = 0.5, backoff_cap: float = 30.0, page_size: int = 500,
                 unavailable_retry: float = 300.0, rand: random.Random | None = None,
                 signals: Signals = NO_SIGNALS) -> None:
        self.config = config
        self.signals = signals
        self.emit = emit
        self.namespace = namespace or None
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self.unavailable_retry = unavailable_retry
        self._rand = rand or random.Random()
        self.kinds = [_Kind(r, Backoff(backoff_base, backoff_cap, self._rand)) for r in resources]
        self.synced = asyncio.Event()
        self._client: _Client | None = None
        self._tasks: list[asyncio.Task] = []
        self._up: bool | None = None
        self._stopping = False
        # Writes status.loadBalancer of the Ingresses served (discovery/sources/ingress_status.py);
        # started and stopped with the source, its state shown in state().
        self.status_writer: Any = None
        # Further writers (Gateway API status, discovery/sources/gateway_status.py): name -> writer.
        self.writers: dict[str, Any] = {}

    def observe(self, kind: str, fn: Callable[[NsName, dict | None], None]) -> None:
        """Call ``fn(key, raw)`` for every new version of each object of ``kind`` (None when
        it is deleted). Register before start()."""
        for k in self.kinds:
            if k.res.kind == kind:
                k.state.observers.append(fn)
                return
        raise ValueError(f"{kind} is not a kind this source reads")

    async def request_json(self, method: str, path: str, body: Any = None,
                           content_type: str = "application/json") -> Any:
        """One request to the API server (after start()); raises ApiError on non-2xx."""
        assert self._client is not None, "the source is not started"
        return await self._client.request_json(method, path, body, content_type)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the list/watch tasks in the running loop. Raises KubeConfigError when the TLS
        settings cannot be loaded (a bad CA file, a key that does not match its certificate)."""
        self._client = _Client(self.config)
        self.signals.source_up(SOURCE, False)
        loop = asyncio.get_running_loop()
        for k in self.kinds:
            self._tasks.append(loop.create_task(self._run(k), name=f"kube-{k.res.kind}"))
        if self.status_writer is not None:
            self.status_writer.start()
        for w in self.writers.values():
            w.start()
        log.info("watching %s (%s) for %s in %s", self.config.server, self.config.origin,
                 ", ".join(k.res.kind for k in self.kinds),
                 f"namespace {self.namespace}" if self.namespace else "all namespaces")

    async def stop(self) -> None:
        self._stopping = True
        if self.status_writer is not None:
            await self.status_writer.stop()
        for w in self.writers.values():
            await w.stop()
        for t in self._tasks:
            t.cancel()
        if self._client is not None:
            self._client.close_all()
        for t in self._tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        for k in self.kinds:
            k.phase = "stopped"
        self._set_up()

    # -- one kind ------------------------------------------------------------------------------

    async def _run(self, k: _Kind) -> None:
        while True:
            try:
                if k.need_list:
                    await self._list(k)
                await self._watch(k)
            except asyncio.CancelledError:
                raise
            except WatchExpired as exc:
                # The history we would watch from is compacted away: only a relist can tell
                # us what happened meanwhile. No backoff: 410 is an answer, not a failure.
                k.need_list = True
                k.expired_streak += 1
                if k.expired_streak > 1:
                    # 410 again right after a relist: the server's history is churning faster
                    # than we can list (or it is confused). Relisting in a tight loop would
                    # only add load: back off like any other failure.
                    await self._fail(k, exc)
                else:
                    log.info("%s: watch expired (%s); relisting", k.res.kind, exc)
            except ApiError as exc:
                if exc.code == 404 and not k.listed and k.gv_index + 1 < len(k.res.group_versions):
                    old = k.group_version
                    k.gv_index += 1
                    log.info("%s: %s is not served (404); falling back to %s", k.res.kind, old, k.group_version)
                    continue
                if exc.code == 410:
                    log.info("%s: %s; relisting", k.res.kind, exc)
                    k.need_list = True
                    continue
                if exc.code == 404 and not k.listed:
                    await self._unavailable(k, exc)
                    continue
                await self._fail(k, exc)
            except KubeConfigError as exc:     # e.g. the token file vanished
                await self._fail(k, exc)
            except NETWORK_ERRORS as exc:
                await self._fail(k, exc)
            except WatchFailed as exc:
                await self._fail(k, exc)
            except Exception as exc:  # a bug here must not end the watch for good: log, back off, retry
                log.exception("%s: unexpected error", k.res.kind)
                await self._fail(k, exc)

    async def _fail(self, k: _Kind, exc: BaseException) -> None:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, ApiError) and exc.code == 403:
            text += (f" (RBAC: the service account needs list and watch on {k.res.plural}"
                     f"{'.' + k.res.group if k.res.group else ''}; see deploy/rbac.yaml)")
        delay = k.backoff.next()
        if text != k.last_error or k.backoff.attempts <= 1:
            log.warning("%s: %s; retrying in %.1fs", k.res.kind, text, delay)
        else:
            log.debug("%s: %s; retrying in %.1fs", k.res.kind, text, delay)
        k.last_error = text
        k.phase = "backoff"
        self._set_up()
        await asyncio.sleep(delay)

    async def _unavailable(self, k: _Kind, exc: ApiError) -> None:
        if not k.unavailable:
            log.warning("%s: not served by this API server (%s); treated as empty, checking again every %.0fs",
                        k.res.kind, ", ".join(k.res.group_versions), self.unavailable_retry)
        k.unavailable = True
        k.phase = "unavailable"
        k.last_error = str(exc)
        k.gv_index = 0
        self._mark_synced(k)
        await asyncio.sleep(self.unavailable_retry)

    def _path(self, k: _Kind, **params: Any) -> str:
        query = {key: v for key, v in params.items() if v is not None}
        if k.res.field_selector:
            query["fieldSelector"] = k.res.field_selector
        return collection_path(k.res, k.group_version, self.namespace) + "?" + urlencode(query)

    async def _list(self, k: _Kind) -> None:
        assert self._client is not None
        k.phase = "listing"
        items: list[dict] = []
        cont: str | None = None
        limit: int | None = self.page_size
        api_version = k.group_version
        while True:
            path = self._path(k, limit=limit, **{"continue": cont})
            try:
                doc = await self._client.get_json(path)
            except ApiError as exc:
                if exc.code == 410 and cont:
                    # The continue token outlived the snapshot it pointed into (etcd compaction);
                    # client-go's answer: one unpaginated list.
                    log.info("%s: list continuation expired; listing without pages", k.res.kind)
                    items, cont, limit = [], None, None
                    continue
                raise
            if not isinstance(doc, dict) or not isinstance(doc.get("items", []), list):
                raise _ProtocolError(f"GET {path}: not a list")
            api_version = doc.get("apiVersion") or api_version
            items.extend(i for i in (doc.get("items") or []) if isinstance(i, dict))
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            cont = meta.get("continue") or None
            if not cont:
                rv = str(meta.get("resourceVersion") or "")
                break
        relist = k.listed
        events = k.state.replace(items, rv, api_version)
        k.lists += 1
        k.listed = True
        k.need_list = False
        k.unavailable = False
        k.last_sync = time.time()
        if relist:
            k.relists += 1
            self.signals.source_relisted(SOURCE)
            log.info("%s: relisted %d objects at resourceVersion %s: %d changes", k.res.kind, len(items), rv, len(events))
        else:
            log.debug("%s: listed %d objects at resourceVersion %s", k.res.kind, len(items), rv)
        self._emit(k, events)
        self._mark_synced(k)

    async def _watch(self, k: _Kind) -> None:
        assert self._client is not None
        # Spread the renewals: [t, 2t) like client-go's reflector, so that many watches opened
        # together do not all end together.
        timeout = int(self.watch_timeout * (1 + self._rand.random()))
        path = self._path(k, watch=1, resourceVersion=k.state.resource_version or None,
                          allowWatchBookmarks="true", timeoutSeconds=timeout)
        t0 = time.monotonic()
        resp = await self._client.get(path, read_timeout=timeout + WATCH_IDLE_GRACE)
        received = 0
        try:
            if resp.status != 200:
                raise ApiError(resp.status, path, await self._client._status(resp))
            k.watches += 1
            k.phase = "watching"
            k.last_error = None
            self._set_up()
            api_version = k.group_version
            buf = bytearray()
            async for chunk in resp.chunks():
                buf += chunk
                if b"\n" not in chunk and len(buf) <= MAX_BODY:
                    continue
                lines = buf.split(b"\n")
                buf = bytearray(lines.pop())
                if len(buf) > MAX_BODY:
                    raise _ProtocolError(f"watch event over {MAX_BODY} bytes")
                events: list[Event] = []
                try:
                    for line in lines:
                        if not line.strip():
                            continue
                        try:
                            ev = json.loads(line)
                        except ValueError as exc:
                            raise _ProtocolError(f"watch event is not JSON: {exc}") from None
                        received += 1
                        events.extend(k.state.apply(ev, api_version))
                finally:
                    # Whatever was applied before an ERROR line is already in KindState:
                    # it must reach the store too.
                    self._emit(k, events)
                if received:
                    k.backoff.reset()
                    k.expired_streak = 0
            if buf.strip():
                raise _ProtocolError("watch stream ended inside an event")
        finally:
            self._client.release(resp.writer)
        if not received and time.monotonic() - t0 < 1.0:
            # A server that accepts watches and ends them at once would make this a busy loop.
            raise _ProtocolError("watch ended immediately without events")
        k.backoff.reset()

    # -- output --------------------------------------------------------------------------------

    def _emit(self, k: _Kind, events: list[Event]) -> None:
        if not events:
            return
        k.events += len(events)
        try:
            self.emit(events)
        except Exception:  # the consumer's bug must not stop the watch; say it loudly
            log.exception("%s: applying %d events failed", k.res.kind, len(events))

    def _mark_synced(self, k: _Kind) -> None:
        k.synced = True
        if not self.synced.is_set() and all(x.synced for x in self.kinds):
            log.info("initial sync complete: %s", ", ".join(
                f"{x.state.count()[0]} {x.res.kind}" for x in self.kinds))
            self.synced.set()
        self._set_up()

    def _set_up(self) -> None:
        up = bool(self.kinds) and self.synced.is_set() and all(
            x.phase in ("watching", "unavailable", "listing") and x.synced for x in self.kinds)
        if up != self._up:
            self._up = up
            if self._client is not None:   # started
                self.signals.source_up(SOURCE, up)

    # -- introspection ---------------------------------------------------------------------------

    def state(self) -> dict:
        kinds = {}
        for k in self.kinds:
            valid, invalid = k.state.count()
            kinds[k.res.kind] = {
                "apiVersion": k.group_version,
                "path": collection_path(k.res, k.group_version, self.namespace),
                "phase": k.phase, "synced": k.synced,
                "resourceVersion": k.state.resource_version,
                "objects": valid, "invalid": invalid,
                "lists": k.lists, "relists": k.relists, "watches": k.watches, "events": k.events,
                "lastSync": k.last_sync, "lastError": k.last_error,
            }
        out = {"source": SOURCE, "server": self.config.server, "config": self.config.origin,
               "namespace": self.namespace, "synced": self.synced.is_set(), "up": bool(self._up),
               "kinds": kinds}
        if self.status_writer is not None:
            out["ingressStatus"] = self.status_writer.state()
        for name, w in self.writers.items():
            out[name] = w.state()
        return out

    def object_path(self, kind: str, namespace: str, name: str, subresource: str = "") -> str | None:
        """The API path of one object of ``kind`` at the version this source reads (None when
        the kind is not read)."""
        for k in self.kinds:
            if k.res.kind == kind:
                base = collection_path(k.res, k.group_version, namespace if k.res.namespaced else None)
                return f"{base}/{quote(name, safe='')}" + (f"/{subresource}" if subresource else "")
        return None
