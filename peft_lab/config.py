"""Where the Hydra configs live: `conf/` in a source checkout, `peft_lab/conf` in an installed wheel."""

from __future__ import annotations

from pathlib import Path

__all__ = ["conf_dir"]


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
