"""Conditional data: records of a source (context -> target) laid out in segments.

Records become examples (`stm.data.examples`: one per record, one per dialogue response, one per translated
sentence); each example's context and target (+ eos, so a model learns to stop) are tokenized in batches,
then laid out by `stm.data.chunking.layout_example`:
context first, the target after it and kept whole, padded to whole segments with masks, the context
truncated from the `truncation` side when it exceeds `max_segments` segments. A record whose target can
never fit is an error naming the record, or, with `on_bad_record: skip`, skipped, counted and logged.
A record whose meta has `answer_chars` (character spans of its target, e.g. the values of a multi-query
recall probe, `stm.data.probes.mqar`) takes the loss on those spans only: its other target labels are
ignored, and its `ExampleInfo.answer_labels` says which labels each span became (for teacher-forced scoring).
Batches pad every example to the longest in the batch (whole segments), so a batch of short dialogues does
not carry the length of a meeting transcript. Under DDP, each record stays whole on one rank.

Several validation sets in one run (`val_lengths`, for a probe source): e.g. [512, 2048, 8192] builds the val
source's examples once per length (the source's `length_key` parameter overridden; a mapping {name: {param:
value}} overrides anything) and validates them all as one set, each example's meta tagged with its set's name
(`val_set`: "512", ...), which task=probe reports apart (val/512/acc, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stm.constants import IGNORE_INDEX
from stm.data.chunking import Layout, layout_example
from stm.data.examples import Example, expand
from stm.data.fieldmap import _plain
from stm.data.probes import ProbeSource, char_span_tokens, probe_distances, token_index_of_char
from stm.data.sampling import ShardedSampler

log = logging.getLogger(__name__)


@dataclass
class ExampleInfo:
    """What generation and scoring need of an example besides its layout.

    context_ids: (n,) the context tokens kept (after truncation): generation reads exactly these.
    context:     the context text (whole, before truncation), for sample tables.
    reference:   the target text.
    answer_labels: for records with `answer_chars`: [lo, hi) of each answer span as indices into the example's
                 labels (the labels lo..hi-1 are the span's tokens); None for every other record.
    """

    context_ids: np.ndarray
    context: str
    reference: str
    origin: str
    meta: dict
    answer_labels: list[tuple[int, int]] | None = None


def answer_label_ranges(target: str, target_byte_counts: np.ndarray, answer_chars, first_label: int,
                        origin: str = "") -> list[tuple[int, int]]:
    """[lo, hi) label indices of each answer span: characters [start, end) of `target` -> the target tokens
    holding any of them (`char_span_tokens`, from the target's token byte counts: any tokenizer), shifted by
    `first_label`, the label index of the target's first token (the last context token predicts it)."""
    ranges = []
    for span in answer_chars:
        try:
            start, end = (int(x) for x in span)
            lo, hi = char_span_tokens(target, target_byte_counts, start, end)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{origin}: meta answer_chars {span!r} is not a [start, end) span of the target "
                             f"{target!r}: {err}") from err
        ranges.append((first_label + lo, first_label + hi))
    return ranges


def query_distances(meta: dict, context: str, context_byte_counts: np.ndarray, answer_labels, n_context_kept: int,
                    n_truncated_left: int, segment_len: int) -> dict:
    """Per query (records with `query_fact_chars`, in the order of `answer_chars`): how many segment borders lie
    between its fact's first token and the position that predicts its answer's first token, and whether the
    fact survived truncation. Segments count from the first kept token, as in `probe_distances`."""
    if len(meta["query_fact_chars"]) != len(answer_labels):
        raise ValueError(f"meta query_fact_chars has {len(meta['query_fact_chars'])} spans but answer_chars "
                         f"{len(answer_labels)}: one fact per answer")
    distances, kept = [], []
    lo_kept, hi_kept = n_truncated_left, n_truncated_left + n_context_kept
    for (start, end), (label, _) in zip(meta["query_fact_chars"], answer_labels):
        first = token_index_of_char(context, context_byte_counts, start)
        last = token_index_of_char(context, context_byte_counts, end - 1)
        distances.append(label // segment_len - (first - lo_kept) // segment_len)
        kept.append(bool(lo_kept <= first and last < hi_kept))
    return {"query_distance_segments": distances, "query_facts_kept": kept}


class LaidOutExamples(Dataset):
    """Item i: input_ids, labels, label_bytes, attention_mask, target_mask (n_segments_i * segment_len,), and
    its index (which `infos[index]` describes)."""

    def __init__(self, layouts: list[Layout], label_bytes: list[np.ndarray], infos: list[ExampleInfo]):
        self.layouts, self.label_bytes, self.infos = layouts, label_bytes, infos

    @property
    def origins(self) -> list[str]:
        return [info.origin for info in self.infos]

    def __len__(self) -> int:
        return len(self.layouts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        lay = self.layouts[i]
        target_mask = np.zeros(len(lay.labels), dtype=np.int64)
        target_mask[lay.n_context - 1:int(lay.attention_mask.sum())] = 1  # labels that are target tokens
        return {"input_ids": torch.from_numpy(lay.input_ids), "labels": torch.from_numpy(lay.labels),
                "attention_mask": torch.from_numpy(lay.attention_mask), "target_mask": torch.from_numpy(target_mask),
                "label_bytes": torch.from_numpy(self.label_bytes[i]), "index": torch.tensor(i)}


def val_set_overrides(val_lengths, source) -> dict[str, dict]:
    """`data.val_lengths` as {set name: overrides of the val source}: a list of lengths gives {"512": {key: 512},
    ...} with key the source's `length_key`; a mapping {name: {param: value}} is taken as it is; null gives {}."""
    val_lengths = _plain(val_lengths)
    if not val_lengths:
        return {}
    if not isinstance(source, ProbeSource):
        raise ValueError(f"data.val_lengths builds the val source once per length; it needs a probe source "
                         f"(stm.data.probes, stm.data.babilong), got {source!r}")
    if isinstance(val_lengths, dict):
        bad = [name for name, overrides in val_lengths.items() if not isinstance(overrides, dict) or not overrides]
        if bad:
            raise ValueError(f"data.val_lengths: as a mapping, each set is a name and a mapping of val source "
                             f"parameters to override, e.g. {{long: {{{source.length_key}: 8192}}}}; got {bad}")
        return {str(name): dict(overrides) for name, overrides in val_lengths.items()}
    if not isinstance(val_lengths, list) or any(not isinstance(n, int) or isinstance(n, bool) or n < 0
                                                for n in val_lengths) or len(set(val_lengths)) < len(val_lengths):
        raise ValueError(f"data.val_lengths must be a list of distinct lengths >= 0 (0 where the source takes it: "
                         f"BABILong's story alone), or a mapping of set names to val source overrides; got "
                         f"{val_lengths!r}")
    return {str(n): {source.length_key: n} for n in val_lengths}


def concatenate(parts: list[LaidOutExamples]) -> LaidOutExamples:
    """One set of the examples of several, in order (an example's index is its place in the whole)."""
    return LaidOutExamples([lay for p in parts for lay in p.layouts], [b for p in parts for b in p.label_bytes],
                           [info for p in parts for info in p.infos])


def pad_collate(pad_token_id: int):
    """Stack examples, right-padding each to the longest (they are whole segments already)."""
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0, "target_mask": 0,
            "label_bytes": 0}

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(it["input_ids"]) for it in items)
        batch = {}
        for key, value in fill.items():
            out = torch.full((len(items), longest), value, dtype=torch.long)
            for row, it in enumerate(items):
                out[row, :len(it[key])] = it[key]
            batch[key] = out
        batch["index"] = torch.stack([it["index"] for it in items])
        return batch

    return collate


class ConditionalDataModule(L.LightningDataModule):
    """train_source / val_source: record sources (conf/source/), expanded into examples by `examples`.

    examples:      record | turns | sentences (see `stm.data.examples`); respond_as, chat_template (turns),
                   source_key, target_key, n_previous (sentences) configure them.
    append_eos:    end every target with the tokenizer's eos token (what lets generation stop).
    max_examples:  keep the first N examples of each split (train, val) after expansion; null keeps all
                   (with val_lengths: of each validation set).
    val_lengths:   null, or several validation sets from a probe val source: a list of lengths, or a mapping
                   {set name: {parameter: value}} (see the module docstring).
    """

    def __init__(self, tokenizer, train_source, val_source, segment_len: int, max_segments: int,
                 truncation: str = "left", context_loss: bool = False, separator: str = "\n",
                 batch_size: int = 4, val_batch_size: int | None = None, num_workers: int = 0,
                 seed: int | None = 0, on_bad_record: str = "error", examples: str = "record",
                 respond_as: str | None = None, chat_template: bool = False, source_key: str = "en",
                 target_key: str = "es", n_previous: int | None = None, append_eos: bool = True,
                 max_examples: dict | int | None = None, val_lengths=None):
        super().__init__()
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"data.on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        if chat_template and not hasattr(tokenizer, "apply_chat_template"):
            raise ValueError(f"data.chat_template=true needs a tokenizer with a chat template; {tokenizer!r} has none")
        self.tokenizer, self.sources = tokenizer, {"train": train_source, "val": val_source}
        self.segment_len, self.max_segments = segment_len, max_segments
        self.truncation, self.context_loss = truncation, context_loss
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed, self.on_bad_record = num_workers, seed, on_bad_record
        self.expansion = {"how": examples, "separator": separator, "respond_as": respond_as,
                          "chat_template": tokenizer.apply_chat_template if chat_template else None,
                          "source_key": source_key, "target_key": target_key, "n_previous": n_previous}
        self.append_eos = append_eos
        if max_examples is None or isinstance(max_examples, int):
            max_examples = {"train": max_examples, "val": max_examples}
        self.max_examples = dict(max_examples)
        self.val_sets = val_set_overrides(val_lengths, val_source)
        self.sets: dict[str, LaidOutExamples] = {}
        self.skipped: dict[str, list[str]] = {}

    def examples(self, split: str, source=None) -> list[Example]:
        """The split's examples (records of its source, or of `source`, expanded, then cut to `max_examples`)."""
        examples = expand(self.sources[split] if source is None else source, **self.expansion)
        limit = self.max_examples.get(split)
        return examples[:limit] if limit is not None else examples

    def build_val(self) -> LaidOutExamples:
        """The validation set: val_source's examples, or with val_lengths those of every set, concatenated in
        order, each example's meta tagged with its set's name (`val_set`)."""
        if not self.val_sets:
            return self.build("val")
        parts, skipped = [], []
        for name, overrides in self.val_sets.items():
            try:
                part = self.build("val", self.sources["val"].with_params(**overrides))
            except (TypeError, ValueError) as err:
                raise ValueError(f"data.val_lengths[{name}] (the val source with {overrides}): {err}") from err
            for info in part.infos:
                info.meta["val_set"] = name
            parts.append(part)
            skipped += self.skipped["val"]
        self.skipped["val"] = skipped
        return concatenate(parts)

    def build(self, split: str, source=None) -> LaidOutExamples:
        examples = self.examples(split, source)
        texts = [e.context for e in examples] + [e.target for e in examples]
        encoded = self.tokenizer.encode_batch_with_byte_counts(texts)
        contexts, targets = encoded[:len(examples)], encoded[len(examples):]
        eos = self.tokenizer.eos_token_id
        layouts, label_bytes, infos, skipped = [], [], [], []
        for example, (c_ids, c_bytes), (t_ids, t_bytes) in zip(examples, contexts, targets):
            if self.append_eos and eos is not None:
                t_ids, t_bytes = np.append(t_ids, eos), np.append(t_bytes, 0)
            try:
                lay = layout_example(c_ids, t_ids, segment_len=self.segment_len, max_segments=self.max_segments,
                                     pad_token_id=self.tokenizer.pad_token_id, truncation=self.truncation,
                                     context_loss=self.context_loss, origin=f"{example.origin} (field target)")
            except ValueError as err:
                if self.on_bad_record == "error":
                    raise
                skipped.append(str(err))
                continue
            answer_labels = None
            if "answer_chars" in example.meta:  # only the answer spans of the target take the loss
                answer_labels = answer_label_ranges(example.target, t_bytes, example.meta["answer_chars"],
                                                    lay.n_context - 1, example.origin)
                answers = np.zeros(len(lay.labels), dtype=bool)
                for lo, hi in answer_labels:
                    answers[lo:hi] = True
                target_labels = np.zeros(len(lay.labels), dtype=bool)
                target_labels[lay.n_context - 1:] = True
                lay.labels[target_labels & ~answers] = IGNORE_INDEX
            all_bytes = np.concatenate([c_bytes, t_bytes])
            kept = all_bytes[lay.truncated:] if self.truncation == "left" else np.concatenate(
                [c_bytes[:lay.n_context], t_bytes])
            per_label = np.zeros(len(lay.labels), dtype=np.int64)
            n = int(lay.attention_mask.sum())
            per_label[:n] = kept[1:n + 1]
            per_label[lay.labels == IGNORE_INDEX] = 0
            layouts.append(lay)
            label_bytes.append(per_label)
            kept_ids = c_ids[lay.truncated:] if self.truncation == "left" else c_ids[:lay.n_context]
            meta = dict(example.meta)
            if "fact_chars" in meta:  # a memory probe: how far back (tokens, segments) the fact is, as laid out
                meta.update(probe_distances(meta, example.context, c_bytes, lay.n_context,
                                            lay.truncated if self.truncation == "left" else 0, self.segment_len))
            if answer_labels is not None and "query_fact_chars" in meta:
                meta.update(query_distances(meta, example.context, c_bytes, answer_labels, lay.n_context,
                                            lay.truncated if self.truncation == "left" else 0, self.segment_len))
            infos.append(ExampleInfo(np.asarray(kept_ids, dtype=np.int64), example.context, example.target,
                                     example.origin, meta, answer_labels))
        if skipped:
            log.warning("data %s: skipped %d record(s) (on_bad_record=skip); first: %s", split, len(skipped),
                        "; ".join(skipped[:3]))
        self.skipped[split] = skipped
        if not layouts:
            raise ValueError(f"data: the {split} source gave no usable record")
        return LaidOutExamples(layouts, label_bytes, infos)

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            if split not in self.sets:
                self.sets[split] = self.build_val() if split == "val" else self.build(split)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ShardedSampler(len(self.sets[split]), rank=rank, world_size=world, seed=self.seed,
                                 shuffle=shuffle, pad=shuffle)  # validation reads each example exactly once
        return DataLoader(self.sets[split], batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=pad_collate(self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size, shuffle=False)
