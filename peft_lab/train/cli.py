"""`peft-lab train [HYDRA FLAGS] [OVERRIDES...]`: compose the Hydra config, check it, call `train(cfg)`.

Before Hydra runs, the command line is normalised and every job's config is composed and validated against the
registries (for `-m`, every combination of the sweep), so a typo fails in a second, before any training:
- `group.field=value` for the groups model/data/adapter/trainer/logger becomes `++group.field=value`: any field
  of the group's schema can be set whether or not its YAML lists it; unknown fields are caught by validation,
  which lists the valid ones;
- `output_dir=DIR` becomes `hydra.run.dir=DIR` (with `-m`: `hydra.sweep.dir=DIR`, one subdir per job), so Hydra's
  own files (.hydra/, train.log) sit beside the outputs.
Hydra's errors (unknown option, bad override syntax) become one-paragraph `UserError`s.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

from peft_lab.errors import UserError

__all__ = ["main", "normalise_overrides", "compose_jobs"]

GROUP_KEYS = ("model", "data", "adapter", "trainer", "logger")


def _job_dirname(dirname: str) -> str:
    """Hydra's override_dirname without the `++` this module adds (`++adapter.r=4,adapter=lora` -> `adapter.r=4,...`)."""
    return re.sub(r"(^|,)\++", r"\1", dirname)


# used by conf/train.yaml's hydra.sweep.subdir; registered on import, so also in launcher processes (submitit)
# that unpickle `_job` from this module
OmegaConf.register_new_resolver("peft_lab_dirname", _job_dirname, replace=True)
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "--shell-completion", "-sc"}


def _is_override(tok: str) -> bool:
    return not tok.startswith("-") and ("=" in tok or tok.startswith("~"))


def normalise_overrides(overrides: list[str], multirun: bool) -> list[str]:
    """Apply the two rewrites described in the module docstring."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parser = OverridesParser.create()
    out = []
    for tok in overrides:
        o = _parse(parser, tok)
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


def _parse(parser, tok: str):
    from hydra.errors import OverrideParseException

    try:
        return parser.parse_overrides([tok])[0]
    except OverrideParseException as e:
        raise UserError(f"cannot parse the override {tok!r}: {str(e).splitlines()[0]}") from None


def _hydra_error(e: BaseException) -> UserError:
    """A Hydra/OmegaConf exception as a UserError (options listed on one line)."""
    from hydra.errors import MissingConfigException

    msg = str(e).strip()
    if isinstance(e, MissingConfigException) and getattr(e, "options", None):
        group = (getattr(e, "missing_cfg_file", "") or "").rsplit("/", 1)
        name = group[-1]
        where = group[0] if len(group) > 1 else "config"
        return UserError(f"{where}={name}: no such option. Available {where} options: {', '.join(sorted(e.options))}.")
    return UserError(msg.replace("\n\t", ", ").replace("\n\n", " ").replace("\n", " "))


def compose_jobs(overrides: list[str], multirun: bool) -> list[Any]:
    """The composed config of every job (sweeps expanded by Hydra's basic sweeper), each validated; returns the
    RunConfigs. Raises UserError for the first job that does not compose or validate."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.errors import OmegaConfBaseException

    from peft_lab.config import conf_dir
    from peft_lab.train.config import resolve

    own = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]  # launcher etc. do not shape the job
    if multirun:
        parsed = OverridesParser.create().parse_overrides(own)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    else:
        jobs = [own]
    runs = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="train"):
            for job in jobs:
                try:
                    cfg = compose(config_name="train", overrides=list(job), return_hydra_config=True)
                except UserError:
                    raise
                except (Exception, OmegaConfBaseException) as e:  # Hydra raises several unrelated types
                    raise _hydra_error(e) from None
                choices = dict(cfg.hydra.runtime.choices)
                try:
                    runs.append(resolve(cfg, choices))
                except UserError as e:
                    if multirun and len(jobs) > 1:
                        raise UserError(f"sweep job [{' '.join(job)}]: {e}") from None
                    raise
    finally:
        GlobalHydra.instance().clear()
    return runs


_failed: list[UserError] = []


def _job(cfg) -> dict | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from peft_lab.train.app import train
    from peft_lab.train.config import resolve

    hc = HydraConfig.get()
    try:
        run = resolve(cfg, dict(hc.runtime.choices))
        return train(run, output_dir=run.output_dir or hc.runtime.output_dir)
    except UserError as e:
        if hc.mode == RunMode.MULTIRUN:
            raise  # stops the sweep; Hydra names the failing job's overrides
        _failed.append(e)  # a single run: reported by main() as one paragraph, without Hydra's preamble
        return None


def main(argv: list[str]) -> int:
    import hydra

    from peft_lab.config import conf_dir, hydra_argv

    argv = list(argv)
    multirun = "-m" in argv or "--multirun" in argv
    overrides = [t for t in argv if _is_override(t)]
    flags = [t for t in argv if not _is_override(t)]
    overrides = normalise_overrides(overrides, multirun)
    if not _INFO_FLAGS.intersection(flags):
        compose_jobs(overrides, multirun)  # fail fast, before Hydra creates dirs or any job starts

    app = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(_job)
    _failed.clear()
    try:
        with hydra_argv("peft-lab train", [*flags, *overrides]):
            app()
        if _failed:
            raise _failed[0]
    except UserError:
        raise
    except SystemExit as e:  # argparse errors and --help
        return int(e.code or 0) if isinstance(e.code, int) else 2
    except Exception as e:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(e, (HydraException, OmegaConfBaseException)):
            raise _hydra_error(e) from None
        raise
    return 0
