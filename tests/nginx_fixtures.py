"""Manifest builders for the ingress-nginx tests: the ``nginx`` IngressClass, Services with
pods at given addresses, Ingresses with annotations (the shape of ingress-nginx's e2e
framework: one rule, one path, pathType Prefix unless told otherwise)."""

from __future__ import annotations

import base64

__all__ = ["CLASS", "ANN", "ingress", "service", "secret", "manifests"]

ANN = "nginx.ingress.kubernetes.io/"

CLASS = """apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: nginx}
spec: {controller: meshproxy.dev/ingress}
"""


def _quote(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def ingress(name: str, host: str | None, path: str, svc: str, annotations: dict[str, str] | None = None, *,
            ptype: str = "Prefix", port: int | str = 80, ns: str = "default", tls: list[str] | None = None,
            secret: str | None = None, created: str | None = None, cls: str | None = "nginx",
            paths: list[tuple[str, str, str]] | None = None, default_service: str | None = None) -> str:
    """One Ingress. ``annotations`` keys without the ingress-nginx prefix get it; ``paths``
    (path, pathType, service) replaces the single path."""
    ann = {}
    for k, v in (annotations or {}).items():
        ann[k if "/" in k else ANN + k] = v
    meta = f"name: {name}, namespace: {ns}"
    if created:
        meta += f", creationTimestamp: {created!r}"
    if ann:
        meta += ", annotations: {" + ", ".join(f"{_quote(k)}: {_quote(v)}" for k, v in ann.items()) + "}"
    lines = ["apiVersion: networking.k8s.io/v1", "kind: Ingress", f"metadata: {{{meta}}}", "spec:"]
    if cls:
        lines.append(f"  ingressClassName: {cls}")
    pnum = f"number: {port}" if isinstance(port, int) else f"name: {port}"
    if default_service:
        lines.append(f"  defaultBackend: {{service: {{name: {default_service}, port: {{{pnum}}}}}}}")
    if tls is not None:
        lines.append(f"  tls: [{{hosts: [{', '.join(tls)}], secretName: {secret or 'tls'}}}]")
    if path is not None or paths:
        lines.append("  rules:")
        lines.append(f"  - host: {host}" if host else "  - http:")
        if host:
            lines.append("    http:")
        lines.append("      paths:")
        for p, pt, s in paths or [(path, ptype, svc)]:
            lines.append(f"      - {{path: {_quote(p)}, pathType: {pt}, backend: {{service: {{name: {s}, port: {{{pnum}}}}}}}}}")
    return "\n".join(lines) + "\n"


def service(name: str, endpoints: list[tuple[str, int]], ns: str = "default", port: int = 80) -> str:
    """A Service ``name`` (port ``port`` named http) and one ready pod per (ip, port)."""
    docs = []
    for i, (ip, p) in enumerate(endpoints):
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}-{i}, namespace: {ns}, labels: {{app: {name}}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {p}}}]}}]}}
status: {{podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
""")
    docs.append(f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: {port}, targetPort: http}}]
""")
    return "---\n".join(docs)


def secret(name: str, data: dict[str, bytes], ns: str = "default", stype: str = "Opaque") -> str:
    items = ", ".join(f"{_quote(k)}: {base64.b64encode(v).decode()}" for k, v in data.items())
    return f"""apiVersion: v1
kind: Secret
type: {stype}
metadata: {{name: {name}, namespace: {ns}}}
data: {{{items}}}
"""


def manifests(*docs: str) -> str:
    return "---\n".join((CLASS,) + docs)
