"""Per-sample random generators of the probes: sample i depends only on (seed, split, i), so the same seed
gives the same records and train / val (different `split`) draw different ones."""

from __future__ import annotations

import zlib

import numpy as np

from stm.data.fieldmap import _plain


def sample_rng(seed: int, split: str | None, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of sample `index`: from (seed, a stable code of split, stream, index); stream 1 draws
    per-split choices such as the order of a bAbI file's questions."""
    if int(seed) < 0:
        raise ValueError(f"probe seed must be a non-negative integer, got {seed}")
    return np.random.default_rng([int(seed), zlib.crc32((split or "").encode()), stream, int(index)])


def _draw(rng: np.random.Generator, value, name: str) -> int:
    """An int, or one drawn uniformly from an inclusive [lo, hi] range."""
    value = _plain(value)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] > value[1]:
            raise ValueError(f"{name}: a range is [lo, hi] with lo <= hi, got {value}")
        return int(rng.integers(value[0], value[1] + 1))
    return int(value)
