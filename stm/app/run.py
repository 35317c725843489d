"""What `train.py` and `eval.py` do with a composed config: build every object from `_target_` (`stm.app.builders`),
train or evaluate (a checkpoint's stored config: `stm.app.checkpoint_config`), report."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from stm.app import resolvers  # noqa: F401  (registers the OmegaConf resolvers that conf/ uses)
from stm.app.builders import (
    build,
    build_components,
    build_trainer,
    check_task_fits_data,
    compile_backbone,
    own_errors,
    seed_everything,
)
from stm.app.checkpoint_config import (
    BUILT_FROM,
    REPLACED_BY_CHECKPOINT,
    STORED_SECTIONS,
    apply_eval_overrides,
    check_stored_config,
    load_checkpoint_config,
    refuse_section_overrides,
    without_retired_keys,
)
from stm.app.config import (
    ConfigError,
    check_retired_overrides,
    validate_run_config,
    validate_train_config,
)
from stm.app.parameter_counts import parameter_counts, parameters_line
from stm.app.resume import (
    RunGuard,
    checkpoint_dir,
    checkpoint_step,
    checkpoint_to_resume,
    continue_csv_logs,
    trusts_checkpoints,
)
from stm.app.sweeps import NonFiniteMetricError, configure_wandb, ddp_job, is_rank_zero
from stm.app.untrained import describe_untrained, untrained_parameters
from stm.app.warm_start import warm_start

log = logging.getLogger("stm")

# building and a checkpoint's stored config moved to their own modules; imported from here as before
__all__ = ["BUILT_FROM", "REPLACED_BY_CHECKPOINT", "STORED_SECTIONS", "build", "build_components", "build_trainer",
           "check_stored_config", "check_task_fits_data", "check_trained", "compile_backbone", "evaluate", "hydra_main",
           "load_checkpoint_config", "own_errors", "refuse_section_overrides", "seed_everything", "train",
           "training_report", "unigram_baseline", "without_retired_keys"]


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
            log.info("model: %s; memory: %s", type(model).__name__, type(parts["memory"]).__name__)
            log.info("%s", parameters_line(parameter_counts(model, parts["memory"])))
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
        run_cfg = apply_eval_overrides(run_cfg, cfg)
        seed_everything(cfg.get("seed"))
        parts = build_components(run_cfg)
        untrained = check_trained(parts["task"], cfg) if not ckpt_path else []
        log.info("%s", parameters_line(parameter_counts(parts["model"], parts["memory"])))
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
