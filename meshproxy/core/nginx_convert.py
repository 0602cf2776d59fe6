"""``meshproxy convert``: Ingresses written for ingress-nginx, as Gateway API objects.

``convert(objects, options)`` takes the parsed manifests and returns the Gateway API documents
(plain dicts, for YAML) and one warning per thing that does not translate. The output is meant
to route the same requests the same way when meshproxy serves it (``meshproxy run -f``), which
tests/test_nginx_convert.py checks request by request. The mapping (docs/ingress-nginx.md,
"meshproxy convert", is the user's table):

* one GatewayClass (meshproxy's controller) and one Gateway: an HTTP listener, an HTTPS
  listener per TLS host (its Ingress's Secret; a ReferenceGrant when the Secret lives in
  another namespace), a TLS passthrough listener per ssl-passthrough host;
* one HTTPRoute per namespace and host, hostnames with the server-alias names, a rule per path
  in ingress-nginx's order. A host where ingress-nginx matches regular expressions (use-regex, a
  rewrite-target) gets RegularExpression matches that mean what nginx's ``~* "^PATH"`` means:
  ``(?i)PATH.*``, tried in the same order (one route, rules in order);
* the paths of backend-protocol GRPC / GRPCS Ingresses as one GRPCRoute per namespace and host
  (ingress2gateway's choice): ``/SERVICE/METHOD`` and ``/SERVICE`` become method matches, ``/``
  matches every call;
* Gateway API filters where they exist: redirects (permanent-, temporal-redirect, app-root),
  URLRewrite (a rewrite-target without capture groups, upstream-vhost), RequestHeaderModifier
  (x-forwarded-prefix), the HTTPS redirect as an HTTP-listener route that only redirects,
  canary Ingresses as header matches and weights, timeouts and retries;
* meshproxy's ``IngressNginxFilter`` (an ExtensionRef) where it has none: CORS, allow / deny
  lists, body size, rate and connection limits, basic and external authentication, cookie
  affinity, custom error pages and the default backend, a rewrite with capture groups, the
  connect timeout. The filter holds the annotations themselves; meshproxy applies them as it
  does on an Ingress.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import urlsplit

from .nginx_annotations import PREFIX, SNIPPETS, NginxIngress, is_nginx, parse

__all__ = ["ConvertOptions", "convert"]

GW = "gateway.networking.k8s.io/v1"
EXT_API = "meshproxy.dev/v1alpha1"
# Annotations the IngressNginxFilter extension carries (Gateway API has nothing for them).
_EXTENSION = frozenset({
    "enable-cors", "cors-allow-origin", "cors-allow-methods", "cors-allow-headers", "cors-expose-headers",
    "cors-allow-credentials", "cors-max-age", "whitelist-source-range", "allowlist-source-range",
    "denylist-source-range", "proxy-body-size", "limit-rps", "limit-rpm", "limit-connections",
    "limit-burst-multiplier", "limit-allowlist", "limit-whitelist", "auth-url", "auth-method", "auth-signin",
    "auth-signin-redirect-param", "auth-response-headers", "auth-request-redirect", "auth-always-set-cookie",
    "auth-type", "auth-secret", "auth-secret-type", "auth-realm", "affinity", "affinity-mode",
    "session-cookie-name", "session-cookie-path", "session-cookie-domain", "session-cookie-expires",
    "session-cookie-max-age", "session-cookie-secure", "session-cookie-samesite",
    "session-cookie-conditional-samesite-none", "session-cookie-change-on-failure", "custom-http-errors",
    "default-backend", "disable-proxy-intercept-errors", "proxy-connect-timeout", "force-ssl-redirect",
    "preserve-trailing-slash", "use-port-in-redirects",
})
# Translated into Gateway API objects and fields.
_NATIVE = frozenset({
    "rewrite-target", "use-regex", "app-root", "permanent-redirect", "permanent-redirect-code", "temporal-redirect",
    "temporal-redirect-code", "ssl-redirect", "upstream-vhost", "x-forwarded-prefix",
    "server-alias", "ssl-passthrough", "canary", "canary-by-header", "canary-by-header-value",
    "canary-by-header-pattern", "canary-by-cookie", "canary-weight", "canary-weight-total",
    "proxy-read-timeout", "proxy-next-upstream", "proxy-next-upstream-tries", "backend-protocol",
    "connection-proxy-header",
})

# What a GRPCRoute carries of a backend-protocol GRPC / GRPCS Ingress (the rest of _NATIVE is warned).
_GRPC_NATIVE = frozenset({"backend-protocol", "server-alias", "ssl-redirect", "canary", "canary-weight",
                          "canary-weight-total", "canary-by-header", "canary-by-header-value",
                          "canary-by-header-pattern", "canary-by-cookie"})
# A path a GRPCRoute method match can say: "/", "/SERVICE", "/SERVICE/METHOD".
_GRPC_PATH = re.compile(r"/(?:([^/]+)(?:/([^/]+))?/?)?")


@dataclass(slots=True)
class ConvertOptions:
    ingress_class: str = "nginx"
    gateway_class: str = "meshproxy"
    gateway_name: str = "nginx"
    gateway_namespace: str = "default"
    http_port: int = 80
    https_port: int = 443
    addresses: tuple[str, ...] = ()


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return (s or "any")[:63].rstrip("-")


def _regex(path: str) -> str:
    """nginx's ``~* "^PATH"`` as a Gateway API (full-match, Python re) path expression."""
    if "|" in path:
        return "(?i).*?(?:^" + path + ").*"
    return "(?i)" + path + ".*"


class _Converter:
    def __init__(self, objects: Iterable[Any], opts: ConvertOptions) -> None:
        self.opts = opts
        self.objects = list(objects)
        self.services = {(x.namespace, x.name): x for x in self.objects if x.kind == "Service"}
        self.secrets = {(x.namespace, x.name): x for x in self.objects if x.kind == "Secret"}
        self.warnings: list[str] = []
        self.docs: list[dict] = []
        self.https_hosts: list[str] = []     # hosts with an HTTPS listener, in listener order

    def warn(self, ing, what: str, why: str) -> None:
        self.warnings.append(f"Ingress {ing.namespace}/{ing.name}: {what}: {why}")

    def ours(self, ing) -> bool:
        return ing.class_name in (self.opts.ingress_class, None) or is_nginx(ing.meta.annotations)

    def port_number(self, ing, be) -> int | None:
        if be.port_number is not None:
            return be.port_number
        svc = self.services.get((ing.namespace, be.service))
        for sp in svc.ports if svc is not None else ():
            if sp.name == be.port_name:
                return sp.port
        return None

    def backend_ref(self, ing, be, weight: int | None = None) -> dict | None:
        if be.service is None:
            self.warn(ing, "backend", f"resource backend {be.resource} has no Gateway API equivalent")
            return None
        port = self.port_number(ing, be)
        if port is None:
            self.warn(ing, "backend", f"port {be.port_name!r} of Service {be.service} is not known; the path is left out")
            return None
        ref = {"name": be.service, "port": port}
        if weight is not None:
            ref["weight"] = weight
        return ref

    # -- the whole conversion --------------------------------------------------------------------

    def run(self) -> None:
        ingresses = sorted((x for x in self.objects if x.kind == "Ingress" and self.ours(x)),
                           key=lambda i: (i.meta.creation_timestamp or "\uffff", i.namespace, i.name))
        parsed: list[tuple[Any, NginxIngress]] = []
        for ing in ingresses:
            cfg = parse(ing, self.secrets)
            for f in cfg.findings:
                name = f.annotation[len(PREFIX):]
                if f.kind == "refused":
                    self.warn(ing, f.annotation, f.message.replace("the Ingress is not served", "not converted")
                              + ("" if name not in SNIPPETS else "; write what it does with Gateway API filters"))
                elif f.kind == "ignored" and name not in _EXTENSION and name not in _NATIVE:
                    known = "not an ingress-nginx annotation meshproxy knows" not in f.message
                    self.warn(ing, f.annotation, ("has no Gateway API or meshproxy equivalent" if known
                                                  else "unknown annotation") + "; not converted")
                elif f.kind in ("ignored", "denied"):
                    self.warn(ing, f.annotation, f.message)
            if not cfg.refused:
                parsed.append((ing, cfg))
        mains = [(i, c) for i, c in parsed if c.canary is None]
        canaries = [(i, c) for i, c in parsed if c.canary is not None]
        listeners = [{"name": "http", "port": self.opts.http_port, "protocol": "HTTP",
                      "allowedRoutes": {"namespaces": {"from": "All"}}}]
        tls_hosts: dict[str, tuple[str, str]] = {}
        passthrough: set[str] = set()
        for ing, cfg in mains:
            for t in ing.tls:
                for h in t.hosts:
                    if t.secret_name and h.lower() not in tls_hosts:
                        tls_hosts[h.lower()] = (ing.namespace, t.secret_name)
            if cfg.ssl_passthrough:
                passthrough.update(r.host.lower() for r in ing.rules if r.host)
        grants: set[str] = set()
        self.https_hosts = [h for h in sorted(tls_hosts) if h not in passthrough]
        for i, host in enumerate(self.https_hosts):
            ns, secret = tls_hosts[host]
            ref = {"kind": "Secret", "name": secret}
            if ns != self.opts.gateway_namespace:
                ref["namespace"] = ns
                grants.add(ns)
            listeners.append({"name": f"https-{i}", "hostname": host, "port": self.opts.https_port, "protocol": "HTTPS",
                              "tls": {"mode": "Terminate", "certificateRefs": [ref]},
                              "allowedRoutes": {"namespaces": {"from": "All"}}})
        for i, host in enumerate(sorted(passthrough)):
            listeners.append({"name": f"passthrough-{i}", "hostname": host, "port": self.opts.https_port,
                              "protocol": "TLS", "tls": {"mode": "Passthrough"},
                              "allowedRoutes": {"namespaces": {"from": "All"}, "kinds": [{"kind": "TLSRoute"}]}})
        self.docs.append({"apiVersion": GW, "kind": "GatewayClass", "metadata": {"name": self.opts.gateway_class},
                          "spec": {"controllerName": "meshproxy.dev/gateway-controller"}})
        gw: dict[str, Any] = {"apiVersion": GW, "kind": "Gateway",
                              "metadata": {"name": self.opts.gateway_name, "namespace": self.opts.gateway_namespace},
                              "spec": {"gatewayClassName": self.opts.gateway_class, "listeners": listeners}}
        if self.opts.addresses:
            gw["spec"]["addresses"] = [{"type": "IPAddress", "value": a} for a in self.opts.addresses]
        self.docs.append(gw)
        for ns in sorted(grants):
            self.docs.append({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
                              "metadata": {"name": f"{self.opts.gateway_name}-certificates", "namespace": ns},
                              "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                                 "namespace": self.opts.gateway_namespace}],
                                       "to": [{"group": "", "kind": "Secret"}]}})
        self.routes(mains, canaries, tls_hosts, passthrough)

    # -- routes ------------------------------------------------------------------------------------

    def routes(self, mains, canaries, tls_hosts, passthrough) -> None:
        # Locations by (namespace, host), in the order the Ingresses come (oldest first).
        groups: dict[tuple[str, str], list] = {}
        for ing, cfg in mains:
            for rule in ing.rules:
                for p in rule.paths:
                    groups.setdefault((ing.namespace, (rule.host or "").lower()), []).append((ing, cfg, p))
        regex_hosts = {host for (_ns, host), locs in groups.items()
                       for _ing, cfg, p in locs if cfg.use_regex or (cfg.rewrite_target and cfg.rewrite_target != p.path)}
        alternatives = self.canary_alternatives(groups, canaries)
        extensions: dict[tuple[str, str], str] = {}
        for (ns, host), locs in sorted(groups.items()):
            if host in passthrough:
                self.tls_route(ns, host, locs)
                continue
            regex = host in regex_hosts
            if regex:
                # ingress-nginx's location order: longer paths first, then reverse-alphabetical.
                locs = sorted(locs, key=lambda loc: loc[2].path, reverse=True)
                locs = sorted(locs, key=lambda loc: len(loc[2].path), reverse=True)
            aliases = next((list(cfg.aliases) for _i, cfg, _p in locs if cfg.aliases), [])
            hostnames = [host] + [a for a in aliases if a != host and (ns, a) not in groups] if host else []
            grpc_locs = [loc for loc in locs if loc[1].backend_protocol in ("GRPC", "GRPCS")]
            locs = [loc for loc in locs if loc[1].backend_protocol not in ("GRPC", "GRPCS")]
            rules = []
            for ing, cfg, p in locs:
                rules.extend(self.rules_for(ing, cfg, p, regex, alternatives, extensions))
            app_root = next((cfg.app_root for _i, cfg, _p in locs if cfg.app_root), "")
            if app_root:
                rules.insert(0, {"matches": [{"path": {"type": "Exact", "value": "/"}}],
                                 "filters": [{"type": "RequestRedirect", "requestRedirect": {
                                     "path": {"type": "ReplaceFullPath", "replaceFullPath": app_root}, "statusCode": 302}}]})
            name = _slug(host or "any-host")
            if grpc_locs:
                if host in tls_hosts:
                    https_ref = self.parent(section=f"https-{self.https_hosts.index(host)}")
                    redirect = any(cfg.ssl_redirect or cfg.force_ssl_redirect for _i, cfg, _p in grpc_locs)
                    parents = [https_ref] if redirect else [self.parent(section="http"), https_ref]
                else:
                    parents = [self.parent(section="http")]
                self.grpc_route(ns, f"{name}-grpc" if locs else name, hostnames, parents, grpc_locs, regex,
                                alternatives, extensions)
            if host in tls_hosts:
                redirect = any(cfg.ssl_redirect or cfg.force_ssl_redirect for _i, cfg, _p in locs)
                https_ref = self.parent(section=f"https-{self.https_hosts.index(host)}")
                if redirect:
                    self.route(ns, f"{name}-http-redirect", hostnames, [self.parent(section="http")], [
                        {"filters": [{"type": "RequestRedirect",
                                      "requestRedirect": {"scheme": "https", "statusCode": 308}}]}])
                    self.warnings.append(f"host {host}: the HTTPS redirect keeps a trailing '/' of the path and the "
                                         f"query (ingress-nginx drops the '/', unless preserve-trailing-slash)")
                    self.route(ns, name, hostnames, [https_ref], rules)
                else:
                    self.route(ns, name, hostnames, [self.parent(section="http"), https_ref], rules)
            else:
                # (force-ssl-redirect goes in the IngressNginxFilter: ingress-nginx's redirect drops
                # the path's trailing "/", which Gateway API's RequestRedirect cannot.)
                self.route(ns, name, hostnames, [self.parent(section="http")], rules)

    def parent(self, section: str | None = None) -> dict:
        ref = {"name": self.opts.gateway_name, "namespace": self.opts.gateway_namespace}
        if section:
            ref["sectionName"] = section
        return ref

    def route(self, ns: str, name: str, hostnames: list[str], parents: list[dict], rules: list[dict]) -> None:
        if not rules:
            return
        spec: dict[str, Any] = {"parentRefs": parents}
        if hostnames:
            spec["hostnames"] = hostnames
        spec["rules"] = rules
        self.docs.append({"apiVersion": GW, "kind": "HTTPRoute", "metadata": {"name": name, "namespace": ns},
                          "spec": spec})

    def tls_route(self, ns: str, host: str, locs) -> None:
        for ing, _cfg, p in locs:
            if p.path in ("/", ""):
                ref = self.backend_ref(ing, p.backend)
                if ref is None:
                    return
                self.docs.append({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TLSRoute",
                                  "metadata": {"name": _slug(host), "namespace": ns},
                                  "spec": {"parentRefs": [self.parent()], "hostnames": [host],
                                           "rules": [{"backendRefs": [ref]}]}})
                return
        self.warnings.append(f"host {host}: ssl-passthrough without a \"/\" path passes nothing through "
                             f"(as in ingress-nginx); not converted")

    def canary_alternatives(self, groups, canaries) -> dict:
        """(namespace, service, port) of a main path -> (canary Ingress, its config, its backend)."""
        out: dict = {}
        for ing, cfg in canaries:
            merged = False
            for rule in ing.rules:
                for p in rule.paths:
                    for mi, _mcfg, mp in groups.get((ing.namespace, (rule.host or "").lower()), ()):
                        if mp.path == p.path and mp.path_type == p.path_type and mp.backend.service != p.backend.service:
                            key = (mi.namespace, mp.backend.service, self.port_number(mi, mp.backend))
                            out.setdefault(key, (ing, cfg, p.backend))
                            merged = True
            if not merged:
                self.warn(ing, "canary", "no main Ingress has the same host, path and type; not converted")
        return out

    def extension(self, ing, ann: dict[str, str], rewrite: str, extensions) -> dict | None:
        """The ExtensionRef filter to the Ingress's IngressNginxFilter (written once), or None
        when none of its annotations needs one."""
        ext = {PREFIX + k: v for k, v in ann.items() if k in _EXTENSION}
        if rewrite:
            ext[PREFIX + "rewrite-target"] = rewrite
        if not ext:
            return None
        key = (ing.namespace, ing.name)
        if key not in extensions:
            extensions[key] = ing.name
            self.docs.append({"apiVersion": EXT_API, "kind": "IngressNginxFilter",
                              "metadata": {"name": ing.name, "namespace": ing.namespace},
                              "spec": {"annotations": dict(sorted(ext.items()))}})
        return {"type": "ExtensionRef", "extensionRef": {"group": "meshproxy.dev", "kind": "IngressNginxFilter",
                                                         "name": ing.name}}

    def grpc_route(self, ns: str, name: str, hostnames: list[str], parents: list[dict], locs, regex: bool,
                   alternatives, extensions) -> None:
        """backend-protocol GRPC / GRPCS paths as one GRPCRoute (what ingress2gateway writes):
        ``/SERVICE/METHOD`` and ``/SERVICE`` become method matches, ``/`` matches every call."""
        rules = []
        for ing, cfg, p in locs:
            path = p.path or "/"
            m = _GRPC_PATH.fullmatch(path)
            if m is None:
                self.warn(ing, "path", f"{path!r} is not /SERVICE or /SERVICE/METHOD, which a GRPCRoute matches; "
                          "not converted")
                continue
            if regex:
                self.warn(ing, "path", f"{path!r}: ingress-nginx matches it as a case-insensitive regular expression "
                          "(use-regex on this host); the GRPCRoute matches the service and method exactly")
            main = self.backend_ref(ing, p.backend)
            if main is None:
                continue
            ann = {k[len(PREFIX):]: v for k, v in ing.meta.annotations.items() if k.startswith(PREFIX)}
            for k in sorted(_NATIVE - _GRPC_NATIVE):
                if k in ann:
                    self.warn(ing, PREFIX + k, "has no GRPCRoute equivalent; not converted")
            if cfg.backend_protocol == "GRPCS":
                self.warn(ing, PREFIX + "backend-protocol", "GRPCS (HTTP/2 over TLS to the pods) needs a "
                          "BackendTLSPolicy, which meshproxy's Gateway does not implement yet; the route sends h2c")
            if self.speaks_http1(ing, p.backend):
                self.warn(ing, PREFIX + "backend-protocol", f"Service {p.backend.service}'s port does not say HTTP/2: "
                          "give it appProtocol: kubernetes.io/h2c (or grpc) so that the Gateway speaks h2c to its pods")
            rule: dict[str, Any] = {}
            if m.group(1):
                method = {"service": m.group(1)}
                if m.group(2):
                    method["method"] = m.group(2)
                rule["matches"] = [{"method": method}]
            ext = self.extension(ing, ann, "", extensions)
            if ext is not None:
                rule["filters"] = [ext]
            refs = [main]
            alt = alternatives.get((ing.namespace, p.backend.service, main["port"]))
            if alt is not None:
                cing, ccfg, cbe = alt
                canary = self.backend_ref(cing, cbe)
                c = ccfg.canary
                if c.header or c.cookie:
                    self.warn(cing, PREFIX + "canary", "a canary by header or cookie of a gRPC path is not converted")
                total = c.weight_total if c.weight_total > 100 else 100
                if canary is not None and c.weight > 0:
                    refs = [dict(main, weight=total - c.weight), dict(canary, weight=c.weight)]
            rule["backendRefs"] = refs
            rules.append(rule)
        if not rules:
            return
        spec: dict[str, Any] = {"parentRefs": parents}
        if hostnames:
            spec["hostnames"] = hostnames
        spec["rules"] = rules
        self.docs.append({"apiVersion": GW, "kind": "GRPCRoute", "metadata": {"name": name, "namespace": ns},
                          "spec": spec})

    def speaks_http1(self, ing, be) -> bool:
        """Would a Gateway speak HTTP/1.1 to this Service port's pods? (The rule of
        ``snapshot.backend_protocol``, repeated here: importing the snapshot would load the
        metrics library into ``meshproxy convert`` / the CLI before its multiprocess setup.)"""
        svc = self.services.get((ing.namespace, be.service))
        for sp in svc.ports if svc is not None else ():
            if (be.port_number is not None and sp.port == be.port_number) or (be.port_name and sp.name == be.port_name):
                if sp.app_protocol is not None:
                    return sp.app_protocol not in ("kubernetes.io/h2c", "grpc")
                return not (sp.name in ("grpc", "h2c", "http2") or (sp.name or "").startswith(("grpc-", "http2-")))
        return False

    def rules_for(self, ing, cfg: NginxIngress, p, regex: bool, alternatives, extensions) -> list[dict]:
        if regex:
            match = {"path": {"type": "RegularExpression", "value": _regex(p.path)}}
        elif p.path_type == "Exact":
            match = {"path": {"type": "Exact", "value": p.path}}
        else:
            match = {"path": {"type": "PathPrefix", "value": p.path or "/"}}
        main = self.backend_ref(ing, p.backend)
        if main is None:
            return []
        filters: list[dict] = []
        ann = {k[len(PREFIX):]: v for k, v in ing.meta.annotations.items() if k.startswith(PREFIX)}
        if cfg.redirect is not None:
            u = urlsplit(cfg.redirect[1])
            code = cfg.redirect[0]
            if code not in (301, 302, 303, 307, 308):
                self.warn(ing, PREFIX + "permanent-redirect-code", f"{code} is not a redirect status Gateway API "
                          f"allows (301, 302, 303, 307, 308); {302 if code < 301 else 301} instead")
                code = 302 if code < 301 else 301
            rr: dict[str, Any] = {"scheme": u.scheme, "statusCode": code}
            if u.hostname:
                rr["hostname"] = u.hostname
            rr["port"] = u.port or (443 if u.scheme == "https" else 80)
            rr["path"] = {"type": "ReplaceFullPath", "replaceFullPath": u.path or "/"}
            if u.query:
                self.warn(ing, PREFIX + "permanent-redirect", "the query of the redirect URL has no Gateway API field; "
                          "left out")
            if not u.path:
                self.warn(ing, PREFIX + "permanent-redirect", "ingress-nginx redirects to the URL as written, without "
                          "a path; Gateway API sends \"/\"")
            return [{"matches": [match], "filters": [{"type": "RequestRedirect", "requestRedirect": rr}]}]
        rewrite: dict[str, Any] = {}
        needs_rewrite = bool(cfg.rewrite_target) and cfg.rewrite_target != p.path
        if needs_rewrite and "$" not in cfg.rewrite_target:
            rewrite["path"] = {"type": "ReplaceFullPath", "replaceFullPath": cfg.rewrite_target}
        if cfg.upstream_vhost:
            rewrite["hostname"] = cfg.upstream_vhost
        if rewrite:
            filters.append({"type": "URLRewrite", "urlRewrite": rewrite})
        sets = []
        if needs_rewrite and cfg.x_forwarded_prefix:
            sets.append({"name": "X-Forwarded-Prefix", "value": cfg.x_forwarded_prefix})
        if cfg.connection_header:
            sets.append({"name": "Connection", "value": cfg.connection_header})
        if sets:
            filters.append({"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": sets}})
        ext = self.extension(ing, ann, cfg.rewrite_target if needs_rewrite and "$" in cfg.rewrite_target else "",
                             extensions)
        if ext is not None:
            filters.append(ext)
        extra: dict[str, Any] = {}
        if "proxy-read-timeout" in ann:
            extra["timeouts"] = {"backendRequest": f"{int(cfg.read_timeout)}s"}
        if any(k in ann for k in ("proxy-next-upstream", "proxy-next-upstream-tries")):
            codes = [int(x[5:]) for x in cfg.next_upstream if x.startswith("http_")]
            tries = 0 if "off" in cfg.next_upstream else max(cfg.next_upstream_tries - 1, 0)
            extra["retry"] = {"attempts": tries, "codes": codes} if codes else {"attempts": tries}
        if cfg.backend_protocol == "HTTPS":
            self.warn(ing, PREFIX + "backend-protocol", "HTTPS to the pods needs a BackendTLSPolicy, which meshproxy's "
                      "Gateway does not implement yet; the routes send plain HTTP")
        for k in ("proxy-send-timeout",):
            if k in ann:
                self.warn(ing, PREFIX + k, "has no Gateway API field; not converted")

        def rule(matches: list[dict], refs: list[dict]) -> dict:
            r: dict[str, Any] = {"matches": matches}
            if filters:
                r["filters"] = filters
            r["backendRefs"] = refs
            r.update(extra)
            return r
        key = (ing.namespace, p.backend.service, main["port"])
        alt = alternatives.get(key)
        if alt is None:
            return [rule([match], [main])]
        cing, ccfg, cbe = alt
        canary = self.backend_ref(cing, cbe)
        if canary is None:
            return [rule([match], [main])]
        c = ccfg.canary
        out = []
        if c.header:
            if c.header_value:
                hm = {"name": c.header, "value": c.header_value}
            elif c.pattern is not None:
                hm = {"type": "RegularExpression", "name": c.header, "value": f".*(?:{c.header_pattern}).*"}
            elif c.pattern_invalid:
                hm = None
            else:
                hm = {"name": c.header, "value": "always"}
                out.append(rule([{**match, "headers": [{"name": c.header, "value": "never"}]}], [main]))
            if hm is not None:
                out.append(rule([{**match, "headers": [hm]}], [canary]))
        if c.cookie:
            cookie = re.escape(c.cookie)
            for value, target in (("always", canary), ("never", main)):
                out.append(rule([{**match, "headers": [{"type": "RegularExpression", "name": "Cookie",
                                                        "value": f"(?i)(.*;\\s*)?{cookie}={value}(;.*)?"}]}], [target]))
            if c.header:
                self.warn(cing, PREFIX + "canary-by-cookie", "with canary-by-header too, a request carrying both "
                          "goes by Gateway API's precedence (one header match each), not header first")
        total = c.weight_total if c.weight_total > 100 else 100
        if c.weight > 0:
            out.append(rule([match], [dict(main, weight=total - c.weight), dict(canary, weight=c.weight)]))
        else:
            out.append(rule([match], [main]))
        if ccfg.affinity is not None or cfg.affinity is not None:
            self.warn(cing, PREFIX + "canary", "sticky canary sessions (an affinity cookie that keeps a client on the "
                      "canary) do not translate; each request is decided anew")
        return out


def convert(objects: Iterable[Any], opts: ConvertOptions | None = None) -> tuple[list[dict], list[str]]:
    """(Gateway API documents, warnings) for the Ingresses in ``objects``."""
    c = _Converter(objects, opts or ConvertOptions())
    c.run()
    return c.docs, c.warnings

