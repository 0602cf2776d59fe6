#!/usr/bin/env bash
# Installs the real programs the tests talk to (curl, dnsmasq, dig, promtool, slowhttptest;
# nft, ip, conntrack, tcpdump and tshark for the tests in network namespaces they create; etcd for the
# real API server tests; nginx, haproxy, wrk, h2load for the benchmark) when they are missing and we may
# install them (root with apt-get). Outside CI this is best effort: a test whose program is
# still missing skips and says why. In CI (CI set, as .ci/run does) a program that cannot be
# installed is an error here, and the tests that need it fail (tests/conftest.py: requires).
set -u
want=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have curl || want+=(curl)
have dnsmasq || want+=(dnsmasq-base)
have dig || want+=(dnsutils)
have promtool || want+=(prometheus)   # promtool check metrics
have slowhttptest || want+=(slowhttptest)   # the slow-read attack (tests/test_hostile.py)
# nftables rules inside network namespaces the tests create (the mesh's capture, --proxy-mode
# nftables and the namespace cluster of tests/netns.py)
have nft || want+=(nftables)
have ip || want+=(iproute2)
have conntrack || want+=(conntrack)
have tcpdump || want+=(tcpdump)
have etcd || want+=(etcd-server)      # tests/test_kube_apiserver.py (scripts/kube-apiserver.sh start)
have tshark || want+=(tshark)      # the mesh's wire check: TLS versions and ALPN between sidecars
if [ "${MESHPROXY_BENCH_DEPS:-0}" = 1 ]; then
  have nginx || want+=(nginx-light)
  have haproxy || want+=(haproxy)
  have wrk || want+=(wrk)
  have h2load || want+=(nghttp2-client)   # bench.h2bench / bench.h2soak (h2load)
fi
[ ${#want[@]} -eq 0 ] && exit 0
fail=0
[ -n "${CI:-}" ] && fail=1
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: not root or no apt-get; tests needing ${want[*]} will skip (fail in CI)" >&2
  exit $fail
fi
echo "system-deps: installing ${want[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Another engineer's apt may hold the lock: wait for it rather than failing.
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get install -y -q "${want[@]}" >/dev/null 2>&1 || {
  apt_get update -q >/dev/null 2>&1
  apt_get install -y -q "${want[@]}" >/dev/null 2>&1 || {
    echo "system-deps: apt-get install ${want[*]} failed; those tests will skip (fail in CI)" >&2
    exit $fail
  }
}
exit 0
