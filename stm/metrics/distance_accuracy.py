"""Accuracy by distance: the correct answers and examples of memory probes counted per bucket of distance in
segments (between the fact and the question), near, far, truncated and all, summed across DDP ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric


def bucket_names(edges: Sequence[int]) -> list[str]:
    """Names of the distance buckets of `edges`: [0, 1, 2, 4] -> ["seg0", "seg1", "seg2-3", "seg4+"]."""
    names = []
    for lo, hi in zip(edges, list(edges[1:]) + [None]):
        if hi is None:
            names.append(f"seg{lo}+")
        elif hi - lo == 1:
            names.append(f"seg{lo}")
        else:
            names.append(f"seg{lo}-{hi - 1}")
    return names


def _check_range(name: str, value) -> tuple[int, int | None]:
    """An inclusive [lo, hi] range of segment distances (hi None: unbounded)."""
    if value is None or len(value) != 2 or value[0] is None or value[0] < 0 or \
            (value[1] is not None and value[1] < value[0]):
        raise ValueError(f"task.{name} must be an inclusive [lo, hi] range of distances in segments with "
                         f"0 <= lo <= hi (hi null: unbounded), got {value}")
    return int(value[0]), None if value[1] is None else int(value[1])


class DistanceAccuracy(Metric):
    """Correct answers and examples per group: the distance buckets, then near, far, truncated and all.

    State: `count` (G,) examples per group and `correct` (S, G) the summed score of each of the S scores,
    both summed across ranks. `update` takes one example at a time.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, edges: Sequence[int], near: Sequence, far: Sequence, scores: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        edges = [int(e) for e in edges]
        if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"task.edges must be strictly increasing distances in segments starting at 0, "
                             f"got {list(edges)}")
        self.edges = edges
        self.near, self.far = _check_range("near", near), _check_range("far", far)
        self.scores = list(scores)
        self.buckets = bucket_names(edges)
        self.groups = self.buckets + ["near", "far", "truncated", "all"]
        self.add_state("count", default=torch.zeros(len(self.groups), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.zeros(len(self.scores), len(self.groups), dtype=torch.float64),
                       dist_reduce_fx="sum")

    def groups_of(self, distance_segments: int | None, kept: bool) -> list[int]:
        """Indices of the groups an example falls in."""
        index = [len(self.groups) - 1]
        if not kept:
            return index + [self.groups.index("truncated")]
        d = int(distance_segments)
        index.append(sum(1 for e in self.edges if e <= d) - 1)
        for name, (lo, hi) in (("near", self.near), ("far", self.far)):
            if lo <= d and (hi is None or d <= hi):
                index.append(self.groups.index(name))
        return index

    def update(self, distance_segments: int | None, kept: bool, scores: dict[str, float]) -> None:
        """Count one example: its distance in segments, whether its fact survived, and its score per name."""
        index = torch.tensor(self.groups_of(distance_segments, kept), device=self.count.device)
        self.count[index] += 1
        values = torch.tensor([float(scores[s]) for s in self.scores], dtype=torch.float64, device=self.count.device)
        self.correct[:, index] += values[:, None]

    def compute(self) -> dict[str, dict[str, float]]:
        """{score: {group: accuracy}} (NaN for an empty group) and {"count": {group: n}}."""
        count = self.count.double()
        out: dict[str, dict[str, float]] = {"count": {g: int(n) for g, n in zip(self.groups, self.count.tolist())}}
        for s, name in enumerate(self.scores):
            acc = torch.where(count > 0, self.correct[s] / count.clamp(min=1), torch.full_like(count, math.nan))
            out[name] = dict(zip(self.groups, acc.tolist()))
        out["correct"] = {name: dict(zip(self.groups, self.correct[s].tolist())) for s, name in enumerate(self.scores)}
        return out
