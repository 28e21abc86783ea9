"""`peft-lab train`: a Hydra app over one training loop on accelerate (see docs/training.md).

Python API (what the CLI calls):

    >>> from peft_lab.train import compose, train
    >>> run = compose("model=tiny_bert", "adapter=lora", "adapter.r=4", "trainer=tiny")   # validated RunConfig
    >>> metrics = train(run, output_dir="runs/x")    # writes runs/x/adapter/, runs/x/metrics.json
"""

from __future__ import annotations

from typing import Any

__all__ = ["compose", "train", "evaluate_model"]


def compose(*overrides: str) -> Any:
    """The validated RunConfig of `peft-lab train OVERRIDES...` (the shipped conf/, the same rewrites as the CLI)."""
    from peft_lab.train.cli import compose_jobs, normalise_overrides

    return compose_jobs(normalise_overrides(list(overrides), False), multirun=False)[0]


def train(cfg: Any, output_dir: Any = None) -> dict[str, Any]:
    from peft_lab.train.app import train as _train

    return _train(cfg, output_dir)


def evaluate_model(model_dir: Any, run_dir: Any, split: str = "test") -> dict[str, Any]:
    from peft_lab.train.evaluate import evaluate_model as _evaluate

    return _evaluate(model_dir, run_dir, split)
