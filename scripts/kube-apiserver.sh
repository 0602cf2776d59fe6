#!/usr/bin/env bash
# A real Kubernetes API server for tests, built from Debian's sources.
#
#   scripts/kube-apiserver.sh build         build kube-apiserver once into the cache (~20 min on 2 cores)
#   scripts/kube-apiserver.sh start [DIR]   start etcd + kube-apiserver on 127.0.0.1 free ports;
#                                           state (kubeconfig, token, pids, logs) goes in DIR
#                                           (default: a new temp dir, printed)
#   scripts/kube-apiserver.sh stop DIR      stop exactly the processes `start` wrote to DIR/pids
#   scripts/kube-apiserver.sh path          print the cached binary's path (exit 1 if not built)
#
# No prebuilt kube-apiserver is reachable from the package registries we may use, but Debian's
# source package `kubernetes` (1.20.2) builds cmd/kube-apiserver offline with Debian's golang-go.
# The vendored github.com/modern-go/reflect2 1.0.1 crashes on Go >= 1.18 at the first watch
# (it reaches into runtime internals that moved), so the build swaps in the files of Debian's
# golang-github-modern-go-reflect2-dev (1.0.2, which fixed that). The OpenAPI definitions are
# generated (make gen_openapi), and the build runs in GOPATH mode like Kubernetes 1.20's own.
#
# Cache: ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}/kube-apiserver — outside the clone, so one
# build serves every checkout. The build runs under `nice -n 10`: the machine is shared.
#
# start prints shell assignments (eval-able):
#   KUBE_DIR=... KUBECONFIG=... KUBE_SERVER=https://127.0.0.1:PORT KUBE_TOKEN=... \
#   ETCD_PID=... APISERVER_PID=...
set -euo pipefail

CACHE_ROOT="${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}"
CACHE="$CACHE_ROOT/kube-apiserver"
BIN="$CACHE/bin/kube-apiserver"
K8S_VERSION=1.20.2
# Service ClusterIPs the test API server allocates from. 1.20 accepts a loopback range (it only
# checks the CIDR's size), and every address in 127.0.0.0/8 binds on Linux without set-up — so
# meshproxy can listen on the ClusterIPs the API server hands out. See docs/kubernetes.md.
SERVICE_RANGE="${KUBE_SERVICE_RANGE:-127.96.0.0/16}"

log() { echo "kube-apiserver.sh: $*" >&2; }
die() { log "$*"; exit 1; }

apt_install() {
  # Installs missing Debian packages; apt may be busy with another engineer's install, so wait
  # for its lock rather than failing.
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "need Debian packages ${missing[*]} (not root / no apt-get)"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}" >/dev/null || {
    apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
    apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}" >/dev/null
  }
}

enable_deb_src() {
  # `apt-get source` needs deb-src entries. Add them for the suites the system already uses
  # (read from the deb822 .sources or the one-line sources.list), in a file of our own.
  local f=/etc/apt/sources.list.d/meshproxy-deb-src.sources
  if apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then return 0; fi
  [ "$(id -u)" = 0 ] || die "deb-src entries are missing and we are not root to add them"
  local uri="" suite=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    suite=$(awk '/^Suites:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  elif [ -f /etc/apt/sources.list ]; then
    read -r uri suite < <(awk '$1=="deb"{for(i=2;i<=NF;i++) if($i !~ /^\[/){print $i, $(i+1); exit}}' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] && [ -n "$suite" ] || die "cannot find the Debian mirror/suite to add deb-src for"
  log "adding deb-src for $uri $suite in $f"
  cat >"$f" <<EOF
Types: deb-src
URIs: $uri
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
}

cmd_build() {
  if [ -x "$BIN" ]; then log "already built: $BIN"; echo "$BIN"; return 0; fi
  mkdir -p "$CACHE"
  # dpkg-dev unpacks the source package; rsync is used by the Kubernetes build scripts.
  apt_install golang-go rsync dpkg-dev golang-github-modern-go-reflect2-dev etcd-server
  enable_deb_src
  local src="$CACHE/src"
  if [ ! -d "$src/cmd/kube-apiserver" ]; then
    rm -rf "$CACHE/dl" && mkdir -p "$CACHE/dl"
    log "fetching Debian source package kubernetes"
    (cd "$CACHE/dl" && apt-get source -q kubernetes >/dev/null)
    local unpacked
    unpacked=$(find "$CACHE/dl" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
    [ -d "$unpacked/cmd/kube-apiserver" ] || die "unpacked source has no cmd/kube-apiserver"
    rm -rf "$src" && mv "$unpacked" "$src"
    rm -rf "$CACHE/dl"
  fi
  local r2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [ -d "$r2" ] || die "missing $r2 (golang-github-modern-go-reflect2-dev)"
  log "replacing vendored modern-go/reflect2 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  mkdir -p "$src/vendor/github.com/modern-go/reflect2"
  find "$r2" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' -o -name LICENSE \) ! -name '*_test.go' \
    -exec cp {} "$src/vendor/github.com/modern-go/reflect2/" \;
  log "building cmd/kube-apiserver with $(go version) (niced; ~20 min on 2 cores)"
  # GOPATH mode with the vendor tree, as the Kubernetes 1.20 build itself does
  # (hack/lib/init.sh sets GO111MODULE=off; module mode wants go.mod edits).
  local gopath="$CACHE/gopath"
  mkdir -p "$gopath/src/k8s.io" "$CACHE/bin" "$CACHE/gocache"
  ln -sfn "$src" "$gopath/src/k8s.io/kubernetes"
  local pkg=k8s.io/kubernetes/vendor/k8s.io/component-base/version
  local cgo=k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version
  local ld="-s -w"
  for p in "$pkg" "$cgo"; do
    ld="$ld -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=20"
    ld="$ld -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  # The OpenAPI definitions are generated, not shipped (pkg/generated/openapi); the
  # Kubernetes Makefile generates them with openapi-gen built from the vendor tree.
  if [ ! -f "$src/pkg/generated/openapi/zz_generated.openapi.go" ]; then
    log "generating pkg/generated/openapi (make gen_openapi)"
    (cd "$src" && HOME="$CACHE" GOFLAGS= GOPROXY=off nice -n 10 make gen_openapi >"$CACHE/gen_openapi.log" 2>&1) \
      || { tail -n 30 "$CACHE/gen_openapi.log" >&2; die "make gen_openapi failed (log: $CACHE/gen_openapi.log)"; }
  fi
  (cd "$gopath/src/k8s.io/kubernetes" && GO111MODULE=off GOPATH="$gopath" GOCACHE="$CACHE/gocache" \
    GOPROXY=off GOFLAGS= CGO_ENABLED=0 \
    nice -n 10 go build -ldflags "$ld" -o "$BIN.tmp" ./cmd/kube-apiserver)
  mv "$BIN.tmp" "$BIN"
  # The Go build cache is large and only useful for rebuilding.
  rm -rf "$CACHE/gocache"
  log "built $BIN"
  echo "$BIN"
}

free_port() {
  python3 - <<'EOF'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

wait_http() { # url, pid, seconds, extra curl-ish python args
  local url=$1 pid=$2 secs=$3 token=${4:-}
  python3 - "$url" "$pid" "$secs" "$token" <<'EOF'
import os, ssl, sys, time, urllib.request
url, pid, secs, token = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
deadline = time.monotonic() + secs
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"process {pid} exited")
    try:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
            if r.status == 200 and r.read().strip() == b"ok":
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit(f"{url} not ready after {secs}s")
EOF
}

cmd_start() {
  [ -x "$BIN" ] || die "not built; run: $0 build"
  command -v etcd >/dev/null || apt_install etcd-server
  local dir=${1:-}
  if [ -z "$dir" ]; then dir=$(mktemp -d -t meshproxy-kube.XXXXXX); fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  [ -f "$dir/pids" ] && die "$dir/pids exists: stop it first"

  # Keys and the static token survive a stop/start in the same DIR, so a client keeps working
  # across an API server restart (the tests kill and restart it under a running meshproxy).
  if [ ! -f "$dir/token" ]; then
    python3 -c 'import secrets; print(secrets.token_hex(16))' >"$dir/token"
  fi
  local token; token=$(cat "$dir/token")
  echo "$token,admin,admin,system:masters" >"$dir/tokens.csv"
  if [ ! -f "$dir/sa.key" ]; then
    openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
    openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
  fi
  if [ ! -f "$dir/ca.crt" ]; then
    # A CA and a serving cert for 127.0.0.1 signed by it, so clients verify the server for real.
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=meshproxy-test-ca" \
      -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
      -keyout "$dir/apiserver.key" -out "$dir/apiserver.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' >"$dir/san.ext"
    openssl x509 -req -in "$dir/apiserver.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
      -CAcreateserial -days 30 -extfile "$dir/san.ext" -out "$dir/apiserver.crt" 2>/dev/null
  fi

  # Ports: reuse the previous ones on a restart in the same DIR, so clients reconnect to the
  # same URL (the point of the restart test).
  local etcd_port etcd_peer api_port
  if [ -f "$dir/ports" ]; then
    read -r etcd_port etcd_peer api_port <"$dir/ports"
  else
    etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port)
    echo "$etcd_port $etcd_peer $api_port" >"$dir/ports"
  fi

  mkdir -p "$dir/etcd-data"
  etcd --name meshproxy-test --data-dir "$dir/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "meshproxy-test=http://127.0.0.1:$etcd_peer" \
    --log-level warn >"$dir/etcd.log" 2>&1 &
  local etcd_pid=$!
  echo "$etcd_pid" >"$dir/pids"

  "$BIN" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --insecure-port=0 --secure-port="$api_port" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
    --cert-dir "$dir/certs" --tls-cert-file "$dir/apiserver.crt" --tls-private-key-file "$dir/apiserver.key" \
    --token-auth-file "$dir/tokens.csv" --authorization-mode=AlwaysAllow \
    --endpoint-reconciler-type=none \
    --service-account-key-file "$dir/sa.pub" --service-account-signing-key-file "$dir/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-cluster-ip-range "$SERVICE_RANGE" \
    --disable-admission-plugins=ServiceAccount \
    --watch-cache=true --v=1 >"$dir/apiserver.log" 2>&1 &
  local api_pid=$!
  echo "$api_pid" >>"$dir/pids"

  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $dir/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
EOF

  if ! wait_http "https://127.0.0.1:$api_port/readyz" "$api_pid" "${KUBE_START_TIMEOUT:-90}" "$token"; then
    log "API server did not become ready; last log lines:"
    tail -n 30 "$dir/apiserver.log" >&2 || true
    tail -n 10 "$dir/etcd.log" >&2 || true
    cmd_stop "$dir" || true
    exit 1
  fi
  echo "KUBE_DIR=$dir"
  echo "KUBECONFIG=$dir/kubeconfig"
  echo "KUBE_SERVER=https://127.0.0.1:$api_port"
  echo "KUBE_TOKEN=$token"
  echo "ETCD_PID=$etcd_pid"
  echo "APISERVER_PID=$api_pid"
}

cmd_stop() {
  local dir=${1:?usage: $0 stop DIR}
  [ -f "$dir/pids" ] || { log "nothing started in $dir"; return 0; }
  # Only the pids this script started, API server first (it needs etcd to shut down cleanly).
  local pids; pids=$(tac "$dir/pids")
  for pid in $pids; do kill "$pid" 2>/dev/null || true; done
  for pid in $pids; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -f "$dir/pids"
  log "stopped $(echo $pids | tr '\n' ' ')"
}

case "${1:-}" in
  build) cmd_build ;;
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  path) [ -x "$BIN" ] && echo "$BIN" || exit 1 ;;
  *) echo "usage: $0 build | start [DIR] | stop DIR | path" >&2; exit 2 ;;
esac
