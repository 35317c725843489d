"""Generation under memory: the key/value cache inside the final segment, beam search, sampling filters."""

import itertools

import pytest
import torch
from conftest import memory_names, small_memory

from stm.generation import SegmentDecoder, generate, sample_next
from stm.memory import (
    AssociativeMemory,
    ComposedMemory,
    FullAttention,
    RecurrentMemoryTokens,
)
from stm.models import Transformer

# every mechanism of conf/memory and every pair that composes (memory tokens, caches with sinks, windows)
SIZES = dict(num_memory_tokens=3, mem_len=6, window=5, sink_tokens=1, key_dim=8)
MECHANISMS = memory_names(**SIZES)


def make(name, seed=0, vocab=50):
    torch.manual_seed(seed)
    model = Transformer(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, tie_embeddings=False).eval()
    memory = small_memory(name, **SIZES)
    memory.bind(model)
    if isinstance(memory, (RecurrentMemoryTokens, AssociativeMemory, ComposedMemory)):  # non-trivial memory
        for name, p in memory.named_parameters():  # memory tokens at scale 1, associative projections smaller
            torch.nn.init.normal_(p, std=1.0 if name.endswith("initial_memory") else 0.3)
    return model, memory.eval()


def context(B=2, T=19, vocab=50, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_cached_decoding_gives_the_logits_of_rereading_the_segment(name):
    """Step by step, the cached decoder's logits equal those of re-reading the whole final segment; the
    decoding crosses two segment borders (segments of 8, 19 context tokens, 14 new tokens)."""
    model, memory = make(name)
    ctx = context()
    cached = SegmentDecoder(model, memory, ctx, segment_len=8, use_cache=True)
    plain = SegmentDecoder(model, memory, ctx, segment_len=8, use_cache=False)
    torch.testing.assert_close(cached.logits, plain.logits)
    for _ in range(14):
        token = plain.logits.argmax(-1)
        torch.testing.assert_close(cached.append(token), plain.append(token), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_greedy_generation_with_cache_equals_without(name):
    model, memory = make(name, seed=2)
    ctx = context(T=21, seed=4)
    with_cache = generate(model, memory, ctx, segment_len=8, max_new_tokens=20)
    without = generate(model, memory, ctx, segment_len=8, max_new_tokens=20, use_cache=False)
    assert with_cache.shape == (2, 20)
    assert torch.equal(with_cache, without)


def test_cached_decoding_feeds_one_token_per_step():
    """What makes the cache worth having: after the first read, each step runs the model on 1 token."""
    model, memory = make("xl")
    seen = []
    hook = model.embed.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    decoder = SegmentDecoder(model, memory, context(T=12), segment_len=8, use_cache=True)
    seen.clear()
    for _ in range(3):
        decoder.append(decoder.logits.argmax(-1))
    hook.remove()
    assert seen == [1, 1, 1]


def test_beam_search_with_as_many_beams_as_sequences_finds_the_best_sequence():
    """With beams covering every 2-token continuation and no length penalty, beam search returns the
    continuation of highest total log-probability, found here by enumerating all of them."""
    vocab = 7
    model, memory = make("xl", vocab=vocab)
    ctx = context(B=1, T=10, vocab=vocab)
    best, best_score = None, float("-inf")
    for a, b in itertools.product(range(vocab), repeat=2):
        seq = torch.cat([ctx, torch.tensor([[a, b]])], dim=1)
        logp = torch.log_softmax(model(seq).logits[0, -3:-1].float(), dim=-1)
        score = float((logp[0, a] + logp[1, b]).detach())
        if score > best_score:
            best, best_score = [a, b], score
    out = generate(model, FullAttention(), ctx, segment_len=None, max_new_tokens=2, num_beams=vocab * vocab,
                   length_penalty=0.0)
    assert out.tolist() == [best]


def test_beam_search_one_beam_is_greedy_and_respects_eos():
    model, memory = make("swa", seed=3)
    ctx = context(B=2, T=15, seed=5)
    greedy = generate(model, memory, ctx, segment_len=8, max_new_tokens=10)
    # two beams are a different search, but every returned row must be a real continuation; one beam = greedy
    assert torch.equal(generate(model, memory, ctx, segment_len=8, max_new_tokens=10, num_beams=1), greedy)
    eos = int(greedy[0, 2])
    out = generate(model, memory, ctx[:1], segment_len=8, max_new_tokens=10, num_beams=3, eos_token_id=eos)
    row = out[0].tolist()
    assert eos not in row or all(t == eos for t in row[row.index(eos):])  # finished at eos, padded with it
    beams = generate(model, memory, ctx, segment_len=8, max_new_tokens=6, num_beams=3)
    assert torch.equal(beams, generate(model, memory, ctx, segment_len=8, max_new_tokens=6, num_beams=3,
                                       use_cache=False))


def test_stop_callback_and_padding_after_eos():
    model, memory = make("none")
    ctx = context(B=2, T=9)
    free = generate(model, memory, ctx, segment_len=8, max_new_tokens=8)
    row = free[0].tolist()
    j = next(i for i in range(1, 8) if row[i] not in row[:i])  # a token first produced at step j > 0
    out = generate(model, memory, ctx, segment_len=8, max_new_tokens=8, eos_token_id=row[j], pad_token_id=49)
    assert out[0].tolist() == row[:j + 1] + [49] * (7 - j)
    # stop after 3 tokens in every row
    stopped = generate(model, memory, ctx, segment_len=8, max_new_tokens=8,
                       stop=lambda new: torch.full((new.shape[0],), new.shape[1] >= 3))
    assert torch.equal(stopped, free[:, :3])


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, 1.0, top_p=0.75, generator=torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3: the two most likely tokens
    draws = {int(sample_next(logits, 1.0, top_p=0.4, generator=torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {0}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=1.5)
