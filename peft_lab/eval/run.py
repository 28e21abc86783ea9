"""`evaluate(evaluator, model) -> record`: what `peft-lab eval` does, callable without Hydra, and `eval.json`.

    rec = evaluate({"name": "classification", "tasks": ["bbc_news"]}, "runs/merged", out="runs/merged-eval")
    rec["score"], rec["tasks"]["bbc_news"]["accuracy"]

Order: build the evaluator (its settings checked) -> resolve the model (a model dir, or an adapter dir and its base)
-> `check_model` on its config.json and the evaluator's data -> load -> run -> the record, written as
`OUT/eval.json` when `out` is given. Every check that can fail on user input runs before the model is loaded.

The record (`eval.json`):

    {"evaluator": "classification", "metric": "accuracy", "higher_is_better": true, "score": 0.91,
     "average": {"accuracy": 0.91, "loss": 0.27, "examples": 639},
     "tasks": {"bbc_news": {"accuracy": 0.91, "loss": 0.27, "examples": 426}, ...},
     "model": "...", "base": null, "config": {"name": "classification", ...}, "seconds": 3.2, "tool": "peft-lab 0.1.0"}
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from peft_lab.eval.base import EvalResult, Evaluator, build_evaluator
from peft_lab.eval.load import LoadedModel, ModelRef, load_model, read_info, resolve_model

__all__ = [
    "EVAL_FILE",
    "evaluate",
    "evaluate_loaded",
    "check_scorable",
    "record_of",
    "write_record",
    "read_record",
    "flat_metrics",
    "log_record",
]

EVAL_FILE = "eval.json"


def evaluate(
    evaluator: Any,
    model: str | os.PathLike | ModelRef,
    *,
    base: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    what: str = "model",
) -> dict[str, Any]:
    """Score `model` (a model dir, an adapter dir on `base`, or a `ModelRef`) and return the eval.json record.

    Args:
        evaluator: an `Evaluator`, or a config node `{name: classification, ...}`.
        model: what to score.
        base: the base model dir of an adapter dir (default: the local dir its adapter_config.json names).
        out: when given, the record is also written to `out/eval.json` (the dir is created).
        what: how messages name the model (`model`, `the merge`).
    """
    ev = build_evaluator(evaluator)
    ref = model if isinstance(model, ModelRef) else resolve_model(str(model), base and str(base), what=what)
    check_scorable(ev, ref, f"{what}={ref.name}")
    loaded = load_model(ref, ev.model_kind(), ev.torch_device(), what=what)
    record = evaluate_loaded(ev, loaded)
    if out is not None:
        write_record(out, record)
    return record


def check_scorable(ev: Evaluator, ref: ModelRef, where: str | None = None) -> None:
    """The evaluator's data and the model's config checked, nothing loaded (a UserError starting with `where`)."""
    ev.prepare()
    ev.check_model(read_info(ref), where or f"model={ref.name}")


def evaluate_loaded(ev: Evaluator, loaded: LoadedModel) -> dict[str, Any]:
    """The record of a loaded model (`peft-lab train … eval=` scores the model it just trained this way)."""
    import torch

    t0 = time.perf_counter()
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        with torch.inference_mode():
            result = ev.run(loaded)
    finally:
        loaded.model.train(was_training)
    return record_of(ev, result, loaded.ref, time.perf_counter() - t0)


def record_of(ev: Evaluator, result: EvalResult, ref: ModelRef, seconds: float) -> dict[str, Any]:
    from peft_lab import __version__

    return {
        "evaluator": ev.name,
        "metric": result.metric,
        "higher_is_better": result.higher_is_better,
        "score": result.score,
        "average": result.average,
        "tasks": result.tasks,
        "model": ref.name,
        "base": ref.base,
        "config": ev.to_dict(),
        "seconds": round(seconds, 3),
        "tool": f"peft-lab {__version__}",
    }


def write_record(out: str | os.PathLike, record: dict[str, Any]) -> Path:
    """`out/eval.json`, written atomically (a reader never sees half of it)."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    path = d / EVAL_FILE
    tmp = d / f".{EVAL_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_record(d: str | os.PathLike) -> dict[str, Any] | None:
    """The eval.json in dir `d`, or None when it has none (or it does not parse)."""
    try:
        rec = json.loads((Path(d) / EVAL_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "score" in rec else None


def flat_metrics(record: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The record's numbers for a logger: `eval/score`, `eval/<metric>`, `eval/<task>/<metric>`."""
    result = EvalResult(record["tasks"], record["average"], record["metric"], record["higher_is_better"])
    return result.flat(prefix)


def log_record(logger, run_dir: str | os.PathLike, config: dict[str, Any], record: dict[str, Any]) -> None:
    """One logger session (`peft_lab.train.loggers`) holding the record's metrics at step 0 and in its summary."""
    flat = flat_metrics(record)
    session = logger.open(Path(run_dir), config)
    session.log(flat, 0)
    session.finish(flat)
