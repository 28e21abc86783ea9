"""The Hydra config: every YAML validates against its schema, overrides are normalised, bad input is a UserError
listing the valid choices, the Slurm launcher composes."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from peft_lab.config import conf_dir
from peft_lab.errors import UserError
from peft_lab.train.cli import compose_jobs, normalise_overrides
from peft_lab.train.config import GROUPS, RunConfig, TrainerConfig, group_schema, resolve

CONF = conf_dir()


@pytest.fixture
def hydra_cfg():
    """compose(overrides) -> (cfg, choices), the real conf/ tree."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="train"):

        def _compose(*overrides):
            cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
            return cfg, dict(cfg.hydra.runtime.choices)

        yield _compose
    GlobalHydra.instance().clear()


def test_default_config_is_the_embedded_default(hydra_cfg):
    run = resolve(*hydra_cfg())
    assert isinstance(run, RunConfig)
    assert (run.model_name, run.data_name, run.adapter_name, run.logger_name) == ("minilm", "bbc_news", "lora", "none")
    assert run.model.task == "sequence_classification" and run.data.seed == run.seed == 0
    assert run.trainer.max_steps > 0 and run.trainer.batch_size == 16
    # fields a YAML leaves out take the schema's defaults
    assert run.trainer.adam_eps == TrainerConfig().adam_eps


@pytest.mark.parametrize("group", [g for g in GROUPS])
def test_every_yaml_of_a_group_validates(hydra_cfg, group):
    """Walk conf/<group>/*.yaml: each composes and instantiates its schema (the `???` fields get a value)."""
    needs = {("model", "hf"): ["++model.path=" + str(CONF)], ("data", "hf"): ["++data.path=x.csv"]}  # the ??? fields
    files = sorted((CONF / group).glob("*.yaml"))
    assert files
    for f in files:
        node = yaml.safe_load(f.read_text()) or {}
        assert f.read_text().startswith("# peft-lab train"), f"{f} must open with the command that runs it"
        cfg, choices = hydra_cfg(f"{group}={f.stem}", *needs.get((group, f.stem), []))
        run = resolve(cfg, choices)
        obj = getattr(run, group)
        if group != "trainer":
            assert getattr(run, f"{group}_name") == node.get("name", f.stem)
            assert type(obj) is group_schema(group, node.get("name", f.stem))
        for k, v in node.items():
            if k != "name" and not (isinstance(v, str) and "${" in v) and v != "???":
                assert getattr(obj, k) == v, f"{f}: {k}"


def test_unknown_option_lists_available():
    with pytest.raises(UserError, match=r"adapter=nope: no such option. Available adapter options: .*lora.*none"):
        compose_jobs(["adapter=nope"], multirun=False)


def test_unknown_field_lists_fields():
    with pytest.raises(UserError, match=r"trainer has no parameter\(s\) maxsteps; it takes: .*max_steps"):
        compose_jobs(normalise_overrides(["trainer.maxsteps=3"], False), multirun=False)
    with pytest.raises(UserError, match=r"adapter=lora has no parameter\(s\) rank; it takes: .*\br\b"):
        compose_jobs(normalise_overrides(["adapter.rank=3"], False), multirun=False)


def test_bad_values():
    with pytest.raises(UserError, match=r"trainer\.max_steps=-1 is out of range: must be >= 0"):
        compose_jobs(normalise_overrides(["trainer.max_steps=-1"], False), multirun=False)
    with pytest.raises(UserError, match=r"trainer\.max_steps='ten' must be an integer"):
        compose_jobs(normalise_overrides(["trainer.max_steps=ten"], False), multirun=False)
    with pytest.raises(UserError, match=r"model.path=/no/such/dir: no such directory"):
        compose_jobs(normalise_overrides(["model=hf", "model.path=/no/such/dir"], False), multirun=False)
    with pytest.raises(UserError, match=r"model.path must be set"):
        compose_jobs(["model=hf"], multirun=False)
    with pytest.raises(UserError, match=r"seed='x': must be an integer"):
        compose_jobs(["seed=x"], multirun=False)
    with pytest.raises(UserError, match=r"does not support model.task='diffusion'"):
        compose_jobs(normalise_overrides(["model.task=diffusion"], False), multirun=False)


def test_sweep_is_checked_job_by_job():
    runs = compose_jobs(normalise_overrides(["adapter=lora,pissa", "adapter.r=4,8"], True), multirun=True)
    assert [(r.adapter_name, r.adapter.r) for r in runs] == [("lora", 4), ("lora", 8), ("pissa", 4), ("pissa", 8)]
    with pytest.raises(UserError, match=r"sweep job \[.*trainer.lr=bad\]: .*lr"):
        compose_jobs(normalise_overrides(["trainer.lr=1e-3,bad"], True), multirun=True)


def test_every_adapter_takes_r():
    """`adapter.r` is the common rank/budget name: the sweep of the issue composes for every adapter."""
    from peft_lab.adapters import ADAPTERS

    names = ADAPTERS.names()
    assert {"lora", "pissa", "loldu", "kronecker", "sparse"} <= set(names)
    runs = compose_jobs(normalise_overrides([f"adapter={','.join(names)}", "adapter.r=4,8"], True), multirun=True)
    assert len(runs) == 2 * len(names) and all(r.adapter.r in (4, 8) for r in runs)


def test_normalise_overrides():
    assert normalise_overrides(["adapter.r=4", "adapter=lora", "seed=1", "+x=1", "hydra.verbose=true"], False) == [
        "++adapter.r=4",
        "adapter=lora",
        "seed=1",
        "+x=1",
        "hydra.verbose=true",
    ]
    assert normalise_overrides(["output_dir=/tmp/a"], False) == ["hydra.run.dir=/tmp/a"]
    assert normalise_overrides(["output_dir=/tmp/a"], True) == ["hydra.sweep.dir=/tmp/a"]
    with pytest.raises(UserError, match="cannot be swept"):
        normalise_overrides(["output_dir=a,b"], True)
    with pytest.raises(UserError, match="cannot parse"):
        normalise_overrides(["adapter.r=[1,"], False)


def test_slurm_launcher_composes(hydra_cfg):
    cfg, choices = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = cfg.hydra.launcher
    assert choices["hydra/launcher"] == "slurm"
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 120
    from hydra.utils import get_class

    get_class(launcher._target_)  # the plugin is installed and importable


def test_run_config_round_trips_and_fingerprint(hydra_cfg):
    run = resolve(*hydra_cfg())
    d = run.to_dict()
    assert d["adapter"]["name"] == "lora" and d["trainer"]["max_steps"] == run.trainer.max_steps
    same = resolve(*hydra_cfg("trainer.eval_every=7", "logger=csv"))
    other = resolve(*hydra_cfg("++trainer.lr=0.5"))
    assert run.fingerprint() == same.fingerprint() != other.fingerprint()


def test_configs_ship_inside_the_package():
    assert (Path(CONF) / "train.yaml").exists() and (Path(CONF) / "hydra" / "launcher" / "slurm.yaml").exists()


def test_diffusion_demo_configs_compose(tmp_path):
    (pre,) = compose_jobs(["+experiment=diffusion_pretrain"], multirun=False)
    assert (pre.model_name, pre.adapter_name, pre.data.classes) == ("tiny_unet", "none", [0, 1, 2, 3, 4])
    assert pre.model.task == "diffusion" and pre.trainer.batch_size == 128
    runs = compose_jobs(
        normalise_overrides(
            ["+experiment=diffusion_adapt", "adapter=lora,kronecker,sparse", f"model.path={tmp_path}"], True
        ),
        multirun=True,
    )
    assert [r.adapter_name for r in runs] == ["lora", "kronecker", "sparse"]
    assert all(r.data.classes == [5, 6, 7, 8, 9] and r.model.path == str(tmp_path) for r in runs)
    assert all("to_q" in r.adapter.target_modules for r in runs)


def test_values_are_typed_by_the_schema():
    """A config read from a YAML file (PyYAML reads `lr: 1e-3` as a string) or overrides: numbers from numeric
    strings, single values wrapped into lists, booleans only from true/false, and one message per bad value."""
    base = {
        "model": {"name": "tiny_bert"},
        "data": {"name": "digits"},
        "adapter": {"name": "lora"},
        "logger": {"name": "wandb"},
    }

    def run(**groups):
        cfg = {k: dict(v) for k, v in base.items()}
        for k, v in groups.items():
            cfg.setdefault(k, {}).update(v)
        return resolve(cfg)

    r = run(
        trainer=yaml.safe_load("lr: 1e-3\nmax_steps: '12'"),
        adapter={"target_modules": "query"},
        data={"classes": 5},
        logger={"tags": "x"},
    )
    assert (r.trainer.lr, r.trainer.max_steps, r.adapter.target_modules) == (1e-3, 12, ["query"])
    assert (r.data.classes, r.logger.tags) == ([5], ["x"])
    for groups, match in [
        ({"trainer": {"resume": 1}}, r"trainer\.resume=1 must be true or false"),
        ({"trainer": {"resume": "yes"}}, r"trainer\.resume='yes' must be true or false"),
        ({"trainer": {"max_steps": 2.5}}, r"trainer\.max_steps=2\.5 must be an integer"),
        ({"trainer": {"lr": "fast"}}, r"trainer\.lr='fast' must be a finite number"),
        ({"trainer": {"adam_betas": [0.9, 1.5]}}, r"trainer\.adam_betas=\[0\.9, 1\.5\] is out of range: .*\[0, 1\)"),
        ({"trainer": {"scheduler": "step"}}, r"trainer\.scheduler='step' must be one of: constant, linear, cosine"),
        (
            {"adapter": {"target_modules": ["query", 1]}},
            r"adapter\.target_modules=\['query', 1\] must be a list of strings",
        ),
        ({"adapter": {"r": "abc"}}, r"adapter=lora: adapter\.r='abc' must be an integer"),
        ({"model": {"max_length": "x"}}, r"model=tiny_bert: model\.max_length='x' must be an integer"),
    ]:
        with pytest.raises(UserError, match=match):
            run(**groups)
