#!/usr/bin/env bash
# CI's Kubernetes tier: a throw-away etcd + kube-apiserver on 127.0.0.1 (scripts/kube-apiserver.sh).
#
#   export KOLE_TEST_KUBECONFIG="$(bash .ci/kube.sh start | tail -n 1)"
#   cargo test --locked -p kole-kube --test apiserver -- --include-ignored --test-threads 1
#   bash .ci/kube.sh stop
#
# The binaries are built once per machine into ${KOLE_CACHE:-/var/cache/kole} (cold: several minutes
# on 2 cores; warm: a start takes ~5 s). The run directory is fixed per checkout so `stop` finds it.
set -euo pipefail
cd "$(dirname "$0")/.."
export KOLE_KUBE_RUN="${KOLE_KUBE_RUN:-${TMPDIR:-/tmp}/kole-ci-kube-$(pwd | cksum | cut -d' ' -f1)}"
case "${1:-}" in
start)
    scripts/kube-apiserver.sh stop "$KOLE_KUBE_RUN" >&2 || true
    scripts/kube-apiserver.sh start "$KOLE_KUBE_RUN"
    ;;
stop) scripts/kube-apiserver.sh stop "$KOLE_KUBE_RUN" ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
