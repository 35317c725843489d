"""Language-modelling data: plain-text documents, tokenized, cut into fixed-length chunks.

Each chunk is `chunk_len` input tokens with their next-token labels; the task reads it segment by segment.
Every document is split into a training head and a validation tail (`val_fraction` of its tokens), so both
splits see every document. Documents are joined with the tokenizer's eos token.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stm.data.tokenizers import Tokenizer

log = logging.getLogger(__name__)

SAMPLES = ("austen",)


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
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.byte_counts = torch.from_numpy(byte_counts.astype(np.int64))
        self.chunk_len = chunk_len
        self.n_chunks = (len(ids) - 1) // chunk_len

    def __len__(self) -> int:
        return self.n_chunks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n_chunks:
            raise IndexError(i)
        s = i * self.chunk_len
        return {
            "input_ids": self.ids[s:s + self.chunk_len],
            "labels": self.ids[s + 1:s + self.chunk_len + 1],
            "label_bytes": self.byte_counts[s + 1:s + self.chunk_len + 1],
        }


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
    ):
        super().__init__()
        if (files is None) == (sample is None):
            raise ValueError("data: give exactly one of data.files (paths to text files) and data.sample")
        if chunk_len is None or chunk_len <= 0:
            raise ValueError(f"data.chunk_len must be a positive integer, got {chunk_len}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be a positive integer, got {batch_size}")
        self.tokenizer = tokenizer
        self.chunk_len = chunk_len
        self.files = list(files) if files is not None else sample_files(sample)
        self.files_key = "data.files" if files is not None else f"data.sample={sample}"
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
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
        train_ids, train_bytes, val_ids, val_bytes = [], [], [], []
        for path, text in read_documents(self.files, self.files_key):
            ids, counts = self.tokenizer.encode_with_byte_counts(text)
            cut = int(len(ids) * (1 - self.val_fraction))
            if cut < 2 or len(ids) - cut < 2:
                raise ValueError(f"{self.files_key}: {path} is too short to split ({len(ids)} tokens)")
            for store_ids, store_bytes, part in ((train_ids, train_bytes, slice(0, cut)),
                                                 (val_ids, val_bytes, slice(cut, None))):
                store_ids += [ids[part], np.array([eos])]
                store_bytes += [counts[part], np.array([0])]
        self.train_ids = np.concatenate(train_ids)
        self.train_set = ChunkDataset(self.train_ids, np.concatenate(train_bytes), self.chunk_len)
        self.val_set = ChunkDataset(np.concatenate(val_ids), np.concatenate(val_bytes), self.chunk_len)
        for name, ds in (("train", self.train_set), ("validation", self.val_set)):
            if len(ds) == 0:
                raise ValueError(
                    f"data: the {name} split has fewer than chunk_len={self.chunk_len} tokens "
                    f"({len(ds.ids)}); use more text or a shorter chunk"
                )
        log.info(
            "data: %d files, %d train chunks, %d validation chunks of %d tokens (%s)",
            len(self.files), len(self.train_set), len(self.val_set), self.chunk_len, self.tokenizer,
        )

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          generator=generator, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False,
                          num_workers=self.num_workers)
