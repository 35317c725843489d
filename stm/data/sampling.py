"""Samplers that work under DDP and resume mid-epoch.

- `ShardedSampler`: items (documents or chunks) shuffled by seed and epoch, each rank taking a disjoint
  share of whole items; its position is part of its state, so a resumed run reads what is left.
- `StreamLanes`: contiguous text in lanes. Item t is a whole batch: chunk t of every lane of this rank,
  so lane i of batch t+1 continues lane i of batch t and a memory state can be carried across steps, as
  Transformer-XL trains. Ranks own disjoint lanes; together the lanes cover the stream exactly (the last
  chunk of a lane is padded, with labels ignored).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from stm.constants import IGNORE_INDEX


class ShardedSampler(Sampler[int]):
    """Indices 0..n-1, shuffled per epoch from `seed`, rank `rank` of `world_size` taking every
    world_size-th one. For training (`pad=True`) ranks get equal counts: the last round is topped up with items
    from the start of the order (as `DistributedSampler` does), so DDP never waits on a rank with one batch
    less. For evaluation (`pad=False`) every item is read exactly once: ranks may differ by one item, and the
    summed metrics stay exactly those of one process."""

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, seed: int | None = 0, shuffle: bool = True,
                 pad: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.seed, self.shuffle, self.pad = seed, shuffle, pad
        self.epoch, self.position = 0, 0

    def order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed or 0) * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        if self.pad:
            per_rank = math.ceil(self.n / self.world_size)
            order += order[:per_rank * self.world_size - self.n]
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self):
        order = self.order()
        while self.position < len(order):
            index = order[self.position]
            self.position += 1
            if self.position == len(order):
                # the epoch is over with its last item: Lightning stops after len() items without asking for
                # another, so advancing later would leave the next pass (the next validation) empty
                self.epoch, self.position = self.epoch + 1, 0
                yield index
                return
            yield index

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start, a resumed epoch included: keep the position then."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != self.n or state.get("seed") != self.seed:
            raise ValueError(f"sampler state is for {state.get('n')} items with seed {state.get('seed')}, "
                             f"this data has {self.n} items with seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]


class StreamLanes(Dataset):
    """A token stream in lanes; item t = the batch of chunk t of this rank's lanes.

    ids, byte_counts: (N,) the stream and the bytes each token stands for; its N - 1 (input, label) pairs
    are cut into `lanes_per_rank * world_size` lanes of equal length (the last may be shorter).
    Each item: input_ids, labels, label_bytes (lanes_per_rank, chunk_len), attention_mask where a lane's
    end is padded, and `lane_start` (True for t == 0: the memory state starts afresh).
    """

    def __init__(self, ids: np.ndarray, byte_counts: np.ndarray, *, lanes_per_rank: int, chunk_len: int,
                 pad_token_id: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        self.byte_counts = torch.as_tensor(np.asarray(byte_counts, dtype=np.int64))
        self.n_pairs = max(len(ids) - 1, 0)
        self.chunk_len, self.pad_token_id = chunk_len, pad_token_id
        total_lanes = lanes_per_rank * world_size
        self.lane_len = math.ceil(self.n_pairs / total_lanes)
        self.lanes = range(rank * lanes_per_rank, (rank + 1) * lanes_per_rank)
        self.n_batches = math.ceil(self.lane_len / chunk_len)

    def __len__(self) -> int:
        return self.n_batches

    def lane_span(self, lane: int) -> tuple[int, int]:
        """[start, end) of the (input, label) pairs lane `lane` covers."""
        start = min(lane * self.lane_len, self.n_pairs)
        return start, min(start + self.lane_len, self.n_pairs)

    def __getitem__(self, t: int) -> dict[str, torch.Tensor]:
        if not 0 <= t < self.n_batches:
            raise IndexError(t)
        B, L = len(self.lanes), self.chunk_len
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        label_bytes = torch.zeros(B, L, dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.long)
        for row, lane in enumerate(self.lanes):
            lane_start, lane_end = self.lane_span(lane)
            start = lane_start + t * L
            n = max(0, min(start + L, lane_end) - start)
            input_ids[row, :n] = self.ids[start:start + n]
            labels[row, :n] = self.ids[start + 1:start + 1 + n]
            label_bytes[row, :n] = self.byte_counts[start + 1:start + 1 + n]
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "label_bytes": label_bytes,
                 "lane_start": torch.tensor(t == 0)}
        if not bool(attention_mask.all()):  # only where there is padding: no mask keeps the fast kernels
            batch["attention_mask"] = attention_mask
        return batch


class ResumableSequence(Sampler[int]):
    """0, 1, ..., n-1 in order (lanes must be read in order), resumable from a saved position."""

    def __init__(self, n: int):
        self.n, self.position = n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        while self.position < self.n:
            self.position += 1
            yield self.position - 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != self.n:
            raise ValueError(f"sampler state is for {state.get('n')} batches, this data has {self.n}")
        self.position = state["position"]
