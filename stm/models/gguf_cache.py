"""GGUF files read once: the de-quantised model and its tokenizer kept as a local Hugging Face folder.

transformers reads a GGUF file by parsing its whole metadata block (for SmolLM2, 49,152 vocabulary strings) in
Python, twice per model load and again for the tokenizer: about 25 s for SmolLM2-135M on one core, where the
same weights load from safetensors in about a second. The first load of a GGUF file converts it into

    $STM_CACHE_DIR/gguf/<key>/model/        config.json + model.safetensors (float32, as de-quantised)
    $STM_CACHE_DIR/gguf/<key>/tokenizer/    tokenizer.json, tokenizer_config.json (with the chat template)

and every later load (of the model or its tokenizer, in any job of a sweep) reads that folder. The key covers
the GGUF file (absolute path, size, modification time) and the transformers version that converted it, so a
changed file or library converts again. Safetensors and JSON hold no code: nothing in the cache runs on load.
Entries are written under a temporary name and renamed, so concurrent jobs never read half an entry.
`STM_GGUF_CACHE=0` reads the GGUF file every time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from stm.constants import CACHE_DIR_ENV, DEFAULT_CACHE_DIR

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DISABLE_ENV = "STM_GGUF_CACHE"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def entry_dir(gguf_path: str | Path) -> Path:
    """The cache folder of one GGUF file (whether or not it has been converted yet)."""
    import transformers

    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a GGUF file")
    stat = path.stat()
    key = json.dumps([FORMAT_VERSION, str(path), stat.st_size, stat.st_mtime_ns, transformers.__version__])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)).expanduser()
    return root / "gguf" / f"{path.stem}-{digest}"


def _converted(part: str, folder: str | Path, gguf_file: str, save: Callable[[Path], None]) -> Path:
    """The cached `part` ("model" or "tokenizer") of folder/gguf_file, written by `save(tmp_folder)` if missing."""
    target = entry_dir(Path(folder) / gguf_file) / part
    if (target / "config.json").is_file() or (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=target.parent))
    try:
        log.info("%s: converting the %s of %s once into %s", gguf_file, part, folder, target)
        save(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another job renamed its copy first: keep that one
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_folder(folder: str | Path, gguf_file: str) -> Path:
    """A folder holding folder/gguf_file's model as safetensors (float32), converted on the first call."""
    import torch
    from transformers import AutoModelForCausalLM

    def save(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
        # a model read from GGUF counts as quantized and refuses save_pretrained: its de-quantised weights go into
        # a plain model of the same config
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp, safe_serialization=True)

    return _converted("model", folder, gguf_file, save)


def tokenizer_folder(folder: str | Path, gguf_file: str) -> Path:
    """A folder holding folder/gguf_file's tokenizer (tokenizer.json and its config), converted on the first call."""
    from transformers import AutoTokenizer

    def save(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file).save_pretrained(tmp)

    return _converted("tokenizer", folder, gguf_file, save)
