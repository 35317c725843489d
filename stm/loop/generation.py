"""Generation under memory: the decoding strategies over `stm.loop.decoder.SegmentDecoder`.

`generate` continues each row of a batch (rows of any lengths, each with its own memory state) greedily
(temperature 0) or by sampling (temperature, top-k, top-p), or by beam search (`num_beams`, in
`stm.loop.beam_search`). How the context is read and where decoded tokens go (the final segment, its key/value
cache, `segment_overflow`) is the decoder's: see `stm.loop.decoder`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stm.loop.beam_search import beam_search
from stm.loop.decoder import SegmentDecoder, context_rows
from stm.memory.base import Memory


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: greedy when temperature == 0, else sampled from the softmax at that
    temperature, restricted to the `top_k` most likely tokens and/or the smallest set whose probability
    reaches `top_p` (nucleus sampling)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _eos_set(eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


@torch.no_grad()
def generate(
    model: nn.Module,
    memory: Memory,
    context_ids,
    *,
    segment_len: int | None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    segment_overflow: str = "push",
) -> torch.Tensor:
    """Continue each row of `context_ids` by up to `max_new_tokens` tokens: a (B, T) tensor, or a sequence of B
    rows of any lengths (1-D tensors or lists of ids), decoded together with each row's own memory state; every
    row gets the tokens it would get alone (up to sampling, which draws for the batch at once).

    eos_token_id: one id or several; a row that produces one is finished (the token is kept).
    pad_token_id: fills a finished row's remaining positions (default: the first eos id, else 0).
    stop:         called with the new tokens so far (B, n); returns (B,) bool, True where a row is finished
                  (e.g. a stop string appeared); greedy and sampling only.
    num_beams:    > 1 runs beam search (deterministic; temperature/top-k/top-p are not used), scoring a
                  finished hypothesis by its summed log-probability / length ** length_penalty.
    segment_overflow: "push" (a full final segment goes into the memory and decoding goes on in a new one) or
                  "extend" (the final segment grows past segment_len while decoding); see the module docstring.
    Returns the new tokens (B, N), N <= max_new_tokens.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    eos = _eos_set(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if num_beams > 1:
        return beam_search(model, memory, context_ids, segment_len, max_new_tokens, num_beams, length_penalty,
                           eos, pad, use_cache, segment_overflow)
    contexts = context_rows(context_ids)
    B, device = len(contexts), contexts[0].device
    if max_new_tokens == 0:
        return torch.empty(B, 0, dtype=torch.long, device=device)
    decoder = SegmentDecoder(model, memory, contexts, segment_len, use_cache, segment_overflow)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = sample_next(decoder.logits, temperature, top_k, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad), token)
        new_tokens.append(token)
        if len(eos):
            finished |= torch.isin(token, eos_ids)
        if stop is not None:
            finished |= stop(torch.stack(new_tokens, dim=1)).to(finished.device)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        decoder.append(token, rows=(~finished).nonzero().flatten().tolist())  # finished rows stay as they are
    return torch.stack(new_tokens, dim=1)
