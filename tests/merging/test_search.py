"""Optuna searches through Hydra (conf/search/ties_text.yaml, hydra-optuna-sweeper): a study over TIES density x
lambda x per-model weights on tiny models, resumed from its SQLite storage by a second invocation, whose best
recipe reproduces the best trial's score; CMA-ES and parallel trials (joblib) run the same search."""

import json

import optuna  # the [search] extra, part of the test extra
import pytest
import yaml

from merging.cli import main as merge_main
from peft_lab.errors import UserError
from tests.helpers.eval import finetunes, task_file, tiny_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base = tiny_model(root / "base", id2label={0: "sport", 1: "business"})
    ft = finetunes(base, root, 2, scale=0.3)
    return {"base": base, "ft": ft, "task": task_file(root / "t.jsonl", n=30)}


def _search(inputs, out, db, *extra):
    return merge_main(
        [
            "-m",
            "+search=ties_text",
            f"base={inputs['base']}",
            f"models=[{inputs['ft'][0]},{inputs['ft'][1]}]",
            f"out={out}",
            f"eval.tasks=[{inputs['task']}]",
            "eval.head=model",  # the tiny models are classifiers (the example's zero-shot heads need an encoder)
            f"hydra.sweeper.storage=sqlite:///{db}",
            *extra,
        ]
    )


def test_study_resumes_and_best_recipe_reproduces(inputs, tmp_path):
    out, db = tmp_path / "search", tmp_path / "study.db"
    assert _search(inputs, out, db, "hydra.sweeper.n_trials=3") == 0
    study = optuna.load_study(study_name="ties_text", storage=f"sqlite:///{db}")
    first = [(t.number, dict(t.params)) for t in study.trials]
    assert [n for n, _ in first] == [0, 1, 2]
    assert set(first[0][1]) == {"method.density", "method.lambda", "++per_model.weight.0", "++per_model.weight.1"}
    # the same command again: the study goes on (trials 3-5, the sampler sees 0-2), it does not start over
    assert _search(inputs, out, db, "hydra.sweeper.n_trials=3") == 0
    study = optuna.load_study(study_name="ties_text", storage=f"sqlite:///{db}")
    trials = study.trials
    assert [t.number for t in trials] == list(range(6)) and all(t.state.name == "COMPLETE" for t in trials)
    assert [dict(t.params) for t in trials[:3]] == [p for _, p in first]
    assert all(dict(t.params) not in [p for _, p in first] for t in trials[3:])  # new settings, not a restart
    jobs = [d for d in out.iterdir() if (d / "eval.json").exists()]
    assert len(jobs) == 6  # every trial scored; keep=best: one merged model on disk
    assert len([d for d in jobs if (d / "model.safetensors").exists()]) == 1
    by_score = sorted(json.loads((d / "eval.json").read_text())["score"] for d in jobs)
    assert sorted(t.value for t in trials) == pytest.approx(by_score)  # the objective is each merge's score
    # the best recipe: plain mergekit-style YAML with the trial's settings, re-run to the same score
    recipe = yaml.safe_load((out / "best_recipe.yaml").read_text())
    best = study.best_trial
    assert recipe["parameters"]["lambda"] == best.params["method.lambda"]
    weights = [m["parameters"]["weight"] for m in recipe["models"]]
    assert weights == [best.params["++per_model.weight.0"], best.params["++per_model.weight.1"]]
    assert merge_main(["--config", str(out / "best_recipe.yaml"), "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "eval.json").read_text())["score"] == best.value


def test_cmaes_and_parallel_trials(inputs, tmp_path):
    out, db = tmp_path / "cma", tmp_path / "cma.db"
    assert _search(inputs, out, db, "hydra/sweeper/sampler=cmaes", "hydra.sweeper.n_trials=3") == 0
    study = optuna.load_study(study_name="ties_text", storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    # two trials at a time, each in its own process (joblib), keep=best deciding under a lock
    out2, db2 = tmp_path / "par", tmp_path / "par.db"
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2"]
    assert _search(inputs, out2, db2, *extra) == 0
    study = optuna.load_study(study_name="ties_text", storage=f"sqlite:///{db2}")
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    jobs = [d for d in out2.iterdir() if (d / "eval.json").exists()]
    assert len(jobs) == 2 and len([d for d in jobs if (d / "model.safetensors").exists()]) == 1
    assert (out2 / "summary.md").exists() and (out2 / "best_recipe.yaml").exists()


def test_search_settings_are_checked(inputs, tmp_path):
    db = tmp_path / "x.db"
    text = tmp_path / "t.txt"
    text.write_text("some text")
    plain = [  # the plugin's own config: direction minimize by default
        "-m",
        "hydra/sweeper=optuna",
        "method=ties",
        f"base={inputs['base']}",
        f"models=[{inputs['ft'][0]},{inputs['ft'][1]}]",
        f"out={tmp_path / 'o'}",
        f"hydra.sweeper.storage=sqlite:///{db}",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.n_jobs=1",
        "method.density=interval(0.1,0.9)",  # the search space, as the plugin takes it on the command line
    ]
    with pytest.raises(UserError, match=r"the Optuna sweeper optimises each merge's score; give eval=NAME"):
        merge_main(plain)
    with pytest.raises(UserError, match=r"study's direction is minimize, but the score \(accuracy\) is higher"):
        merge_main([*plain, "eval=classification", f"eval.tasks=[{inputs['task']}]"])
    with pytest.raises(UserError, match=r"study's direction is maximize, but the score \(perplexity\) is lower"):
        merge_main([*plain, "eval=perplexity", f"eval.file={text}", "hydra.sweeper.direction=maximize"])
    with pytest.raises(UserError, match=r"per_model.weight is keyed by model index \(0 to 0, in the order of models\)"):
        merge_main(
            [
                "-m",
                "+search=ties_text",
                f"base={inputs['base']}",
                f"models=[{inputs['ft'][0]}]",
                f"out={tmp_path / 'o2'}",
                f"eval.tasks=[{inputs['task']}]",
                "eval.head=model",
                f"hydra.sweeper.storage=sqlite:///{db}",
                "hydra.sweeper.n_trials=1",
            ]
        )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_per_model_values():
    from merging.sweeps import apply_per_model

    cfg = {"models": ["a", {"model": "b", "parameters": {"density": 0.3, "weight": 2.0}}], "x": 1}
    out = apply_per_model({**cfg, "per_model": {"weight": [0.5, 0.7]}})
    assert out == {
        "models": [
            {"model": "a", "parameters": {"weight": 0.5}},
            {"model": "b", "parameters": {"density": 0.3, "weight": 0.7}},
        ],
        "x": 1,
    }
    out = apply_per_model({**cfg, "per_model": {"weight": {"1": 0.9}}})  # by index: only model 1
    assert out["models"] == [{"model": "a"}, {"model": "b", "parameters": {"density": 0.3, "weight": 0.9}}]
    assert apply_per_model({**cfg, "per_model": {}}) == cfg
    with pytest.raises(UserError, match=r"per_model.weight has 3 value\(s\) but models has 2 entries"):
        apply_per_model({**cfg, "per_model": {"weight": [1, 2, 3]}})
    with pytest.raises(UserError, match=r"keyed by model index \(0 to 1"):
        apply_per_model({**cfg, "per_model": {"weight": {"2": 1.0}}})


def test_launcher_and_sweeper_configs_compose():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import get_class

    from peft_lab.config import conf_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            for launcher in ("joblib", "slurm"):
                cfg = compose(
                    "merge",
                    ["+search=ties_text", "out=o", f"hydra/launcher={launcher}"],
                    return_hydra_config=True,
                )
                get_class(cfg.hydra.launcher._target_)  # the plugin is installed
                assert cfg.hydra.sweeper.storage == "sqlite:///ties_text.db" and cfg.method.name == "ties"
                assert cfg.eval.name == "classification" and cfg.keep == "best"
                assert list(cfg.hydra.sweeper.params) == [
                    "method.density",
                    "method.lambda",
                    "++per_model.weight.0",
                    "++per_model.weight.1",
                ]
            cfg = compose(
                "merge", ["+search=ties_text", "out=o", "hydra/sweeper/sampler=cmaes"], return_hydra_config=True
            )
            assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.CmaEsSampler"
    finally:
        GlobalHydra.instance().clear()
