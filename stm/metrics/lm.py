"""Scoring: language-modelling sums that stay correct under DDP, and reference baselines."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics import Metric

LN2 = math.log(2.0)


class LanguageModelMetrics(Metric):
    """Corpus-level loss, perplexity and bits per byte from summed NLL, token and byte counts.

    Summing (not averaging per batch) keeps the result exact for batches of unequal size and across DDP
    ranks, where the three sums are added up before the division.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, n_tokens: torch.Tensor, n_bytes: torch.Tensor) -> None:
        self.nll += nll_sum.detach().double()
        self.tokens += n_tokens.detach().long()
        self.bytes += n_bytes.detach().long()

    def compute(self) -> dict[str, torch.Tensor]:
        loss = self.nll / self.tokens.clamp(min=1)
        return {
            "loss": loss.float(),
            "ppl": loss.exp().float(),
            "bpb": (self.nll / LN2 / self.bytes.clamp(min=1)).float(),
        }


def bits_per_byte(nll_sum: float | torch.Tensor, n_bytes: int | torch.Tensor) -> torch.Tensor:
    """Total NLL in nats over the text's UTF-8 byte count -> bits per byte."""
    return torch.as_tensor(nll_sum, dtype=torch.float64) / LN2 / max(int(n_bytes), 1)


def unigram_nll(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Total NLL (nats) of `eval_ids` under a unigram model fitted on `train_ids` (add-one smoothing).

    The simplest model of a text that ignores all context; any LM worth training must beat it.
    """
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[np.asarray(eval_ids, dtype=np.int64)].sum())
