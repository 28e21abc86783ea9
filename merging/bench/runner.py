"""`peft-lab bench merge`: the offline multi-task merging benchmark.

Several tasks share one pretrained encoder and have their own frozen heads; each task's encoder is fine-tuned,
then the fine-tuned encoders are merged by every method of the project and each task is scored with its own head
on its test split. Two suites: `text` (all-MiniLM-L6-v2 on six real text tasks with zero-shot label-embedding
heads, the papers' protocol: merging/bench/text.py; `--task NAME=PATH.jsonl` runs it on your own tasks) and
`digits` (a residual MLP on eight 8x8-image tasks with probe heads: merging/bench/digits.py, the fast smoke suite).
Bounds: the pretrained encoder (zero-shot heads; the text suite also reports a linear probe) and the individual
fine-tuned encoders. Each method runs at its paper defaults and tuned on the validation split, never on test
(merging/bench/methods.py); every number is a mean over seeds with its 95 % interval (merging/bench/report.py).

Outputs (in --out): results.csv (one row per seed/method/variant/task), table.md, table.csv, accuracies.png,
per_task.png, entropy_vs_lambda.png, coefficients.png (AdaMerging's layer-wise λ), adamerging_seed*.json, run.json
(config, CPU and wall time, the entropy-vs-λ curves, skipped methods); W&B (offline) with --wandb.
`--perf` prints the cost figures of merging/bench/perf.py instead.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from merging.bench.methods import SeedRun, cpu_seconds, sign_conflicts
from merging.bench.report import FINE_TUNED, layer_starts, log_wandb, markdown, plots, summarize
from peft_lab.errors import UserError

__all__ = ["BenchConfig", "PRESETS", "QUICK", "run", "run_seed", "main", "make_suite", "layer_starts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    suite: str = "digits"  # digits: 8 image-domain tasks on a residual MLP (default) | text: 6 text tasks on MiniLM
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = ()  # default: all of the suite's (built-in) tasks
    suite_set: tuple[tuple[str, float], ...] = ()  # digits suite: overrides of DigitsConfig (width, features, ft_lr, ...)
    # text suite: your tasks as (name, JSONL file, label YAML or ""), the encoder ("" = all-MiniLM-L6-v2), the head
    task_files: tuple[tuple[str, str, str], ...] = ()
    model: str = ""
    template: str = "This text is about {label}."
    n_train: int = 400  # split sizes of a task file without splits (caps for one with splits)
    n_val: int = 100
    n_test: int = 300
    ft_steps: int = 300
    ft_lr: float = 5e-5
    # paper defaults (merging/bench/methods.py says where each comes from); presets say where a budget deviates
    ta_lambda: float = 0.3  # the AdaMerging repo's task-arithmetic baseline
    ties_density: float = 0.2  # TIES' top-20 % trim (also AdaMerging++'s)
    ties_lambda: float = 1.0  # the TIES paper's λ with its disjoint mean
    dare_density: float = 0.1  # DARE's drop rate 0.9
    fisher_examples: int = 4096  # official: 4096 training examples per model (capped by the split)
    ada_steps: int = 500
    ada_batch: int = 16
    ada_batches_per_step: int = 2  # official: 2 batches of 16 per task per step
    ada_lr: float = 1e-3
    # validation grids for the tuned variants
    ta_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    ties_grid: tuple[tuple[float, float], ...] = ((0.2, 0.3), (0.2, 0.5), (0.2, 0.7), (0.2, 1.0), (0.2, 1.5), (0.1, 1.0), (0.3, 1.0))
    dare_grid: tuple[tuple[float, float], ...] = ((0.1, 0.1), (0.1, 0.3), (0.1, 0.5), (0.3, 0.3))
    dare_ties_grid: tuple[tuple[float, float], ...] = ((0.1, 0.5), (0.1, 1.0), (0.3, 1.0))
    fisher_grid: int = 8  # Dirichlet(1) weight draws (+ uniform), as the official coefficient search
    ada_tuned_lrs: tuple[float, ...] = (1e-2,)  # the tuned variant also tries these lrs
    ada_checkpoints: int = 4  # per run, the λ at every quarter of the steps are candidates of the tuned variant


PRESETS = {
    "digits": {},
    "digits-quick": dict(seeds=(0,), ta_grid=(0.1, 0.3, 0.5, 1.0), ties_grid=((0.2, 0.5), (0.2, 1.0)), dare_grid=((0.1, 0.3),),
                         dare_ties_grid=((0.1, 1.0),), fisher_grid=3, ada_steps=200),
    # MiniLM on 2 CPU cores: AdaMerging at 100 steps of 1 x 16 inputs per task (official 500 x 2 x 16) with the
    # lr raised to keep the paper's largest total move of λ (500 x 1e-3 = 100 x 5e-3)
    "text": dict(suite="text", ada_steps=100, ada_batches_per_step=1, ada_lr=5e-3, ada_tuned_lrs=(2e-2,),
                 ta_grid=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0), ties_grid=((0.2, 0.5), (0.2, 1.0), (0.2, 1.5), (0.1, 1.0)),
                 dare_grid=((0.1, 0.3), (0.1, 0.5), (0.3, 0.5)), dare_ties_grid=((0.1, 0.5), (0.1, 1.0)), fisher_grid=4),
    "text-quick": dict(suite="text", seeds=(0,), ft_steps=100, n_test=150, fisher_examples=128, ada_steps=40,
                       ada_batches_per_step=1, ada_lr=1.25e-2, ada_tuned_lrs=(), ada_checkpoints=2,
                       ta_grid=(0.3, 0.5, 1.0), ties_grid=((0.2, 1.0),), dare_grid=((0.1, 0.5),), dare_ties_grid=((0.1, 1.0),),
                       fisher_grid=1),
}
QUICK = PRESETS["digits-quick"]


def text_config(cfg: BenchConfig, seed: int):
    from merging.bench.text import TextConfig

    return TextConfig(tasks=cfg.task_files, builtin=cfg.tasks, model=cfg.model, template=cfg.template, n_train=cfg.n_train,
                      n_val=cfg.n_val, n_test=cfg.n_test, ft_steps=cfg.ft_steps, ft_lr=cfg.ft_lr, seed=seed)


def make_suite(cfg: BenchConfig, seed: int):
    """The suite object (tasks, θ_0, heads, routines) of `cfg.suite` for one seed."""
    if cfg.suite == "digits":
        from merging.bench.digits import DIGIT_TASKS, DigitsConfig, DigitsSuite

        fields = {f.name: f.type for f in dataclasses.fields(DigitsConfig)}
        bad = [k for k, _ in cfg.suite_set if k not in fields or k in ("tasks", "seed")]
        if bad:
            raise UserError(f"bench merge: --set {', '.join(bad)}: not a digits-suite setting; settable: "
                            f"{', '.join(k for k in fields if k not in ('tasks', 'seed'))}.")
        unknown = [t for t in cfg.tasks if t not in DIGIT_TASKS]
        if unknown:
            raise UserError(f"bench merge: unknown digits task(s) {', '.join(unknown)}; the digits suite has {', '.join(DIGIT_TASKS)}.")
        over = {k: (int(v) if fields[k] in (int, "int") else float(v)) for k, v in cfg.suite_set}
        return DigitsSuite(DigitsConfig(tasks=cfg.tasks or DIGIT_TASKS, seed=seed, **over))
    if cfg.suite == "text":
        from merging.bench.text import TextSuite

        return TextSuite(text_config(cfg, seed))
    raise ValueError(f"unknown suite {cfg.suite!r} (digits | text)")


def run_seed(cfg: BenchConfig, seed: int, progress=print) -> tuple[list[dict], dict]:
    """Every method on one seed. Returns rows {seed, method, variant, task, split, acc, hparams} and extras."""
    torch.manual_seed(seed)
    t0 = cpu_seconds()
    suite = make_suite(cfg, seed)
    progress(f"[seed {seed}] {len(suite.tasks)} tasks built ({cpu_seconds() - t0:.0f} CPU-s)")
    fts = [suite.finetune(k, seed) for k in range(len(suite.tasks))]
    extras: dict = {"lambdas": {}, "timing": {"build_and_finetune_cpu_s": cpu_seconds() - t0}}
    r = SeedRun(cfg, suite, seed, fts, progress)
    r.say("fine-tuned")
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
    r.adamerging(extras)
    extras["timing"]["total_cpu_s"] = cpu_seconds() - t0
    extras["tasks"] = [t.name for t in suite.tasks]
    extras["skipped"] = r.skipped
    return r.rows, extras


def _seed_worker(cfg: BenchConfig, seed: int, threads: int) -> tuple[list[dict], dict]:
    torch.set_num_threads(threads)
    c0 = cpu_seconds()
    rows, extras = run_seed(cfg, seed, lambda s: print(s, file=sys.stderr, flush=True))
    extras["timing"]["process_cpu_s"] = cpu_seconds() - c0
    return rows, extras


def run(cfg: BenchConfig, out: Path, *, wandb: bool = False, progress=print, jobs: int = 1) -> dict:
    """Run every seed (`jobs` seeds at a time, one process each), write the outputs, return
    {rows, records, table_md, extras, meta, files}."""
    w0, c0 = time.perf_counter(), cpu_seconds()
    if jobs > 1 and len(cfg.seeds) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        n = len(cfg.seeds)
        with ProcessPoolExecutor(min(jobs, n), mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_seed_worker, [cfg] * n, cfg.seeds, [torch.get_num_threads()] * n))
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
    cpu = (cpu_seconds() - c0) + sum(e["timing"].get("process_cpu_s", 0.0) for e in extras)  # + the seed processes'
    meta = {"config": asdict(cfg), "wall_s": wall, "cpu_s": cpu, "jobs": jobs, "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg()[0], "timing": [e["timing"] for e in extras],
            "entropy_vs_lambda": [e.get("entropy_vs_lambda") for e in extras],
            "skipped": sorted({tuple(s) for e in extras for s in e.get("skipped", [])})}
    (out / "table.md").write_text(md + "\n")
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    if wandb:
        meta["wandb_dir"] = log_wandb(asdict(cfg), rows, records, files, out)
    return {"rows": rows, "records": records, "table_md": md, "extras": extras, "meta": meta, "files": files}


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise UserError(f"bench merge: {flag} takes NAME=PATH, got {v!r} (e.g. {flag} reviews=reviews."
                            f"{'jsonl' if flag == '--task' else 'labels.yaml'}).")
        out.append((name, path))
    return out


def _text_tasks(args) -> tuple[tuple[str, str, str], ...]:
    """(name, task file, label file) triples from --task/--labels (built-in files when only --labels is given)."""
    from merging.bench.text_data import BUILTIN, builtin_source

    tasks = _pairs(args.task, "--task")
    labels = dict(_pairs(args.labels, "--labels"))
    if tasks and args.tasks:
        raise UserError("bench merge: --tasks picks built-in tasks and --task gives your own; use one of them.")
    if not tasks and not labels:
        return ()
    if not tasks:  # --labels over built-in tasks: their own files with other descriptions
        names = args.tasks.split(",") if args.tasks else list(BUILTIN)
        tasks = [(n, str(builtin_source(n)[0])) for n in names if n in BUILTIN]
        defaults = {n: str(builtin_source(n)[1]) for n, _ in tasks}
    else:
        defaults = {}
    unknown = sorted(set(labels) - {n for n, _ in tasks})
    if unknown:
        raise UserError(f"bench merge: --labels {', '.join(unknown)}: no such task in this run (tasks: "
                        f"{', '.join(n for n, _ in tasks)}); name a task given with --task.")
    return tuple((n, p, labels.get(n, defaults.get(n, ""))) for n, p in tasks)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="peft-lab bench merge", description=__doc__.split("\n\n")[0],
                                 epilog="The text suite's protocol, tasks and measured results: benchmarks/README.md "
                                        "(section 'Merging benchmark: text suite').")
    ap.add_argument("--suite", choices=("digits", "text"), default="digits",
                    help="text: 6 real text tasks on all-MiniLM-L6-v2 with zero-shot heads (the papers' protocol; "
                         "~45 min on 2 cores, --quick ~8); digits: 8 image tasks on an MLP (default; the fast smoke suite)")
    ap.add_argument("--quick", action="store_true", help="1 seed, smaller grids and budgets (text: 100 fine-tuning steps)")
    ap.add_argument("--out", default="bench-merge-out", help="output dir (default: ./bench-merge-out)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    ap.add_argument("--tasks", default="", help="comma-separated subset of the suite's built-in tasks")
    ap.add_argument("--task", action="append", default=[], metavar="NAME=PATH.jsonl",
                    help='text suite: your own task, a JSONL file of {"text": ..., "label": ...} lines (optional '
                         '"split": train|val|test on every line); repeat for more tasks; replaces the built-in tasks')
    ap.add_argument("--labels", action="append", default=[], metavar="NAME=PATH.yaml",
                    help="text suite: a YAML mapping label -> description for task NAME (what its zero-shot head "
                         "embeds; default: the label itself)")
    ap.add_argument("--template", default=None, help="text suite: the zero-shot prompt (default 'This text is about {label}.')")
    ap.add_argument("--model", default="", help="text suite: a Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--ft-steps", type=int, default=None, help="text suite: fine-tuning steps per task (default 300, quick 100)")
    ap.add_argument("--split", default=None, metavar="TRAIN,VAL,TEST",
                    help="text suite: split sizes drawn from task files without splits (default 400,100,300)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on a shared box)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="seeds run in parallel processes (default: one per seed, at most CPU cores + 1)")
    ap.add_argument("--wandb", action="store_true", help="log the table and plots to W&B (offline unless configured)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="digits suite setting, e.g. --set features=64 --set ft_lr=3e-4 (see merging/bench/digits.py)")
    ap.add_argument("--perf", action="store_true", help="print the cost figures (Fisher engines vs a loop, AdaMerging step, memory)")
    return ap


def config_from_args(args) -> BenchConfig:
    """The BenchConfig of parsed arguments; every bad combination is a UserError."""
    cfg = BenchConfig(**PRESETS[args.suite + ("-quick" if args.quick else "")])
    text_only = [f for f, v in (("--task", args.task), ("--labels", args.labels), ("--template", args.template),
                                ("--model", args.model), ("--ft-steps", args.ft_steps), ("--split", args.split)) if v]
    if args.suite != "text" and text_only:
        raise UserError(f"bench merge: {', '.join(text_only)} only apply to the text suite; add --suite text.")
    try:
        sets = tuple((k, float(v)) for k, v in (a.split("=", 1) for a in args.set))
    except ValueError:
        raise UserError(f"bench merge: --set takes KEY=NUMBER, got {args.set}.") from None
    if sets and args.suite != "digits":
        raise UserError("bench merge: --set only applies to the digits suite.")
    over = {"suite_set": sets, "tasks": tuple(t for t in args.tasks.split(",") if t)}
    if args.suite == "text":
        over["task_files"] = _text_tasks(args)
        over["model"] = args.model
        if args.template is not None:
            over["template"] = args.template
        if args.ft_steps is not None:
            if args.ft_steps < 1:
                raise UserError(f"bench merge: --ft-steps {args.ft_steps} must be at least 1.")
            over["ft_steps"] = args.ft_steps
        if args.split:
            try:
                n = [int(x) for x in args.split.split(",")]
                assert len(n) == 3 and min(n) >= 1
            except (ValueError, AssertionError):
                raise UserError(f"bench merge: --split takes TRAIN,VAL,TEST (three positive integers), got {args.split!r}.") from None
            over.update(n_train=n[0], n_val=n[1], n_test=n[2])
        if over["task_files"]:
            over["tasks"] = ()
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"bench merge: --seeds {args.seeds} must be at least 1.")
        over["seeds"] = tuple(range(args.seeds))
    return replace(cfg, **over)


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
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
        from merging.bench.text import check_template, load_tasks

        check_template(cfg.template)
        load_tasks(text_config(cfg, 0))
    jobs = args.jobs if args.jobs is not None else min(len(cfg.seeds), (os.cpu_count() or 1) + 1)
    res = run(cfg, Path(args.out), wandb=args.wandb, progress=lambda s: print(s, file=sys.stderr, flush=True), jobs=jobs)
    m = res["meta"]
    print(res["table_md"])
    for name, why in m["skipped"]:
        print(f"skipped {name}: {why}")
    print(f"\n{len(cfg.seeds)} seed(s), {len(res['extras'][0]['tasks'])} tasks; {m['wall_s']:.0f} s wall, {m['cpu_s']:.0f} CPU-s, "
          f"{jobs} process(es) x {m['threads']} thread(s), load average {m['load_avg']:.1f}. Outputs in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
