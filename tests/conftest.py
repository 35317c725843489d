"""Shared fixtures: composing the real Hydra configs, and running the real default job once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from stm.app import resolvers  # noqa: F401  (the OmegaConf resolvers conf/ uses, as train.py registers them)
from stm.app.config import config_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("STM_CACHE_DIR", tempfile.mkdtemp(prefix="stm-test-cache-"))  # tests never touch ~/.cache
os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/<config_name>.yaml with overrides, as `python train.py ...` would, writing to output_dir.

    The train config is composed as a language-modelling run (`task=lm`, the base most tests build on) unless
    the overrides choose a task or an experiment: the default job itself (task=probe) is run by `default_job`.
    """
    if config_name == "train" and not any(o.split("=")[0].lstrip("+~") in ("task", "experiment") for o in overrides):
        overrides = ["task=lm", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        del cfg["hydra"]
    return cfg


@pytest.fixture
def train_config(tmp_path):
    """compose the train config with overrides: train_config(["model=small", ...])."""
    return lambda overrides=(): compose_config("train", list(overrides), tmp_path)


def run_script(script: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def default_job(tmp_path_factory) -> Path:
    """Run the real default job (`python train.py`, no overrides) once; returns its output folder."""
    out = tmp_path_factory.mktemp("default_job")
    result = run_script("train.py", [f"hydra.run.dir={out}"])
    assert result.returncode == 0, f"default job failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    (out / "stdout.txt").write_text(result.stdout + result.stderr)
    return out


def read_csv_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv -> {metric: [(step, value), ...]} for the cells that hold a value."""
    import csv

    series: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


class KeepTask(L.pytorch.Callback):
    """Keeps the task and data module of the latest validation, so that a test can recompute its numbers after
    `train(cfg)`: add it with `KEEP_TASK` (`+callbacks.keep._target_=conftest.KeepTask`) and read `KeepTask.last`
    (a class attribute: Hydra builds the callback from the config)."""

    last: dict = {}

    def on_validation_end(self, trainer, pl_module):
        KeepTask.last = {"task": pl_module, "datamodule": trainer.datamodule}


KEEP_TASK = "+callbacks.keep._target_=conftest.KeepTask"


def recomputed_val_loss(task, datamodule, n_batches: int | None = None, carry_lanes: bool = True) -> float:
    """The validation loss of `task` as it is now, computed here batch by batch: the summed NLL of the labels
    over their count (a context -> target task: of the target tokens only), over the first `n_batches`
    validation batches (None: all). Batches of stream lanes carry the memory from batch to batch as validation
    does, or, with `carry_lanes=False`, start each from a fresh memory."""
    import torch

    from stm.constants import IGNORE_INDEX
    from stm.tasks import ConditionalLMTask

    task.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        task.lane_states.pop("val", None)
        for i, batch in enumerate(datamodule.val_dataloader()):
            if n_batches is not None and i == n_batches:
                break
            if not carry_lanes:
                task.lane_states.pop("val", None)
            run = task(batch)
            counted = batch["labels"] != IGNORE_INDEX
            if isinstance(task, ConditionalLMTask):
                counted &= batch["target_mask"].bool()
            # a batch's sum in float32, added up in float64, as stm.metrics.lm.LanguageModelMetrics does
            nll += float((run.token_nll * counted).sum())
            count += int(counted.sum())
    return nll / count


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# --- every memory mechanism, from the one place that lists them: the options of conf/memory/ ----------------

def memory_options() -> list[str]:
    """The mechanisms: every option of the `memory` config group (conf/memory/<name>.yaml)."""
    return sorted(p.stem for p in (config_dir() / "memory").glob("*.yaml"))


def small_memory(name: str, **sizes):
    """Mechanism `name` (or a composition "a+b") built from its YAML, with any option named in `sizes` that the
    YAML has set to that value (small sizes that matter in short test streams), not yet bound."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from stm.memory import ComposedMemory

    if "+" in name:
        return ComposedMemory([small_memory(part, **sizes) for part in name.split("+")])
    cfg = OmegaConf.load(config_dir() / "memory" / f"{name}.yaml")
    for key, value in sizes.items():
        if key in cfg:
            cfg[key] = value
    return instantiate(cfg)


def memory_names(**sizes) -> list[str]:
    """Every mechanism, and every pair of them that may compose (a composition that builds, binds and prepares
    without an error; `none` composes with anything and is left out of pairs)."""
    import itertools

    import torch

    from stm.models import Transformer

    options = memory_options()
    model = Transformer(vocab_size=16, d_model=16, n_layers=1, n_heads=2)
    pairs = []
    for a, b in itertools.combinations([o for o in options if o != "none"], 2):
        try:
            memory = small_memory(f"{a}+{b}", **sizes)
            memory.bind(model)
            memory.prepare(memory.init_state(1, torch.device("cpu")))
        except ValueError:
            continue
        pairs.append(f"{a}+{b}")
    return options + pairs


def save_tiny_llama(path: Path, vocab_size: int = 300) -> Path:
    """A tiny random Llama (2 layers, d_model 32, 4 heads over 2 kv heads, rotary), saved with save_pretrained
    into `path`: a pretrained model's folder for `model=hf model.name_or_path=<path>`, offline. The default
    vocabulary of 300 holds the byte tokenizer's 259 ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.2, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path
