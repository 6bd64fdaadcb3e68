#!/usr/bin/env bash
# make docker-test-gpu: build the GPU image from docker/Dockerfile.gpu here (no registry, no GPU) and
# check inside it, with --network none and no GPU, everything that needs none:
#   1. a Docker daemon and 2. a Python 3.11 base image (docker/lib.sh: docker_daemon, docker_base);
#   3. docker build --network host -f docker/Dockerfile.gpu (CUDA torch, vLLM, DeepSpeed from PyPI);
#   4. inside: the GPU stack imports (versions printed, each equal to its constraints-gpu.txt pin),
#      torch.version.cuda is set, Triton's CUDA launcher compiles; the paper presets compose (`--cfg job
#      --resolve`, trainer.devices=8) and validate; compose.yaml validates; `make test-fast GPU=1` on the CPU;
#   5. prints the image size and the build time.
# What needs a GPU host (CUDA kernels, vLLM engines, NCCL) is gpu/check.py's (make gpu-check).
# Env: IMAGE (lightning-prerl:gpu), LP_TEST_ARGS (extra pytest arguments for step 4) and those of docker/lib.sh.
IMAGE=${IMAGE:-lightning-prerl:gpu}   # the image docker/compose.yaml's GPU services run
# shellcheck source=docker/lib.sh
source "$(dirname "$0")/lib.sh"
fail() { echo "docker-test-gpu FAILED: $*" >&2; exit 1; }
in_image() { docker run --rm --network none --shm-size 1g "${SHARED_MOUNT[@]}" "$IMAGE" "$@"; }

T_ALL=$(date +%s)
docker_daemon
docker_base
df -h "$LP_DOCKER_DIR" | tail -1 | awk '{print "disk before the build: " $4 " free on " $6}'
docker_build docker/Dockerfile.gpu || fail "docker build -f docker/Dockerfile.gpu (see the pip error above)"

# ---- 4. checks inside, no network, no GPU ------------------------------------------------------
log "the GPU stack imports, at the pinned versions (--network none, no GPU)"
docker run -i --rm --network none "$IMAGE" python - <<'PY' || fail "an import or a pin check in the image (the line above says which)"
import importlib.metadata as md
import importlib.util
import os
import sys

pins = dict(line.split("==") for line in open("constraints-gpu.txt").read().splitlines() if line and line[0] != "#")
import deepspeed, flashinfer, torch, vllm  # noqa: E401,F401  (the GPU stack: none needs a GPU to import)

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
      f"cuda available: {torch.cuda.is_available()} (no GPU here)")
print(f"vllm {vllm.__version__}, deepspeed {deepspeed.__version__}, flashinfer {flashinfer.__version__}, "
      f"vllm's flash-attention kernels: {importlib.util.find_spec('vllm.vllm_flash_attn') is not None}")
if not torch.version.cuda:
    sys.exit("torch.version.cuda is None: a CPU torch in the GPU image")
# Triton builds its CUDA launcher from C on a GPU's first kernel: the compiler and Python.h must be in
# the image (loading the result then needs libcuda.so.1, which the host's driver brings)
import triton
from triton.backends.nvidia import driver
from triton.runtime.build import compile_module_from_file

try:
    compile_module_from_file(os.path.join(os.path.dirname(driver.__file__), "driver.c"), "cuda_utils", [],
                             driver.include_dirs, [])
except ImportError as exc:
    if "undefined symbol: cu" not in str(exc):
        raise
print(f"triton {triton.__version__}: its CUDA launcher (driver.c) compiles; loading it needs the host's libcuda.so.1")
wrong = {name: (md.version(name), pin) for name, pin in pins.items() if md.version(name) != pin}
if wrong:
    sys.exit(f"installed != constraints-gpu.txt: {wrong}")
print(f"all {len(pins)} pins of constraints-gpu.txt installed as pinned")
PY

log "the paper presets compose for 8 GPUs (--cfg job) and validate"
for preset in paper_dsrl_qwen3_4b paper_grpo_qwen3_4b; do
    job=$(in_image python experiments/run.py "experiment=$preset" trainer.devices=8 --cfg job --resolve) \
        || fail "experiment=$preset trainer.devices=8 --cfg job does not compose"
    grep -q "data_parallel_size: 8" <<<"$job" || fail "experiment=$preset trainer.devices=8: not FSDP2 over 8 ranks"
    echo "$preset: composes ($(wc -l <<<"$job") lines), FSDP2 data_parallel_size: 8"
done
in_image python -m pytest -q -p no:cacheprovider "tests/test_config.py::test_paper_presets_resolve_for_eight_gpus" \
    || fail "the paper presets do not validate (tests/test_config.py::test_paper_presets_resolve_for_eight_gpus)"

log "docker/compose.yaml through compose's own parser"
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else  # Debian's docker.io has no compose plugin; its docker-compose (v1.29) reads the same file
    command -v docker-compose >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null
    COMPOSE=(docker-compose)
fi
"${COMPOSE[@]}" -f docker/compose.yaml config -q || fail "docker/compose.yaml does not validate (${COMPOSE[*]} config)"
echo "$("${COMPOSE[@]}" version --short 2>/dev/null || true): valid; the GPU services run $IMAGE (tests/test_docker.py checks their GPUs and mounts)"

log "make test-fast GPU=1 inside $IMAGE (CPU only)"
t0=$(date +%s)
in_image make test-fast GPU=1 ARGS="-p no:cacheprovider -rs ${LP_TEST_ARGS:-}" || fail "make test-fast GPU=1 in the GPU image"
TEST_S=$(($(date +%s) - t0))

# ---- 5. report --------------------------------------------------------------------------------
log "summary"
docker image ls "$IMAGE"
echo "image $IMAGE: $(docker_image_size "$IMAGE") (base $BASE_IMAGE: $(docker_image_size "$BASE_IMAGE"))"
echo "largest layers:"
docker history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | sort -h -r | head -3 | cut -c1-110
echo "build time: ${BUILD_S} s (docker build; a re-run with unchanged install files reuses the setup layer)"
echo "make test-fast GPU=1 in the container: ${TEST_S} s; the whole script: $(($(date +%s) - T_ALL)) s"
docker_machine
