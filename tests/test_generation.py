"""Generation under memory: the key/value cache inside the final segment, beam search, sampling filters."""

import itertools

import pytest
import torch
from conftest import memory_names, save_tiny_llama, small_memory

from stm.loop.decoder import SegmentDecoder
from stm.loop.generation import generate, sample_next
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
    return model, bound_memory(name, model)


def bound_memory(name, model):
    """Mechanism `name` bound to `model`, its parameters large enough to change what the model says."""
    memory = small_memory(name, **SIZES)
    memory.bind(model)
    if isinstance(memory, (RecurrentMemoryTokens, AssociativeMemory, ComposedMemory)):  # non-trivial memory
        for name, p in memory.named_parameters():  # memory tokens at scale 1, associative projections smaller
            torch.nn.init.normal_(p, std=1.0 if name.endswith("initial_memory") else 0.3)
    return memory.eval()


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


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_extending_the_final_segment_decodes_it_as_one_longer_segment(name):
    """segment_overflow="extend": the context's whole segments go into the memory, then the final segment (7
    context tokens of a segment of 8, so decoding crosses where a boundary would be) grows by every new token and
    is never pushed: greedy tokens equal a reference that re-reads the growing final segment under the memory
    state of the whole segments, with and without the cache, alone and in a batch of rows of other lengths."""
    from dataclasses import replace

    from stm.loop.segments import run_segments

    model, memory = make(name, seed=3)
    ctx = context(T=23, seed=5)
    if memory.segmented:
        with torch.no_grad():
            state = run_segments(model, memory, ctx[:, :16], segment_len=8).state
            tail, want = ctx[:, 16:], []
            for _ in range(12):
                logits = model(tail, extras=replace(memory.prepare(state), suffix=None)).logits[:, -1]
                want.append(logits.argmax(-1))
                tail = torch.cat([tail, want[-1][:, None]], dim=1)
        want = torch.stack(want, dim=1)
    else:  # full attention reads the context as one segment: nothing to push, the option changes nothing
        want = generate(model, memory, ctx, segment_len=8, max_new_tokens=12)
    got = generate(model, memory, ctx, segment_len=8, max_new_tokens=12, segment_overflow="extend")
    assert torch.equal(got, want)
    assert torch.equal(generate(model, memory, ctx, segment_len=8, max_new_tokens=12, use_cache=False,
                                segment_overflow="extend"), want)
    together, alone, _, _ = together_and_alone(model, memory, rows_of(), max_new_tokens=10,
                                               segment_overflow="extend")
    assert together == alone


def test_pushing_and_extending_differ_only_once_a_boundary_is_crossed():
    """rmt: while the final segment has room both give the same tokens; once decoding fills it, "push" goes on in
    a new segment that sees only the memory and "extend" keeps the context's last tokens in view, so they part."""
    model, memory = make("rmt", seed=3)
    ctx = context(T=20, seed=5)  # 4 context tokens in the final segment: room for 4 more
    push = generate(model, memory, ctx, segment_len=8, max_new_tokens=12)
    extend = generate(model, memory, ctx, segment_len=8, max_new_tokens=12, segment_overflow="extend")
    assert torch.equal(push[:, :5], extend[:, :5])  # the 5th token is predicted from a full segment in both
    assert not torch.equal(push, extend)
    with pytest.raises(ValueError, match="segment_overflow must be one of"):
        generate(model, memory, ctx, segment_len=8, max_new_tokens=2, segment_overflow="grow")


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


# --- batches of rows of different lengths -----------------------------------------------------------------------

# with segments of 8: 0 to 3 whole segments read before decoding, final segments of 1 to 8 tokens; 14 new tokens
# cross one or two segment borders, at a different step in each row
LENGTHS = (19, 5, 12, 27, 8, 16, 1)
# mechanisms whose attention rule depends only on distances: their decoding steps batch every row at once
POSITION_FREE = ("none", "full", "xl", "rmt", "armt", "rmt+xl", "armt+xl")


def rows_of(lengths=LENGTHS, vocab=50, seed=7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def one_at_a_time(model, memory, rows, **kwargs) -> list[list[int]]:
    return [generate(model, memory, row[None], segment_len=8, **kwargs)[0].tolist() for row in rows]


def together_and_alone(model, memory, rows, **kwargs) -> tuple[list[list[int]], list[list[int]], list[int], int]:
    """The rows generated together and one at a time; the batch sizes of the forward passes together, and how many
    passes one at a time took."""
    calls = []
    hook = model.embed.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    alone = one_at_a_time(model, memory, rows, **kwargs)
    n_alone = len(calls)
    calls.clear()
    together = generate(model, memory, rows, segment_len=8, **kwargs).tolist()
    hook.remove()
    return together, alone, calls, n_alone


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_batched_generation_gives_the_token_ids_of_one_row_at_a_time(name):
    """Rows of 7 different lengths generated together give exactly the tokens each gives alone (greedy, with the
    key/value cache), and the batch runs in fewer forward passes: for mechanisms whose attention depends only on
    distances, less than half of one at a time's."""
    model, memory = make(name, seed=4)
    together, alone, calls, n_alone = together_and_alone(model, memory, rows_of(), max_new_tokens=14)
    assert len(together) == len(LENGTHS) and {len(row) for row in together} == {14}
    assert together == alone
    assert len(calls) < (n_alone / 2 if name in POSITION_FREE else n_alone), (len(calls), n_alone)
    assert max(calls) > 1  # rows did share forward passes


@pytest.mark.parametrize("name", ["none", "xl", "swa", "rmt", "armt", "armt+xl", "rmt+swa"])
def test_batched_generation_with_eos_stops_each_row_on_its_own(name):
    """A row that produces eos stops there (the rest is padding) while the others go on, as each does alone."""
    model, memory = make(name, seed=5)
    rows = rows_of(seed=8)
    free = one_at_a_time(model, memory, rows, max_new_tokens=12)
    eos = free[0][3]
    alone = one_at_a_time(model, memory, rows, max_new_tokens=12, eos_token_id=eos)
    assert len({len(a) for a in alone}) > 1, "the rows should finish at different steps"
    together = generate(model, memory, rows, segment_len=8, max_new_tokens=12, eos_token_id=eos, pad_token_id=49)
    for got, want in zip(together.tolist(), alone):
        assert got[:len(want)] == want and set(got[len(want):]) <= {49}


@pytest.mark.parametrize("name", ["xl", "swa", "rmt", "armt+xl"])
def test_batched_beam_search_and_rereading_equal_one_row_at_a_time(name):
    """Beam search and decoding without the cache (re-reading the final segment) batch the rows too."""
    model, memory = make(name, seed=6)
    rows = rows_of((13, 4, 21, 9))
    for kwargs in ({"num_beams": 3, "max_new_tokens": 6}, {"use_cache": False, "max_new_tokens": 10}):
        alone = one_at_a_time(model, memory, rows, **kwargs)
        together = generate(model, memory, rows, segment_len=8, **kwargs)
        assert [row[:len(a)] for row, a in zip(together.tolist(), alone)] == alone, kwargs


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random Llama (rotary, grouped-query attention) through stm's Hugging Face adapter."""
    from stm.models.hf import HFCausalLM

    return HFCausalLM(str(save_tiny_llama(tmp_path_factory.mktemp("llama"), vocab_size=50))).eval()


@pytest.mark.parametrize("name", ["none", "xl", "rmt", "armt+xl"])
def test_batched_generation_on_a_hugging_face_model(hf_llama, name):
    """The same on a Hugging Face Llama, whose rotary positions come from position ids: left-padded rows give
    the token ids of each row alone."""
    torch.manual_seed(0)
    memory = bound_memory(name, hf_llama)
    rows = rows_of()
    alone = one_at_a_time(hf_llama, memory, rows, max_new_tokens=12)
    assert generate(hf_llama, memory, rows, segment_len=8, max_new_tokens=12).tolist() == alone


def test_batched_generation_under_a_window_without_sinks_pads_the_rows():
    """A sliding window without sinks depends only on distances: the rows are left-padded into every step (fewer
    than half of one at a time's forward passes) and give each row's own tokens."""
    model, _ = make("none", seed=4)
    memory = small_memory("swa", window=5, sink_tokens=0).eval()
    together, alone, calls, n_alone = together_and_alone(model, memory, rows_of(seed=9), max_new_tokens=14)
    assert together == alone
    assert len(calls) < n_alone / 2, (len(calls), n_alone)
