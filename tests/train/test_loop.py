"""The loop, in process on tiny models: outputs, learning, accumulation, every task, resumable pieces."""

import json
import math

import numpy as np
import pytest
import torch

from peft_lab.errors import UserError
from peft_lab.train.app import train
from peft_lab.train.checkpoint import rng_state, set_rng_state
from peft_lab.train.cli import compose_jobs, normalise_overrides
from peft_lab.train.sampler import ResumableBatches, eval_batches

TINY = ["model=tiny_bert", "trainer=tiny", "data.max_train_samples=32", "data.max_eval_samples=16"]


def run_train(tmp_path, *overrides, name="run"):
    run = compose_jobs(normalise_overrides(list(overrides), False), multirun=False)[0]
    out = tmp_path / name
    return train(run, output_dir=out), out


def jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_sampler_covers_each_epoch_once_and_resumes():
    s = ResumableBatches(n=23, batch_size=4, seed=7, world=1)
    it = iter(s)
    epoch0 = [next(it) for _ in range(s.per_epoch)]
    flat = sum(epoch0, [])
    assert s.per_epoch == 5 and len(set(flat)) == 20 and all(len(b) == 4 for b in epoch0)  # tail of 3 dropped
    epoch1 = [next(it) for _ in range(s.per_epoch)]
    assert epoch1 != epoch0
    later = iter(ResumableBatches(n=23, batch_size=4, seed=7, start=7))
    assert [next(later) for _ in range(3)] == epoch1[2:5]
    # two processes: disjoint shards of the same global batches
    r0, r1 = (iter(ResumableBatches(23, 2, 7, rank=r, world=2)) for r in (0, 1))
    a, b = next(r0), next(r1)
    assert set(a).isdisjoint(b) and sorted(a + b) == sorted(epoch0[0])
    assert sorted(sum(eval_batches(10, 3, 0, 2) + eval_batches(10, 3, 1, 2), [])) == list(range(10))
    with pytest.raises(UserError, match="fewer than one batch"):
        ResumableBatches(n=3, batch_size=4, seed=0)


def test_rng_state_round_trip():
    import random

    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save(state, "/dev/null")  # plain tensors and numbers
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_full_finetuning_outputs_and_learning(tmp_path):
    m, out = run_train(
        tmp_path,
        "model=tiny_bert",
        "trainer=tiny",
        "data.max_train_samples=16",
        "data.max_eval_samples=16",
        "model.dropout=0.0",
        "adapter=none",
        "logger=jsonl",
        "trainer.max_steps=40",
        "trainer.lr=1e-2",
        "trainer.batch_size=8",
        "trainer.eval_every=20",
        "trainer.save_every=20",
    )
    for key, kind in {
        "eval_accuracy": float,
        "train_loss": float,
        "trainable_params": int,
        "total_params": int,
        "train_seconds": float,
    }.items():
        assert isinstance(m[key], kind), key
    assert m["trainable_params"] == m["total_params"] > 0 and m["steps"] == 40 and m["eval_split"] == "test"
    assert json.loads((out / "metrics.json").read_text())["eval_accuracy"] == m["eval_accuracy"]
    assert (out / "model" / "config.json").exists() and (out / "model" / "model.safetensors").exists()
    assert (out / "config.yaml").exists() and [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000040"]
    log = jsonl(out / "log.jsonl")
    losses = [r["train/loss"] for r in log if "train/loss" in r]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])  # it memorises 16 articles
    assert [r["step"] for r in log if "val/accuracy" in r] == [20, 40]
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert reloaded.config.id2label[3] == "sport"


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    """batch 8 = two accumulated micro-batches of 4 (same examples, loss averaged): same trajectory."""
    common = [
        *TINY,
        "model.dropout=0.0",
        "adapter=none",
        "trainer.max_steps=4",
        "trainer.save_every=0",
        "trainer.eval_every=0",
    ]
    a, _ = run_train(tmp_path, *common, "trainer.batch_size=8", name="a")
    b, _ = run_train(tmp_path, *common, "trainer.batch_size=4", "trainer.grad_accum=2", name="b")
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)


def test_lora_on_tiny_bert_saves_a_peft_adapter(tmp_path):
    m, out = run_train(tmp_path, *TINY, "adapter=lora", "adapter.r=4", "trainer.save_base_model=true")
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "base_model" / "config.json").exists()
    assert m["trainable_params"] < m["total_params"] / 50
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert model(input_ids=torch.tensor([[101, 2000, 102]])).logits.shape == (1, 5)


def test_target_that_matches_nothing_fails_before_training(tmp_path):
    with pytest.raises(UserError, match=r"'nothing' match\(es\) no module.*query"):
        run_train(tmp_path, *TINY, "adapter=lora", "adapter.target_modules=[nothing]")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dataset_without_expected_columns_fails_before_training(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("sentence,y\n" + "".join(f"s {i},{i % 2}\n" for i in range(20)))
    with pytest.raises(UserError, match=r"no column\(s\) 'text', 'label'.*sentence, y"):
        run_train(tmp_path, "model=tiny_bert", "trainer=tiny", "adapter=none", "data=hf", f"data.path={csv}")
    with pytest.raises(UserError, match=r"no column\(s\) 'text'.*image, label"):
        run_train(tmp_path, "model=tiny_bert", "trainer=tiny", "adapter=none", "data=digits")


def test_outputs_that_would_replace_inputs_or_foreign_dirs_fail_before_training(tmp_path):
    """adapter/ (model/ for full fine-tuning) is replaced at the end of a run: only a previous run's output may be."""
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"output_dir/adapter .*not written by peft-lab as a 'adapter' output"):
        run_train(tmp_path, *TINY, "adapter=lora")
    assert (tmp_path / "run" / "adapter" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a model dir given as model.path where this run writes model/ (fine-tuning a previous run's output in place)
    model = tmp_path / "prev" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"output_dir/model .* is the input"):
        run_train(tmp_path, "model=hf", f"model.path={model}", "trainer=tiny", "adapter=none", name="prev")
    with pytest.raises(UserError, match=r"output_dir .* is inside the input"):
        run_train(tmp_path, "model=hf", f"model.path={model}", "trainer=tiny", "adapter=none", name="prev/model/x")
    assert sorted(p.name for p in tmp_path.joinpath("prev").rglob("*")) == ["config.json", "model"]


def test_causal_lm(tmp_path):
    m, out = run_train(
        tmp_path,
        "model=tiny_llama",
        "trainer=tiny",
        "adapter=lora",
        "data.max_train_samples=16",
        "data.max_eval_samples=8",
        "model.max_length=32",
    )
    assert m["task"] == "causal_lm" and m["metric"] == "eval_loss"
    assert math.isclose(m["eval_perplexity"], math.exp(m["eval_loss"]), rel_tol=1e-6)
    assert 0 < m["eval_loss"] < 11  # below ln(vocab) of an untrained model
    assert (out / "adapter").is_dir()


def test_max_steps_zero_evaluates_and_saves(tmp_path):
    m, out = run_train(tmp_path, *TINY, "adapter=none", "trainer.max_steps=0")
    assert m["steps"] == 0 and m["train_loss"] is None and 0 <= m["eval_accuracy"] <= 1


@pytest.mark.parametrize("model,adapter,logger", [("tiny_unet", "none", "wandb"), ("tiny_unet_cond", "lora", "jsonl")])
def test_diffusion(tmp_path, monkeypatch, model, adapter, logger):
    monkeypatch.setenv("WANDB_MODE", "offline")
    m, out = run_train(
        tmp_path,
        f"model={model}",
        "data=digits_0_4",
        f"adapter={adapter}",
        "trainer=tiny",
        "trainer.batch_size=16",
        "model.num_samples=8",
        "model.sample_steps=4",
        f"logger={logger}",
    )
    assert m["task"] == "diffusion" and math.isfinite(m["eval_loss"]) and 0 <= m["eval_sample_score"] <= 1
    assert (out / "samples.png").exists() and len(list((out / "samples").glob("step_*.png"))) == 2
    assert (out / ("model" if adapter == "none" else "adapter")).is_dir()
    from PIL import Image

    assert Image.open(out / "samples.png").size == ((8 * 9 + 1) * 4, (1 * 9 + 1) * 4)  # 8 tiles of 8x8, 1px gaps, x4
    if logger == "wandb":  # the sample grid is logged as an image, with the config and the trainable count
        (run_dir,) = (out / "wandb").glob("offline-run-*")
        assert len(list(run_dir.glob("files/media/images/samples_*.png"))) == 2
        (records,) = run_dir.glob("run-*.wandb")  # offline: config, metrics and summary live in this record log
        data = records.read_bytes()
        assert b"trainable_params" in data and b"tiny_unet" in data and b"eval_loss" in data


def _interrupt_after(step: int, monkeypatch):
    """Make the loop die right after writing checkpoint `step` (as a kill would, minus the process)."""
    import peft_lab.train.loop as loop

    real = loop.save_checkpoint

    def save_then_die(root, s, **kw):
        out = real(root, s, **kw)
        if s == step:
            raise KeyboardInterrupt("simulated kill")
        return out

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)


RESUME_CASES = [
    ["adapter=none"],
    ["adapter=lora"],
    ["adapter=pissa"],
    ["adapter=loldu"],
    ["adapter=kronecker"],
    ["adapter=sparse"],
    [
        "adapter=sparse",
        "adapter.selection=grow_drop",
        "adapter.reselection_steps=3",
        "adapter.selection_accumulation_steps=2",
    ],
]


@pytest.mark.parametrize("case", RESUME_CASES, ids=lambda c: "-".join(x.split("=")[-1] for x in c))
def test_resume_is_exact_for_every_adapter(tmp_path, monkeypatch, case):
    args = [*TINY, *case, "trainer.max_steps=8", "trainer.save_every=2", "trainer.eval_every=0", "logger=jsonl"]
    ref, ref_out = run_train(tmp_path, *args, name="ref")
    with monkeypatch.context() as m:
        _interrupt_after(4, m)
        with pytest.raises(KeyboardInterrupt):
            run_train(tmp_path, *args, name="resumed")
    got, out = run_train(tmp_path, *args, name="resumed")
    strip = lambda d: {k: v for k, v in d.items() if "seconds" not in k and k != "samples_per_second"}  # noqa: E731
    assert strip(got) == strip(ref)
    assert (out / "log.jsonl").read_text() == (ref_out / "log.jsonl").read_text()
