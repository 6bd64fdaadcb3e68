#!/usr/bin/env bash
# make docker-test: build the CPU image from docker/Dockerfile.cpu and run the fast test tier and a
# short default run inside it. Idempotent: reuses a running daemon, the base image and the build cache.
#   1. a Docker daemon and 2. a Python 3.11 base image (docker/lib.sh: docker_daemon, docker_base);
#   3. docker build --network host -f docker/Dockerfile.cpu (build time measured);
#   4. docker run --network none: `make test-fast` (CI=true) and `experiments/run.py trainer.max_steps=2 objective.switch_step=1`;
#   5. prints the image size and the build time.
# Env: IMAGE (local/lightning-prerl:cpu) and those of docker/lib.sh.
IMAGE=${IMAGE:-local/lightning-prerl:cpu}
# shellcheck source=docker/lib.sh
source "$(dirname "$0")/lib.sh"

docker_daemon
docker_base
docker_build docker/Dockerfile.cpu

# ---- 4. run inside ----------------------------------------------------------------------------
OUTPUTS="$LP_DOCKER_DIR/outputs"
mkdir -p "$OUTPUTS" && chmod 1777 "$OUTPUTS"
log "make test-fast inside $IMAGE (--network none, CI=true)"
t0=$(date +%s)
docker run --rm --network none --shm-size 1g -e CI=true "${SHARED_MOUNT[@]}" "$IMAGE" make test-fast
TEST_S=$(( $(date +%s) - t0 ))
log "short default run inside $IMAGE (--network none)"
t0=$(date +%s)
docker run --rm --network none --shm-size 1g "${SHARED_MOUNT[@]}" -v "$OUTPUTS:/outputs" "$IMAGE" \
    python experiments/run.py trainer.max_steps=2 objective.switch_step=1 hydra.run.dir=/outputs/cpu-quick
RUN_S=$(( $(date +%s) - t0 ))

# ---- 5. report --------------------------------------------------------------------------------
log "summary"
docker image ls "$IMAGE"
docker image ls "$BASE_IMAGE"
echo "image $IMAGE: $(docker_image_size "$IMAGE")"
echo "build time: ${BUILD_S} s (docker build; cached layers are reused on re-runs)"
echo "make test-fast in the container: ${TEST_S} s; short default run: ${RUN_S} s"
docker_machine
