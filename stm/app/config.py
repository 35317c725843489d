"""Config helpers: where the configs live, and checks with errors that name the key.

The OmegaConf resolvers that conf/ uses are registered by `stm.app.resolvers`."""

from __future__ import annotations

import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml give the plugins' launchers stm's defaults under
# the plugins' own names (hydra/launcher=joblib); Hydra then checks them against the plugins' schemas, which is
# what we want, but warns about it on every run.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def config_dir() -> Path:
    """stm's Hydra configs: the package `stm.conf` of an installed wheel, else the checkout's top-level `conf/`.

    A wheel carries conf/ as stm/conf/ (pyproject.toml maps the package `stm.conf` to conf/); a checkout, or an
    editable install of one (`pip install -e .`, what bootstrap.py does), reads the checkout's conf/ in place.
    """
    package = Path(__file__).resolve().parents[1]  # stm/ (this file is stm/app/config.py)
    installed = package / "conf"
    checkout = package.parent / "conf"
    if (installed / "train.yaml").is_file():
        return installed
    # a checkout is recognised by its pyproject.toml too, so that some other project's conf/ in site-packages
    # (next to an installed stm without configs) is never taken for stm's
    if (checkout / "train.yaml").is_file() and (package.parent / "pyproject.toml").is_file():
        return checkout
    raise FileNotFoundError(
        f"stm's Hydra configs (train.yaml) were found neither in the installed package at {installed} nor in a "
        f"checkout at {checkout}: install stm from its wheel or a checkout (`pip install .` or `pip install -e .`)"
    )


def _positive_int(cfg: DictConfig, key: str, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def validate_train_config(cfg: DictConfig) -> None:
    """Check the values a run cannot work without, before anything is built."""
    for key in ("model", "memory", "task", "data", "trainer", "tokenizer"):
        if OmegaConf.select(cfg, key) is None:
            raise ConfigError(f"the config has no '{key}' section; pick one with {key}=<option>")
    if "segment_len" in cfg.task:
        _positive_int(cfg, "task.segment_len", allow_none=True)
    if "bptt_depth" in cfg.task:
        _positive_int(cfg, "task.bptt_depth", allow_none=True)
    _positive_int(cfg, "data.batch_size")
    seed = cfg.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ConfigError(f"seed must be a non-negative integer or null, got {seed!r}")
    resume = cfg.get("resume")
    if resume not in (None, False, "auto"):
        raise ConfigError(f"resume must be null or 'auto', got {resume!r}")
    _check_monitored_metric(cfg)
    validate_run_config(cfg)


def _check_monitored_metric(cfg: DictConfig) -> None:
    """task.target_loss=false validates without the teacher-forced read, so there is no val/loss: a checkpoint
    callback or sweep that watches it would fail only after the whole training run."""
    if OmegaConf.select(cfg, "task.target_loss", default=True) is not False:
        return
    watchers = {"callbacks.model_checkpoint.monitor": OmegaConf.select(cfg, "callbacks.model_checkpoint.monitor",
                                                                       default=None),
                "optimized_metric": cfg.get("optimized_metric")}
    for key, metric in watchers.items():
        if metric in ("val/loss", "val/ppl", "val/bpb"):
            raise ConfigError(
                f"{key}={metric}, but task.target_loss=false logs no {metric} (validation only generates and "
                f"scores): watch a score instead ({key}=val/acc"
                + (", callbacks.model_checkpoint.mode=max" if key.startswith("callbacks") else "")
                + "), or set task.target_loss=true")


# Keys that moved or went away, with what to write instead. A config or command line that still sets one gets a
# ConfigError saying so (on the command line before Hydra composes, which would only say the key is unknown).
RETIRED_KEYS = {
    "trainer.compile": "moved to run.compile (stm's own switches have their own section, run; trainer holds "
                       "only the Lightning Trainer's arguments): write run.compile=<value>",
    "trainer.checkpoint_signals": "moved to run.checkpoint_signals (stm's own switches have their own section, "
                                  "run; trainer holds only the Lightning Trainer's arguments): write "
                                  "run.checkpoint_signals=<value>",
    "task.n_segments": "was removed (the task never read it; it only set the chunk length): set the tokens per "
                       "sample with data.chunk_len, e.g. data.chunk_len=512 for 4 segments of 128 (the default: "
                       "2 segments, ${mul:${task.segment_len},2})",
}


def check_retired_overrides(overrides: list[str]) -> None:
    """Command-line overrides (`key=value`, `+key=value`, `~key`) of a key in `RETIRED_KEYS`: a ConfigError."""
    for override in overrides:
        if override.startswith("-"):  # Hydra's own flags (--multirun, -m, --cfg job)
            continue
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RETIRED_KEYS:
            raise ConfigError(f"{override}: {key} {RETIRED_KEYS[key]}")


def check_retired_keys(cfg: DictConfig) -> None:
    """A composed config (e.g. from a config file of your own) that sets a key in `RETIRED_KEYS`: a ConfigError."""
    for key, instead in RETIRED_KEYS.items():
        section, name = key.rsplit(".", 1)
        node = OmegaConf.select(cfg, section, default=None)
        if isinstance(node, DictConfig) and name in node:
            raise ConfigError(f"{key} {instead}")


def validate_run_config(cfg: DictConfig) -> None:
    """stm's own switches, the `run` section (`run.compile`, `run.checkpoint_signals`), and no retired key."""
    import signal

    check_retired_keys(cfg)
    run = cfg.get("run") or {}
    compile_opts = run.get("compile", False)
    if not isinstance(compile_opts, (bool, DictConfig, dict)) and compile_opts is not None:
        raise ConfigError(f"run.compile must be true, false or a mapping of torch.compile options "
                          f"(e.g. {{mode: max-autotune}}), got {compile_opts!r}")
    names = run.get("checkpoint_signals") or []
    if isinstance(names, str):
        raise ConfigError(f"run.checkpoint_signals must be a list of signal names, got {names!r}")
    for name in names:
        if not isinstance(name, str) or not isinstance(getattr(signal, name, None), signal.Signals):
            raise ConfigError(f"run.checkpoint_signals: {name!r} is not a signal name such as SIGUSR1")
