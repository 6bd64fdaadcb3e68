"""MkDocs hook: the configuration reference page, generated at every build so that it cannot drift.

Every key the schema types (`lightning_prerl/config/schema.py`: type, allowed range, one-line meaning
from the attribute docstring) with its default from `conf/config.yaml` composed by Hydra with its
default groups, and what each option of a config group changes. Registered in mkdocs.yml (`hooks:`);
`render()` is also what tests/test_docs.py reads.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
PAGE = "reference/config.md"
GROUPS = ("objective", "model", "data", "rollout", "trainer", "behavior")  # groups that set schema keys
BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
_MISSING = object()


def on_files(files, config):
    """Add the generated page to the build (mkdocs event)."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


# ---------------------------------------------------------------- types and ranges from the schema


def _bounds(metadata: list) -> list[str]:
    out = []
    for item in metadata:
        out += _bounds(getattr(item, "metadata", []))  # Annotated[..., Field(ge=1)] keeps a FieldInfo
        for name, sign in BOUNDS.items():
            if getattr(item, name, None) is not None:
                out.append(f"{sign} {getattr(item, name)}")
        if getattr(item, "min_length", None):
            out.append("non-empty")
    return out


def describe(annotation: Any) -> tuple[str, str]:
    """(type, allowed values) of a schema annotation, in words."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        kind, allowed = describe(args[0])
        return kind, ", ".join(filter(None, [allowed, *_bounds(list(args[1:]))]))
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        kind = " or ".join(dict.fromkeys(p[0] for p in parts)) + (" or null" if type(None) in args else "")
        return kind, "; ".join(p[1] for p in parts if p[1])
    if origin is Literal:
        return "str", "one of " + ", ".join(f"`{v}`" for v in args)
    if origin is list:
        kind, allowed = describe(args[0])
        return f"list of {kind}", f"items {allowed}" if allowed else ""
    if origin is tuple:
        parts = [describe(a) for a in args]
        allowed = {p[1] for p in parts}
        return "(" + ", ".join(p[0] for p in parts) + ")", f"each {allowed.pop()}" if len(allowed) == 1 else ""
    return getattr(annotation, "__name__", str(annotation)), ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The node model of a field (`Model`, `Sampling | None`), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def schema_keys(model: type[BaseModel], prefix: str, seen: dict | None = None) -> list[tuple[str, Any]]:
    """(dotted key, pydantic FieldInfo) of every leaf key below `model`, nested nodes flattened; a node
    class met a second time (`data.eval_sampling` after `data.sampling`) stays one row."""
    seen = {} if seen is None else seen
    out = []
    for name, field in model.model_fields.items():
        node, key = _model_of(field.annotation), f"{prefix}{name}"
        if node and node not in seen:
            seen[node] = key
            out += schema_keys(node, f"{key}.", seen)
        else:
            out.append((key, field))
    return out


def _same_as(field: Any, seen_at: dict) -> str | None:
    node = _model_of(field.annotation)
    return seen_at.get(node) if node else None


# ---------------------------------------------------------------- defaults from the composed config


def compose_all() -> dict[str, Any]:
    """The default config, each option of each group, and the chosen default options (raw values)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import lightning_prerl.config.checks  # noqa: F401  (registers the lp.* resolvers the defaults use)

    def raw(cfg) -> dict:
        return OmegaConf.to_container(cfg, resolve=False)

    with initialize_config_dir(str(CONF), version_base="1.3"):
        base = compose("config", return_hydra_config=True)
        choices = {k: v for k, v in OmegaConf.to_container(base.hydra.runtime.choices).items() if "/" not in k}
        default = raw(base)
        del default["hydra"]
        resolved = {}
        for key in _leaves(default):
            value = OmegaConf.select(base, key, throw_on_resolution_failure=False)
            if not isinstance(value, (dict, list)) and not OmegaConf.is_config(value):
                resolved[key] = value
        options = {
            group: {opt: raw(compose("config", overrides=[f"{group}={opt}"])) for opt in names}
            for group, names in group_options().items()
            if group in GROUPS
        }
    return {"default": default, "resolved": resolved, "choices": choices, "options": options}


def group_options() -> dict[str, list[str]]:
    """Every selectable config group under conf/ and its options."""
    skip = {"hydra", "recipe", "benchmark"}  # Hydra's plugins; pieces of presets; eval.benchmarks' names
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(CONF.iterdir())
        if d.is_dir() and d.name not in skip
    }


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def lookup(tree: dict, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def show(value: Any) -> str:
    """A config value as YAML writes it, in backticks."""
    if value is _MISSING:
        return "–"
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list):
        text = "[" + ", ".join(show(v).strip("`") for v in value) + "]"
    else:
        text = str(value)
    return f"`{text}`"


def default_cell(key: str, field: Any, composed: dict) -> str:
    value = lookup(composed["default"], key)
    if value is _MISSING:  # not in the default config: the schema's own default applies
        return "–" if field.is_required() else show(field.default)
    cell = show(value)
    resolved = composed["resolved"].get(key, _MISSING)
    if isinstance(value, str) and "${" in value and "oc.env" not in value and resolved not in (_MISSING, None):
        cell += f" = {show(resolved)}"  # machine-dependent values (oc.env) stay unresolved
    return cell


# ---------------------------------------------------------------- the page


def _cell(text: str) -> str:
    """Escape table-breaking pipes outside code spans."""
    parts = text.split("`")
    return "`".join(p.replace("|", "\\|") if i % 2 == 0 else p for i, p in enumerate(parts)).replace("\n", " ")


def table(rows: list[tuple[str, Any]], composed: dict, seen_at: dict | None = None) -> list[str]:
    out = ["| key | type | allowed | default | meaning |", "|---|---|---|---|---|"]
    for key, field in rows:
        kind, allowed = describe(
            field.annotation if not field.metadata else Annotated[field.annotation, *field.metadata]
        )
        if same := _same_as(field, seen_at or {}):
            kind, allowed = "node" + (" or null" if "null" in kind else ""), f"the keys of `{same}`"
        cells = [f"`{key}`", kind, allowed, default_cell(key, field, composed), field.description or ""]
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return out


def _differences(group: str, composed: dict, against: dict, keys: dict, skip: tuple = ()) -> list[str]:
    """One bullet per option of `group`: the typed leaf keys (`keys`: key -> FieldInfo) whose value
    differs from `against` (where `against` lacks a key: from the schema's default)."""
    base = _leaves(against)
    for key, field in keys.items():
        if key not in base and not field.is_required():
            base[key] = field.default
    lines = []
    for option, tree in composed["options"][group].items():
        if option in skip:
            continue
        changed = {k: v for k, v in _leaves(tree).items() if base.get(k, _MISSING) != v and not k.endswith("_target_")}
        changed = {k: v for k, v in changed.items() if k in keys}
        diff = ", ".join(f"`{k}={show(v).strip('`')}`" for k, v in sorted(changed.items())) or "the defaults"
        mark = " (default)" if composed["choices"].get(group) == option else ""
        lines.append(f"- `{group}={option}`{mark}: {_cell(diff)}")
    return lines


def _schedule_section(schedule: type[BaseModel], phase: type[BaseModel], options: list[str]) -> list[str]:
    """The keys of a schedule of phases; a phase's keys once, under `objective.phases.<name>.`, with the
    schema's defaults (docs/how-to/phases.md)."""
    schema_defaults = {"default": {}, "resolved": {}}
    out = ["", f"### A schedule of phases ({', '.join(f'`objective={o}`' for o in options)})", ""]
    out += [schedule.__doc__ or "", "", *table([("objective.name", schedule.model_fields["name"])], schema_defaults)]
    field = schedule.model_fields["phases"]
    allowed = ", ".join(_bounds(field.metadata))
    out.append(f"| `objective.phases` | mapping | {allowed} | – | {_cell(field.description)} |")
    rows = [(f"objective.phases.<name>.{k}", f) for k, f in phase.model_fields.items() if k != "objective"]
    description = phase.model_fields["objective"].description
    out.append(f"| `objective.phases.<name>.objective` | objective | the keys above | – | {_cell(description)} |")
    return out + table(rows, schema_defaults)[2:]


def render() -> str:
    from lightning_prerl.config.phases import Phase, Schedule
    from lightning_prerl.config.schema import DSRL, Objective, RunConfig

    composed = compose_all()
    groups = group_options()
    out = [
        "# Configuration reference",
        "",
        "Generated when the docs are built: types, ranges and meanings from the pydantic schema "
        "(`lightning_prerl/config/schema.py`, which checks every run before any compute), defaults from "
        "`conf/config.yaml` composed with its default groups. `–`: not set by the default config (the key "
        "is required or only some options set it). A value `${...}` is an interpolation; Hydra prints a "
        "run's whole config with `python experiments/run.py --cfg job`.",
        "",
        "## Config groups",
        "",
        "| group | options | default |",
        "|---|---|---|",
    ]
    for group, names in groups.items():
        out.append(f"| `{group}=` | {', '.join(f'`{n}`' for n in names)} | {show(composed['choices'].get(group))} |")

    top = [(k, f) for k, f in RunConfig.model_fields.items() if _model_of(f.annotation) is None and k != "objective"]
    untyped = sorted(set(composed["default"]) - set(RunConfig.model_fields))
    out += ["", "## Top level", "", *table(top, composed), ""]
    out.append(
        "Not typed by the schema: "
        + ", ".join(
            f"`{k}`" + (f" ({show(v)})" if not isinstance(v := composed["default"][k], dict) else "") for k in untyped
        )
        + "; see `conf/config.yaml` and the groups in `conf/`."
    )

    single = compose_single_objective(composed)
    out += ["", "## objective", "", RunConfig.model_fields["objective"].description or "", ""]
    options = composed["options"]["objective"]
    schedules = tuple(o for o, tree in options.items() if {"warmup", "phases"} & set(tree["objective"]))
    out += [f"### One objective (`objective=grpo` and the others but {', '.join(f'`{o}`' for o in schedules)})", ""]
    out += [Objective.__doc__ or "", "", *table(schema_keys(Objective, "objective."), single), ""]
    out += ["What each option changes against `objective=grpo`:", ""]
    objective_keys = dict(schema_keys(Objective, "objective."))
    out += _differences("objective", composed, single["default"], objective_keys, skip=schedules)
    out += ["", "### `objective=dsrl` (the default)", "", DSRL.__doc__ or "", ""]
    dsrl_rows = [
        (k, f) for k, f in schema_keys(DSRL, "objective.") if not k.startswith(("objective.warmup.", "objective.main."))
    ]
    out += table(dsrl_rows, composed)
    for phase in ("warmup", "main"):
        name = lookup(composed["default"], f"objective.{phase}.name")
        description = DSRL.model_fields[phase].description
        out.append(f"| `objective.{phase}.*` | objective | the keys above | `{name}` | {_cell(description)} |")
    out += _schedule_section(Schedule, Phase, [o for o in schedules if "phases" in options[o]["objective"]])

    typed = dict(schema_keys(RunConfig, ""))
    for group in ("model", "module", "data", "rollout", "trainer", "eval", "behavior", "async_rollout"):
        field = RunConfig.model_fields[group]
        node = _model_of(field.annotation)
        seen_at: dict = {}
        rows = schema_keys(node, f"{group}.", seen_at)
        out += ["", f"## {group}", "", node.__doc__ or "", "", *table(rows, composed, seen_at)]
        if group in composed["options"]:
            out += ["", f"What each option of `{group}=` changes against the default config (typed keys):", ""]
            out += _differences(group, composed, composed["default"], typed)
    return "\n".join(out) + "\n"


def compose_single_objective(composed: dict) -> dict:
    """`composed` with `objective=grpo` as the default: the reference of the single-objective table."""
    return {**composed, "default": composed["options"]["objective"]["grpo"], "resolved": {}}
