"""Where metrics go: `none`, `csv`, `jsonl`, `wandb` (`conf/logger/<name>.yaml`). Only the main process logs.

A logger is opened with the resolved config (incl. the trainable-parameter count), then gets scalar metrics at
`log`, images (diffusion sample grids) at `log_image`, and the final metrics at `finish`. On resume,
`open(resume_step=k)` drops rows a killed run wrote after its last checkpoint (file loggers) or reattaches to the
same run id (W&B), so the log reads like the uninterrupted run's.

W&B never asks for a login: with no API key configured (env `WANDB_API_KEY` or a netrc entry) it runs in offline
mode (`WANDB_MODE=offline`), writing `DIR/wandb/offline-run-*` for a later `wandb sync`. Sweeps pass
`reinit="finish_previous"` so each job of `-m` is its own run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import secrets
from pathlib import Path
from typing import Any, ClassVar

from peft_lab.errors import UserError
from peft_lab.params import Checked, param
from peft_lab.registry import Registry

__all__ = ["LOGGERS", "Logger", "Session", "NoLogger", "CSVLogger", "JSONLLogger", "WandbLogger", "wandb_mode"]

LOGGERS: Registry[type[Logger]] = Registry("logger")


class Session:
    """An open log for one run; the base logs nothing."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, image: Any, step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass

    def state(self) -> dict[str, Any]:
        """What a checkpoint must remember to reattach after a restart (e.g. the W&B run id)."""
        return {}


@dataclasses.dataclass(frozen=True)
class Logger(Checked):
    """A logger's settings (its fields = `conf/logger/<name>.yaml`); `open` starts logging one run."""

    name: ClassVar[str]

    def open(self, run_dir: Path, config: dict[str, Any], resume_step: int = 0, state: dict | None = None) -> Session:
        return Session()


@LOGGERS.register("none")
@dataclasses.dataclass(frozen=True)
class NoLogger(Logger):
    """Silent: only metrics.json (and the progress bar on a terminal)."""

    name = "none"


class _JSONLSession(Session):
    def __init__(self, path: Path, resume_step: int):
        self.path = path
        lines = path.read_text().splitlines() if resume_step and path.exists() else []
        rows = [json.loads(x) for x in lines if x.strip()]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step))

    def log(self, metrics, step):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


class _CSVSession(Session):
    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if resume_step and path.exists():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "key", "value"])
            w.writerows([r["step"], r["key"], r["value"]] for r in rows)

    def log(self, metrics, step):
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerows([step, k, v] for k, v in metrics.items())


@LOGGERS.register("jsonl")
@dataclasses.dataclass(frozen=True)
class JSONLLogger(Logger):
    """One JSON object per logged step, {"step": k, "train/loss": ..., ...}, in DIR/`file`."""

    name = "jsonl"
    file: str = "log.jsonl"

    def open(self, run_dir, config, resume_step=0, state=None):
        return _JSONLSession(Path(run_dir) / self.file, resume_step)


@LOGGERS.register("csv")
@dataclasses.dataclass(frozen=True)
class CSVLogger(Logger):
    """A long table `step,key,value` in DIR/`file` (its columns stay fixed whatever is logged)."""

    name = "csv"
    file: str = "log.csv"

    def open(self, run_dir, config, resume_step=0, state=None):
        return _CSVSession(Path(run_dir) / self.file, resume_step)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str | None) -> str:
    """`requested`, else $WANDB_MODE, else online with an API key and offline without one (never a prompt)."""
    if requested:
        return requested
    env = os.environ.get("WANDB_MODE")
    if env:
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if _has_api_key() else "offline"


@LOGGERS.register("wandb")
@dataclasses.dataclass(frozen=True)
class WandbLogger(Logger):
    """Weights & Biases.

    Attributes:
        project, entity, group, tags, run_name: as in `wandb.init` (run_name null = W&B's generated name).
        mode: `online`, `offline` or `disabled`; null = $WANDB_MODE, else online only if an API key is configured.
    """

    name = "wandb"
    project: str = "peft-lab"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    run_name: str | None = None
    mode: str | None = param(None, choices=("online", "offline", "disabled"), help="or null for automatic")

    def open(self, run_dir, config, resume_step=0, state=None):
        try:
            import wandb
        except ImportError:
            raise UserError("logger=wandb needs the package wandb: pip install wandb") from None
        mode = wandb_mode(self.mode)
        if mode == "online" and not _has_api_key():
            raise UserError(
                "logger.mode=online but no W&B API key is configured: run `wandb login`, set WANDB_API_KEY, "
                "or use offline mode."
            )
        run_id = (state or {}).get("wandb_id") or secrets.token_hex(4)
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False, x_disable_stats=True)
        run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            tags=list(self.tags) or None,
            name=self.run_name,
            dir=str(run_dir),
            config=config,
            mode=mode,
            id=run_id,
            resume="allow",
            reinit="finish_previous",
            settings=settings,
        )
        return _WandbSession(run, run_id)


class _WandbSession(Session):
    def __init__(self, run, run_id: str):
        self.run, self.run_id = run, run_id

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_image(self, key, image, step):
        import wandb

        self.run.log({key: wandb.Image(image)}, step=step)

    def finish(self, summary):
        self.run.summary.update(summary)
        self.run.finish()

    def state(self):
        return {"wandb_id": self.run_id}
