"""Full attention at long context without the memory it does not need, and with the same numbers.

When no one reads a segment's keys/values (memory=full reads everything in one segment; memory=none keeps
nothing), the backbones free each layer's after the layer (`keep_key_values=False`); without autograd stm's
Transformer rotates, activates and adds in place; the Hugging Face wrapper keeps only the last hidden state.
Every path must give the bits it gave before: the functional path with gradients is the reference (it is the
code as it was), and keys/values kept or not must not change a logit. The memory saved is measured (live tensor
bytes), not assumed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

from stm.loop.decoder import SegmentDecoder
from stm.loop.segments import reads_segment_outputs, run_segments
from stm.memory import (
    AssociativeMemory,
    ComposedMemory,
    FullAttention,
    NoMemory,
    RecurrentMemoryTokens,
    SegmentRecurrence,
    SlidingWindow,
)
from stm.memory.base import SegmentExtras
from stm.models import Transformer
from stm.models.hf import HFCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory_meter import LiveTensorBytes  # noqa: E402

VOCAB = 300


def mechanisms():
    return {"none": NoMemory(), "full": FullAttention(), "xl": SegmentRecurrence(mem_len=12, sink_tokens=2),
            "swa": SlidingWindow(window=5, sink_tokens=1), "rmt": RecurrentMemoryTokens(num_memory_tokens=3),
            "armt": AssociativeMemory(num_memory_tokens=3, key_dim=8, nu=2, layers=None),
            "rmt+swa": ComposedMemory([RecurrentMemoryTokens(num_memory_tokens=2), SlidingWindow(window=4)])}


@pytest.fixture(scope="module", params=["stm", "hf-sdpa", "hf-eager"])
def backbone(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "stm":
        return Transformer(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, attention="sdpa").eval()
    folder = save_tiny_llama(tmp_path_factory.mktemp("llama"), vocab_size=VOCAB)
    return HFCausalLM(str(folder), attn_implementation=request.param.split("-")[1]).eval()


def ids(B=2, T=29, seed=1):
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def extras_cases(model, x):
    """Extras of every kind a segment may get: none, a cache with padding, memory tokens, a window with a sink."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        past = [(k[:, :, :10].clone(), v[:, :, :10].clone()) for k, v in model(x).present_key_values]
    cases = {"plain": (x, None, SegmentExtras())}
    mask = torch.ones_like(x[:, 10:])
    mask[1, -4:] = 0
    cases["cache+tokens+window"] = (x[:, 10:], mask, SegmentExtras(
        past_key_values=past, prefix=torch.randn(2, 2, model.d_model, generator=g),
        suffix=torch.randn(2, 3, model.d_model, generator=g), window=6, n_sink=1))
    if isinstance(model, Transformer):
        cases["banded window"] = (x, None, SegmentExtras(window=4))
    return cases


def read(model, case, grad: bool, keep: bool, logits_to_keep=0):
    x, mask, extras = case
    with torch.set_grad_enabled(grad):
        out = model(x, attention_mask=mask, extras=extras, keep_key_values=keep, logits_to_keep=logits_to_keep)
    return out


def same(a, b):
    assert a.shape == b.shape, f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    assert torch.equal(a, b), f"differ by up to {(a - b).abs().max()}"


def test_keys_values_freed_or_kept_give_the_same_bits(backbone):
    """keep_key_values on/off, with and without gradients: equal logits and hidden states, bit for bit; the kept
    keys/values (copied out of the fused projection without gradients) equal the views kept with them."""
    for name, case in extras_cases(backbone, ids()).items():
        reference = read(backbone, case, grad=True, keep=True)  # the functional path: the code as it was
        for grad in (False, True):
            for keep in (False, True):
                out = read(backbone, case, grad, keep)
                same(out.logits.detach(), reference.logits.detach())
                same(out.hidden_states.detach(), reference.hidden_states.detach())
                assert len(out.present_key_values) == (backbone.n_layers if keep else 0), name
                for (k, v), (rk, rv) in zip(out.present_key_values, reference.present_key_values):
                    same(k.detach(), rk.detach())
                    same(v.detach(), rv.detach())


@pytest.mark.parametrize("name", list(mechanisms()))
def test_every_mechanism_reads_the_same_without_gradients_as_with(backbone, name):
    """run_segments under each memory: the logits and per-token NLL without autograd (in place, keys/values freed
    where no one reads them) equal those with it (the functional path), bit for bit."""
    x = ids()
    labels = x.clone()
    labels[:, :3] = -100
    runs = []
    for grad in (True, False):
        torch.manual_seed(3)
        memory = mechanisms()[name]
        memory.bind(backbone)
        with torch.set_grad_enabled(grad):
            runs.append(run_segments(backbone, memory, x, segment_len=8, labels=labels, return_logits=True))
    same(runs[0].logits.detach(), runs[1].logits)
    same(runs[0].token_nll.detach(), runs[1].token_nll)


def test_only_memories_that_read_outputs_keep_keys_values():
    assert {name: reads_segment_outputs(m) for name, m in mechanisms().items()} == {
        "none": False, "full": False, "xl": True, "swa": True, "rmt": True, "armt": True, "rmt+swa": True}


def test_last_logits_alone_equal_the_last_of_all(backbone):
    """logits_to_keep=1 (the context read before decoding) gives the last position's logits of the full
    computation, with and without memory tokens and a cache: the same hidden states, bit for bit, and the same
    logits up to rounding (the lm head's matrix product over 2 rows instead of 2 x 29 may sum in another order)."""
    for case in extras_cases(backbone, ids()).values():
        with torch.no_grad():
            every = read(backbone, case, grad=False, keep=True)
            last = read(backbone, case, grad=False, keep=True, logits_to_keep=1)
        assert last.logits.shape == (2, 1, every.logits.shape[-1])
        same(last.hidden_states, every.hidden_states)
        torch.testing.assert_close(last.logits, every.logits[:, -1:], rtol=1e-6, atol=1e-6)


class Recording(torch.nn.Module):
    """A backbone passed through unchanged, recording the logits shape and keys/values of each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids, **kwargs)
        self.calls.append((input_ids.shape[1], tuple(out.logits.shape), len(out.present_key_values)))
        return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_reads_the_context_for_its_last_logits_only(backbone, use_cache):
    """Under full attention the context is read in one call that computes the last position's logits alone and
    keeps the keys/values only for the cache; the next logits equal the last of a full read."""
    x = ids(B=1, T=40)
    recording = Recording(backbone)
    with torch.no_grad():
        decoder = SegmentDecoder(recording, FullAttention(), x, segment_len=8, use_cache=use_cache)
        every = backbone(x).logits
    assert recording.calls == [(40, (1, 1, every.shape[-1]), backbone.n_layers if use_cache else 0)]
    torch.testing.assert_close(decoder.logits, every[:, -1], rtol=1e-6, atol=1e-6)


def live_peak(fn) -> int:
    with torch.no_grad():
        fn()  # warm-up: one-time allocations and the counting mode's first use
        with LiveTensorBytes() as live:
            out = fn()
            del out
    return live.peak


def test_live_tensor_bytes_counts_what_is_alive_at_once():
    base = torch.ones(1000)  # before the block: not counted, nor its views
    with LiveTensorBytes() as live:
        view = base[:10]
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 4000 more: 8000 alive
        del a
        c = b + 1  # 8000 again
        del b, c
        d = torch.ones(500, dtype=torch.float64)  # 4000
    assert (live.peak, live.current, live.n_storages) == (8000, 4000, 4) and view.shape == (10,)
    del d
    assert live.current == 0


def test_full_attention_reads_without_keeping_keys_values(backbone):
    """The segment loop asks for keys/values only where the memory reads them: not under full or none."""
    recording = Recording(backbone)
    with torch.no_grad():
        for memory in (FullAttention(), NoMemory(), SegmentRecurrence(mem_len=8)):
            run_segments(recording, memory, ids(), segment_len=16)
    n = backbone.n_layers
    assert [kv for _, _, kv in recording.calls] == [0, 0, 0, n, n]


def test_freed_keys_values_lower_the_measured_peak():
    """A 1,024-token read in one segment (stm's transformer, no gradients): the peak live tensor bytes, measured,
    are below those of the same read keeping every layer's keys/values, by at least what those take (n_layers x
    2 x T x D floats)."""
    torch.manual_seed(0)
    T, D, n_layers = 1024, 64, 4
    model = Transformer(vocab_size=VOCAB, d_model=D, n_layers=n_layers, n_heads=4, attention="sdpa").eval()
    x = ids(B=1, T=T)
    freed = live_peak(lambda: model(x, keep_key_values=False).logits)
    kept = live_peak(lambda: model(x, keep_key_values=True).logits)
    assert kept - freed >= n_layers * 2 * T * D * 4, (kept, freed)


def test_hugging_face_full_attention_keeps_neither_cache_nor_every_hidden_state(tmp_path):
    """The wrapper without keys/values: no cache and only the last hidden state (not one per layer), below the
    read that keeps its cache by at least the cache's bytes; the hidden state is the model's own last one."""
    model = HFCausalLM(str(save_tiny_llama(tmp_path, vocab_size=VOCAB))).eval()
    T = 512
    x = ids(B=1, T=T)
    freed = live_peak(lambda: model(x, keep_key_values=False).logits)
    kept = live_peak(lambda: model(x, keep_key_values=True).logits)
    config = model.causal_lm.config
    cache = config.num_hidden_layers * 2 * T * config.num_key_value_heads * config.head_dim * 4
    assert kept - freed >= cache, (kept, freed, cache)
    with torch.no_grad():
        same(model(x, keep_key_values=False).hidden_states,
             model.causal_lm(input_ids=x, output_hidden_states=True).hidden_states[-1])
