"""Scored merges: an `eval:` recipe block or `eval=NAME` scores the merged model into OUT/eval.json (before the
rename: an interrupted scoring leaves nothing), scored sweeps log every job (W&B offline runs), summarise the
sweep with the best job marked and its recipe, and keep=best|none bound the merged models left on disk."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from merging import run_merge
from merging.cli import main as merge_main
from peft_lab.errors import UserError
from peft_lab.eval import evaluate
from tests.conftest import REPO
from tests.helpers.eval import finetunes, task_file, tiny_model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base = tiny_model(root / "base", id2label={0: "sport", 1: "business"})
    ft = finetunes(base, root, 2, scale=0.3)
    return {"base": base, "ft": ft, "task": task_file(root / "t.jsonl", n=30), "root": root}


def _recipe(inputs, **extra):
    return {
        "merge_method": "ties",
        "base_model": str(inputs["base"]),
        "models": [{"model": str(p)} for p in inputs["ft"]],
        "parameters": {"density": 0.5},
        "eval": {"name": "classification", "tasks": [str(inputs["task"])]},
        **extra,
    }


def _model_dirs(root: Path) -> list[Path]:
    """Non-hidden dirs holding model weights, anywhere under root."""
    return sorted(
        p.parent for p in root.rglob("*.safetensors") if not any(part.startswith(".") for part in p.parts[-3:])
    )


def test_recipe_eval_block_scores_the_merge(inputs, tmp_path):
    rec_path = tmp_path / "r.yaml"
    rec_path.write_text(yaml.safe_dump(_recipe(inputs)))
    out = run_merge(rec_path, tmp_path / "out", hash="none")
    rec = json.loads((out / "eval.json").read_text())
    again = evaluate({"name": "classification", "tasks": [str(inputs["task"])]}, out)
    assert rec["score"] == again["score"] and rec["tasks"] == again["tasks"]  # the same evaluator, after the fact
    assert rec["model"] == str(out) and rec["base"] == str(inputs["base"])
    recorded = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert recorded["eval"]["name"] == "classification"  # re-running the recorded recipe scores it again
    out2 = run_merge(out / "merge_recipe.yaml", tmp_path / "out2", hash="none")
    assert json.loads((out2 / "eval.json").read_text())["score"] == rec["score"]


def test_scoring_problems_are_found_before_merging(inputs, tmp_path):
    from safetensors.torch import save_file

    bad = {
        "unknown": ({"name": "bleu"}, r"recipe: eval: unknown evaluator 'bleu'. Available: classification"),
        "type": ({"name": "perplexity", "file": str(inputs["task"])}, r"the merge: eval=perplexity scores causal"),
        "labels": (
            {"name": "classification", "tasks": [str(task_file(tmp_path / "three.jsonl", ("a", "b", "c"), 6))]},
            r"has 3 classes \(a, b, c\) but the model's classification head has 2 outputs",
        ),
        "setting": ({"name": "classification", "head": "linear"}, r"eval.head='linear' must be one of"),
    }
    for name, (node, message) in bad.items():
        with pytest.raises(UserError, match=message):
            run_merge(_recipe(inputs, eval=node), tmp_path / name)
        assert not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}.tmp-*"))
    import torch

    for n in ("b", "m"):
        save_file({"w": torch.ones(2, 2)}, tmp_path / f"{n}.safetensors")
    bare = {
        "merge_method": "task_arithmetic",
        "base_model": str(tmp_path / "b.safetensors"),
        "models": [{"model": str(tmp_path / "m.safetensors")}],
        "eval": {"name": "classification", "tasks": [str(inputs["task"])]},
    }
    with pytest.raises(UserError, match=r"will have no config.json \(the inputs are bare .safetensors files\)"):
        run_merge(bare, tmp_path / "bare")
    assert not (tmp_path / "bare").exists()


def _sweep(inputs, out, *extra):
    return merge_main(
        [
            "-m",
            "method=ties",
            "method.density=0.2,0.5,0.9",
            f"base={inputs['base']}",
            f"models=[{inputs['ft'][0]},{inputs['ft'][1]}]",
            f"out={out}",
            "eval=classification",
            f"eval.tasks=[{inputs['task']}]",
            *extra,
        ]
    )


def test_scored_sweep_summary_and_wandb(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    assert _sweep(inputs, sweep, "logger=wandb", "logger.project=merge-test") == 0
    jobs = {d.name: d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")}
    assert set(jobs) == {f"method=ties,method.density={d}" for d in (0.2, 0.5, 0.9)}
    scores = {}
    for name, d in jobs.items():
        rec = json.loads((d / "eval.json").read_text())
        scores[name] = rec["score"]
        assert rec["job"]["overrides"][1] == f"method.density={name.rsplit('=', 1)[1]}"
        (run_dir,) = (d / "wandb").glob("offline-run-*")  # one W&B run per job, in its dir
        data = next(run_dir.glob("run-*.wandb")).read_bytes()
        assert b"eval/score" in data and b"merge_method" in data and b"merge-test" in data
    best = max(jobs, key=lambda n: (scores[n], -float(n.rsplit("=", 1)[1])))  # ties: the earliest job
    table = (sweep / "summary.md").read_text()
    assert f"best: {best} (accuracy {scores[best]:.4f})" in table
    assert f"| method.density={best.rsplit('=', 1)[1]} * |" in table
    with open(sweep / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and [r["job"] for r in rows if r["best"] == "True"] == [best]
    recipe = yaml.safe_load((sweep / "best_recipe.yaml").read_text())
    assert set(recipe) <= {"merge_method", "base_model", "models", "parameters", "dtype", "eval"}
    assert recipe["models"][0]["parameters"]["density"] == float(best.rsplit("=", 1)[1])
    assert len(_model_dirs(sweep)) == 3  # keep=all


def test_wandb_runs_are_named_after_jobs_and_grouped_by_sweep(tmp_path):
    from merging.sweeps import _named
    from peft_lab.train.loggers import WandbLogger

    job, root = tmp_path / "runs" / "method.density=0.5", tmp_path / "runs"
    named = _named(WandbLogger(), job, root)
    assert (named.group, named.run_name) == ("runs", "method.density=0.5")
    own = _named(WandbLogger(group="g", run_name="r"), job, root)
    assert (own.group, own.run_name) == ("g", "r")
    assert _named(WandbLogger(), job, None).group is None  # a single merge is not a sweep


@pytest.mark.parametrize("keep,kept", [("best", 1), ("none", 0)])
def test_keep_bounds_the_models_on_disk(inputs, tmp_path, keep, kept):
    sweep = tmp_path / "sweep"
    assert _sweep(inputs, sweep, f"keep={keep}", "hash=none") == 0
    models = _model_dirs(sweep)
    assert len(models) == kept
    jobs = [d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(jobs) == 3 and all((d / "eval.json").exists() and (d / "merge_recipe.yaml").exists() for d in jobs)
    assert not [p for p in sweep.iterdir() if p.name.startswith(".") and p.is_dir()]  # no leftovers
    if keep == "best":
        scores = {d: json.loads((d / "eval.json").read_text())["score"] for d in jobs}
        assert scores[models[0]] == max(scores.values())
        with open(sweep / "summary.csv") as fh:
            rows = {r["job"]: r for r in csv.DictReader(fh)}
        assert rows[models[0].name]["best"] == "True" and rows[models[0].name]["model"] == "kept"
    with pytest.raises(UserError, match=r"keep=best chooses models by their score; give eval=NAME"):
        merge_main(["-m", "method=ties", f"base={inputs['base']}", f"models=[{inputs['ft'][0]}]", "out=x", "keep=best"])


def test_interrupted_scoring_leaves_no_partial_model(inputs, tmp_path):
    """A sweep paused by a hook while it scores its second job (its merged model complete in the temporary dir),
    then interrupted: the first job stays whole, the second leaves nothing."""
    sweep = tmp_path / "sweep"
    code = f"""
import pathlib, sys, time
import peft_lab.eval.run as run
real, calls = run.evaluate_loaded, []
def paused(ev, loaded):
    calls.append(1)
    if len(calls) == 2:
        pathlib.Path({str(tmp_path / "paused")!r}).write_text(str(loaded.ref.path))
        while True:
            time.sleep(1)
    return real(ev, loaded)
run.evaluate_loaded = paused
from peft_lab.cli import main
sys.exit(main(["merge", "-m", "method=ties", "method.density=0.2,0.5,0.9", "base={inputs["base"]}",
               "models=[{inputs["ft"][0]},{inputs["ft"][1]}]", "out={sweep}", "eval=classification",
               "eval.tasks=[{inputs["task"]}]", "keep=best", "hash=none"]))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (tmp_path / "paused").exists():
        time.sleep(0.05)
    assert p.poll() is None, f"the sweep ended before reaching the pause: {p.stderr.read().decode()[-2000:]}"
    scoring = Path((tmp_path / "paused").read_text())
    assert scoring.name.startswith(".method=ties,method.density=0.5.tmp-") and scoring.is_dir()
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1].decode()
    assert p.returncode == 130 and "interrupted; nothing was left half-written" in err, err[-2000:]
    entries = sorted(e.name for e in sweep.iterdir())
    assert entries == [".peft-lab-keep.lock", "method=ties,method.density=0.2"]  # no temporary dir, no 2nd job
    first = sweep / "method=ties,method.density=0.2"
    assert (first / "eval.json").exists() and (first / "model.safetensors").exists()
    assert _model_dirs(sweep) == [first]


def test_a_slices_recipe_is_scored(inputs, tmp_path):
    """mergekit's `slices:` grammar (the first layer merged from one fine-tune, the second from both) scored like a
    `models:` merge: its eval.json is what the evaluator gives the output after the fact."""
    base, (ft0, ft1) = str(inputs["base"]), map(str, inputs["ft"])
    recipe = {
        "merge_method": "ties",
        "base_model": base,
        "slices": [
            {"sources": [{"model": m, "layer_range": [0, 1]} for m in (base, ft0)]},
            {"sources": [{"model": m, "layer_range": [1, 2]} for m in (base, ft0, ft1)]},
        ],
        "parameters": {"density": 0.5},
        "eval": {"name": "classification", "tasks": [str(inputs["task"])]},
    }
    out = run_merge(recipe, tmp_path / "out", hash="none")
    rec = json.loads((out / "eval.json").read_text())
    assert rec["tasks"] == evaluate({"name": "classification", "tasks": [str(inputs["task"])]}, out)["tasks"]
    recorded = yaml.safe_load((out / "merge_recipe.yaml").read_text())
    assert recorded["eval"]["name"] == "classification" and len(recorded["slices"]) == 2
