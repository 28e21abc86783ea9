"""An Optuna search against a grid of the same size, both through `peft-lab merge -m` on real text tasks.

    python benchmarks/merge_search.py --root /tmp/merge-search           # 30 trials per search (≤ 20 min, 2 cores)
    python benchmarks/merge_search.py --root /tmp/merge-search --quick   # smoke run: 6 trials, tiny tasks

1. Tasks: three binary topic tasks cut from BBC News (sport/politics, tech/entertainment, business/politics),
   each a JSONL file with train/val/test lines (200/60/200, balanced; --quick: 32/24/24), or your own with
   --task NAME=PATH.jsonl (lines with "split" fields; an optional labels YAML as NAME=PATH.jsonl:LABELS.yaml).
2. Fine-tuning: all-MiniLM-L6-v2's transformer layers per task under its frozen zero-shot label head
   (`peft_lab.eval.heads`, "This text is about {label}."), AdamW, constant lr; embeddings and pooler stay at θ0.
   The tasks, θ0 and the fine-tunes are cached under --root, named by their settings and the task file's digest:
   a second run with the same settings skips fine-tuning.
3. Two searches over TIES merges of the fine-tunes, each `--trials` merges scored by the average validation
   accuracy under the zero-shot heads (`eval=classification eval.head=zero_shot`, split val), keep=best:
   - optuna: `+search=ties_text` (TPE, seed 0): density, λ and one weight per model;
   - grid: density x λ with equal weights (5 x 6 = 30 for 30 trials), Hydra's basic sweeper.
   Each run's sweeps go to a new ROOT/run-<time>/ (the Optuna study in its optuna.db, a fresh one per run).
   Reported per search: the best validation score, the test score of its kept model, wall and CPU time. Reference
   rows: the pretrained model (zero-shot), each fine-tune on its own task, TIES at its defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PAIRS = {
    "sport_politics": ("sport", "politics"),
    "tech_ent": ("tech", "entertainment"),
    "biz_pol": ("business", "politics"),
}
SIZES = {"train": 200, "val": 60, "test": 200}
QUICK = {"trials": 6, "steps": 4, "sizes": {"train": 32, "val": 24, "test": 24}}


def bbc_tasks(root: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, tuple[Path, Path | None]]:
    """Three binary BBC News tasks as JSONL files with split fields (balanced per split, seeded); written once."""
    from peft_lab.data.bbc_news import LABELS, load_raw

    texts, labels = load_raw()
    seen, by_topic = set(), {t: [] for t in LABELS}
    for text, y in zip(texts, labels, strict=True):
        if text not in seen:  # the corpus holds exact duplicates
            seen.add(text)
            by_topic[LABELS[int(y)]].append(" ".join(text.split()[:80]))
    rng = random.Random(seed)
    out = {}
    for name, pair in PAIRS.items():
        rows = []
        for topic in pair:
            pool = by_topic[topic][:]
            rng.shuffle(pool)
            start = 0
            for split, n in sizes.items():
                rows += [{"text": t, "label": topic, "split": split} for t in pool[start : start + n // 2]]
                start += n // 2
        rng.shuffle(rows)
        path = root / f"{name}.jsonl"
        if not path.exists():
            _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
        out[name] = (path, None)
    return out


def finetune(base: Path, task: Path, labels: Path | None, out: Path, steps: int, lr: float, seed: int) -> None:
    """The encoder's transformer layers trained on the task's train lines under its frozen zero-shot head."""
    import torch
    import torch.nn.functional as F

    from peft_lab.eval import heads
    from peft_lab.eval.tasks import load_task, task_spec

    data = load_task(task_spec({"file": str(task), "labels": str(labels) if labels else None, "split": "train"}, "t"))
    enc, tok = heads.load_encoder(str(base))
    W = heads.label_head(enc, tok, data.descriptions)
    clf = heads.ZeroShotClassifier(enc, W)
    params = [p for n, p in enc.named_parameters() if not n.startswith(("embeddings.", "pooler."))]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global generator
    y_all = torch.tensor(data.labels)
    enc.train()
    for _ in range(steps):
        idx = torch.randint(len(data.texts), (16,), generator=gen).tolist()
        batch = tok([data.texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = F.cross_entropy(clf(batch["input_ids"], batch["attention_mask"]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    enc.eval()
    enc.save_pretrained(out)
    tok.save_pretrained(out)


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a peft-lab command (its output kept in `log`). The machine is shared: CPU
    time moves less with other jobs' load than wall time."""
    t0, c0 = time.perf_counter(), _children_cpu()
    with open(log, "w") as fh:
        r = subprocess.run([sys.executable, "-m", "peft_lab", *cmd], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): peft-lab {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0, _children_cpu() - c0


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def tasks_arg(tasks: dict[str, tuple[Path, Path | None]], split: str) -> str:
    items = []
    for name, (path, labels) in tasks.items():
        lab = f", labels: {labels}" if labels else ""
        items.append(f"{{name: {name}, file: {path}, split: {split}{lab}}}")
    return "eval.tasks=[" + ", ".join(items) + "]"


def score(model: Path, tasks, split: str, base: Path) -> dict:
    from peft_lab.eval import evaluate

    spec = {"name": "classification", "head": "zero_shot", "max_length": 64}
    spec["tasks"] = [
        {"name": n, "file": str(p), "split": split, "labels": str(lab) if lab else None}
        for n, (p, lab) in tasks.items()
    ]
    return evaluate(spec, model, base=base)


def _first_reaching(sweep: Path, target: float) -> int:
    """1 + the number of jobs (in the order they were scored) before one reached `target`."""
    from peft_lab.eval import read_record

    done = sorted((p / "eval.json").stat().st_mtime_ns for p in sweep.iterdir() if read_record(p) is not None)
    hits = [
        (p / "eval.json").stat().st_mtime_ns for p in sweep.iterdir() if (read_record(p) or {}).get("score") == target
    ]
    return done.index(min(hits)) + 1


def kept_model(sweep: Path) -> Path:
    (best,) = [d for d in sweep.iterdir() if (d / "model.safetensors").exists()]
    return best


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _digest(*paths: Path | None) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes() if p else b"-")
    return h.hexdigest()[:10]


def cached_dir(path: Path, make) -> Path:
    """`path`, made by `make(tmp)` in a temporary dir renamed into place (an interrupted run leaves no half-made
    cache entry), unless it is already there."""
    if not path.is_dir():
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        tmp.rename(path)
    return path


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="cache of tasks, θ0 and fine-tunes; runs go below it")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 6 trials, 4 steps, 32/24/24 lines per task")
    ap.add_argument("--trials", type=int, default=None, help="merges per search (default 30; --quick 6)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps per task (default 40; --quick 4)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--task", action="append", default=[], help="NAME=PATH.jsonl[:LABELS.yaml] (lines with splits)")
    a = ap.parse_args()
    a.trials = a.trials or (QUICK["trials"] if a.quick else 30)
    a.steps = a.steps or (QUICK["steps"] if a.quick else 40)
    a.sizes = QUICK["sizes"] if a.quick else SIZES
    return a


def _tasks(a: argparse.Namespace, root: Path) -> dict[str, tuple[Path, Path | None]]:
    if not a.task:
        sizes = a.sizes
        tdir = root / f"tasks-{sizes['train']}-{sizes['val']}-{sizes['test']}"
        tdir.mkdir(parents=True, exist_ok=True)
        return bbc_tasks(tdir, sizes)
    tasks = {}
    for item in a.task:
        name, _, rest = item.partition("=")
        path, _, labels = rest.partition(":")
        tasks[name] = (Path(path).absolute(), Path(labels).absolute() if labels else None)
    return tasks


def _save_base(tmp: Path) -> None:
    """θ0 saved as a plain encoder dir (the same tensor names as the fine-tunes)."""
    import transformers

    from peft_lab.train.models.text import minilm_path

    transformers.AutoModel.from_pretrained(minilm_path()).save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp)


def finetunes(a: argparse.Namespace, root: Path, base: Path, tasks) -> list[Path]:
    """One fine-tune per task, cached under ROOT/ft/ by task digest, steps, lr and seed."""
    fts, made = [], 0
    t0, c0 = time.perf_counter(), time.process_time()
    for k, (name, (path, labels)) in enumerate(tasks.items()):
        d = root / "ft" / f"{name}-{_digest(path, labels)}-steps{a.steps}-lr{a.lr:g}-seed{k}"
        d.parent.mkdir(parents=True, exist_ok=True)
        made += not d.is_dir()
        fts.append(cached_dir(d, lambda tmp, p=path, lab=labels, k=k: finetune(base, p, lab, tmp, a.steps, a.lr, k)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    what = f"{made} fine-tuned, {len(tasks) - made} from the cache"
    print(f"fine-tuning {len(tasks)} tasks x {a.steps} steps ({what}): {wall:.0f} s wall, {cpu:.0f} CPU-s", flush=True)
    return fts


def main() -> None:
    a = _args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = a.root.absolute()
    root.mkdir(parents=True, exist_ok=True)
    work = root / time.strftime("run-%Y%m%d-%H%M%S")
    work.mkdir()
    t_start = time.perf_counter()
    print(f"load average at start: {os.getloadavg()[0]:.2f}; trials per search: {a.trials}; run dir {work}", flush=True)
    tasks = _tasks(a, root)
    base = cached_dir(root / "base", _save_base)
    fts = finetunes(a, root, base, tasks)

    ref = {"pretrained (zero-shot)": score(base, tasks, "val", base)}
    own = [score(ft, {n: tasks[n]}, "val", base)["score"] for ft, n in zip(fts, tasks, strict=True)]
    common = [
        f"base={base}",
        f"models=[{','.join(map(str, fts))}]",
        tasks_arg(tasks, "val"),
        "eval.max_length=64",
        "hash=none",
    ]
    extra_params = [f"++per_model.weight.{i}=interval(0.5,1.5)" for i in range(2, len(fts))]  # the config has two
    t_optuna = run(
        [
            "merge",
            "-m",
            "+search=ties_text",
            *common,
            f"out={work / 'optuna'}",
            *extra_params,
            f"hydra.sweeper.n_trials={a.trials}",
            f"hydra.sweeper.storage=sqlite:///{work / 'optuna.db'}",
            "hydra.sweeper.sampler.seed=0",
        ],
        work / "optuna.log",
    )
    print(f"optuna search: {t_optuna[0]:.0f} s wall", flush=True)
    densities, lambdas = grid(a.trials)
    t_grid = run(
        [
            "merge",
            "-m",
            "method=ties",
            f"method.density={','.join(map(str, densities))}",
            f"method.lambda={','.join(map(str, lambdas))}",
            "eval=classification",
            "eval.head=zero_shot",
            "keep=best",
            *common,
            f"out={work / 'grid'}",
        ],
        work / "grid.log",
    )
    print(f"grid: {t_grid[0]:.0f} s wall", flush=True)
    t_default = run(
        ["merge", "method=ties", *common, "eval=classification", "eval.head=zero_shot", f"out={work / 'default'}"],
        work / "default.log",
    )
    report(work, tasks, base, ref, own, {"optuna (TPE)": (t_optuna, "optuna"), "grid": (t_grid, "grid")}, t_default)
    print(f"total: {time.perf_counter() - t_start:.0f} s wall", flush=True)


def grid(trials: int) -> tuple[list[float], list[float]]:
    """density x λ of `trials` points, as square as `trials` allows: 30 -> 5 x 6, 6 -> 2 x 3."""
    nd = max(d for d in range(1, int(trials**0.5) + 1) if trials % d == 0)
    nl = trials // nd
    densities = [round(0.1 + 0.8 * i / (nd - 1), 3) for i in range(nd)] if nd > 1 else [0.5]
    lambdas = [round(0.5 + 1.5 * i / (nl - 1), 3) for i in range(nl)] if nl > 1 else [1.0]
    return densities, lambdas


def report(work: Path, tasks, base: Path, ref: dict, own: list[float], arms: dict, t_default: float) -> None:
    from peft_lab.eval import read_record

    names = list(tasks)
    print("\n| | trials | best val accuracy | test accuracy of that merge | wall | CPU |")
    print("|---|---|---|---|---|---|")
    z = ref["pretrained (zero-shot)"]
    zt = score(base, tasks, "test", base)
    print(f"| pretrained, zero-shot heads | – | {z['score']:.4f} | {zt['score']:.4f} | – | – |")
    print(f"| each fine-tune on its own task (mean) | – | {sum(own) / len(own):.4f} | – | – | – |")
    d = read_record(work / "default")
    dt = score(work / "default", tasks, "test", base)
    wall, cpu = t_default
    print(
        f"| TIES defaults (density 0.2, λ 1) | 1 | {d['score']:.4f} | {dt['score']:.4f} | {wall:.0f} s | {cpu:.0f} s |"
    )
    for label, ((wall, cpu), sub) in arms.items():
        sweep = work / sub
        rows = [read_record(p) for p in sweep.iterdir() if read_record(p) is not None]
        best = kept_model(sweep)
        val = read_record(best)
        test = score(best, tasks, "test", base)
        print(f"| {label} | {len(rows)} | {val['score']:.4f} | {test['score']:.4f} | {wall:.0f} s | {cpu:.0f} s |")
        per_task = ", ".join(f"{n} {val['tasks'][n]['accuracy']:.3f}" for n in names)
        print(f"|   best: {best.name[:90]} | | {per_task} | | | |")
        first = _first_reaching(sweep, val["score"])
        print(f"|   first job at that score: {first} of {len(rows)} | | | | | |")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
