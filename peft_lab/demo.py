"""`make demo` (= `python -m peft_lab.demo`): the embedded default end to end, offline.

1. `peft-lab train output_dir=runs/demo trainer.save_base_model=true`: all-MiniLM-L6-v2 + LoRA on BBC News
   (the base model with its freshly initialised head is kept in runs/demo/base_model, the merge's base);
2. `peft-lab merge --config runs/demo/merge.yaml --out runs/demo/merged`: the adapter (a PEFT LoRA dir, taken as a
   task vector on the base) merged into the base, a plain HF model dir;
3. the merged model scored on the same test split: it must score what the adapter scored.

Extra arguments are passed to `peft-lab train` (e.g. `python -m peft_lab.demo model=tiny_bert trainer=tiny` for a
smoke run); `--out DIR` moves everything. Re-running resumes or reuses the finished training run.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _cpu_seconds() -> float:
    ru, rc = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime + rc.ru_utime + rc.ru_stime


def _step(n: int, text: str) -> None:
    print(f"\n== {n}/3  {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    import json

    import yaml

    from peft_lab.cli import main as peft_lab

    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path("runs/demo")
    if "--out" in argv:
        i = argv.index("--out")
        out = Path(argv[i + 1])
        del argv[i : i + 2]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0, c0 = time.time(), _cpu_seconds()

    train_args = ["train", f"output_dir={out}", "trainer.save_base_model=true", *argv]
    _step(1, "peft-lab " + " ".join(train_args))
    rc = peft_lab(train_args)
    if rc:
        return rc
    metrics = json.loads((out / "metrics.json").read_text())
    t_train = time.time() - t0
    print(
        f"   {metrics['adapter']} on {metrics['model']}: {metrics['trainable_params']:,} trainable of "
        f"{metrics['total_params']:,} parameters; {metrics['steps']} steps; "
        f"test accuracy {metrics['eval_accuracy']:.4f}"
    )
    if metrics["adapter"] == "none":
        print("   (adapter=none: a full fine-tune has no adapter to merge; done)")
        return 0

    recipe = {
        "merge_method": "task_arithmetic",  # base + 1.0 x (adapter's delta)
        "base_model": str((out / "base_model").absolute()),
        "models": [{"model": str((out / "adapter").absolute()), "parameters": {"weight": 1.0}}],
        "dtype": "float32",
    }
    (out / "merge.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    merge_args = ["merge", "--config", str(out / "merge.yaml"), "--out", str(out / "merged"), "--overwrite"]
    _step(2, "peft-lab " + " ".join(merge_args))
    rc = peft_lab(merge_args)
    if rc:
        return rc

    _step(3, f"scoring {out / 'merged'} on the run's test split")
    from peft_lab.train import evaluate_model

    merged = evaluate_model(out / "merged", out, split="test")
    rows = [
        ("adapter on the base (as trained)", metrics["eval_accuracy"], metrics["eval_loss"]),
        ("merged model (plain HF dir)", merged["accuracy"], merged["loss"]),
    ]
    print(f"\n   {'':34} {'test accuracy':>13} {'test loss':>10}")
    for name, acc, loss in rows:
        print(f"   {name:34} {acc:13.4f} {loss:10.4f}")
    print(
        f"\n   wall {time.time() - t0:.0f} s (training {t_train:.0f} s), CPU {_cpu_seconds() - c0:.0f} s; "
        f"outputs in {out}/"
    )
    same_loss = abs(merged["loss"] - metrics["eval_loss"]) <= 1e-3 * abs(metrics["eval_loss"])
    if abs(merged["accuracy"] - metrics["eval_accuracy"]) > 1e-9 or not same_loss:
        print("peft-lab demo: error: the merged model does not score what the adapter scored.", file=sys.stderr)
        return 1
    print("   the merged model scores the same as the adapter.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
