"""The config of a replay (`experiments/replay.py RUN_DIR [overrides]`): the recorded run's config with
the replay's overrides, checked against what the record fixes before any compute.

The replay is composed like the recorded run: Hydra receives the recorded run's own command-line
overrides (`RUN_DIR/.hydra/overrides.yaml`) followed by the replay's, so `objective=nsr_prerl` selects
a config group as on `experiments/run.py`. A replay override replaces the recorded override of the same
key and those below it (`objective=grpo` drops a recorded `objective.switch_step=2`). The recorded run's
`hydra.*`, `ckpt_path` and `data.record_rollouts` are not carried over; the replay writes into
`RUN_DIR/replay/<time>` unless `hydra.run.dir` says otherwise.

What the record fixes -- the rollouts' shape and how they were drawn (`FIXED`), the model that drew
them, the world size whose rank shards it holds -- may not change: the replay refuses in one line.
The objective, optimizer, update and step count may change; the keys that differ from the recorded
config are listed in one log line, so drift of `conf/` since the recording is visible too.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_prerl.errors import ConfigError
from lightning_prerl.training.record import check_record, read_manifest, record_dir

log = logging.getLogger(__name__)
FIXED = (
    "data.prompts_per_step",
    "data.samples_per_prompt",
    "data.sampling",
    "data.seed",
    "data.shuffle_seed",
    "data.overlong",
    "data.overlong_buffer",
    "data.overlong_factor",
    "data.dynamic_sampling",
    "data.max_extra_rounds",
    "model.path",
    "model.gguf_file",
    "trainer.devices",
    "trainer.num_nodes",
)
NOT_CARRIED = ("hydra", "ckpt_path", "data.record_rollouts", "replay_from")
REPLAY_DATA = "lightning_prerl.training.replay.ReplayDataModule"


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0].removeprefix("override ").strip()


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def replay_argv(argv: list[str]) -> list[str]:
    """`RUN_DIR [overrides]` -> Hydra's command line: the recorded overrides, then the replay's.

    A command line that is one already (Lightning's DDP launcher restarts this script on every other
    rank with the composed overrides, `+replay_from` among them) passes unchanged."""
    if any(a.startswith("+replay_from=") for a in argv):
        return argv
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        sys.exit("usage: experiments/replay.py RUN_DIR [hydra overrides]")
    run_dir = Path(argv[0]).resolve()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.exists():
        sys.exit(f"config error: {argv[0]} is not a run directory of experiments/run.py (no .hydra/overrides.yaml)")
    flags = [a for a in argv[1:] if a.startswith("-")]
    mine = [a for a in argv[1:] if not a.startswith("-")]
    replaced = {_key(a) for a in mine}
    recorded = [o for o in yaml.safe_load(saved.read_text()) or [] if not _under(_key(o), (*NOT_CARRIED, *replaced))]
    new_dir = f"hydra.run.dir={run_dir}/replay/${{now:%Y-%m-%d_%H-%M-%S}}"
    defaults = [] if "hydra.run.dir" in replaced else [new_dir]
    return [*flags, *recorded, *defaults, f"+replay_from={run_dir}", *mine]


def _flat(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def replay_config(cfg: DictConfig) -> None:
    """Check `cfg` (with `replay_from`) against the record and point `cfg.data` at the record, in place."""
    run_dir = Path(cfg.replay_from)
    directory = record_dir(run_dir)
    manifest = read_manifest(directory)
    if not manifest.get("config"):
        raise ConfigError(f"rollout record {directory} has no config (recorded outside experiments/run.py)")
    recorded, now = _flat(manifest["config"]), _flat(OmegaConf.to_container(cfg, resolve=True))
    for key in FIXED:
        old = {k: v for k, v in recorded.items() if _under(k, [key])}
        new = {k: v for k, v in now.items() if _under(k, [key])}
        if old != new:
            changed = next(k for k in sorted({*old, *new}) if old.get(k) != new.get(k))
            raise ConfigError(
                f"{changed}={new.get(changed)}: the rollout record {directory} was drawn with {old.get(changed)}; "
                "a replay may change the objective, optimizer and update, not the rollouts, model or world size"
            )
    monitors = {"objective.monitor": cfg.objective.get("monitor")}
    for name, phase in (cfg.objective.get("phases") or {}).items():
        monitors[f"objective.phases.{name}.monitor"] = phase.get("monitor")
    key, monitor = next(((k, m) for k, m in monitors.items() if str(m).startswith("val/")), (None, None))
    if monitor:
        raise ConfigError(
            f"{key}={monitor}: a replay has no held-out evaluation to switch on "
            "(switch by objective.switch_step, or monitor a rollout/ metric)"
        )
    if cfg.callbacks.get("alignment"):
        raise ConfigError("diagnostics=alignment draws fresh rollouts: a replay has no engine (use diagnostics=none)")
    devices, nodes = cfg.trainer.devices, cfg.trainer.get("num_nodes", 1)
    world = int(devices) * int(nodes) if str(devices).isdigit() else manifest["world_size"]
    updates = cfg.module.ppo_epochs * cfg.module.mini_batches
    check_record(directory, math.ceil(cfg.trainer.max_steps / updates), world)
    old_dir = str(manifest["config"].get("run_dir"))
    ignore = {"run_dir", "replay_from", "ckpt_path", "eval_before_training"}
    differ = [
        k
        for k in sorted({*recorded, *now})
        if recorded.get(k) != now.get(k) and k not in ignore and not _under(k, ["data", "hydra"])
        if old_dir not in str(recorded.get(k))  # paths inside the recorded run's directory
    ]
    log.info("replay of %s; keys that differ from the recorded run: %s", run_dir, ", ".join(differ) or "none")
    with open_dict(cfg):
        cfg.data._target_ = REPLAY_DATA
        cfg.data.record_dir = str(directory)
        cfg.data.record_rollouts = False
    with open_dict(cfg.trainer):
        cfg.trainer.limit_val_batches = 0  # nothing to generate held-out samples with
