"""The summary of a sweep (`peft-lab train -m ...`): a Hydra callback that, when all jobs are done, reads each
job's `metrics.json` and its overrides and prints one table, also written as `summary.md` and `summary.csv` in
the sweep dir. Rows keep the job order; the best headline metric (the task's `metric`, or with `eval=NAME` the
evaluator's score, `eval_score`) is marked with `*`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SweepSummary", "summarize"]

log = logging.getLogger("peft_lab.train")

COLUMNS = (
    "eval_accuracy",
    "eval_loss",
    "eval_sample_score",
    "eval_score",
    "train_loss",
    "trainable_params",
    "train_seconds",
)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "" if v is None else str(v)


def summarize(sweep_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(Markdown table, rows) for every job dir under `sweep_dir` (a dir with `.hydra/overrides.yaml`)."""
    root = Path(sweep_dir)
    rows = []

    def order(p: Path) -> tuple[int, str]:  # by job number (the `N_` Hydra puts in front), then name
        num = p.name.split("_", 1)[0]
        return (int(num) if num.isdigit() else 1 << 30, p.name)

    jobs = sorted((p for p in root.iterdir() if (p / ".hydra" / "overrides.yaml").exists()), key=order)
    per_job = [
        [o.lstrip("+") for o in yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text()) or []] for j in jobs
    ]
    common = [o for o in per_job[0] if all(o in p for p in per_job)] if per_job else []
    for job, overrides in zip(jobs, per_job, strict=True):
        m_path = job / "metrics.json"
        metrics = json.loads(m_path.read_text()) if m_path.exists() else {}
        varying = " ".join(o for o in overrides if o not in common) or "(no overrides)"
        rows.append({"job": job.name, "overrides": varying, "status": "ok" if metrics else "failed", **metrics})
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    ok = [r for r in rows if r["status"] == "ok" and r.get("metric") in r]
    best = None
    if ok:
        metric = ok[0]["metric"]
        higher = not metric.endswith("loss")
        if all("eval_score" in r for r in ok):  # `eval=NAME`: the evaluator's score ranks the jobs
            metric, higher = "eval_score", bool(ok[0].get("eval_higher_is_better", True))
        best = (max if higher else min)(ok, key=lambda r: r[metric])
    header = ["job", "status", *cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        mark = " *" if r is best else ""
        lines.append("| " + " | ".join([r["overrides"] + mark, r["status"], *(_fmt(r.get(c)) for c in cols)]) + " |")
    if common:
        lines.insert(0, f"all jobs: {' '.join(common)}\n")
    return "\n".join(lines), rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = ["job", "overrides", "status", *sorted({k for r in rows for k in r} - {"job", "overrides", "status"})]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class SweepSummary(Callback):
    """Hydra callback (configured in conf/train.yaml under hydra.callbacks)."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        table, rows = summarize(sweep_dir)
        (sweep_dir / "summary.md").write_text(table + "\n")
        _write_csv(sweep_dir / "summary.csv", rows)
        print(f"\nsweep summary ({sweep_dir}):\n{table}\n", flush=True)
