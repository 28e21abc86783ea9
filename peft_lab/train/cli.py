"""`peft-lab train [HYDRA FLAGS] [OVERRIDES...]`: compose the Hydra config, check it, call `train(cfg)`.

Before Hydra runs, the command line is normalised and every job's config is composed and validated against the
registries (for `-m`, every combination of the sweep), so a typo fails in a second, before any training:
- `group.field=value` for the groups model/data/adapter/trainer/logger/eval becomes `++group.field=value`: any field
  of the group's schema can be set whether or not its YAML lists it; unknown fields are caught by validation,
  which lists the valid ones;
- `output_dir=DIR` becomes `hydra.run.dir=DIR` (with `-m`: `hydra.sweep.dir=DIR`, one subdir per job), so Hydra's
  own files (.hydra/, train.log) sit beside the outputs.
The run itself is `peft_lab.hydra_app.HydraApp` (shared with `peft-lab merge`): Hydra's errors (unknown option,
bad override syntax) become one-paragraph `UserError`s; a UserError of a single run comes out as itself, one of a
sweep job is left to Hydra, which names the job's overrides after the other jobs of the batch have run.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from peft_lab.errors import UserError
from peft_lab.hydra_app import HydraApp, compose_all, is_info, is_multirun, job_dirname, parse_override, split_args

__all__ = ["main", "normalise_overrides", "compose_jobs"]

GROUP_KEYS = ("model", "data", "adapter", "trainer", "logger", "eval")
APP = HydraApp("peft-lab train", "train", sweep_errors="report")


def _job_dirname(dirname: str) -> str:
    """Hydra's override_dirname without the `++` this module adds (`++adapter.r=4,adapter=lora` ->
    `adapter.r=4,...`)."""
    return job_dirname(dirname.split(","), safe=False)


# used by conf/train.yaml's hydra.sweep.subdir; registered on import, so also in launcher processes (submitit)
# that unpickle `_job` from this module
OmegaConf.register_new_resolver("peft_lab_dirname", _job_dirname, replace=True)


def normalise_overrides(overrides: list[str], multirun: bool) -> list[str]:
    """Apply the two rewrites described in the module docstring."""
    from hydra.core.override_parser.types import OverrideType

    out = []
    for tok in overrides:
        o = parse_override(tok)
        key = o.key_or_group
        if key == "output_dir" and o.type == OverrideType.CHANGE:
            if o.is_sweep_override():
                raise UserError(f"{tok}: output_dir cannot be swept; with -m every job gets its own subdir of it.")
            out.append(f"hydra.{'sweep' if multirun else 'run'}.dir={tok.split('=', 1)[1]}")
        elif o.type == OverrideType.CHANGE and "." in key and key.split(".", 1)[0] in GROUP_KEYS and o.package is None:
            out.append("++" + tok)
        else:
            out.append(tok)
    return out


def compose_jobs(overrides: list[str], multirun: bool) -> list[Any]:
    """The composed config of every job (sweeps expanded by Hydra's basic sweeper), each validated; returns the
    RunConfigs. Raises UserError for the first job that does not compose or validate."""
    from peft_lab.train.config import resolve

    return compose_all(
        "train", overrides, multirun, lambda cfg: resolve(cfg, dict(cfg.hydra.runtime.choices)), job_name="train"
    )


def _job(cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig

    from peft_lab.train.app import train
    from peft_lab.train.config import resolve

    hc = HydraConfig.get()
    run = resolve(cfg, dict(hc.runtime.choices))
    return train(run, output_dir=run.output_dir or hc.runtime.output_dir)


def main(argv: list[str]) -> int:
    flags, overrides = split_args(argv)
    multirun = is_multirun(flags)
    overrides = normalise_overrides(overrides, multirun)
    if not is_info(flags):
        compose_jobs(overrides, multirun)  # fail fast, before Hydra creates dirs or any job starts
    return APP.run(_job, [*flags, *overrides])
