"""The memory mechanisms are the ones of the papers: each property compares numbers on fresh random inputs."""

import pytest
import torch
from conftest import memory_names, small_memory

from stm.constants import IGNORE_INDEX
from stm.loop.generation import generate
from stm.loop.segments import run_segments
from stm.memory import (
    ComposedMemory,
    FullAttention,
    NoMemory,
    RecurrentMemoryTokens,
    SegmentExtras,
    SegmentRecurrence,
    SlidingWindow,
)
from stm.models import Transformer

V, D = 50, 32


def make_model(seed=0, n_layers=2, **kw):
    torch.manual_seed(seed)
    return Transformer(vocab_size=V, d_model=D, n_layers=n_layers, n_heads=4, **kw).eval()


def fresh_stream(B=2, T=40):
    return torch.randint(0, V, (B, T))  # fresh random inputs on every run


def logits_of(model, memory, x, segment_len, **kw):
    return run_segments(model, memory, x, segment_len=segment_len, return_logits=True, **kw).logits


def bound(memory, model):
    memory.bind(model)
    return memory


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


# --- sliding window ---------------------------------------------------------------------------------------

def test_swa_with_window_longer_than_stream_equals_full():
    model, x = make_model(), fresh_stream()
    close(logits_of(model, SlidingWindow(window=40), x, 8), model(x).logits)
    close(logits_of(model, SlidingWindow(window=1000), x, 8), model(x).logits)


@pytest.mark.parametrize("window,segment_len", [(5, 8), (8, 8), (13, 8), (3, 16)])
def test_swa_streaming_equals_local_attention_over_the_whole_stream(window, segment_len):
    model, x = make_model(n_layers=3), fresh_stream()
    whole = model(x, extras=SegmentExtras(window=window)).logits
    close(logits_of(model, SlidingWindow(window=window), x, segment_len), whole)


def test_swa_is_local():
    """A token further back than the window reaches position i only through the layers (window x layers)."""
    model, x = make_model(n_layers=1), fresh_stream(B=1)
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % V
    a, b = logits_of(model, SlidingWindow(window=6), x, 8), logits_of(model, SlidingWindow(window=6), y, 8)
    assert not torch.allclose(a[:, 5], b[:, 5])
    close(a[:, 6:], b[:, 6:])  # one layer: position 6 and later cannot see position 0


def test_swa_gradients_equal_local_attention_training():
    """With the cache kept in the graph, training over segments is training local attention on the chunk."""
    x = fresh_stream()
    grads = []
    for streamed in (True, False):
        model = make_model().train()
        if streamed:
            loss = run_segments(model, SlidingWindow(window=6), x, segment_len=8, labels=x).loss
        else:
            loss = run_segments(model, NoMemory(), x, segment_len=None, labels=x, return_logits=True).loss
            logits = model(x, extras=SegmentExtras(window=6)).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
        loss.backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    close(grads[0], grads[1])


@pytest.mark.slow
def test_swa_flex_path_equals_sdpa_path_on_cpu():
    """flex_attention (block-sparse; forward compiles on CPU) gives the numbers of the dense SDPA path."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    x = fresh_stream(B=2, T=64)
    sdpa = make_model(attention="sdpa")
    flex = make_model(attention="flex")
    with torch.no_grad():
        for memory_factory in (lambda: SlidingWindow(window=24), lambda: SegmentRecurrence(mem_len=32)):
            close(logits_of(flex, memory_factory(), x, 32), logits_of(sdpa, memory_factory(), x, 32))
        mask = torch.ones_like(x)
        mask[1, 50:] = 0
        a = flex(x, attention_mask=mask, extras=SegmentExtras(window=10)).logits
        b = sdpa(x, attention_mask=mask, extras=SegmentExtras(window=10)).logits
        close(a[mask.bool()], b[mask.bool()])


def test_flex_refuses_cpu_training_with_a_clear_error():
    model = make_model(attention="flex").train()
    x = fresh_stream(B=1, T=16)
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        model(x, extras=SegmentExtras(window=4))


# --- segment recurrence -----------------------------------------------------------------------------------

def test_xl_with_memory_covering_history_equals_full():
    model, x = make_model(n_layers=3), fresh_stream()
    close(logits_of(model, SegmentRecurrence(mem_len=40), x, 8), model(x).logits)


def test_xl_result_does_not_depend_on_stream_position():
    """Positions are re-based per segment: the same 2 segments give the same logits after any history."""
    # with one layer the cached keys/values of the previous segment depend on its tokens only, so the last
    # segment's logits are equal after 40 tokens of history and after 8, unless positions were absolute
    model = make_model(n_layers=1)
    x = fresh_stream(B=1, T=48)
    after_long = logits_of(model, SegmentRecurrence(mem_len=8), x, 8)[:, -8:]
    after_short = logits_of(model, SegmentRecurrence(mem_len=8), x[:, -16:], 8)[:, -8:]
    close(after_long, after_short)


def test_xl_cache_is_bounded_and_detached():
    model = make_model().train()
    x = fresh_stream(T=80)
    run = run_segments(model, SegmentRecurrence(mem_len=12, sink_tokens=2), x, segment_len=8, labels=x)
    assert run.state.length == 14 and run.state.n_sink == 2
    assert all(not k.requires_grad for k in run.state.keys)


def test_xl_sink_tokens_keep_the_stream_start():
    model = make_model(n_layers=1)
    x = fresh_stream(B=1, T=32)
    mem = SegmentRecurrence(mem_len=8, sink_tokens=3)
    state = run_segments(model, mem, x, segment_len=8).state
    first = model(x[:, :8]).present_key_values[0][0]
    close(state.keys[0][:, :, :3], first[:, :, :3])


# --- recurrent memory tokens ------------------------------------------------------------------------------

def test_rmt_with_zero_tokens_equals_none():
    model, x = make_model(), fresh_stream()
    close(logits_of(model, bound(RecurrentMemoryTokens(num_memory_tokens=0), model), x, 8),
          logits_of(model, NoMemory(), x, 8))


def test_rmt_memory_carries_information_across_segments():
    model, x = make_model(), fresh_stream(B=1, T=24)
    rmt = bound(RecurrentMemoryTokens(num_memory_tokens=4), model)
    y = x.clone()
    y[0, 2] = (y[0, 2] + 1) % V  # change a token of segment 1 only
    a, b = logits_of(model, rmt, x, 8), logits_of(model, rmt, y, 8)
    assert not torch.allclose(a[:, 16:], b[:, 16:])  # segment 3 sees it through two memory updates
    run = run_segments(model, rmt, x, segment_len=8)
    assert run.state.shape == (1, 4, D)


def segment_input_grads(model, memory, x, segment_len, loss_segment, bptt_depth):
    """Gradient norm of the loss of one segment w.r.t. each segment's input embeddings."""
    captured = []

    def keep(module, args, output):
        output.retain_grad()
        captured.append(output)

    hook = model.embed.register_forward_hook(keep)
    labels = torch.full_like(x, IGNORE_INDEX)
    s = loss_segment * segment_len
    labels[:, s:s + segment_len] = x[:, s:s + segment_len]
    run = run_segments(model, memory, x, segment_len=segment_len, labels=labels, bptt_depth=bptt_depth)
    run.loss.backward()
    hook.remove()
    return [float(e.grad.abs().sum()) if e.grad is not None else 0.0 for e in captured]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rmt_bptt_depth_cuts_gradients_exactly(k):
    """With bptt_depth=k the loss of segment t (the last of a block of k) has gradient on the inputs of
    segment t-k+1 and exactly zero on segment t-k and before: the truncation really happens."""
    model = make_model().train()
    rmt = bound(RecurrentMemoryTokens(num_memory_tokens=4), model)
    n = 2 * k + 1
    x = fresh_stream(B=1, T=8 * n)
    t = 2 * k - 1  # the last segment of the second block
    grads = segment_input_grads(model, rmt, x, 8, t, bptt_depth=k)
    assert grads[t - k + 1] > 0
    assert all(g == 0.0 for g in grads[:t - k + 1])
    assert all(g == 0.0 for g in grads[t + 1:])  # later segments never influence an earlier loss
    full = segment_input_grads(model, rmt, x, 8, t, bptt_depth=None)
    assert all(g > 0 for g in full[:t + 1])  # without truncation every earlier segment is reached


def test_rmt_generation_drops_write_tokens_until_a_segment_completes():
    model = make_model()
    rmt = bound(RecurrentMemoryTokens(num_memory_tokens=4), model)
    ctx = fresh_stream(B=2, T=13)
    out = generate(model, rmt, ctx, segment_len=8, max_new_tokens=10)
    # reference: read the whole segments, then decode step by step recomputing the partial segment
    state = run_segments(model, rmt, ctx[:, :8], segment_len=8).state
    seq = ctx
    for _ in range(10):
        start = ((seq.shape[1] - 1) // 8) * 8
        logits = model(seq[:, start:], extras=SegmentExtras(prefix=state)).logits[:, -1]  # read tokens only
        seq = torch.cat([seq, logits.argmax(-1)[:, None]], 1)
        if seq.shape[1] - start > 8:  # the segment is complete: write it into the memory
            state = run_segments(model, rmt, seq[:, start:start + 8], segment_len=8, state=state).state
    torch.testing.assert_close(out, seq[:, 13:])


# --- all mechanisms ---------------------------------------------------------------------------------------

# every mechanism of conf/memory and every pair that composes, sized to matter in streams of 32-40 tokens
SIZES = dict(num_memory_tokens=3, mem_len=10, window=7, key_dim=8)
MECHANISMS = memory_names(**SIZES)


def mechanism(name, model):
    return bound(small_memory(name, **SIZES), model)


@pytest.mark.parametrize("name", [n for n in MECHANISMS if n != "full"])
def test_one_lane_equals_segment_calls_with_state_passed_by_hand(name):
    model, x = make_model(), fresh_stream(T=40)
    memory = mechanism(name, model)
    whole = run_segments(model, memory, x, segment_len=8, labels=x, return_logits=True)
    state, parts, nll = None, [], 0.0
    for s in range(0, 40, 8):
        run = run_segments(model, memory, x[:, s:s + 8], segment_len=8, labels=x[:, s:s + 8], state=state,
                           return_logits=True)
        state, nll = run.state, nll + run.nll_sum
        parts.append(run.logits)
    close(whole.logits, torch.cat(parts, dim=1))
    close(whole.nll_sum, nll)


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_checkpointed_segments_give_the_same_gradients(name):
    x = fresh_stream(T=32)
    grads = []
    for ckpt in (False, True):
        model = make_model().train()
        memory = mechanism(name, model)
        run_segments(model, memory, x, segment_len=8, labels=x, checkpoint_segments=ckpt).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    close(grads[0], grads[1])


def test_composed_rmt_with_zero_tokens_equals_the_cache_alone():
    model, x = make_model(), fresh_stream()
    for cache in (lambda: SegmentRecurrence(mem_len=12), lambda: SlidingWindow(window=6)):
        composed = bound(ComposedMemory([RecurrentMemoryTokens(num_memory_tokens=0), cache()]), model)
        close(logits_of(model, composed, x, 8), logits_of(model, cache(), x, 8))


def test_composition_errors_are_clear():
    with pytest.raises(ValueError, match="compose at most one of them"):
        ComposedMemory([SegmentRecurrence(8), SlidingWindow(8)])
    with pytest.raises(ValueError, match="composes with nothing"):
        ComposedMemory([FullAttention(), SlidingWindow(8)])
    with pytest.raises(ValueError, match="memory.swa.window"):
        SlidingWindow(window=0)
    with pytest.raises(ValueError, match="memory.rmt.placement"):
        RecurrentMemoryTokens(placement="middle")


@pytest.mark.parametrize("name", [n for n in MECHANISMS if n != "full"])
def test_state_is_flat_in_stream_length(name):
    """Inference state does not grow with the stream: the same size after 4 and after 40 segments."""
    from stm.memory.base import map_state

    model = make_model()
    memory = mechanism(name, model)

    def state_numel(T):
        state = run_segments(model, memory, fresh_stream(B=1, T=T), segment_len=8).state
        sizes = []
        map_state(state, lambda t: sizes.append(t.numel()))
        return sum(sizes)

    with torch.no_grad():
        assert state_numel(32) == state_numel(320)


def test_generation_with_xl_covering_history_equals_full():
    model, ctx = make_model(), fresh_stream(B=2, T=21)
    a = generate(model, SegmentRecurrence(mem_len=100), ctx, segment_len=8, max_new_tokens=12)
    b = generate(model, FullAttention(), ctx, segment_len=8, max_new_tokens=12)
    torch.testing.assert_close(a, b)
    c = generate(model, SlidingWindow(window=100), ctx, segment_len=8, max_new_tokens=12)
    torch.testing.assert_close(c, b)


@pytest.mark.parametrize("name", [n for n in MECHANISMS if n != "full"])
def test_state_survives_a_checkpoint(name, tmp_path):
    """A carried state stored in a checkpoint (plain containers, weights_only loading) continues identically."""
    from stm.memory.base import state_from_plain, state_to_plain

    model, x = make_model(), fresh_stream(T=32)
    memory = mechanism(name, model)
    first = run_segments(model, memory, x[:, :16], segment_len=8)
    torch.save({"state": state_to_plain(first.state)}, tmp_path / "s.pt")
    restored = state_from_plain(torch.load(tmp_path / "s.pt", weights_only=True)["state"])
    a = run_segments(model, memory, x[:, 16:], segment_len=8, state=first.state, return_logits=True).logits
    b = run_segments(model, memory, x[:, 16:], segment_len=8, state=restored, return_logits=True).logits
    close(a, b)
