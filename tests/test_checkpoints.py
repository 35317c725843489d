"""Checkpoints that cannot run code: eval.py and train.py read a checkpoint as data only (weights_only=True),
refuse one whose pickle (or stored config) would run code unless trust_checkpoint=true, and name what is missing
from a checkpoint's stored config."""

from __future__ import annotations

import builtins
import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config, run_script
from omegaconf import DictConfig, OmegaConf

from stm.app.checkpoint_config import apply_eval_overrides
from stm.app.config import ConfigError
from stm.app.resume import UntrustedCheckpointError
from stm.app.run import build_components, evaluate, load_checkpoint_config, train
from stm.app.warm_start import warm_start

# a small model on stream lanes with a carried xl memory, so that the checkpoint holds a lane memory state too
TINY = ["task=lm", "debug=limit", "model.d_model=64", "model.n_layers=2", "task.segment_len=32",
        "data.mode=lanes", "memory=xl", "memory.xl.mem_len=32", "data.batch_size=4", "data.val_batch_size=4",
        "callbacks.progress_bar=null", "callbacks.model_summary=null", "callbacks.lr_monitor=null"]


class CreatesFile:
    """Unpickled, this opens (creates) `path` for writing: a stand-in for any code a checkpoint's pickle runs."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real 6-step training run (train()); returns its checkpoints folder."""
    out = tmp_path_factory.mktemp("tiny_run")
    train(compose_config("train", TINY, out))
    return out / "checkpoints"


def stored(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def malicious_copy(ckpt: Path, to: Path, marker: Path) -> Path:
    """`ckpt` with an object added whose unpickling creates `marker` (everything else stays a valid checkpoint)."""
    checkpoint = stored(ckpt)
    checkpoint["callbacks"]["Evil"] = CreatesFile(marker)
    torch.save(checkpoint, to)
    return to


def with_config(ckpt: Path, to: Path, edit) -> Path:
    """`ckpt` with its stored stm config changed by `edit(config)`."""
    checkpoint = stored(ckpt)
    edit(checkpoint["stm"]["config"])
    torch.save(checkpoint, to)
    return to


def assert_refused(output: str, ckpt: Path) -> None:
    assert f"refused to load {ckpt}: its pickle calls io.open, which is code, not data" in output, output[-3000:]
    assert "Nothing in it was run" in output and "trust_checkpoint=true" in output
    assert "Missing key" not in output


def test_a_checkpoint_of_a_run_is_plain_data_and_evaluates_to_its_recorded_metrics(tiny_run, tmp_path,
                                                                                     monkeypatch):
    best = next(tiny_run.glob("best-step*.ckpt"))
    checkpoint = stored(best)  # weights_only=True reads all of it, lane memory state included
    assert type(checkpoint["stm"]["config"]) is dict and checkpoint["stm"]["config"]["memory"]["xl"]
    assert "hyper_parameters" not in checkpoint
    lane = checkpoint["stm"]["lane_state"]  # xl's cache of the 4 lanes: 2 layers x (4, 4 heads, 32 tokens, 16)
    assert lane["__state__"] == "stm.memory.kv_cache:KVCache"
    assert [tuple(t.shape) for t in lane["keys"] + lane["values"]] == [(4, 4, 32, 16)] * 4

    loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)  # stm's reads and Lightning's (cloud_io calls torch.load)
    metrics = evaluate(compose_config("eval", [f"ckpt_path={best}", "logger=none", "trainer.limit_val_batches=2"],
                                      tmp_path))  # validated as in training (debug=limit: 2 batches)
    assert len(loads) >= 2 and all(w is True for w in loads), loads
    recorded = checkpoint["stm"]["val_metrics"]
    for key in ("val/loss", "val/bpb"):
        assert math.isclose(metrics[key], recorded[key], rel_tol=1e-5), (key, metrics[key], recorded[key])


def test_eval_overrides_change_the_data_and_decoding_of_a_run_config(tiny_run, tmp_path):
    """eval.py's data_overrides and generation_overrides are merged into the run config it builds from; the rest
    of task.generation stays; a generation override for a task that does not generate is refused, naming it."""
    qa = compose_config("train", ["task=qa", "task.generation.max_new_tokens=7"], tmp_path / "qa")
    eval_cfg = OmegaConf.create({"data_overrides": {"val_batch_size": 3},
                                 "generation_overrides": {"segment_overflow": "extend"}})
    before = OmegaConf.to_container(qa.task.generation)
    run_cfg = apply_eval_overrides(qa, eval_cfg)
    assert OmegaConf.to_container(run_cfg.task.generation) == {**before, "segment_overflow": "extend"}
    assert before["segment_overflow"] == "push" and before["max_new_tokens"] == 7
    assert run_cfg.data.val_batch_size == 3

    lm_cfg, _ = load_checkpoint_config(tiny_run / "last.ckpt")
    with pytest.raises(ConfigError, match=r"generation_overrides \(segment_overflow\): the task "
                                          r"stm.tasks.LanguageModelTask has no task.generation to change"):
        apply_eval_overrides(lm_cfg, eval_cfg)


def test_eval_refuses_a_checkpoint_whose_pickle_runs_code(tiny_run, tmp_path):
    marker = tmp_path / "created_by_the_checkpoint"
    evil = malicious_copy(tiny_run / "last.ckpt", tmp_path / "evil.ckpt", marker)
    unsafe_marker = tmp_path / "unsafe_load_creates_this"
    torch.load(malicious_copy(tiny_run / "last.ckpt", tmp_path / "probe.ckpt", unsafe_marker), weights_only=False)
    assert unsafe_marker.exists()  # the file is a real attack: unpickled fully, it runs its code

    result = run_script("eval.py", [f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'out'}"], timeout=300)
    assert result.returncode != 0
    assert not marker.exists()
    assert_refused(result.stdout + result.stderr, evil)


def test_train_resume_refuses_a_checkpoint_whose_pickle_runs_code(tiny_run, tmp_path):
    marker = tmp_path / "created_by_the_checkpoint"
    evil = malicious_copy(tiny_run / "last.ckpt", tmp_path / "evil.ckpt", marker)
    out = tmp_path / "out"
    result = run_script("train.py", TINY + [f"ckpt_path={evil}", f"hydra.run.dir={out}"], timeout=300)
    assert result.returncode != 0
    assert not marker.exists()
    assert_refused(result.stdout + result.stderr, evil)
    assert not (out / "checkpoints").exists()  # refused before anything was built or trained

    # resume=auto finds a run folder's last.ckpt: read the same way
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    malicious_copy(tiny_run / "last.ckpt", run_dir / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(UntrustedCheckpointError, match=r"resume=auto: refused to load .*last.ckpt: its pickle calls"):
        train(compose_config("train", TINY + ["resume=auto"], run_dir))
    assert not marker.exists()


def test_trust_checkpoint_loads_a_file_fully(tiny_run, tmp_path):
    marker = tmp_path / "created_by_the_checkpoint"
    evil = malicious_copy(tiny_run / "last.ckpt", tmp_path / "evil.ckpt", marker)
    overrides = [f"ckpt_path={evil}", "trust_checkpoint=true", "logger=none", "trainer.limit_val_batches=2"]
    metrics = evaluate(compose_config("eval", overrides, tmp_path / "out"))
    assert marker.exists() and math.isfinite(metrics["val/loss"])  # the user said so: it ran
    with pytest.raises(ConfigError, match="trust_checkpoint must be true or false, got 'yes'"):
        evaluate(compose_config("eval", [f"ckpt_path={evil}", "trust_checkpoint=yes"], tmp_path / "out2"))


def test_an_older_checkpoint_with_an_omegaconf_config_gets_a_clear_error(tiny_run, tmp_path):
    checkpoint = stored(tiny_run / "last.ckpt")
    checkpoint["stm"]["config"] = OmegaConf.create(checkpoint["stm"]["config"])
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    with pytest.raises(UntrustedCheckpointError, match=r"refused to load .*old.ckpt: it stores an omegaconf object "
                                                       r"\(omegaconf.dictconfig.DictConfig\), as checkpoints of older"):
        load_checkpoint_config(old)
    config, recorded = load_checkpoint_config(old, trust=True)
    assert isinstance(config, DictConfig) and config.memory.xl.mem_len == 32 and "val/loss" in recorded


def test_a_stored_config_without_what_eval_builds_is_named(tiny_run, tmp_path):
    last = tiny_run / "last.ckpt"
    no_stm = tmp_path / "no_stm.ckpt"
    checkpoint = stored(last)
    del checkpoint["stm"]
    torch.save(checkpoint, no_stm)
    with pytest.raises(ValueError, match=r"ckpt_path: .*no_stm.ckpt is not an stm checkpoint \(no 'stm' config"):
        load_checkpoint_config(no_stm)

    no_task = with_config(last, tmp_path / "no_task.ckpt", lambda c: c.pop("task"))
    with pytest.raises(ConfigError, match=r"ckpt_path: the stm config stored in .*no_task.ckpt has no 'task' section "
                                          r"\(checkpoint key stm.config.task\)"):
        evaluate(compose_config("eval", [f"ckpt_path={no_task}", "logger=none"], tmp_path / "out"))
    no_target = with_config(last, tmp_path / "no_target.ckpt", lambda c: c["model"].pop("_target_"))
    with pytest.raises(ConfigError, match=r"no_target.ckpt has no 'model._target_' \(checkpoint key "
                                          r"stm.config.model._target_\)"):
        load_checkpoint_config(no_target)


def test_a_stored_config_that_builds_code_outside_stm_is_refused(tiny_run, tmp_path):
    last = tiny_run / "last.ckpt"
    shell = with_config(last, tmp_path / "shell.ckpt", lambda c: c["model"].update(_target_="os.system"))
    with pytest.raises(UntrustedCheckpointError, match=r"refused to evaluate .*shell.ckpt: .* builds "
                                                       r"model._target_=os.system, which is not one of stm.models"):
        load_checkpoint_config(shell)
    # a path through stm that leads out of it
    detour = with_config(last, tmp_path / "detour.ckpt", lambda c: c["task"]["optimizer"].update(
        _target_="stm.tasks.lm.torch.load"))
    with pytest.raises(UntrustedCheckpointError, match=r"builds task.optimizer._target_=stm.tasks.lm.torch.load"):
        load_checkpoint_config(detour)
    remote = with_config(last, tmp_path / "remote.ckpt", lambda c: c["model"].update(trust_remote_code=True))
    with pytest.raises(UntrustedCheckpointError, match=r"sets model.trust_remote_code=True"):
        load_checkpoint_config(remote)
    config, _ = load_checkpoint_config(shell, trust=True)  # trusted: the user's own classes are theirs to build
    assert config.model._target_ == "os.system"


# ------------------------------------------------------------------------------- init_from (warm start)

def test_init_from_copies_the_matching_weights_and_leaves_the_memory_fresh(tiny_run, tmp_path):
    last = tiny_run / "last.ckpt"
    rmt = [o for o in TINY if not o.startswith("memory")] + ["memory=rmt", "memory.rmt.num_memory_tokens=4"]
    cfg = compose_config("train", rmt, tmp_path)
    task = build_components(cfg)["task"]
    before = {k: v.clone() for k, v in task.state_dict().items()}
    report = warm_start(task, last)
    saved = stored(last)["state_dict"]
    after = task.state_dict()
    assert report.loaded and all(torch.equal(after[k], saved[k]) for k in report.loaded)
    changed = [k for k in report.loaded if not torch.equal(before[k], saved[k])]
    assert len(changed) >= len(report.loaded) // 2  # the fresh model differed from the trained one
    # rmt's memory tokens are not in an xl checkpoint: left as initialised, and named
    assert report.fresh and all("memory" in k for k in report.fresh), report.fresh
    assert all(torch.equal(after[k], before[k]) for k in report.fresh)
    assert set(report.loaded) | set(report.fresh) == set(after) and report.unused == []
    assert f"init_from: {len(report.loaded)} tensors from {last}" in report.describe()


def test_init_from_refuses_weights_of_another_shape(tiny_run, tmp_path):
    cfg = compose_config("train", [*TINY, "model.d_model=32"], tmp_path)
    task = build_components(cfg)["task"]
    wrong = r"init_from: .* other shapes .*: checkpoint \(\d+, 64\), this run \(\d+, 32\)"
    with pytest.raises(ValueError, match=wrong):
        warm_start(task, tiny_run / "last.ckpt")


def test_init_from_starts_a_new_run_and_refuses_ckpt_path_beside_it(tiny_run, tmp_path):
    last = tiny_run / "last.ckpt"
    with pytest.raises(ConfigError, match="init_from=.* and ckpt_path=.*: set one"):
        train(compose_config("train", [*TINY, f"init_from={last}", f"ckpt_path={last}"], tmp_path / "both"))
    train(compose_config("train", [*TINY, f"init_from={last}"], tmp_path / "warm"))
    warm = stored(tmp_path / "warm" / "checkpoints" / "last.ckpt")
    assert warm["global_step"] == stored(last)["global_step"] == 6  # its own 6 steps, not 6 more after the first run's


def test_init_from_refuses_a_checkpoint_whose_pickle_runs_code(tiny_run, tmp_path):
    marker = tmp_path / "created"
    bad = malicious_copy(tiny_run / "last.ckpt", tmp_path / "bad.ckpt", marker)
    task = build_components(compose_config("train", TINY, tmp_path))["task"]
    with pytest.raises(UntrustedCheckpointError):
        warm_start(task, bad)
    assert not marker.exists()
