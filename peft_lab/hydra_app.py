"""The Hydra front end of `peft-lab train` and of `peft-lab merge`'s Hydra form: a `HydraApp` runs a task function
once per job of its composed config (`-m`: once per job of the sweep), and every error comes out as one
one-paragraph `UserError`.

- The command line: flags (`-m`, `--cfg job`, ...) are passed before the overrides whatever their order, and each
  override is parsed first, so a syntax error names the override.
- A `UserError` raised in a job comes out of Hydra as itself, without Hydra's "Error executing job ..." report.
  With `sweep_errors="report"` a sweep job's UserError is left to Hydra instead: the batch's other jobs still
  run, Hydra names the failing job's overrides, and the error is raised after the batch.
- Hydra's and OmegaConf's exceptions become UserErrors (`hydra_error`), with an app's own `hints` for messages it
  can say better.
- `scratch=True` runs Hydra in a temporary run/sweep dir that is removed afterwards, without its `.hydra/` files
  and without touching logging: for apps that write their outputs where the config says.
- `compose_all` composes (and checks) every job of a command line without running anything, so a sweep can be
  refused before its first job starts; `job_dirname` names a sweep job's dir after its overrides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal, TypeVar

from peft_lab.config import conf_dir, hydra_argv
from peft_lab.errors import UserError

__all__ = [
    "HydraApp",
    "hydra_error",
    "compose_all",
    "split_args",
    "is_multirun",
    "is_info",
    "parse_override",
    "job_dirname",
]

T = TypeVar("T")
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "--shell-completion", "-sc"}


def _is_override(tok: str) -> bool:
    return not tok.startswith("-") and ("=" in tok or tok.startswith("~"))


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(flags with their values, overrides) of a Hydra command line, each in its original order."""
    return [t for t in argv if not _is_override(t)], [t for t in argv if _is_override(t)]


def is_multirun(flags: Sequence[str]) -> bool:
    return "-m" in flags or "--multirun" in flags


def is_info(flags: Sequence[str]) -> bool:
    """True for flags that only print something (help, the config) and run no job."""
    return bool(INFO_FLAGS.intersection(flags))


def parse_override(tok: str, prefix: str = "") -> Any:
    """Hydra's parsed `Override` of one command-line token (a UserError naming the token if it does not parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides([tok])[0]
    except OverrideParseException as e:
        raise UserError(f"{prefix}cannot parse the override {tok!r}: {str(e).splitlines()[0]}") from None


def job_dirname(
    overrides: Sequence[str], exclude: Collection[str] = (), *, unplus: bool = True, safe: bool = True
) -> str:
    """A sweep job's dir name: its overrides joined by commas, without those of the `exclude` keys; with `unplus`,
    without leading `+`s (a front end that adds `++` to group fields shows the overrides as the user wrote them);
    with `safe`, characters other than letters, digits and `._=,+-` as `_`."""
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in exclude]
    name = ",".join(re.sub(r"^\++", "", o) for o in keep) if unplus else ",".join(keep)
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name) if safe else name


def hydra_error(e: BaseException, prefix: str = "", hints: Sequence[tuple[str, str]] = ()) -> UserError:
    """A Hydra/OmegaConf exception as one paragraph: a missing option lists the available ones, and the first of
    `hints` (regex, replacement template for `re.Match.expand`) that matches the message replaces it."""
    from hydra.errors import MissingConfigException

    msg = str(e).strip()
    if isinstance(e, MissingConfigException) and getattr(e, "options", None):
        group = (getattr(e, "missing_cfg_file", "") or "").rsplit("/", 1)
        where = group[0] if len(group) > 1 else "config"
        msg = f"{where}={group[-1]}: no such option. Available {where} options: {', '.join(sorted(e.options))}."
    for pattern, template in hints:
        m = re.search(pattern, msg)
        if m:
            msg = m.expand(template)
            break
    return UserError(prefix + msg.replace("\n\t", ", ").replace("\n\n", " ").replace("\n", " "))


class JobFailed(BaseException):
    """Carries a UserError out of a Hydra job: Hydra catches and reports `Exception`s, not this."""

    def __init__(self, error: UserError):
        super().__init__(str(error))
        self.error = error


class Job:
    """The task function Hydra runs (a module-level class, so launchers that pickle the task can)."""

    def __init__(self, task: Callable[[Any], Any], sweep_errors: Literal["abort", "report"]):
        self.task, self.sweep_errors = task, sweep_errors

    def __call__(self, cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            return self.task(cfg)
        except UserError as e:
            if self.sweep_errors == "report" and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            raise JobFailed(e) from None


@dataclasses.dataclass(frozen=True)
class HydraApp:
    """One Hydra application over `conf/<config_name>.yaml` (see the module docstring).

    Attributes:
        prog: the command, for usage messages (`peft-lab train`).
        config_name: the root config in `conf/`.
        scratch: run Hydra in a temporary dir removed afterwards, without its own files or logging setup.
        sweep_errors: `abort` (a job's UserError ends the sweep at once) or `report` (Hydra's handling).
        prefix: put before messages translated from Hydra (`peft-lab merge: `).
        hints: (regex, template) rewrites of Hydra messages, see `hydra_error`.
    """

    prog: str
    config_name: str
    scratch: bool = False
    sweep_errors: Literal["abort", "report"] = "abort"
    prefix: str = ""
    hints: tuple[tuple[str, str], ...] = ()

    def run(self, task: Callable[[Any], Any], argv: Sequence[str]) -> int:
        """Run `task(cfg)` for every job of the command line; returns the exit code (0, or that of `--help` and
        argument errors). Raises UserError."""
        import hydra

        flags, overrides = split_args(argv)
        for tok in overrides:
            parse_override(tok, self.prefix)
        scratch = tempfile.mkdtemp(prefix="peft-lab-hydra-") if self.scratch else None
        extra = (
            []
            if scratch is None
            else [
                f"hydra.run.dir={scratch}",
                f"hydra.sweep.dir={scratch}",
                "hydra.output_subdir=null",
                "hydra/job_logging=none",
                "hydra/hydra_logging=none",  # leave the logging of the process as it is
            ]
        )
        job = Job(task, self.sweep_errors)
        app = hydra.main(config_path=str(conf_dir()), config_name=self.config_name, version_base="1.3")(job)
        try:
            with hydra_argv(self.prog, [*flags, *overrides, *extra]):
                app()
        except JobFailed as e:
            raise e.error from None
        except SystemExit as e:  # argparse errors and --help
            return int(e.code or 0) if isinstance(e.code, int) else 2
        except Exception as e:
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            if isinstance(e, (HydraException, OmegaConfBaseException)):
                raise hydra_error(e, self.prefix, self.hints) from None
            raise
        finally:
            if scratch is not None:
                with contextlib.suppress(OSError):
                    shutil.rmtree(scratch)
        return 0


def compose_all(
    config_name: str, overrides: Sequence[str], multirun: bool, check: Callable[[Any], T], *, job_name: str = "app"
) -> list[T]:
    """`check(cfg)` for the composed config (with its `hydra` node) of every job of `overrides`, sweeps expanded
    as Hydra's basic sweeper does. Raises the first UserError (naming the sweep job's overrides in a sweep of
    several jobs); Hydra's errors are translated by `hydra_error`."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.errors import OmegaConfBaseException

    own = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]  # launcher etc. do not shape the job
    if multirun:
        parsed = OverridesParser.create().parse_overrides(own)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    else:
        jobs = [own]
    out = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name=job_name):
            for job in jobs:
                try:
                    cfg = compose(config_name=config_name, overrides=list(job), return_hydra_config=True)
                except UserError:
                    raise
                except (Exception, OmegaConfBaseException) as e:  # Hydra raises several unrelated types
                    raise hydra_error(e) from None
                try:
                    out.append(check(cfg))
                except UserError as e:
                    if multirun and len(jobs) > 1:
                        raise UserError(f"sweep job [{' '.join(job)}]: {e}") from None
                    raise
    finally:
        GlobalHydra.instance().clear()
    return out
