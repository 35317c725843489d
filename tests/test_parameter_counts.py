"""The parameters line that train.py and eval.py log when they start: total, trainable and, where part of the
model is frozen or adapted, the LoRA and memory parameters, against counts worked out from a tiny model's shapes."""

from __future__ import annotations

import logging

import pytest
from conftest import KEEP_TASK, KeepTask, compose_config, save_tiny_llama

from stm.app.parameter_counts import parameter_counts, parameters_line, short_count
from stm.app.run import evaluate, train
from stm.memory import NoMemory, RecurrentMemoryTokens
from stm.models import Transformer
from stm.models.hf import HFCausalLM

V, D, LAYERS, HEADS, M = 259, 32, 2, 2, 4
FF = 128  # stm's SwiGLU width for d_model 32: 8/3 * 32 rounded up to a multiple of 64


def transformer_params(vocab: int, d: int, layers: int, ff: int) -> int:
    """stm's Transformer with tied embeddings: the embedding, per layer two norms, qkv, out, SwiGLU's gate_up and
    down, and the final norm."""
    return vocab * d + layers * (2 * d + 3 * d * d + d * d + 2 * ff * d + ff * d) + d


def tiny(memory) -> tuple[Transformer, object]:
    model = Transformer(vocab_size=V, d_model=D, n_layers=LAYERS, n_heads=HEADS)
    memory.bind(model)
    return model, memory


def test_a_transformer_under_memory_tokens_trains_every_parameter():
    model, memory = tiny(RecurrentMemoryTokens(num_memory_tokens=M))
    counts = parameter_counts(model, memory)
    total = transformer_params(V, D, LAYERS, FF) + M * D
    assert counts == {"total": total, "trainable": total, "lora": 0, "memory": M * D}
    assert parameters_line(counts) == f"parameters: {total / 1e3:.1f}K total, {total / 1e3:.1f}K trainable (memory 128)"


def test_a_frozen_backbone_leaves_the_memory_trainable_and_says_so():
    model, memory = tiny(RecurrentMemoryTokens(num_memory_tokens=M))
    model.requires_grad_(False)
    counts = parameter_counts(model, memory)
    assert counts["trainable"] == M * D and counts["total"] == transformer_params(V, D, LAYERS, FF) + M * D
    assert parameters_line(counts).endswith(", 128 trainable (memory 128)")
    model, memory = tiny(NoMemory())
    model.requires_grad_(False)  # a frozen model and a memory without parameters: "memory 0" is the news
    assert parameters_line(parameter_counts(model, memory)) == "parameters: 41.2K total, 0 trainable (memory 0)"


def test_without_memory_parameters_or_anything_frozen_there_is_no_breakdown():
    model, memory = tiny(NoMemory())
    assert parameters_line(parameter_counts(model, memory)) == "parameters: 41.2K total, 41.2K trainable"


@pytest.mark.parametrize("n, text", [(0, "0"), (999, "999"), (1_000, "1.0K"), (41_216, "41.2K"),
                                     (135_200_000, "135.2M"), (1_700_000_000, "1.7B")])
def test_short_counts(n, text):
    assert short_count(n) == text


def test_lora_adapters_are_counted_apart(tmp_path):
    """A tiny Llama (2 layers, width 32, 4 heads over 2 key/value heads) with rank-2 adapters on q_proj (32 -> 32)
    and v_proj (32 -> 16): 2 * 2 * (64 + 48) = 448 adapter values; frozen base, trainable adapters and memory."""
    path = save_tiny_llama(tmp_path / "llama")
    base = sum(p.numel() for p in HFCausalLM(str(path)).parameters())
    model = HFCausalLM(str(path), lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    memory = RecurrentMemoryTokens(num_memory_tokens=M)
    memory.bind(model)
    counts = parameter_counts(model, memory)
    assert counts == {"total": base + 448 + M * D, "trainable": 448 + M * D, "lora": 448, "memory": M * D}
    assert parameters_line(counts) == (f"parameters: {short_count(base + 448 + M * D)} total, 576 trainable "
                                       "(LoRA 448, memory 128)")


def test_train_and_eval_log_the_parameters_line(train_config, tmp_path, caplog):
    """train.py and eval.py log the line of the task they built: the configured tiny model and rmt's tokens."""
    cfg = train_config(["model=tiny", "memory=rmt", "debug=fast_dev_run", "data.batch_size=2", "data.val_batch_size=2",
                        KEEP_TASK])
    with caplog.at_level(logging.INFO, logger="stm"):
        train(cfg)
    task = KeepTask.last["task"]
    expected = parameters_line(parameter_counts(task.model, task.memory))
    d, layers, vocab = cfg.model.d_model, cfg.model.n_layers, task.model.embed.weight.shape[0]
    total = transformer_params(vocab, d, layers, 64 * -(-d * 8 // (3 * 64))) + 8 * d
    memory = short_count(8 * d)  # rmt: 8 tokens of width d
    assert expected == f"parameters: {short_count(total)} total, {short_count(total)} trainable (memory {memory})"
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("parameters:")] == [expected]
    caplog.clear()
    eval_cfg = compose_config("eval", ["task=lm", "model=tiny", "memory=rmt", "allow_untrained=true",
                                       "debug=fast_dev_run", "logger=none"], tmp_path / "eval")
    with caplog.at_level(logging.INFO, logger="stm"):
        evaluate(eval_cfg)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("parameters:")] == [expected]
