"""`logits_to_keep`: backbones compute logits only where they are needed, with the same numbers.

The segment loop asks for logits only at positions where some row has a label (a probe's answer tokens): the
per-token NLL, the loss and the gradients must equal those of the full computation, on stm's transformer and on a
Hugging Face Llama, with memory tokens around the segment (the positions are offset by them).
"""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_llama

from stm.constants import IGNORE_INDEX
from stm.loop.segments import run_segments
from stm.memory import NoMemory, RecurrentMemoryTokens
from stm.memory.base import SegmentExtras
from stm.models import Transformer
from stm.models.attention import logit_positions
from stm.models.hf import HFCausalLM

VOCAB, SEG = 300, 8


@pytest.fixture(scope="module", params=["stm", "hf"])
def backbone(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "stm":
        return Transformer(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4)
    return HFCausalLM(str(save_tiny_llama(tmp_path_factory.mktemp("llama"), vocab_size=VOCAB)))


def ids(B=3, T=3 * SEG, seed=1):
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logit_positions():
    assert logit_positions(0, 5) == slice(0, 5)
    assert logit_positions(2, 5, offset=4) == slice(7, 9)
    assert logit_positions(9, 5) == slice(0, 5)
    assert logit_positions(torch.tensor([0, 3]), 5, offset=4).tolist() == [4, 7]
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        logit_positions(-1, 5)
    with pytest.raises(ValueError, match="must be 1-D positions"):
        logit_positions(torch.zeros(2, 2, dtype=torch.long), 5)


def test_kept_logits_equal_those_of_every_position(backbone):
    """With 4 memory tokens before the segment: the last n, chosen positions, none, all."""
    backbone.eval()
    x = ids(T=SEG)
    prefix = torch.randn(3, 4, backbone.d_model)
    extras = SegmentExtras(prefix=prefix)
    with torch.no_grad():
        full = backbone(x, extras=extras).logits
        assert full.shape == (3, SEG, VOCAB)
        torch.testing.assert_close(backbone(x, extras=extras, logits_to_keep=1).logits, full[:, -1:])
        torch.testing.assert_close(backbone(x, extras=extras, logits_to_keep=3).logits, full[:, -3:])
        chosen = torch.tensor([0, 5, 6])
        torch.testing.assert_close(backbone(x, extras=extras, logits_to_keep=chosen).logits, full[:, chosen])
        assert backbone(x, extras=extras, logits_to_keep=torch.zeros(0, dtype=torch.long)).logits.shape == (3, 0, VOCAB)


def answer_labels(x: torch.Tensor) -> torch.Tensor:
    """Labels at a few positions only, different per row, some segments with none (as a probe's answers)."""
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[0, [2, 21, 22]] = x[0, [3, 22, 23]]
    labels[1, [21]] = x[1, [22]]
    labels[2, [20, 23]] = x[2, [21, 0]]
    return labels


@pytest.mark.parametrize("memory", ["none", "rmt"])
def test_loss_and_gradients_equal_the_full_computation(backbone, memory):
    backbone.train()
    torch.manual_seed(0)
    mem = NoMemory() if memory == "none" else RecurrentMemoryTokens(num_memory_tokens=2, init_std=1.0)
    mem.bind(backbone)
    x = ids()
    labels = answer_labels(x)
    params = [p for p in [*backbone.parameters(), *mem.parameters()] if p.requires_grad]

    def loss_and_grads(return_logits: bool):
        run = run_segments(backbone, mem, x, segment_len=SEG, labels=labels, return_logits=return_logits)
        grads = torch.autograd.grad(run.loss, params, allow_unused=True)
        return run, grads

    kept, kept_grads = loss_and_grads(False)  # logits only at the labelled positions
    full, full_grads = loss_and_grads(True)   # every position's logits (as before logits_to_keep)
    assert kept.logits is None and full.logits.shape == (3, 3 * SEG, VOCAB)
    assert (kept.token_nll[labels == IGNORE_INDEX] == 0).all()
    torch.testing.assert_close(kept.token_nll, full.token_nll)
    torch.testing.assert_close(kept.loss, full.loss)
    assert kept.n_tokens.item() == 6
    for a, b in zip(kept_grads, full_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert any(g is not None and g.abs().sum() > 0 for g in kept_grads)
