"""`peft-lab eval`: the Hydra app end to end (in process and as a subprocess), its configs against their schemas,
sweeps with a summary, loggers, and one-paragraph errors."""

import csv
import json

import pytest
import yaml

from peft_lab.cli import main
from peft_lab.config import conf_dir
from peft_lab.errors import UserError
from peft_lab.eval import EVALUATORS, build_evaluator
from peft_lab.eval.cli import main as eval_main
from peft_lab.eval.cli import normalise_overrides, resolve
from peft_lab.hydra_app import compose_all
from tests.helpers.eval import task_file, tiny_model

CONF = conf_dir()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    return {
        "a": tiny_model(root / "a", id2label={0: "sport", 1: "business"}, seed=1),
        "b": tiny_model(root / "b", id2label={0: "sport", 1: "business"}, seed=2),
        "lm": tiny_model(root / "lm", "causal_lm"),
        "task": task_file(root / "t.jsonl", n=20),
    }


def test_every_eval_config_validates_against_its_schema():
    files = sorted((CONF / "eval").glob("*.yaml"))
    assert {f.stem for f in files} == set(EVALUATORS.names())
    required = {"perplexity": ["++eval.file=x.txt"], "lm_eval": ["++eval.tasks=[t]", f"++eval.include_path={CONF}"]}
    for f in files:
        text = f.read_text()
        assert text.startswith("# peft-lab eval"), f"{f} must open with the command that runs it"
        node = yaml.safe_load(text)
        (run,) = compose_all("eval", ["model.path=m", f"eval={f.stem}", *required.get(f.stem, [])], False, resolve)
        ev = run.evaluator
        assert ev.name == node["name"] == f.stem and type(ev) is EVALUATORS.get(f.stem)
        for k, v in node.items():  # every key of the YAML is a field, with the value the YAML gives
            if k != "name" and not (k in ("file", "tasks", "include_path") and f.stem != "classification"):
                assert getattr(ev, k) == v, f"{f}: {k}"


def test_normalise_overrides():
    assert normalise_overrides(
        ["model=/m", "eval.tasks=[a]", "logger.project=p", "out=/o", "eval=perplexity"], False
    ) == [
        "model.path=/m",
        "++eval.tasks=[a]",
        "++logger.project=p",
        "hydra.run.dir=/o",
        "eval=perplexity",
    ]
    assert normalise_overrides(["model=/a,/b", "out=/o"], True) == ["model.path=/a,/b", "hydra.sweep.dir=/o"]
    with pytest.raises(UserError, match="out cannot be swept"):
        normalise_overrides(["out=a,b"], True)


def test_eval_writes_eval_json_and_logs(models, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["eval", f"model={models['a']}", f"eval.tasks=[{models['task']}]", f"out={out}", "logger=csv"]
    assert main(args) == 0
    rec = json.loads((out / "eval.json").read_text())
    assert rec["evaluator"] == "classification" and rec["model"] == str(models["a"]) and 0 <= rec["score"] <= 1
    assert f"accuracy {rec['score']:.4f}" in capsys.readouterr().out
    with open(out / "log.csv") as fh:
        logged = {r["key"]: float(r["value"]) for r in csv.DictReader(fh)}
    assert logged["eval/score"] == pytest.approx(rec["score"]) and logged["eval/t/accuracy"] == rec["score"]
    assert (out / ".hydra" / "overrides.yaml").exists()  # Hydra's own record beside it, as for train


def test_eval_runs_every_evaluator(models, tmp_path):
    """`peft-lab eval` with perplexity and lm_eval (classification: above), each writing its eval.json."""
    from tests.eval.test_evaluators import _lm_tasks

    text = tmp_path / "t.txt"
    text.write_text("a few words of text to score with a tiny causal language model " * 3)
    assert main(["eval", f"model={models['lm']}", "eval=perplexity", f"eval.file={text}", f"out={tmp_path / 'p'}"]) == 0
    rec = json.loads((tmp_path / "p" / "eval.json").read_text())
    assert rec["evaluator"] == "perplexity" and rec["metric"] == "perplexity" and rec["higher_is_better"] is False
    assert rec["tasks"]["t.txt"]["tokens"] > 10 and rec["score"] > 1
    tasks = _lm_tasks(tmp_path)
    args = ["eval", f"model={models['lm']}", "eval=lm_eval", f"eval.include_path={tasks}", "eval.tasks=[parity_a]"]
    assert main([*args, f"out={tmp_path / 'l'}"]) == 0
    rec = json.loads((tmp_path / "l" / "eval.json").read_text())
    assert rec["evaluator"] == "lm_eval" and set(rec["tasks"]) == {"parity_a"} and 0 <= rec["score"] <= 1


def test_eval_sweep_summary_marks_the_best(models, tmp_path):
    sweep = tmp_path / "s"
    assert (
        main(["eval", "-m", f"model={models['a']},{models['b']}", f"eval.tasks=[{models['task']}]", f"out={sweep}"])
        == 0
    )
    jobs = sorted(d for d in sweep.iterdir() if (d / "eval.json").exists())
    assert len(jobs) == 2
    scores = {d.name: json.loads((d / "eval.json").read_text())["score"] for d in jobs}
    best = max(scores, key=lambda k: (scores[k], -sorted(scores).index(k)))
    table = (sweep / "summary.md").read_text()
    assert f"best: {best} (accuracy {scores[best]:.4f})" in table
    with open(sweep / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["job"] for r in rows if r["best"] == "True"] == [best]
    assert {r["overrides"] for r in rows} == {f"model.path={models['a']}", f"model.path={models['b']}"}


def test_cli_errors_are_one_paragraph(models, tmp_path, cli):
    r = cli("eval", f"model={models['a']}", "eval=nope", f"out={tmp_path / 'o'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "eval=nope: no such option. Available eval options: classification, lm_eval, perplexity" in " ".join(
        r.stderr.split()
    )
    r = cli("eval", f"model={models['a']}", "eval=perplexity", f"eval.file={tmp_path / 'empty.txt'}")
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match=r"give model=DIR"):
        eval_main([f"eval.tasks=[{models['task']}]"])
    with pytest.raises(UserError, match=r"model=/no/such: no such directory"):
        eval_main(["model=/no/such", f"eval.tasks=[{models['task']}]"])
    with pytest.raises(UserError, match=r"out .* is inside the input"):
        eval_main([f"model={models['a']}", f"eval.tasks=[{models['task']}]", f"out={models['a'] / 'scores'}"])
    with pytest.raises(UserError, match=r"perplexity scores causal language models"):
        eval_main([f"model={models['a']}", "eval=perplexity", f"eval.file={models['task']}"])


def test_evaluator_node_forms():
    assert build_evaluator("classification").name == "classification"
    ev = build_evaluator({"name": "classification", "tasks": ["bbc_news", "x/t.jsonl", {"file": "u.jsonl"}]})
    assert [(t.data, t.file, t.name) for t in ev.tasks] == [
        ("bbc_news", None, "bbc_news"),
        (None, "x/t.jsonl", "t"),
        (None, "u.jsonl", "u"),
    ]
    assert build_evaluator(ev.to_dict()) == ev  # what eval.json and recipes record builds the same evaluator
    with pytest.raises(UserError, match="names no evaluator"):
        build_evaluator({"tasks": []})
    with pytest.raises(UserError, match=r"task name\(s\) t occur twice"):
        build_evaluator({"name": "classification", "tasks": ["a/t.jsonl", "b/t.jsonl"]})
