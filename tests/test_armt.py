"""memory=armt: the associative memory is the paper's (delta rule, normaliser, DPFP), and the per-layer memory
contract holds on stm's transformer: every property compares numbers."""

import dataclasses
from pathlib import Path

import pytest
import torch

from stm.loop.segments import run_segments
from stm.memory import AssociativeMemory, ComposedMemory, RecurrentMemoryTokens, SegmentExtras, SlidingWindow
from stm.memory.armt import AssociativeState, associative_read, associative_write, dpfp, sequential_write
from stm.memory.base import (
    _MERGE_RULES,
    _MERGED_TOGETHER,
    LayerMemory,
    Memory,
    detach_state,
    merge_extras,
    state_from_plain,
    state_to_plain,
)
from stm.models import Transformer

V, D = 50, 32


def make_model(seed=0, n_layers=2):
    torch.manual_seed(seed)
    return Transformer(vocab_size=V, d_model=D, n_layers=n_layers, n_heads=4).eval()


def armt(model, **kw):
    memory = AssociativeMemory(**{"num_memory_tokens": 3, "key_dim": 8, **kw})
    memory.bind(model)
    for p in memory.parameters():  # non-trivial projections and write strengths
        torch.nn.init.normal_(p, std=0.3)
    return memory


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# --- the associative matrix ----------------------------------------------------------------------------------

def test_vectorised_write_equals_a_token_by_token_reference_loop():
    B, M, Fdim, Dv = 2, 5, 12, 7
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(B, Fdim, Dv, generator=g)
    norm = torch.rand(B, Fdim, generator=g)
    keys = torch.nn.functional.normalize(torch.rand(B, M, Fdim, generator=g), dim=-1)
    values, beta = torch.randn(B, M, Dv, generator=g), torch.rand(B, M, 1, generator=g)
    got_matrix, got_norm = associative_write(matrix, norm, keys, values, beta)

    want_matrix, want_norm = matrix.clone(), norm.clone()
    for b in range(B):
        for m in range(M):  # each token against the matrix as it was before this write
            k = keys[b, m]
            previous = (k @ matrix[b]) / (k @ norm[b] + 1e-5)
            want_matrix[b] += torch.outer(k, beta[b, m, 0] * (values[b, m] - previous))
            coefficient = min(max(1 - float(k @ norm[b]) / float(k @ k), 0.0), 1.0)
            want_norm[b] += coefficient * k
    close(got_matrix, want_matrix, 1e-5)
    close(got_norm, want_norm, 1e-5)


def test_sequential_write_equals_a_loop_where_each_token_sees_the_ones_before():
    B, M, Fdim, Dv = 2, 5, 12, 7
    g = torch.Generator().manual_seed(1)
    matrix, norm = torch.randn(B, Fdim, Dv, generator=g), torch.rand(B, Fdim, generator=g)
    keys = torch.nn.functional.normalize(torch.rand(B, M, Fdim, generator=g), dim=-1)
    values, beta = torch.randn(B, M, Dv, generator=g), torch.rand(B, M, 1, generator=g)
    got_matrix, got_norm = sequential_write(matrix, norm, keys, values, beta)

    want_matrix, want_norm = matrix.clone(), norm.clone()
    for b in range(B):
        for m in range(M):  # each token against the matrix as the tokens before it left it
            k = keys[b, m]
            previous = (k @ want_matrix[b]) / (k @ want_norm[b] + 1e-5)
            coefficient = min(max(1 - float(k @ want_norm[b]) / float(k @ k), 0.0), 1.0)
            want_matrix[b] += torch.outer(k, beta[b, m, 0] * (values[b, m] - previous))
            want_norm[b] += coefficient * k
    close(got_matrix, want_matrix, 1e-5)
    close(got_norm, want_norm, 1e-5)
    parallel_matrix, _ = associative_write(matrix, norm, keys, values, beta)
    assert (parallel_matrix - got_matrix).abs().max() > 1e-2  # the two orders differ


def test_parallel_writes_of_one_direction_overshoot_and_sequential_ones_do_not():
    """A key written once (its normaliser then holds it once), then 8 write tokens with that key and strength 0.9,
    segment after segment: written at once, the read of the key moves by 8 * 0.9 times its error and diverges; one
    after another, it reaches the value and stays."""
    Fdim, Dv, M = 16, 4, 8
    key = torch.nn.functional.normalize(torch.rand(Fdim), dim=0).expand(1, M, Fdim)
    value = torch.ones(1, M, Dv)
    beta = torch.full((1, M, 1), 0.9)
    reads = {}
    for name, write in (("parallel", associative_write), ("sequential", sequential_write)):
        matrix, norm = torch.zeros(1, Fdim, Dv, dtype=torch.float64), torch.zeros(1, Fdim, dtype=torch.float64)
        matrix, norm = write(matrix, norm, key[:, :1].double(), -value[:, :1].double(), beta[:, :1].double())
        for _ in range(12):
            matrix, norm = write(matrix, norm, key.double(), value.double(), beta.double())
        reads[name] = associative_read(matrix, norm, key[:, :1].double())[0, 0]
    close(reads["sequential"], torch.ones(Dv, dtype=torch.float64), 1e-6)
    assert reads["parallel"].abs().min() > 1e6  # |1 - 8 * 0.9| = 6.2 per segment


def test_a_written_key_reads_back_its_value_and_a_rewrite_keeps_only_the_newer():
    B, Fdim, Dv = 1, 16, 6
    basis = torch.linalg.qr(torch.randn(Fdim, Fdim))[0]  # orthonormal feature keys
    keys = basis[:4][None]  # (1, 4, F)
    values = torch.randn(1, 4, Dv)
    one = torch.ones(1, 4, 1)
    matrix, norm = torch.zeros(B, Fdim, Dv), torch.zeros(B, Fdim)
    matrix, norm = associative_write(matrix, norm, keys, values, one)
    close(associative_read(matrix, norm, keys), values, 1e-4)

    newer = torch.randn(1, 1, Dv)
    matrix, norm = associative_write(matrix, norm, keys[:, 1:2], newer, torch.ones(1, 1, 1))
    read = associative_read(matrix, norm, keys)
    close(read[:, 1], newer[:, 0], 1e-4)  # only the newer value, at scale 1
    close(read[:, [0, 2, 3]], values[:, [0, 2, 3]], 1e-4)  # the others untouched

    # without the normaliser's correction the rewritten key reads back at half scale: what correction is for
    m2, n2 = associative_write(torch.zeros(B, Fdim, Dv), torch.zeros(B, Fdim), keys, values, one, correction=False)
    m2, n2 = associative_write(m2, n2, keys[:, 1:2], newer, torch.ones(1, 1, 1), correction=False)
    close(associative_read(m2, n2, keys[:, 1:2])[:, 0], newer[:, 0] / 2, 1e-4)


def test_dpfp_features():
    x = torch.tensor([[1.0, -2.0, 0.5]])
    phi = dpfp(x, nu=2)
    assert phi.shape == (1, 12)
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 0.0])  # [relu(x), relu(-x)]
    close(phi[0], torch.cat([r * r.roll(1), r * r.roll(2)]))
    assert bool((phi >= 0).all())


# --- the mechanism -------------------------------------------------------------------------------------------

def test_with_the_read_switched_off_armt_equals_rmt():
    model, x = make_model(), torch.randint(0, V, (2, 40))
    a = armt(model, read=False)
    rmt = RecurrentMemoryTokens(num_memory_tokens=3)
    rmt.bind(model)
    rmt.initial_memory.data.copy_(a.tokens.initial_memory)
    got = run_segments(model, a, x, segment_len=8, return_logits=True).logits
    want = run_segments(model, rmt, x, segment_len=8, return_logits=True).logits
    close(got, want)
    # and the read does matter once switched on
    on = armt(model)
    on.load_state_dict(a.state_dict())
    assert (run_segments(model, on, x, segment_len=8, return_logits=True).logits - want).abs().max() > 1e-3


def test_the_first_segment_reads_an_empty_memory_and_later_ones_do_not():
    model, x = make_model(), torch.randint(0, V, (2, 24))
    a = armt(model)
    rmt = RecurrentMemoryTokens(num_memory_tokens=3)
    rmt.bind(model)
    rmt.initial_memory.data.copy_(a.tokens.initial_memory)
    got = run_segments(model, a, x, segment_len=8, return_logits=True).logits
    want = run_segments(model, rmt, x, segment_len=8, return_logits=True).logits
    close(got[:, :8], want[:, :8])


def test_without_recurrent_tokens_only_the_matrices_carry_the_past():
    """recurrent_tokens=false: every segment starts from the learned tokens, so with the read off a segment's logits
    do not depend on the segments before it; with the read on they do, through the matrices alone."""
    model, x = make_model(), torch.randint(0, V, (2, 24))
    other = x.clone()
    other[:, :16] = torch.randint(0, V, (2, 16))  # different first two segments, same third
    cut = armt(model, recurrent_tokens=False, read=False, placement="write")
    a, b = (run_segments(model, cut, t, segment_len=8, return_logits=True) for t in (x, other))
    close(a.logits[:, 16:], b.logits[:, 16:])
    assert a.state.matrices[0].abs().sum() > 0  # the matrices are still written
    initial = cut.tokens.initial_memory.unsqueeze(0).expand(2, -1, -1)
    close(a.state.memory_tokens, initial, tol=0)  # the tokens never change
    on = armt(model, recurrent_tokens=False, placement="write")
    on.load_state_dict(cut.state_dict())
    a, b = (run_segments(model, on, t, segment_len=8, return_logits=True) for t in (x, other))
    assert (a.logits[:, 16:] - b.logits[:, 16:]).abs().max() > 1e-3
    close(a.logits[:, :8], run_segments(model, cut, x[:, :8], segment_len=8, return_logits=True).logits)
    with pytest.raises(ValueError, match="memory.armt.recurrent_tokens=false needs learned_init=true"):
        AssociativeMemory(recurrent_tokens=False, learned_init=False)
    with pytest.raises(ValueError, match="memory.armt.recurrent_tokens must be true"):
        AssociativeMemory(recurrent_tokens="no")


def test_without_recurrent_tokens_the_learned_tokens_train_from_every_segment():
    """The learned tokens enter every segment, so a loss on the last segment alone reaches them (directly, and
    through what earlier segments wrote) even where the state was detached between segments."""
    model = make_model().train()
    a = armt(model, recurrent_tokens=False)
    x = torch.randint(0, V, (2, 24))
    labels = torch.full_like(x, -100)
    labels[:, -8:] = x[:, -8:]
    run_segments(model, a, x, segment_len=8, labels=labels, bptt_depth=1).loss.backward()
    assert a.tokens.initial_memory.grad.abs().sum() > 0
    assert all(layer.query.weight.grad.abs().sum() > 0 for layer in a.layers)


def test_writes_come_from_the_chosen_layers_only():
    model = make_model(n_layers=3)
    a = armt(model, layers=[0, -1])
    assert a.layer_ids == [0, 2] and len(a.layers) == 2
    state = run_segments(model, a, torch.randint(0, V, (2, 16)), segment_len=8).state
    assert len(state.matrices) == 2 and all(m.abs().sum() > 0 for m in state.matrices)
    with pytest.raises(ValueError, match="memory.armt.layers"):
        AssociativeMemory(layers=[3]).bind(model)
    with pytest.raises(ValueError, match="memory.armt.num_memory_tokens"):
        AssociativeMemory(num_memory_tokens=0)
    with pytest.raises(ValueError, match="memory.armt.write_order must be 'parallel'"):
        AssociativeMemory(write_order="serial")


def test_gradients_reach_the_projections_through_the_memory():
    model = make_model().train()
    a = armt(model)
    x = torch.randint(0, V, (2, 24))
    labels = torch.full_like(x, -100)
    labels[:, -8:] = x[:, -8:]  # loss only on the last segment: reaches the memory only through the state
    run_segments(model, a, x, segment_len=8, labels=labels).loss.backward()
    assert all(layer.key.weight.grad.abs().sum() > 0 for layer in a.layers)
    assert all(layer.query.weight.grad.abs().sum() > 0 for layer in a.layers)


def test_state_is_a_dataclass_that_detaches_and_survives_a_checkpoint(tmp_path):
    model, x = make_model(), torch.randint(0, V, (2, 32))
    a = armt(model)
    first = run_segments(model, a, x[:, :16], segment_len=8)
    assert isinstance(first.state, AssociativeState)
    detached = detach_state(first.state)
    assert isinstance(detached, AssociativeState) and not any(m.requires_grad for m in detached.matrices)
    torch.save({"state": state_to_plain(first.state)}, tmp_path / "s.pt")
    restored = state_from_plain(torch.load(tmp_path / "s.pt", weights_only=True)["state"])
    assert isinstance(restored, AssociativeState)
    a_logits = run_segments(model, a, x[:, 16:], segment_len=8, state=first.state, return_logits=True).logits
    b_logits = run_segments(model, a, x[:, 16:], segment_len=8, state=restored, return_logits=True).logits
    close(a_logits, b_logits)


def test_a_stored_state_naming_an_unknown_class_is_refused_without_importing():
    import sys

    plain = {"__state__": "antigravity:Thing", "x": torch.zeros(1)}
    with pytest.raises(TypeError, match="not a dataclass of a loaded memory module"):
        state_from_plain(plain)
    assert "antigravity" not in sys.modules
    with pytest.raises(TypeError, match="not a dataclass"):
        state_from_plain({"__state__": "os:system"})
    # a dataclass of a loaded module that is not a memory module is refused too (its __post_init__ could act)
    with pytest.raises(TypeError, match="not a dataclass of a loaded memory module"):
        state_from_plain({"__state__": "stm.data.conditional:ExampleInfo"})


# --- the contract: merge rule and auxiliary losses --------------------------------------------------------

def test_every_field_of_segment_extras_has_a_merge_rule():
    fields = {f.name for f in dataclasses.fields(SegmentExtras)}
    assert fields == set(_MERGE_RULES) | _MERGED_TOGETHER


class _Reads(LayerMemory):
    def __init__(self, value, layers):
        self.value, self.write_layers = value, frozenset(layers)

    def read(self, layer, hidden):
        return torch.full_like(hidden, self.value)


def test_merge_extras_keeps_what_each_side_supplies():
    t = torch.zeros(1, 2, 4)
    kv = [(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))]
    a = SegmentExtras(prefix=t, suffix=t, layer_memory=_Reads(1.0, [0]))
    b = SegmentExtras(past_key_values=kv, past_mask=torch.ones(1, 3, dtype=torch.bool), window=6, n_sink=2,
                      layer_memory=_Reads(2.0, [1]))
    m = merge_extras(a, b)
    assert m.prefix is t and m.suffix is t and m.past_key_values is kv and m.window == 6 and m.n_sink == 2
    assert m.layer_memory.write_layers == {0, 1}
    assert float(m.layer_memory.read(0, torch.zeros(1, 1, 1))) == 3.0  # reads add up
    assert merge_extras(SegmentExtras(window=5), SegmentExtras(window=3)).window == 3
    with pytest.raises(ValueError, match="both supply memory tokens before the segment"):
        merge_extras(a, SegmentExtras(prefix=t))
    with pytest.raises(ValueError, match="both supply cached keys/values"):
        merge_extras(b, SegmentExtras(past_key_values=kv))


def test_armt_composed_with_a_window_reads_its_memory_and_keeps_the_window():
    model = make_model()
    a = armt(model)
    composed = ComposedMemory([a, SlidingWindow(window=5, sink_tokens=1)])
    composed.bind(model)
    a.load_state_dict(armt(model).state_dict())  # bind re-created the layers; any fixed non-trivial values
    extras = composed.prepare(composed.init_state(2, "cpu"))
    assert extras.window == 5 and extras.n_prefix == 3 and extras.n_suffix == 3
    assert extras.layer_memory is not None and extras.layer_memory.write_layers == {0, 1}


class _PenalisedTokens(RecurrentMemoryTokens):
    """rmt with an auxiliary loss: the squared norm of the memory it writes (a real regulariser)."""

    def auxiliary_losses(self, state, outputs):
        return {"memory_norm": outputs.hidden_states[:, -self.num_memory_tokens:].pow(2).mean()}


def test_auxiliary_losses_are_summed_over_segments_and_composed():
    model, x = make_model(), torch.randint(0, V, (2, 24))
    mem = _PenalisedTokens(num_memory_tokens=2)
    mem.bind(model)
    run = run_segments(model, mem, x, segment_len=8, labels=x)
    state, expected = mem.init_state(2, "cpu"), 0.0
    for s in range(0, 24, 8):
        out = model(x[:, s:s + 8], extras=mem.prepare(state))
        expected += out.hidden_states[:, -2:].pow(2).mean()
        state = mem.update(state, out)
    close(run.aux_losses["memory_norm"], expected)
    composed = ComposedMemory([mem, SlidingWindow(window=5)])
    assert set(run_segments(model, composed, x, segment_len=8).aux_losses) == {"memory_norm"}
    assert Memory().auxiliary_losses(None, None) == {}


# --- a real run: stream lanes carry the armt state across batches and checkpoints ------------------------

def test_a_lane_run_with_armt_resumed_from_its_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    """Stream lanes carry the memory state from batch to batch; the checkpoint stores it (a dataclass of
    tensors, loadable with weights_only). Resumed at step 3 of 6, the run ends exactly where an uninterrupted
    one does."""
    from conftest import compose_config

    from stm.app.run import build_components, build_trainer, seed_everything

    def run(max_steps, out, ckpt_path=None):
        cfg = compose_config("train", [
            "debug=limit", "data.mode=lanes", "data.batch_size=4", "data.val_batch_size=4", "memory=armt",
            "memory.armt.num_memory_tokens=4", "memory.armt.key_dim=8", "model.d_model=64", "model.n_layers=2",
            "task.segment_len=32", f"trainer.max_steps={max_steps}", "trainer.val_check_interval=3",
            "task.scheduler.total_steps=6", "+callbacks.model_checkpoint.every_n_train_steps=3",
            "callbacks.model_checkpoint.save_top_k=-1", "callbacks.progress_bar=null", "callbacks.lr_monitor=null",
            "logger=none"], out)
        seed_everything(cfg.seed)
        parts = build_components(cfg)
        trainer, _ = build_trainer(cfg)
        trainer.fit(parts["task"], datamodule=parts["datamodule"], ckpt_path=ckpt_path)
        weights = {k: v.clone() for k, v in parts["task"].state_dict().items()}
        return Path(cfg.callbacks.model_checkpoint.dirpath), weights

    _, full = run(6, tmp_path / "full")
    ckpt_dir, _ = run(3, tmp_path / "first")
    step3 = next(p for p in ckpt_dir.glob("*.ckpt") if "000003" in p.name)
    stored = torch.load(step3, map_location="cpu", weights_only=True)
    lane = state_from_plain(stored["stm"]["lane_state"])
    assert isinstance(lane, AssociativeState) and lane.matrices[0].abs().sum() > 0
    _, resumed = run(6, tmp_path / "resumed", ckpt_path=str(step3))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_task_adds_the_auxiliary_loss_to_its_training_loss_and_logs_it(tmp_path):
    """Under a real Trainer: the loss the optimizer gets is train/loss + train/aux/memory_norm."""
    from functools import partial

    import lightning as L

    from stm.tasks import LanguageModelTask

    class Capture(L.pytorch.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            self.seen.append((float(outputs["loss"]), float(metrics["train/loss"]),
                              float(metrics["train/aux/memory_norm"])))

    model = Transformer(vocab_size=V, d_model=D, n_layers=2, n_heads=4)
    memory = _PenalisedTokens(num_memory_tokens=2)
    memory.bind(model)
    task = LanguageModelTask(model, memory, optimizer=partial(torch.optim.AdamW, lr=1e-3), segment_len=8)
    x = torch.randint(0, V, (4, 25))
    batch = {"input_ids": x[:, :-1], "labels": x[:, 1:], "label_bytes": torch.ones(4, 24, dtype=torch.long)}
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], batch_size=2)
    capture = Capture()
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[capture], default_root_dir=tmp_path).fit(task, loader)
    assert len(capture.seen) == 2
    for total, loss, aux in capture.seen:
        assert aux > 0 and abs(total - (loss + aux)) < 1e-5
