"""The OmegaConf resolvers that conf/ uses (`${stm_resume_dir:...}`, `${stm_sqlite:...}`, ...), registered on import.

`stm.app.run` imports this module; code that composes conf/ by itself (tests, notebooks) imports it first.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from stm.app.config import ConfigError


def wandb_offline() -> bool:
    """wandb runs offline unless the environment says it may go online (WANDB_MODE or an API key)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online":
        return False
    return not os.environ.get("WANDB_API_KEY")


def _resume_dir(kind: str, parent: str, default: str, *, _root_: DictConfig) -> str:
    """`${stm_resume_dir:run|sweep,<parent folder>,<new folder name>}`: see `stm.app.resume.resume_dir`."""
    from stm.app.resume import resume_dir

    return resume_dir(kind, parent, default, _root_=_root_)


def _sqlite_url(path: str) -> str:
    """`${stm_sqlite:<file>}`: an sqlite URL for the file, its folder created (Optuna opens it before any job)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        optuna_major, sqlalchemy_major = (int(version(p).split(".")[0]) for p in ("optuna", "sqlalchemy"))
    except PackageNotFoundError:
        optuna_major = sqlalchemy_major = 0
    if optuna_major == 2 and sqlalchemy_major >= 2:  # Optuna 2.x cannot create an sqlite study with SQLAlchemy 2
        raise ConfigError("hydra.sweeper.storage: Optuna 2.x (hydra-optuna-sweeper) needs SQLAlchemy < 2 for its "
                          "sqlite storage: pip install 'sqlalchemy<2' 'alembic<1.14'")
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def _if_gpu(accelerator, value):
    """`${stm_if_gpu:<accelerator>,<value>}`: the value on GPU accelerators, else null (e.g. GPUs per node)."""
    return value if str(accelerator).lower() in ("gpu", "cuda") else None


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("stm_resume_dir"):
        OmegaConf.register_new_resolver("stm_resume_dir", _resume_dir)
    resolvers = {
        "stm_sqlite": _sqlite_url,
        "stm_if_gpu": _if_gpu,
        "mul": lambda *xs: _product(xs),
        "stm_wandb_offline": wandb_offline,
        "stm_samples": lambda: str(Path(__file__).resolve().parents[1] / "data" / "samples"),  # shipped data
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _product(xs):
    out = 1
    for x in xs:
        out *= x
    return out


_register_resolvers()
