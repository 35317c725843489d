"""LoRA adapters on a Hugging Face causal LM (`model.lora`, through peft).

`model.lora.r=8` wraps the model's attention and MLP projections with peft LoRA adapters of rank 8 and freezes
every other weight of the model; `model.lora.r=null` (the default) trains the whole model as before. The memory
mechanism's parameters (memory tokens, associative projections) live in the memory module, not in the model,
so they train fully either way.

Options (`model.lora.<key>`):

- `r`:              the adapters' rank, a positive integer; null: no LoRA.
- `alpha`:          the scaling numerator (the update is B A x * alpha / r); null: 2 * r.
- `dropout`:        dropout on the adapters' input, in [0, 1).
- `target_modules`: the layers to adapt: a list of module names (`[q_proj, v_proj]`; a name matches a module
                    whose dotted path ends with it), a regular expression over the whole path, or `all-linear`
                    (null: every linear layer of the decoder, the output head excepted).
- `bias`:           `none` (default), `lora_only` or `all`: which biases train.
- any other field of `peft.LoraConfig` (`use_rslora`, `use_dora`, `modules_to_save`, ...), passed on as given;
  add it with `+model.lora.<field>=...`.

Freshly initialised adapters are zero updates (B = 0), so the wrapped model starts at the base model's logits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import warnings
from collections.abc import Mapping, Sequence

from torch import nn

log = logging.getLogger("stm")

ALL_LINEAR = "all-linear"
BIASES = ("none", "lora_only", "all")
# stm's names for LoraConfig's fields (the rest pass through under peft's own names)
ALIASES = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
           "bias": "bias"}
# LoraConfig fields that stm sets itself or that describe the saved adapter rather than the adaptation
RESERVED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "lora_alpha", "lora_dropout"}


def _plain(value):
    """omegaconf containers (what Hydra passes) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _lora_config_fields() -> set[str]:
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


def lora_settings(lora) -> dict | None:
    """`model.lora` checked and turned into `peft.LoraConfig` arguments; None when LoRA is off (null, or r null).

    Every error names the key: `model.lora.r must be a positive integer ...`.
    """
    if lora is None:
        return None
    if not isinstance(lora, Mapping):
        raise ValueError(f"model.lora must be a mapping of LoRA options (r, alpha, dropout, target_modules, bias) "
                         f"or null, got {lora!r}")
    lora = _plain(lora)
    if lora.get("r") is None:
        return None
    if importlib.util.find_spec("peft") is None:
        raise ImportError("model.lora needs the package peft, one of stm's dependencies: pip install peft (or "
                          "python3 bootstrap.py setup)")
    fields = _lora_config_fields()
    for key in lora:
        if key in ALIASES:
            continue
        if key in ("lora_alpha", "lora_dropout"):
            raise ValueError(f"model.lora.{key}: stm calls it model.lora.{key.removeprefix('lora_')}")
        if key in RESERVED or key not in fields:
            raise ValueError(f"model.lora.{key} is not a LoRA option: use r, alpha, dropout, target_modules, bias, "
                             f"or another field of peft.LoraConfig (use_rslora, use_dora, modules_to_save, ...)")

    r = lora["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"model.lora.r must be a positive integer (the adapters' rank; null: no LoRA), got {r!r}")
    alpha = lora.get("alpha")
    alpha = 2 * r if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"model.lora.alpha must be a positive number (null: 2 * r), got {alpha!r}")
    dropout = lora.get("dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"model.lora.dropout must be a number in [0, 1), got {dropout!r}")
    bias = lora.get("bias") or "none"
    if bias not in BIASES:
        raise ValueError(f"model.lora.bias must be one of {BIASES}, got {bias!r}")
    targets = lora.get("target_modules")
    targets = ALL_LINEAR if targets is None else targets
    if isinstance(targets, str):
        if not targets:
            raise ValueError("model.lora.target_modules is an empty string; give module names, a regular expression "
                             "or all-linear")
        if targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"model.lora.target_modules: {targets!r} is neither a list of module names, "
                                 f"all-linear, nor a regular expression ({err})") from None
    elif not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"model.lora.target_modules must be a non-empty list of module names (e.g. [q_proj, "
                         f"v_proj]), a regular expression, or all-linear; got {targets!r}")

    settings = {k: v for k, v in lora.items() if k not in ALIASES}
    settings.update(r=r, lora_alpha=alpha, lora_dropout=float(dropout), bias=bias, target_modules=targets)
    return settings


def _is_adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _check_targets(model: nn.Module, targets) -> None:
    """Every named target matches a linear layer of the model (peft's rule: the whole dotted path, or its end)."""
    if not isinstance(targets, list):
        return
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and _is_adaptable(m)})
    for target in targets:
        matches = [n for n in names if n == target or n.endswith("." + target)]
        if not matches:
            raise ValueError(f"model.lora.target_modules: {target!r} names no module of {type(model).__name__}; "
                             f"its linear layers are {', '.join(linear)}")
        if not any(_is_adaptable(model.get_submodule(n)) for n in matches):
            kind = type(model.get_submodule(matches[0])).__name__
            raise ValueError(f"model.lora.target_modules: {target!r} names a {kind}, not a linear "
                             f"layer; the linear layers of {type(model).__name__} are {', '.join(linear)}")


def wrap_with_lora(model: nn.Module, settings: dict) -> nn.Module:
    """`model` (a transformers causal LM) inside a `peft.PeftModel` with LoRA adapters as `settings` say
    (from `lora_settings`); the model's own weights are frozen, the adapters train."""
    from peft import LoraConfig, get_peft_model

    _check_targets(model, settings["target_modules"])
    config = LoraConfig(task_type="CAUSAL_LM", **settings)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated attribute
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: peft sets it right
            wrapped = get_peft_model(model, config)
    except ValueError as err:  # peft's own checks: a target it cannot adapt, an option it refuses
        raise ValueError(f"model.lora: peft could not wrap {type(model).__name__} with {settings}: {err}") from err
    return wrapped


def describe(model: nn.Module, settings: dict) -> str:
    """One line for the log: the adapters and how many of the model's parameters train."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targets = settings["target_modules"]
    targets = ", ".join(targets) if isinstance(targets, list) else targets
    return (f"model.lora: LoRA adapters of rank {settings['r']} (alpha {settings['lora_alpha']:g}) on {targets}; "
            f"{trainable:,} of the model's {total:,} parameters train ({100 * trainable / max(total, 1):.2f}%), "
            f"the rest is frozen")
