"""A curriculum over segment count: train on short contexts first, then longer ones (as the RMT papers do).

`CurriculumDataModule` is the conditional data module (`stm.data.conditional`) whose training examples
change as training goes. Each stage overrides parameters of the training source's generator (e.g. the length
of an associative-recall context, hence its number of segments), and may set its own batch size:

    curriculum:
      - {length: 10, until_loss: 0.05}                   # one segment: learn the task where no memory is needed
      - {length: 32, until_loss: 0.05, until_step: 600}  # 2-3 segments: the memory must carry the fact
      - {length: 256, batch_size: 16}                    # 16 segments, to the end

A stage ends when the training loss, averaged over the last `window` steps of the stage, drops below its
`until_loss` (the papers move on once a stage is learnt), or at global step `until_step`, whichever comes
first; the last stage never ends. Every stage's examples are built (tokenized, laid out) once, in `setup`.
The batch sampler asks the data module for the stage before every batch, so a stage starts at the next batch,
not at the next epoch; it runs in the main process, so this works with loader workers, and under DDP every
rank sees the same mean loss (Lightning logs it synchronised only if asked, so each rank reads its own: use
`until_step` under DDP for identical stage changes). The stage, its first step and the recent losses are in
the data module's state dict, so a resumed run continues in its stage. Validation always reads `val_source`
as configured (one set per length with `val_lengths`): the target distribution, not the current stage.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence

from torch.utils.data import ConcatDataset, DataLoader, Sampler

from stm.data.conditional import ConditionalDataModule, LaidOutExamples, pad_collate
from stm.data.probes import ProbeSource
from stm.data.sampling import ShardedSampler

log = logging.getLogger(__name__)

STAGE_KEYS = ("until_step", "until_loss", "batch_size")


def check_stages(stages: Sequence[dict]) -> list[dict]:
    """Each stage as {"until_step", "until_loss", "batch_size", "source": overrides}; errors name the stage."""
    if not stages:
        raise ValueError("data.curriculum: give at least one stage, e.g. [{length: 32, until_loss: 0.05}, "
                         "{length: 256}]")
    out, previous = [], 0
    for k, stage in enumerate(stages):
        stage = dict(stage)
        rule = {key: stage.pop(key, None) for key in STAGE_KEYS}
        last = k == len(stages) - 1
        until, loss, batch = rule["until_step"], rule["until_loss"], rule["batch_size"]
        if not last and until is None and loss is None:
            raise ValueError(f"data.curriculum[{k}]: every stage but the last needs until_step and/or until_loss")
        if last and (until is not None or loss is not None):
            raise ValueError(f"data.curriculum[{k}]: the last stage runs to the end: no until_step / until_loss")
        if until is not None and (not isinstance(until, int) or until <= previous):
            raise ValueError(f"data.curriculum[{k}].until_step must be an integer above {previous} (the stages "
                             f"run in order), got {until!r}")
        if loss is not None and not (isinstance(loss, (int, float)) and loss > 0):
            raise ValueError(f"data.curriculum[{k}].until_loss must be a positive number, got {loss!r}")
        if batch is not None and not (isinstance(batch, int) and batch > 0):
            raise ValueError(f"data.curriculum[{k}].batch_size must be a positive integer, got {batch!r}")
        previous = until if until is not None else previous
        out.append({**rule, "source": stage})
    return out


def stage_source(source: ProbeSource, overrides: dict, stage: int) -> ProbeSource:
    """A copy of a probe source with some generator parameters (or n_samples / seed) overridden."""
    if not isinstance(source, ProbeSource):
        raise ValueError(f"data.curriculum: stages override a probe generator's parameters; the train source "
                         f"{source!r} is not a probe source (stm.data.probes)")
    stage_src = source.with_params(**overrides)
    try:  # a wrong parameter name or a value the generator refuses fails here, with the stage named
        stage_src.generate(1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"data.curriculum[{stage}] (stage {stage + 1} of the training curriculum, overriding "
                         f"{overrides} on the train source {stage_src.params}): {err}") from err
    return stage_src


class CurriculumBatchSampler(Sampler[list[int]]):
    """Batches of indices into the concatenated stage sets. Each batch comes from the stage `stage_of()` names
    when it is drawn, with that stage's batch size, read in that stage's shuffled order (`ShardedSampler`: by
    seed and pass, this rank's share; a stage read to its end starts a new pass). An epoch is `n_batches`
    batches whatever the stage. Resumable: `state_dict` holds the position in the epoch and in every stage."""

    def __init__(self, sizes: Sequence[int], batch_sizes: Sequence[int], stage_of: Callable[[], int], *,
                 n_batches: int, rank: int = 0, world_size: int = 1, seed: int | None = 0):
        self.samplers = [ShardedSampler(n, rank=rank, world_size=world_size, seed=seed, shuffle=True)
                         for n in sizes]
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        self.batch_sizes, self.stage_of, self.n_batches = list(batch_sizes), stage_of, n_batches
        self.cursors = [0] * len(sizes)  # next position in each stage's current pass
        self.position = 0

    def __len__(self) -> int:
        return self.n_batches

    def _take(self, stage: int, n: int) -> list[int]:
        sampler, out = self.samplers[stage], []
        while len(out) < n:
            order = sampler.order()
            take = order[self.cursors[stage]:self.cursors[stage] + n - len(out)]
            out += [self.offsets[stage] + i for i in take]
            self.cursors[stage] += len(take)
            if self.cursors[stage] >= len(order):
                sampler.epoch, self.cursors[stage] = sampler.epoch + 1, 0
        return out

    def __iter__(self):
        while self.position < self.n_batches:
            stage = self.stage_of()
            batch = self._take(stage, self.batch_sizes[stage])
            # the epoch's end is recorded before its last batch goes out: a loader that stops after
            # len(self) batches without asking for more must not leave the next epoch empty
            self.position = self.position + 1 if self.position + 1 < self.n_batches else 0
            yield batch
            if self.position == 0:
                return

    def state_dict(self) -> dict:
        return {"position": self.position, "cursors": list(self.cursors),
                "passes": [s.epoch for s in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.cursors = state["position"], list(state["cursors"])
        for sampler, passes in zip(self.samplers, state["passes"]):
            sampler.epoch = passes


class CurriculumDataModule(ConditionalDataModule):
    """`ConditionalDataModule` with `curriculum`: a list of stages (see the module docstring).

    curriculum: stages in order; each may give until_step, until_loss, batch_size, and overrides of the train
                source's generator parameters (n_samples and seed too).
    window:     steps the training loss is averaged over for until_loss.
    loss_key:   the logged training loss that until_loss compares with.
    Everything else as in `ConditionalDataModule`; `sets["train"]` is the last stage's examples.
    """

    def __init__(self, *args, curriculum: Sequence[dict], window: int = 20, loss_key: str = "train/loss",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if window <= 0:
            raise ValueError(f"data.window must be a positive integer, got {window}")
        self.stages = check_stages(curriculum)
        self.window, self.loss_key = window, loss_key
        self.stage_sets: list[LaidOutExamples] = []
        self.stage, self.stage_start, self.seen_step = 0, 0, -1
        self.recent: deque[float] = deque(maxlen=window)
        self.history: list[dict] = [{"stage": 0, "from_step": 0}]
        self.batch_sampler: CurriculumBatchSampler | None = None
        self.sampler_state: dict | None = None  # a restored position, for the loader built after it

    # ------------------------------------------------------------------------------------------ the stage

    def _advance(self, step: int, why: str) -> None:
        self.stage, self.stage_start = self.stage + 1, step
        self.recent.clear()
        self.history.append({"stage": self.stage, "from_step": step, "why": why})
        log.info("curriculum: stage %d of %d from step %d (%s): %s", self.stage + 1, len(self.stages), step, why,
                 self.stages[self.stage]["source"])

    def current_stage(self) -> int:
        """The stage to draw the next batch from: advances past stages whose step or loss target is reached."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return self.stage
        step = int(trainer.global_step)
        if step != self.seen_step:  # one new loss reading per optimizer step
            self.seen_step = step
            loss = trainer.callback_metrics.get(self.loss_key)
            if loss is not None and step > self.stage_start:
                self.recent.append(float(loss))
        while self.stage < len(self.stages) - 1:
            rule = self.stages[self.stage]
            mean = sum(self.recent) / len(self.recent) if len(self.recent) == self.window else math.inf
            if rule["until_step"] is not None and step >= rule["until_step"]:
                self._advance(step, f"step {rule['until_step']} reached")
            elif rule["until_loss"] is not None and mean < rule["until_loss"]:
                self._advance(step, f"mean training loss {mean:.4f} < {rule['until_loss']}")
            else:
                break
        return self.stage

    # ------------------------------------------------------------------------------------------- the data

    def setup(self, stage: str | None = None) -> None:
        if not self.stage_sets:
            base = self.sources["train"]
            try:
                for k, rule in enumerate(self.stages):
                    self.sources["train"] = stage_source(base, rule["source"], k)
                    self.stage_sets.append(self.build("train"))
                    log.info("curriculum stage %d: %s, %d examples of up to %d segments", k + 1, rule["source"],
                             len(self.stage_sets[-1]), self._segments(self.stage_sets[-1]))
            finally:
                self.sources["train"] = base
            self.sets["train"] = self.stage_sets[-1]
        if "val" not in self.sets:
            self.sets["val"] = self.build_val()

    def _segments(self, examples: LaidOutExamples) -> int:
        return max(len(lay.input_ids) for lay in examples.layouts) // self.segment_len

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sizes = [len(s) for s in self.stage_sets]
        batch_sizes = [rule["batch_size"] or self.batch_size for rule in self.stages]
        n_batches = math.ceil(math.ceil(sizes[-1] / world) / batch_sizes[-1])
        previous = self.batch_sampler.state_dict() if self.batch_sampler is not None else self.sampler_state
        self.batch_sampler = CurriculumBatchSampler(sizes, batch_sizes, self.current_stage, n_batches=n_batches,
                                                    rank=rank, world_size=world, seed=self.seed)
        if previous is not None:
            self.batch_sampler.load_state_dict(previous)
        return DataLoader(ConcatDataset(self.stage_sets), batch_sampler=self.batch_sampler,
                          num_workers=self.num_workers, collate_fn=pad_collate(self.tokenizer.pad_token_id))

    # ------------------------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict:
        return {"stage": self.stage, "stage_start": self.stage_start, "recent": list(self.recent),
                "history": list(self.history),
                "sampler": self.batch_sampler.state_dict() if self.batch_sampler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.stage_start = int(state["stage"]), int(state["stage_start"])
        self.recent = deque(state["recent"], maxlen=self.window)
        self.history = list(state["history"])
        self.sampler_state = state.get("sampler")
        if self.batch_sampler is not None and self.sampler_state is not None:
            self.batch_sampler.load_state_dict(self.sampler_state)
