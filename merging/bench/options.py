"""The command line of `peft-lab bench merge`: its options and the `BenchConfig` they make (every bad
combination is a one-paragraph `UserError`)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from merging.bench.config import PRESETS, BenchConfig
from peft_lab.errors import UserError

__all__ = ["parser", "config_from_args"]


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise UserError(
                f"bench merge: {flag} takes NAME=PATH, got {v!r} (e.g. {flag} reviews=reviews."
                f"{'jsonl' if flag == '--task' else 'labels.yaml'})."
            )
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
        raise UserError(
            f"bench merge: --labels {', '.join(unknown)}: no such task in this run (tasks: "
            f"{', '.join(n for n, _ in tasks)}); name a task given with --task."
        )
    return tuple((n, p, labels.get(n, defaults.get(n, ""))) for n, p in tasks)


def parser(description: str = "") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="peft-lab bench merge",
        description=description,
        epilog="The text suite's protocol, tasks and measured results: benchmarks/README.md "
        "(section 'Merging benchmark: text suite').",
    )
    ap.add_argument(
        "--suite",
        choices=("digits", "text"),
        default="digits",
        help="text: 6 real text tasks on all-MiniLM-L6-v2 with zero-shot heads (the papers' protocol; "
        "~41 min on 2 cores, --quick ~8); digits: 8 image tasks on an MLP (default; the fast smoke suite)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 seed, smaller grids and budgets (text: 100 fine-tuning steps)"
    )
    ap.add_argument("--out", default="bench-merge-out", help="output dir (default: ./bench-merge-out)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    ap.add_argument("--tasks", default="", help="comma-separated subset of the suite's built-in tasks")
    ap.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=PATH.jsonl",
        help='text suite: your own task, a JSONL file of {"text": ..., "label": ...} lines (optional '
        '"split": train|val|test on every line); repeat for more tasks; replaces the built-in tasks',
    )
    ap.add_argument(
        "--labels",
        action="append",
        default=[],
        metavar="NAME=PATH.yaml",
        help="text suite: a YAML mapping label -> description for task NAME (what its zero-shot head "
        "embeds; default: the label itself)",
    )
    ap.add_argument(
        "--template", default=None, help="text suite: the zero-shot prompt (default 'This text is about {label}.')"
    )
    ap.add_argument("--model", default="", help="text suite: a Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    ap.add_argument(
        "--ft-steps", type=int, default=None, help="text suite: fine-tuning steps per task (default 300, quick 100)"
    )
    ap.add_argument(
        "--split",
        default=None,
        metavar="TRAIN,VAL,TEST",
        help="text suite: split sizes drawn from task files without splits (default 400,100,300)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on a shared box)")
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes: the fine-tuning of every (seed, task), then each seed's merges, run in parallel "
        "(default: CPU cores + 1; 1 runs everything in this process)",
    )
    ap.add_argument("--wandb", action="store_true", help="log the table and plots to W&B (offline unless configured)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="digits suite setting, e.g. --set features=64 --set ft_lr=3e-4 (see merging/bench/digits.py)",
    )
    ap.add_argument(
        "--perf", action="store_true", help="print the cost figures (Fisher engines vs a loop, AdaMerging step, memory)"
    )
    return ap


def config_from_args(args) -> BenchConfig:
    """The BenchConfig of parsed arguments; every bad combination is a UserError."""
    cfg = BenchConfig(**PRESETS[args.suite + ("-quick" if args.quick else "")])
    text_only = [
        f
        for f, v in (
            ("--task", args.task),
            ("--labels", args.labels),
            ("--template", args.template),
            ("--model", args.model),
            ("--ft-steps", args.ft_steps),
            ("--split", args.split),
        )
        if v
    ]
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
                raise UserError(
                    f"bench merge: --split takes TRAIN,VAL,TEST (three positive integers), got {args.split!r}."
                ) from None
            over.update(n_train=n[0], n_val=n[1], n_test=n[2])
        if over["task_files"]:
            over["tasks"] = ()
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"bench merge: --seeds {args.seeds} must be at least 1.")
        over["seeds"] = tuple(range(args.seeds))
    return replace(cfg, **over)
