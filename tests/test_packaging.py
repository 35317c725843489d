"""stm as a wheel: the Hydra configs (conf/) ship inside it as `stm.conf`, and stm-train / stm-eval run from an
empty folder with nothing of the checkout on the path; a user's own config folder adds to stm's groups."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

import stm
import stm.app.config
from stm.app.config import config_dir

ROOT = Path(__file__).resolve().parents[1]


# --- fast checks ---------------------------------------------------------------------------------------------


def test_config_dir_finds_train_yaml():
    conf = config_dir()
    assert (conf / "train.yaml").is_file() and (conf / "eval.yaml").is_file()
    if Path(stm.__file__).resolve().parent == ROOT / "stm":  # a checkout or an editable install of it
        assert conf == ROOT / "conf"


def _fake_install(root: Path, *, installed_conf: bool, checkout_conf: bool, pyproject: bool) -> Path:
    """A folder laid out as site-packages (stm/ with or without conf/) or a checkout; returns its stm/app/config.py."""
    (root / "stm" / "app").mkdir(parents=True)
    if installed_conf:
        (root / "stm" / "conf").mkdir()
        (root / "stm" / "conf" / "train.yaml").write_text("x: installed\n")
    if checkout_conf:
        (root / "conf").mkdir()
        (root / "conf" / "train.yaml").write_text("x: checkout\n")
    if pyproject:
        (root / "pyproject.toml").write_text("[project]\nname = 'stm'\n")
    return root / "stm" / "app" / "config.py"


def test_config_dir_prefers_the_wheels_copy(tmp_path, monkeypatch):
    fake = _fake_install(tmp_path, installed_conf=True, checkout_conf=True, pyproject=False)
    monkeypatch.setattr(stm.app.config, "__file__", str(fake))
    assert config_dir() == (tmp_path / "stm" / "conf").resolve()


def test_config_dir_reads_a_checkouts_conf(tmp_path, monkeypatch):
    fake = _fake_install(tmp_path, installed_conf=False, checkout_conf=True, pyproject=True)
    monkeypatch.setattr(stm.app.config, "__file__", str(fake))
    assert config_dir() == (tmp_path / "conf").resolve()


def test_config_dir_ignores_a_stray_conf_in_site_packages(tmp_path, monkeypatch):
    # a top-level conf/ next to stm/ without a pyproject.toml is some other project's, not a checkout of stm
    fake = _fake_install(tmp_path, installed_conf=False, checkout_conf=True, pyproject=False)
    monkeypatch.setattr(stm.app.config, "__file__", str(fake))
    with pytest.raises(FileNotFoundError, match=r"train\.yaml.*installed package at .*stm/conf.*checkout at"):
        config_dir()


def test_pyproject_lists_every_package():
    """pyproject.toml lists stm's packages by hand (packages.find cannot map conf/ to stm.conf): none missing."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    setuptools_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "stm").rglob("__init__.py")}
    listed = set(setuptools_cfg["packages"])
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == {"stm.conf"}, "pyproject.toml lists packages that stm/ does not have"
    assert setuptools_cfg["package-dir"] == {"stm.conf": "conf"}
    assert "**/*.yaml" in setuptools_cfg["package-data"]["stm.conf"]


# --- the wheel, installed outside the checkout -----------------------------------------------------------------


def _run(cmd: list, *, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({result.returncode}) in {cwd}:\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def _copy_source(dest: Path) -> Path:
    """What `pip install .` reads (pyproject.toml, README.md, stm/, conf/), away from the shared checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("stm", "conf"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _venv(path: Path) -> Path:
    """A fresh venv that sees this environment's packages (torch, lightning, hydra ...) through a .pth file
    naming its site-packages folders (no checkout: .pth files inside those folders, such as an editable stm's
    finder, are not run), after the venv's own site-packages. Returns the venv's python."""
    _run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    python = path / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).stdout
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (Path(purelib.strip()) / "stm_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    return python


def _clean_env(venv_python: Path, logs: Path) -> dict:
    """No PYTHONPATH or virtualenv of the caller: only what the venv itself finds."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "STM_LOG_DIR")}
    env.update(PATH=f"{venv_python.parent}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               WANDB_MODE="offline", STM_LOG_DIR=str(logs))
    return env


_WHERE = ("import json, sys, stm, stm.app.config; print(json.dumps({'stm': stm.__file__, "
          "'conf': str(stm.app.config.config_dir()), 'path': sys.path}))")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """stm's wheel (built from this checkout's files) pip-installed into a fresh venv; an empty folder to run in."""
    base = tmp_path_factory.mktemp("wheel")
    src = _copy_source(base / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-w", base / "dist", src], cwd=base)
    (wheel,) = (base / "dist").glob("stm-*.whl")
    python = _venv(base / "venv")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", wheel], cwd=base)
    work = base / "work"
    work.mkdir()
    return {"wheel": wheel, "python": python, "bin": python.parent, "work": work,
            "env": _clean_env(python, work / "logs")}


def _run_dir(logs: Path, task_name: str) -> Path:
    (run,) = (logs / task_name / "runs").iterdir()
    return run


@pytest.mark.slow
def test_wheel_carries_configs_and_samples(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    yamls = {f"stm/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert "stm/conf/train.yaml" in yamls and yamls <= names, f"missing from the wheel: {sorted(yamls - names)}"
    samples = {p.relative_to(ROOT).as_posix() for p in (ROOT / "stm/data/samples").rglob("*") if p.is_file()}
    assert samples and samples <= names, f"missing from the wheel: {sorted(samples - names)}"
    assert not any(n.startswith("conf/") for n in names), "conf/ must ship as stm/conf/, not a top-level package"


@pytest.mark.slow
def test_wheel_trains_and_evaluates_outside_the_checkout(installed):
    env, work, bin_ = installed["env"], installed["work"], installed["bin"]
    site = Path(sysconfig.get_paths(vars={"base": str(bin_.parent)})["purelib"])

    # the stm this venv imports, from an empty folder, is the wheel's, with the wheel's configs
    where = json.loads(_run([installed["python"], "-c", _WHERE], cwd=work, env=env).stdout)
    assert Path(where["stm"]).resolve() == (site / "stm" / "__init__.py").resolve()
    assert Path(where["conf"]) == (site / "stm" / "conf").resolve()
    assert not any((work / p).resolve() in (ROOT, ROOT / "stm") for p in where["path"]), where["path"]

    # stm-train: one batch of the default job (the memory probe)
    train = _run([bin_ / "stm-train", "debug=fast_dev_run"], cwd=work, env=env)
    run = _run_dir(work / "logs", "debug")
    hydra_cfg = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]
    (main,) = [s for s in hydra_cfg["runtime"]["config_sources"] if s["provider"] == "main"]
    assert (main["schema"], Path(main["path"])) == ("file", site / "stm" / "conf")
    assert hydra_cfg["runtime"]["choices"]["task"] == "probe"
    val_loss = float(re.search(r"validation: val/loss=([0-9.]+)", train.stdout + train.stderr).group(1))
    ckpt = run / "checkpoints" / "last.ckpt"
    horizon = json.loads((run / "horizon.json").read_text())

    # stm-eval on that checkpoint, over the one validation batch that fast_dev_run validated on: the same model on
    # the same batch, so the validation loss the run printed (to 4 decimals)
    _run([bin_ / "stm-eval", f"ckpt_path={ckpt}", "trainer.limit_val_batches=1"], cwd=work, env=env)
    report = json.loads((_run_dir(work / "logs", "eval") / "eval_metrics.json").read_text())
    assert report["ckpt_path"] == str(ckpt)
    eval_loss = report["metrics"]["val/loss"]
    assert math.isfinite(eval_loss) and abs(eval_loss - val_loss) < 1e-3, (eval_loss, val_loss)
    # and its accuracy, the one the run wrote into horizon.json
    assert report["metrics"]["val/acc"] == pytest.approx(horizon["overall"]["accuracy"]["exact_match"], abs=1e-6)


def _user_configs(root: Path) -> Path:
    """A user's config folder: a new memory option and an experiment that picks it."""
    (root / "memory").mkdir(parents=True)
    (root / "experiment").mkdir()
    (root / "memory" / "mymem.yaml").write_text(
        "# @package memory.mymem\n_target_: stm.memory.SegmentRecurrence\nmem_len: 32\n")
    (root / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /memory: mymem\ntags: [mine]\n")
    return root


@pytest.mark.slow
def test_wheel_with_a_users_config_dir(installed):
    """stm-train --config-dir myconf experiment=mine: the user's experiment and memory option next to stm's."""
    env, work = dict(installed["env"]), installed["work"] / "user"
    work.mkdir()
    env["STM_LOG_DIR"] = str(work / "logs")
    myconf = _user_configs(work / "myconf")
    train = _run([installed["bin"] / "stm-train", "--config-dir", "myconf", "experiment=mine", "debug=fast_dev_run"],
                 cwd=work, env=env)
    run = _run_dir(work / "logs", "debug")
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert cfg["memory"] == {"mymem": {"_target_": "stm.memory.SegmentRecurrence", "mem_len": 32}}
    assert cfg["tags"] == ["mine"] and cfg["task"]["_target_"] == "stm.tasks.ProbeTask"  # stm's default task
    assert "memory: SegmentRecurrence" in train.stdout + train.stderr
    sources = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["config_sources"]
    assert {"path": str(myconf), "schema": "file", "provider": "command-line"} in sources


def test_train_py_with_a_users_config_dir(tmp_path):
    """The same from a checkout: python train.py --config-dir <dir> memory=mymem (composed only, --cfg job)."""
    myconf = _user_configs(tmp_path / "myconf")
    env = dict(os.environ, WANDB_MODE="offline")
    result = _run([sys.executable, ROOT / "train.py", "--config-dir", myconf, "memory=mymem", "--cfg", "job"],
                  cwd=tmp_path, env=env, timeout=300)
    cfg = yaml.safe_load(result.stdout)
    assert cfg["memory"] == {"mymem": {"_target_": "stm.memory.SegmentRecurrence", "mem_len": 32}}


@pytest.mark.slow
def test_editable_install_reads_the_checkouts_conf(tmp_path):
    """pip install -e (what bootstrap.py does) of a checkout: stm.app.config.config_dir() is that checkout's conf/."""
    src = _copy_source(tmp_path / "checkout")
    python = _venv(tmp_path / "venv")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation",
          "--no-index", "--disable-pip-version-check", "-e", src], cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    where = json.loads(_run([python, "-c", _WHERE], cwd=work, env=_clean_env(python, work / "logs")).stdout)
    assert Path(where["stm"]).resolve() == (src / "stm" / "__init__.py").resolve()
    assert Path(where["conf"]) == (src / "conf").resolve()


def test_bootstrap_runs_the_tests_in_one_process_unless_told_otherwise(monkeypatch):
    sys.path.insert(0, str(ROOT))
    try:
        import bootstrap
    finally:
        sys.path.remove(str(ROOT))
    monkeypatch.setattr(bootstrap.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("STM_TEST_WORKERS", raising=False)
    assert bootstrap.test_workers(["-m", "not slow"]) == []
    monkeypatch.setenv("STM_TEST_WORKERS", "2")
    assert bootstrap.test_workers(["-m", "not slow"]) == ["-n", "2", "--dist", "loadfile"]
    monkeypatch.setenv("STM_TEST_WORKERS", "4")
    assert bootstrap.test_workers([]) == ["-n", "4", "--dist", "loadfile"]
    for chosen in (["-n", "0"], ["-n3"], ["--numprocesses=2"], ["-p", "no:xdist"], ["--dist", "load"]):
        assert bootstrap.test_workers(["-k", "segments", *chosen]) == [], chosen
    monkeypatch.setattr(bootstrap.os, "cpu_count", lambda: 1)
    assert bootstrap.test_workers([]) == []
