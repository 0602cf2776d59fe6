"""``meshproxy get gateways | gatewayclasses | httproutes | grpcroutes | tlsroutes | tcproutes``:
the Gateway API status meshproxy computes for the manifests, offline - the same conditions the
status writer puts on the objects in a cluster (``Snapshot.gateway_status``).

A table of the objects, then one line per condition (object, parent or listener, type,
status, reason, message); ``-o json`` prints the objects with their status as the API's
``status`` field would hold it.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["GATEWAY_TABLES", "gateway_table"]

GATEWAY_TABLES = {"gatewayclasses": "GatewayClass", "gateways": "Gateway", "httproutes": "HTTPRoute",
                  "grpcroutes": "GRPCRoute", "tlsroutes": "TLSRoute", "tcproutes": "TCPRoute"}


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["   ".join(str(v).ljust(w) for v, w in zip(header, widths)).rstrip()]
    lines += ["   ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _cond(conds: list[dict], ctype: str) -> str:
    for c in conds:
        if c["type"] == ctype:
            return f"{c['status']} ({c['reason']})"
    return "-"


def _parent(ref: dict, ns: str) -> str:
    kind = ref.get("kind", "Gateway")
    out = f"{kind} {ref.get('namespace') or ns}/{ref['name']}"
    if ref.get("sectionName"):
        out += f"/{ref['sectionName']}"
    if ref.get("port"):
        out += f":{ref['port']}"
    return out


def _listener(lst: Any, ls: dict) -> str:
    n = ls["attachedRoutes"]
    where = f"{lst.port}/{lst.protocol}, " if lst is not None else ""
    return f"{ls['name']}({where}{n} route{'' if n == 1 else 's'})"


def gateway_table(what: str, status: Mapping[tuple[str, str, str], dict], store: Any, output: str) -> str:
    kind = GATEWAY_TABLES[what]
    objs = sorted(store.list(kind), key=lambda o: (o.namespace, o.name))
    if output == "json":
        items = []
        for obj in objs:
            key = (kind, "" if kind == "GatewayClass" else obj.namespace, obj.name)
            item = {"kind": kind, "name": obj.name}
            if kind != "GatewayClass":
                item["namespace"] = obj.namespace
            item["status"] = status.get(key)
            items.append(item)
        return json.dumps(items, indent=2)
    rows, conds = [], []
    for obj in objs:
        key = (kind, "" if kind == "GatewayClass" else obj.namespace, obj.name)
        st = status.get(key)
        name = obj.name if kind == "GatewayClass" else f"{obj.namespace}/{obj.name}"
        if kind == "GatewayClass":
            c = (st or {}).get("conditions", [])
            rows.append([obj.name, obj.controller, _cond(c, "Accepted") if st else "- (not ours)"])
            conds += [[f"{kind} {name}", "", x["type"], x["status"], x["reason"], x["message"]] for x in c]
        elif kind == "Gateway":
            if st is None:
                rows.append([obj.namespace, obj.name, obj.class_name, "-", "- (not ours)", "-", ""])
                continue
            c = st["conditions"]
            # By name, not by position: the status lists the listeners it has, in its own order.
            spec = {lst.name: lst for lst in obj.listeners}
            listeners = ", ".join(_listener(spec.get(ls["name"]), ls) for ls in st["listeners"])
            rows.append([obj.namespace, obj.name, obj.class_name,
                         ",".join(a["value"] for a in st["addresses"]) or "<none>",
                         _cond(c, "Accepted"), _cond(c, "Programmed"), listeners])
            conds += [[f"{kind} {name}", "", x["type"], x["status"], x["reason"], x["message"]] for x in c]
            for ls in st["listeners"]:
                conds += [[f"{kind} {name}", f"listener {ls['name']}", x["type"], x["status"], x["reason"],
                           x["message"]] for x in ls["conditions"]]
        else:
            hosts = ",".join(getattr(obj, "hostnames", ())) or "*"
            parents = (st or {}).get("parents", [])
            accepted = ", ".join(_cond(p["conditions"], "Accepted") for p in parents) or "- (no parent of ours)"
            resolved = ", ".join(_cond(p["conditions"], "ResolvedRefs") for p in parents) or "-"
            # Without a parent of ours (a Gateway of another class, or one not in the manifests)
            # the route's own parentRefs are shown, so that a misspelt name is seen.
            named = ", ".join(_parent(p["parentRef"], obj.namespace) for p in parents) or ", ".join(
                _parent({"kind": r.kind, "name": r.name, "namespace": r.namespace, "sectionName": r.section_name,
                         "port": r.port}, obj.namespace) for r in getattr(obj, "parents", ()))
            rows.append([obj.namespace, obj.name, hosts if kind != "TCPRoute" else "-", named or "<none>",
                         accepted, resolved])
            for p in parents:
                conds += [[f"{kind} {name}", _parent(p["parentRef"], obj.namespace), x["type"], x["status"],
                           x["reason"], x["message"]] for x in p["conditions"]]
    header = {"GatewayClass": ["NAME", "CONTROLLER", "ACCEPTED"],
              "Gateway": ["NAMESPACE", "NAME", "CLASS", "ADDRESSES", "ACCEPTED", "PROGRAMMED", "LISTENERS"]}.get(
        kind, ["NAMESPACE", "NAME", "HOSTNAMES", "PARENTS", "ACCEPTED", "RESOLVEDREFS"])
    out = _table(rows, header)
    if conds:
        out += "\n\n" + _table(conds, ["OBJECT", "PARENT/LISTENER", "CONDITION", "STATUS", "REASON", "MESSAGE"])
    return out
