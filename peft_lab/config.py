"""Where the Hydra configs live: `conf/` in a source checkout, `peft_lab/conf` in an installed wheel."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["conf_dir", "hydra_argv"]


def conf_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").exists() or (candidate / "merge.yaml").exists():
            return candidate
    try:  # editable installs map the package elsewhere
        import importlib.resources as ir

        p = Path(str(ir.files("peft_lab.conf")))
        if p.is_dir():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    raise RuntimeError("peft-lab's config directory (conf/) was not found; is the package installed correctly?")


@contextlib.contextmanager
def hydra_argv(prog: str, args: list[str]) -> Iterator[None]:
    """While inside, `sys.argv` is `[prog, *args]` (what a `hydra.main` app parses) and HYDRA_FULL_ERROR=1, so that
    exceptions reach the caller instead of Hydra printing them and exiting; both are restored on the way out."""
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [prog, *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
