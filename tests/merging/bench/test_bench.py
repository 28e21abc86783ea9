"""`peft-lab bench merge` end to end on a trimmed configuration (real MiniLM, 2 tasks, a few steps): every method
row is produced for both variants, tuned hyperparameters come from the grids, outputs are written, and the CLI
rejects bad arguments. The full benchmark's numbers are in benchmarks/README.md, not asserted here."""

import csv
import json

import pytest

from merging.bench.runner import BenchConfig, run
from merging.bench.text_tasks import TASKS, build_texts

TINY = BenchConfig(seeds=(0,), tasks=("digits", "shapes", "stripes"), fisher_examples=32, ada_steps=6, ada_batch=8,
                   ada_batches_per_step=1, ta_grid=(0.3, 1.0), ties_grid=((0.2, 0.3), (0.2, 1.0)), fisher_grid=1,
                   suite_set=(("pretrain_epochs", 1), ("ft_epochs", 1), ("width", 64), ("blocks", 2), ("n_train", 200),
                              ("n_val", 60), ("n_test", 60)))
TINY_TEXT = BenchConfig(suite="text", seeds=(0,), n_train=24, n_val=12, n_test=12, ft_steps=1, fisher_examples=4, ada_steps=1,
                        ada_batch=4, ada_batches_per_step=1, ta_grid=(0.3,), ties_grid=((0.2, 0.3),), fisher_grid=0,
                        tasks=("topic", "digits"))


def test_tasks_are_deterministic_and_labelled():
    for t in TASKS:
        a = build_texts(t, 30, seed=1)
        assert a == build_texts(t, 30, seed=1) and a != build_texts(t, 30, seed=2)
        texts, labels = a
        assert len(texts) == 30 and all(isinstance(x, str) and x for x in texts)
        assert min(labels) >= 0 and len(set(labels)) >= 2
    with pytest.raises(ValueError, match="unknown task"):
        build_texts("nope", 3, 0)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return run(TINY, out, progress=lambda s: None), out


def test_bench_rows_outputs_and_tuning(result):
    res, out = result
    methods = {(r["method"], r["variant"]) for r in res["rows"]}
    for m in ("task arithmetic", "TIES", "Fisher", "AdaMerging task-wise", "AdaMerging layer-wise", "AdaMerging++ layer-wise (TIES)"):
        assert (m, "paper") in methods and (m, "tuned") in methods, m
    assert ("pretrained", "-") in methods and ("fine-tuned (individual)", "-") in methods and ("simple average", "-") in methods
    # the test split is only ever scored, never used to pick: tuned rows carry hyperparameters from the grids
    tuned_ta = {json.loads(r["hparams"])["lambda"] for r in res["rows"] if r["method"] == "task arithmetic" and r["variant"] == "tuned"}
    assert tuned_ta <= set(TINY.ta_grid)
    assert all(0.0 <= r["acc"] <= 1.0 for r in res["rows"])
    assert {r["split"] for r in res["rows"]} == {"test"}
    for f in ("results.csv", "table.csv", "table.md", "accuracies.png", "coefficients.png", "adamerging_seed0.json", "run.json"):
        assert (out / f).stat().st_size > 0, f
    with open(out / "table.csv") as fh:
        table = list(csv.reader(fh))
    assert table[0][:2] == ["method", "hparams"] and table[0][-2:] == ["average", "± std (seeds)"]
    assert len(table) == 1 + 3 + 2 * 6  # bounds + average + 6 methods x 2 variants
    assert [row[0] for row in table[1:4]] == ["pretrained", "fine-tuned (individual)", "simple average"]
    lam = json.loads((out / "adamerging_seed0.json").read_text())["AdaMerging layer-wise"]
    assert len(lam["lambdas"]) == len(lam["names"]) and all(0 <= x <= 1 for row in lam["lambdas"] for x in row)
    assert "| method |" in res["table_md"]


def test_text_suite_runs(tmp_path):
    res = run(TINY_TEXT, tmp_path, progress=lambda s: None)
    assert {r["task"] for r in res["rows"]} == {"topic", "digits"}
    assert {r["method"] for r in res["rows"]} >= {"Fisher", "AdaMerging++ layer-wise (TIES)"}


def test_cli_rejects_bad_arguments(cli):
    r = cli("bench", "merge", "--no-such-flag")
    assert r.returncode == 2 and "unknown arguments" in r.stderr
    r = cli("bench", "merge", "--quick", "--set", "nonsense=3")
    assert r.returncode == 2 and "not a digits-suite setting" in r.stderr
