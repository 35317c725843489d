"""Which parameters of a freshly built task no weights file has set, for evaluating a model without a checkpoint
(`python eval.py` with no `ckpt_path`): numbers from parameters nobody trained mean nothing, so `check_trained`
refuses them by name unless `allow_untrained=true` (`stm.app.run.check_trained`, with `describe_untrained`'s lines)."""

from __future__ import annotations

import sys

import torch


def loaded_from_pretrained(module: torch.nn.Module) -> bool:
    """Whether a module's weights came from a file when it was built: a Hugging Face model that `from_pretrained`
    loaded (it knows the name or folder it came from), or any module that says so with `stm_pretrained = True`."""
    if getattr(module, "stm_pretrained", False):
        return True
    modeling = sys.modules.get("transformers.modeling_utils")  # no Hugging Face model was built without it
    return modeling is not None and isinstance(module, modeling.PreTrainedModel) and \
        bool(getattr(module, "name_or_path", ""))


def untrained_parameters(task: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter of a freshly built task that no weights file has set: all of them but
    those inside modules loaded from pretrained weights. So stm's own transformer counts whole, a pretrained
    Hugging Face model not at all, and the memory's parameters (memory tokens, associative projections) and
    anything else stm adds always; a parameter shared with a pretrained module (tied weights) counts as loaded, and
    so do peft's LoRA adapters inside one (fresh adapters are zero updates: the base model's numbers)."""
    loaded = {id(p) for m in task.modules() if loaded_from_pretrained(m) for p in m.parameters()}
    return [(name, p) for name, p in task.named_parameters() if id(p) not in loaded]


def describe_untrained(task: torch.nn.Module, untrained: list[tuple[str, torch.nn.Parameter]],
                        shown: int = 6) -> list[str]:
    """One line per top-level module with untrained parameters: its class, how many, and their first names."""
    lines = []
    for top in dict.fromkeys(name.split(".", 1)[0] for name, _ in untrained):
        params = [(name, p) for name, p in untrained if name.split(".", 1)[0] == top]
        module = task.get_submodule(top)
        n_all = len(list(module.parameters()))
        count = f"all {n_all} parameters" if len(params) == n_all and n_all > 1 else \
            f"its {n_all} parameter" if n_all == 1 else f"{len(params)} of its {n_all} parameters"
        names = ", ".join(f"{name} {tuple(p.shape)}" for name, p in params[:shown])
        more = f", ... and {len(params) - shown} more" if len(params) > shown else ""
        lines.append(f"  {top} ({type(module).__name__}): {count}, {sum(p.numel() for _, p in params):,} values: "
                     f"{names}{more}")
    return lines
