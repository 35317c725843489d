"""Beam search under memory: the `num_beams` best partial continuations per row, over `SegmentDecoder`'s rows."""

from __future__ import annotations

import torch

from stm.loop.decoder import SegmentDecoder, context_rows


def beam_search(model, memory, context_ids, segment_len, max_new_tokens, num_beams, length_penalty, eos, pad,
                use_cache, segment_overflow="push") -> torch.Tensor:
    """Beam search per row: keep the `num_beams` best partial hypotheses; a hypothesis ending in an eos token
    is finished; a row is done when it has `num_beams` finished ones and no live beam can beat the best.

    context_ids: (B, T) or B rows of any lengths, read as `generate` reads them; `eos`: list of eos ids; `pad`:
    fills the rows shorter than the longest. A finished hypothesis scores its summed log-probability /
    length ** length_penalty. Returns the best hypothesis per row, (B, N) with N <= max_new_tokens."""
    contexts = context_rows(context_ids)
    B, K, device = len(contexts), num_beams, contexts[0].device
    if max_new_tokens == 0:
        return torch.empty(B, 0, dtype=torch.long, device=device)
    decoder = SegmentDecoder(model, memory, contexts, segment_len, use_cache, segment_overflow)
    decoder.select(torch.arange(B, device=device).repeat_interleave(K))  # row b's beams are rows b*K .. b*K+K-1
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: expand only the first at step one
    sequences = torch.empty(B * K, 0, dtype=torch.long, device=device)
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
