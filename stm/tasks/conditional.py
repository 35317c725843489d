"""The conditional-LM core of every task but `lm`: context read segment by segment, target in the final segment.

Training: the loss is on the target tokens (and, with `context_loss_weight > 0` and `data.context_loss=true`,
a weighted LM loss on the context). Validation: the target's loss / perplexity / bits per byte, and for the
first `n_generate` validation examples a generation (the context read once into the memory state, the
target decoded with the key/value cache of the final segment, `stm.loop.generation`), scored by the task's text
metrics (`stm.metrics.text`, summed across DDP ranks) and shown as a table of samples in the loggers. The
examples are generated `generation.batch_size` at a time (rows of different lengths, each with its own memory
state), which gives the outputs of generating them one at a time.

The tasks themselves (`summarization`, `translation`, `dialogue`, `qa`) are this module under their own names;
their metrics and generation are set in conf/task/<task>.yaml (on top of conf/task/conditional.yaml).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from stm.constants import IGNORE_INDEX
from stm.loop.generation import generate
from stm.memory.base import Memory
from stm.tasks.lm import LanguageModelTask

log = logging.getLogger("stm")

DECODING_KEYS = ("max_new_tokens", "num_beams", "temperature", "top_k", "top_p", "length_penalty", "use_cache",
                 "segment_overflow")
GENERATION_KEYS = (*DECODING_KEYS, "stop_strings", "batch_size")  # task.generation


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    """The text up to the first of `stop_strings` (the stop string itself removed)."""
    cut = len(text)
    for stop in stop_strings or []:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


class ConditionalLMTask(LanguageModelTask):
    """Context -> target under a memory mechanism; see the module docstring. The values a run uses are set in
    conf/task/*.yaml; the defaults here are only the "off" values that let the class be built from Python.

    generation:          max_new_tokens (required), num_beams, temperature, top_k, top_p, length_penalty,
                         use_cache, segment_overflow (those left out: `stm.loop.generation.generate`'s
                         defaults, greedy),
                         stop_strings (the output is cut at the first one; decoding stops there), batch_size
                         (how many examples are decoded together, default 1: one at a time, with the same
                         outputs unless sampling, which draws for the batch at once).
    metrics:             names for `stm.metrics.text.build_text_metrics` (one or more).
    n_generate:          how many validation examples are generated and scored per validation (the first
                         ones, by index); None: all of them.
    n_samples:           how many of them go into the sample table.
    context_loss_weight: weight of the context's LM loss next to the target's (needs data.context_loss=true).
    losses_file:         a file in the run folder written after each validation with every validation example's
                         target loss: {"examples": [{"index", "nll", "tokens"}, ...]} (nll summed over its target
                         tokens; gathered across DDP ranks), for standard errors and paired comparisons; None: none.
    Everything else (segment_len, bptt_depth, ...) as in `LanguageModelTask`.
    """

    def __init__(self, model: nn.Module, memory: Memory, optimizer: Callable, scheduler: Callable | None = None, *,
                 generation: dict, metrics: Sequence[str], n_generate: int | None = None, n_samples: int = 0,
                 context_loss_weight: float = 0.0, losses_file: str | None = None, **lm_options):
        super().__init__(model, memory, optimizer, scheduler, **lm_options)
        from stm.metrics.text import METRICS, build_text_metrics

        generation = dict(generation)
        unknown = sorted(set(generation) - set(GENERATION_KEYS))
        if unknown:
            raise ValueError(f"task.generation: unknown key(s) {unknown}; known: {list(GENERATION_KEYS)}")
        if "max_new_tokens" not in generation:
            raise ValueError("task.generation.max_new_tokens is missing: how many tokens to decode at most")
        if context_loss_weight < 0:
            raise ValueError(f"task.context_loss_weight must be >= 0, got {context_loss_weight}")
        if n_generate is not None and n_generate < 0:
            raise ValueError(f"task.n_generate must be >= 0 or null, got {n_generate}")
        batch_size = generation.setdefault("batch_size", 1)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"task.generation.batch_size must be a positive integer, got {batch_size!r}")
        if not metrics:
            raise ValueError(f"task.metrics is empty: name the text metrics that score the generated targets, e.g. "
                             f"task.metrics=[rouge]; one or more of {sorted(METRICS)}")
        self.metric_names = list(metrics)
        self.text_metrics = build_text_metrics(self.metric_names)
        self.generation = generation
        self.n_generate, self.n_samples = n_generate, n_samples
        self.context_loss_weight = context_loss_weight
        self.samples: list[dict] = []
        self.losses_file = losses_file
        if losses_file:
            from stm.tasks.scores_by_length import ExampleScores

            self.example_losses = ExampleScores(2)  # per validation example: target nll sum, target tokens
        self.pending: list[int] = []  # validation examples waiting to be generated (see `_generate_and_score`)

    # ------------------------------------------------------------------------------------------------ training

    def training_step(self, batch, batch_idx):
        run = self(batch)
        target = batch["target_mask"].bool() & (batch["labels"] != IGNORE_INDEX)
        n_target = target.sum()
        loss = (run.token_nll * target).sum() / n_target.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True)
        if self.context_loss_weight > 0:
            context = (batch["labels"] != IGNORE_INDEX) & ~target
            if not bool(context.any()):
                raise ValueError("task.context_loss_weight > 0 but no context token has a label: set "
                                 "data.context_loss=true")
            context_loss = (run.token_nll * context).sum() / context.sum()
            self.log("train/context_loss", context_loss)
            loss = loss + self.context_loss_weight * context_loss
        return self.with_aux_losses(loss, run)

    # ---------------------------------------------------------------------------------------------- validation

    def validation_step(self, batch, batch_idx):
        run = self(batch)
        target = batch["target_mask"].bool() & (batch["labels"] != IGNORE_INDEX)
        self.val_metrics.update((run.token_nll * target).sum(), target.sum(), (batch["label_bytes"] * target).sum())
        if self.losses_file:
            nll, tokens = (run.token_nll * target).sum(dim=1).tolist(), target.sum(dim=1).tolist()
            for row, index in enumerate(batch["index"].tolist()):
                self.example_losses.update(index, [nll[row], tokens[row]])
        for index in batch["index"].tolist():
            if self.n_generate is None or index < self.n_generate:
                self._generate_and_score(index)

    def _val_examples(self):
        datamodule = self.trainer.datamodule
        if datamodule is None or "val" not in getattr(datamodule, "sets", {}):
            raise RuntimeError("a conditional task validates on a stm ConditionalDataModule (data=conditional or "
                               "a task's own data config)")
        return datamodule, datamodule.sets["val"]

    def generate_texts(self, contexts: list[torch.Tensor], tokenizer) -> list[str]:
        """Decode a target for each context (1-D token ids, any lengths) under the configured generation, all of
        them together (`stm.loop.generation.generate`); returns the texts."""
        g = self.generation
        stop_strings = g.get("stop_strings") or []

        def stop(new_tokens: torch.Tensor) -> torch.Tensor:
            texts = [tokenizer.decode(row.tolist()) for row in new_tokens]
            return torch.tensor([any(s in t for s in stop_strings) for t in texts])

        rows = generate(
            self.model, self.memory, contexts, segment_len=self.segment_len, eos_token_id=tokenizer.eos_token_id,
            stop=stop if stop_strings else None, **{key: g[key] for key in DECODING_KEYS if key in g},
        ).tolist()
        texts = []
        for tokens in rows:  # a row that finished early is padded with eos after its own
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[:tokens.index(tokenizer.eos_token_id)]
            texts.append(cut_at_stop(tokenizer.decode(tokens), stop_strings).strip())
        return texts

    def generate_text(self, context_ids: torch.Tensor, tokenizer) -> str:
        """Decode a target for (1, n) context ids under the configured generation; returns the text."""
        return self.generate_texts([context_ids[0]], tokenizer)[0]

    def _generate_and_score(self, index: int) -> None:
        """Generate and score validation example `index`: it waits in `pending` until `generation.batch_size`
        examples do (or validation ends), and they are generated together."""
        self.pending.append(index)
        if len(self.pending) >= self.generation["batch_size"]:
            self._generate_pending()

    def _generate_pending(self) -> None:
        """Generate the waiting examples together, then score each and fill the sample table, in their order."""
        if not self.pending:
            return
        indices, self.pending = self.pending, []
        datamodule, examples = self._val_examples()
        infos = [examples.infos[index] for index in indices]
        outputs = self.generate_texts([torch.as_tensor(info.context_ids, device=self.device) for info in infos],
                                      datamodule.tokenizer)
        for index, info, output in zip(indices, infos, outputs):
            self.text_metrics.update([output], [info.reference])
            self.on_generation(index, info, output)
            if len(self.samples) < self.n_samples:
                self.samples.append({"index": index, "origin": info.origin, "source": info.context,
                                     "reference": info.reference, "output": output})

    def on_generation(self, index: int, info, output: str) -> None:
        """Hook for tasks that score more than the text metrics (the probe task's accuracy by distance)."""

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.samples = []
        self.pending = []
        if self.losses_file:
            self.example_losses.reset()
            self.example_losses.update(-1, [0.0, 0.0])  # a placeholder row: every rank updates before compute

    def on_validation_epoch_end(self):
        self._generate_pending()  # the last examples, before any metric is computed
        super().on_validation_epoch_end()
        if self.metric_names:
            values = self.text_metrics.compute()
            self.text_metrics.reset()
            for name, value in values.items():
                self.log(f"val/{name}", value)
                self.last_val[f"val/{name}"] = float(value)
        if self.losses_file:
            self._write_losses()
        if self.samples and not self.trainer.sanity_checking:
            from stm.tasks.sample_tables import log_generation_samples

            log_generation_samples(self.loggers, self.samples, step=self.global_step)

    def _write_losses(self) -> None:
        """Write `losses_file` (see the class docstring) into the run folder, on rank zero."""
        index, values = self.example_losses.compute()
        self.example_losses.reset()
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        import json
        from pathlib import Path

        rows = sorted((int(i), float(nll), int(tokens)) for i, (nll, tokens) in zip(index.tolist(), values.tolist()))
        path = Path(self.trainer.default_root_dir) / self.losses_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"step": int(self.global_step), "examples": [
            {"index": i, "nll": nll, "tokens": tokens} for i, nll, tokens in rows]}) + "\n")
