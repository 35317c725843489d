"""Generation under memory: read the context once into the memory state, then decode in the final segment.

The context's whole segments go through the segment loop (`stm.segments.run_segments`); what is left of it
(at least one token) opens the final segment, and the new tokens are decoded there:

- with a key/value cache inside the final segment (`use_cache=True`, the default): each step feeds only
  the new token, its queries attending to the memory's cached keys/values, the segment's memory tokens and
  the segment's earlier tokens (`SegmentExtras.n_cached_prefix` / `prefix_start` keep the attention rule
  exactly that of the whole segment), so decoding does not recompute the prefix;
- without it, each step re-reads the final segment (the reference the cache is tested against).

When the final segment fills up, it is read once more with the memory's write tokens and pushed into the
memory state, and a new segment begins. No write tokens are used while decoding (they come after the
tokens and cannot change their logits).

Strategies: greedy (temperature 0), sampling (temperature, top-k, top-p), and beam search (`num_beams`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from stm.memory.base import Memory, SegmentExtras, State, select_rows


class SegmentDecoder:
    """Decoding state of a batch of rows: memory state, the final segment's tokens and its key/value cache.

    context_ids: (B, T) token ids, all rows of equal length (pad and batch rows of equal length, or decode
                 one row at a time).
    After construction `logits` (B, V) holds the next-token logits; `append(tokens)` adds one token per row
    and refreshes them.
    """

    def __init__(self, model: nn.Module, memory: Memory, context_ids: torch.Tensor, segment_len: int | None,
                 use_cache: bool = True):
        from stm.segments import run_segments

        B, T = context_ids.shape
        if T == 0:
            raise ValueError("generate needs a non-empty context")
        self.model, self.memory, self.use_cache = model, memory, use_cache
        self.segment_len = segment_len if (memory.segmented and segment_len is not None) else None
        n_read = ((T - 1) // self.segment_len) * self.segment_len if self.segment_len else 0
        self.state: State = memory.init_state(B, context_ids.device)
        if n_read:  # keep at least one context token for the final segment
            self.state = run_segments(model, memory, context_ids[:, :n_read], segment_len=self.segment_len,
                                      state=self.state).state
        self.tail = context_ids[:, n_read:]
        self.logits = self._open_segment()

    def _open_segment(self) -> torch.Tensor:
        """Read the final segment's tokens so far under the memory's extras (no write tokens)."""
        self.extras = replace(self.memory.prepare(self.state), suffix=None)
        out = self.model(self.tail, extras=self.extras)
        self.segment_kv = out.present_key_values if self.use_cache else None
        return out.logits[:, -1]

    def _cached_extras(self) -> SegmentExtras:
        """Extras for one new token: the memory's cache, then the segment so far, as past keys/values."""
        e = self.extras
        segment = self.segment_kv
        past = [(torch.cat([pk, sk.to(pk.dtype)], dim=2), torch.cat([pv, sv.to(pv.dtype)], dim=2))
                for (pk, pv), (sk, sv) in zip(e.past_key_values, segment)] if e.past_key_values else segment
        past_mask = e.past_mask
        if past_mask is not None:
            ones = torch.ones(past_mask.shape[0], segment[0][0].shape[2], dtype=torch.bool, device=past_mask.device)
            past_mask = torch.cat([past_mask.bool(), ones], dim=1)
        # everything else the memory supplied (window, sinks, layer memory) stays as it was
        return replace(e, prefix=None, suffix=None, past_key_values=past, past_mask=past_mask,
                       n_cached_prefix=e.n_prefix, prefix_start=e.n_past)

    @torch.no_grad()
    def append(self, tokens: torch.Tensor) -> torch.Tensor:
        """Add `tokens` (B,) to the final segment; returns (and keeps in `logits`) the next logits (B, V)."""
        self.tail = torch.cat([self.tail, tokens[:, None]], dim=1)
        seg = self.segment_len
        if seg is not None and self.tail.shape[1] > seg:  # the segment is full: into the memory with it
            self.state = self.memory.update(
                self.state, self.model(self.tail[:, :seg], extras=self.memory.prepare(self.state)))
            self.tail = self.tail[:, seg:]
            self.logits = self._open_segment()
        elif not self.use_cache:
            self.logits = self.model(self.tail, extras=self.extras).logits[:, -1]
        else:
            out = self.model(tokens[:, None], extras=self._cached_extras())
            self.segment_kv = [(torch.cat([sk, k], dim=2), torch.cat([sv, v], dim=2))
                               for (sk, sv), (k, v) in zip(self.segment_kv, out.present_key_values)]
            self.logits = out.logits[:, -1]
        return self.logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and repeat or reorder) rows: `rows` (B',) indexes the current rows (beam search)."""
        self.state = select_rows(self.state, rows)
        self.tail = self.tail.index_select(0, rows)
        self.logits = self.logits.index_select(0, rows)
        if self.segment_kv is not None:
            self.segment_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.segment_kv]
        self.extras = replace(self.memory.prepare(self.state), suffix=None)


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
    context_ids: torch.Tensor,
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
) -> torch.Tensor:
    """Continue `context_ids` (B, T), all rows of equal length, by up to `max_new_tokens` tokens.

    eos_token_id: one id or several; a row that produces one is finished (the token is kept).
    pad_token_id: fills a finished row's remaining positions (default: the first eos id, else 0).
    stop:         called with the new tokens so far (B, n); returns (B,) bool, True where a row is finished
                  (e.g. a stop string appeared); greedy and sampling only.
    num_beams:    > 1 runs beam search (deterministic; temperature/top-k/top-p are not used), scoring a
                  finished hypothesis by its summed log-probability / length ** length_penalty.
    Returns the new tokens (B, N), N <= max_new_tokens.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    eos = _eos_set(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if num_beams > 1:
        return _beam_search(model, memory, context_ids, segment_len, max_new_tokens, num_beams, length_penalty,
                            eos, pad, use_cache)
    B = context_ids.shape[0]
    if max_new_tokens == 0:
        return context_ids.new_empty(B, 0)
    decoder = SegmentDecoder(model, memory, context_ids, segment_len, use_cache)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=context_ids.device)
    finished = torch.zeros(B, dtype=torch.bool, device=context_ids.device)
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
        decoder.append(token)
    return torch.stack(new_tokens, dim=1)


def _beam_search(model, memory, context_ids, segment_len, max_new_tokens, num_beams, length_penalty, eos, pad,
                 use_cache) -> torch.Tensor:
    """Beam search per row: keep the `num_beams` best partial hypotheses; a hypothesis ending in an eos token
    is finished; a row is done when it has `num_beams` finished ones and no live beam can beat the best."""
    B, K, device = context_ids.shape[0], num_beams, context_ids.device
    if max_new_tokens == 0:
        return context_ids.new_empty(B, 0)
    decoder = SegmentDecoder(model, memory, context_ids, segment_len, use_cache)
    decoder.select(torch.arange(B, device=device).repeat_interleave(K))  # row b's beams are rows b*K .. b*K+K-1
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: expand only the first at step one
    sequences = context_ids.new_empty(B * K, 0)
    done: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    row_done = [False] * B

    def normalised(score: float, length: int) -> float:
        return score / max(length, 1) ** length_penalty

    for step in range(max_new_tokens):
        log_probs = torch.log_softmax(decoder.logits.float(), dim=-1)
        V = log_probs.shape[-1]
        candidates = (scores.view(-1, 1) + log_probs).view(B, K * V)
        top_scores, top_index = candidates.topk(min(2 * K, K * V), dim=-1)
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(B):
            chosen = []
            for score, index in zip(top_scores[b].tolist(), top_index[b].tolist()):
                beam, token = divmod(index, V)
                if score == float("-inf"):
                    break
                if token in eos and not row_done[b]:
                    done[b].append((normalised(score, step + 1), sequences[b * K + beam].tolist() + [token]))
                    continue
                chosen.append((b * K + beam, token, score))
                if len(chosen) == K:
                    break
            while len(chosen) < K:  # fewer live candidates than beams: fill with dead copies
                chosen.append((chosen[0][0] if chosen else b * K, pad, float("-inf")))
            best_live = max(s for _, _, s in chosen)
            if len(done[b]) >= K and max(d[0] for d in done[b]) >= normalised(best_live, step + 1):
                row_done[b] = True
            for row, token, score in chosen:
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        rows = torch.tensor(next_rows, device=device)
        tokens = torch.tensor(next_tokens, device=device)
        sequences = torch.cat([sequences.index_select(0, rows), tokens[:, None]], dim=1)
        scores = torch.tensor(next_scores, device=device).view(B, K)
        if all(row_done) or step == max_new_tokens - 1:
            break
        decoder.select(rows)
        decoder.append(tokens)

    best: list[list[int]] = []
    for b in range(B):
        hypotheses = list(done[b])
        if not row_done[b]:
            hypotheses += [(normalised(s, sequences.shape[1]), sequences[b * K + k].tolist())
                           for k, s in enumerate(scores[b].tolist()) if s != float("-inf")]
        best.append(max(hypotheses, key=lambda h: h[0])[1] if hypotheses else [])
    width = max((len(s) for s in best), default=0)
    out = torch.full((B, width), pad, dtype=torch.long, device=device)
    for b, seq in enumerate(best):
        out[b, :len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
    return out
