"""`task=lm`: causal language modelling over chunked text, read segment by segment under a memory.

Reports loss (nats per token), perplexity, and bits per byte (comparable across tokenizers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from stm.loop.segments import SegmentRun, run_segments
from stm.memory.base import Memory, state_from_plain, state_to_plain
from stm.metrics.lm import LN2, LanguageModelMetrics


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
    """Linear warm-up to the base learning rate, then cosine decay to `min_lr_ratio` of it."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; none on norms, biases and other vectors."""
    decay, no_decay, seen = [], [], set()
    for p in module.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LanguageModelTask(L.LightningModule):
    """Every label is a target; each chunk is read in segments of `segment_len` tokens.

    The values a run uses are set in conf/task/lm.yaml (the one place for them); the defaults here are only the
    "off" values that let the class be built from Python.

    model:        a backbone taking (input_ids, attention_mask, extras) -> BackboneOutput.
    memory:       the memory mechanism.
    optimizer:    a partial optimizer (Hydra `_partial_: true`) taking parameter groups.
    scheduler:    a partial scheduler taking the optimizer, stepped every training step; or None.
    segment_len:  tokens per segment; None = the whole chunk as one segment.
    bptt_depth:   gradients reach at most this many segments back; None = through the whole chunk.
    checkpoint_segments: recompute segment activations in the backward pass (memory-efficient BPTT).
    weight_decay: of the matrices (none on norms, biases and other vectors).
    """

    def __init__(
        self,
        model: nn.Module,
        memory: Memory,
        optimizer: Callable,
        scheduler: Callable | None = None,
        *,
        segment_len: int | None,
        bptt_depth: int | None = None,
        checkpoint_segments: bool = False,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        if segment_len is not None and segment_len <= 0:
            raise ValueError(f"task.segment_len must be a positive integer, got {segment_len}")
        self.model = model
        self.memory = memory
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.segment_len = segment_len
        self.bptt_depth = bptt_depth
        self.checkpoint_segments = checkpoint_segments
        self.weight_decay = weight_decay
        self.val_metrics = LanguageModelMetrics()
        self.run_config: dict | None = None  # the resolved run config, stored in every checkpoint
        self.last_val: dict[str, float] = {}
        self.checkpoint_step = 0  # the training step of the checkpoint the weights came from (eval.py)
        self.target_loss = True  # validation logs val/loss, ppl, bpb (False: a task that only generates, task=probe)
        self.lane_states: dict[str, object] = {}  # stream lanes: the memory state carried across batches

    def forward(self, batch: dict[str, torch.Tensor], return_logits: bool = False) -> SegmentRun:
        """Read a batch (with its logits (B, T, V) when `return_logits`). Batches of stream lanes (with
        `lane_start`) continue the previous batch's memory state, detached: gradients stay within a batch, the
        memory reaches back across batches."""
        lanes = "lane_start" in batch
        split = "train" if self.training else "val"
        state = self.lane_states.get(split) if lanes and not bool(batch["lane_start"]) else None
        run = run_segments(
            self.model, self.memory, batch["input_ids"],
            labels=batch["labels"], attention_mask=batch.get("attention_mask"), state=state,
            segment_len=self.segment_len, bptt_depth=self.bptt_depth,
            checkpoint_segments=self.checkpoint_segments and self.training, return_logits=return_logits,
        )
        if lanes:
            self.lane_states[split] = self.memory.detach(run.state)
        return run

    def on_validation_epoch_start(self):
        self.lane_states.pop("val", None)

    def training_step(self, batch, batch_idx):
        run = self(batch)
        loss = run.loss
        n_bytes = batch["label_bytes"].sum()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/bpb", run.nll_sum.detach() / LN2 / n_bytes.clamp(min=1))
        return self.with_aux_losses(loss, run)

    def with_aux_losses(self, loss: torch.Tensor, run: SegmentRun) -> torch.Tensor:
        """The training loss plus the memory's auxiliary losses (`Memory.auxiliary_losses`), each logged as
        `train/aux/<name>`."""
        for name, value in run.aux_losses.items():
            self.log(f"train/aux/{name}", value)
            loss = loss + value
        return loss

    def validation_step(self, batch, batch_idx):
        run = self(batch)
        self.val_metrics.update(run.nll_sum, run.n_tokens, batch["label_bytes"].sum())

    def on_validation_epoch_end(self):
        values = self.val_metrics.compute() if self.target_loss else {}
        self.val_metrics.reset()
        for name, value in values.items():
            self.log(f"val/{name}", value, prog_bar=name in ("loss", "bpb"))
        self.last_val = {f"val/{k}": float(v) for k, v in values.items()}
        self.last_val["step"] = int(self.global_step)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(parameter_groups(self, self.weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["stm"] = {
            "config": self.run_config,
            "val_metrics": dict(self.last_val),
            # stream lanes: the memory the next training batch continues from (a resumed run needs it)
            "lane_state": state_to_plain(self.lane_states.get("train")),
        }

    @property
    def trained_steps(self) -> int:
        """Optimizer steps behind the current weights: the trainer's step while fitting, else the checkpoint's."""
        return int(self.global_step) or self.checkpoint_step

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.checkpoint_step = int(checkpoint.get("global_step", 0))
        lane_state = checkpoint.get("stm", {}).get("lane_state")
        if lane_state is not None:
            self.lane_states["train"] = state_from_plain(lane_state, self.device)
