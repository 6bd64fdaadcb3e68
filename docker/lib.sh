# Shared by docker/test.sh (make docker-test, the CPU image) and docker/test-gpu.sh (make
# docker-test-gpu, the GPU image); sourced, not run. Each step is idempotent: a running daemon, the
# base image and the build cache are reused.
#   docker_daemon   a reachable daemon: `docker info`, else (as root) apt-get install docker.io debootstrap
#                   and start dockerd by hand, without iptables or a bridge, its state under $LP_DOCKER_DIR;
#   docker_base     a Python 3.11 base: $BASE_IMAGE if present, else a debootstrap bookworm (minbase +
#                   python3, python3-venv, make) imported with `docker import` (no registry needed);
#   docker_build F  docker build --network host -f F -t $IMAGE, with this machine's pip mirrors served
#                   to the build; sets BUILD_S (seconds);
#   docker_machine  one line: cores, memory, processor.
# Env: LP_DOCKER_DIR (/var/tmp/lp-docker), BASE_IMAGE (local/bookworm-python:3.11), IMAGE (set by the
# caller), LP_SHARED_DIR (../shared), LP_DOCKER_KEEP=1 keeps a daemon this script started running,
# LP_PIP_PORT (38917) the port of that mirror, LP_REBUILD_BASE=1 recreates the base image,
# LP_PIP_LOCAL (/opt) directory whose file:// pip mirrors are served to the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
LP_DOCKER_DIR=${LP_DOCKER_DIR:-/var/tmp/lp-docker}
BASE_IMAGE=${BASE_IMAGE:-local/bookworm-python:3.11}
LP_SHARED_DIR=${LP_SHARED_DIR:-$(cd "$ROOT/.." && pwd)/shared}
LP_PIP_LOCAL=${LP_PIP_LOCAL:-/opt}
LOG_NAME=$(basename "$0" .sh)
export DOCKER_BUILDKIT=0   # the legacy builder: Debian's docker.io has no buildx
log() { printf '\n== %s: %s\n' "$LOG_NAME" "$*"; }

STARTED_PID=""
HTTP_PID=""
cleanup() {
    if [ -n "$HTTP_PID" ]; then kill "$HTTP_PID" 2>/dev/null || true; fi
    if [ -n "$STARTED_PID" ] && [ "${LP_DOCKER_KEEP:-0}" != 1 ]; then
        log "stopping the dockerd this script started (pid $STARTED_PID)"
        kill "$STARTED_PID" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$STARTED_PID" 2>/dev/null || break; sleep 1; done
    fi
}
trap cleanup EXIT

docker_daemon() {
    if ! docker info >/dev/null 2>&1; then
        export DOCKER_HOST="unix://$LP_DOCKER_DIR/docker.sock"
        if ! docker info >/dev/null 2>&1; then
            [ "$(id -u)" = 0 ] || { echo "no Docker daemon reachable and not root: start one or run as root" >&2; exit 1; }
            if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
                log "apt-get install docker.io debootstrap"
                DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null
            fi
            mkdir -p "$LP_DOCKER_DIR"/{data,exec}
            log "starting dockerd (no iptables, no bridge; state in $LP_DOCKER_DIR)"
            dockerd --iptables=false --ip-masq=false --bridge=none \
                --data-root "$LP_DOCKER_DIR/data" --exec-root "$LP_DOCKER_DIR/exec" \
                --pidfile "$LP_DOCKER_DIR/dockerd.pid" --host "$DOCKER_HOST" \
                >"$LP_DOCKER_DIR/dockerd.log" 2>&1 &
            STARTED_PID=$!
            for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
            docker info >/dev/null 2>&1 || { tail -20 "$LP_DOCKER_DIR/dockerd.log" >&2; exit 1; }
        fi
    fi
    echo "daemon: $(docker info --format '{{.ServerVersion}} storage={{.Driver}}') DOCKER_HOST=${DOCKER_HOST:-default}"
}

docker_base() {
    if [ "${LP_REBUILD_BASE:-0}" = 1 ]; then docker image rm -f "$BASE_IMAGE" >/dev/null 2>&1 || true; fi
    if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
        # the Debian mirror apt already uses here (deb822 sources or the classic sources.list)
        local mirror rootfs t0
        mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
        [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1 || true)
        mirror=${mirror:-http://deb.debian.org/debian}
        rootfs="$LP_DOCKER_DIR/rootfs-bookworm"
        log "creating $BASE_IMAGE: debootstrap bookworm from $mirror"
        t0=$(date +%s)
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,make,ca-certificates \
            bookworm "$rootfs" "$mirror" >"$LP_DOCKER_DIR/debootstrap.log" 2>&1 \
            || { tail -20 "$LP_DOCKER_DIR/debootstrap.log" >&2; exit 1; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        # this machine's own CAs (a TLS-intercepting egress proxy): the base is local to this machine,
        # so they go there rather than into the Dockerfile; pip is pointed at the system bundle
        if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
            cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
            chroot "$rootfs" update-ca-certificates >/dev/null
        fi
        tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' \
            -c 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
            -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
        rm -rf "$rootfs"
        echo "base image built in $(($(date +%s) - t0)) s"
    fi
    docker run --rm --network none "$BASE_IMAGE" python3 --version
}

# This machine's pip config points at local mirrors (file:// indexes, a wheel directory with the CPU
# torch wheel). The build cannot see host paths, so they are served read-only on 127.0.0.1 (the build
# uses the host network) and passed as build arguments; nothing of it stays in the image.
docker_build() {
    local dockerfile=$1 t0 find_links extra_index port
    local build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    if command -v pip >/dev/null && [ -d "$LP_PIP_LOCAL" ]; then
        port=${LP_PIP_PORT:-38917}  # fixed: build arguments are part of the layer cache key
        to_http() {  # file:///opt/x or /opt/x -> http://127.0.0.1:PORT/x (only under $LP_PIP_LOCAL)
            local out="" u
            for u in $1; do
                u=${u#file://}
                case "$u" in "$LP_PIP_LOCAL"/*) out="$out http://127.0.0.1:$port/${u#"$LP_PIP_LOCAL"/}" ;; *) out="$out $u" ;; esac
            done
            echo "${out# }"
        }
        find_links=$(pip config get global.find-links 2>/dev/null || true)
        extra_index=$(pip config get global.extra-index-url 2>/dev/null || true)
        if [ -n "$find_links$extra_index" ]; then
            python3 -m http.server "$port" --bind 127.0.0.1 --directory "$LP_PIP_LOCAL" >/dev/null 2>&1 &
            HTTP_PID=$!
            [ -z "$find_links" ] || build_args+=(--build-arg "PIP_FIND_LINKS=$(to_http "$find_links")")
            [ -z "$extra_index" ] || build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$(to_http "$extra_index")")
            echo "pip mirrors for the build: ${build_args[*]:2}"
        fi
    fi
    log "docker build -f $dockerfile -t $IMAGE (--network host)"
    t0=$(date +%s)
    docker build --network host -f "$dockerfile" "${build_args[@]}" -t "$IMAGE" . || return 1
    BUILD_S=$(($(date +%s) - t0))
    echo "build time: ${BUILD_S} s"
    if [ -n "$HTTP_PID" ]; then kill "$HTTP_PID" 2>/dev/null || true; HTTP_PID=""; fi
}

# tests find ../shared (the Qwen3 tokenizer) relative to the repository: /app/.. -> /shared; the math
# data at /data, where the images' LIGHTNING_PRERL_DATA points (as docker/compose.yaml mounts it)
SHARED_MOUNT=()
[ -d "$LP_SHARED_DIR" ] && SHARED_MOUNT=(-v "$LP_SHARED_DIR:/shared:ro")
[ -d "$LP_SHARED_DIR/data" ] && SHARED_MOUNT+=(-v "$LP_SHARED_DIR/data:/data:ro")

docker_image_size() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.2f GB", $1/1e9}'; }

docker_machine() {
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
}
