"""`peft-lab bench merge [--quick]`: the offline multi-task merging benchmark.

Several tasks share one pretrained encoder (all-MiniLM-L6-v2) and have their own heads (merging/bench/text.py,
merging/bench/text_tasks.py); each task's encoder is fine-tuned, then the fine-tuned encoders are merged by every
method and each task is scored with its own head on its test split. Bounds: the pretrained encoder (with the
task heads) and the individual fine-tuned encoders. Each method runs at its paper-default hyperparameters and
tuned on the validation split (never on test); every number is a mean over seeds, with the spread.

Outputs (in --out): results.csv (one row per seed/method/variant/task/split), table.md, table.csv,
accuracies.png, coefficients.png (AdaMerging's layer-wise λ), adamerging_seed*.json; W&B with --wandb.
`--perf` prints the cost figures of merging/bench/perf.py instead.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from merging.datadriven.adamerging import adamerge, entropy, merged_params
from merging.datadriven.fisher import diagonal_fisher
from merging.methods._gta import GTAModelParams
from merging.methods.adamerging import AdaMergingParams, official_ties, ties_task_vectors
from merging.methods.fisher import fisher_merge
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties, TiesParams
from merging.sources import in_memory, merge_trees
from peft_lab.errors import UserError

__all__ = ["BenchConfig", "run", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    suite: str = "digits"  # digits: 8 image-domain tasks on a residual MLP (default) | text: 7 tasks on MiniLM
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = ()  # default: all of the suite's tasks
    suite_set: tuple[tuple[str, float], ...] = ()  # digits suite: overrides of DigitsConfig (width, features, ft_lr, ...)
    # text suite sizes (the digits suite splits its 1797 examples 1077/360/360)
    n_train: int = 600
    n_val: int = 200
    n_test: int = 400
    ft_steps: int = 80
    # paper defaults (docs/methods.md); where the CPU budget deviates, the preset says so
    ta_lambda: float = 0.3  # AdaMerging repo's task-arithmetic baseline
    ties_density: float = 0.2
    ties_lambda: float = 0.3  # AdaMerging repo's TIES baseline: dis-sum, K = 20%, λ = 0.3
    fisher_examples: int = 4096  # official: 4096 training examples per model (capped by the split)
    ada_steps: int = 500
    ada_batch: int = 16
    ada_batches_per_step: int = 2  # official: 2 batches of 16 per task per step
    ada_lr: float = 1e-3
    # validation grids for the tuned variants
    ta_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    ties_grid: tuple[tuple[float, float], ...] = ((0.2, 0.1), (0.2, 0.2), (0.2, 0.3), (0.2, 0.5), (0.2, 0.7), (0.2, 1.0),
                                                  (0.1, 0.3), (0.1, 0.5), (0.1, 1.0))
    fisher_grid: int = 8  # Dirichlet(1) weight draws (+ uniform), as the official coefficient search
    ada_tuned_lr: float = 1e-2  # the tuned variant also tries this lr; checkpoints of both runs are candidates


PRESETS = {
    "digits": {},
    "digits-quick": dict(seeds=(0,), ta_grid=(0.1, 0.3, 0.5, 1.0), ties_grid=((0.2, 0.3), (0.2, 0.7), (0.2, 1.0)),
                         fisher_grid=3, ada_steps=200),
    # MiniLM on a CPU: fine-tuning, Fisher and AdaMerging budgets cut (official: 4096 examples, 500 steps x 2 x 16)
    "text": dict(suite="text", fisher_examples=64, ada_steps=100, ada_batch=16, ada_batches_per_step=1,
                 ta_grid=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0), ties_grid=((0.2, 0.3), (0.2, 0.5), (0.2, 1.0), (0.1, 0.5)), fisher_grid=4),
    "text-quick": dict(suite="text", seeds=(0,), n_train=300, n_val=100, n_test=200, ft_steps=40, fisher_examples=32,
                       ada_steps=40, ada_batch=8, ada_batches_per_step=1, ta_grid=(0.1, 0.3, 0.5, 1.0),
                       ties_grid=((0.2, 0.3), (0.2, 1.0)), fisher_grid=2, tasks=("topic", "bshift", "somo", "headline", "sentstart", "digits")),
}
QUICK = PRESETS["digits-quick"]


def make_suite(cfg: BenchConfig, seed: int):
    """The suite object (tasks, θ_0, heads, routines) of `cfg.suite` for one seed."""
    if cfg.suite == "digits":
        from merging.bench.digits import DIGIT_TASKS, DigitsConfig, DigitsSuite

        fields = {f.name: f.type for f in dataclasses.fields(DigitsConfig)}
        bad = [k for k, _ in cfg.suite_set if k not in fields or k in ("tasks", "seed")]
        if bad:
            raise UserError(f"bench merge: --set {', '.join(bad)}: not a digits-suite setting; settable: "
                            f"{', '.join(k for k in fields if k not in ('tasks', 'seed'))}.")
        over = {k: (int(v) if fields[k] in (int, "int") else float(v)) for k, v in cfg.suite_set}
        return DigitsSuite(DigitsConfig(tasks=cfg.tasks or DIGIT_TASKS, seed=seed, **over))
    if cfg.suite == "text":
        from merging.bench.text import Suite, SuiteConfig
        from merging.bench.text_tasks import TASKS

        return Suite(SuiteConfig(tasks=cfg.tasks or TASKS, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                                 ft_steps=cfg.ft_steps, seed=seed))
    raise ValueError(f"unknown suite {cfg.suite!r} (digits | text)")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_seed(cfg: BenchConfig, seed: int, progress=print) -> tuple[list[dict], dict]:
    """All methods on one seed. Returns rows {seed, method, variant, task, split, acc, hparams} and extras."""
    torch.manual_seed(seed)
    t0 = _cpu()
    suite = make_suite(cfg, seed)
    T = len(suite.tasks)
    names, theta0 = suite.names, suite.theta0
    progress(f"[seed {seed}] {T} tasks built, probes fitted ({_cpu() - t0:.0f} CPU-s)")
    fts = [suite.finetune(k, seed) for k in range(T)]
    taus = [{n: ft[n] - theta0[n] for n in names} for ft in fts]
    progress(f"[seed {seed}] fine-tuned ({_cpu() - t0:.0f} CPU-s)")
    rows: list[dict] = []
    extras: dict = {"lambdas": {}, "timing": {}, "sign_conflicts": sign_conflicts(theta0, taus, names, cfg.ties_density)}

    def score(method: str, variant: str, params_of, hp: dict, splits=("test",)) -> dict[str, float]:
        accs = {}
        for split in splits:
            for k in range(T):
                a = suite.accuracy(params_of(k), k, split)
                accs[(split, k)] = a
                rows.append({"seed": seed, "method": method, "variant": variant, "task": suite.tasks[k].name, "split": split,
                             "acc": a, "hparams": json.dumps(hp)})
        return {s: float(np.mean([accs[(s, k)] for k in range(T)])) for s in splits}

    def val_avg(params: dict) -> float:
        return float(np.mean([suite.accuracy(params, k, "val") for k in range(T)]))

    def pick(cands: list[tuple[dict, dict]]) -> tuple[dict, dict]:
        """(params, hparams) with the best validation average."""
        scored = [(val_avg(p), i) for i, (p, _) in enumerate(cands)]
        return cands[max(scored)[1]]

    def ta(lam: float, vecs=taus) -> dict:
        return {n: theta0[n] + lam * sum(v[n] for v in vecs) for n in names}

    extras["entropy_vs_lambda"] = entropy_vs_lambda(suite, theta0, taus, names, cfg.ta_grid)
    score("pretrained", "-", lambda k: theta0, {})
    score("fine-tuned (individual)", "-", lambda k: fts[k], {})
    score("simple average", "-", lambda k, p=ta(1.0 / T): p, {"lambda": 1.0 / T})
    # task arithmetic
    score("task arithmetic", "paper", lambda k, p=ta(cfg.ta_lambda): p, {"lambda": cfg.ta_lambda})
    p, hp = pick([(ta(lam), {"lambda": lam}) for lam in cfg.ta_grid])
    score("task arithmetic", "tuned", lambda k, p=p: p, hp)
    # TIES (the official code's form, as the AdaMerging repo's baseline: global trim, majority sign, dis-sum)
    def ties(density: float, lam: float) -> dict:
        method = Ties(TiesParams(lambda_=lam, normalize=False, trim_scope="global", zero_sign="majority"))
        return merge_trees(method, theta0, taus, [GTAModelParams(density=density)] * T, deltas=True, names=names)

    score("TIES", "paper", lambda k, p=ties(cfg.ties_density, cfg.ties_lambda): p, {"density": cfg.ties_density, "lambda": cfg.ties_lambda})
    p, hp = pick([(ties(d, lam), {"density": d, "lambda": lam}) for d, lam in cfg.ties_grid])
    score("TIES", "tuned", lambda k, p=p: p, hp)
    progress(f"[seed {seed}] baselines scored ({_cpu() - t0:.0f} CPU-s)")
    # Fisher
    c0 = _cpu()
    gen = torch.Generator().manual_seed(seed)
    fishers = []
    for k in range(T):
        f = diagonal_fisher(suite.load(fts[k], k), names, suite.batches(k, "train", 16, cfg.fisher_examples), labels="sample",
                            chunk_size=16, generator=gen)
        fishers.append(f)
    suite.load(theta0, 0)
    norms = [float(torch.sqrt(sum(f[n].double().square().sum() for n in names))) for f in fishers]
    extras["timing"]["fisher_cpu_s"] = _cpu() - c0

    def fisher(weights) -> dict:
        coeffs = [w / nm if nm > 0 else w for w, nm in zip(weights, norms, strict=True)]
        return {n: fisher_merge([ft[n] for ft in fts], [f[n] for f in fishers], coeffs) for n in names}

    score("Fisher", "paper", lambda k, p=fisher([1.0] * T): p, {"weights": "uniform", "examples": cfg.fisher_examples})
    rng = np.random.default_rng(seed)
    cands = [(fisher([1.0] * T), {"weights": "uniform"})]
    for _ in range(cfg.fisher_grid):
        w = rng.dirichlet(np.ones(T)).tolist()
        cands.append((fisher(w), {"weights": [round(x, 3) for x in w]}))
    p, hp = pick(cands)
    score("Fisher", "tuned", lambda k, p=p: p, hp)
    progress(f"[seed {seed}] Fisher done ({_cpu() - t0:.0f} CPU-s)")
    # AdaMerging: task-wise, layer-wise, layer-wise on TIES vectors (AdaMerging++)
    with _task_vector_inputs(theta0, taus, names) as inputs:
        tv_ties = ties_task_vectors(inputs, names, cfg.ties_density)
    for label, gran, vecs in (("AdaMerging task-wise", "task", taus), ("AdaMerging layer-wise", "layer", taus),
                              ("AdaMerging++ layer-wise (TIES)", "layer", tv_ties)):
        variants = {}
        for variant, lr in (("paper", cfg.ada_lr), ("tuned", cfg.ada_tuned_lr)):
            c0 = _cpu()
            g = torch.Generator().manual_seed(seed)
            samplers = [suite.sampler(k, "test", cfg.ada_batch, g, cfg.ada_batches_per_step)
                        for k in range(T)]  # unlabeled test inputs, as the paper  # fmt: skip
            ckpts = {}
            every = max(cfg.ada_steps // 4, 1)

            def keep(step, loss, lam, ckpts=ckpts, every=every):
                if (step + 1) % every == 0:
                    ckpts[step + 1] = lam.clamp(0, 1).clone()

            prm = AdaMergingParams(granularity=gran, steps=cfg.ada_steps, lr=lr, batch_size=cfg.ada_batch,
                                   batches_per_step=cfg.ada_batches_per_step, heads=())
            res = adamerge(suite.module, theta0, vecs, suite.heads, samplers, prm, names=names, on_step=keep)
            extras["timing"][f"{label} {variant} cpu_s"] = _cpu() - c0
            variants[variant] = (res, ckpts)
        res, _ = variants["paper"]
        hp = {"lr": cfg.ada_lr, "steps": cfg.ada_steps}
        score(label, "paper", lambda k, p=merged_params(theta0, vecs, res.lambdas, names): p, hp)
        extras["lambdas"][label] = {"names": names, "lambdas": res.lambdas.tolist(), "losses": res.losses}
        cands = [(merged_params(theta0, vecs, lam, names), {"lr": v, "steps": s})
                 for v, (_, ck) in ((cfg.ada_lr, variants["paper"]), (cfg.ada_tuned_lr, variants["tuned"])) for s, lam in ck.items()]
        p, hp = pick(cands)
        score(label, "tuned", lambda k, p=p: p, hp)
        progress(f"[seed {seed}] {label} done ({_cpu() - t0:.0f} CPU-s)")
    extras["timing"]["total_cpu_s"] = _cpu() - t0
    extras["tasks"] = [t.name for t in suite.tasks]
    return rows, extras


@torch.no_grad()
def entropy_vs_lambda(suite, theta0: dict, taus: list[dict], names: list[str], grid) -> list[dict]:
    """Along task arithmetic's λ: mean test accuracy and mean prediction entropy over tasks. AdaMerging
    minimises that entropy, so it can only help where lower entropy goes with higher accuracy."""
    out = []
    for lam in (0.0, *grid):
        p = {n: theta0[n] + lam * sum(t[n] for t in taus) for n in names}
        accs = [suite.accuracy(p, k, "test") for k in range(len(taus))]
        ents = [float(entropy(suite.logits(p, k, suite.inputs(k, "test")))) for k in range(len(taus))]
        out.append({"lambda": lam, "acc": float(np.mean(accs)), "entropy": float(np.mean(ents))})
    return out


@contextlib.contextmanager
def _task_vector_inputs(theta0: dict, taus: list[dict], names: list[str]):
    """The in-memory task vectors as a merge's `MergeInputs` (what `prepare` and the TIES statistics read)."""
    streams = in_memory(TaskArithmetic(), theta0, taus, deltas=True, names=names)
    try:
        yield streams.merge_inputs()
    finally:
        streams.close()


def sign_conflicts(theta0: dict, taus: list[dict], names: list[str], density: float) -> dict[str, float]:
    """Per tensor, the fraction of parameters where the trimmed task vectors (top `density` per task, global)
    hold both signs: the conflicts TIES resolves by electing one sign."""
    ties, mp = official_ties(density, len(taus))
    with _task_vector_inputs(theta0, taus, names) as inputs:
        ties.prepare(replace(inputs, model_params=mp), names=names)
    thr = ties.global_thresholds
    out = {}
    for n in names:
        kept = torch.stack([t[n] * (t[n].abs() >= th) for t, th in zip(taus, thr, strict=True)])  # (T, ...)
        out[n] = float(((kept > 0).any(0) & (kept < 0).any(0)).float().mean())
    return out


# ---------------------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------------------
ORDER = ["pretrained", "fine-tuned (individual)", "simple average", "task arithmetic", "TIES", "Fisher",
         "AdaMerging task-wise", "AdaMerging layer-wise", "AdaMerging++ layer-wise (TIES)"]


def summarize(rows: list[dict]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Test-split table: per method/variant, per-task mean over seeds and the average's mean ± std over seeds."""
    test = [r for r in rows if r["split"] == "test"]
    tasks = list(dict.fromkeys(r["task"] for r in test))
    keys = list(dict.fromkeys((r["method"], r["variant"]) for r in test))
    keys.sort(key=lambda mv: (ORDER.index(mv[0]) if mv[0] in ORDER else 99, mv[1] != "paper"))
    header = ["method", "hparams", *tasks, "average", "± std (seeds)"]
    table, records = [], []
    for m, v in keys:
        rs = [r for r in test if r["method"] == m and r["variant"] == v]
        seeds = sorted({r["seed"] for r in rs})
        per_task = [100 * np.mean([r["acc"] for r in rs if r["task"] == t]) for t in tasks]
        per_seed = [100 * np.mean([r["acc"] for r in rs if r["seed"] == s]) for s in seeds]
        name = m if v == "-" else f"{m} ({v})"
        hps = sorted({r["hparams"] for r in rs})
        table.append([name, hps[0] if len(hps) == 1 else "per seed", *[f"{x:.1f}" for x in per_task],
                      f"{np.mean(per_seed):.1f}", f"{np.std(per_seed):.1f}"])
        records.append({"method": m, "variant": v, "avg": float(np.mean(per_seed)), "std": float(np.std(per_seed)),
                        **{t: float(x) for t, x in zip(tasks, per_task, strict=True)}})
    return header, table, records


def markdown(header: list[str], table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


def layer_starts(names: list[str]) -> list[int]:
    """Indices where a new numbered layer/block begins (`...layer.3.`, `...blocks.3.`), for plot separators."""
    import re

    keys = [(m.group(1) if (m := re.search(r"(?:layer|blocks|layers|h)\.(\d+)\.", n)) else None) for n in names]
    return [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]]


def plots(records: list[dict], extras: list[dict], out: Path) -> list[Path]:
    # Figure objects, not pyplot: no global backend switch (the tour notebook keeps its inline backend)
    from matplotlib.figure import Figure

    files = []
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    labels = [r["method"] if r["variant"] == "-" else f"{r['method']} ({r['variant']})" for r in records]
    colors = ["#888888" if r["variant"] == "-" else ("#4c72b0" if r["variant"] == "paper" else "#dd8452") for r in records]
    ax.barh(range(len(records)), [r["avg"] for r in records], xerr=[r["std"] for r in records], color=colors)
    ax.set_yticks(range(len(records)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("average test accuracy over tasks (%), mean ± std over seeds")
    ax.set_title("Multi-task merging (grey: bounds, blue: paper defaults, orange: tuned on validation)", fontsize=9)
    lo = min(r["avg"] for r in records)
    ax.set_xlim(max(0, lo - 10), 100)
    fig.tight_layout()
    files.append(out / "accuracies.png")
    fig.savefig(files[-1], dpi=110)
    lam = extras[0]["lambdas"].get("AdaMerging layer-wise") if extras else None
    if lam:
        L = np.array(lam["lambdas"])  # (tensors, tasks)
        names = lam["names"]
        fig = Figure(figsize=(9, 4))
        ax = fig.subplots()
        x = np.arange(len(names))
        for k, t in enumerate(extras[0]["tasks"]):
            ax.plot(x, L[:, k], marker=".", lw=1, label=t)
        for i in layer_starts(names):
            ax.axvline(i - 0.5, color="#cccccc", lw=0.5)
        ax.set_xlabel("merged tensor, input to output (grey lines: start of each layer/block)")
        ax.set_ylabel("λ (clamped to [0, 1])")
        ax.set_title("AdaMerging layer-wise coefficients (first seed, paper defaults)", fontsize=9)
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        files.append(out / "coefficients.png")
        fig.savefig(files[-1], dpi=110)
    return files


def _seed_worker(cfg: BenchConfig, seed: int, threads: int) -> tuple[list[dict], dict]:
    torch.set_num_threads(threads)
    c0 = _cpu()
    rows, extras = run_seed(cfg, seed, lambda s: print(s, file=sys.stderr, flush=True))
    extras["timing"]["process_cpu_s"] = _cpu() - c0
    return rows, extras


def run(cfg: BenchConfig, out: Path, *, wandb: bool = False, progress=print, jobs: int = 1) -> dict:
    """Run every seed (`jobs` seeds at a time, one process each), write the outputs, return
    {rows, records, table_md, extras, meta, files}."""
    out.mkdir(parents=True, exist_ok=True)
    rows, extras = [], []
    w0, c0 = time.perf_counter(), _cpu()
    if jobs > 1 and len(cfg.seeds) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, len(cfg.seeds)), mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_seed_worker, [cfg] * len(cfg.seeds), cfg.seeds, [torch.get_num_threads()] * len(cfg.seeds)))
    else:
        results = [run_seed(cfg, seed, progress) for seed in cfg.seeds]
    for seed, (r, e) in zip(cfg.seeds, results, strict=True):
        rows += r
        extras.append(e)
        (out / f"adamerging_seed{seed}.json").write_text(json.dumps(e["lambdas"]))
    header, table, records = summarize(rows)
    md = markdown(header, table)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(table)
    files = plots(records, extras, out)
    wall = time.perf_counter() - w0
    cpu = (_cpu() - c0) + sum(e["timing"].get("process_cpu_s", 0.0) for e in extras)  # + the seed processes'
    meta = {"config": asdict(cfg), "wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg()[0], "timing": [e["timing"] for e in extras],
            "entropy_vs_lambda": [e.get("entropy_vs_lambda") for e in extras]}
    (out / "table.md").write_text(md + "\n")
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    if wandb:
        _log_wandb(cfg, rows, records, files, out)
    return {"rows": rows, "records": records, "table_md": md, "extras": extras, "meta": meta, "files": files}


def _log_wandb(cfg, rows, records, files, out: Path) -> None:
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project="peft-lab-bench-merge", dir=str(out), config=asdict(cfg), reinit="finish_previous")
    run.log({"table": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
    for r in records:
        run.summary[f"{r['method']}/{r['variant']}/avg"] = r["avg"]
    for f in files:
        run.log({f.stem: wandb.Image(str(f))})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="peft-lab bench merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, smaller grids and budgets (< 5 min on 2 cores)")
    ap.add_argument("--suite", choices=("digits", "text"), default="digits",
                    help="digits: 8 image-domain tasks on a residual MLP (default); text: 7 text tasks on all-MiniLM-L6-v2 (slow)")
    ap.add_argument("--out", default="bench-merge-out", help="output dir (default: ./bench-merge-out)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on a shared box)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="seeds run in parallel processes")
    ap.add_argument("--wandb", action="store_true", help="log the table and plots to W&B (offline unless configured)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="digits suite setting, e.g. --set features=64 --set ft_lr=3e-4 (see merging/bench/digits.py)")
    ap.add_argument("--perf", action="store_true", help="print the cost figures (Fisher engines vs a loop, AdaMerging step, memory)")
    args, rest = ap.parse_known_args(argv)
    if args.perf:
        from merging.bench.perf import main as perf_main

        return perf_main(["--threads", str(args.threads), *rest])
    if rest:
        ap.error(f"unknown arguments: {' '.join(rest)}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    cfg = BenchConfig(**PRESETS[args.suite + ("-quick" if args.quick else "")])
    try:
        sets = tuple((k, float(v)) for k, v in (a.split("=", 1) for a in args.set))
    except ValueError:
        raise UserError(f"bench merge: --set takes KEY=NUMBER, got {args.set}.") from None
    cfg = replace(cfg, suite_set=sets)
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    res = run(cfg, Path(args.out), wandb=args.wandb, progress=lambda s: print(s, file=sys.stderr, flush=True), jobs=args.jobs)
    m = res["meta"]
    print(res["table_md"])
    print(f"\n{len(cfg.seeds)} seed(s), {len(res['extras'][0]['tasks'])} tasks; {m['wall_s']:.0f} s wall, {m['cpu_s']:.0f} CPU-s, "
          f"{args.jobs} process(es) x {m['threads']} thread(s), load average {m['load_avg']:.1f}. Outputs in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
