"""The summary of a scored sweep: one row per job dir holding an `eval.json`, the best score marked with `*`,
written as `summary.md` and `summary.csv` in the sweep dir (as `peft-lab train -m` writes its own).

Used by `peft-lab eval -m` (a Hydra callback in conf/eval.yaml) and by scored merge sweeps (`merging.sweeps`).
Rows keep the job order (Hydra's job number in front of a dir name, else the name); hidden dirs are skipped.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

from peft_lab.eval.run import EVAL_FILE, read_record

__all__ = ["collect", "best_row", "render", "write_summary", "EvalSweepSummary"]

log = logging.getLogger("peft_lab.eval")


def _order(p: Path) -> tuple[int, int, str]:
    """Hydra's job number in front of the name (eval sweeps), else when the job was scored (merge sweeps)."""
    num = p.name.split("_", 1)[0]
    try:
        stamp = (p / EVAL_FILE).stat().st_mtime_ns
    except OSError:
        stamp = 0
    return (int(num) if num.isdigit() else 1 << 30, stamp, p.name)


def collect(root: str | os.PathLike, extra=None) -> list[dict[str, Any]]:
    """One row per job dir under `root` with an eval.json: job, overrides (those that differ between jobs), score,
    metric, the per-task headline metric, plus `extra(dir)`'s columns."""
    dirs = sorted((d for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith(".")), key=_order)
    records = [(d, rec) for d in dirs if (rec := read_record(d)) is not None]
    per_job = [list((rec.get("job") or {}).get("overrides") or []) for _, rec in records]
    common = [o for o in per_job[0] if all(o in p for p in per_job)] if len(per_job) > 1 else []
    rows = []
    for (d, rec), overrides in zip(records, per_job, strict=True):
        varying = [o for o in overrides if o not in common]
        row: dict[str, Any] = {
            "job": d.name,
            "overrides": " ".join(varying) or d.name,
            "score": rec["score"],
            "metric": rec["metric"],
            "higher_is_better": bool(rec.get("higher_is_better", True)),
        }
        for task, metrics in rec.get("tasks", {}).items():
            if rec["metric"] in metrics and len(rec["tasks"]) > 1:
                row[f"{task}/{rec['metric']}"] = metrics[rec["metric"]]
        if extra is not None:
            row.update(extra(d))
        rows.append(row)
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the best score (rows scored by another metric than the first row's are not compared)."""
    if not rows:
        return None
    metric, higher = rows[0]["metric"], rows[0]["higher_is_better"]
    same = [r for r in rows if r["metric"] == metric]
    return (max if higher else min)(same, key=lambda r: r["score"])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def render(rows: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """A Markdown table: the varying overrides (best marked with `*`), the score, per-task values, extras."""
    fixed = {"job", "overrides", "score", "metric", "higher_is_better", "best"}
    cols = list(dict.fromkeys(k for r in rows for k in r if k not in fixed))
    metric = rows[0]["metric"] if rows else "score"
    direction = "higher is better" if not rows or rows[0]["higher_is_better"] else "lower is better"
    header = ["job", f"score ({metric}, {direction})", *cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        mark = " *" if r is best else ""
        cells = [r["overrides"] + mark, _fmt(r["score"]), *(_fmt(r.get(c)) for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines.append(f"\nbest: {best['job']} ({metric} {_fmt(best['score'])})")
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(["job", "overrides", "score", "metric", "best", *(k for r in rows for k in r)]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_summary(root: str | os.PathLike, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """summary.md and summary.csv in `root` (a `best` column marks the best row); returns the best row."""
    best = best_row(rows)
    for r in rows:
        r["best"] = r is best
    table = render(rows, best)
    root = Path(root)
    for name, text in (("summary.md", table + "\n"), ("summary.csv", _csv(rows))):
        tmp = root / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, root / name)
    print(f"\nsweep summary ({root}):\n{table}\n", flush=True)
    return best


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class EvalSweepSummary(Callback):
    """Hydra callback of `peft-lab eval -m` (conf/eval.yaml): the summary of the sweep dir's jobs."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        if root.is_dir():
            rows = collect(root)
            if rows:
                write_summary(root, rows)
