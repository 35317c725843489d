"""Warm start: a new run that begins from the weights of another run's checkpoint (`init_from=<file>`).

Unlike `ckpt_path` (which resumes a run: weights, optimizer, scheduler, step, data position), `init_from` copies
only the parameters and buffers whose names and shapes match, and training starts at step 0 with a fresh
optimizer. Parameters the checkpoint does not have (e.g. the memory tokens of `memory=rmt` when the checkpoint
was trained with `memory=none`) keep their fresh initialisation; what the checkpoint has and the new run does not
is left out. Both lists are logged, so nothing is dropped silently. The file is read as data only
(`read_checkpoint`), like every checkpoint a user passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stm.app.resume import read_checkpoint

log = logging.getLogger(__name__)


@dataclass
class WarmStart:
    """What `warm_start` copied: tensor names loaded, left fresh (not in the checkpoint), and left unused."""

    path: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def describe(self) -> str:
        def names(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "") or "none"

        return (f"init_from: {len(self.loaded)} tensors from {self.path}; left fresh (not in it): "
                f"{names(self.fresh)}; in it but not used: {names(self.unused)}")


def warm_start(module: torch.nn.Module, path: str | Path, trust: bool = False) -> WarmStart:
    """Copy into `module` (a Lightning task) the tensors of the checkpoint at `path` whose names and shapes match.

    A tensor of the same name with another shape is an error (it names both shapes): the checkpoint was trained
    with another model size, and copying the rest would leave a model that is neither. A checkpoint that shares
    no tensor with the module is an error too.
    """
    path = Path(path).expanduser()
    checkpoint = read_checkpoint(path, trust=trust, what="init_from")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"init_from: {path} holds no 'state_dict' (not a Lightning checkpoint of an stm run)")
    own = module.state_dict()
    wrong = [f"{name}: checkpoint {tuple(state[name].shape)}, this run {tuple(own[name].shape)}"
             for name in own if name in state and tuple(state[name].shape) != tuple(own[name].shape)]
    if wrong:
        raise ValueError(f"init_from: {path} has tensors of other shapes than this run's model (was it trained "
                         f"with another model size?): " + "; ".join(wrong))
    report = WarmStart(str(path), loaded=[n for n in own if n in state], fresh=[n for n in own if n not in state],
                       unused=[n for n in state if n not in own])
    if not report.loaded:
        raise ValueError(f"init_from: {path} shares no parameter name with this run's model (its first names: "
                         f"{', '.join(list(state)[:4])}; this run's: {', '.join(list(own)[:4])})")
    module.load_state_dict({name: state[name] for name in report.loaded}, strict=False)
    log.info("%s", report.describe())
    return report
