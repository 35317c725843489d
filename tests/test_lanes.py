"""Token cache, stream lanes, DDP sharding and resumable sampling."""

import numpy as np
import pytest
import torch

from stm.constants import IGNORE_INDEX
from stm.data import ByteTokenizer, TextDataModule
from stm.data.cache import cached_tokenize, corpus_key
from stm.data.sampling import ResumableSequence, ShardedSampler, StreamLanes


def stream(n=1000):
    ids = np.arange(n) % 251
    return ids, np.ones(n, dtype=np.int64)


def real_pairs(lanes: StreamLanes) -> list[tuple[int, int]]:
    """Every (input, label) pair the lanes read, as (position in the stream, label)."""
    seen = []
    for t in range(len(lanes)):
        batch = lanes[t]
        for row, lane in enumerate(lanes.lanes):
            start = lanes.lane_span(lane)[0] + t * lanes.chunk_len
            for j in range(lanes.chunk_len):
                if batch["labels"][row, j] != IGNORE_INDEX:
                    seen.append((start + j, int(batch["labels"][row, j])))
    return seen


def test_lanes_continue_across_batches():
    ids, counts = stream(1000)
    lanes = StreamLanes(ids, counts, lanes_per_rank=4, chunk_len=16, pad_token_id=999)
    for t in range(len(lanes) - 1):
        a, b = lanes[t], lanes[t + 1]
        for row in range(4):
            if b["labels"][row, 0] == IGNORE_INDEX:
                continue
            # the next batch's first input is this batch's last label, lane by lane
            assert b["input_ids"][row, 0] == a["labels"][row, -1]
    assert bool(lanes[0]["lane_start"]) and not bool(lanes[1]["lane_start"])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_read_the_whole_stream_once(world_size):
    ids, counts = stream(1001)
    everything = []
    for rank in range(world_size):
        lanes = StreamLanes(ids, counts, lanes_per_rank=3, chunk_len=10, pad_token_id=999, rank=rank,
                            world_size=world_size)
        assert len(lanes) == len(StreamLanes(ids, counts, lanes_per_rank=3, chunk_len=10, pad_token_id=999,
                                             rank=0, world_size=world_size))  # same number of steps per rank
        everything += real_pairs(lanes)
    positions = sorted(p for p, _ in everything)
    assert positions == list(range(1000))  # the union is the corpus, with no overlap
    assert all(label == ids[p + 1] for p, label in everything)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_sampler_is_disjoint_and_covers(world_size):
    n = 100
    shards = [list(ShardedSampler(n, rank=r, world_size=world_size, seed=5)) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    union = [i for s in shards for i in s]
    assert set(union) == set(range(n))
    assert len(union) - len(set(union)) == (-n) % world_size  # only the top-up repeats


def test_sampler_order_depends_on_seed_and_epoch():
    a = ShardedSampler(50, seed=1)
    first, second = list(a), list(a)
    assert first != second  # a new epoch, a new order
    assert first == list(ShardedSampler(50, seed=1))
    assert first != list(ShardedSampler(50, seed=2))


@pytest.mark.parametrize("make", [
    lambda: ShardedSampler(40, rank=1, world_size=2, seed=3),
    lambda: ResumableSequence(17),
])
def test_resume_from_saved_sampler_state(make):
    uninterrupted = list(make())
    sampler = make()
    it = iter(sampler)
    head = [next(it) for _ in range(7)]
    state = sampler.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert head + list(resumed) == uninterrupted


def test_sampler_state_for_other_data_is_rejected():
    state = ShardedSampler(40, seed=3).state_dict()
    with pytest.raises(ValueError, match="40 items with seed 3"):
        ShardedSampler(41, seed=3).load_state_dict(state)


def test_datamodule_resumes_mid_epoch(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("".join(chr(97 + i % 26) for i in range(5000)))

    def batches(state=None, take=None):
        dm = TextDataModule(ByteTokenizer(), chunk_len=16, files=[str(path)], batch_size=4, cache_dir=tmp_path)
        dm.setup()
        if state is not None:
            dm.load_state_dict(state)
        loader = dm.train_dataloader()
        out = []
        for batch in loader:
            out.append(batch["input_ids"])
            if take is not None and len(out) == take:
                return out, dm.state_dict()
        return out, dm.state_dict()

    full, _ = batches()
    head, state = batches(take=5)
    tail, _ = batches(state=state)
    assert len(head) + len(tail) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))


def test_second_run_reads_the_cache(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("The cache must be reused. " * 50)
    calls = []

    class CountingTokenizer(ByteTokenizer):
        def encode_batch_with_byte_counts(self, texts):
            calls.append(len(texts))
            return super().encode_batch_with_byte_counts(texts)

    tok = CountingTokenizer()
    first, cached = cached_tokenize([path], None, tok, tmp_path / "cache", read_texts=lambda: [path.read_text()])
    assert not cached and calls == [1]
    second, cached = cached_tokenize([path], None, tok, tmp_path / "cache", read_texts=lambda: 1 / 0)
    assert cached and calls == [1]  # not tokenized again, not even read
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.offsets, second.offsets)
    key = corpus_key([path], tok)
    path.write_text("changed")
    assert corpus_key([path], tok) != key  # a changed file is a new entry


def test_lm_task_carries_memory_across_lane_batches():
    """Lanes + xl: two batches with the state carried give the logits of reading both as one stream."""
    from stm.loop.segments import run_segments
    from stm.memory import SegmentRecurrence
    from stm.models import Transformer
    from stm.tasks import LanguageModelTask

    torch.manual_seed(0)
    model = Transformer(vocab_size=260, d_model=32, n_layers=2, n_heads=4)
    ids, counts = stream(161)
    lanes = StreamLanes(ids, counts, lanes_per_rank=2, chunk_len=40, pad_token_id=256)
    task = LanguageModelTask(model, SegmentRecurrence(mem_len=1000), optimizer=None, segment_len=8).eval()
    with torch.no_grad():
        nll = [task(lanes[t]).nll_sum for t in range(2)]
        both = {k: torch.cat([lanes[0][k], lanes[1][k]], dim=1) for k in ("input_ids", "labels")}
        whole = run_segments(model, SegmentRecurrence(mem_len=1000), both["input_ids"], labels=both["labels"],
                             segment_len=8)
    torch.testing.assert_close(nll[0] + nll[1], whole.nll_sum, atol=1e-3, rtol=1e-5)
    # a lane start resets the memory: batch 0 read again gives the same loss as the first time
    with torch.no_grad():
        torch.testing.assert_close(task(lanes[0]).nll_sum, nll[0])


def test_documents_mode_gives_whole_documents_from_their_start(tmp_path):
    texts = [f"document {i}: " + "word " * (5 + 7 * i) for i in range(12)]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"d{i:02d}.txt")
        files[-1].write_text(text)
    dm = TextDataModule(ByteTokenizer(), chunk_len=48, files=[str(f) for f in files], batch_size=3,
                        mode="documents", val_fraction=0.25, cache_dir=tmp_path / "cache")
    dm.setup()
    assert len(dm.train_set) == 12 and len(dm.val_set) == 12  # every document gives head and tail
    seen = set()
    for rank in range(2):  # two ranks: disjoint, whole documents
        sampler = ShardedSampler(len(dm.train_set), rank=rank, world_size=2, seed=0)
        mine = list(sampler)
        assert not seen & set(mine)
        seen |= set(mine)
    assert seen == set(range(12))
    item = dm.train_set[4]
    text = ByteTokenizer().decode(item["input_ids"][item["attention_mask"] == 1].tolist())
    assert text.startswith("document 4: word")
    assert (item["labels"][item["attention_mask"] == 0] == IGNORE_INDEX).all()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (3, 48) and "lane_start" not in batch  # a fresh memory per document
