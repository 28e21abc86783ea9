"""`peft-lab train` end to end in subprocesses: the adapter sweep with its summary, resume after a kill, W&B offline
without a key or a prompt, and user errors (exit 2, one paragraph, no traceback, nothing trained)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from peft_lab.errors import UserError
from peft_lab.train.app import train
from peft_lab.train.cli import compose_jobs, normalise_overrides
from tests.conftest import REPO, run_cli

TINY = ["model=tiny_bert", "trainer=tiny", "data.max_train_samples=32", "data.max_eval_samples=16"]


def test_sweep_over_every_adapter(tmp_path):
    """The issue's sweep on a tiny model: every adapter x r in {4, 8}, each in its own dir, plus a summary."""
    adapters = "lora,pissa,loldu,kronecker,sparse"
    r = run_cli(
        "train",
        "-m",
        f"adapter={adapters}",
        "adapter.r=4,8",
        *TINY,
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        f"output_dir={tmp_path}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(jobs) == 10
    for job in jobs:
        m = json.loads((job / "metrics.json").read_text())
        assert m["steps"] == 2 and 0 <= m["eval_accuracy"] <= 1 and m["trainable_params"] > 0
        assert any((job / "adapter").iterdir())
    summary = (tmp_path / "summary.md").read_text()
    for name in adapters.split(","):
        assert f"adapter={name} adapter.r=4 " in summary and f"adapter={name} adapter.r=8 " in summary
    assert summary.count("| ok |") == 10 and "sweep summary" in r.stdout
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(rows) == 11 and "eval_accuracy" in rows[0]
    counts = {json.loads((j / "metrics.json").read_text())["adapter"]: [] for j in jobs}
    for j in jobs:
        m = json.loads((j / "metrics.json").read_text())
        counts[m["adapter"]].append(m["trainable_params"])
    assert counts["lora"][0] < counts["lora"][1]  # r=4 trains fewer values than r=8


def _strip(m):
    return {k: v for k, v in m.items() if "seconds" not in k and k != "samples_per_second"}


def _metrics(path):
    return _strip(json.loads(path.read_text()))


def run_train(out, overrides):
    run = compose_jobs(normalise_overrides(list(overrides), False), multirun=False)[0]
    return train(run, output_dir=out)


def test_resume_after_kill_gives_the_same_metrics(tmp_path):
    args = [
        *TINY,
        "adapter=lora",
        "trainer.max_steps=20",
        "trainer.save_every=5",
        "trainer.eval_every=10",
        "logger=jsonl",
    ]
    ref = run_train(tmp_path / "ref", args)  # uninterrupted, in this process

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # the run pauses right after writing its step-10 checkpoint (a hook, no race with the run's speed): killed there
    code = f"""
import pathlib, sys, time
import peft_lab.train.loop as loop
real = loop.save_checkpoint
def save_then_pause(root, step, **kw):
    path = real(root, step, **kw)
    if step == 10:
        pathlib.Path({str(tmp_path / "paused")!r}).write_text(str(path))
        while True:
            time.sleep(1)
    return path
loop.save_checkpoint = save_then_pause
from peft_lab.cli import main
sys.exit(main(["train", *{[*args, f"output_dir={out}"]!r}]))
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "paused").exists():
        assert proc.poll() is None, "the run ended before reaching its step-10 checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    assert (out / "checkpoints" / "step_0000010").exists() and not (out / "metrics.json").exists()
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run, no clean-up of any kind
    proc.wait()
    assert not (out / "metrics.json").exists()

    again = run_cli("train", *args, f"output_dir={out}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr + again.stdout
    assert _metrics(out / "metrics.json") == _metrics(tmp_path / "ref" / "metrics.json") == _strip(ref)
    assert (out / "log.jsonl").read_text() == (tmp_path / "ref" / "log.jsonl").read_text()
    # a finished run started again: nothing left to train, the same metrics
    assert _strip(run_train(out, args)) == _strip(ref)
    # another configuration in the same dir is refused, not silently mixed
    with pytest.raises(UserError, match="different run"):
        run_train(out, [*args, "trainer.lr=0.01"])


def test_wandb_offline_without_key_never_prompts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true")  # no netrc, no API key, no WANDB_MODE
    (tmp_path / "home").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "peft_lab",
            "train",
            *TINY,
            "adapter=lora",
            "logger=wandb",
            f"output_dir={tmp_path / 'o'}",
        ],
        env={**env, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "o" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (records,) = runs[0].glob("run-*.wandb")
    data = records.read_bytes()  # config (with the trainable-parameter count), metrics, summary
    assert b"trainable_params" in data and b"eval_accuracy" in data and b"train/loss" in data
    assert "wandb login" not in proc.stdout + proc.stderr and "API key" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["adapter=nope"], "adapter=nope: no such option. Available adapter options:"),
        (["trainer.max_steps=-5"], "trainer.max_steps=-5 is out of range: must be >= 0"),
        (["model=hf", "model.path=/does/not/exist"], "model.path=/does/not/exist: no such directory"),
        (["adapter=lora", "adapter.target_modules=[nowhere]"], "'nowhere' match(es) no module"),
    ],
)
def test_user_errors(tmp_path, args, message):
    out = tmp_path / "o"
    r = run_cli("train", *TINY, *args, f"output_dir={out}")
    assert r.returncode == 2
    assert message in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr and r.stderr.count("peft-lab: error:") == 1
    assert "Error executing job" not in r.stderr
    assert not (out / "checkpoints").exists()


def test_a_failing_sweep_job_is_named_and_the_others_run(tmp_path):
    """In a sweep, a job's UserError is Hydra's to report: it names the job's overrides, the other jobs of the
    batch still run, and the command ends with the error (exit 2, one paragraph, no traceback)."""
    r = run_cli(
        "train",
        "-m",
        "adapter.target_modules=[nowhere],[query]",
        *TINY,
        "trainer.max_steps=1",
        f"output_dir={tmp_path}",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Error executing job with overrides: ['++adapter.target_modules=[nowhere]'" in r.stderr
    assert r.stderr.count("peft-lab: error:") == 1 and "'nowhere' match(es) no module" in " ".join(r.stderr.split())
    (ok,) = [p for p in tmp_path.iterdir() if (p / "metrics.json").exists()]
    assert ok.name.startswith("1_") and "adapter.target_modules=[query]" in ok.name


def test_two_processes_match_one(tmp_path):
    """`torchrun --nproc_per_node 2` with batch 2 per process = one process with batch 4 (DDP averages the
    gradients of the two halves of the same global batch): the same metrics, the loop unchanged."""
    args = [*TINY, "model.dropout=0.0", "adapter=lora", "trainer.max_steps=4", "trainer.eval_every=2"]
    single = run_train(tmp_path / "one", [*args, "trainer.batch_size=4"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "peft_lab",
            "train",
            *args,
            "trainer.batch_size=2",
            f"output_dir={tmp_path / 'two'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (r.stdout + r.stderr).count("done: eval_accuracy") == 1  # one main process writes the outputs
    for k in ("eval_loss", "val_loss", "train_loss"):
        assert two[k] == pytest.approx(single[k], rel=1e-5), k
    assert two["eval_accuracy"] == single["eval_accuracy"]
