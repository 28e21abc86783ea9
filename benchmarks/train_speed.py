"""Training speed of `peft-lab train`'s default run next to the same run written with PEFT + transformers `Trainer`.

Both fine-tune all-MiniLM-L6-v2 with LoRA (r=8, alpha=8, query/value; the head, classifier + BERT pooler, trained
in full) as a 5-way classifier on the same BBC News training split, batch 16, 128 tokens, AdamW at the default
run's learning rate with linear decay, gradient clipping at 1.0, dynamic padding, no evaluation during training,
for the same number of steps and threads. Each run
is its own process (so peak RSS is that run's); variants alternate so machine load hits both alike.

Printed per variant (median over repeats): samples/s over the training steps (wall), CPU-seconds per step
(user+sys of the process during the steps: robust on a shared machine), peak RSS of the process, final train loss.

    python benchmarks/train_speed.py [--steps 40] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_ours(steps: int, threads: int, out: str) -> dict:
    from peft_lab.train import compose, train

    run = compose(
        f"trainer.max_steps={steps}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        f"trainer.num_threads={threads}",
        "data.max_eval_samples=16",
        "trainer.progress=false",
    )
    m = train(run, output_dir=out)
    return {
        "samples_per_s": steps * 16 / m["train_seconds"],
        "cpu_s_per_step": m["train_cpu_seconds"] / steps,
        "train_loss": m["train_loss"],
    }


def default_lr() -> float:
    from peft_lab.train import compose

    return compose().trainer.lr


def run_trainer(steps: int, threads: int, out: str) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model

    from peft_lab.data import build_dataset
    from peft_lab.train.models.text import minilm_path

    torch.set_num_threads(threads)
    transformers.set_seed(0)
    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    train_ds = build_dataset("bbc_news", seed=0)["train"]
    train_ds = train_ds.map(
        lambda b: tok(b["text"], truncation=True, max_length=128), batched=True, remove_columns=["text"]
    )
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    # SEQ_CLS adds the classifier to modules_to_save; the default run also trains MiniLM's pooler (model.train_pooler)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=8, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["pooler"]
    )
    model = get_peft_model(model, lora)

    class Clock(transformers.TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            self.t, self.c = time.perf_counter() - self.t, time.process_time() - self.c

    clock = Clock()
    args = transformers.TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=16,
        max_steps=steps,
        learning_rate=default_lr(),
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=steps,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=transformers.DataCollatorWithPadding(tok),
        callbacks=[clock],
    )
    result = trainer.train()
    return {
        "samples_per_s": steps * 16 / clock.t,
        "cpu_s_per_step": clock.c / steps,
        "train_loss": result.training_loss,
    }


VARIANTS = {"peft-lab train": run_ours, "PEFT + Trainer": run_trainer}


def child(variant: str, steps: int, threads: int) -> None:
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    with tempfile.TemporaryDirectory() as out:
        res = VARIANTS[variant](steps, threads, out)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.steps, a.threads)
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(a.repeats):
        for v in VARIANTS:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", v, "--steps", str(a.steps), "--threads", str(a.threads)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
            results[v].append(json.loads(line[-1][7:]))
            print(f"  repeat {r + 1}/{a.repeats} {v}: {results[v][-1]}", flush=True)
    load = os.getloadavg()
    print(
        f"\nMiniLM + LoRA r=8 on BBC News, batch 16, {a.steps} steps, {a.threads} thread(s), median of {a.repeats}; "
        f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on {os.cpu_count()} CPUs"
    )
    print(f"{'variant':16} {'samples/s':>10} {'CPU-s/step':>11} {'peak RSS MB':>12} {'train loss':>11}")
    med = {v: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for v, rs in results.items()}
    for v, m in med.items():
        print(
            f"{v:16} {m['samples_per_s']:10.2f} {m['cpu_s_per_step']:11.3f} {m['peak_rss_mb']:12.0f} "
            f"{m['train_loss']:11.4f}"
        )
    ours, base = med["peft-lab train"], med["PEFT + Trainer"]
    print(
        f"ratio (ours / Trainer): samples/s {ours['samples_per_s'] / base['samples_per_s']:.2f}x, CPU-s/step "
        f"{ours['cpu_s_per_step'] / base['cpu_s_per_step']:.2f}x, "
        f"peak RSS {ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
