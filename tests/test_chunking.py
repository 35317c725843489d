"""Laying documents out in segments: round trips, target placement, truncation, bad input."""

import numpy as np
import pytest

from stm.constants import IGNORE_INDEX
from stm.data import ByteTokenizer, sample_files
from stm.data.chunking import layout_example, overlapping_segments


@pytest.mark.parametrize("overlap", [0, 7, 31])
def test_segments_round_trip_byte_tokenizer(overlap):
    tok = ByteTokenizer()
    text = sample_files("austen")[3].read_text()[:20_000]
    ids = np.asarray(tok.encode(text))
    pieces = overlapping_segments(ids, segment_len=64, overlap=overlap)
    assert all(len(seg) <= 64 for seg, _ in pieces)
    assert tok.decode(np.concatenate([seg[len(seg) - new:] for seg, new in pieces])) == text
    for (prev, _), (seg, new) in zip(pieces, pieces[1:]):
        assert np.array_equal(seg[:len(seg) - new], prev[len(prev) - overlap:])  # seen-again context


@pytest.mark.parametrize("overlap", [0, 5])
def test_segments_round_trip_bpe(overlap):
    """A BPE tokenizer round-trips up to its own normalisation (byte-level BPE: exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from stm.data.tokenizers import HFTokenizer

    text = sample_files("austen")[1].read_text()[:30_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from transformers import PreTrainedTokenizerFast

    tok = HFTokenizer.__new__(HFTokenizer)
    tok.tokenizer, tok.name = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>"), "bpe"
    ids, counts = tok.encode_with_byte_counts(text)
    pieces = overlapping_segments(ids, segment_len=32, overlap=overlap)
    assert tok.decode(np.concatenate([seg[len(seg) - new:] for seg, new in pieces])) == text
    assert counts.sum() == len(text.encode())


def test_target_goes_after_the_context_and_takes_the_loss():
    context, target = np.arange(10, 30), np.array([1, 2, 3])
    lay = layout_example(context, target, segment_len=8, max_segments=4, pad_token_id=0)
    n = 20 + 3 - 1
    assert len(lay.input_ids) == 24 and lay.attention_mask.sum() == n
    assert list(lay.labels[lay.labels != IGNORE_INDEX]) == [1, 2, 3]
    assert lay.input_ids[19] == 29  # the last context token predicts the first target token
    assert lay.labels[19] == 1 and lay.truncated == 0
    with_context = layout_example(context, target, segment_len=8, max_segments=4, pad_token_id=0,
                                  context_loss=True)
    assert (with_context.labels != IGNORE_INDEX).sum() == n


@pytest.mark.parametrize("truncation,kept", [("left", list(range(83, 100))), ("right", list(range(0, 17)))])
def test_long_context_is_truncated_target_kept_whole(truncation, kept):
    context, target = np.arange(100), np.array([500, 501, 502, 503])
    lay = layout_example(context, target, segment_len=5, max_segments=4, pad_token_id=0, truncation=truncation)
    tokens = list(lay.input_ids[lay.attention_mask == 1]) + [int(lay.labels[lay.attention_mask == 1][-1])]
    assert tokens == kept + [500, 501, 502, 503]
    assert lay.truncated == 83 and len(lay.input_ids) == 20  # 4 segments x 5 = 17 context + 4 target - 1


def test_a_target_that_cannot_fit_is_an_error():
    with pytest.raises(ValueError, match=r"qmsum/train/x.json#3: the target has 20 tokens and can never fit"):
        layout_example(np.arange(5), np.arange(20), segment_len=4, max_segments=4, pad_token_id=0,
                       origin="qmsum/train/x.json#3")
    with pytest.raises(ValueError, match="empty target"):
        layout_example(np.arange(5), np.arange(0), segment_len=4, max_segments=4, pad_token_id=0)
    with pytest.raises(ValueError, match="overlap must be in"):
        overlapping_segments(np.arange(10), segment_len=4, overlap=4)
