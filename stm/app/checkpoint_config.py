"""The run config stored in a checkpoint, for `eval.py ckpt_path=...`: read as plain data, checked (the sections
eval.py builds, and without trust nothing but stm's classes and torch optimizers), keys an older stm wrote
dropped; and command-line overrides of the sections it replaces refused."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stm.app.config import RETIRED_KEYS, ConfigError
from stm.app.resume import TRUST_HINT, UntrustedCheckpointError, read_checkpoint

log = logging.getLogger("stm")

STORED_SECTIONS = ("tokenizer", "data", "model", "memory", "task")  # what eval.py builds from a checkpoint
# where the `_target_`s of a stored config may point without trust: stm's building blocks and torch's optimizers
BUILT_FROM = ("stm.models", "stm.memory", "stm.tasks", "stm.data", "torch.optim")


def _within(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in BUILT_FROM)


def _builds_known_code(target) -> bool:
    """Whether a `_target_` names a class or function defined in `BUILT_FROM`: the path is checked before anything
    is imported, and the object it leads to after (`stm.tasks.lm.torch.load` leads out of stm: refused)."""
    from hydra.utils import get_object

    if not isinstance(target, str) or not _within(target.rsplit(".", 1)[0]):
        return False
    try:
        module = getattr(get_object(target), "__module__", None)
    except Exception:  # noqa: BLE001 - nothing to build: instantiate gives its own error, naming the key
        return True
    return isinstance(module, str) and _within(module)


def _leaves(node, prefix: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every entry in nested dicts and lists."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}")
        return
    if isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{prefix}[{i}]")
        return
    yield prefix, node


def check_stored_config(config: Mapping, path: Path, trust: bool = False) -> None:
    """The run config stored in a checkpoint has the sections eval.py builds, each with a `_target_` (memory:
    its mechanisms); without trust, it builds nothing but stm's classes and torch optimizers, and asks no
    library to run code it downloads (`trust_remote_code`)."""
    where = f"the stm config stored in {path}"
    for section in STORED_SECTIONS:
        value = config.get(section)
        if not isinstance(value, Mapping) or not value:
            state = "has no" if value is None else "has an empty" if isinstance(value, Mapping) else \
                f"has a {type(value).__name__} for its"
            raise ConfigError(f"ckpt_path: {where} {state} '{section}' section (checkpoint key stm.config.{section}); "
                              f"a checkpoint of stm's train.py stores {', '.join(STORED_SECTIONS)}")
        if section != "memory" and not value.get("_target_"):
            raise ConfigError(f"ckpt_path: {where} has no '{section}._target_' (checkpoint key "
                              f"stm.config.{section}._target_): nothing says what to build for {section}")
    if trust:
        return
    for section in STORED_SECTIONS:
        for key, value in _leaves(config[section], section):
            name = key.rsplit(".", 1)[-1]
            if name == "_target_" and not _builds_known_code(value):
                raise UntrustedCheckpointError(
                    f"ckpt_path: refused to evaluate {path}: {where} builds {key}={value}, which is not one of "
                    f"{', '.join(BUILT_FROM)}, so building it would run code that the checkpoint chose. "
                    f"{TRUST_HINT}.")
            if name == "trust_remote_code" and value:
                raise UntrustedCheckpointError(
                    f"ckpt_path: refused to evaluate {path}: {where} sets {key}={value}, which runs code downloaded "
                    f"with the model or data. {TRUST_HINT}.")


def without_retired_keys(config: Mapping, path: Path) -> dict:
    """The stored config without the keys of `RETIRED_KEYS` that an older stm wrote into the sections eval.py
    builds (task.n_segments), each dropped with a warning: a checkpoint cannot be edited, and what such a key
    set (the chunk length) is stored resolved in its data section."""
    config = {key: dict(value) if isinstance(value, Mapping) else value for key, value in config.items()}
    for key in RETIRED_KEYS:
        section, name = key.rsplit(".", 1)
        if section in STORED_SECTIONS and name in config[section]:
            del config[section][name]
            log.warning("ckpt_path: %s stores %s, which stm no longer takes; left out (%s %s)", path, key, key,
                        RETIRED_KEYS[key])
    return config


def load_checkpoint_config(ckpt_path: str | Path, trust: bool = False) -> tuple[DictConfig, dict]:
    """The run config and validation metrics that stm stored in a checkpoint, read as plain data
    (`stm.app.resume.read_checkpoint`) and checked (`check_stored_config`)."""
    path = Path(ckpt_path).expanduser()
    checkpoint = read_checkpoint(path, trust=trust)
    stm_info = checkpoint.get("stm")
    if not isinstance(stm_info, Mapping) or not stm_info.get("config"):
        raise ValueError(f"ckpt_path: {path} is not an stm checkpoint (no 'stm' config stored in it); "
                         f"it must come from stm's train.py")
    config = stm_info["config"]
    if isinstance(config, DictConfig):  # an older stm's checkpoint, read with trust_checkpoint=true
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping):
        raise ValueError(f"ckpt_path: the stm config stored in {path} (checkpoint key stm.config) is a "
                         f"{type(config).__name__}, not a mapping of config sections")
    check_stored_config(config, path, trust)
    config = without_retired_keys(config, path)
    recorded = stm_info.get("val_metrics") or {}
    return OmegaConf.create(dict(config)), dict(recorded) if isinstance(recorded, Mapping) else {}


# the sections of the composed config that a checkpoint's stored run config replaces (and `experiment`, which sets them)
REPLACED_BY_CHECKPOINT = (*STORED_SECTIONS, "experiment")


def _command_line_overrides() -> list[str]:
    """The overrides of the current Hydra job (none outside one, e.g. on the other ranks of a DDP job)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _override_section(override: str) -> str:
    """The top-level config key an override sets: `memory=xl` -> memory, `source@data.val_source=x` -> data."""
    key = override.split("=", 1)[0].lstrip("+~")
    if "@" in key:
        key = key.split("@", 1)[1]
    return key.split(".", 1)[0].split("/", 1)[0]


def refuse_section_overrides(ckpt_path) -> None:
    """With a checkpoint, model, memory, task, tokenizer and data come from the run config stored in it: an
    override of them on the command line would be silently unused, so it is an error that says what to do."""
    ignored = [o for o in _command_line_overrides() if _override_section(o) in REPLACED_BY_CHECKPOINT]
    if ignored:
        raise ConfigError(
            f"ckpt_path={ckpt_path}: {', '.join(ignored)} would not be used: with a checkpoint, "
            f"{', '.join(STORED_SECTIONS)} come from the run config stored in it. Change its data with "
            f"+data_overrides.<key>=<value> (its decoding with +generation_overrides.<key>=<value>), or drop "
            f"ckpt_path to evaluate the configured model as it is")


def apply_eval_overrides(run_cfg: DictConfig, cfg: DictConfig) -> DictConfig:
    """The run config that eval.py builds from: `run_cfg` (a checkpoint's stored config, or the composed one) with
    eval.py's `data_overrides` merged into its data section and `generation_overrides` into its
    `task.generation` (e.g. `+generation_overrides.segment_overflow=extend` for a checkpoint trained before
    the option). A generation override for a task that does not generate is an error naming the task."""
    if cfg.get("data_overrides"):
        run_cfg.data = OmegaConf.merge(run_cfg.data, cfg.data_overrides)
    overrides = cfg.get("generation_overrides")
    if overrides:
        if not isinstance(run_cfg.task.get("generation"), Mapping):
            raise ConfigError(f"generation_overrides ({', '.join(map(str, overrides))}): the task "
                              f"{run_cfg.task.get('_target_')} has no task.generation to change (it does not "
                              f"generate text)")
        run_cfg.task.generation = OmegaConf.merge(run_cfg.task.generation, overrides)
    return run_cfg
