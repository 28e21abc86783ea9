"""`peft-lab merge`: two forms, one function (`merging.run_merge`).

    peft-lab merge --config RECIPE.yaml --out OUT_DIR [--overwrite] [--allow-pickle] [--allow-nonfinite]
                   [--no-progress] [--max-shard-size 5GB] [--hash none] [KEY=VALUE ...]
    peft-lab merge method=ties base=PATH 'models=[P1,P2]' out=OUT_DIR method.density=0.2     (Hydra)
    peft-lab merge -m method=ties method.density=0.2,0.5 base=PATH 'models=[P1,P2]' out=SWEEP_DIR

The first takes a mergekit-style YAML recipe; KEY=VALUE pairs after it set run options (overwrite=true, ...).
The second composes `conf/merge.yaml` with the `method` group (`conf/method/<name>.yaml`). In a sweep (`-m`)
each job writes `SWEEP_DIR/<its overrides>` (e.g. `SWEEP_DIR/method.density=0.2`), unless `out` interpolates
something itself (e.g. `out='runs/d${method.density}'`). With `eval=NAME` (or an `eval:` block in a recipe) each
merged model is scored (`merging.scoring`); the Hydra form also logs the scores (`logger=`), keeps the models
`keep=all|best|none` says, and summarises a sweep (`merging.sweeps`).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from peft_lab.errors import UserError
from peft_lab.hydra_app import HydraApp, is_multirun, split_args

__all__ = ["main"]

# overrides that do not change what is merged, left out of a sweep job's output dir name
_NOT_IN_DIRNAME = {
    "out",
    "base",
    "models",
    "overwrite",
    "progress",
    "hash",
    "max_shard_size",
    "chunk_size",
    "threads",
    "allow_pickle",
    "allow_nonfinite",
    "logger",
    "keep",
}
# Hydra runs in a scratch dir (outputs go to `out`); a sweep job's UserError ends the sweep at once
APP = HydraApp(
    "peft-lab merge",
    "merge",
    scratch=True,
    prefix="peft-lab merge: ",
    hints=(
        (
            r"Could not override 'method\.([^']+)'",
            r"the method has no parameter '\1' (see conf/method/<name>.yaml for its parameters; per-model values go "
            r"in models=[{model: PATH, parameters: {...}}]).",
        ),
    ),
)


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _config_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peft-lab merge", description="Merge models as a mergekit-style YAML recipe says.")
    flag = {"action": "store_true", "default": None}
    p.add_argument(
        "--config", required=True, help="mergekit-style recipe (merge_method, base_model, models, parameters, dtype)"
    )
    p.add_argument("--out", required=True, help="output dir (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", **flag, help="replace OUT once the new merge is complete")
    p.add_argument("--allow-pickle", **flag, help="load .bin/.pt inputs (can run code from them)")
    p.add_argument("--allow-nonfinite", **flag, help="merge inputs holding NaN/inf")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars (default: on a terminal)"
    )
    p.add_argument("--max-shard-size", default=None, help="output shard size, e.g. 5GB (default) or 500MB")
    p.add_argument("--hash", default=None, choices=["sha256", "none"], help="input content hash recorded in the recipe")
    p.add_argument(
        "options", nargs="*", metavar="KEY=VALUE", help="run options as in the Hydra form, e.g. overwrite=true"
    )
    return p


def _config_form(argv: list[str]) -> int:
    from merging.run import run_merge

    a = _config_parser().parse_args(argv)
    opts: dict[str, Any] = {
        "overwrite": a.overwrite,
        "allow_pickle": a.allow_pickle,
        "allow_nonfinite": a.allow_nonfinite,
        "progress": a.progress,
        "max_shard_size": a.max_shard_size,
        "hash": a.hash,
    }
    for item in a.options:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(
                f"peft-lab merge --config: unexpected argument {item!r}; options are KEY=VALUE (e.g. overwrite=true)."
            )
        opts[key.replace("-", "_")] = _yaml_value(value)
    out = run_merge(a.config, a.out, **opts)
    print(out)
    return 0


def _check_method_names(argv: list[str], conf: Path) -> None:
    """`method=NAME[,NAME...]` must name configs in conf/method (Hydra's own message lists search paths)."""
    from merging.base import METHODS

    for a in argv:
        if a.startswith("method="):
            for name in a.split("=", 1)[1].split(","):
                if name and not (conf / "method" / f"{name}.yaml").exists():
                    METHODS.get(name)  # raises "Unknown merge method ... Available: ..."
                    raise UserError(f"Method {name!r} has no config conf/method/{name}.yaml.")


def _defer_method_values(overrides: list[str]) -> list[str]:
    """In a sweep over methods, Hydra composes the sweep's base config with the default method, where method.X may
    not exist: a one-value `method.X=V` becomes `method.X=choice(V)`, applied per job after its method is chosen."""
    if not any(a.startswith("method=") and "," in a for a in overrides):
        return overrides
    return [
        f"{k}=choice({v})" if k.startswith("method.") and not re.search(r"[,(\[{]", v) else a
        for a in overrides
        for k, _, v in [a.partition("=")]
    ]


def _merge_job(cfg, *, multirun: bool, outs: list[Path]) -> float | None:
    """One Hydra job: the composed config as a recipe, merged into `out` (in a sweep: its subdir for the job); with
    `eval=NAME`, scored, logged and kept or not (`merging.sweeps`); returns the score (for a sweeper like Optuna)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from merging.recipe import hydra_to_dict, parse_recipe
    from merging.run import run_merge
    from merging.sweeps import ScoredJob, apply_per_model, job_name, sweep_root

    raw_out = OmegaConf.to_container(cfg, resolve=False).get("out")
    if OmegaConf.is_missing(cfg, "out") or raw_out in (None, ""):
        raise UserError(
            "peft-lab merge: give the output dir, e.g. out=merged/ (or use --config RECIPE.yaml --out DIR)."
        )
    d = OmegaConf.to_container(cfg, resolve=True)
    out = Path(str(d.pop("out")))
    hc = HydraConfig.get()
    if multirun and "${" not in str(raw_out):
        out = out / (job_name(list(hc.overrides.task), _NOT_IN_DIRNAME) or f"job{hc.job.num}")
    job = ScoredJob(d, multirun)
    job.check()
    recipe = parse_recipe(hydra_to_dict(apply_per_model(d)), where="overrides")
    if multirun and (score := job.reuse(out, recipe)) is not None:
        return score
    outs.append(run_merge(recipe, out))
    root = sweep_root(str(raw_out)) if multirun else None
    return job.finish(out, root, [o.lstrip("+") for o in hc.overrides.task])


def _hydra_form(argv: list[str]) -> int:
    from peft_lab.config import conf_dir

    _check_method_names(argv, conf_dir())
    flags, overrides = split_args(argv)
    multirun = is_multirun(flags)
    if multirun:
        overrides = _defer_method_values(overrides)
    outs: list[Path] = []
    code = APP.run(functools.partial(_merge_job, multirun=multirun, outs=outs), [*flags, *overrides])
    for o in outs:
        print(o)
    return code


def main(argv: list[str]) -> int:
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return _config_form(argv)
    if not argv:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__)
        return 0
    return _hydra_form(argv)
