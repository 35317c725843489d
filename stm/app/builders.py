"""Building a run's objects from a composed config: tokenizer, data, model, memory and task from their `_target_`s
(errors of stm's own checks come out as themselves), the Lightning Trainer with its loggers and callbacks,
the compiled backbone (`run.compile`) and the seeds."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from stm.app import resolvers  # noqa: F401  (registers the OmegaConf resolvers that conf/ uses)
from stm.app.checkpoint_io import AtomicCheckpointIO
from stm.app.config import ConfigError
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
