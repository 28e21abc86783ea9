"""`peft-lab bench merge` end to end on a trimmed digits suite (3 tasks, a few steps): every method row is
produced for both variants, tuned hyperparameters come from the grids, outputs are written, and the CLI rejects
bad arguments. The text suite has its own tests (test_text_suite.py); the benchmark's numbers are in
benchmarks/README.md, not asserted here."""

import csv
import json

import pytest

from merging.bench.methods import SETTINGS, data_free_methods
from merging.bench.runner import BenchConfig, run

TINY = BenchConfig(
    seeds=(0,),
    tasks=("digits", "shapes", "stripes"),
    fisher_examples=32,
    ada_steps=6,
    ada_batch=8,
    ada_batches_per_step=1,
    ta_grid=(0.3, 1.0),
    ties_grid=((0.2, 0.3), (0.2, 1.0)),
    dare_grid=((0.1, 0.3),),
    dare_ties_grid=((0.1, 1.0),),
    fisher_grid=1,
    ada_tuned_lrs=(),
    suite_set=(
        ("pretrain_epochs", 1),
        ("ft_epochs", 1),
        ("width", 64),
        ("blocks", 2),
        ("n_train", 200),
        ("n_val", 60),
        ("n_test", 60),
    ),
)
DATA_DRIVEN = ("fisher", "regmean", "adamerging (task-wise)", "adamerging (layer-wise)", "adamerging_ties (layer-wise)")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return run(TINY, out, progress=lambda s: None), out


def test_bench_rows_outputs_and_tuning(result):
    res, out = result
    methods = {(r["method"], r["variant"]) for r in res["rows"]}
    free, _ = data_free_methods(3)
    for m in ("task_arithmetic", "ties", "dare_linear", "dare_ties", *DATA_DRIVEN):
        assert (m, "paper") in methods and (m, "tuned") in methods, m
    assert (
        ("pretrained", "-") in methods
        and ("fine-tuned (individual)", "-") in methods
        and ("linear", "paper") in methods
    )
    assert ("linear probe", "-") not in methods  # the digits suite's heads are the probes
    # the test split is only ever scored, never used to pick: tuned rows carry hyperparameters from the grids
    tuned_ta = {
        json.loads(r["hparams"])["lambda"]
        for r in res["rows"]
        if r["method"] == "task_arithmetic" and r["variant"] == "tuned"
    }
    assert tuned_ta <= set(TINY.ta_grid)
    assert all(0.0 <= r["acc"] <= 1.0 for r in res["rows"])
    assert {r["split"] for r in res["rows"]} == {"test"}
    for f in (
        "results.csv",
        "table.csv",
        "table.md",
        "accuracies.png",
        "per_task.png",
        "entropy_vs_lambda.png",
        "coefficients.png",
        "adamerging_seed0.json",
        "run.json",
    ):
        assert (out / f).stat().st_size > 0, f
    with open(out / "table.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0][:3] == ["method", "variant", "hparams"] and table[0][-3:] == ["average", "95% CI", "normalized"]
    n_free = sum(1 + bool(SETTINGS.get(n) and SETTINGS[n].grid) for n, _ in free)
    assert len(table) == 1 + 2 + n_free + 2 * len(DATA_DRIVEN)
    assert [row[0] for row in table[1:4]] == ["pretrained", "fine-tuned (individual)", "linear"]
    lam = json.loads((out / "adamerging_seed0.json").read_text())["adamerging (layer-wise)"]
    assert len(lam["lambdas"]) == len(lam["names"]) and all(0 <= x <= 1 for row in lam["lambdas"] for x in row)
    assert "| method |" in res["table_md"]


def test_cli_rejects_bad_arguments(cli):
    r = cli("bench", "merge", "--no-such-flag")
    assert r.returncode == 2 and "unknown arguments" in r.stderr
    r = cli("bench", "merge", "--quick", "--set", "nonsense=3")
    assert r.returncode == 2 and "not a digits-suite setting" in r.stderr
