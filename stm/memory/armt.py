"""`memory=armt`: associative recurrent memory (Rodkin et al. 2024, "Associative Recurrent Memory Transformer").

Recurrent memory tokens as in `memory=rmt`, plus, in every chosen layer, an associative matrix that the memory
tokens write to at the end of a segment and that every token of the next segments reads from:

    read (before layer l, every position):   q = phi(W_q h)               h: the layer's input (B, L, D)
                                             h <- h + (q A) / (q . z)
    write (after layer l, memory tokens):    k = phi(W_k m), v = W_v m    m: the layer's output at the M write tokens
                                             beta = sigmoid(W_b m)
                                             v_old = (k A) / (k . z)                   what A returns for k now
                                             A <- A + k^T (beta * (v - v_old))         the delta rule
                                             z <- z + sum_m c_m k_m,  c = clip(1 - (k . z) / |k|^2, 0, 1)

phi is the DPFP feature map (Schlag et al. 2021) of order `nu`, followed by L2 normalisation. The delta rule
overwrites: a key written twice holds only its newer value, and the normaliser z grows only by the part of a
key that is new (`c`), so a rewritten key keeps reading back at scale 1. With `write_order: parallel` (the
paper's) all M write tokens of a segment are written at once, each against the matrix as the previous segments
left it; with `sequential`, one after another, each against the matrix the tokens before it updated (the delta
rule proper: it cannot overshoot when several tokens write one direction; see `sequential_write`).

With `recurrent_tokens: false` the memory tokens do not recur: every segment starts from the same learned tokens
and only the associative matrices carry the past (the layout of the paper's public code; with `placement: write`
the tokens sit after the segment and only write). The state then has no path through the tokens' hidden states,
which otherwise change with every segment read.

The state (`AssociativeState`: the memory tokens, and per layer A (B, F, D) and z (B, F), F = 2 * key_dim * nu)
has a fixed size however long the stream is, and stays in the autograd graph for `bptt_depth` segments like
rmt's tokens. With `read: false` the matrices are written but never read: the mechanism is exactly rmt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stm.memory.base import BackboneOutput, LayerMemory, Memory, SegmentExtras
from stm.memory.rmt import RecurrentMemoryTokens

EPS = 1e-5


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """Deterministic parameter-free projection: (..., d) -> (..., 2 * d * nu), non-negative.

    [relu(x), relu(-x)] times itself rolled by 1 .. nu positions, concatenated."""
    x = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([x * x.roll(shifts, dims=-1) for shifts in range(1, nu + 1)], dim=-1)


def associative_read(matrix: torch.Tensor, norm: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """What the memory returns for feature queries (B, L, F): (B, L, D), from matrix (B, F, D) and norm (B, F)."""
    numerator = queries @ matrix
    denominator = (queries * norm[:, None, :]).sum(-1, keepdim=True) + EPS
    return numerator / denominator


def associative_write(matrix: torch.Tensor, norm: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      beta: torch.Tensor, correction: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta-rule write of M feature keys (B, M, F) with values (B, M, D) and strengths beta (B, M, 1) at once.

    Returns the new (matrix (B, F, D), norm (B, F)). Each key's value replaces (by `beta`) what the memory
    returned for that key before this write."""
    previous = associative_read(matrix, norm, keys)
    matrix = matrix + keys.transpose(1, 2) @ (beta * (values - previous))
    if correction:
        new_part = 1 - (keys * norm[:, None, :]).sum(-1) / keys.pow(2).sum(-1).clamp(min=EPS)
        coefficient = new_part.clamp(0.0, 1.0)
    else:
        coefficient = torch.ones(keys.shape[:2], dtype=keys.dtype, device=keys.device)
    return matrix, norm + (coefficient[..., None] * keys).sum(1)


def sequential_write(matrix: torch.Tensor, norm: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     beta: torch.Tensor, correction: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule one write token after another: token m is written against the matrix that tokens 0 .. m-1
    of this segment have already updated. Shapes as in `associative_write`.

    Written at once, M keys that point the same way each correct the same error, and the read of that direction
    moves by about M * beta times the error: past beta = 2 / M it overshoots, and the overshoot grows segment
    after segment (seen as matrices growing ~1,000-fold over 64 segments in a model trained on 4). One at a time,
    each write moves the read of its key at most all the way to its value."""
    for m in range(keys.shape[1]):
        matrix, norm = associative_write(matrix, norm, keys[:, m:m + 1], values[:, m:m + 1], beta[:, m:m + 1],
                                         correction)
    return matrix, norm


class AssociativeLayer(nn.Module):
    """The projections of one layer's associative memory: queries and keys (D -> key_dim, then DPFP of order nu
    and L2 normalisation), values (D -> D) and the write strength (D -> 1, sigmoid)."""

    def __init__(self, d_model: int, key_dim: int, nu: int, correction: bool = True, write_order: str = "parallel"):
        super().__init__()
        self.nu, self.correction = nu, correction
        self.write_fn = {"parallel": associative_write, "sequential": sequential_write}[write_order]
        self.query = nn.Linear(d_model, key_dim, bias=False)
        self.key = nn.Linear(d_model, key_dim, bias=False)
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.beta = nn.Linear(d_model, 1)
        for layer in (self.query, self.key, self.value):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.beta.weight)
        nn.init.zeros_(self.beta.bias)

    @property
    def n_features(self) -> int:
        return 2 * self.query.out_features * self.nu

    def features(self, projection: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(dpfp(projection(hidden), self.nu), dim=-1)

    def read(self, hidden: torch.Tensor, matrix: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D) -> what the memory adds to it (B, L, D)."""
        hidden = hidden.to(self.query.weight.dtype)
        return associative_read(matrix, norm, self.features(self.query, hidden))

    def write(self, memory_tokens: torch.Tensor, matrix: torch.Tensor, norm: torch.Tensor):
        """memory_tokens (B, M, D): the layer's output at the write tokens -> new (matrix, norm)."""
        memory_tokens = memory_tokens.to(self.key.weight.dtype)
        keys = self.features(self.key, memory_tokens)
        beta = torch.sigmoid(self.beta(memory_tokens))
        return self.write_fn(matrix, norm, keys, self.value(memory_tokens), beta, self.correction)


@dataclass
class AssociativeState:
    """memory_tokens: (B, M, D) rmt's memory; matrices: per associative layer A (B, F, D); norms: z (B, F)."""

    memory_tokens: torch.Tensor
    matrices: list[torch.Tensor]
    norms: list[torch.Tensor]


class AssociativeRead(LayerMemory):
    """The read side for one segment: layer `i` reads its matrix from `state`; writes come from every associative
    layer's output."""

    def __init__(self, memory: AssociativeMemory, state: AssociativeState):
        self.memory, self.state = memory, state
        self.write_layers = frozenset(memory.layer_ids)

    def read(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        j = self.memory.position.get(layer)
        if j is None or not self.memory.read_enabled:
            return None
        return self.memory.layers[j].read(hidden, self.state.matrices[j], self.state.norms[j])


class AssociativeMemory(Memory):
    """`memory=armt`. Options the paper varies: `num_memory_tokens`, the DPFP order `nu`, which `layers` carry an
    associative matrix (None: all), and `key_dim` (the width of queries and keys before DPFP); `write_order`:
    `parallel` (the paper's) or `sequential`; `recurrent_tokens`: whether the memory tokens' outputs become the next
    segment's memory tokens (as in rmt) or every segment starts from the learned tokens (see the module docstring)."""

    def __init__(self, num_memory_tokens: int = 8, nu: int = 3, key_dim: int = 32, layers: list[int] | None = None,
                 read: bool = True, correction: bool = True, write_order: str = "parallel",
                 placement: str = "read_write", learned_init: bool = True, init_std: float = 0.02,
                 recurrent_tokens: bool = True):
        super().__init__()
        if num_memory_tokens is None or num_memory_tokens < 1:
            raise ValueError(f"memory.armt.num_memory_tokens must be >= 1 (the memory is written from them), "
                             f"got {num_memory_tokens}")
        if nu is None or nu < 1:
            raise ValueError(f"memory.armt.nu (the DPFP order) must be >= 1, got {nu}")
        if key_dim is None or key_dim < 1:
            raise ValueError(f"memory.armt.key_dim must be >= 1, got {key_dim}")
        self.tokens = RecurrentMemoryTokens(num_memory_tokens, placement, learned_init, init_std)
        self.nu, self.key_dim, self.correction, self.read_enabled = nu, key_dim, correction, read
        if write_order not in ("parallel", "sequential"):
            raise ValueError(f"memory.armt.write_order must be 'parallel' (the paper's: all write tokens against the "
                             f"matrix as the previous segment left it) or 'sequential', got {write_order!r}")
        self.write_order = write_order
        if not isinstance(recurrent_tokens, bool):
            raise ValueError(f"memory.armt.recurrent_tokens must be true (the tokens recur as in rmt) or false (every "
                             f"segment starts from the learned tokens), got {recurrent_tokens!r}")
        if not recurrent_tokens and not learned_init:
            raise ValueError("memory.armt.recurrent_tokens=false needs learned_init=true: otherwise every segment's "
                             "memory tokens are zeros and nothing can be learnt about what to write")
        self.recurrent_tokens = recurrent_tokens
        self.requested_layers = None if layers is None else [int(i) for i in layers]
        self.layers = nn.ModuleList()
        self.layer_ids: list[int] = []
        self.position: dict[int, int] = {}

    @property
    def num_memory_tokens(self) -> int:
        return self.tokens.num_memory_tokens

    def bind(self, backbone: nn.Module) -> None:
        self.tokens.bind(backbone)
        n_layers = backbone.n_layers
        ids = list(range(n_layers)) if self.requested_layers is None else self.requested_layers
        bad = [i for i in ids if not -n_layers <= i < n_layers]
        if bad or not ids:
            raise ValueError(f"memory.armt.layers: {self.requested_layers} must name layers of the model's {n_layers} "
                             f"(0 .. {n_layers - 1}, or negative from the end), at least one")
        self.layer_ids = sorted({i % n_layers for i in ids})
        self.position = {layer: j for j, layer in enumerate(self.layer_ids)}
        self.layers = nn.ModuleList(AssociativeLayer(backbone.d_model, self.key_dim, self.nu, self.correction,
                                                     self.write_order)
                                    for _ in self.layer_ids)

    def init_state(self, batch_size, device) -> AssociativeState:
        tokens = self.tokens.init_state(batch_size, device)
        if not self.layers:
            raise RuntimeError("AssociativeMemory.bind(backbone) must be called before use")
        dtype = self.layers[0].value.weight.dtype
        d_model = self.layers[0].value.out_features
        matrices = [torch.zeros(batch_size, layer.n_features, d_model, device=device, dtype=dtype)
                    for layer in self.layers]
        norms = [torch.zeros(batch_size, layer.n_features, device=device, dtype=dtype) for layer in self.layers]
        return AssociativeState(tokens, matrices, norms)

    def prepare(self, state: AssociativeState) -> SegmentExtras:
        tokens = state.memory_tokens
        if not self.recurrent_tokens:  # the learned tokens themselves, so that every segment trains them
            tokens = self.tokens.init_state(tokens.shape[0], tokens.device)
        extras = self.tokens.prepare(tokens)
        extras.layer_memory = AssociativeRead(self, state)
        return extras

    def update(self, state: AssociativeState, outputs: BackboneOutput) -> AssociativeState:
        M = self.num_memory_tokens
        if outputs.n_suffix < M:  # a decoding step without write tokens: nothing is written
            return state
        matrices, norms = [], []
        for j, layer_id in enumerate(self.layer_ids):
            written = outputs.layer_outputs[layer_id][:, -M:]
            matrix, norm = self.layers[j].write(written, state.matrices[j], state.norms[j])
            matrices.append(matrix)
            norms.append(norm)
        tokens = self.tokens.update(state.memory_tokens, outputs) if self.recurrent_tokens else state.memory_tokens
        return AssociativeState(tokens, matrices, norms)

    def extra_repr(self) -> str:
        return (f"num_memory_tokens={self.num_memory_tokens}, nu={self.nu}, key_dim={self.key_dim}, "
                f"layers={self.layer_ids or self.requested_layers}, read={self.read_enabled}, "
                f"correction={self.correction}, write_order={self.write_order}, "
                f"recurrent_tokens={self.recurrent_tokens}")
