"""A rollout engine in its own process, with its own copy of the weights (asynchronous rollouts).

`RolloutWorker` starts one `torch.multiprocessing` process (spawn) that builds the configured engine
(`HFEngine`, or `VLLMEngine`, whose vLLM engine then lives in the worker) around a private copy of the
policy, built from the policy's config and filled by the first weight push. The trainer talks to it
through two queues, in order:

- `push(policy, version)`: the policy's tensors are copied once into one flat float32 tensor in shared
  memory (the copy the trainer pays for) and queued; the worker copies them into its own model when it
  reaches the message, between two generations, so a push never waits for a generation and a
  generation never sees half a push.
- `submit(key, ...)`: a generation request; the worker answers it with the weights of the last push
  it has applied, i.e. the last push queued before the request (the queue is FIFO). The answer
  carries that policy version.
- `result(key)`: blocks until that request's answer arrives (others that arrive first are kept).

The worker samples with the engine's own seeded sampling (the transformers engine: per-prompt seeds),
so with the same weights and the same number of threads it draws the trainer's completions bit for
bit. Every tensor the worker holds is its own: the trainer can step its weights while it generates.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from lightning_prerl.rollout.engine import Generation, SamplingConfig


@dataclass
class Answer:
    """A finished request: the completions and the policy version (trainer step) that generated them."""

    generation: Generation
    version: int
    seconds: float  # generation time inside the worker


def weight_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's state tensors in `state_dict` order, each storage once (tied weights travel once)."""
    seen, out = set(), []
    for name, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ptr not in seen:
            seen.add(ptr)
            out.append((name, tensor))
    return out


def _serve(engine_factory: Callable, tokenizer, config, dtype, threads: int | None, requests, answers) -> None:
    """The worker process: build the engine and a private model, then answer messages in order."""
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    try:
        engine = engine_factory(tokenizer=tokenizer)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        targets = weight_tensors(model)
        answers.put(("ready", list(engine.stop_token_ids), None))
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
                for _, target in targets:
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
        policy: the trainer's policy (a plain, unsharded transformers model): its config and dtype
            build the worker's copy; its weights arrive by `push`.
        threads: torch threads of the worker (None: the trainer's own count).
    """

    def __init__(self, engine_factory: Callable, tokenizer, policy: torch.nn.Module, threads: int | None = None):
        ctx = mp.get_context("spawn")
        self.requests, self.answers = ctx.Queue(), ctx.Queue()
        dtype = next(policy.parameters()).dtype
        self.numel = sum(t.numel() for _, t in weight_tensors(policy))
        threads = threads or torch.get_num_threads()
        args = (engine_factory, tokenizer, policy.config, dtype, threads, self.requests, self.answers)
        # the child must not inherit a thread count meant for the trainer through OMP_NUM_THREADS
        self.process = ctx.Process(target=_serve, args=args, daemon=True, name="rollout-worker")
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        try:
            self.process.start()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        self._stop_token_ids: list[int] | None = None
        self._done: dict = {}
        self.last_push_s = 0.0

    @property
    def stop_token_ids(self) -> list[int]:
        """The worker's engine's stop ids (waits for the engine to start)."""
        if self._stop_token_ids is None:
            self._stop_token_ids = self._wait("ready")
        return self._stop_token_ids

    @torch.no_grad()
    def push(self, policy: torch.nn.Module, version: int) -> None:
        """Queue `policy`'s current weights as `version`: one copy into shared memory, no waiting."""
        t0 = time.perf_counter()
        flat = torch.empty(self.numel, dtype=torch.float32).share_memory_()  # (numel,)
        offset = 0
        for _, tensor in weight_tensors(policy):
            flat[offset : offset + tensor.numel()].copy_(tensor.detach().reshape(-1))
            offset += tensor.numel()
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
