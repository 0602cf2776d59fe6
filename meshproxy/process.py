"""One meshproxy process: control plane, data plane and admin server wired together.

Lifecycle:
- start: load the manifests (refuse to start when they are invalid), publish the first
  snapshot, bind listeners, start the admin server; ``/readyz`` turns 200 once the
  listeners of the first snapshot are bound;
- SIGHUP or a file change: reload; a bad reload is counted and logged, the last good
  snapshot stays in force;
- SIGTERM: ``/readyz`` answers 503 at once, listeners close after ``--shutdown-delay``,
  keep-alive responses carry ``Connection: close``, and the process exits when open
  connections are done or ``--drain-timeout`` has passed;
- SIGINT: stop at once;
- SIGUSR1: the access log reopens its file (after logrotate moved it); with ``--workers`` the
  parent passes it on to every worker, each of which has its own file descriptor.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import platform
import signal
import sys

from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from discovery.health import HealthChecker
from discovery.sources.dns import DnsSource, query_for
from discovery.sources.files import FileSource, Outcome
from discovery.sources.gateway_status import attach_gateway_status_writer
from discovery.sources.ingress_status import attach_status_writer
from discovery.sources.kubeconfig import KubeConfigError, load_config
from discovery.sources.kubernetes import KubernetesSource
from l7.h1impl import compiled_status
from l7.h1impl import select as select_http_core

from . import __version__, control
from .admin import AdminServer
from .controller import APPLY_CHUNK, Controller
from .core import metrics, sockets
from .core.accept import connection_limits, raise_fd_limit
from .core.memory import fix_mmap_threshold
from .core.runtime import Runtime
from .core.settings import Settings, SettingsFileError, diff_settings, read_settings_file, setting_key
from .dataplane import DataPlane
from .dnsforward import Forwarder, resolv_conf_servers
from .dnsserver import ClusterDNS
from .identity_sources import IdentityDirSource, IssuerClient
from .observe import MetricSignals

__all__ = ["Process", "install_uvloop", "raise_fd_limit_logged", "serve"]

log = logging.getLogger("meshproxy")

# A file load that re-reads this much is big: the garbage collector stays paused until its
# snapshot is live, and what it built is frozen afterwards (GcHold).
HEAVY_LOAD_BYTES = 4 << 20
HEAVY_SWITCH_INTERVAL = 0.0005


def install_uvloop() -> None:
    fix_mmap_threshold()   # every process's start goes through here (see meshproxy.core.memory)
    try:
        import uvloop
    except ImportError:  # the pure asyncio loop works too, only slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class GcHold:
    """The cyclic garbage collector, paused for the duration of a big load.

    A full collection walks every tracked object: ~0.2 s with 45,000 Pods in the store, taken
    from the thread that happens to allocate — also the loop's — holding the GIL. A big load
    creates the very objects that trigger such collections, several times over. So the
    collector is paused from the start of a load (``hold``, from the file source) until its
    snapshot is live (``release``); after a big load the surviving objects — the store, the
    snapshot, the caches — are frozen (``gc.freeze``): later collections skip them, so they
    never cost a full walk again. Those objects hold no reference cycles (they are freed by
    reference counting when a later snapshot replaces them); what the freeze keeps for good is
    only cyclic garbage that happened to exist at that instant."""

    __slots__ = ("held", "switch")

    def __init__(self) -> None:
        self.held = False
        self.switch = sys.getswitchinterval()

    def hold(self) -> None:
        if not self.held and gc.isenabled():
            gc.disable()
            # The parse and build threads hold the GIL until asked to drop it, and are asked
            # only after the switch interval: every syscall of the loop (each releases the GIL)
            # waits up to that long to get it back. 0.5 ms instead of 5 ms while they run.
            self.switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self.switch, HEAVY_SWITCH_INTERVAL))
            self.held = True

    def release(self, freeze: bool) -> None:
        if self.held:
            if freeze:
                gc.freeze()
            gc.enable()
            sys.setswitchinterval(self.switch)
            self.held = False


class Process:
    """``data_plane=False`` is the control plane of ``--workers N``: no listeners here,
    snapshots go to ``publish_hook`` (the worker pool) instead."""

    def __init__(self, settings: Settings, *, data_plane: bool = True, publish_hook=None) -> None:
        self.settings = settings
        self.data_plane = data_plane
        self.runtime = Runtime(settings)
        self._publish_hook = publish_hook
        self._gc = GcHold()
        self.controller = Controller(settings, self._publish)
        self.controller.on_applied = self._after_apply
        self._tasks: set[asyncio.Task] = set()
        self.extra_ready = lambda: True
        self._kube_ready = False
        self.on_draining = None   # called at SIGTERM, before --shutdown-delay (workers: tell them)
        self.on_stop = None
        self.on_reopen_logs = None   # SIGUSR1 with --workers: pass it on to them
        self.on_settings = None   # called with live settings changes (workers: tell them)
        self._settings_task: asyncio.Task | None = None
        self.source = FileSource(settings.paths, settings.service_cidr, settings.poll_interval,
                                 on_load_start=self._gc.hold)
        self.kube = None
        self.dataplane: DataPlane | None = None
        self.signals = MetricSignals()
        self.admin: AdminServer | None = None
        self.health = None
        self.control = None
        self.dns_source = None
        self.dns_server = None
        self.identity_source: IdentityDirSource | IssuerClient | None = None
        self.dns_forwarder: Forwarder | None = None
        self.ready = False
        self.http_core = ""          # the L7 per-message core that runs (set in start)
        self.stopping = False
        self._stop = asyncio.Event()

    def _publish(self, snap) -> None:
        self.runtime.publish(snap)
        if self._publish_hook is not None:
            self._publish_hook(snap)

    # -- reloads ------------------------------------------------------------------------------

    def _on_outcome(self, outcome: Outcome) -> None:
        heavy = outcome.bytes_read >= HEAVY_LOAD_BYTES or len(outcome.events) > APPLY_CHUNK
        if not outcome.ok or not outcome.events:
            self._gc.release(freeze=heavy)
        if not outcome.ok:
            metrics.config_reloads.labels("error").inc()
            for err in outcome.errors:
                log.error("config: %s", err)
            log.error("configuration refused (%d problems); the last good snapshot stays in force",
                      len(outcome.errors))
            # Also where operators look: /debug/snapshot problems and meshproxy_config_problems.
            self.controller.set_config_problems("manifests", (f"config: refused reload: {e}" for e in outcome.errors))
            return
        metrics.config_reloads.labels("ok").inc()
        if self.controller.config_problems("manifests"):
            log.info("config: reload accepted; the problems of the refused one are cleared")
            self.controller.set_config_problems("manifests", ())
        if outcome.events:
            log.info("config: %d changed objects", len(outcome.events))
            # A big reload is applied a chunk per loop turn (Controller.apply_events_async);
            # health checks and DNS follow through _after_apply.
            version = self.controller.snapshot.version if self.controller.snapshot else 0
            applied = self.controller.apply_events_later(outcome.events, "files")
            task = asyncio.get_running_loop().create_task(self._after_outcome(applied, version, heavy))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _after_outcome(self, applied: asyncio.Future | None, version: int, heavy: bool) -> None:
        try:
            if applied is not None:
                await applied
            if heavy and self.controller.pending:
                # The garbage collector stays paused until the snapshot holding these objects
                # is live; then they are frozen (GcHold).
                await asyncio.wait_for(self.controller.wait_for_snapshot(version), 120)
        except asyncio.TimeoutError:
            log.error("config: the snapshot of a big reload was not published within 2 minutes")
        finally:
            self._gc.release(freeze=heavy)

    def _after_apply(self, kinds: set[str]) -> None:
        """Objects of ``kinds`` changed in the store (any source)."""
        if "Pod" in kinds:
            self._sync_health()
        if "Service" in kinds:
            self._sync_dns()

    def _sync_dns(self) -> None:
        """Start the DNS source the first time a Service needs it (ExternalName or the
        meshproxy.dev/dns / dns-srv annotations), then keep it in step with the Services."""
        services = self.controller.store.items("Service")
        if self.dns_source is None:
            if not any(query_for(svc) is not None for svc in services.values()):
                return
            try:
                self.dns_source = DnsSource(lambda ev: self.controller.apply_events(ev, "dns"),
                                            list(self.settings.dns_servers) or None,
                                            self.settings.dns_min_ttl, self.settings.dns_max_ttl,
                                            signals=self.signals)
            except ValueError as exc:
                log.error("DNS source: %s; DNS-backed services get no endpoints", exc)
                return
            self.dns_source.sync(services)
            self.dns_source.start()
            return
        self.dns_source.sync(services)

    def _on_kube_events(self, events) -> None:
        # An initial list of a big cluster is applied a chunk per loop turn, like a big file.
        self.controller.apply_events_later(events, "kubernetes")

    def _kube_synced(self) -> bool:
        """The API source's initial lists are in force: synced, and the snapshot built from
        them published (the source says "synced" right after handing over the last list, while
        the controller's coalesced rebuild is still due). Latched: later changes, which make a
        rebuild due again, must not turn readiness off."""
        if self._kube_ready:
            return True
        if self.kube is None or (self.kube.synced.is_set() and not self.controller.pending):
            self._kube_ready = True
        return self._kube_ready

    def _sync_health(self) -> None:
        if self.health is not None:
            self.health.sync(self.controller.store.items("Pod"))

    def reload(self) -> None:
        log.info("SIGHUP: reloading configuration")
        self.reload_settings()
        task = asyncio.get_running_loop().create_task(self._reload_manifests())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_manifests(self) -> None:
        self._on_outcome(await self.source.load_async(full=True))

    def reopen_logs(self) -> None:
        if self.dataplane is not None:
            self.dataplane.reopen_logs()
        if self.on_reopen_logs is not None:
            self.on_reopen_logs()

    # -- the settings file (--config) -----------------------------------------------------------

    def reload_settings(self) -> None:
        """Re-read ``--config``: live settings take effect now, the others are reported as
        waiting for a restart; a bad file is refused whole and the settings in force stay."""
        path = self.settings.config_file
        if path is None:
            return
        try:
            values = read_settings_file(path)
        except SettingsFileError as exc:
            metrics.config_reloads.labels("error").inc()
            for problem in exc.problems:
                log.error("config: %s", problem)
            log.error("settings file %s refused (%d problems); the settings in force stay", path, len(exc.problems))
            self.controller.set_config_problems("settings", (f"config: refused reload: {p}" for p in exc.problems))
            return
        metrics.config_reloads.labels("ok").inc()
        live, restart = diff_settings(self.settings, values)
        if live:
            log.info("settings: %s", ", ".join(f"{setting_key(k).key}={v!r}" for k, v in live.items()))
            self.apply_settings(live)
        waiting = [f"config: {path}: {key}: changed in the file; takes effect after a restart" for key in restart]
        for problem in waiting:
            log.warning("%s", problem)
        self.controller.set_config_problems("settings", waiting)

    def apply_settings(self, changes: dict) -> None:
        for name, value in changes.items():
            setattr(self.settings, name, value)
        if "log_level" in changes:
            logging.getLogger().setLevel(getattr(logging, self.settings.log_level.upper(), logging.INFO))
        if any(setting_key(name).rebuild for name in changes):
            self.controller.settings_changed()
        if self.dataplane is not None:
            self.dataplane.settings_changed(changes)
        if self.on_settings is not None:
            self.on_settings(changes)

    async def _watch_settings(self) -> None:
        """Poll the settings file's stat: one syscall per interval, and it sees a ConfigMap
        volume's symlink swap (stat follows the link) as well as an in-place edit."""
        path = self.settings.config_file
        assert path is not None

        def signature():
            try:
                st = os.stat(path)
            except OSError:
                return None
            return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        last = signature()
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            now = signature()
            if now != last:
                last = now
                log.info("settings file %s changed; re-reading it", path)
                self.reload_settings()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> bool:
        try:
            # Which L7 per-message core runs (l7.h1impl): the compiled one or the pure reference.
            self.http_core = select_http_core(self.settings.http_parser).mode
        except ValueError as exc:
            print(f"meshproxy: --http-parser: {exc}", file=sys.stderr)
            return False
        metrics.build_info.labels(version=__version__, python=platform.python_version(),
                                  http_core=self.http_core).set(1)
        log.info("L7 HTTP/1.1 core: %s (compiled core: %s)", self.http_core, compiled_status())
        takeover = None
        if self.settings.takeover:
            path = control.control_path(self.settings.admin_listen)
            try:
                takeover = control.request_takeover(path)
            except OSError as exc:
                print(f"meshproxy: --takeover: no running instance answered on {path} ({exc})", file=sys.stderr)
                return False
        outcome = await self.source.load_async()
        if not outcome.ok:
            for err in outcome.errors:
                print(err, file=sys.stderr)
            print(f"meshproxy: configuration has {len(outcome.errors)} problem(s); not starting", file=sys.stderr)
            metrics.config_reloads.labels("error").inc()
            self._gc.release(freeze=False)
            return False
        metrics.config_reloads.labels("ok").inc()
        await self.controller.apply_events_async(outcome.events, "files")
        if self.settings.kube_api:
            try:
                cfg = load_config(self.settings.kubeconfig, self.settings.kube_context)
                self.kube = KubernetesSource(cfg, self._on_kube_events, self.settings.kube_namespace,
                                             signals=self.signals)
                # status.loadBalancer of the Ingresses served, once their snapshot is live
                attach_status_writer(self.kube, self.settings, self.runtime.subscribe)
                # the status of Gateway API objects of our GatewayClasses, as each snapshot says
                attach_gateway_status_writer(self.kube, self.settings, self.runtime.subscribe)
                self.kube.start()
            except KubeConfigError as exc:
                print(f"meshproxy: {exc}", file=sys.stderr)
                return False
        if self.settings.health_checks:
            results: dict[tuple[str, str], bool] = {}
            self.health = HealthChecker(results, self.controller.pod_readiness_changed, signals=self.signals)
            self.controller.set_probe_results(results)
            self._sync_health()
            self.health.start()
        self._sync_dns()
        if not self._start_identity():
            return False
        if self.settings.dns_listen is not None:
            upstreams = list(self.settings.dns_upstreams) or resolv_conf_servers()
            self.dns_forwarder = Forwarder(upstreams, own=self.settings.dns_listen)
            self.dns_server = ClusterDNS(lambda: self.controller.snapshot, self.settings.cluster_domain,
                                         get_pods=lambda: self.controller.store.items("Pod"),
                                         forward=self.dns_forwarder.forward)
            await self.dns_server.start(*self.settings.dns_listen)
        self.controller.rebuild()
        self._gc.release(freeze=outcome.bytes_read >= HEAVY_LOAD_BYTES or len(outcome.events) > APPLY_CHUNK)

        if self.data_plane:
            self.dataplane = DataPlane(self.runtime)
            await self.dataplane.start()
        elif self.settings.proxy_mode == "nftables":
            # --workers: the workers serve sockets; the kernel's rules are programmed here, once.
            self.dataplane = DataPlane(self.runtime, listeners=False)
            await self.dataplane.start()
        host, port = self.settings.admin_listen
        self.admin = AdminServer(host, port, is_ready=lambda: self.ready and not self.stopping and self.extra_ready()
                                 and self._kube_synced() and self._identity_ready()
                                 and (self.dataplane is None or self.dataplane.ready()),
                                 snapshot_json=self._snapshot_json, metrics_text=_metrics_text(),
                                 snapshot_version=lambda: self.runtime.snapshot.version if self.runtime.snapshot else None,
                                 identity_json=self.runtime.identity.to_json if self.identity_source else None)
        await self.admin.start()
        self.source.watch(self._on_outcome, self.settings.coalesce_delay)
        if self.settings.config_file is not None:
            self._settings_task = asyncio.get_running_loop().create_task(self._watch_settings())
        # Listeners bind in apply() and the loop turns after it: wait for them before saying ready.
        if self.dataplane is not None:
            await self.dataplane.settled()
        else:
            await asyncio.sleep(0)
        if takeover is not None:
            closed = sockets.unused_inherited()
            if closed:
                log.info("takeover: closed %d inherited listeners the configuration no longer wants", len(closed))
            # With --workers the listeners live in the workers: the old instance may drain only
            # once every new worker has bound them (a dead one is started again meanwhile).
            while not self.extra_ready():
                await asyncio.sleep(0.02)
            takeover.finish()
        self.control = control.ControlServer(control.control_path(self.settings.admin_listen),
                                             lambda: asyncio.get_running_loop().create_task(self.graceful_stop()))
        try:
            await self.control.start()
        except OSError as exc:   # upgrades will not work, serving does
            log.warning("control socket %s: %s (run --takeover will not find this process)", self.control.path, exc)
        self.ready = True
        snap = self.runtime.snapshot
        log.info("meshproxy ready: snapshot %d, %d services, %d L4 listeners, admin on %s:%d",
                 snap.version if snap else 0, len(snap.services) if snap else 0,
                 len(snap.l4) if snap else 0, host, self.admin.port)
        l4_limit, l7_limit = connection_limits(self.settings)
        log.info("connection limits per process: L4 %s, L7 %s (%s; docs/resilience.md)",
                 l4_limit or "none", l7_limit or "none",
                 "--max-connections" if self.settings.max_connections is not None
                 else f"from RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
        return True

    def _start_identity(self) -> bool:
        """The workload identity source (mesh), when one is configured."""
        s = self.settings
        try:
            if s.identity_dir:
                self.identity_source = IdentityDirSource(s.identity_dir, self.runtime.identity)
            elif s.identity_issuer:
                ca = b""
                if s.identity_issuer_ca:
                    with open(s.identity_issuer_ca, "rb") as f:
                        ca = f.read()
                kw = {"token_path": s.identity_token_file} if s.identity_token_file else {}
                self.identity_source = IssuerClient(s.identity_issuer, self.runtime.identity, ca_pem=ca, **kw)
        except (OSError, ValueError) as exc:
            print(f"meshproxy: identity: {exc}", file=sys.stderr)
            return False
        if self.identity_source is not None:
            self.identity_source.start()
        return True

    def _identity_ready(self) -> bool:
        # A meshed instance without a certificate could not serve mTLS: not ready until it has one.
        return self.identity_source is None or self.runtime.identity.current is not None

    def _snapshot_json(self) -> dict | None:
        snap = self.runtime.snapshot
        if snap is None:
            return None
        data = snap.to_json()
        data["problems"] = self.controller.problems()
        data["httpCore"] = {"running": self.http_core, "compiled": compiled_status()}
        if self.dataplane is not None:
            data["listenerErrors"] = self.dataplane.listener_errors()
            kernel = self.dataplane.kernel_state()
            if kernel is not None:
                data["nftables"] = kernel
        if self.kube is not None:
            data["kubernetes"] = self.kube.state()
        if self.health is not None and hasattr(self.health, "state"):
            data["health"] = self.health.state()
        data["outlier"] = self.runtime.balancers.outlier.state()
        if self.dns_source is not None:
            data["dnsSource"] = self.dns_source.state()
        if self.dns_server is not None:
            data["clusterDNS"] = dict(self.dns_server.stats)
            if self.dns_forwarder is not None:
                data["clusterDNS"]["upstreams"] = [f"{h}:{p}" for h, p in self.dns_forwarder.upstreams]
                data["clusterDNS"].update({f"forward_{k}": v for k, v in self.dns_forwarder.stats.items()})
        return data

    async def graceful_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        # From now on L7 responses carry Connection: close, also during --shutdown-delay while the
        # listeners still accept; with --workers the workers are told the same at once.
        self.runtime.draining = True
        if self.on_draining is not None:
            self.on_draining()
        log.info("SIGTERM: draining (shutdown delay %.1fs, drain timeout %.1fs)",
                 self.settings.shutdown_delay, self.settings.drain_timeout)
        if self.settings.shutdown_delay:
            await asyncio.sleep(self.settings.shutdown_delay)
        if self.dataplane is not None:
            await self.dataplane.stop_accepting()
        waits = []
        if self.on_stop is not None:
            waits.append(self.on_stop(self.settings.drain_timeout))
        if self.dataplane is not None:
            waits.append(self.dataplane.drain(self.settings.drain_timeout))
        await asyncio.gather(*waits, return_exceptions=True)
        self._stop.set()

    def stop_now(self) -> None:
        self.stopping = True
        self._stop.set()

    async def close(self) -> None:
        if self._settings_task is not None:
            self._settings_task.cancel()
        if self.control is not None:
            await self.control.close()
        await self.source.stop()
        if self.identity_source is not None:
            await self.identity_source.stop()
        if self.dns_source is not None:
            await self.dns_source.stop()
        if self.dns_server is not None:
            self.dns_server.close()
            await self.dns_server.wait_closed()
        if self.health is not None:
            await self.health.stop()
        if self.admin is not None:
            await self.admin.close()
        if self.dataplane is not None:
            await self.dataplane.close()
        self.controller.close()

    async def serve(self) -> int:
        if not await self.start():
            return 1
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(self.graceful_stop()))
        loop.add_signal_handler(signal.SIGINT, self.stop_now)
        await self._stop.wait()
        await self.close()
        log.info("meshproxy stopped")
        return 0


def _metrics_text():
    """With workers, /metrics adds up every process's values (prometheus-client multiprocess)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None

    def text() -> bytes:
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return generate_latest(reg)
    return text


def raise_fd_limit_logged() -> None:
    """Before the first listener (and before forking workers: they inherit it)."""
    before, after = raise_fd_limit()
    if after > before:
        log.info("file descriptors: soft limit raised from %d to %d", before, after)


def serve(settings: Settings) -> int:
    """``meshproxy run`` with one process (``--workers 1``)."""
    install_uvloop()
    raise_fd_limit_logged()

    async def main() -> int:
        return await Process(settings).serve()
    try:
        return asyncio.run(main())
    except OSError as exc:  # e.g. the admin port is taken: say so plainly
        print(f"meshproxy: {exc}", file=sys.stderr)
        return 1
