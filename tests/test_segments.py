"""The segment loop: none / full semantics, loss accounting, truncated BPTT, and generation."""

import pytest
import torch
import torch.nn.functional as F

from stm.constants import IGNORE_INDEX
from stm.loop.generation import generate
from stm.loop.segments import run_segments, segment_bounds
from stm.memory import FullAttention, Memory, NoMemory, SegmentExtras
from stm.models import Transformer


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(vocab_size=40, d_model=32, n_layers=2, n_heads=4).eval()


def stream(B, T, seed=3):
    return torch.randint(0, 40, (B, T), generator=torch.Generator().manual_seed(seed))


def test_segment_bounds():
    assert segment_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert segment_bounds(10, None) == [(0, 10)]
    assert segment_bounds(3, 8) == [(0, 3)]
    with pytest.raises(ValueError, match="segment_len"):
        segment_bounds(10, -2)


def test_no_memory_reads_segments_independently(model):
    x = stream(2, 24)
    run = run_segments(model, NoMemory(), x, segment_len=8, return_logits=True)
    for s in range(0, 24, 8):
        torch.testing.assert_close(run.logits[:, s:s + 8], model(x[:, s:s + 8]).logits)


def test_full_attention_reads_everything_at_once(model):
    x = stream(2, 24)
    run = run_segments(model, FullAttention(), x, segment_len=8, labels=x, return_logits=True)
    torch.testing.assert_close(run.logits, model(x).logits)
    ref = F.cross_entropy(model(x).logits.flatten(0, 1), x.flatten())
    torch.testing.assert_close(run.loss, ref)


def test_loss_counts_only_real_labels(model):
    x = stream(2, 16)
    labels = x.clone()
    labels[0, :5] = IGNORE_INDEX
    run = run_segments(model, NoMemory(), x, segment_len=8, labels=labels, return_logits=True)
    assert int(run.n_tokens) == 32 - 5
    keep = labels != IGNORE_INDEX
    ref = F.cross_entropy(run.logits[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(run.nll_sum, ref)
    assert (run.token_nll[0, :5] == 0).all()


class CarryMeanMemory(Memory):
    """A test mechanism: the next segment gets the previous segment's mean hidden state as one prefix token."""

    def init_state(self, batch_size, device):
        return torch.zeros(batch_size, 1, 32, device=device)

    def prepare(self, state):
        return SegmentExtras(prefix=state)

    def update(self, state, outputs):
        return outputs.hidden_states.mean(dim=1, keepdim=True)


def test_bptt_depth_cuts_the_graph():
    """The loss of segment 3 reaches the state that entered segment 1 only if no cut lies in between."""
    torch.manual_seed(0)
    model = Transformer(vocab_size=40, d_model=32, n_layers=1, n_heads=4)
    x = stream(1, 24)
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[:, 16:] = x[:, 16:]  # loss on segment 3 only
    for depth, reaches_first in ((None, True), (3, True), (2, False), (1, False)):
        state0 = torch.randn(1, 1, 32, requires_grad=True)
        run = run_segments(model, CarryMeanMemory(), x, segment_len=8, labels=labels, bptt_depth=depth,
                           state=state0)
        run.loss.backward()
        assert state0.grad is not None
        assert bool(state0.grad.abs().sum() > 0) == reaches_first, depth
        model.zero_grad()


def naive_greedy(model, context, n_new, segment_len=None):
    """Reference: recompute from scratch each step, seeing only the current segment (or everything)."""
    seq = context.clone()
    for _ in range(n_new):
        start = 0 if segment_len is None else ((seq.shape[1] - 1) // segment_len) * segment_len
        nxt = model(seq[:, start:]).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq[:, context.shape[1]:]


def test_generate_greedy_matches_reference(model):
    ctx = stream(2, 13)
    out = generate(model, FullAttention(), ctx, segment_len=4, max_new_tokens=9)
    torch.testing.assert_close(out, naive_greedy(model, ctx, 9))
    out = generate(model, NoMemory(), ctx, segment_len=4, max_new_tokens=9)
    torch.testing.assert_close(out, naive_greedy(model, ctx, 9, segment_len=4))


def test_generate_stops_at_eos_and_samples_reproducibly(model):
    ctx = stream(1, 5)
    first = generate(model, FullAttention(), ctx, segment_len=None, max_new_tokens=1)
    eos = int(first[0, 0])
    out = generate(model, FullAttention(), ctx, segment_len=None, max_new_tokens=10, eos_token_id=eos)
    assert out.shape == (1, 1)
    a = generate(model, NoMemory(), ctx, segment_len=4, max_new_tokens=8, temperature=1.0, top_k=5,
                 generator=torch.Generator().manual_seed(7))
    b = generate(model, NoMemory(), ctx, segment_len=4, max_new_tokens=8, temperature=1.0, top_k=5,
                 generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
