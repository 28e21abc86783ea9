"""Score a saved model on a finished run's data and task, e.g. the merge of the run's adapter into its base:

    >>> evaluate_model("runs/demo/merged", run_dir="runs/demo")   # {"accuracy": ..., "loss": ...} on the test split

The data split is rebuilt from `run_dir/config.yaml` (same builder, same seed), so the numbers are comparable with
the run's `metrics.json`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from peft_lab.errors import UserError

__all__ = ["evaluate_model"]


def evaluate_model(model_dir: str | os.PathLike, run_dir: str | os.PathLike, split: str = "test") -> dict[str, Any]:
    """The task's metrics (without prefix) of the transformers model in `model_dir` on `split` of the run's data."""
    import torch
    from accelerate import Accelerator

    from peft_lab.train.app import data_info
    from peft_lab.train.config import resolve
    from peft_lab.train.loop import evaluate
    from peft_lab.train.models.base import quiet_hf
    from peft_lab.train.models.text import HFModel
    from peft_lab.train.tasks import TASKS

    cfg_file = Path(run_dir) / "config.yaml"
    if not cfg_file.exists():
        raise UserError(f"{run_dir}: no config.yaml; give the output_dir of a `peft-lab train` run.")
    run = resolve(yaml.safe_load(cfg_file.read_text()))
    if run.model.task not in ("sequence_classification", "causal_lm"):
        raise UserError(f"evaluate_model scores transformers text models; the run's task is {run.model.task}.")
    dd = run.data.build()
    if split not in dd:
        raise UserError(f"the run's data has no {split!r} split (it has: {', '.join(dd)}).")
    model_cfg = HFModel(path=str(model_dir), task=run.model.task, max_length=run.model.max_length)
    built = model_cfg.build(data_info(dd))
    task = TASKS.get(run.model.task)(built, model_cfg, run.data)
    accelerator = Accelerator(cpu=run.trainer.cpu)
    model = built.model.to(accelerator.device)
    with quiet_hf():
        ds = task.prepare(dd[split])
    with torch.inference_mode():
        return evaluate(accelerator, model, task, ds, run.trainer.eval_batch_size)
