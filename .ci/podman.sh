#!/usr/bin/env bash
# Prepares Debian's podman (4.3) for kole's real-engine container tier.
#
#   eval "$(.ci/podman.sh prepare)"    # prints `export CONTAINERS_CONF=...` and `export KOLE_TEST_PODMAN=1`
#   cargo test -p kole-tests --test container_podman -- --include-ignored --test-threads=1
#   .ci/podman.sh clean                # removes the test containers and the test image
#
# Installs podman, runc and busybox-static when missing; writes a containers.conf of its own
# (named by CONTAINERS_CONF): podman's defaults fail here on rlimit permission errors, so containers
# run with the runc runtime and lowered default ulimits. No registry is reachable, so the test image
# `localhost/kole-test/busybox:1` is imported from a rootfs holding Debian's static busybox. Works as
# root on a fresh Debian 12 machine. State lives in $KOLE_PODMAN_DIR (default /tmp/kole-podman).
set -euo pipefail

DIR="${KOLE_PODMAN_DIR:-/tmp/kole-podman}"
IMAGE=localhost/kole-test/busybox:1

log() { echo "podman.sh: $*" >&2; }

install() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx sleep || missing+=(busybox-static)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" uidmap slirp4netns fuse-overlayfs >&2
    fi
}

configure() {
    mkdir -p "$DIR"
    cat > "$DIR/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
CONF
    export CONTAINERS_CONF="$DIR/containers.conf"
}

image() {
    if podman image exists "$IMAGE"; then
        return
    fi
    local rootfs="$DIR/rootfs"
    rm -rf "$rootfs"
    mkdir -p "$rootfs/bin" "$rootfs/tmp"
    cp /bin/busybox "$rootfs/bin/busybox"
    for tool in sh sleep echo env cat ls true false; do
        ln -s busybox "$rootfs/bin/$tool"
    done
    log "importing $IMAGE from a busybox rootfs"
    tar -C "$rootfs" -c . | podman import - "$IMAGE" >&2
}

case "${1:-}" in
    prepare)
        install
        configure
        image
        podman --version >&2
        echo "export CONTAINERS_CONF=$DIR/containers.conf"
        echo "export KOLE_TEST_PODMAN=1"
        ;;
    clean)
        configure
        ids="$(podman ps -aq --filter label=dev.kole.managed=true)"
        [ -z "$ids" ] || podman rm -f -t 0 $ids >/dev/null
        podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
        ;;
    *)
        echo "usage: $0 prepare|clean" >&2
        exit 2
        ;;
esac
