"""Tables, plots and W&B logging of `peft-lab bench merge`.

Every number is a test accuracy averaged over the tasks, then over seeds. The interval is the 95 % t-interval
of the mean over seeds (mean ± t(0.975, n−1) · sd / √n; none for one seed). Normalized accuracy is the papers'
`merged accuracy / fine-tuned accuracy` of each task (the seed's own fine-tuned model), averaged over tasks.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np

__all__ = ["CLAIMS", "claims", "summarize", "markdown", "plots", "log_wandb", "interval", "layer_starts", "FINE_TUNED"]

FINE_TUNED = "fine-tuned (individual)"
BOUNDS = ("zero-shot", "pretrained", "linear probe", FINE_TUNED)
FIRST = ("linear", "soup", "task_arithmetic", "ties", "dare_linear", "dare_ties")
LAST = ("fisher", "adamerging (task-wise)", "adamerging (layer-wise)", "adamerging_ties (layer-wise)")


def _rank(method: str, variant: str) -> tuple:
    if method in BOUNDS:
        key = (0, BOUNDS.index(method), "")
    elif method in FIRST:
        key = (1, FIRST.index(method), "")
    elif method in LAST:
        key = (3, LAST.index(method), "")
    else:
        key = (2, 0, method)  # data-free methods registered later, alphabetically
    return (*key, variant != "paper")


def interval(values: list[float]) -> float:
    """Half-width of the 95 % t-interval of the mean (nan for fewer than two values)."""
    n = len(values)
    if n < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def _hparams(rs: list[dict]) -> str:
    per_seed = {r["seed"]: r["hparams"] for r in rs}
    counts = Counter(per_seed.values())
    if len(counts) == 1:
        return next(iter(counts))
    top, c = counts.most_common(1)[0]
    return f"{top} ({c}/{len(per_seed)} seeds; others in results.csv)"


def _normalized(rs: list[dict], ft: dict, seed: int) -> float:
    """Mean over tasks of accuracy / the seed's fine-tuned accuracy on the task, in %."""
    ratios = [r["acc"] / ft[(seed, r["task"])] for r in rs if ft.get((seed, r["task"]))]
    return 100 * float(np.mean(ratios)) if ratios else float("nan")


def summarize(rows: list[dict]) -> tuple[list[str], list[list[str]], list[dict]]:
    """The test table: per method/variant, per-task means over seeds, the average with its 95 % interval over
    seeds, and the normalized accuracy. Returns (header, table rows as strings, records)."""
    test = [r for r in rows if r["split"] == "test"]
    tasks = list(dict.fromkeys(r["task"] for r in test))
    keys = sorted(dict.fromkeys((r["method"], r["variant"]) for r in test), key=lambda mv: _rank(*mv))
    ft = {(r["seed"], r["task"]): r["acc"] for r in test if r["method"] == FINE_TUNED}
    header = ["method", "variant", "hparams", *tasks, "average", "95% CI", "normalized"]
    table, records = [], []
    for m, v in keys:
        rs = [r for r in test if r["method"] == m and r["variant"] == v]
        seeds = sorted({r["seed"] for r in rs})
        per_task = [100 * float(np.mean([r["acc"] for r in rs if r["task"] == t])) for t in tasks]
        per_seed = [100 * float(np.mean([r["acc"] for r in rs if r["seed"] == s])) for s in seeds]
        norm = [_normalized([r for r in rs if r["seed"] == s], ft, s) for s in seeds]
        norm = [x for x in norm if not math.isnan(x)]
        ci = interval(per_seed)
        rec = {
            "method": m,
            "variant": v,
            "hparams": _hparams(rs),
            "avg": float(np.mean(per_seed)),
            "ci": ci,
            "per_seed": per_seed,
            "normalized": float(np.mean(norm)) if norm else float("nan"),
            "normalized_ci": interval(norm),
            "tasks": dict(zip(tasks, per_task, strict=True)),
        }
        records.append(rec)
        table.append(
            [
                m,
                v,
                rec["hparams"],
                *[f"{x:.1f}" for x in per_task],
                f"{rec['avg']:.1f}",
                "–" if math.isnan(ci) else f"± {ci:.1f}",
                "–" if math.isnan(rec["normalized"]) else f"{rec['normalized']:.1f}",
            ]
        )
    return header, table, records


# The papers' claims, as (claim, better row, worse row, margin in points): the ordering of the AdaMerging paper's
# table (layer-wise AdaMerging > TIES > task arithmetic > weight averaging), its other comparisons, Fisher over
# plain averaging (Matena & Raffel), RegMean over TIES (FusionBench's CLIP table), DARE's "drop 90 % without loss"
# (a difference near 0 either way), and this benchmark's acceptance bar (every data-free merge at its paper defaults
# >= 3 points above zero-shot).
ADA_T, ADA_L, ADA_PP = "adamerging (task-wise)", "adamerging (layer-wise)", "adamerging_ties (layer-wise)"
CLAIMS = [
    ("AdaMerging layer-wise > TIES", (ADA_L, "paper"), ("ties", "paper"), 0.0),
    ("TIES > task arithmetic", ("ties", "paper"), ("task_arithmetic", "paper"), 0.0),
    ("task arithmetic > weight averaging", ("task_arithmetic", "paper"), ("linear", "paper"), 0.0),
    ("AdaMerging layer-wise > task-wise", (ADA_L, "paper"), (ADA_T, "paper"), 0.0),
    ("AdaMerging++ > AdaMerging (layer-wise)", (ADA_PP, "paper"), (ADA_L, "paper"), 0.0),
    ("AdaMerging task-wise > task arithmetic", (ADA_T, "paper"), ("task_arithmetic", "paper"), 0.0),
    ("Fisher > weight averaging", ("fisher", "paper"), ("linear", "paper"), 0.0),
    ("RegMean > TIES", ("regmean", "paper"), ("ties", "paper"), 0.0),
    ("DARE (drop 90 %) loses nothing vs task arithmetic", ("dare_linear", "paper"), ("task_arithmetic", "paper"), None),
]


def claims(rows: list[dict], zero_shot: str = "zero-shot", bar: float = 3.0) -> tuple[list[str], list[list[str]]]:
    """Each claim as a paired comparison over seeds: the mean difference of the two rows' average test accuracy,
    its 95 % t-interval, the seeds where the better row won, and a verdict: "holds" when the interval lies above
    the margin, "fails" when it lies below, "unresolved" otherwise (DARE's claim holds when the interval lies
    within ±1 point). Claims whose rows the run lacks are left out. Returns (header, rows) for `markdown`."""
    test = [r for r in rows if r["split"] == "test"]
    avg: dict[tuple, dict[int, float]] = {}
    for mv in {(r["method"], r["variant"]) for r in test}:
        rs = [r for r in test if (r["method"], r["variant"]) == mv]
        avg[mv] = {s: 100 * float(np.mean([r["acc"] for r in rs if r["seed"] == s])) for s in {r["seed"] for r in rs}}
    free = sorted({r["method"] for r in test if r["variant"] == "paper"} - set(LAST))  # the data-free methods
    todo = list(CLAIMS)
    if (zero_shot, "-") in avg:
        todo += [(f"{m} >= {zero_shot} + {bar:g}", (m, "paper"), (zero_shot, "-"), bar) for m in free]
    out = []
    for label, a, b, margin in todo:
        if a not in avg or b not in avg:
            continue
        seeds = sorted(set(avg[a]) & set(avg[b]))
        d = [avg[a][s] - avg[b][s] for s in seeds]
        m, ci = float(np.mean(d)), interval(d)
        lo, hi = (m - ci, m + ci) if not math.isnan(ci) else (m, m)
        if margin is None:
            verdict = "holds" if -1 <= lo and hi <= 1 else ("fails" if hi < -1 or lo > 1 else "unresolved")
        else:
            verdict = "holds" if lo > margin else ("fails" if hi < margin else "unresolved")
        if math.isnan(ci):
            verdict += " (one seed)"
        won = sum(abs(x) <= 1 if margin is None else x > margin for x in d)
        out.append([label, f"{m:+.1f}", "–" if math.isnan(ci) else f"± {ci:.1f}", f"{won}/{len(d)}", verdict])
    return ["claim", "difference (points)", "95% CI", "seeds where it holds", "verdict"], out


def markdown(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table]
    return "\n".join(lines)


def layer_starts(names: list[str]) -> list[int]:
    """Indices where a new numbered layer/block begins (`...layer.3.`, `...blocks.3.`), for plot separators."""
    import re

    keys = [(m.group(1) if (m := re.search(r"(?:layer|blocks|layers|h)\.(\d+)\.", n)) else None) for n in names]
    return [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]]


def _label(r: dict) -> str:
    return r["method"] if r["variant"] == "-" else f"{r['method']} ({r['variant']})"


def _accuracies(records: list[dict], out: Path) -> Path:
    # Figure objects, not pyplot: no global backend switch (the tour notebook keeps its inline backend)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 0.8 + 0.28 * len(records)))
    ax = fig.subplots()
    colors = [
        "#888888" if r["variant"] == "-" else ("#4c72b0" if r["variant"] == "paper" else "#dd8452") for r in records
    ]
    err = [0 if math.isnan(r["ci"]) else r["ci"] for r in records]
    ax.barh(range(len(records)), [r["avg"] for r in records], xerr=err, color=colors)
    ax.set_yticks(range(len(records)), [_label(r) for r in records], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("average test accuracy over tasks (%), mean over seeds with its 95% interval")
    ax.set_title("Multi-task merging (grey: bounds, blue: paper defaults, orange: tuned on validation)", fontsize=9)
    lo = min(r["avg"] for r in records)
    ax.set_xlim(max(0, lo - 10), 100)
    fig.tight_layout()
    fig.savefig(out / "accuracies.png", dpi=110)
    return out / "accuracies.png"


def _per_task(records: list[dict], out: Path) -> Path:
    """Per-task accuracy of the bounds and every method at its paper defaults (a heat map with the numbers)."""
    from matplotlib.figure import Figure

    recs = [r for r in records if r["variant"] in ("-", "paper")]
    tasks = list(recs[0]["tasks"])
    M = np.array([[r["tasks"][t] for t in tasks] for r in recs])
    fig = Figure(figsize=(1.6 + 1.1 * len(tasks), 0.8 + 0.3 * len(recs)))
    ax = fig.subplots()
    im = ax.imshow(M, cmap="viridis", aspect="auto", vmin=max(0, M.min() - 5), vmax=100)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(
                j, i, f"{M[i, j]:.1f}", ha="center", va="center", fontsize=7, color="w" if M[i, j] < M.mean() else "k"
            )
    ax.set_xticks(range(len(tasks)), tasks, fontsize=8, rotation=20)
    ax.set_yticks(range(len(recs)), [_label(r) for r in recs], fontsize=8)
    ax.set_title("Test accuracy per task (%), mean over seeds: bounds and paper defaults", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(out / "per_task.png", dpi=110)
    return out / "per_task.png"


def _entropy_curve(extras: list[dict], out: Path) -> Path | None:
    from matplotlib.figure import Figure

    curves = [e["entropy_vs_lambda"] for e in extras if e.get("entropy_vs_lambda")]
    if not curves:
        return None
    lam = [p["lambda"] for p in curves[0]]
    acc = np.array([[p["acc"] * 100 for p in c] for c in curves])
    ent = np.array([[p["entropy"] for p in c] for c in curves])
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    ax2 = ax.twinx()
    ax.plot(lam, acc.mean(0), "o-", color="#4c72b0", label="accuracy")
    ax2.plot(lam, ent.mean(0), "s--", color="#c44e52", label="entropy")
    for a, e in zip(acc, ent, strict=True):  # each seed, thin
        ax.plot(lam, a, "-", color="#4c72b0", lw=0.5, alpha=0.5)
        ax2.plot(lam, e, "--", color="#c44e52", lw=0.5, alpha=0.5)
    ax.set_xlabel("task arithmetic λ (0 = the pretrained model)")
    ax.set_ylabel("mean test accuracy (%)", color="#4c72b0")
    ax2.set_ylabel("mean prediction entropy (nats)", color="#c44e52")
    ax.set_title("Along task arithmetic: accuracy vs the entropy AdaMerging minimises", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "entropy_vs_lambda.png", dpi=110)
    return out / "entropy_vs_lambda.png"


def _coefficients(extras: list[dict], out: Path) -> Path | None:
    from matplotlib.figure import Figure

    lam = extras[0]["lambdas"].get("adamerging (layer-wise)") if extras else None
    if not lam:
        return None
    L = np.array(lam["lambdas"])  # (tensors, tasks)
    names = lam["names"]
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    for k, t in enumerate(extras[0]["tasks"]):
        ax.plot(np.arange(len(names)), L[:, k], marker=".", lw=1, label=t)
    for i in layer_starts(names):
        ax.axvline(i - 0.5, color="#cccccc", lw=0.5)
    ax.set_xlabel("merged tensor, input to output (grey lines: start of each layer/block)")
    ax.set_ylabel("λ (clamped to [0, 1])")
    ax.set_title("AdaMerging layer-wise coefficients (first seed, paper defaults)", fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(out / "coefficients.png", dpi=110)
    return out / "coefficients.png"


def plots(records: list[dict], extras: list[dict], out: Path) -> list[Path]:
    """accuracies.png, per_task.png, entropy_vs_lambda.png, coefficients.png (those with data)."""
    files = [
        _accuracies(records, out),
        _per_task(records, out),
        _entropy_curve(extras, out),
        _coefficients(extras, out),
    ]
    return [f for f in files if f is not None]


def log_wandb(config: dict, rows: list[dict], records: list[dict], files: list[Path], out: Path,
              claim_table: tuple[list[str], list[list[str]]] | None = None) -> str:  # fmt: skip
    """Log the per-task rows, the summary table, the claims and the plots to W&B (offline unless configured);
    returns the run's folder."""
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project="peft-lab-bench-merge", dir=str(out), config=config, reinit="finish_previous")
    run.log({"results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
    cols = ["method", "variant", "hparams", "avg", "ci", "normalized", *records[0]["tasks"]]
    data = [
        [r["method"], r["variant"], r["hparams"], r["avg"], r["ci"], r["normalized"], *r["tasks"].values()]
        for r in records
    ]
    run.log({"table": wandb.Table(columns=cols, data=data)})
    if claim_table is not None:
        run.log({"claims": wandb.Table(columns=claim_table[0], data=claim_table[1])})
    for r in records:
        run.summary[f"{r['method']}/{r['variant']}/avg"] = r["avg"]
    for f in files:
        run.log({f.stem: wandb.Image(str(f))})
    folder = str(run.dir)
    run.finish()
    return folder
