"""`peft-lab train … eval=NAME`: the trained model scored by the evaluator that scores merges, with the same
numbers as the run's own final evaluation when both measure the same split; a mismatched evaluator is refused
before training."""

import json

import pytest

from peft_lab.errors import UserError
from peft_lab.train.cli import compose_jobs, normalise_overrides
from tests.conftest import run_cli

TINY = [
    "model=tiny_bert",
    "data=bbc_news",
    "data.max_train_samples=48",
    "data.max_eval_samples=24",
    "trainer=tiny",
    "trainer.max_steps=4",
]


def test_train_eval_scores_the_trained_model(tmp_path):
    out = tmp_path / "o"
    r = run_cli("train", *TINY, "eval=classification", "logger=jsonl", f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rec = json.loads((out / "eval.json").read_text())
    # the run's data by default (its test split): the evaluator agrees with the training loop's own evaluation
    assert rec["tasks"]["bbc_news"]["examples"] == 24 and metrics["eval_split"] == "test"
    assert rec["score"] == pytest.approx(metrics["eval_accuracy"])
    assert rec["average"]["loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert metrics["eval_score"] == rec["score"] and metrics["eval_metric"] == "accuracy"
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(row.get("eval/score") == pytest.approx(rec["score"]) for row in logged)


def test_train_eval_is_checked_before_training(tmp_path):
    (run,) = compose_jobs(normalise_overrides([*TINY, "eval=classification", "eval.max_length=32"], False), False)
    assert run.eval.name == "classification" and run.eval.max_length == 32
    assert run.to_dict()["eval"]["name"] == "classification"
    (plain,) = compose_jobs(normalise_overrides(TINY, False), False)
    assert plain.fingerprint() == run.fingerprint()  # scoring does not change what is trained (resume still works)
    from peft_lab.train.app import train

    (bad,) = compose_jobs(normalise_overrides([*TINY, "eval=perplexity", "eval.file=x.txt"], False), False)
    with pytest.raises(UserError, match=r"eval=perplexity scores causal lm models, but this run trains"):
        train(bad, output_dir=tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()
    with pytest.raises(UserError, match=r"eval=classification has no parameter\(s\) heads"):
        compose_jobs(normalise_overrides([*TINY, "eval=classification", "eval.heads=x"], False), False)
