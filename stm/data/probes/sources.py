"""The probe generators as record sources (`conf/source/probe_*.yaml`): `list(source)` gives the records."""

from __future__ import annotations

import copy

from stm.data.babi import BabiFile
from stm.data.fieldmap import Record, _plain
from stm.data.probes.copy_reverse import copy_sequence
from stm.data.probes.hidden_story import babilong
from stm.data.probes.recall import mqar, recall
from stm.data.sources import Source


class ProbeSource(Source):
    """A probe generator as a record source (`list(source)` gives its records, built once per iteration)."""

    kind = ""
    length_key = "length"  # the parameter a list of lengths overrides (data.val_lengths)

    def __init__(self, n_samples: int = 1000, seed: int = 0, split: str | None = "train", limit: int | None = None,
                 **params):
        super().__init__(fields={"context": "context"}, limit=limit, split=split)
        if not isinstance(n_samples, int) or n_samples <= 0:
            raise ValueError(f"{type(self).__name__}.n_samples must be a positive integer, got {n_samples!r}")
        self.n_samples, self.seed = n_samples, seed
        self.params = {k: _plain(v) for k, v in params.items()}

    def generate(self, n: int) -> list[Record]:
        raise NotImplementedError

    def with_params(self, **overrides) -> ProbeSource:
        """A copy with some generator parameters (or n_samples / seed) overridden; the original is unchanged."""
        copied = copy.copy(self)
        copied.params = dict(self.params)
        for key, value in overrides.items():
            if key in ("n_samples", "seed"):
                setattr(copied, key, value)
            else:
                copied.params[key] = _plain(value)
        return copied

    def __iter__(self):
        n = self.n_samples if self.limit is None else min(self.n_samples, self.limit)
        yield from self.generate(n)

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(n_samples={self.n_samples}, seed={self.seed}, split={self.split!r}, {knobs})"


class RecallSource(ProbeSource):
    """`recall` as a source: RecallSource(n_samples, seed, split, n_pairs=..., length=..., distance=...)."""

    def generate(self, n: int) -> list[Record]:
        return recall(n, self.seed, self.split, **self.params)


class MQARSource(ProbeSource):
    """`mqar` as a source: MQARSource(n_samples, seed, split, n_pairs=..., n_queries=..., length=...)."""

    def generate(self, n: int) -> list[Record]:
        return mqar(n, self.seed, self.split, **self.params)


class CopySource(ProbeSource):
    """`copy_sequence` as a source: CopySource(n_samples, seed, split, length=..., reverse=...)."""

    def generate(self, n: int) -> list[Record]:
        return copy_sequence(n, self.seed, self.split, **self.params)


class BabiLongSource(ProbeSource):
    """`babilong` as a source; `path` (relative to `root`) reads the stories from a bAbI file."""

    length_key = "target_length"

    def __init__(self, path: str | None = None, root: str | None = None, **kwargs):
        from stm.data.sources import expand_paths

        super().__init__(**kwargs)
        if path is not None:
            self.params["babi_file"] = BabiFile(expand_paths(path, root, key="BabiLongSource.path")[0])

    def generate(self, n: int) -> list[Record]:
        return babilong(n, self.seed, self.split, **self.params)
