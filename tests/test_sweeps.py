"""Sweeps, DDP, launchers and trainer presets: DDP inside a Hydra multirun, validation under DDP against one process,
an Optuna study with failing trials, the submitit path, launcher and trainer configs, torch.compile, wandb per job,
and the sweep-analysis notebook."""

from __future__ import annotations

import math
import re
from collections import Counter
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import compose_config, load_json, read_csv_metrics, run_script
from omegaconf import OmegaConf

from stm.analysis.wandb_offline import read_offline_run
from stm.app.run import build_trainer, compile_backbone, evaluate, train
from stm.app.sweeps import JobDDPStrategy, JobLauncher, NonFiniteMetricError

# segments of 48 bytes, 2 per chunk: the Austen validation text is 654 chunks, an even number, so two ranks
# read 327 each and no chunk is read twice (a padded shard would count one twice)
SWEEP = ["task=lm",
         "model.d_model=64", "model.n_layers=2", "task.segment_len=48", "data.batch_size=4",
         "data.val_batch_size=32", "trainer.max_steps=12", "trainer.val_check_interval=6",
         "trainer.log_every_n_steps=1", "task.scheduler.warmup_steps=3", "callbacks.progress_bar=null",
         "callbacks.model_summary=null"]
# smaller still, for the study and the submitit jobs
QUICK = ["task=lm",
         "model.d_model=32", "model.n_layers=1", "task.segment_len=32", "data.batch_size=4", "data.val_batch_size=8",
         "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
         "trainer.log_every_n_steps=1", "task.scheduler.warmup_steps=2", "callbacks.progress_bar=null",
         "callbacks.model_summary=null"]


def run_with_logs(logs: Path, args: list[str], timeout: int = 900):
    """`python train.py args` with its runs under `logs` (STM_LOG_DIR)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STM_LOG_DIR", str(logs))
        return run_script("train.py", args, timeout=timeout)


def log_times(path: Path) -> list[tuple[datetime, str]]:
    """(time, line) of every line of a job log that starts with a time stamp."""
    stamped = []
    for line in path.read_text().splitlines():
        match = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", line)
        if match:
            stamped.append((datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f"), line))
    return stamped


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory):
    """`python train.py -m memory=none,rmt trainer=ddp_cpu logger=wandb`: 2 jobs x 2 ranks."""
    logs = tmp_path_factory.mktemp("ddp_sweep")
    result = run_with_logs(logs, ["-m", "memory=none,rmt", "trainer=ddp_cpu", "logger=wandb", *SWEEP])
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    sweeps = list((logs / "train" / "multiruns").iterdir())
    return SimpleNamespace(logs=logs, sweeps=sweeps, sweep=sweeps[0], output=result.stdout + result.stderr)


@pytest.mark.slow
def test_ddp_inside_a_multirun_runs_each_job_on_two_ranks_one_after_the_other(ddp_sweep):
    assert len(ddp_sweep.sweeps) == 1, ddp_sweep.sweeps  # no nested sweep
    assert not (ddp_sweep.logs / "train" / "runs").exists()  # no rank ran as a single run elsewhere
    sweep = ddp_sweep.sweep
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"], jobs
    windows = []
    for job, memory in (("0", "none"), ("1", "rmt")):
        out = sweep / job
        assert f"memory={memory}" in OmegaConf.load(out / ".hydra" / "overrides.yaml")
        assert [p.name for p in out.glob("*.log")] == ["train.log"]  # one log for both ranks
        lines = log_times(out / "train.log")
        text = "\n".join(line for _, line in lines)
        assert "DDP: started 1 more rank(s)" in text and "[rank 1] - rank 1 of the job ended" in text
        assert "DDP: the other ranks of this job ended (exit codes [0])" in text
        assert any("[rank 1]" in line and "model: Transformer" in line for line in text.splitlines())
        ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
        assert ckpt["global_step"] == 12 and ckpt["stm"]["config"]["trainer"]["devices"] == 2
        assert ckpt["stm"]["config"]["paths"]["output_dir"] == str(out)
        windows.append((lines[0][0], lines[-1][0]))
    assert windows[0][1] <= windows[1][0], windows  # job 1 started after both ranks of job 0 had ended


@pytest.mark.slow
def test_validation_under_ddp_equals_one_process(ddp_sweep, tmp_path):
    """The same checkpoint validated on 2 ranks (during training, and by eval.py trainer=ddp_cpu) and in one
    process: the same corpus-level loss."""
    from stm.data import ByteTokenizer, TextDataModule

    data = TextDataModule(ByteTokenizer(), chunk_len=96, sample="austen")
    data.setup()
    assert len(data.val_set) % 2 == 0, "an odd number of validation chunks: one rank would read one twice"
    ckpt = ddp_sweep.sweep / "1" / "checkpoints" / "last.ckpt"
    recorded = torch.load(ckpt, weights_only=False)["stm"]["val_metrics"]  # rank 0 and 1, during training
    single = evaluate(compose_config("eval", [f"ckpt_path={ckpt}"], tmp_path / "single"))
    result = run_script("eval.py", [f"ckpt_path={ckpt}", "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'ddp'}"],
                        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = load_json(tmp_path / "ddp" / "eval_metrics.json")
    assert report["world_size"] == 2
    for key in ("val/loss", "val/bpb"):
        assert math.isclose(single[key], recorded[key], rel_tol=1e-5), (key, single[key], recorded[key])
        assert math.isclose(report["metrics"][key], single[key], rel_tol=1e-5), (key, report["metrics"], single)
    print(f"val/loss: one process {single['val/loss']!r}, 2 ranks in training {recorded['val/loss']!r}, "
          f"2 ranks by eval.py {report['metrics']['val/loss']!r}")


@pytest.mark.slow
def test_wandb_one_run_per_job_grouped_by_the_sweep(ddp_sweep):
    groups, names = set(), set()
    for job in ("0", "1"):
        out = ddp_sweep.sweep / job
        runs = list(out.glob("wandb/offline-run-*"))
        assert len(runs) == 1, runs  # rank 1 starts no run of its own
        run = read_offline_run(runs[0])
        assert run.run_id == (out / "wandb_id.txt").read_text().strip()
        assert run.tags == ["dev"]
        wandb_cfg = run.config["logger"]["wandb"]  # the resolved config, as the run used it
        groups.add(wandb_cfg["group"])
        names.add(wandb_cfg["name"])
        assert run.config["trainer"]["devices"] == 2
    assert groups == {f"train-{ddp_sweep.sweep.name}"}
    assert len(names) == 2 and all(re.match(r"[01]:", n) for n in names), names


@pytest.mark.slow
def test_sweep_analysis_notebook(ddp_sweep, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("STM_SWEEP_DIR", str(ddp_sweep.sweep))
    monkeypatch.setenv("STM_ANALYSIS_DIR", str(tmp_path))
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "sweep_analysis.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    import pandas as pd

    summary = pd.read_csv(tmp_path / "sweep_summary.csv", dtype={"job": str}).set_index("job")
    assert sorted(summary["config"]) == ["memory=none", "memory=rmt"]
    for job in ("0", "1"):
        csv = read_csv_metrics(ddp_sweep.sweep / job / "csv" / "metrics.csv")
        assert math.isclose(summary.loc[job, "final val/loss"], csv["val/loss"][-1][1], rel_tol=1e-9)
        assert math.isclose(summary.loc[job, "wandb val/loss"], csv["val/loss"][-1][1], rel_tol=1e-6)
        assert summary.loc[job, "wandb run"] == (ddp_sweep.sweep / job / "wandb_id.txt").read_text().strip()
        assert summary.loc[job, "steps"] == 12 and bool(summary.loc[job, "finished"])
    assert (tmp_path / "learning_curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_optuna_study_records_failed_trials_and_goes_on(tmp_path):
    """4 trials, 2 at a time through joblib: lr=inf diverges (NaN loss), lr=-1 raises; both are recorded as
    FAIL and the two others COMPLETE with the val/loss train.py returned. The same command later adds trials
    to the same study (sqlite storage outside the sweep folder)."""
    import optuna

    logs = tmp_path / "logs"
    # the random sampler with seed 9 draws the four values once each: 0.003, inf, -1, 0.001 (the grid sampler
    # would too, but hydra-optuna-sweeper 1.2 ends the sweep with an error when the trial completing a grid fails)
    args = ["-m", "hparams_search=optuna", "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=9",
            "hydra.sweeper.params=null", "task.optimizer.lr=choice(0.001,0.003,inf,-1)", "hydra.sweeper.n_trials=4",
            "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2", *QUICK]
    result = run_with_logs(logs, args)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    storage = f"sqlite:///{logs / 'train' / 'optuna.db'}"
    study = optuna.load_study(study_name="train", storage=storage)
    states = Counter(t.state.name for t in study.trials)
    assert states == {"COMPLETE": 2, "FAIL": 2}, states
    failed = {t.params["task.optimizer.lr"] for t in study.trials if t.state.name == "FAIL"}
    assert failed == {-1, math.inf}, failed
    sweep = next((logs / "train" / "multiruns").iterdir())
    for trial in study.trials:  # job n of the sweep is trial n
        if trial.state.name == "COMPLETE":
            csv = read_csv_metrics(sweep / str(trial.number) / "csv" / "metrics.csv")
            assert math.isclose(trial.value, csv["val/loss"][-1][1], rel_tol=1e-6)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert math.isclose(best.best_value, study.best_value) and best.best_params["task.optimizer.lr"] in (0.001, 0.003)
    log = result.stdout + result.stderr
    assert "train/loss is not finite" in log and "Invalid learning rate: -1" in log

    # the same search again, one more trial: it joins the study
    again = run_with_logs(logs, [a for a in args if "joblib" not in a and "n_jobs" not in a and "n_trials" not in a]
                          + ["hydra.sweeper.n_trials=1"])
    assert again.returncode == 0, again.stderr[-3000:]
    trials = optuna.load_study(study_name="train", storage=storage).trials
    assert len(trials) == 5
    assert all((t.state.name == "FAIL") == (t.params["task.optimizer.lr"] in (-1, math.inf)) for t in trials)


@pytest.mark.slow
def test_submitit_local_runs_each_job_in_its_own_process(tmp_path):
    """The submitit path for real: one job on one process, one DDP job whose second rank the job starts."""
    logs = tmp_path / "logs"
    result = run_with_logs(logs, ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                                  "trainer=cpu,ddp_cpu", *QUICK])
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    sweep = next((logs / "train" / "multiruns").iterdir())
    submitted = [p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert len(submitted) == 2 and all(list(p.glob("*_result.pkl")) for p in submitted)
    assert all("JobEnvironment" in "".join(f.read_text() for f in p.glob("*_log.*")) for p in submitted)
    for job in ("0", "1"):
        assert torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert "[rank 1]" in (sweep / "1" / "train.log").read_text()
    assert "[rank 1]" not in (sweep / "0" / "train.log").read_text()


def test_launcher_configs(tmp_path):
    """The launcher configs resolve with the trainer they run, and submitit turns them into a valid sbatch."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from submitit.slurm.slurm import _make_sbatch_string

    from stm.app.config import config_dir

    def launcher(overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
            cfg = compose("train", overrides=[*overrides, f"paths.log_dir={tmp_path}"], return_hydra_config=True)
        HydraConfig().set_config(cfg)
        return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)

    assert launcher(["hydra/launcher=joblib"])["_target_"].endswith("JoblibLauncher")
    assert launcher(["hydra/launcher=joblib"])["n_jobs"] == 2
    local = launcher(["hydra/launcher=submitit_local"])
    assert local["_target_"].endswith("LocalLauncher") and local["tasks_per_node"] == 1
    slurm = launcher(["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2",
                      "hydra.launcher.partition=gpu"])
    assert (slurm["nodes"], slurm["tasks_per_node"], slurm["gpus_per_node"]) == (2, 8, 8)
    assert slurm["max_num_timeout"] >= 1 and slurm["signal_delay_s"] == 120
    assert slurm["submitit_folder"].endswith(".submitit/%j")
    assert launcher(["hydra/launcher=submitit_slurm"])["gpus_per_node"] is None  # the CPU trainer asks for no GPU
    sbatch = _make_sbatch_string(
        command="python -u -m submitit.core._submit", folder=str(tmp_path), job_name=slurm["name"],
        partition=slurm["partition"], time=slurm["timeout_min"], nodes=slurm["nodes"],
        ntasks_per_node=slurm["tasks_per_node"], gpus_per_node=slurm["gpus_per_node"],
        cpus_per_task=slurm["cpus_per_task"], signal_delay_s=slurm["signal_delay_s"],
        additional_parameters=slurm["additional_parameters"])
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--time=240", "--signal=USR2@120",
                 "--partition=gpu"):
        assert f"#SBATCH {line}" in sbatch, (line, sbatch)


def test_trainer_presets(tmp_path):
    ddp = compose_config("train", ["trainer=ddp"], tmp_path)
    assert ddp.trainer.strategy._target_ == "stm.app.sweeps.JobDDPStrategy"
    assert (ddp.trainer.accelerator, ddp.trainer.precision, ddp.trainer.strategy.process_group_backend) == \
        ("gpu", "bf16-mixed", "nccl")
    cfg = compose_config("train", ["trainer=ddp_cpu"], tmp_path)
    trainer, _ = build_trainer(cfg)
    assert isinstance(trainer.strategy, JobDDPStrategy) and trainer.world_size == 2
    assert trainer.strategy.process_group_backend == "gloo"
    trainer.strategy._configure_launcher()
    assert isinstance(trainer.strategy.launcher, JobLauncher)


class KnobEffects(L.pytorch.Callback):
    """Records, for every training batch, the dtype of the backbone's logits, the optimizer steps so far and the
    largest gradient entry after it (in the class: Hydra builds the callback from the config)."""

    seen: list = []

    def on_fit_start(self, trainer, pl_module):
        KnobEffects.seen, self.dtype = [], None

        def keep_dtype(module, inputs, output):
            self.dtype = output.dtype

        pl_module.model.lm_head.register_forward_hook(keep_dtype)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        largest = max(float(p.grad.abs().max()) for p in pl_module.parameters() if p.grad is not None)
        KnobEffects.seen.append((self.dtype, trainer.global_step, largest))


def test_precision_accumulation_and_clipping_knobs(tmp_path):
    """bf16-mixed: the backbone's logits in bfloat16; accumulate_grad_batches=2: 4 batches make 2 optimizer steps;
    gradient_clip_val=1e-4 by value: after each step every gradient entry is at most 1e-4, and some are exactly
    that (an untrained model's gradients are larger)."""
    cfg = compose_config("train", ["model.d_model=32", "model.n_layers=1", "task.segment_len=32",
                                   "data.batch_size=2", "data.val_batch_size=2", "trainer.max_steps=2",
                                   "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "callbacks=none",
                                   "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2",
                                   "trainer.gradient_clip_val=1e-4", "trainer.gradient_clip_algorithm=value",
                                   "+callbacks.knobs._target_=test_sweeps.KnobEffects"], tmp_path)
    train(cfg)
    assert [(dtype, step) for dtype, step, _ in KnobEffects.seen] == [(torch.bfloat16, 0), (torch.bfloat16, 1),
                                                                      (torch.bfloat16, 1), (torch.bfloat16, 2)]
    for _, _, largest in KnobEffects.seen[1::2]:  # the batches that ended with an optimizer step
        assert largest == pytest.approx(1e-4, rel=1e-6)
    assert all(largest > 1e-3 for _, _, largest in KnobEffects.seen[0::2])  # accumulated, not yet clipped


def test_compile_switch_compiles_the_backbone(tmp_path):
    from torch._dynamo.utils import counters

    from stm.models import Transformer

    model = Transformer(vocab_size=259, d_model=32, n_layers=1, n_heads=4)
    compile_backbone(model, False)
    assert model._compiled_call_impl is None
    compile_backbone(model, OmegaConf.create({"backend": "eager"}))
    assert model._compiled_call_impl is not None
    torch._dynamo.reset()
    counters.clear()
    small = ["debug=fast_dev_run", "model.d_model=32", "model.n_layers=1", "task.segment_len=32", "data.batch_size=2",
             "data.val_batch_size=2"]
    compiled = train(compose_config("train", [*small, "run.compile={backend:eager}"], tmp_path / "compiled"))
    assert counters["stats"]["calls_captured"] > 0, dict(counters["stats"])  # dynamo traced the backbone
    torch._dynamo.reset()
    eager = train(compose_config("train", small, tmp_path / "eager"))
    assert math.isclose(compiled, eager, rel_tol=1e-5), (compiled, eager)  # the same run, the same numbers


def test_a_diverging_run_raises_so_a_sweeper_records_a_failure(tmp_path):
    cfg = compose_config("train", ["debug=limit", "model.d_model=32", "model.n_layers=1", "task.segment_len=32",
                                   "data.batch_size=2", "data.val_batch_size=2", "task.optimizer.lr=inf"], tmp_path)
    with pytest.raises(NonFiniteMetricError, match="train/loss is not finite at step"):
        train(cfg)


def test_validation_shards_cover_each_chunk_once():
    from stm.data.sampling import ShardedSampler

    n, world = 981, 2  # the Austen validation chunks of 64 bytes
    samplers = [ShardedSampler(n, rank=rank, world_size=world, shuffle=False, pad=False) for rank in range(world)]
    seen = [i for sampler in samplers for i in sampler]
    assert [len(s) for s in samplers] == [491, 490]
    assert sorted(seen) == list(range(n))
