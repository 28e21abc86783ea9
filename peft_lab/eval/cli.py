"""`peft-lab eval [HYDRA FLAGS] [OVERRIDES...]`: score a model dir (or an adapter dir on its base), write eval.json.

    peft-lab eval model=DIR eval=classification 'eval.tasks=[bbc_news]' out=DIR2
    peft-lab eval model=ADAPTER model.base=BASE eval=perplexity eval.file=text.txt logger=wandb
    peft-lab eval -m model=A,B eval=classification 'eval.tasks=[t.jsonl]'   (one dir per job + summary.md/.csv)

The config is `conf/eval.yaml` with the groups `eval` (`conf/eval/<name>.yaml`) and `logger` (as in train). The
command line is normalised first, as train's is:
- `model=DIR` is short for `model.path=DIR` (`model` is not a config group here);
- `eval.X=V` / `logger.X=V` become `++eval.X=V` / `++logger.X=V` (any field of the schema can be set; unknown ones
  are caught by validation, which lists the valid ones);
- `out=DIR` moves Hydra's run dir there (with `-m`, the sweep dir: one subdir per job).
Every job is composed and checked (model dir, evaluator settings, its data, the model's type) before any runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from peft_lab.errors import UserError
from peft_lab.hydra_app import HydraApp, compose_all, is_info, is_multirun, job_dirname, parse_override, split_args

__all__ = ["main", "EvalRun", "resolve", "normalise_overrides"]

APP = HydraApp("peft-lab eval", "eval", sweep_errors="report", prefix="peft-lab eval: ")
GROUP_KEYS = ("eval", "logger")
TOP_KEYS = ("model", "out")


def _job_dirname(dirname: str, limit: int = 100) -> str:
    """A sweep job's dir name from Hydra's override_dirname: paths flattened (`/` -> `_`), cut to `limit`
    characters with a hash of the whole when longer."""
    import hashlib

    name = job_dirname(dirname.split(","))
    return name if len(name) <= limit else f"{name[: limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


# conf/eval.yaml's hydra.sweep.subdir (registered on import, so also in launcher processes that unpickle `_job`)
OmegaConf.register_new_resolver("peft_lab_eval_dirname", _job_dirname, replace=True)


@dataclasses.dataclass(frozen=True)
class EvalRun:
    """A validated `peft-lab eval` job."""

    evaluator: Any
    model: str
    base: str | None
    out: str | None
    logger_name: str
    logger: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"path": self.model, "base": self.base},
            "eval": self.evaluator.to_dict(),
            "logger": {"name": self.logger_name, **dataclasses.asdict(self.logger)},
        }


def normalise_overrides(overrides: list[str], multirun: bool) -> list[str]:
    """Apply the rewrites of the module docstring."""
    from hydra.core.override_parser.types import OverrideType

    out = []
    for tok in overrides:
        o = parse_override(tok, "peft-lab eval: ")
        key, value = o.key_or_group, tok.split("=", 1)[-1]
        if o.type != OverrideType.CHANGE or o.package is not None:
            out.append(tok)
        elif key == "model":
            out.append(f"model.path={value}")
        elif key == "out":
            if o.is_sweep_override():
                raise UserError(f"{tok}: out cannot be swept; with -m every job gets its own subdir of it.")
            out.append(f"hydra.{'sweep' if multirun else 'run'}.dir={value}")
        elif "." in key and key.split(".", 1)[0] in GROUP_KEYS:
            out.append("++" + tok)
        else:
            out.append(tok)
    return out


def resolve(cfg: Any, choices: dict[str, str] | None = None) -> EvalRun:
    """A composed `eval` config -> EvalRun (every group checked against its schema)."""
    from omegaconf import DictConfig, open_dict
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    from peft_lab.eval.base import build_evaluator
    from peft_lab.params import build
    from peft_lab.train.config import group_schema

    if isinstance(cfg, DictConfig):
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.pop("hydra", None)
            try:
                cfg.out = cfg.get("out")
            except OmegaConfBaseException:  # `${hydra:runtime.output_dir}` resolves only inside a Hydra job
                cfg.out = None
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:
            if e.full_key == "model.path":
                raise UserError("peft-lab eval: give model=DIR, the model dir (or adapter dir) to score.") from None
            raise UserError(f"peft-lab eval: {e.full_key} must be set (e.g. {e.full_key}=...).") from None
    cfg = dict(cfg)
    extra = sorted(set(cfg) - {"eval", "logger", "model", "out"})
    if extra:
        raise UserError(f"peft-lab eval: unknown key(s) {', '.join(extra)}; the config has: model, eval, logger, out.")
    node = dict(cfg.get("eval") or {})
    if "name" not in node and choices and choices.get("eval"):
        node["name"] = choices["eval"]
    evaluator = build_evaluator(node)
    lnode = dict(cfg.get("logger") or {"name": "none"})
    lname = str(lnode.pop("name", None) or (choices or {}).get("logger") or "none")
    logger = build(group_schema("logger", lname), lnode, where=f"logger={lname}", prefix="logger.")
    model = cfg.get("model") or {}
    if not isinstance(model, dict) or not model.get("path"):
        raise UserError("peft-lab eval: give model=DIR (a model dir, or an adapter dir with model.base=DIR).")
    return EvalRun(evaluator, str(model["path"]), model.get("base"), cfg.get("out"), lname, logger)


def _check(cfg) -> EvalRun:
    from peft_lab.eval.load import resolve_model
    from peft_lab.eval.run import check_scorable

    run = resolve(cfg, dict(cfg.hydra.runtime.choices))
    check_scorable(run.evaluator, resolve_model(run.model, run.base))
    return run


def _job(cfg) -> float:
    from hydra.core.hydra_config import HydraConfig

    from peft_lab.eval.run import evaluate, log_record
    from peft_lab.tree import guard_output

    hc = HydraConfig.get()
    run = resolve(cfg, dict(hc.runtime.choices))
    out = Path(run.out or hc.runtime.output_dir)
    guard_output(out, [run.model, run.base], kind="eval", replaces=False, what="out")
    record = evaluate(run.evaluator, run.model, base=run.base)
    if hc.mode.name == "MULTIRUN":
        record["job"] = {"overrides": [o.lstrip("+") for o in hc.overrides.task]}
    from peft_lab.eval.run import write_record

    write_record(out, record)
    log_record(run.logger, out, {**run.to_dict(), "out": str(out)}, record)
    tasks = ", ".join(f"{t} {m.get(record['metric'], float('nan')):.4f}" for t, m in record["tasks"].items())
    print(f"{record['metric']} {record['score']:.4f} ({tasks}) -> {out / 'eval.json'}", flush=True)
    return float(record["score"])


def main(argv: list[str]) -> int:
    flags, overrides = split_args(argv)
    multirun = is_multirun(flags)
    overrides = normalise_overrides(overrides, multirun)
    if not is_info(flags):
        compose_all("eval", overrides, multirun, _check, job_name="eval")
    return APP.run(_job, [*flags, *overrides])
