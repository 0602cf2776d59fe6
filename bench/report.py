"""Summaries of a benchmark run: Markdown for people (stdout) and JSON for tools
(bench/results/<timestamp>.json).

Every figure is a median over rounds, with min–max beside it. Ratios to a reference are taken
per round (candidate / reference, both measured in the same round, moments apart) and the
median of those ratios is shown — drift of the machine between rounds cancels out.
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

from bench.scenarios import Scenario


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(scenarios: list[Scenario], samples: list[dict]) -> dict:
    """{scenario: {"rows": [row, ...]}} with one row per (candidate, level)."""
    out: dict = {}
    for sc in scenarios:
        ss = [s for s in samples if s["scenario"] == sc.name]
        if not ss:
            continue
        keys: list[tuple] = []
        for s in ss:
            k = (s["candidate"], s.get("level"))
            if k not in keys:
                keys.append(k)
        rows = []
        for cand, level in keys:
            mine = [s for s in ss if s["candidate"] == cand and s.get("level") == level]
            ok = [s for s in mine if s["ok"]]
            vals = [s["value"] for s in ok]
            row = {
                "candidate": cand,
                "level": level,
                "rounds": len(mine),
                "ok_rounds": len(ok),
                "median": _med(vals),
                "min": min(vals) if vals else None,
                "max": max(vals) if vals else None,
                "unit": sc.unit,
                "errors": sum(s.get("errors", 0) or 0 for s in ok),
                "failures": [s["error"] for s in mine if not s["ok"]],
                "cpu_us_per_op": _med([s.get("cpu_us_per_op") for s in ok]),
                "proxy_cpu_pct": _med([s.get("proxy_cpu_pct") for s in ok]),
                "rss_mib": _med([s.get("rss_mib") for s in ok]),
                "pss_mib": _med([s.get("pss_mib") for s in ok]),
                "generator_cpu_pct": _med([s.get("generator_cpu_pct") for s in ok]),
                "target_rate": _med([s.get("target_rate") for s in ok]),
                "gbps": _med([s.get("gbps") for s in ok]),
                "ops": _med([s.get("ops") for s in ok]),
                "tool": ok[0].get("tool") if ok else None,
            }
            lags = [s["schedule_lag_ms"]["p99"] for s in ok if s.get("schedule_lag_ms")]
            row["send_lag_p99_ms"] = _med(lags)
            lat = [s.get("latency_ms") for s in ok if s.get("latency_ms")]
            row["latency_ms"] = (
                {k: _med([x[k] for x in lat]) for k in ("p50", "p90", "p99", "p999", "max")}
                if lat else None
            )
            row["ratios"] = {}
            row["p99_minus_ref_ms"] = {}
            for ref in sc.refs:
                if ref == cand:
                    continue
                rs, ds = [], []
                for s in ok:
                    r = next((x for x in ss if x["candidate"] == ref and x["round"] == s["round"]
                              and x.get("level") == level and x["ok"]), None)
                    if r is None:
                        continue
                    if r["value"]:
                        rs.append(s["value"] / r["value"])
                    if s.get("latency_ms") and r.get("latency_ms"):
                        ds.append(s["latency_ms"]["p99"] - r["latency_ms"]["p99"])
                if rs:
                    row["ratios"][ref] = round(statistics.median(rs), 3)
                if ds:
                    row["p99_minus_ref_ms"][ref] = round(statistics.median(ds), 3)
            rows.append(row)
        out[sc.name] = {"title": sc.title, "measures": sc.measures, "unit": sc.unit,
                        "op": sc.op, "refs": list(sc.refs), "rows": rows}
    return out


# ------------------------------------------------------------------------------ targets


def targets(summary: dict) -> list[dict]:
    """The issue's targets, checked against this run (n/a when a figure is missing)."""

    def row(sc, cand, level=None):
        for r in summary.get(sc, {}).get("rows", []):
            if r["candidate"] == cand and r["level"] == level and r["median"] is not None:
                return r
        return None

    res = []

    def add(name, value, ok, detail):
        res.append({"target": name, "value": value, "pass": ok, "detail": detail})

    m, n = row("l7-keepalive", "meshproxy"), row("l7-keepalive", "nginx")
    if m and "nginx" in m["ratios"]:
        add("L7 keep-alive req/s ≥ 1.0× nginx", m["ratios"]["nginx"], m["ratios"]["nginx"] >= 1.0,
            f"{m['median']:.0f} vs {n['median']:.0f} req/s" if n else "")
    else:
        add("L7 keep-alive req/s ≥ 1.0× nginx", None, None, "not measured")
    if m and n and m["cpu_us_per_op"] and n["cpu_us_per_op"]:
        r = m["cpu_us_per_op"] / n["cpu_us_per_op"]
        add("L7 CPU/request ≤ 1.2× nginx", round(r, 3), r <= 1.2,
            f"{m['cpu_us_per_op']:.1f} vs {n['cpu_us_per_op']:.1f} µs/req")
    else:
        add("L7 CPU/request ≤ 1.2× nginx", None, None, "not measured")
    lm = row("l7-latency", "meshproxy", 50)
    if lm and "nginx" in lm["p99_minus_ref_ms"]:
        d = lm["p99_minus_ref_ms"]["nginx"]
        add("p99 at 50 % of nginx max ≤ nginx p99 + 1 ms", d, d <= 1.0, f"Δp99 {d:+.3f} ms")
    else:
        add("p99 at 50 % of nginx max ≤ nginx p99 + 1 ms", None, None, "not measured")
    # One target, two yardsticks: it passes only when meshproxy is ≥ 4× both Python proxies;
    # the value is the smaller ratio; with one of them missing it is n/a (or a fail).
    ratios, parts = {}, []
    for ref, label in (("aiohttp", "aiohttp"), ("proxypy", "proxy.py")):
        p = row("l7-keepalive", ref)
        if m and p and p["median"]:
            ratios[ref] = m["median"] / p["median"]
            parts.append(f"{label} {ratios[ref]:.2f}× ({m['median']:.0f} vs {p['median']:.0f} req/s)")
        else:
            parts.append(f"{label} not measured")
    low = min(ratios.values()) if ratios else None
    add("L7 ≥ 4× aiohttp and proxy.py", None if low is None else round(low, 2),
        False if low is not None and low < 4.0 else (True if len(ratios) == 2 else None),
        "; ".join(parts))
    b = row("l4-bulk", "meshproxy")
    for ref, goal in (("haproxy", 1.3), ("direct", 0.75)):
        name = f"L4 bulk ≥ {goal}× {ref}"
        if b and ref in b["ratios"]:
            add(name, b["ratios"][ref], b["ratios"][ref] >= goal, f"{b['median']:.2f} Gbit/s")
        else:
            add(name, None, None, "not measured")
    c = row("l4-connrate", "meshproxy")
    if c and "haproxy" in c["ratios"]:
        add("L4 conn/s ≥ 1.0× HAProxy", c["ratios"]["haproxy"], c["ratios"]["haproxy"] >= 1.0,
            f"{c['median']:.0f} conn/s")
    else:
        add("L4 conn/s ≥ 1.0× HAProxy", None, None, "not measured")
    for sc in ("l7-keepalive", "l4-connrate"):
        one, two = row(sc, "meshproxy"), row(sc, "meshproxy-2w")
        if one and two and one["median"]:
            r = two["median"] / one["median"]
            gen = two.get("generator_cpu_pct") or 0
            add(f"{sc}: 2 workers ≥ 1.6× 1 worker", round(r, 2), r >= 1.6,
                f"load generator at {gen:.0f} % CPU" + (" (it is the bottleneck)" if gen >= 90 else ""))
    i = row("l7-idle", "meshproxy")
    if i:
        add("10,000 idle keep-alive connections ≤ 100 MiB RSS", i["median"], i["median"] <= 100,
            "RSS added")
    else:
        add("10,000 idle keep-alive connections ≤ 100 MiB RSS", None, None, "not measured")
    return res


# ------------------------------------------------------------------------------ Markdown


def _f(x, nd=1, dash="–"):
    if x is None:
        return dash
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def markdown(meta: dict, summary: dict, peers: dict, tgts: list[dict]) -> str:
    L: list[str] = []
    L.append(f"# meshproxy benchmark — {meta['started']}")
    L.append("")
    L.append(f"Machine: {meta['machine']['cpu']} × {meta['machine']['cores']} cores, "
             f"{meta['machine']['kernel']}, Python {meta['machine']['python']}. "
             f"Rounds {meta['rounds']}, {meta['duration']} s per run, candidates interleaved; "
             f"pinning {'on: proxies on CPU ' + str(meta['pin']['proxy']) + ', generators/backends on CPU ' + str(meta['pin']['load']) if meta['pin'] else 'off'}.")
    if meta["machine"]["cores"] <= 2 and not meta["pin"]:
        L.append("")
        L.append("> Caveat: the load generator, the backend and the proxy share "
                 f"{meta['machine']['cores']} cores. Use `--pin` so they do not fight for one.")
    L.append("")
    L.append("| peer | status | version / note |")
    L.append("|---|---|---|")
    for name, p in peers.items():
        L.append(f"| {name} | {p['status']} | {p.get('version') or ''}"
                 f"{' — ' + p['note'] if p.get('note') else ''}"
                 f"{' — ' + p['reason'].splitlines()[0] if p.get('reason') else ''} |")
    for name, sc in summary.items():
        L.append("")
        L.append(f"## {name} — {sc['title']}")
        L.append("")
        L.append(f"_{sc['measures']}._")
        L.append("")
        rows = sc["rows"]
        refs = sc["refs"]
        if name == "l7-latency":
            L.append("| candidate | load | target req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | "
                     "max ms | p99 − nginx p99 | proxy CPU µs/req | gen CPU | gen send lag p99 ms | errors |")
            L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for r in sorted(rows, key=lambda r: (r["level"] or 0)):
                lat = r["latency_ms"] or {}
                d = r["p99_minus_ref_ms"].get("nginx")
                sat = (r["median"] is not None and r["target_rate"]
                       and r["median"] < 0.97 * r["target_rate"])
                L.append(f"| {r['candidate']} | {r['level']} % | {_f(r['target_rate'], 0)} | "
                         f"{_f(r['median'], 0)}{' (saturated)' if sat else ''} | "
                         f"{_f(lat.get('p50'), 2)} | {_f(lat.get('p99'), 2)} | "
                         f"{_f(lat.get('p999'), 2)} | {_f(lat.get('max'), 2)} | "
                         f"{'–' if d is None else f'{d:+.2f} ms'} | {_f(r['cpu_us_per_op'])} | "
                         f"{_f(r['generator_cpu_pct'], 0)} % | {_f(r['send_lag_p99_ms'], 2)} | {_errs(r)} |")
            L.append("")
            L.append(f"Base rate: {_f((meta.get('latency_base') or {}).get('rps'), 0)} req/s "
                     f"({(meta.get('latency_base') or {}).get('from', '')}). 'gen send lag' is how late "
                     "the generator itself sent requests against the schedule (1 ms timer "
                     "granularity, its own CPU share): a floor under the latencies, common to all "
                     "candidates.")
        elif name == "l7-idle":
            L.append("| candidate | RSS added, MiB | × nginx | connections held | proxy RSS MiB | errors |")
            L.append("|---|---:|---:|---:|---:|---:|")
            for r in rows:
                L.append(f"| {r['candidate']} | {_f(r['median'])} | {_ratio(r, 'nginx')} | "
                         f"{_f(r['ops'], 0)} | "
                         f"{_f(r['rss_mib'])} | {_errs(r)} |")
        else:
            unit = sc["unit"]
            extra = " | Gbit/s" if name in ("l7-10k", "l7-1m") else ""
            L.append(f"| candidate | {unit} (median) | min–max | "
                     + " | ".join(f"× {ref}" for ref in refs)
                     + (" | p50 ms | p99 ms | p99.9 ms" if sc["unit"] != "Gbit/s" else "")
                     + extra
                     + f" | proxy CPU µs/{sc['op']} | proxy CPU | RSS MiB | gen CPU | errors |")
            ncols = 3 + len(refs) + (3 if sc["unit"] != "Gbit/s" else 0) + (1 if extra else 0) + 5
            L.append("|---|" + "---:|" * (ncols - 1))
            for r in rows:
                lat = r["latency_ms"] or {}
                cells = [r["candidate"], _f(r["median"], 2 if unit == "Gbit/s" else 0),
                         f"{_f(r['min'], 2 if unit == 'Gbit/s' else 0)}–{_f(r['max'], 2 if unit == 'Gbit/s' else 0)}"]
                cells += [_ratio(r, ref) for ref in refs]
                if sc["unit"] != "Gbit/s":
                    cells += [_f(lat.get("p50"), 2), _f(lat.get("p99"), 2), _f(lat.get("p999"), 2)]
                if extra:
                    cells.append(_f(r["gbps"], 2))
                cells += [_f(r["cpu_us_per_op"]), _pct(r["proxy_cpu_pct"]), _f(r["rss_mib"]),
                          _pct(r["generator_cpu_pct"]), _errs(r)]
                L.append("| " + " | ".join(cells) + " |")
        gens = [r for r in rows if (r.get("generator_cpu_pct") or 0) >= 90]
        if gens:
            L.append("")
            L.append("Load generator near 100 % CPU for: "
                     + ", ".join(sorted({r["candidate"] for r in gens}))
                     + " — these figures are bounded by the generator, not the proxy.")
        fails = [(r["candidate"], f) for r in rows for f in r["failures"]]
        for cand, f in fails[:6]:
            L.append("")
            L.append(f"- {cand}: failed run: {f.splitlines()[0][:200]}")
    if tgts:
        L.append("")
        L.append("## Targets (issue 5)")
        L.append("")
        L.append("| target | measured | result | detail |")
        L.append("|---|---:|---|---|")
        for t in tgts:
            res = "n/a" if t["pass"] is None else ("pass" if t["pass"] else "**FAIL**")
            L.append(f"| {t['target']} | {_f(t['value'], 2)} | {res} | {t['detail']} |")
    L.append("")
    return "\n".join(L)


def _ratio(r: dict, ref: str) -> str:
    if r["candidate"] == ref:
        return "1.00"
    v = r["ratios"].get(ref)
    return "–" if v is None else f"{v:.2f}"


def _pct(x) -> str:
    return "–" if x is None else f"{x:.0f} %"


def _errs(r: dict) -> str:
    e = r["errors"]
    f = len(r["failures"])
    return f"{e}" + (f" ({f} failed runs)" if f else "")


def machine() -> dict:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count() or 1, "kernel": platform.release(),
            "python": platform.python_version()}


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))
