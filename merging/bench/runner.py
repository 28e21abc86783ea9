"""`peft-lab bench merge`: the offline multi-task merging benchmark.

Several tasks share one pretrained encoder and have their own frozen heads; each task's encoder is fine-tuned,
then the fine-tuned encoders are merged by every method of the project and each task is scored with its own head
on its test split. Two suites: `text` (all-MiniLM-L6-v2 on six real text tasks with zero-shot label-embedding
heads, the papers' protocol: merging/bench/text.py; `--task NAME=PATH.jsonl` runs it on your own tasks) and
`digits` (a residual MLP on eight 8x8-image tasks with probe heads: merging/bench/digits.py, the fast smoke suite).
Bounds: the pretrained encoder (zero-shot heads; the text suite also reports a linear probe) and the individual
fine-tuned encoders. Each method runs at its paper defaults and tuned on the validation split, never on test
(merging/bench/methods.py); every number is a mean over seeds with its 95 % interval (merging/bench/report.py).

Outputs (in --out): results.csv (one row per seed/method/variant/task), table.md, table.csv, claims.md (the
papers' claims as paired comparisons over seeds, with 95 % intervals), accuracies.png,
per_task.png, entropy_vs_lambda.png, coefficients.png (AdaMerging's layer-wise λ), adamerging_seed*.json, run.json
(config, CPU and wall time, the entropy-vs-λ curves, skipped methods); W&B (offline) with --wandb.
`--perf` prints the cost figures of merging/bench/perf.py instead.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from merging.bench.config import PRESETS, QUICK, BenchConfig
from merging.bench.methods import SeedRun, cpu_seconds, sign_conflicts
from merging.bench.report import FINE_TUNED, claims, layer_starts, log_wandb, markdown, plots, summarize
from peft_lab.errors import UserError

__all__ = ["BenchConfig", "PRESETS", "QUICK", "run", "run_seed", "main", "make_suite", "layer_starts"]

log = logging.getLogger(__name__)


def text_config(cfg: BenchConfig, seed: int):
    from merging.bench.text import TextConfig

    return TextConfig(
        tasks=cfg.task_files,
        builtin=cfg.tasks,
        model=cfg.model,
        template=cfg.template,
        n_train=cfg.n_train,
        n_val=cfg.n_val,
        n_test=cfg.n_test,
        ft_steps=cfg.ft_steps,
        ft_lr=cfg.ft_lr,
        seed=seed,
    )


def make_suite(cfg: BenchConfig, seed: int):
    """The suite object (tasks, θ_0, heads, routines) of `cfg.suite` for one seed."""
    if cfg.suite == "digits":
        from merging.bench.digits import DIGIT_TASKS, DigitsConfig, DigitsSuite

        fields = {f.name: f.type for f in dataclasses.fields(DigitsConfig)}
        bad = [k for k, _ in cfg.suite_set if k not in fields or k in ("tasks", "seed")]
        if bad:
            raise UserError(
                f"bench merge: --set {', '.join(bad)}: not a digits-suite setting; settable: "
                f"{', '.join(k for k in fields if k not in ('tasks', 'seed'))}."
            )
        unknown = [t for t in cfg.tasks if t not in DIGIT_TASKS]
        if unknown:
            raise UserError(
                f"bench merge: unknown digits task(s) {', '.join(unknown)}; the digits suite has "
                f"{', '.join(DIGIT_TASKS)}."
            )
        over = {k: (int(v) if fields[k] in (int, "int") else float(v)) for k, v in cfg.suite_set}
        return DigitsSuite(DigitsConfig(tasks=cfg.tasks or DIGIT_TASKS, seed=seed, **over))
    if cfg.suite == "text":
        from merging.bench.text import TextSuite

        return TextSuite(text_config(cfg, seed))
    raise ValueError(f"unknown suite {cfg.suite!r} (digits | text)")


def n_tasks(cfg: BenchConfig) -> int:
    if cfg.suite == "text":
        from merging.bench.text_data import BUILTIN

        return len(cfg.task_files or cfg.tasks or BUILTIN)
    from merging.bench.digits import DIGIT_TASKS

    return len(cfg.tasks or DIGIT_TASKS)


_SUITES: dict = {}  # per process: the suite of (config, seed), built once for its fine-tuning and merging jobs


def _suite(cfg: BenchConfig, seed: int):
    key = (cfg, seed)
    if key not in _SUITES:
        _SUITES.clear()  # one at a time: a worker moves on to the next seed's jobs
        _SUITES[key] = make_suite(cfg, seed)
    return _SUITES[key]


def run_seed(cfg: BenchConfig, seed: int, progress=print, fts: list | None = None) -> tuple[list[dict], dict]:
    """Every method on one seed (fine-tuning first unless `fts`, the fine-tuned task models, are given).
    Returns rows {seed, method, variant, task, split, acc, hparams} and extras."""
    torch.manual_seed(seed)
    t0 = cpu_seconds()
    suite = _suite(cfg, seed)
    progress(f"[seed {seed}] {len(suite.tasks)} tasks ready ({cpu_seconds() - t0:.0f} CPU-s)")
    if fts is None:
        fts = [suite.finetune(k, seed) for k in range(len(suite.tasks))]
    extras: dict = {"lambdas": {}, "timing": {"setup_cpu_s": cpu_seconds() - t0}}
    r = SeedRun(cfg, suite, seed, fts, progress)
    r.say("fine-tuned models ready")
    extras["sign_conflicts"] = sign_conflicts(r.theta0, r.taus, r.names, cfg.ties_density)
    r.score(suite.pretrained_label, "-", r.theta0, {})
    if suite.probe_heads is not None:
        r.score("linear probe", "-", r.theta0, {"C": suite.cfg.probe_c}, heads=suite.probe_heads)
    r.score(FINE_TUNED, "-", lambda k: fts[k], {})
    extras["entropy_vs_lambda"] = r.task_arithmetic_curve()
    r.say("bounds and the task-arithmetic curve scored")
    c0 = cpu_seconds()
    r.data_free()
    extras["timing"]["data_free_cpu_s"] = cpu_seconds() - c0
    c0 = cpu_seconds()
    extras["timing"]["fisher_information_cpu_s"] = r.fisher()
    extras["timing"]["fisher_cpu_s"] = cpu_seconds() - c0
    c0 = cpu_seconds()
    extras["timing"]["regmean_grams_cpu_s"] = r.regmean()
    extras["timing"]["regmean_cpu_s"] = cpu_seconds() - c0
    c0 = cpu_seconds()
    r.adamerging(extras)
    extras["timing"]["adamerging_cpu_s"] = cpu_seconds() - c0
    extras["timing"]["total_cpu_s"] = cpu_seconds() - t0
    extras["tasks"] = [t.name for t in suite.tasks]
    extras["pretrained_label"] = suite.pretrained_label
    extras["skipped"] = r.skipped
    return r.rows, extras


def _finetune_worker(cfg: BenchConfig, seed: int, k: int, threads: int) -> tuple[dict, float]:
    torch.set_num_threads(threads)
    c0 = cpu_seconds()
    suite = _suite(cfg, seed)
    ft = suite.finetune(k, seed)
    spent = cpu_seconds() - c0
    print(f"[seed {seed}] task {suite.tasks[k].name} fine-tuned ({spent:.0f} CPU-s)", file=sys.stderr, flush=True)
    return ft, spent


def _seed_worker(cfg: BenchConfig, seed: int, threads: int, fts: list | None = None) -> tuple[list[dict], dict]:
    torch.set_num_threads(threads)
    c0 = cpu_seconds()
    rows, extras = run_seed(cfg, seed, lambda s: print(s, file=sys.stderr, flush=True), fts)
    extras["timing"]["process_cpu_s"] = cpu_seconds() - c0
    return rows, extras


def _parallel(cfg: BenchConfig, jobs: int) -> list[tuple[list[dict], dict]]:
    """Two phases over one pool of `jobs` processes: every (seed, task) fine-tuning, then every seed's merges."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    seeds, T, th = cfg.seeds, n_tasks(cfg), torch.get_num_threads()
    pairs = [(s, k) for s in seeds for k in range(T)]
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        done = list(ex.map(_finetune_worker, [cfg] * len(pairs), *zip(*pairs, strict=True), [th] * len(pairs)))
        fts = [[done[i * T + k][0] for k in range(T)] for i in range(len(seeds))]
        results = list(ex.map(_seed_worker, [cfg] * len(seeds), seeds, [th] * len(seeds), fts))
    for i, (_, e) in enumerate(results):
        spent = sum(done[i * T + k][1] for k in range(T))
        e["timing"]["finetune_cpu_s"] = spent
        e["timing"]["process_cpu_s"] += spent  # the fine-tuning ran in other processes
    return results


def run(cfg: BenchConfig, out: Path, *, wandb: bool = False, progress=print, jobs: int = 1) -> dict:
    """Run every seed, write the outputs, return {rows, records, table_md, extras, meta, files}. With `jobs` > 1
    the fine-tuning of every (seed, task) and then the merges of every seed run in `jobs` processes."""
    w0, c0 = time.perf_counter(), cpu_seconds()
    if jobs > 1:
        results = _parallel(cfg, jobs)
    else:
        results = [run_seed(cfg, seed, progress) for seed in cfg.seeds]
    rows, extras = [], []
    for r, e in results:
        rows += r
        extras.append(e)
    out.mkdir(parents=True, exist_ok=True)
    for seed, e in zip(cfg.seeds, extras, strict=True):
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
    cpu = (cpu_seconds() - c0) + sum(e["timing"].get("process_cpu_s", 0.0) for e in extras)  # + the workers'
    meta = {
        "config": asdict(cfg),
        "wall_s": wall,
        "cpu_s": cpu,
        "jobs": jobs,
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
        "timing": [e["timing"] for e in extras],
        "entropy_vs_lambda": [e.get("entropy_vs_lambda") for e in extras],
        "skipped": sorted({tuple(s) for e in extras for s in e.get("skipped", [])}),
    }
    (out / "table.md").write_text(md + "\n")
    claim_table = claims(rows, zero_shot=extras[0].get("pretrained_label", "zero-shot"))
    claims_md = markdown(*claim_table)
    (out / "claims.md").write_text(claims_md + "\n")
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    if wandb:
        meta["wandb_dir"] = log_wandb(asdict(cfg), rows, records, files, out, claim_table)
    return {"rows": rows, "records": records, "table_md": md, "claims_md": claims_md, "extras": extras, "meta": meta,
            "files": files}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from merging.bench.options import config_from_args, parser

    ap = parser(__doc__.split("\n\n")[0])
    args, rest = ap.parse_known_args(argv)
    if args.perf:
        from merging.bench.perf import main as perf_main

        return perf_main(["--threads", str(args.threads), *rest])
    if rest:
        ap.error(f"unknown arguments: {' '.join(rest)}")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    cfg = config_from_args(args)
    if cfg.suite == "text":  # every task-file problem now, before any process starts
        from merging.bench.text import check_model, check_template, load_tasks

        check_template(cfg.template)
        check_model(cfg.model)
        load_tasks(text_config(cfg, 0))
    jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1) + 1
    res = run(
        cfg, Path(args.out), wandb=args.wandb, progress=lambda s: print(s, file=sys.stderr, flush=True), jobs=jobs
    )
    m = res["meta"]
    print(res["table_md"])
    print("\nThe papers' claims, paired over seeds:\n" + res["claims_md"])
    for name, why in m["skipped"]:
        print(f"skipped {name}: {why}")
    print(
        f"\n{len(cfg.seeds)} seed(s), {len(res['extras'][0]['tasks'])} tasks; {m['wall_s']:.0f} s wall, "
        f"{m['cpu_s']:.0f} CPU-s, "
        f"{jobs} process(es) x {m['threads']} thread(s), load average {m['load_avg']:.1f}. Outputs in {args.out}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
