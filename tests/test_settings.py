"""``--config FILE``: a real ConfigMap (every value a string) or a plain YAML mapping, converted
and checked key by key, flags winning over it, and re-read by a running process on change and
on SIGHUP (live settings applied, the others reported as waiting for a restart)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from backends import Backend, ingress_yaml, request, service_yaml
from meshproxy.cli import build_parser, settings_from_args
from meshproxy.core.settings import SETTING_KEYS, Settings, SettingsFileError, diff_settings, read_settings_file
from proc import ROOT, Meshproxy, free_port, http_get, wait_for

CONFIGMAP = textwrap.dedent("""\
    apiVersion: v1
    kind: ConfigMap
    metadata:
      name: meshproxy
      namespace: kube-system
    data:
      node: node-a
      ingress-listen: "127.0.0.1:8080"
      ingress-tls-listen: ""
      admin-listen: "127.0.0.1:9902"
      workers: "2"
      log-level: warning
      access-log: "-"
      service-cidr: "127.97.0.0/16"
      lb-policy: round_robin
      l7-lb-policy: least_connections
      ingress-class: edge
      watch-ingress-without-class: "false"
      trusted-proxies: "10.0.0.0/8,127.0.0.1/32"
      drain-timeout: "2"
      shutdown-delay: "0.5"
      connect-timeout: "250ms"
      idle-timeout: "2m"
      upstream-timeout: "30s"
      header-timeout: "5"
      keepalive-timeout: "1h"
      send-timeout: "10"
      max-body-size: "1m"
      max-connections: "5000"
      default-tls-secret: ingress/default-cert
      health-checks: "true"
      dns-server: "127.0.0.53,10.0.0.10:5353"
      dns-min-ttl: "1"
      dns-max-ttl: "600"
      dns-listen: "127.0.0.1:5300"
      cluster-domain: cluster.example
      http-parser: strict
      kubeconfig: /etc/kube/config
      context: prod
      namespace: team-a
      update-status: "false"
      publish-status-address: "203.0.113.7,lb.example.com"
      publish-service: ingress/edge
      access-log-format: json
      access-log-buffer: "4096"
      otlp-endpoint: "http://127.0.0.1:4318"
      trace-sampling: "0.25"
      trust-domain: mesh.example
      identity-dir: /var/run/svid
      identity-issuer: ""
      identity-issuer-ca: /etc/mesh/ca.pem
      identity-token-file: /var/run/token
      mesh-root-namespace: mesh-system
      request-buffer-size: "64k"
      gateway-address: "127.0.0.2,::1"
      dns-upstream: "127.0.0.53"
      proxy-mode: nftables
      nft-table: meshproxy_test
      udp-idle-timeout: "45s"
    """)

EXPECTED = dict(
    node="node-a", ingress_listen=("127.0.0.1", 8080), ingress_tls_listen=None, admin_listen=("127.0.0.1", 9902),
    workers=2, log_level="warning", access_log="-", service_cidr="127.97.0.0/16", lb_policy="round_robin",
    l7_lb_policy="least_connections", ingress_class="edge", watch_ingress_without_class=False,
    trusted_proxies=("10.0.0.0/8", "127.0.0.1/32"), drain_timeout=2.0, shutdown_delay=0.5, connect_timeout=0.25,
    idle_timeout=120.0, upstream_timeout=30.0, header_timeout=5.0, keepalive_timeout=3600.0, send_timeout=10.0,
    max_body_size=1 << 20, max_connections=5000, default_tls_secret="ingress/default-cert", health_checks=True,
    dns_servers=(("127.0.0.53", 53), ("10.0.0.10", 5353)), dns_min_ttl=1.0, dns_max_ttl=600.0,
    dns_listen=("127.0.0.1", 5300), cluster_domain="cluster.example", http_parser="strict",
    kubeconfig="/etc/kube/config", kube_context="prod", kube_namespace="team-a", update_status=False,
    publish_status_address=("203.0.113.7", "lb.example.com"), publish_service="ingress/edge",
    access_log_format="json", access_log_buffer=4096, otlp_endpoint="http://127.0.0.1:4318", trace_sampling=0.25,
    trust_domain="mesh.example", identity_dir="/var/run/svid", identity_issuer=None,
    identity_issuer_ca="/etc/mesh/ca.pem", identity_token_file="/var/run/token", mesh_root_namespace="mesh-system",
    request_buffer_size=64 << 10, gateway_addresses=("127.0.0.2", "::1"), dns_upstreams=(("127.0.0.53", 53),),
    proxy_mode="nftables", nft_table="meshproxy_test", udp_idle_timeout=45.0,
)


def test_a_configmap_sets_every_key_from_its_string(tmp_path):
    f = tmp_path / "cm.yaml"
    f.write_text(CONFIGMAP)
    values = read_settings_file(str(f))
    assert values == EXPECTED
    # Every key the file may hold is in this ConfigMap: nothing is left untested.
    assert {k.field for k in SETTING_KEYS.values()} == set(EXPECTED)


def test_a_plain_mapping_with_native_values(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("drain-timeout: 2\nworkers: 3\nwatch-ingress-without-class: false\n"
                 "trusted-proxies: [10.0.0.0/8, 127.0.0.1/32]\nmax-body-size: 1024\nconnect-timeout: 0.5\n")
    assert read_settings_file(str(f)) == {"drain_timeout": 2.0, "workers": 3, "watch_ingress_without_class": False,
                                          "trusted_proxies": ("10.0.0.0/8", "127.0.0.1/32"),
                                          "max_body_size": 1024, "connect_timeout": 0.5}


@pytest.mark.parametrize("line, message", [
    ('drain-timeout: "soon"', "drain-timeout: must be a duration in seconds (10, 2.5, 500ms, 2m), not 'soon'"),
    ('drain-timeout: "-1"', "drain-timeout: must be a duration in seconds (10, 2.5, 500ms, 2m), not '-1'"),
    ('workers: "two"', "workers: must be a whole number, not 'two'"),
    ('workers: "0"', "workers: 0 is outside 1-256"),
    ('workers: "2.5"', "workers: must be a whole number, not '2.5'"),
    ('watch-ingress-without-class: "yes"', "watch-ingress-without-class: must be true or false, not 'yes'"),
    ('trusted-proxies: "10.0.0.0/8,bogus"', "trusted-proxies: 'bogus' is not an address range (CIDR)"),
    ('lb-policy: fastest', "lb-policy: 'fastest' is not one of random, round_robin, least_connections, p2c, ring_hash, maglev"),
    ('ingress-listen: "8080"', "ingress-listen: '8080': expected HOST:PORT"),
    ('max-body-size: "1 tonne"', "max-body-size: must be a size in bytes (1048576, 512k, 1m), not '1 tonne'"),
    ('publish-service: edge', "publish-service: 'edge' must be NAMESPACE/NAME"),
    ('dns-server: "resolver.example"', "dns-server: 'resolver.example': 'resolver.example' is not an IP address"),
    ('node: {name: a}', "node: must be a string, not a mapping"),
    ('drain_timeout: "2"', "drain_timeout: unknown setting (did you mean 'drain-timeout'?)"),
    ('takeover: "true"', "takeover: unknown setting"),
    ('trace-sampling: "2"', "trace-sampling: 2 is outside 0..1"),
    ('proxy-mode: ipvs', "proxy-mode: 'ipvs' is not one of userspace, nftables"),
    ('gateway-address: "gw.example"', "gateway-address: 'gw.example' is not an IP address"),
    ('service-cidr: "10.0.0.0/16,10.1.0.0/16"', "service-cidr: 10.0.0.0/16,10.1.0.0/16: two ranges must be of different families"),
    ('otlp-endpoint: "collector:4318"', "otlp-endpoint: 'collector:4318': expected http(s)://HOST[:PORT][/PATH]"),
    ('trust-domain: "Mesh"', "trust-domain: 'Mesh': lowercase letters, digits, '.', '-', '_' (a SPIFFE trust domain)"),
])
def test_bad_values_name_file_line_and_key(tmp_path, line, message):
    f = tmp_path / "cm.yaml"
    f.write_text(f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: m}}\ndata:\n  log-level: info\n  {line}\n")
    with pytest.raises(SettingsFileError) as exc:
        read_settings_file(str(f))
    assert exc.value.problems == [f"{f}:6: {message}"]


def test_every_problem_is_reported_and_structure_errors_are_located(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("workers: x\nnope: 1\ndns-min-ttl: 10\ndns-max-ttl: 5\n")
    with pytest.raises(SettingsFileError) as exc:
        read_settings_file(str(f))
    assert exc.value.problems == [f"{f}:1: workers: must be a whole number, not 'x'", f"{f}:2: nope: unknown setting",
                                  f"{f}:3: dns-min-ttl: must not exceed dns-max-ttl"]
    for text, message in [("- a\n- b\n", "1: expected a mapping of settings or a ConfigMap, not a list"),
                          ("kind: ConfigMap\ndata: [a]\n", "2: data: must be a mapping, not a list"),
                          ("a: [\n", "2: invalid YAML: did not find expected node content"),
                          ("a: 1\na: 2\n", "2: invalid YAML: found duplicate key 'a'")]:
        f.write_text(text)
        with pytest.raises(SettingsFileError) as exc:
            read_settings_file(str(f))
        assert exc.value.problems == [f"{f}:{message}"], text
    with pytest.raises(SettingsFileError, match="cannot read"):
        read_settings_file(str(tmp_path / "missing.yaml"))


def test_flags_win_over_the_file_and_are_not_the_files_to_change(tmp_path):
    f = tmp_path / "cm.yaml"
    f.write_text(CONFIGMAP)
    args = build_parser().parse_args(["run", "-f", str(tmp_path), "--config", str(f), "--workers", "3",
                                      "--trusted-proxies", "192.168.0.0/16"])
    s = settings_from_args(args)
    assert (s.workers, s.trusted_proxies, s.drain_timeout, s.log_level) == (3, ("192.168.0.0/16",), 2.0, "warning")
    assert s.from_flags == {"workers", "trusted_proxies"} and s.config_file == str(f)
    # A re-read: the flags' fields are never changed; a key that left the file is back to its
    # default; live and restart-only changes are told apart.
    values = dict(EXPECTED, trusted_proxies=("10.1.0.0/16",), workers=8, drain_timeout=7.0, lb_policy="maglev")
    del values["log_level"]
    live, restart = diff_settings(s, values)
    assert live == {"drain_timeout": 7.0, "lb_policy": "maglev", "log_level": "info"}
    assert restart == []
    values["node"] = "node-b"
    values["ingress_listen"] = ("127.0.0.1", 8081)
    assert diff_settings(s, values)[1] == ["node", "ingress-listen"]


def test_cli_starts_with_a_configmap_and_refuses_a_bad_one(tmp_path):
    """On main this crashed with a TypeError (a ConfigMap's "2" is not a number)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "svc.yaml").write_text(service_yaml("web", []))
    cm = tmp_path / "cm.yaml"
    cm.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: m}\ndata:\n"
                  '  drain-timeout: "1"\n  workers: "2"\n  trusted-proxies: "10.0.0.0/8,127.0.0.1/32"\n'
                  '  health-checks: "false"\n')
    mp = Meshproxy([str(tmp_path / "m")], "--config", str(cm))
    with mp:
        assert http_get(mp.admin + "/readyz") == (200, b"ready\n")
        assert "Traceback" not in mp.output()
    cm.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: m}\ndata:\n  drain-timeout: later\n")
    r = subprocess.run([sys.executable, "-m", "meshproxy", "run", "-f", str(tmp_path / "m"), "--config", str(cm),
                        "--admin-listen", f"127.0.0.1:{free_port()}"], cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines() == [
        f"{cm}:5: drain-timeout: must be a duration in seconds (10, 2.5, 500ms, 2m), not 'later'",
        f"meshproxy: --config {cm}: 1 problem(s); not starting"]


def _configmap(trusted: str, policy: str = "random", workers: str = "1") -> str:
    return ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: meshproxy}\ndata:\n"
            f'  trusted-proxies: "{trusted}"\n  lb-policy: {policy}\n  workers: "{workers}"\n'
            '  health-checks: "false"\n')


def _xff_seen(backend: Backend, port: int) -> str:
    # A new client connection each time: the trusted-proxy verdict is taken per connection.
    r, _body, c = request(port, "GET", "/x", host="web.test", headers={"X-Forwarded-For": "203.0.113.9"})
    c.close()
    assert r.status == 200
    headers = dict((n.lower(), v) for n, v in backend.seen[-1][2])
    return headers.get("x-forwarded-for", "")


def _problems(mp: Meshproxy) -> list[str]:
    return mp.snapshot()["problems"]


def _policy(mp: Meshproxy) -> str:
    return next(b["policy"] for b in mp.snapshot()["backends"] if b["backend"].startswith("default/web"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_running_process_applies_live_settings_and_reports_the_rest(tmp_path, workers):
    """The ConfigMap changes under a running process: trusted proxies and the L4 policy take
    effect (also in --workers children), a workers change waits for a restart and says so, a
    broken file is refused and changes nothing, and SIGHUP re-reads too."""
    with Backend() as backend:
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "app.yaml").write_text(service_yaml("web", [backend]) + "---\n"
                                                 + ingress_yaml("web", [("web.test", "/", "Prefix", "web")]))
        cm = tmp_path / "cm.yaml"
        cm.write_text(_configmap("10.0.0.0/8", workers=workers))
        port = free_port()
        with Meshproxy([str(tmp_path / "m")], "--config", str(cm), "--ingress-listen", f"127.0.0.1:{port}") as mp:
            # The test client (127.0.0.1) is not trusted: its X-Forwarded-For is replaced.
            assert _xff_seen(backend, port) == "127.0.0.1"
            assert _policy(mp) == "random" and _problems(mp) == []

            cm.write_text(_configmap("10.0.0.0/8,127.0.0.1/32", policy="least_connections", workers=workers))
            wait_for(lambda: _policy(mp) == "least_connections", 5, what="lb-policy applied")
            wait_for(lambda: _xff_seen(backend, port) == "203.0.113.9, 127.0.0.1", 5, what="trusted proxies applied")
            assert _problems(mp) == []

            cm.write_text(_configmap("10.0.0.0/8,127.0.0.1/32", policy="least_connections", workers="3"))
            want = f"config: {cm}: workers: changed in the file; takes effect after a restart"
            wait_for(lambda: _problems(mp) == [want], 5, what="restart reported")
            assert "meshproxy_config_problems 1.0" in mp.metrics()

            cm.write_text(_configmap("10.0.0.0/8,bogus", policy="least_connections", workers=workers))
            refused = f"config: refused reload: {cm}:5: trusted-proxies: 'bogus' is not an address range (CIDR)"
            wait_for(lambda: _problems(mp) == [refused], 5, what="bad file refused")
            assert _xff_seen(backend, port) == "203.0.113.9, 127.0.0.1"       # the settings in force stay

            # SIGHUP: the same length and the old modification time, so only the signal can
            # make the process look at the file again.
            st = cm.stat()
            text = _configmap("10.0.0.0/8,127.0.0.22/32", policy="ring_hash", workers=workers)
            assert len(text) == st.st_size
            cm.write_text(text)
            os.utime(cm, ns=(st.st_atime_ns, st.st_mtime_ns))
            mp.send(signal.SIGHUP)
            wait_for(lambda: _policy(mp) == "ring_hash", 5, what="SIGHUP re-read")
            assert _problems(mp) == []
            assert _xff_seen(backend, port) == "127.0.0.1"
            assert re.search(r"settings: .*lb-policy='ring_hash'", mp.output())


def test_settings_defaults_are_the_documented_ones():
    s = Settings()
    assert (s.drain_timeout, s.workers, s.trusted_proxies, s.max_connections) == (30.0, 1, (), None)
