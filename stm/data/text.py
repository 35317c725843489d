"""Language-modelling data: plain-text documents, tokenized (cached on disk), fed in one of three modes.

- `mode: chunks`: independent chunks of `chunk_len` input tokens with their next-token labels, shuffled;
  the task reads each in segments and starts every chunk with a fresh memory.
- `mode: documents`: each sample is one document from its start (up to `chunk_len` tokens, padded with
  masks), read with a fresh memory; under DDP each document stays whole on one rank. Suits record sources
  of many short documents (dialogues, chapters).
- `mode: lanes`: the text in `batch_size` contiguous lanes; batch t+1 continues batch t lane by lane, and
  the task carries the memory state across steps (`stm.data.sampling.StreamLanes`).

Every document is split into a training head and a validation tail (`val_fraction` of its tokens), so both
splits see every document. Documents are joined with the tokenizer's eos token. Under DDP every rank reads
disjoint chunks or lanes; the position in the epoch is part of the datamodule's state (checkpoints).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stm.constants import IGNORE_INDEX
from stm.data.cache import cached_tokenize
from stm.data.sampling import ResumableSequence, ShardedSampler, StreamLanes
from stm.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)

SAMPLES = ("austen",)
MODES = ("chunks", "documents", "lanes")


def sample_files(name: str) -> list[Path]:
    """The text files of a sample corpus that ships inside the package."""
    if name not in SAMPLES:
        raise ValueError(f"data.sample: unknown sample '{name}'; the package ships {list(SAMPLES)}")
    folder = Path(str(resources.files("stm.data") / "samples" / name))
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"data.sample: the shipped sample '{name}' has no .txt files in {folder}")
    return files


def read_documents(files: list[str | Path], key: str = "data.files") -> list[tuple[str, str]]:
    """(path, text) of each file; a missing, unreadable or empty file is an error naming it."""
    documents = []
    for i, f in enumerate(files):
        path = Path(f).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{key}[{i}]: {path} does not exist or is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{key}[{i}]: {path} is not UTF-8 text ({err})") from err
        if not text.strip():
            raise ValueError(f"{key}[{i}]: {path} is empty")
        documents.append((str(path), text))
    return documents


class ChunkDataset(Dataset):
    """Non-overlapping chunks of a token stream.

    Item i: input_ids (chunk_len,), labels (chunk_len,) = the next tokens, label_bytes (chunk_len,) = the
    UTF-8 bytes each label token stands for (for bits per byte).
    """

    def __init__(self, ids: np.ndarray, byte_counts: np.ndarray, chunk_len: int):
        self.ids, self.byte_counts = ids, byte_counts  # kept as given (a memory map stays one): no copy
        self.chunk_len = chunk_len
        self.n_chunks = (len(ids) - 1) // chunk_len

    def __len__(self) -> int:
        return self.n_chunks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n_chunks:
            raise IndexError(i)
        s = i * self.chunk_len
        as_long = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
        return {
            "input_ids": as_long(self.ids[s:s + self.chunk_len]),
            "labels": as_long(self.ids[s + 1:s + self.chunk_len + 1]),
            "label_bytes": as_long(self.byte_counts[s + 1:s + self.chunk_len + 1]),
        }


class DocumentDataset(Dataset):
    """One sample per document: its first `chunk_len` (input, label) pairs, padded with masks.

    Item i: input_ids, labels (IGNORE_INDEX at padding), label_bytes, attention_mask, each (chunk_len,).
    """

    def __init__(self, documents: list[tuple[np.ndarray, np.ndarray]], chunk_len: int, pad_token_id: int):
        self.documents = [(ids, counts) for ids, counts in documents if len(ids) >= 2]
        self.chunk_len, self.pad_token_id = chunk_len, pad_token_id
        self.ids = np.concatenate([ids for ids, _ in self.documents]) if self.documents else np.zeros(0)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, counts = self.documents[i]
        n = min(len(ids) - 1, self.chunk_len)
        item = {
            "input_ids": torch.full((self.chunk_len,), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((self.chunk_len,), IGNORE_INDEX, dtype=torch.long),
            "label_bytes": torch.zeros(self.chunk_len, dtype=torch.long),
            "attention_mask": torch.zeros(self.chunk_len, dtype=torch.long),
        }
        item["input_ids"][:n] = torch.from_numpy(np.asarray(ids[:n], dtype=np.int64))
        item["labels"][:n] = torch.from_numpy(np.asarray(ids[1:n + 1], dtype=np.int64))
        item["label_bytes"][:n] = torch.from_numpy(np.asarray(counts[1:n + 1], dtype=np.int64))
        item["attention_mask"][:n] = 1
        return item


class TextDataModule(L.LightningDataModule):
    """Text files (or a shipped sample) -> train / validation chunks of `chunk_len` tokens."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chunk_len: int,
        files: list[str] | None = None,
        sample: str | None = None,
        val_fraction: float = 0.02,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int | None = 0,
        mode: str = "chunks",
        cache_dir: str | None | bool = None,
        source=None,
    ):
        super().__init__()
        if sum(x is not None for x in (files, sample, source)) != 1:
            raise ValueError("data: give exactly one of data.files (paths to text files), data.sample (a shipped "
                             "sample) and data.source (a record source, conf/source/)")
        if chunk_len is None or chunk_len <= 0:
            raise ValueError(f"data.chunk_len must be a positive integer, got {chunk_len}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}")
        if mode not in MODES:
            raise ValueError(f"data.mode must be one of {MODES}, got {mode!r}")
        self.tokenizer = tokenizer
        self.chunk_len = chunk_len
        self.source = source
        if source is not None:
            self.files, self.files_key = list(getattr(source, "files", [])), f"data.source={source!r}"
        else:
            self.files = list(files) if files is not None else sample_files(sample)
            self.files_key = "data.files" if files is not None else f"data.sample={sample}"
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.mode = mode
        self.cache_dir = cache_dir
        self.train_sampler = None
        self._pending_sampler_state: dict | None = None
        self.train_set: ChunkDataset | None = None
        self.val_set: ChunkDataset | None = None
        self.train_ids: np.ndarray | None = None
        # fail on a missing file at construction, before any training starts
        for i, f in enumerate(self.files):
            if not Path(f).expanduser().is_file():
                raise FileNotFoundError(f"{self.files_key}[{i}]: {f} does not exist or is not a file")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        eos = self.tokenizer.eos_token_id
        if self.source is not None:
            records = list(self.source)
            names = [r.origin for r in records]
            texts = [r.context + (f"\n\n{r.target}" if r.target else "") for r in records]
            # the cache is keyed by the source's files and its field mapping; a source without files
            # (a hub dataset, already cached by the hub) is tokenized each time
            corpus, _ = cached_tokenize(self.files, texts, self.tokenizer, self.cache_dir if self.files else False,
                                        extra_key=repr(vars(self.source.mapping)))
        else:
            names = [str(f) for f in self.files]
            corpus, _ = cached_tokenize(
                self.files, None, self.tokenizer, self.cache_dir,
                read_texts=lambda: [text for _, text in read_documents(self.files, self.files_key)],
            )
        train_ids, train_bytes, val_ids, val_bytes = [], [], [], []
        self.train_documents, self.val_documents = [], []

        def add(store_ids, store_bytes, ids, counts):
            store_ids += [ids, np.array([eos])]
            store_bytes += [counts, np.array([0])]
            (self.train_documents if store_ids is train_ids else self.val_documents).append((ids, counts))

        if self.source is not None:  # many records: the last val_fraction of them (at least one) validate
            n_val = max(1, round(len(names) * self.val_fraction))
            if len(names) < 2:
                raise ValueError(f"{self.files_key}: {len(names)} record(s); a train/validation split needs 2")
            for d in range(len(names)):
                add(*((val_ids, val_bytes) if d >= len(names) - n_val else (train_ids, train_bytes)),
                    *corpus.document(d))
        else:  # a few long documents: each gives its tail to validation
            for d, path in enumerate(names):
                ids, counts = corpus.document(d)
                cut = int(len(ids) * (1 - self.val_fraction))
                if cut < 2 or len(ids) - cut < 2:
                    raise ValueError(f"{self.files_key}: {path} is too short to split ({len(ids)} tokens)")
                add(train_ids, train_bytes, ids[:cut], counts[:cut])
                add(val_ids, val_bytes, ids[cut:], counts[cut:])
        self.train_ids = np.concatenate(train_ids)
        self.train_bytes = np.concatenate(train_bytes)
        self.val_ids, self.val_bytes = np.concatenate(val_ids), np.concatenate(val_bytes)
        if self.mode == "documents":
            pad = self.tokenizer.pad_token_id
            self.train_set = DocumentDataset(self.train_documents, self.chunk_len, pad)
            self.val_set = DocumentDataset(self.val_documents, self.chunk_len, pad)
        else:
            self.train_set = ChunkDataset(self.train_ids, self.train_bytes, self.chunk_len)
            self.val_set = ChunkDataset(self.val_ids, self.val_bytes, self.chunk_len)
        for name, ds in (("train", self.train_set), ("validation", self.val_set)):
            if len(ds) == 0:
                raise ValueError(
                    f"data: the {name} split holds no sample: {len(ds.ids)} tokens, chunk_len={self.chunk_len}, "
                    f"mode={self.mode}; use more text or a shorter chunk"
                )
        log.info(
            "data: %d documents, %d train chunks, %d validation chunks of %d tokens (%s)",
            len(names), len(self.train_set), len(self.val_set), self.chunk_len, self.tokenizer,
        )

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _lanes(self, ids, byte_counts, lanes_per_rank: int) -> StreamLanes:
        rank, world = self._world()
        return StreamLanes(ids, byte_counts, lanes_per_rank=lanes_per_rank, chunk_len=self.chunk_len,
                           pad_token_id=self.tokenizer.pad_token_id, rank=rank, world_size=world)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        if self.mode == "lanes":
            lanes = self._lanes(self.train_ids, self.train_bytes, self.batch_size)
            self.train_sampler = ResumableSequence(len(lanes))
            dataset, batch_size = lanes, None
        else:
            self.train_sampler = ShardedSampler(len(self.train_set), rank=rank, world_size=world, seed=self.seed)
            dataset, batch_size = self.train_set, self.batch_size
        if self._pending_sampler_state is not None:
            self.train_sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        return DataLoader(dataset, batch_size=batch_size, sampler=self.train_sampler,
                          drop_last=batch_size is not None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        if self.mode == "lanes":
            lanes = self._lanes(self.val_ids, self.val_bytes, self.val_batch_size)
            return DataLoader(lanes, batch_size=None, shuffle=False, num_workers=self.num_workers)
        rank, world = self._world()
        sampler = ShardedSampler(len(self.val_set), rank=rank, world_size=world, shuffle=False, pad=False)
        return DataLoader(self.val_set, batch_size=self.val_batch_size, sampler=sampler,
                          num_workers=self.num_workers)

    def state_dict(self) -> dict:
        """The training sampler's position: a resumed run reads the rest of the epoch.

        The loader fetches a batch ahead of the training step, so under a Trainer the position is taken
        from the batches the trainer has processed in this epoch, not from how far the sampler has run."""
        if self.train_sampler is None:
            return {}
        state = self.train_sampler.state_dict()
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            state["position"] = processed * (1 if self.mode == "lanes" else self.batch_size)
            if "epoch" in state:
                state["epoch"] = trainer.current_epoch
        return {"train_sampler": state}

    def load_state_dict(self, state: dict) -> None:
        self._pending_sampler_state = state.get("train_sampler")
