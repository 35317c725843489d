"""Tokenizers, text chunks and language-modelling metrics."""

import math

import numpy as np
import pytest
import torch

from stm.data import ByteTokenizer, HFTokenizer, TextDataModule, sample_files
from stm.metrics.lm import LanguageModelMetrics, unigram_nll

TEXT = "It is a truth universally acknowledged — café, naïve — that a single man…\n"


def test_byte_tokenizer_round_trip_and_counts():
    tok = ByteTokenizer()
    ids, counts = tok.encode_with_byte_counts(TEXT)
    assert tok.decode(ids) == TEXT
    assert ids.max() < 256 and tok.vocab_size == 259
    assert counts.sum() == len(TEXT.encode("utf-8")) == len(ids)
    assert tok.decode([*tok.encode("ab"), tok.eos_token_id, tok.pad_token_id]) == "ab"


@pytest.fixture(scope="module")
def local_bpe(tmp_path_factory):
    """A real byte-level BPE tokenizer trained on Austen, saved as a local folder (no hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = sample_files("austen")[0].read_text()[:200_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text], trainer)
    folder = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def test_hf_tokenizer_from_local_folder(local_bpe):
    tok = HFTokenizer(str(local_bpe))
    ids, counts = tok.encode_with_byte_counts(TEXT)
    assert tok.decode(ids) == TEXT
    assert counts.sum() == len(TEXT.encode("utf-8"))
    assert (counts >= 0).all() and len(ids) < len(TEXT.encode("utf-8"))
    assert tok.vocab_size == 400 and tok.eos_token_id == 0


def test_hf_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.name_or_path: /no/such/tokenizer"):
        HFTokenizer("/no/such/tokenizer")
    with pytest.raises((OSError, ValueError), match="tokenizer.name_or_path: could not load"):
        HFTokenizer(str(tmp_path))  # exists, but holds no tokenizer files


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_chunks_are_shifted_pairs_and_splits_cover_every_document(tmp_path):
    a = write(tmp_path, "a.txt", "abcdefghij" * 50)
    b = write(tmp_path, "b.txt", "0123456789" * 50)
    dm = TextDataModule(ByteTokenizer(), chunk_len=16, files=[a, b], val_fraction=0.1, batch_size=4)
    dm.setup()
    item = dm.train_set[3]
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    assert item["label_bytes"].sum() == 16
    train_text = ByteTokenizer().decode(dm.train_set.ids)
    val_text = ByteTokenizer().decode(dm.val_set.ids)
    assert train_text == "abcdefghij" * 45 + "0123456789" * 45
    assert val_text == "abcdefghij" * 5 + "0123456789" * 5
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16)


def test_train_order_is_seeded(tmp_path):
    a = write(tmp_path, "a.txt", "".join(chr(97 + i % 26) for i in range(3000)))
    batches = []
    for seed in (0, 0, 1):
        dm = TextDataModule(ByteTokenizer(), chunk_len=8, files=[a], batch_size=4, seed=seed)
        dm.setup()
        batches.append(next(iter(dm.train_dataloader()))["input_ids"])
    assert torch.equal(batches[0], batches[1]) and not torch.equal(batches[0], batches[2])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.files\[1\]: .*missing.txt"):
        TextDataModule(ByteTokenizer(), chunk_len=8, files=[write(tmp_path, "ok.txt", "x" * 100),
                                                            str(tmp_path / "missing.txt")])
    empty = write(tmp_path, "empty.txt", "  \n")
    dm = TextDataModule(ByteTokenizer(), chunk_len=8, files=[empty])
    with pytest.raises(ValueError, match=r"data.files\[0\]: .*empty.txt is empty"):
        dm.setup()
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="bin.txt is not UTF-8"):
        TextDataModule(ByteTokenizer(), chunk_len=8, files=[str(binary)]).setup()
    short = write(tmp_path, "short.txt", "x" * 100)
    with pytest.raises(ValueError, match="holds no sample: .*chunk_len=64"):
        TextDataModule(ByteTokenizer(), chunk_len=64, files=[short]).setup()
    with pytest.raises(ValueError, match="data.chunk_len"):
        TextDataModule(ByteTokenizer(), chunk_len=-1, files=[short])
    with pytest.raises(ValueError, match="unknown sample 'nope'"):
        TextDataModule(ByteTokenizer(), chunk_len=8, sample="nope")


def test_shipped_austen_sample():
    files = sample_files("austen")
    assert len(files) == 5 and all(f.stat().st_size > 400_000 for f in files)
    assert "PRIDE AND PREJUDICE" in next(f for f in files if "pride" in f.name).read_text()[:200]


def test_metrics_sum_across_unequal_batches():
    m = LanguageModelMetrics()
    m.update(torch.tensor(10.0), torch.tensor(4), torch.tensor(8))
    m.update(torch.tensor(2.0), torch.tensor(1), torch.tensor(2))
    out = m.compute()
    assert math.isclose(out["loss"], 12.0 / 5, rel_tol=1e-6)  # not the mean of per-batch means (1.25 + 2) / 2
    assert math.isclose(out["ppl"], math.exp(12.0 / 5), rel_tol=1e-6)
    assert math.isclose(out["bpb"], 12.0 / math.log(2) / 10, rel_tol=1e-6)


def test_unigram_nll():
    train = np.array([0, 0, 0, 1])
    # add-one smoothing over a vocabulary of 3: p = (4, 2, 1) / 7
    expected = -(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7))
    assert math.isclose(unigram_nll(train, np.array([0, 1, 2]), vocab_size=3), expected, rel_tol=1e-9)


def test_long_texts_are_cut_for_parallel_tokenization_without_changing_tokens(local_bpe):
    from stm.data.tokenizers import split_for_parallel

    text = sample_files("austen")[2].read_text()[:300_000]
    pieces = split_for_parallel(text, piece_chars=10_000)
    assert len(pieces) > 20 and "".join(pieces) == text
    tok = HFTokenizer(str(local_bpe))
    assert tok._cuts_are_exact()
    ids, counts = tok.encode_with_byte_counts(text)
    whole = tok.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == whole
    assert counts.sum() == len(text.encode("utf-8"))


def test_byte_level_lengths_agree_with_offsets(local_bpe):
    """The vocabulary-length shortcut for byte counts agrees with the character offsets: the same total, and
    running totals apart only inside a character that byte-level BPE split across tokens (< 4 bytes)."""
    text = sample_files("austen")[0].read_text()[:50_000] + " café naïve — “quoted”"
    tok = HFTokenizer(str(local_bpe))
    ids, counts = tok.encode_with_byte_counts(text)
    enc = tok.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ref_ids, ref_counts = HFTokenizer._with_byte_counts(text, enc["input_ids"], enc["offset_mapping"])
    assert ids.tolist() == ref_ids.tolist()
    assert counts.sum() == ref_counts.sum() == len(text.encode("utf-8"))
    assert np.abs(np.cumsum(counts) - np.cumsum(ref_counts)).max() < 4
    assert (counts == ref_counts).mean() > 0.99


def test_sampler_starts_a_new_pass_after_exactly_len_items():
    """Lightning takes len(sampler) items and stops asking: the next pass (the next validation) must still
    see every item, not an exhausted generator."""
    from itertools import islice

    from stm.data.sampling import ShardedSampler

    for pad in (True, False):
        sampler = ShardedSampler(5, shuffle=False, pad=pad)
        first = list(islice(iter(sampler), len(sampler)))
        second = list(islice(iter(sampler), len(sampler)))
        assert first == second == [0, 1, 2, 3, 4]
