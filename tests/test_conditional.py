"""Conditional data: each record one example, the target after the context and kept whole."""

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import KEEP_TASK, KeepTask, recomputed_val_loss

from stm.constants import IGNORE_INDEX
from stm.data import ByteTokenizer
from stm.data.conditional import ConditionalDataModule
from stm.data.sources import JsonLines

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def jsonl(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return JsonLines(str(path), fields={"context": "doc", "target": "summary"}, required=["context", "target"])


def test_examples_keep_the_target_whole_after_the_context(tmp_path):
    rows = [{"doc": "a" * n, "summary": f"summary {n}"} for n in (10, 50, 300)]
    dm = ConditionalDataModule(ByteTokenizer(), jsonl(tmp_path, "t.jsonl", rows), jsonl(tmp_path, "v.jsonl", rows),
                               segment_len=16, max_segments=8, batch_size=3)
    dm.setup()
    tok = ByteTokenizer()
    for i, row in enumerate(rows):
        item = dm.sets["train"][i]
        assert len(item["input_ids"]) % 16 == 0
        target = tok.decode(item["labels"][item["labels"] != IGNORE_INDEX].tolist())
        assert target == row["summary"]  # the target, whole, and only it takes the loss
        assert int(item["label_bytes"].sum()) == len(row["summary"].encode())
    # the long context (300 bytes) was cut from the left: the budget is 8 segments of 16
    long = dm.sets["train"][2]
    assert len(long["input_ids"]) == 128 and dm.sets["train"].layouts[2].truncated > 0
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (3, 128)  # padded to the longest example of the batch
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_a_target_that_cannot_fit_is_named_or_skipped(tmp_path):
    rows = [{"doc": "context", "summary": "x" * 500}, {"doc": "context", "summary": "fits"}]
    dm = ConditionalDataModule(ByteTokenizer(), jsonl(tmp_path, "t.jsonl", rows), jsonl(tmp_path, "t.jsonl", rows),
                               segment_len=16, max_segments=4)
    with pytest.raises(ValueError, match=r"t.jsonl:1 \(field target\): the target has 501 tokens"):
        dm.setup()
    dm = ConditionalDataModule(ByteTokenizer(), jsonl(tmp_path, "t.jsonl", rows), jsonl(tmp_path, "t.jsonl", rows),
                               segment_len=16, max_segments=4, on_bad_record="skip")
    dm.setup()
    assert len(dm.sets["train"]) == 1 and len(dm.skipped["train"]) == 1


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the shared real data sets are not at {SHARED_DATA}")
def test_translation_chapters_train_as_conditional_lm(tmp_path):
    """Bible chapters (English context -> Spanish target) through a real Trainer: the loss is on Spanish only."""
    from stm.data.sources import JsonLines as Source
    from stm.memory import SegmentRecurrence
    from stm.models import Transformer
    from stm.tasks import LanguageModelTask, warmup_cosine  # noqa: F401

    def bible(limit):
        return Source("translation/kjv_rv1909_old_testament.jsonl", root=str(SHARED_DATA), limit=limit,
                      fields={"context": {"path": "en", "join": " "}, "target": {"path": "es", "join": " "}},
                      required=["context", "target"])

    dm = ConditionalDataModule(ByteTokenizer(), bible(6), bible(2), segment_len=256, max_segments=24,
                               batch_size=2, on_bad_record="skip")
    dm.setup()
    first = dm.sets["train"][0]
    spanish = ByteTokenizer().decode(first["labels"][first["labels"] != IGNORE_INDEX].tolist())
    assert spanish.startswith("EN el principio crió Dios")  # Genesis 1:1 in the Reina-Valera 1909
    torch.manual_seed(0)
    model = Transformer(vocab_size=259, d_model=32, n_layers=1, n_heads=2)
    task = LanguageModelTask(model, SegmentRecurrence(mem_len=256), optimizer=lambda p: torch.optim.AdamW(p, 1e-3),
                             segment_len=256)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    loss = float(trainer.callback_metrics["val/loss"])
    assert math.isclose(loss, recomputed_val_loss(task, dm, n_batches=1), rel_tol=1e-6)  # every token, as task=lm


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the shared real data sets are not at {SHARED_DATA}")
def test_data_conditional_config_trains_on_qmsum(train_config):
    from stm.app.run import train

    cfg = train_config(["data=conditional", f"data.train_source.root={SHARED_DATA}",
                        f"data.val_source.root={SHARED_DATA}", "data.on_bad_record=skip", "task.segment_len=512",
                        "+data.train_source.limit=4", "+data.val_source.limit=2", "debug=fast_dev_run",
                        "data.batch_size=2", "data.val_batch_size=2", KEEP_TASK])
    assert cfg.data.val_source.split == "val" and cfg.data.max_segments == 16
    val_loss = train(cfg)
    kept = KeepTask.last
    assert math.isclose(val_loss, recomputed_val_loss(kept["task"], kept["datamodule"], n_batches=1), rel_tol=1e-6)
