"""`eval=lm_eval`: tasks of EleutherAI's lm-evaluation-harness, through its Python API, on local data.

    pip install 'peft-lab[eval]'          # the optional extra: lm-eval
    peft-lab eval model=DIR eval=lm_eval eval.include_path=my_tasks/ 'eval.tasks=[my_task]'

Nothing is downloaded at run time (HF_HUB_OFFLINE=1), so tasks read local files: a task YAML in `include_path`
(a dir of task YAMLs, or one YAML file) names a local dataset, e.g.

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /abs/path/my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: "{{answer}}"
    metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]

The loaded model is handed to the harness as is (`HFLM(pretrained=<model>)`), so an adapter dir on its base or a
merge scored before it is renamed into place work the same. Per task, every metric the harness reports (without
its `,none` filter suffix); the score is the average over tasks of `metric`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
import sys
import tempfile
from pathlib import Path

from peft_lab.errors import UserError
from peft_lab.eval.base import EVALUATORS, EvalResult, Evaluator, ModelInfo
from peft_lab.params import param

__all__ = ["LMEval", "require_lm_eval"]


def require_lm_eval():
    """The `lm_eval` module, or a UserError saying how to install the optional extra."""
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise UserError(
            "eval=lm_eval needs lm-evaluation-harness, an optional extra that is not installed: "
            "pip install 'peft-lab[eval]' (or pip install lm-eval). The other evaluators (classification, "
            "perplexity) need nothing more."
        ) from None
    return lm_eval


@EVALUATORS.register("lm_eval")
@dataclasses.dataclass(frozen=True)
class LMEval(Evaluator):
    """lm-evaluation-harness tasks.

    Attributes:
        tasks: task (or group) names, defined in `include_path` (or built in, with `builtin_tasks`).
        include_path: a dir of task YAMLs, or one task YAML file.
        builtin_tasks: also index the harness's own tasks (thousands of YAMLs: a minute to index; their data must
            already be in the local Hugging Face cache, nothing is downloaded).
        metric: the metric averaged into the score (`acc`, `acc_norm`, `exact_match`, ...).
        num_fewshot: few-shot examples per prompt (null: the task's default).
        limit: score only the first N documents of each task (null: all).
    """

    name = "lm_eval"
    kind = "causal_lm"

    tasks: list[str] = dataclasses.field(default_factory=list)
    include_path: str | None = None
    builtin_tasks: bool = False
    metric: str = "acc"
    num_fewshot: int | None = param(None, within="[0, inf)")
    limit: int | None = param(None, within="[1, inf)")
    batch_size: int = param(8, within="[1, inf)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tasks:
            raise UserError(
                "eval.tasks is empty: name the harness tasks to run, e.g. 'eval.tasks=[my_task]' with "
                "eval.include_path=DIR holding my_task's YAML (local data only: nothing is downloaded)."
            )
        if self.include_path is not None and not Path(self.include_path).expanduser().exists():
            raise UserError(f"eval.include_path={self.include_path}: no such file or directory of task YAMLs.")
        if self.include_path is None and not self.builtin_tasks:
            raise UserError(
                "eval=lm_eval needs eval.include_path: a dir of task YAMLs that read local data files (or "
                "eval.builtin_tasks=true for the harness's own tasks, whose data must be in the local HF cache)."
            )

    def headline(self) -> tuple[str, bool]:
        return self.metric, True

    def prepare(self):
        require_lm_eval()
        path = str(Path(self.include_path).expanduser().resolve()) if self.include_path else None
        manager = _task_manager(path, self.builtin_tasks, _stamp(path))
        known = set(manager.all_tasks)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            where = f" in {self.include_path}" if self.include_path else " (give eval.include_path=DIR of task YAMLs)"
            raise UserError(f"eval=lm_eval: no task named {', '.join(unknown)}{where}.")
        return manager

    def check_model(self, info: ModelInfo, where: str) -> None:
        if not info.is_causal_lm:
            raise UserError(
                f"{where}: eval=lm_eval scores causal language models (*ForCausalLM / *LMHeadModel); {info.path} is "
                f"{info.describe()}. Score a classifier or an encoder with eval=classification."
            )
        self.prepare()

    def run(self, model) -> EvalResult:
        manager = self.prepare()
        lm_eval = require_lm_eval()
        from lm_eval.models.huggingface import HFLM

        tok = model.tokenizer
        prefix = next((t for t in (tok.bos_token_id, tok.eos_token_id, tok.cls_token_id) if t is not None), None)
        with _quiet():
            lm = HFLM(
                pretrained=model.model,
                tokenizer=tok,
                batch_size=self.batch_size,
                device=str(model.device),
                prefix_token_id=prefix,
            )
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(self.tasks),
                task_manager=manager,
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                log_samples=False,
                verbosity="ERROR",
            )
        return self._result(out["results"], out.get("higher_is_better", {}))

    def _result(self, results: dict, higher: dict) -> EvalResult:
        tasks = {}
        for name, metrics in results.items():
            values = {
                k.split(",")[0]: float(v)
                for k, v in metrics.items()
                if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))
            }
            if values:
                tasks[name] = values
        missing = [t for t, m in tasks.items() if self.metric not in m]
        if missing or not tasks:
            found = sorted({k for m in tasks.values() for k in m})
            raise UserError(
                f"eval.metric={self.metric!r}: task(s) {', '.join(missing) or ', '.join(self.tasks)} report no such "
                f"metric; they report: {', '.join(found) or 'nothing'}."
            )
        up = all(higher.get(t, {}).get(self.metric, True) for t in tasks)
        return EvalResult.averaged(tasks, self.metric, bool(up))


def _stamp(path: str | None) -> int:
    """Changes when a task YAML under `path` changes (the task index is rebuilt then)."""
    if path is None:
        return 0
    p = Path(path)
    files = [p] if p.is_file() else list(p.rglob("*.yaml"))
    return hash(tuple(sorted((str(f), f.stat().st_mtime_ns) for f in files)))


@functools.lru_cache(maxsize=4)
def _task_manager(path: str | None, builtin: bool, stamp: int):
    """The harness's task index (built once per process: every trial of a search reuses it)."""
    import lm_eval.tasks

    with _quiet():
        return lm_eval.tasks.TaskManager(include_path=path, include_defaults=builtin, verbosity="ERROR")


@contextlib.contextmanager
def _quiet():
    """The harness's logging, progress bars and the `git describe` it runs (whose complaint outside a git checkout
    goes straight to file descriptor 2) kept off the terminal; what it wrote is shown again if it fails."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        ok = False
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            if not ok:
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace") + err.getvalue())
