"""Scoring models: `peft-lab eval`, scored merges (`peft-lab merge … eval=NAME`) and `peft-lab train … eval=NAME`
share these evaluators, so a fine-tune and a merge are measured by the same code.

>>> from peft_lab.eval import evaluate
>>> rec = evaluate({"name": "classification", "tasks": ["bbc_news"]}, "runs/merged")   # the eval.json record
>>> rec["score"], rec["tasks"]["bbc_news"]["accuracy"]

Evaluators (registry key = module under `peft_lab/eval/evaluators/` = `conf/eval/<name>.yaml`): `classification`,
`perplexity`, `lm_eval` (the optional extra `[eval]`). Zero-shot label-embedding heads: `peft_lab.eval.heads`.
"""

from peft_lab.eval.base import EVALUATORS, EvalResult, Evaluator, ModelInfo, build_evaluator
from peft_lab.eval.load import LoadedModel, ModelRef, load_model, read_info, resolve_model
from peft_lab.eval.run import (
    EVAL_FILE,
    check_scorable,
    evaluate,
    evaluate_loaded,
    flat_metrics,
    log_record,
    read_record,
    write_record,
)

__all__ = [
    "EVALUATORS",
    "EVAL_FILE",
    "EvalResult",
    "Evaluator",
    "LoadedModel",
    "ModelInfo",
    "ModelRef",
    "build_evaluator",
    "check_scorable",
    "evaluate",
    "evaluate_loaded",
    "flat_metrics",
    "load_model",
    "log_record",
    "read_info",
    "read_record",
    "resolve_model",
    "write_record",
]
