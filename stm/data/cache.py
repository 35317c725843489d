"""Tokenize documents once, in batches, and keep the result on disk as memory-mapped arrays.

The cache key covers the documents (path, size, modification time), the tokenizer (its class, name,
vocabulary and, for Hugging Face tokenizers, a hash of its full definition) and the format version, so a
second run, and every job of a sweep, reuses the tokens instead of tokenizing again. Files are written to
a temporary name and renamed, so jobs that race to fill the same entry never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stm.constants import CACHE_DIR_ENV, DEFAULT_CACHE_DIR

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class TokenizedCorpus:
    """Documents as one token array.

    ids:         (N,) int32 token ids of all documents, one after the other.
    byte_counts: (N,) int32 UTF-8 bytes each token stands for.
    offsets:     (n_docs + 1,) int64: document d is ids[offsets[d]:offsets[d + 1]].
    """

    ids: np.ndarray
    byte_counts: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def document(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[d], self.offsets[d + 1]
        return self.ids[a:b], self.byte_counts[a:b]


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)).expanduser() / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    """What identifies a tokenizer's output: its class, name, vocabulary size and definition."""
    parts = [type(tokenizer).__name__, str(getattr(tokenizer, "name", "")), str(tokenizer.vocab_size)]
    backend = getattr(getattr(tokenizer, "tokenizer", None), "backend_tokenizer", None)
    if backend is not None:
        parts.append(hashlib.sha256(backend.to_str().encode()).hexdigest())
    return "|".join(parts)


def corpus_key(paths: list[str | Path], tokenizer, extra_key: str = "") -> str:
    """The cache entry of these files under this tokenizer (`extra_key`: anything else the text depends
    on, such as a source's field mapping)."""
    files = []
    for p in paths:
        stat = Path(p).stat()
        files.append([str(Path(p).resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"files": files, "tokenizer": tokenizer_fingerprint(tokenizer), "extra": extra_key,
                       "version": FORMAT_VERSION})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def tokenize_texts(texts: list[str], tokenizer, batch_size: int = 64, progress: bool = True) -> TokenizedCorpus:
    """Tokenize in batches (fast tokenizers run a batch in parallel in Rust)."""
    from rich.progress import track

    ids, counts, lengths = [], [], []
    batches = range(0, len(texts), batch_size)
    if progress and len(texts) > batch_size:
        batches = track(batches, description="tokenizing", transient=True)
    for start in batches:
        for doc_ids, doc_counts in tokenizer.encode_batch_with_byte_counts(texts[start:start + batch_size]):
            ids.append(doc_ids.astype(np.int32))
            counts.append(doc_counts.astype(np.int32))
            lengths.append(len(doc_ids))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    empty = np.zeros(0, dtype=np.int32)
    return TokenizedCorpus(np.concatenate(ids) if ids else empty, np.concatenate(counts) if counts else empty,
                           offsets)


def cached_tokenize(paths: list[str | Path], texts: list[str] | None, tokenizer,
                    cache_dir: str | Path | None | bool = None, read_texts=None,
                    extra_key: str = "") -> tuple[TokenizedCorpus, bool]:
    """The tokenized documents of `paths`, from the cache when present. Returns (corpus, was_cached).

    `texts` are the documents' texts (or `read_texts()` gives them, called only on a cache miss).
    `cache_dir=None` uses $STM_CACHE_DIR or ~/.cache/stm; `cache_dir=False` turns caching off.
    """
    if cache_dir is False:
        return tokenize_texts(texts if texts is not None else read_texts(), tokenizer), False
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    entry = folder / corpus_key(paths, tokenizer, extra_key)
    names = ("ids.npy", "byte_counts.npy", "offsets.npy")
    if all((entry / n).is_file() for n in names):
        arrays = [np.load(entry / n, mmap_mode="r") for n in names]
        log.info("tokens: reusing the cache %s", entry)
        return TokenizedCorpus(*arrays), True
    corpus = tokenize_texts(texts if texts is not None else read_texts(), tokenizer)
    entry.mkdir(parents=True, exist_ok=True)
    for name, array in zip(names, (corpus.ids, corpus.byte_counts, corpus.offsets)):
        tmp = entry / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, entry / name)
    log.info("tokens: %d documents, %d tokens, cached in %s", len(corpus), len(corpus.ids), entry)
    return corpus, False
