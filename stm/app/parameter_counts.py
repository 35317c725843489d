"""How many parameters a run has, and how many of them train, for the line that `train.py` and `eval.py` log
when they start:

    parameters: 136.9M total, 2.4M trainable (LoRA 2.4M, memory 4.6K)

The breakdown in brackets appears where it says something: the LoRA adapters' parameters (peft's `lora_*`
tensors) when the model has any, and the memory's own parameters (memory tokens, associative projections) when
it has any or when part of the model is frozen."""

from __future__ import annotations

from torch import nn


def parameter_counts(model: nn.Module, memory: nn.Module) -> dict[str, int]:
    """total, trainable (requires_grad), lora (peft adapter tensors of the model) and memory (the memory module's
    own) parameter counts; a tensor shared by model and memory (tied) counts once, as the model's."""
    seen: set[int] = set()
    counts = {"total": 0, "trainable": 0, "lora": 0, "memory": 0}
    for owner, module in (("model", model), ("memory", memory)):
        for name, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            counts["total"] += p.numel()
            counts["trainable"] += p.numel() if p.requires_grad else 0
            if owner == "memory":
                counts["memory"] += p.numel()
            elif "lora_" in name:
                counts["lora"] += p.numel()
    return counts


def short_count(n: int) -> str:
    """A parameter count in a few characters: 512, 4.6K, 135.2M, 1.7B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def parameters_line(counts: dict[str, int]) -> str:
    """The log line of `parameter_counts`: `parameters: 136.9M total, 2.4M trainable (LoRA 2.4M, memory 4.6K)`."""
    parts = []
    if counts["lora"]:
        parts.append(f"LoRA {short_count(counts['lora'])}")
    if counts["memory"] or counts["lora"] or counts["trainable"] < counts["total"]:
        parts.append(f"memory {short_count(counts['memory'])}")
    detail = f" ({', '.join(parts)})" if parts else ""
    return f"parameters: {short_count(counts['total'])} total, {short_count(counts['trainable'])} trainable{detail}"
