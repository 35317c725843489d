"""What `train.py` and `eval.py` do with a composed config: build every object from `_target_`, run, report."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from stm.app import resolvers  # noqa: F401  (registers the OmegaConf resolvers that conf/ uses)
from stm.app.checkpoint_io import AtomicCheckpointIO
from stm.app.config import (
    RETIRED_KEYS,
    ConfigError,
    check_retired_overrides,
    validate_run_config,
    validate_train_config,
)
from stm.app.resume import (
    TRUST_HINT,
    RunGuard,
    UntrustedCheckpointError,
    checkpoint_dir,
    checkpoint_step,
    checkpoint_to_resume,
    continue_csv_logs,
    read_checkpoint,
    trusts_checkpoints,
)
from stm.app.sweeps import NonFiniteMetricError, configure_wandb, ddp_job, is_rank_zero
from stm.app.untrained import describe_untrained, untrained_parameters
from stm.app.warm_start import warm_start
from stm.memory import build_memory

log = logging.getLogger("stm")


@contextmanager
def own_errors():
    """Let a value or file error raised by stm's own checks come out of `instantiate` as itself.

    Those messages already name the key or file; Hydra's wrapper would bury them. Other failures (a wrong
    keyword, an unknown `_target_`) keep Hydra's message, which names the config key and the target.
    """
    try:
        yield
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, OSError)):
            raise err.__cause__ from None
        raise


def build(section: DictConfig, **kwargs) -> Any:
    """`hydra.utils.instantiate` under `own_errors`."""
    with own_errors():
        return instantiate(section, **kwargs)


def check_task_fits_data(cfg: DictConfig) -> None:
    """A context -> target task needs examples with targets (language modelling reads either kind)."""
    from hydra.utils import get_class

    from stm.data.conditional import ConditionalDataModule
    from stm.tasks import ConditionalLMTask

    task_class, data_class = get_class(cfg.task._target_), get_class(cfg.data._target_)
    if issubclass(task_class, ConditionalLMTask) and not issubclass(data_class, ConditionalDataModule):
        raise ConfigError(f"task: {cfg.task._target_} needs context -> target examples, but data: "
                          f"{cfg.data._target_} gives plain text; choose a data config of examples (probe_recall, "
                          f"probe_babilong, conditional, *_sample), or task=lm")


def build_components(cfg: DictConfig) -> dict[str, Any]:
    """tokenizer, datamodule, model, memory and task, built from the config in that order."""
    check_task_fits_data(cfg)
    tokenizer = build(cfg.tokenizer)
    datamodule = build(cfg.data, tokenizer=tokenizer)
    vocab_size = cfg.model.get("vocab_size") or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    model = build(cfg.model, vocab_size=vocab_size)
    with own_errors():
        memory = build_memory(cfg.memory, model)
    task = build(cfg.task, model=model, memory=memory)
    task.run_config = OmegaConf.to_container(cfg, resolve=True)
    return {"tokenizer": tokenizer, "datamodule": datamodule, "model": model, "memory": memory, "task": task}


def _instantiate_dict(section: DictConfig | None) -> list:
    """Build each entry of a dict of `_target_` configs (callbacks, loggers); null entries are off."""
    if not section:
        return []
    return [instantiate(c) for c in section.values() if c is not None and "_target_" in c]


def build_trainer(cfg: DictConfig, callbacks: list | tuple = ()) -> tuple[L.Trainer, list]:
    """The Lightning Trainer of `cfg.trainer`, its loggers and callbacks plus `callbacks`.
    On SLURM, Lightning's own requeue-on-signal is off: `RunGuard` writes the checkpoint and requeues.
    Checkpoints are written whole or not at all (`AtomicCheckpointIO`, unless the config chose a CheckpointIO)."""
    loggers = _instantiate_dict(cfg.get("logger"))
    all_callbacks = _instantiate_dict(cfg.get("callbacks")) + list(callbacks)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    extra = {}
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect() and not trainer_cfg.get("plugins"):
        extra["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    trainer = instantiate(trainer_cfg, logger=loggers or False, callbacks=all_callbacks, **extra)
    if getattr(trainer.strategy, "_checkpoint_io", None) is None:  # none chosen: Lightning would make its default
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer, loggers


def compile_backbone(model: torch.nn.Module, options) -> None:
    """`run.compile`: false, true, or a mapping of `torch.compile` options. Compiles the backbone in place
    (`nn.Module.compile`), so parameter names and checkpoints stay the same; the segment loop stays eager."""
    if not options:
        return
    kwargs = OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else \
        (dict(options) if isinstance(options, dict) else {})
    model.compile(**kwargs)
    log.info("compiled the backbone with torch.compile(%s)", kwargs)


def seed_everything(seed: int | None) -> None:
    """Seed python, numpy and torch; 0 is a seed like any other, only null leaves things unseeded."""
    if seed is not None:
        L.seed_everything(seed, workers=True, verbose=False)


def _finish_wandb(loggers: list) -> None:
    """Always end the wandb run (in a `finally`: a run that raised is marked failed, exit code 1)."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)


def _output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir)


def train(cfg: DictConfig) -> float | None:
    """Fit the task; returns the monitored validation metric (for sweeps), or None.

    `resume=auto` continues from the run folder's last.ckpt (see `stm.app.resume`). A loss or optimized metric that
    is not finite raises `NonFiniteMetricError`, which a sweeper records as a failed trial.
    """
    validate_train_config(cfg)
    with ddp_job("train", cfg):  # a DDP trainer starts its other ranks on this (final) config
        started = time.time()
        out = _output_dir(cfg)
        trust = trusts_checkpoints(cfg)
        init_from = cfg.get("init_from") or None
        if init_from and cfg.get("ckpt_path"):
            raise ConfigError(f"init_from={init_from} and ckpt_path={cfg.ckpt_path}: set one; ckpt_path resumes a run "
                              "(weights, optimizer, step), init_from starts a new one from a checkpoint's weights")
        ckpt_path = checkpoint_to_resume(cfg)  # refuses a checkpoint that needs code to load (unless trusted)
        with open_dict(cfg):
            cfg.ckpt_path = ckpt_path  # the other ranks of a DDP job resume from the same checkpoint
        configure_wandb(cfg, out)
        seed_everything(cfg.get("seed"))
        if is_rank_zero():
            out.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
        parts = build_components(cfg)
        task, datamodule, model = parts["task"], parts["datamodule"], parts["model"]
        compile_backbone(model, OmegaConf.select(cfg, "run.compile", default=False))
        guard = RunGuard(checkpoint_dir(cfg), signals=list(OmegaConf.select(cfg, "run.checkpoint_signals") or []))
        trainer, loggers = build_trainer(cfg, callbacks=[guard])
        try:
            if ckpt_path:
                again = f" (init_from={init_from} is not read again)" if init_from else ""
                log.info("resuming from %s%s", ckpt_path, again)
                continue_csv_logs(loggers, checkpoint_step(ckpt_path, trust))
            elif init_from:
                warm_start(task, init_from, trust)
            for lg in loggers:
                lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
            n_params = sum(p.numel() for p in model.parameters())
            log.info("model: %s with %.2fM parameters; memory: %s", type(model).__name__, n_params / 1e6,
                     type(parts["memory"]).__name__)
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not trust)
        finally:
            _finish_wandb(loggers)
        if is_rank_zero():
            log.info("\n%s", training_report(cfg, trainer, parts, time.time() - started))
        guard.hand_over()
        return _optimized_value(cfg, trainer)


def _optimized_value(cfg: DictConfig, trainer: L.Trainer) -> float | None:
    monitor = cfg.get("optimized_metric")
    value = trainer.callback_metrics.get(monitor) if monitor else None
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise NonFiniteMetricError(f"optimized_metric {monitor} is {value} after {trainer.global_step} steps: "
                                   f"the run diverged")
    return value


def training_report(cfg: DictConfig, trainer: L.Trainer, parts: dict, seconds: float) -> str:
    """Where the run's outputs are, and its final validation numbers against the unigram baseline."""
    out = _output_dir(cfg)
    lines = [f"stm: finished in {seconds:.0f} s, {trainer.global_step} steps"]
    val = parts["task"].last_val
    if val:
        lines.append("  validation: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items() if k != "step"))
    baseline = unigram_baseline(parts["datamodule"], parts["tokenizer"].vocab_size)
    if baseline is not None:
        lines.append(f"  unigram baseline on the same validation text: bpb={baseline['bpb']:.4f}, "
                     f"loss={baseline['loss']:.4f}")
    ckpt_cb = trainer.checkpoint_callback
    if ckpt_cb is not None and hasattr(ckpt_cb, "best_model_path"):  # RunGuard alone (no ModelCheckpoint) has none
        if ckpt_cb.best_model_path:
            lines.append(f"  best checkpoint: {ckpt_cb.best_model_path}")
        last = Path(ckpt_cb.dirpath or "") / "last.ckpt"
        if last.is_file():
            lines.append(f"  last checkpoint: {last}")
    for lg in trainer.loggers:
        lines.append(f"  {type(lg).__name__}: {lg.log_dir if hasattr(lg, 'log_dir') else lg.save_dir}")
    lines.append(f"  resolved config: {out / 'config_resolved.yaml'}")
    lines.append(f"  log: {out / (str(cfg.task_name) + '.log')}")
    return "\n".join(lines)


def unigram_baseline(datamodule, vocab_size: int) -> dict[str, float] | None:
    """Loss and bits per byte of a unigram model fitted on the training text, on the validation text."""
    from stm.metrics.lm import unigram_nll

    train_ids, val_ids = getattr(datamodule, "train_ids", None), getattr(datamodule, "val_ids", None)
    if train_ids is None or val_ids is None or len(val_ids) < 2:
        return None
    labels = np.asarray(val_ids[1:])
    nll = unigram_nll(train_ids, labels, vocab_size)
    n_bytes = int(np.asarray(datamodule.val_bytes[1:]).sum())
    return {"loss": nll / len(labels), "bpb": nll / math.log(2) / max(n_bytes, 1)}


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
            f"+data_overrides.<key>=<value>, or drop ckpt_path to evaluate the configured model as it is")


def check_trained(task: torch.nn.Module, cfg: DictConfig) -> list[str]:
    """Without a checkpoint: the names of the task's untrained parameters, where `allow_untrained=true` says to
    evaluate anyway; else, if there are any, an error naming them and the ways to proceed."""
    allow = cfg.get("allow_untrained", False)
    if allow is not None and not isinstance(allow, bool):
        raise ConfigError(f"allow_untrained must be true or false, got {allow!r}")
    untrained = untrained_parameters(task)
    if untrained and not allow:
        n_values = sum(p.numel() for _, p in untrained)
        raise ConfigError("\n".join([
            f"eval.py without ckpt_path evaluates the configured model as it is, but {len(untrained)} of its "
            f"parameters ({n_values:,} values) are freshly initialised: no checkpoint trained them and no "
            f"pretrained weights hold them, so the metrics would say nothing about the model:",
            *describe_untrained(task, untrained),
            "To proceed: train them (python train.py ...) and evaluate the checkpoint (python eval.py "
            "ckpt_path=...); or choose a pretrained model and a memory without parameters (e.g. model=smollm2_135m "
            "memory=xl memory.xl.sink_tokens=4; memory=none, full, xl and swa add none); or evaluate anyway with "
            "allow_untrained=true (the names are recorded in eval_metrics.json)."]))
    return [name for name, _ in untrained]


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Validate on a task's validation data, print and return the metrics, and write eval_metrics.json.

    With `ckpt_path`: the checkpoint, on the data of its run (or the overrides given). Without: the configured
    model as it is (pretrained weights), refused when it has freshly initialised parameters (`check_trained`)
    unless `allow_untrained=true`. Under `trainer=ddp_cpu` / `ddp` the validation data is split across the ranks
    and the sums are added up."""
    validate_run_config(cfg)
    with ddp_job("evaluate", cfg):
        trust = trusts_checkpoints(cfg)
        ckpt_path = cfg.get("ckpt_path") or None
        if ckpt_path:
            refuse_section_overrides(ckpt_path)
            run_cfg, recorded = load_checkpoint_config(ckpt_path, trust)  # refuses a file that needs code to load
        else:
            validate_train_config(cfg)
            run_cfg, recorded = cfg, {}
        if cfg.get("data_overrides"):
            run_cfg.data = OmegaConf.merge(run_cfg.data, cfg.data_overrides)
        seed_everything(cfg.get("seed"))
        parts = build_components(run_cfg)
        untrained = check_trained(parts["task"], cfg) if not ckpt_path else []
        compile_backbone(parts["model"], OmegaConf.select(cfg, "run.compile", default=False))
        trainer, loggers = build_trainer(cfg)
        try:
            results = trainer.validate(parts["task"], datamodule=parts["datamodule"], ckpt_path=ckpt_path,
                                       weights_only=not trust)
        finally:
            _finish_wandb(loggers)
        metrics = {k: float(v) for k, v in results[0].items()} if results else {}
        if not is_rank_zero():
            return metrics
        out = _output_dir(cfg)
        out.mkdir(parents=True, exist_ok=True)
        what = str(ckpt_path) if ckpt_path else "the configured model as it is (no checkpoint): " + ", ".join(
            f"{key}={run_cfg[key].get('_target_') or '+'.join(run_cfg[key])}" for key in ("model", "memory", "task"))
        report = {"ckpt_path": str(ckpt_path) if ckpt_path else None, "evaluated": what, "metrics": metrics,
                  "recorded_in_checkpoint": recorded, "world_size": trainer.world_size}
        if not ckpt_path:
            report["untrained_parameters"] = untrained
            OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
        (out / "eval_metrics.json").write_text(json.dumps(report, indent=2))
        lines = [f"stm eval: {what}"]
        if untrained:
            names = ", ".join(untrained[:6]) + (", ..." if len(untrained) > 6 else "")
            lines.append(f"  with {len(untrained)} untrained parameters (allow_untrained=true): {names}")
        for key, value in metrics.items():
            note = f" (recorded in the checkpoint: {recorded[key]:.6f})" if key in recorded else ""
            lines.append(f"  {key} = {value:.6f}{note}")
        lines.append(f"  written to {out / 'eval_metrics.json'}")
        log.info("\n%s", "\n".join(lines))
        return metrics


def hydra_main(config_name: str):
    """A Hydra entry point over stm's conf/ folder, for `python train.py` and the console scripts. A command line
    that sets a retired key (`trainer.compile=true`) is refused before Hydra composes, naming the new key."""
    from stm.app.config import config_dir

    def decorate(fn):
        main = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(fn)

        @functools.wraps(fn)
        def checked(*args, **kwargs):
            check_retired_overrides(sys.argv[1:])
            return main(*args, **kwargs)

        return checked

    return decorate
