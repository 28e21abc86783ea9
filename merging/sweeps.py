"""Scored merge sweeps (the Hydra form of `peft-lab merge` with `eval=NAME`): per job, the logger and `keep`;
after the sweep, the summary and the best recipe; for Optuna searches, the objective.

    peft-lab merge -m method=ties method.density=0.2,0.5,0.8 base=B 'models=[F1,F2]' out=SWEEP \\
        eval=classification 'eval.tasks=[t.jsonl]' logger=wandb keep=best

Per job (`ScoredJob`), after `run_merge` wrote `SWEEP/<job>/` with its `eval.json`:
- the metrics go to the logger (`logger=none|csv|jsonl|wandb`, as in train) in the job's dir: one run per job,
  grouped by the sweep (the W&B group is the sweep dir's name unless `logger.group` is set), the recipe as config;
- `keep` decides which merged models stay: `all`; `best` (the best-scoring job's model so far; a job that does
  not beat it has its model removed, the one it beats loses its model: at most two models are on disk at any time);
  `none` (every job's model is removed once scored). A removed model leaves its records (eval.json,
  merge_recipe.yaml, the logger's files), and the swap is atomic: a job dir is at every moment either the whole
  merged model or its records (`discard_model`), never a partly deleted model;
- the job returns its score, which a sweeper such as Optuna's optimises (`hydra/sweeper=optuna`).
After the sweep (`MergeSweepSummary`, a Hydra callback in conf/merge.yaml): `SWEEP/summary.md` and `summary.csv`
(every job dir with an eval.json, best marked `*`, also those of earlier runs into the same dir, e.g. a resumed
Optuna study) and `SWEEP/best_recipe.yaml`, the best job's recipe as a plain mergekit-style YAML (plus its `eval:`
block, which mergekit ignores): `peft-lab merge --config SWEEP/best_recipe.yaml --out DIR` merges and scores it
again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from peft_lab.errors import UserError

__all__ = [
    "ScoredJob",
    "MergeSweepSummary",
    "discard_model",
    "has_model",
    "job_name",
    "apply_per_model",
    "sweep_root",
    "summarize",
    "KEEP",
    "BEST_RECIPE",
]

KEEP = ("all", "best", "none")
BEST_RECIPE = "best_recipe.yaml"
PLAIN_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "data", "eval")
_LOCK = ".peft-lab-keep.lock"


def apply_per_model(cfg: dict[str, Any]) -> dict[str, Any]:
    """The Hydra form's `per_model: {param: values}` written into `models`: `values` is a list with one value per
    model, in order, or a mapping {index: value} for some of them (`++per_model.weight.1=0.7`); each value replaces
    that model's own. One flat key per value is what a sweeper can set, whatever order it applies overrides in.
    Returns the config without `per_model`."""
    cfg = dict(cfg)
    per_model = cfg.pop("per_model", None) or {}
    if not isinstance(per_model, Mapping):
        raise UserError(f"peft-lab merge: per_model must be a mapping {{param: values}}, got {per_model!r}.")
    models = [dict(m) if isinstance(m, Mapping) else {"model": m} for m in cfg.get("models") or []]
    for key, values in per_model.items():
        for i, v in _indexed(key, values, len(models)):
            models[i]["parameters"] = {**(models[i].get("parameters") or {}), key: v}
    if per_model:
        cfg["models"] = models
    return cfg


def _indexed(key: str, values: Any, n: int) -> list[tuple[int, Any]]:
    if isinstance(values, Mapping):
        try:
            items = [(int(i), v) for i, v in values.items()]
        except (TypeError, ValueError):
            items = [(-1, None)]
        if any(not 0 <= i < n for i, _ in items):
            raise UserError(
                f"peft-lab merge: per_model.{key} is keyed by model index (0 to {n - 1}, in the order of models), "
                f"got {', '.join(map(str, values))}."
            )
        return items
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if len(values) != n:
        raise UserError(
            f"peft-lab merge: per_model.{key} has {len(values)} value(s) but models has {n} entries; give one "
            "value per model, in the order of models (or {index: value} for some)."
        )
    return list(enumerate(values))


def job_name(overrides: list[str], exclude: set[str], limit: int = 120) -> str:
    """A sweep job's dir name: its overrides but those of `exclude` and of the evaluator and logger (they do not
    change the merged model), cut to `limit` characters with a hash of the whole when longer (an Optuna trial's
    overrides hold full-precision floats)."""
    from peft_lab.hydra_app import job_dirname

    own = [o for o in overrides if not o.lstrip("+~").startswith(("eval=", "eval.", "logger."))]
    name = job_dirname(own, exclude, unplus=False)
    if len(name) <= limit:
        return name
    return f"{name[: limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def sweep_root(raw_out: str) -> Path:
    """Where a sweep's summary goes: `out`, or for an `out` that interpolates per-job values
    (`runs/d${method.density}`) the dir part before the first interpolation (`runs/`)."""
    if "${" not in raw_out:
        return Path(raw_out)
    head = raw_out.split("${", 1)[0]
    return Path(head) if head.endswith(("/", os.sep)) else (Path(head).parent if head else Path("."))


@dataclasses.dataclass
class ScoredJob:
    """One job of the Hydra form: checked before its merge (`check`), finished after it (`finish`)."""

    cfg: Mapping[str, Any]
    multirun: bool

    @property
    def keep(self) -> str:
        return str(self.cfg.get("keep") or "all")

    def check(self) -> None:
        """keep, logger and the Optuna sweeper's direction, before anything is merged."""
        ev = self.cfg.get("eval")
        if self.keep not in KEEP:
            raise UserError(f"peft-lab merge: keep={self.keep!r} must be one of: {', '.join(KEEP)}.")
        if self.keep != "all" and ev is None:
            raise UserError(
                f"peft-lab merge: keep={self.keep} chooses models by their score; give eval=NAME too (e.g. "
                "eval=classification 'eval.tasks=[...]'), or keep=all."
            )
        self.logger()
        _check_sweeper(ev)

    def reuse(self, out: Path, recipe: Any) -> float | None:
        """The score already in `out` when `out` holds this very job: the same recipe (evaluator included) recorded
        in its merge_recipe.yaml, with inputs whose recorded sha256 digests still match the files. A sampler that
        proposes a setting twice (a categorical search space, a seeded sampler re-run) then costs nothing."""
        from merging.provenance import RECIPE_FILE
        from peft_lab.eval import read_record

        record = read_record(out)
        try:
            recorded = yaml.safe_load((out / RECIPE_FILE).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        canon = yaml.safe_load(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        if record is None or {k: recorded.get(k) for k in canon} != canon or not _inputs_unchanged(recorded):
            return None
        print(f"{out}: this job was merged and scored before ({record['metric']} {record['score']:.4f}); reused")
        return float(record["score"])

    def logger(self):
        from peft_lab.params import build
        from peft_lab.train.config import group_schema

        node = dict(self.cfg.get("logger") or {"name": "none"})
        name = str(node.pop("name", "none"))
        return name, build(group_schema("logger", name), node, where=f"logger={name}", prefix="logger.")

    def finish(self, out: Path, root: Path | None, overrides: list[str]) -> float | None:
        """Log the job's score, apply `keep`; returns the score (None without eval)."""
        from peft_lab.eval import log_record, read_record, write_record
        from peft_lab.eval.summary import best_row

        record = read_record(out)
        if record is None:
            return None
        record["job"] = {"name": out.name, "overrides": overrides}
        write_record(out, record)
        name, logger = self.logger()
        if name != "none":
            log_record(_named(logger, out, root), out, _log_config(out, overrides), record)
        if self.multirun and root is not None and self.keep != "all":
            with _keep_lock(root):
                if self.keep == "none":
                    discard_model(out)
                else:
                    kept = [d for d in _scored_models(root) if d != out]
                    rows = [_row(d) for d in [*kept, out]]  # the incumbent first: ties keep it
                    best = best_row(rows)
                    for row in rows:
                        if row is not best:
                            discard_model(Path(row["dir"]))
        return float(record["score"])


def _inputs_unchanged(recorded: Mapping[str, Any]) -> bool:
    """Every input file's sha256 equals the digest the record holds (False when the record holds none)."""
    if recorded.get("hash") != "sha256" or not recorded.get("inputs"):
        return False
    for entry in recorded["inputs"]:
        root = Path(entry["model"])
        for name, digest in (entry.get("files") or {}).items():
            f = root / name if root.is_dir() else Path(name)
            if _sha256(f) != digest:
                return False
    return True


def _sha256(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    except OSError:
        return None
    return f"sha256:{h.hexdigest()}"


def _named(logger, out: Path, root: Path | None):
    """W&B: one run per job, named after it, grouped by the sweep dir (unless the config names them)."""
    changes = {}
    if hasattr(logger, "run_name") and logger.run_name is None:
        changes["run_name"] = out.name
    if hasattr(logger, "group") and logger.group is None and root is not None:
        changes["group"] = root.resolve().name
    return dataclasses.replace(logger, **changes) if changes else logger


def _log_config(out: Path, overrides: list[str]) -> dict[str, Any]:
    from merging.provenance import RECIPE_FILE

    try:
        recipe = yaml.safe_load((out / RECIPE_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    return {**recipe, "job": out.name, "overrides": overrides, "out": str(out)}


def _check_sweeper(ev: Any) -> None:
    """With `hydra/sweeper=optuna`: an evaluator is required, and the study's direction must match its metric."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    sweeper = HydraConfig.get().sweeper
    target = str(sweeper.get("_target_", ""))
    if "optuna" not in target.lower():
        return
    if ev is None:
        raise UserError(
            "peft-lab merge: the Optuna sweeper optimises each merge's score; give eval=NAME (e.g. "
            "eval=classification 'eval.tasks=[...]')."
        )
    from peft_lab.eval import build_evaluator

    metric, higher = build_evaluator(ev).headline()
    directions = sweeper.get("direction")
    directions = [directions] if isinstance(directions, str) or not hasattr(directions, "__iter__") else directions
    want = "maximize" if higher else "minimize"
    got = [str(getattr(d, "name", d)) for d in directions]
    if got != [want]:
        raise UserError(
            f"peft-lab merge: the Optuna study's direction is {', '.join(got)}, but the score ({metric}) is "
            f"{'higher' if higher else 'lower'} for better merges: set hydra.sweeper.direction={want}."
        )


# ---------------------------------------------------------------------------------------------------------
# keep: which merged models stay on disk
# ---------------------------------------------------------------------------------------------------------
def _model_file(name: str) -> bool:
    from merging.run import COPIED_FILES

    return name.endswith((".safetensors", ".safetensors.index.json", ".bin")) or name in (
        *COPIED_FILES,
        "adapter_config.json",
    )


def has_model(d: Path) -> bool:
    """True while the dir holds model weights."""
    return d.is_dir() and any(f.name.endswith((".safetensors", ".bin")) for f in d.iterdir() if f.is_file())


def _scored_models(root: Path) -> list[Path]:
    from peft_lab.eval import read_record
    from peft_lab.tree.fs import output_kind

    return [
        d
        for d in sorted(root.iterdir())
        if not d.name.startswith(".") and has_model(d) and output_kind(d) == "merge" and read_record(d) is not None
    ]


def _row(d: Path) -> dict[str, Any]:
    from peft_lab.eval import read_record

    rec = read_record(d) or {}
    return {"dir": str(d), "score": rec["score"], "metric": rec["metric"], "higher_is_better": rec["higher_is_better"]}


def discard_model(d: Path) -> None:
    """Replace the merged model dir `d` by its records (every file that is not a weight, config or tokenizer file),
    in one rename: a copy of the records is made beside `d`, swapped in, and the model deleted. SIGINT/SIGTERM wait
    until the swap is done."""
    if not has_model(d):
        return
    with _signals_deferred():
        tmp = d.with_name(f".{d.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp, 0o777)  # the process umask applies, as for any new dir
        try:
            for entry in d.iterdir():
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                elif not _model_file(entry.name):
                    shutil.copy2(entry, tmp / entry.name)
            trash = d.with_name(f".{d.name}.old-{os.getpid()}")
            os.replace(d, trash)
            os.replace(tmp, d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _keep_lock(root: Path) -> Iterator[None]:
    """Jobs running in parallel (hydra/launcher=joblib) decide one at a time which models stay."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (no advisory locks: parallel jobs may keep an extra model)
        yield
        return
    with open(root / _LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------
# After the sweep: summary and best recipe
# ---------------------------------------------------------------------------------------------------------
def _model_column(d: Path) -> dict[str, Any]:
    return {"model": "kept" if has_model(d) else "removed"}


def summarize(root: Path) -> dict[str, Any] | None:
    """summary.md / summary.csv and best_recipe.yaml in `root`; returns the best row (None without scores)."""
    from peft_lab.eval.summary import collect, write_summary

    rows = collect(root, extra=_model_column)
    if not rows:
        return None
    best = write_summary(root, rows)
    if best is not None:
        write_best_recipe(root / best["job"], root / BEST_RECIPE)
    return best


def write_best_recipe(job_dir: Path, path: Path) -> None:
    """The job's recorded recipe without peft-lab's record keys (inputs, hashes, tool): a plain mergekit-style
    recipe, plus its `eval:` block."""
    from merging.provenance import RECIPE_FILE

    rec = yaml.safe_load((job_dir / RECIPE_FILE).read_text()) or {}
    plain = {k: rec[k] for k in PLAIN_KEYS if rec.get(k) is not None}
    head = (
        f"# the best job of the sweep: {job_dir.name}\n"
        f"# `peft-lab merge --config {path.name} --out DIR` merges and scores it again (mergekit-yaml reads it too\n"
        "# and ignores the eval block)\n"
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(head + yaml.safe_dump(plain, sort_keys=False))
    os.replace(tmp, path)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class MergeSweepSummary(Callback):
    """Hydra callback of `peft-lab merge -m` (conf/merge.yaml): the summary of a scored sweep."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(config, resolve=False).get("out")
        if not raw or raw == "???":
            return
        root = sweep_root(str(raw))
        if root.is_dir():
            summarize(root)
