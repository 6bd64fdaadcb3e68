"""A rollout engine in its own process, with its own copy of the weights (asynchronous rollouts).

`RolloutWorker` starts one `torch.multiprocessing` process (spawn) that builds the configured engine
(`HFEngine`, or `VLLMEngine`, whose vLLM engine then lives in the worker) around a private copy of the
policy, built from the policy's config and filled by the first weight push. The trainer talks to it
through two queues, in order:

- `push(policy, version)`: the policy's full tensors (`models.full_weights`: FSDP2 DTensors all-gathered,
  a LoRA policy merged) are copied once into one flat float32 tensor in shared memory (the copy the
  trainer pays for) and queued; for a sharded policy this is a collective, every rank pushes at the same
  step (each rank has its own worker); the worker copies them into its own model when it
  reaches the message, between two generations, so a push never waits for a generation and a
  generation never sees half a push.
- `submit(key, ...)`: a generation request; the worker answers it with the weights of the last push
  it has applied, i.e. the last push queued before the request (the queue is FIFO). The answer
  carries that policy version.
- `result(key)`: blocks until that request's answer arrives (others that arrive first are kept).

Placement (GPU runs, `Placement` from `gpu_placement`): the worker process starts with its own
`CUDA_VISIBLE_DEVICES` (one GPU: the rank's own, colocated, or one of `async_rollout.engine_devices`,
disaggregated) and RANK / LOCAL_RANK / WORLD_SIZE of a lone process: it has no process group, so vLLM
takes its uni-process executor, whose worker runs on local rank 0 of the device name "cuda", i.e. the
one visible GPU (vllm/v1/executor/uniproc_executor.py `_distributed_args`). Colocated vLLM engines get
`sleep_between_rollouts=true`: vLLM sleep mode frees their GPU memory between generations while the
trainer shares the GPU. The worker's copy of the weights lives on that GPU too.

The worker samples with the engine's own seeded sampling (the transformers engine: per-prompt seeds),
so with the same weights and the same number of threads it draws the trainer's completions bit for
bit. Every tensor the worker holds is its own: the trainer can step its weights while it generates.
"""

from __future__ import annotations

import functools
import inspect
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp

from lightning_prerl.rollout.engine import Generation, SamplingConfig
from lightning_prerl.scale.models import full_weights


@dataclass
class Answer:
    """A finished request: the completions and the policy version (trainer step) that generated them."""

    generation: Generation
    version: int
    seconds: float  # generation time inside the worker


@dataclass(frozen=True)
class Placement:
    """Where one rank's worker runs: its environment at start-up, its model's device, vLLM sleep mode."""

    env: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    sleep: bool = False


def gpu_placement(
    placement: str,
    local_rank: int,
    local_world: int,
    trainer_device: int,
    engine_devices: list[int] | None = None,
    visible: str | None = None,
    count: int | None = None,
) -> Placement:
    """The placement of local rank `local_rank`'s worker on a GPU run (one GPU per worker).

    Args:
        placement: "colocated" (the trainer's own GPU, vLLM sleep mode between generations) or
            "disaggregated" (`engine_devices[local_rank * E // local_world]`: E engine GPUs shared evenly).
        local_rank, local_world: this rank and the number of ranks on its node.
        trainer_device, engine_devices: this rank's training GPU and the engine GPUs, as indices into the
            trainer's visible GPUs, the way vLLM's `device_ids` compose with CUDA_VISIBLE_DEVICES
            (engine/arg_utils.py); `visible` (the trainer's CUDA_VISIBLE_DEVICES) maps an index to what
            the worker is given.
        count: the number of visible GPUs (None: not checked).
    """
    if placement == "colocated":
        index = trainer_device
    else:
        index = engine_devices[local_rank * len(engine_devices) // local_world]
    if count is not None and not 0 <= index < count:
        raise ValueError(f"async_rollout.engine_devices={engine_devices}: device {index} is not visible ({count} GPUs)")
    ids = visible.split(",") if visible else None
    env = {"CUDA_VISIBLE_DEVICES": ids[index].strip() if ids else str(index)}
    env |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}  # a lone process: vLLM's uni-process executor
    return Placement(env=env, device="cuda", sleep=placement == "colocated")


def weight_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's state tensors in `state_dict` order, each tensor once (tied weights travel once under
    their first name). Identity, not storage, decides: it also holds on the meta device."""
    seen, out = set(), []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


def plain_layout(config, dtype: torch.dtype) -> dict[str, tuple[int, torch.Size]]:
    """name -> (offset, shape) in the flat push of the plain Hugging Face model built from `config`: what
    the worker holds, whatever the trainer's policy is (sharded, LoRA). Built on the meta device: no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layout, offset = {}, 0
    for name, tensor in weight_tensors(model):
        layout[name] = (offset, tensor.shape)
        offset += tensor.numel()
    return layout


def _serve(engine_factory: Callable, tokenizer, config, dtype, threads: int | None, device: str, requests, answers):
    """The worker process: build the engine and a private model, then answer messages in order."""
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    try:
        engine = engine_factory(tokenizer=tokenizer)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
        targets = weight_tensors(model)
        where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        where += f", CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}"
        answers.put(("ready", (list(engine.stop_token_ids), where), None))
    except Exception as exc:  # the trainer reports it in one line
        answers.put(("error", None, f"rollout worker could not start: {type(exc).__name__}: {exc}"))
        return
    version, synced, parent = None, False, os.getppid()
    while True:
        try:
            message = requests.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the trainer died without stopping us (SIGKILL): no orphans
                break
            continue
        if message[0] == "stop":
            break
        if message[0] == "weights":
            _, version, flat = message
            offset = 0
            with torch.no_grad():
                for _, target in targets:  # the trainer's `plain_layout` order
                    target.copy_(flat[offset : offset + target.numel()].view(target.shape))
                    offset += target.numel()
            del flat, message  # the shared block is freed once the trainer's handle goes too
            synced = False
            continue
        _, key, prompt_ids, n, sampling, logprobs, seeds = message
        try:
            if not synced:
                engine.sync(model)  # the transformers engine generates from `model`; vLLM reloads from it
                synced = True
            t0 = time.perf_counter()
            gen = engine.generate(prompt_ids, n, sampling, logprobs, seeds)
            answers.put((key, Answer(gen, version, time.perf_counter() - t0), None))
        except Exception as exc:
            answers.put((key, None, f"rollout worker failed on a request: {type(exc).__name__}: {exc}"))
    engine.close()


class RolloutWorker:
    """One engine process with its own weights; see the module docstring.

    Args:
        engine_factory: `tokenizer -> RolloutEngine` (the Hydra partial of `conf/rollout/*.yaml`).
        tokenizer: the policy's tokenizer.
        policy: the trainer's policy (a transformers model, plain or FSDP2-sharded or LoRA): its config and
            dtype build the worker's plain copy; its full weights arrive by `push`.
        threads: torch threads of the worker (None: the trainer's own count).
        placement: GPU runs: `gpu_placement`'s answer (None: on CPU).
    """

    def __init__(
        self,
        engine_factory: Callable,
        tokenizer,
        policy: torch.nn.Module,
        threads: int | None = None,
        placement: Placement | None = None,
    ):
        placement = placement or Placement()
        if placement.sleep and "sleep_between_rollouts" in inspect.signature(engine_factory).parameters:
            engine_factory = functools.partial(engine_factory, sleep_between_rollouts=True)
        self.engine_factory = engine_factory
        ctx = mp.get_context("spawn")
        self.requests, self.answers = ctx.Queue(), ctx.Queue()
        dtype = next(policy.parameters()).dtype
        self.layout = plain_layout(policy.config, dtype)
        self.numel = sum(shape.numel() for _, shape in self.layout.values())
        threads = threads or torch.get_num_threads()
        args = (engine_factory, tokenizer, policy.config, dtype, threads, placement.device, self.requests, self.answers)
        self.process = ctx.Process(target=_serve, args=args, daemon=True, name="rollout-worker")
        # a spawned child reads the environment at start: not the trainer's thread count, its own GPU
        env = {**placement.env, "OMP_NUM_THREADS": str(threads)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key)
                else:
                    os.environ[key] = value
        self._stop_token_ids: list[int] | None = None
        self._where: str | None = None
        self._done: dict = {}
        self.last_push_s = 0.0

    @property
    def stop_token_ids(self) -> list[int]:
        """The worker's engine's stop ids (waits for the engine to start)."""
        if self._stop_token_ids is None:
            self._stop_token_ids, self._where = self._wait("ready")
        return self._stop_token_ids

    @property
    def where(self) -> str:
        """Where the worker's model lives: "cpu" or the GPU's name, and its CUDA_VISIBLE_DEVICES."""
        self.stop_token_ids  # noqa: B018 (waits for the engine to start)
        return self._where

    @torch.no_grad()
    def push(self, policy: torch.nn.Module, version: int) -> None:
        """Queue `policy`'s current weights as `version`: one copy into shared memory, no waiting for the
        worker. A sharded policy is gathered one tensor at a time: a collective, every rank must push."""
        t0 = time.perf_counter()
        flat = torch.empty(self.numel, dtype=torch.float32).share_memory_()  # (numel,)
        missing = set(self.layout)
        for name, tensor in full_weights(policy):  # tied weights come twice: the second name has no slot
            if name in missing:
                offset, shape = self.layout[name]
                flat[offset : offset + shape.numel()].copy_(tensor.reshape(-1))
                missing.discard(name)
        if missing:
            raise RuntimeError(f"rollout worker push: the policy has no weights for {sorted(missing)[:3]}")
        self.requests.put(("weights", int(version), flat))
        self.last_push_s = time.perf_counter() - t0

    def submit(
        self, key, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig, logprobs: bool, seeds: list[int]
    ) -> None:
        """Queue a generation request; its answer comes from `result(key)`."""
        self.requests.put(("generate", key, prompt_ids, n, sampling, logprobs, seeds))

    def result(self, key) -> Answer:
        """The answer to request `key` (blocks until it arrives)."""
        return self._wait(key)

    def _wait(self, key):
        while key not in self._done:
            try:
                got, answer, error = self.answers.get(timeout=5.0)
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"rollout worker died (exit code {self.process.exitcode})") from None
                continue
            if error is not None:
                raise RuntimeError(error)
            self._done[got] = answer
        return self._done.pop(key)

    def close(self) -> None:
        """Stop the process (it finishes the request in hand first)."""
        if self.process.is_alive():
            self.requests.put(("stop",))
            self.process.join(timeout=60)
            if self.process.is_alive():
                self.process.kill()
        self.requests.close()
        self.answers.close()
