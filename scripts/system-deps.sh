#!/usr/bin/env bash
# Installs the real programs some tests talk to (curl, dnsmasq, dig, nft, conntrack, ip, tcpdump,
# nginx, haproxy, wrk) when
# they are missing and we may install them (root with apt-get). Best effort: a test whose
# program is still missing skips and says why.
set -u
want=()
command -v curl >/dev/null 2>&1 || want+=(curl)
command -v dnsmasq >/dev/null 2>&1 || want+=(dnsmasq-base)
command -v dig >/dev/null 2>&1 || want+=(dnsutils)
command -v promtool >/dev/null 2>&1 || want+=(prometheus)   # promtool check metrics
command -v slowhttptest >/dev/null 2>&1 || want+=(slowhttptest)   # the slow-read attack (tests/test_hostile.py)
# nftables rules inside network namespaces the tests create (the mesh's capture, --proxy-mode
# nftables and the namespace cluster of tests/netns.py)
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || want+=(nftables)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || want+=(iproute2)
command -v conntrack >/dev/null 2>&1 || [ -x /usr/sbin/conntrack ] || want+=(conntrack)
command -v tcpdump >/dev/null 2>&1 || [ -x /usr/bin/tcpdump ] || want+=(tcpdump)
if [ "${MESHPROXY_BENCH_DEPS:-0}" = 1 ]; then
  command -v nginx >/dev/null 2>&1 || want+=(nginx-light)
  command -v haproxy >/dev/null 2>&1 || want+=(haproxy)
  command -v wrk >/dev/null 2>&1 || want+=(wrk)
fi
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: not root or no apt-get; tests needing ${want[*]} will skip" >&2
  exit 0
fi
echo "system-deps: installing ${want[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${want[@]}" >/dev/null 2>&1 || {
  apt-get update -q >/dev/null 2>&1
  apt-get install -y -q "${want[@]}" >/dev/null 2>&1 || echo "system-deps: apt-get install ${want[*]} failed; those tests will skip" >&2
}
exit 0
