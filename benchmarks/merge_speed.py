"""Merge speed: `peft-lab merge` vs the plainest streaming merge (the floor) vs mergekit, side by side.

    python benchmarks/merge_speed.py --root /tmp/merge_bench [--mergekit /tmp/mk/bin/mergekit-yaml]
    python benchmarks/merge_speed.py --pairs 3 --mergekit ...     # paired runs, each tool with its default settings
    python benchmarks/merge_speed.py --contention --runs ties     # threads=1 vs auto, with and without a busy core
    python benchmarks/merge_speed.py --floor-pairs 3 --sizes 1.1B --runs sce,...   # floor, merge: ratios per pair

Generates (once, seeded, sharded, bfloat16) a Llama-style base from a config and 3 variants (base + small
noise), for two model sizes, then runs every merge as a subprocess (one thread: OMP_NUM_THREADS=1) and reports
its wall time, CPU time (user + sys, from wait4) and peak RSS (its VmHWM), and the ratio to the floor (timed
three times per size, before, between and after the merges; the ratios use the median). Each peft-lab merge is
timed `--repeats` times (3) and its median run is shown; mergekit runs once.
The floor reads the N+1 models tensor by tensor (plain preads of each tensor's bytes), averages them in float32
and streams the result into one safetensors file: what any merge must at least do. Inputs are read once before timing so
they sit in the page cache (printed: the machine's memory and load when the runs start).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

SIZES = {  # TinyLlama-1.1B's shape, and the same with fewer layers
    "1.1B": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "0.4B": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=6,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "smoke": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    ),  # a few seconds: checks the script itself
}
GRADIENT_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]
RUNS = {  # name -> (merge_method, parameters, per-model parameters, number of models)
    "linear": ("linear", {}, {"weight": 1.0}, 3),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.5}, {"weight": 1.0}, 3),
    "ties (tensor)": ("ties", {"trim_scope": "tensor"}, {"weight": 1.0, "density": 0.2}, 3),
    "ties (global)": ("ties", {"trim_scope": "global"}, {"weight": 1.0, "density": 0.2}, 3),
    "dare_ties": ("dare_ties", {}, {"weight": 1.0, "density": 0.5}, 3),
    "dare_linear": ("dare_linear", {}, {"weight": 1.0, "density": 0.5}, 3),
    "slerp": ("slerp", {"t": 0.5}, {}, 1),
    # the model-card SLERP: t a per-layer gradient, different for attention and MLP tensors (mergekit's example)
    "slerp (gradient)": ("slerp", {"t": GRADIENT_T}, {}, 1),
    "soup": ("soup", {}, {"weight": 1.0}, 3),
    "nearswap": ("nearswap", {"t": 0.001}, {}, 1),
    "ram": ("ram", {}, {}, 3),
    "ramplus_tl": ("ramplus_tl", {}, {}, 3),
    "model_stock": ("model_stock", {}, {}, 3),
    "nuslerp": ("nuslerp", {}, {"weight": 1.0}, 2),
    "multislerp": ("multislerp", {}, {"weight": 1.0}, 3),
    "karcher": ("karcher", {}, {}, 3),
    "arcee_fusion": ("arcee_fusion", {}, {}, 1),
    "breadcrumbs": ("breadcrumbs", {}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}, 3),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}, 3),
    "sce": ("sce", {"select_topk": 0.1}, {}, 3),
    "della": ("della", {}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}, 3),
}
MERGEKIT = {
    "linear",
    "task_arithmetic",
    "ties (tensor)",
    "dare_ties",
    "dare_linear",
    "slerp",
    "nearswap",
    "ram",
    "ramplus_tl",
    "model_stock",
    "nuslerp",
    "multislerp",
    "karcher",
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "sce",
    "della",
    "slerp (gradient)",
}


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def make_models(root: Path, size: str) -> tuple[Path, list[Path]]:
    """base + 3 variants (base + 0.1·σ noise) in bfloat16, sharded at 500 MB, each tensor from its own seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_lab.tree import Thunk, Tree, save_tree

    cfg = LlamaConfig(
        **SIZES[size],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    dirs = [root / size / n for n in ("base", "v0", "v1", "v2")]

    def tensor(name: str, variant: int) -> torch.Tensor:
        seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little")
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(shapes[name], generator=g).mul_(0.02)
        if variant >= 0:  # the variants keep the base's exact zeros: one sparsity mask, as a soup needs
            g.manual_seed(seed + 1000 * (variant + 1))
            w.add_(torch.randn(shapes[name], generator=g).mul_(w != 0), alpha=0.002)
        return w.to(torch.bfloat16)

    for i, d in enumerate(dirs):
        if (d / "config.json").exists():
            continue
        tmp = d.with_name(d.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tree = Tree(
            {k: Thunk(lambda k=k, i=i: tensor(k, i - 1), [], s, torch.bfloat16, name=k) for k, s in shapes.items()}
        )
        t0 = time.time()
        save_tree(tree, tmp, max_shard_size="500MB")
        cfg.save_pretrained(tmp)
        tmp.rename(d)
        print(f"  generated {d} in {time.time() - t0:.0f} s", flush=True)
    return dirs[0], dirs[1:]


# ---------------------------------------------------------------------------------------------------------
# the floor: read N+1 models tensor by tensor, average in float32, stream one file out
# ---------------------------------------------------------------------------------------------------------
def floor(base: str, models: list[str], out: str) -> None:
    """Plain reads (preadv into one buffer, no mmap), float32 accumulation chunk by chunk, one sequential write."""
    import torch

    torch.set_num_threads(1)

    def index(d):  # tensor -> (fd, absolute offset, nbytes, dtype, shape), from each shard's header
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            fd = os.open(f, os.O_RDONLY)
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            for k, v in json.loads(os.pread(fd, n, 8)).items():
                if k != "__metadata__":
                    b, e = v["data_offsets"]
                    out[k] = (fd, 8 + n + b, e - b, v["dtype"], v["shape"])
        return out

    maps = [index(d) for d in (base, *models)]
    names = list(maps[0])
    header, off = {}, 0
    for k in names:
        _, _, n, dt, shape = maps[0][k]
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    os.makedirs(out, exist_ok=True)
    chunk = 1 << 22  # elements: 4M float32 accumulate in a 16 MB buffer that stays in cache between the adds
    buf = bytearray(2 * chunk)
    acc = torch.empty(chunk, dtype=torch.float32)
    with open(Path(out) / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in names:
            numel = maps[0][k][2] // 2
            for s in range(0, numel, chunk):
                n = min(chunk, numel - s)
                a = acc[:n]
                for i, m in enumerate(maps):
                    fd, at, *_ = m[k]
                    os.preadv(fd, [memoryview(buf)[: 2 * n]], at + 2 * s)
                    t = torch.frombuffer(buf, dtype=torch.bfloat16, count=n)
                    a.copy_(t) if i == 0 else a.add_(t)
                f.write(a.mul_(1.0 / len(maps)).to(torch.bfloat16).view(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------------------
# timing one subprocess
# ---------------------------------------------------------------------------------------------------------
def timed(cmd: list[str], cwd: Path | None = None, timeout: float = 3600, one_thread: bool = True) -> dict:
    """Run `cmd`; its wall time, CPU time and peak RSS. `one_thread`: OMP_NUM_THREADS=1 (else the tool's defaults)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if one_thread:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    else:
        env.pop("OMP_NUM_THREADS", None)
        env.pop("MKL_NUM_THREADS", None)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # peak RSS: the child's VmHWM, polled. (wait4's ru_maxrss would not do: Linux carries the parent's RSS
    # at fork into the child's maxrss across exec, and this process holds over a GB.)
    hwm = [0]

    def poll():
        while p.returncode is None:
            try:
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("VmHWM:"):
                        hwm[0] = max(hwm[0], int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_gb": hwm[0] / 2**20}


def warm(paths: list[Path]) -> float:
    """Read every input file once (into the page cache); returns GB read."""
    total = 0
    for d in paths:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while block := fh.read(64 << 20):
                    total += len(block)
    return total / 1e9


def recipe_for(run: str, base: Path, models: list[Path]) -> dict:
    method, params, per, n = RUNS[run]
    r = {
        "merge_method": method,
        "base_model": str(base),
        "dtype": "bfloat16",
        "parameters": params,
        "models": [{"model": str(m), "parameters": per} for m in models[:n]],
    }
    if method in ("linear", "soup"):  # averages of the base and the 3 variants
        del r["base_model"]
        r["models"] = [{"model": str(m), "parameters": per} for m in [base, *models][: n + 1]]
    return r


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/merge_bench"), help="where inputs/outputs go (~20 GB)")
    ap.add_argument("--sizes", default="1.1B,0.4B")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    ap.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML"), help="mergekit-yaml executable (optional)")
    ap.add_argument("--mergekit-sizes", default="1.1B", help="sizes to run mergekit on (it is slow)")
    ap.add_argument("--hash-cost", action="store_true", help="also time linear with hash=none")
    ap.add_argument("--repeats", type=int, default=3, help="timings of each peft-lab merge (the median is used)")
    ap.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="instead: N paired runs (peft-lab, then mergekit) per method, each tool with its default "
        "settings (no OMP_NUM_THREADS); reports the range of times and of the ratios",
    )
    ap.add_argument(
        "--floor-pairs",
        type=int,
        default=0,
        help="instead: N rounds per method of the floor then the peft-lab merge, back to back (one thread): the "
        "ratio to the floor per pair, under the same machine state (the floor follows the VM's write speed)",
    )
    ap.add_argument(
        "--contention",
        action="store_true",
        help="instead: peft-lab with threads=1 and threads=auto, on an idle machine and beside a "
        "CPU-bound process on one core",
    )
    ap.add_argument("--floor", nargs="+", help=argparse.SUPPRESS)
    return ap.parse_args()


REPO = Path(__file__).resolve().parent.parent


def _inputs(a: argparse.Namespace, size: str) -> tuple[Path, list[Path]]:
    print(f"== {size}: inputs", flush=True)
    base, models = make_models(a.root, size)
    gb = warm([base, *models])
    load = os.getloadavg()
    mem = {k: v for k, v in (line.split(":") for line in open("/proc/meminfo").read().splitlines()[:5])}
    print(
        f"  {gb:.1f} GB of inputs read into the page cache; load average {load[0]:.1f}; "
        f"MemAvailable {mem['MemAvailable'].strip()}",
        flush=True,
    )
    return base, models


def _peft_lab(rec: Path, out: Path, opts: dict | None = None, one_thread: bool = True) -> dict:
    extra = [f"{k}={v}" for k, v in (opts or {}).items()]
    res = timed(
        [sys.executable, "-m", "peft_lab", "merge", "--config", str(rec), "--out", str(out), "--no-progress", *extra],
        cwd=REPO,
        one_thread=one_thread,
    )
    shutil.rmtree(out)
    return res


def _mergekit_recipe(run: str, base: Path, models: list[Path]) -> dict:
    mk = dict(recipe_for(run, base, models))
    if mk["merge_method"] == "ties":
        mk["parameters"] = {}  # mergekit's TIES trims per tensor (its only mode)
    mk["dtype"] = "float32"  # compute in float32 as peft-lab does ...
    mk["out_dtype"] = "bfloat16"  # ... and write bfloat16
    return mk


def standard(a, size: str, base: Path, models: list[Path], runs: list[str]) -> list[dict]:
    """Every run timed `--repeats` times with one thread, the floor three times, mergekit once."""
    import yaml

    results = []
    out = a.root / size / "out"
    shutil.rmtree(out, ignore_errors=True)

    def run_floor():  # timed three times (first, middle, last): the ratios use the median
        r = timed([sys.executable, __file__, "--floor", str(base), *map(str, models), str(out)])
        shutil.rmtree(out)
        results.append({"size": size, "run": "floor", "tool": "floor", **r})
        print(f"  floor: {r['wall']:.1f} s wall, {r['cpu']:.1f} CPU-s, {r['rss_gb']:.2f} GB", flush=True)

    run_floor()
    todo = [(x, {}) for x in runs] + ([("linear", {"hash": "none"})] if a.hash_cost else [])
    for i, (run, opts) in enumerate(todo):
        if i == len(todo) // 2:
            run_floor()
        rec = a.root / size / "recipe.yaml"
        rec.write_text(yaml.safe_dump({**recipe_for(run, base, models), **opts}))
        label = run + (" hash=none" if opts else "")
        tries = []
        for _ in range(a.repeats):  # write speed into fresh page-cache pages varies run to run: the median
            res = _peft_lab(rec, out)
            tries.append(res)
            print(
                f"  peft-lab {label}: {res['wall']:.1f} s wall, {res['cpu']:.1f} CPU-s, {res['rss_gb']:.2f} GB",
                flush=True,
            )
        res = sorted(tries, key=lambda r: r["wall"])[len(tries) // 2]
        results.append({"size": size, "run": label, "tool": "peft-lab", **res, "walls": [r["wall"] for r in tries]})
        if a.mergekit and run in MERGEKIT and size in a.mergekit_sizes.split(",") and not opts:
            rec.write_text(yaml.safe_dump(_mergekit_recipe(run, base, models)))
            res = timed([a.mergekit, str(rec), str(out), "--no-cuda", "--quiet"])
            shutil.rmtree(out)
            results.append({"size": size, "run": run, "tool": "mergekit", **res})
            print(
                f"  mergekit {run}: {res['wall']:.1f} s wall, {res['cpu']:.1f} CPU-s, {res['rss_gb']:.2f} GB",
                flush=True,
            )
    run_floor()
    return results


def floor_paired(a, size: str, base: Path, models: list[Path], runs: list[str]) -> list[dict]:
    """`--floor-pairs N` rounds; in each, for every run, the floor and then the peft-lab merge, back to back: the
    ratio of a pair is measured under the same machine state (both write the merged model into fresh page-cache
    pages, whose speed drifts on this VM by a third between minutes)."""
    import yaml

    out = a.root / size / "out"
    shutil.rmtree(out, ignore_errors=True)
    rec = a.root / size / "recipe.yaml"
    results = []
    for i in range(a.floor_pairs):
        for run in runs:
            fl = timed([sys.executable, __file__, "--floor", str(base), *map(str, models), str(out)])
            shutil.rmtree(out)
            rec.write_text(yaml.safe_dump(recipe_for(run, base, models)))
            ours = _peft_lab(rec, out)
            results.append({"size": size, "run": run, "floor": fl, "peft-lab": ours})
            print(
                f"  [{i + 1}/{a.floor_pairs}] {run}: floor {fl['wall']:.1f} s, peft-lab {ours['wall']:.1f} s "
                f"({ours['wall'] / fl['wall']:.2f}x), {ours['rss_gb']:.2f} GB",
                flush=True,
            )
    return results


def report_floor_pairs(results: list[dict]) -> None:
    print("\n| size | run | pairs | floor wall s | peft-lab wall s | peak RSS GB | / floor, per pair | median |")
    print("|---|---|---|---|---|---|---|---|")
    for size in dict.fromkeys(r["size"] for r in results):
        for run in dict.fromkeys(r["run"] for r in results if r["size"] == size):
            rows = [r for r in results if r["size"] == size and r["run"] == run]
            ratios = sorted(r["peft-lab"]["wall"] / r["floor"]["wall"] for r in rows)
            print(
                f"| {size} | {run} | {len(rows)} | {_range([r['floor']['wall'] for r in rows])} | "
                f"{_range([r['peft-lab']['wall'] for r in rows])} | "
                f"{_range([r['peft-lab']['rss_gb'] for r in rows], '{:.2f}')} | {_range(ratios, '{:.2f}')} | "
                f"{ratios[len(ratios) // 2]:.2f} |"
            )


def paired(a, size: str, base: Path, models: list[Path], runs: list[str]) -> list[dict]:
    """`--pairs N` rounds; in each, every run once with peft-lab then once with mergekit, back to back, each with
    its default settings: the ratio of a pair is measured under the same machine state."""
    import yaml

    out, rec, mkrec = a.root / size / "out", a.root / size / "recipe.yaml", a.root / size / "mergekit.yaml"
    shutil.rmtree(out, ignore_errors=True)
    results = []
    for i in range(a.pairs):
        for run in runs:
            rec.write_text(yaml.safe_dump(recipe_for(run, base, models)))
            ours = _peft_lab(rec, out, one_thread=False)
            row = {"size": size, "run": run, "pair": i, "peft-lab": ours}
            if a.mergekit and run in MERGEKIT:
                mkrec.write_text(yaml.safe_dump(_mergekit_recipe(run, base, models)))
                row["mergekit"] = timed([a.mergekit, str(mkrec), str(out), "--no-cuda", "--quiet"], one_thread=False)
                shutil.rmtree(out)
            results.append(row)
            mk = row.get("mergekit")
            print(
                f"  pair {i} {run}: peft-lab {ours['wall']:.1f} s ({ours['rss_gb']:.2f} GB)"
                + (
                    f", mergekit {mk['wall']:.1f} s ({mk['rss_gb']:.2f} GB), {mk['wall'] / ours['wall']:.1f}x"
                    if mk
                    else ""
                ),
                flush=True,
            )
    return results


def _hog() -> subprocess.Popen:
    """A CPU-bound process on one core (pure Python: no threads of its own)."""
    return subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])


def contention(a, size: str, base: Path, models: list[Path], runs: list[str]) -> list[dict]:
    """peft-lab with threads=1 (the default) and threads=auto (torch's default: one per core), on the idle
    machine and beside a busy core; `--repeats` runs each, alternating the settings."""
    import yaml

    out, rec = a.root / size / "out", a.root / size / "recipe.yaml"
    shutil.rmtree(out, ignore_errors=True)
    results = []
    for run in runs:
        rec.write_text(yaml.safe_dump(recipe_for(run, base, models)))
        for busy in (False, True):
            for rep in range(a.repeats):
                for threads in (1, "auto"):
                    hog = _hog() if busy else None
                    try:
                        res = _peft_lab(rec, out, {"threads": threads}, one_thread=False)
                    finally:
                        if hog is not None:
                            hog.kill()
                            hog.wait()
                    results.append({"size": size, "run": run, "busy": busy, "threads": threads, "rep": rep, **res})
                    print(
                        f"  {run} threads={threads} {'busy' if busy else 'idle'}: {res['wall']:.1f} s wall, "
                        f"{res['cpu']:.1f} CPU-s",
                        flush=True,
                    )
    return results


def main() -> None:
    a = _parse()
    if a.floor:
        return floor(a.floor[0], a.floor[1:-1], a.floor[-1])
    sys.path.insert(0, str(REPO))
    runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    # numba compiles the fused merge loops on their first use on a machine and caches them on disk: do it
    # before timing anything (a one-off of a few seconds, not a per-merge cost)
    subprocess.run([sys.executable, "-c", "from merging import fused; fused.warm()"], check=True, cwd=REPO)
    mode = paired if a.pairs else floor_paired if a.floor_pairs else contention if a.contention else standard
    results = []
    for size in a.sizes.split(","):
        base, models = _inputs(a, size)
        results += mode(a, size, base, models, runs)
    reports = {paired: report_pairs, floor_paired: report_floor_pairs, contention: report_contention, standard: report}
    reports[mode](results)
    (a.root / "results.json").write_text(json.dumps(results, indent=1))


def _range(xs: list[float], fmt: str = "{:.1f}") -> str:
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if len(xs) == 1 or fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def report_pairs(results: list[dict]) -> None:
    print(
        "\n| size | run | pairs | peft-lab wall s | peak RSS GB | mergekit wall s | peak RSS GB | mergekit / peft-lab |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in dict.fromkeys(r["size"] for r in results):
        for run in dict.fromkeys(r["run"] for r in results if r["size"] == size):
            rows = [r for r in results if r["size"] == size and r["run"] == run]
            ours = [r["peft-lab"] for r in rows]
            cols = f"{_range([o['wall'] for o in ours])} | {_range([o['rss_gb'] for o in ours], '{:.2f}')}"
            mk = [r["mergekit"] for r in rows if "mergekit" in r]
            if mk:
                ratios = [r["mergekit"]["wall"] / r["peft-lab"]["wall"] for r in rows if "mergekit" in r]
                cols += (
                    f" | {_range([m['wall'] for m in mk])} | {_range([m['rss_gb'] for m in mk], '{:.2f}')}"
                    f" | {_range(ratios)}x"
                )
            else:
                cols += " | | | "
            print(f"| {size} | {run} | {len(rows)} | {cols} |")


def report_contention(results: list[dict]) -> None:
    print("\n| size | run | machine | threads | wall s (range) | CPU-s (range) |")
    print("|---|---|---|---|---|---|")
    for size in dict.fromkeys(r["size"] for r in results):
        for run in dict.fromkeys(r["run"] for r in results if r["size"] == size):
            for busy in (False, True):
                for threads in (1, "auto"):
                    rows = [
                        r
                        for r in results
                        if (r["size"], r["run"], r["busy"], r["threads"]) == (size, run, busy, threads)
                    ]
                    print(
                        f"| {size} | {run} | {'one core busy' if busy else 'idle'} | {threads} | "
                        f"{_range([r['wall'] for r in rows])} | {_range([r['cpu'] for r in rows])} |"
                    )


def report(results: list[dict]) -> None:
    print(
        "\n| size | run | peft-lab wall s | CPU-s | peak RSS GB | / floor (wall) | mergekit wall s | CPU-s "
        "| peak RSS GB | mergekit / peft-lab (wall) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in dict.fromkeys(r["size"] for r in results):
        floors = [r for r in results if r["size"] == size and r["tool"] == "floor"]
        fl = sorted(floors, key=lambda r: r["wall"])[len(floors) // 2]  # the median run
        each = "/".join(f"{r['wall']:.1f}" for r in floors)
        label = f"floor (median of {each})" if len(floors) > 1 else "floor"
        print(f"| {size} | {label} | {fl['wall']:.1f} | {fl['cpu']:.1f} | {fl['rss_gb']:.2f} | 1.00 | | | | |")
        for r in results:
            if r["size"] != size or r["tool"] != "peft-lab":
                continue
            mk = next(
                (m for m in results if m["size"] == size and m["tool"] == "mergekit" and m["run"] == r["run"]), None
            )
            mkcols = " | | | "
            if mk:
                mkcols = f"{mk['wall']:.1f} | {mk['cpu']:.1f} | {mk['rss_gb']:.2f} | {mk['wall'] / r['wall']:.1f}x"
            walls = r.get("walls", [r["wall"]])
            label = r["run"] + (f" (median of {'/'.join(f'{w:.1f}' for w in walls)})" if len(walls) > 1 else "")
            print(
                f"| {size} | {label} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss_gb']:.2f} | "
                f"{r['wall'] / fl['wall']:.2f} | {mkcols} |"
            )


if __name__ == "__main__":
    main()
