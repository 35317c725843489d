"""A compact decoder-only transformer for from-scratch memory experiments.

RMSNorm, rotary positions, SwiGLU, `F.scaled_dot_product_attention`. It reads one segment at a time and
accepts the `SegmentExtras` of any memory mechanism: embeddings before/after the segment (memory tokens),
cached keys/values per layer (recurrence, rolling windows), and an attention window.

Positions are local: the first cached key sits at position 0, the segment's first query right after the
last cached key. Keys are cached before rotation and rotated at each use, so a segment computes the same
thing wherever it sits in the stream, and positions stay bounded however long the stream runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stm.memory.base import BackboneOutput, SegmentExtras, read_layer_memory
from stm.models.attention import (
    BandedLayout,
    apply_rotary,
    apply_rotary_,
    banded_attention,
    build_attention_mask,
    flex_attention,
    flex_block_mask,
    logit_positions,
    rotary_cos_sin,
    segment_key_padding,
    with_memory_tokens,
)


@dataclass
class TransformerConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None  # SwiGLU hidden width; default 8/3 * d_model rounded up to a multiple of 64
    dropout: float = 0.0
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    attention: str = "auto"  # sdpa (dense or banded masks), flex (block-sparse, GPU), auto: flex on a GPU

    def __post_init__(self):
        if self.vocab_size is None or self.vocab_size <= 0:
            raise ValueError(f"model.vocab_size must be a positive integer, got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"the head size d_model / n_heads = {self.d_model // self.n_heads} must be even (rotary)")
        if self.d_ff is None:
            self.d_ff = 64 * math.ceil(self.d_model * 8 / 3 / 64)
        if self.attention not in ("auto", "sdpa", "flex"):
            raise ValueError(f"model.attention must be auto, sdpa or flex, got {self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, past_kv, keep_key_values: bool = True):
        """x (B, L, D); cos/sin (n_past + L, head_dim); mask: a bool tensor (B, 1, L, n_past + L), a flex
        BlockMask, or None (plain causal).

        Returns the attention output (B, L, D) and this segment's unrotated (keys, values), each (B, H, L, hd),
        or None when not `keep_key_values`. Without autograd (no_grad, or nothing requiring gradients) rotary
        is applied in place, the kept keys/values are copied out of the fused projection (so that it and its
        queries are freed after the layer, not kept alive with the cache) and nothing else outlives its use;
        the numbers are the same either way.
        """
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim)
        in_place = not qkv.requires_grad
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        present = None
        if keep_key_values:  # (B, H, L, hd) each: a copy without autograd, else views of the projection
            present = tuple(qkv[:, :, 1:].clone().permute(2, 0, 3, 1, 4)) if in_place else (k, v)
        del qkv
        if past_kv is not None:
            k = torch.cat([past_kv[0].to(k.dtype), k], dim=2)
            v = torch.cat([past_kv[1].to(v.dtype), v], dim=2)
        n_past = k.shape[2] - L
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # under autocast q/k/v are bf16 while x is float32
        rotate = apply_rotary_ if in_place else apply_rotary
        q = rotate(q, cos[n_past:], sin[n_past:])
        k = rotate(k, cos, sin)
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(mask, BandedLayout):
            y = banded_attention(q, k, v, mask, dropout_p)
        elif mask is not None and not isinstance(mask, torch.Tensor):  # a flex BlockMask
            y = flex_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and n_past == 0,
                                               dropout_p=dropout_p)
        del q, k, v  # the projection goes before the output projection is made
        return self.out(y.transpose(1, 2).reshape(B, L, D)), present


class SwiGLU(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        """x (B, L, D) -> (B, L, D). Without autograd the activation and the product are computed in place, in
        the gate's half of the (B, L, 2 * d_ff) projection (the same numbers, half the memory)."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        if not gate.requires_grad:
            return self.down(F.silu(gate, inplace=True).mul_(up))
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, mask, past_kv, keep_key_values: bool = True):
        attended, present = self.attn(self.attn_norm(x), cos, sin, mask, past_kv, keep_key_values)
        x = _residual(x, self.drop(attended))
        del attended  # not kept alive through the feed-forward
        x = _residual(x, self.drop(self.mlp(self.mlp_norm(x))))
        return x, present


def _residual(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + update. Outside autograd, and where the sum keeps update's dtype, it is written into `update` (a fresh
    tensor the caller gives up): the same sum, without a third tensor of the stream's size."""
    if update.requires_grad or x.requires_grad or update.dtype != x.dtype:
        return x + update
    return update.add_(x)


class Transformer(nn.Module):
    """Decoder-only transformer over one segment at a time.

    Build it with keyword arguments (`Transformer(vocab_size=259, d_model=128, ...)`, as Hydra does) or
    from a `TransformerConfig`.
    """

    def __init__(self, config: TransformerConfig | None = None, **kwargs):
        super().__init__()
        self.config = config = config if config is not None else TransformerConfig(**kwargs)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        # residual projections scaled down with depth (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith("attn.out.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) embeddings (for mechanisms that build memory from tokens)."""
        return self.embed(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        extras: SegmentExtras | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        keep_key_values: bool = True,
    ) -> BackboneOutput:
        """Read one segment.

        input_ids:       (B, T) token ids.
        attention_mask:  (B, T), 1/True at real tokens, 0/False at padding; None means no padding.
        extras:          what the memory mechanism adds (see `SegmentExtras`).
        logits_to_keep:  which positions get logits (B, K, V), as in Hugging Face: 0 = all T, n = the last n,
                         a 1-D LongTensor = those positions (an empty one: no logits, (B, 0, V)).
        keep_key_values: False when no one will read this segment's keys/values (one segment under full
                         attention, a memory that keeps nothing): each layer's are freed after the layer instead
                         of all of them being kept to the end, and `present_key_values` is empty ([]).
        """
        extras = extras if extras is not None else SegmentExtras()
        B, T = input_ids.shape
        x = self.drop(with_memory_tokens(self.embed(input_ids), extras))
        P, S, n_past = extras.n_prefix, extras.n_suffix, extras.n_past
        L = P + T + S

        key_padding = segment_key_padding(extras, attention_mask, B, T, x.device)
        attention = self.config.attention
        if attention == "auto":
            attention = "flex" if x.is_cuda else "sdpa"
        plain_causal = n_past == 0 and key_padding is None and (extras.window is None or extras.window >= L)
        if plain_causal:
            mask = None  # SDPA's is_causal path (flash attention): nothing for a mask to add
        elif attention == "sdpa" and extras.window is not None and L > 2 * extras.window:
            mask = BandedLayout(n_past, extras.window, extras.n_sink, extras.n_memory_tokens, key_padding,
                                extras.memory_start)
        else:
            mask = (flex_block_mask if attention == "flex" else build_attention_mask)(
                n_past, L, batch_size=B, device=x.device, key_padding=key_padding, window=extras.window,
                n_sink=extras.n_sink, n_prefix=extras.n_memory_tokens, prefix_start=extras.memory_start,
            )
        cos, sin = rotary_cos_sin(n_past + L, self.config.head_dim, self.config.rope_base, x.device, x.dtype)

        presents, layer_outputs = [], {}
        past = extras.past_key_values
        write_layers = extras.layer_memory.write_layers if extras.layer_memory is not None else ()
        for i, block in enumerate(self.blocks):
            x = read_layer_memory(extras, i, x)
            x, present = block(x, cos, sin, mask, past[i] if past else None, keep_key_values)
            if keep_key_values:
                presents.append(present)
            if i in write_layers:
                layer_outputs[i] = x
        hidden = self.norm(x)
        del x
        logits = self.lm_head(hidden[:, logit_positions(logits_to_keep, T, offset=P, device=hidden.device)])
        return BackboneOutput(
            logits=logits,
            hidden_states=hidden,
            present_key_values=presents,
            attention_mask=attention_mask.bool() if attention_mask is not None else None,
            n_prefix=P,
            n_suffix=S,
            layer_outputs=layer_outputs,
        )
