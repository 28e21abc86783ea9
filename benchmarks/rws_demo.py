"""Robust Weight Signatures on scikit-learn digits: extract, patch, compose, quantize, transfer.

    python benchmarks/rws_demo.py [--out runs/rws_demo] [--seeds 3] [--quick]

A small CNN with BatchNorm (so the normalisation statistics, patched multiplicatively, are part of every
signature) is trained on clean digits (split A). Robust models are fine-tuned from it on corrupted digits
(Gaussian noise, blur, low contrast). Signatures σ_c = θ_c − θ_clean on the shallow half of the weight
layers are cut with `merging.signatures.signature.extract`, written and read back as files, and patched into the clean
model with `merging.signatures.patch.patch` — the functions `peft-lab signature` runs. The table gives clean
and corrupted test accuracy for the clean and robust models, patches at scales 0.5/1/1.5, compositions,
int8/int4 signatures, the shallow layers without their BN statistics, and transfer to clean models trained
on split B (fine-tuned from the clean model, or from scratch). A PNG plots accuracy against the scale.
Numbers are means over seeds (± the spread across seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from merging.signatures.patch import patch, unpatch  # noqa: E402
from merging.signatures.signature import extract, load_signatures, save_signatures  # noqa: E402
from peft_lab.tree import Tree, load_tree, save_tree  # noqa: E402

CORRUPTIONS = ("noise", "blur", "contrast")


# ---------------------------------------------------------------------------------------------------------
# Data and corruptions (images in [0, 1], shape (N, 1, 8, 8))
# ---------------------------------------------------------------------------------------------------------
def digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.3, stratify=y, random_state=seed)
    a, b = train_test_split(tr, test_size=0.5, stratify=y[tr], random_state=seed)
    return {"A": (X[a], y[a]), "B": (X[b], y[b]), "test": (X[te], y[te])}


_BLUR = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
_BLUR = (_BLUR[:, None] * _BLUR[None, :] / 256.0).view(1, 1, 5, 5)


def corrupt(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "noise":
        return (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if kind == "blur":
        return F.conv2d(x, _BLUR, padding=2)
    if kind == "contrast":
        return 0.45 + 0.1 * x  # contrast cut to a tenth, around a grey level
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------
class CNN(nn.Module):
    """conv-bn-relu x3 (8x8 -> 2x2) -> fc-relu -> fc: five weight layers; the shallow half is conv1..conv3."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc1, self.fc2 = nn.Linear(64 * 2 * 2, 64), nn.Linear(64, 10)

    def forward(self, x):  # x (N, 1, 8, 8)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # (N, 32, 4, 4)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # (N, 64, 2, 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train(model: CNN, data, *, epochs: int, lr: float, kind: str | None, seed: int) -> CNN:
    """Adam on cross-entropy; `kind` corrupts every batch afresh (robust fine-tuning), None trains on clean data."""
    g = torch.Generator().manual_seed(seed)
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i : i + 64]
            xb = corrupt(x[b], kind, g) if kind else x[b]
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: CNN, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model.eval()(x).argmax(1) == y).float().mean())


def save(model: CNN, d: Path) -> Path:
    save_tree(Tree.from_module(model), d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({"model": "rws_demo.CNN"}))
    return d


def load(d: Path) -> CNN:
    m = CNN()
    m.load_state_dict({k: v.dense(None) for k, v in load_tree(d).items()})
    return m.eval()


def copy_of(model: CNN) -> CNN:
    m = CNN()
    m.load_state_dict(model.state_dict())
    return m


# ---------------------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------------------
def run_seed(seed: int, work: Path, cfg, scales_plot) -> tuple[dict, dict, dict, dict]:
    """Returns ({row: {column: acc}}, {(corruption, scale): {column: acc}}, {file: bytes},
    {(depth, corruption): {column: acc}})."""
    torch.manual_seed(seed)
    data = digits(seed)
    xt, yt = (t[: cfg.test_limit] for t in data["test"])
    g = torch.Generator().manual_seed(10_000 + seed)
    cols = ["clean", *CORRUPTIONS]
    tests = {c: (xt if c == "clean" else corrupt(xt, c, g), yt) for c in cols}

    def evaluate(model) -> dict:
        return {c: accuracy(model, *tests[c]) for c in cols}

    rows, sizes = {}, {}
    clean = train(CNN(), data["A"], epochs=cfg.epochs, lr=2e-3, kind=None, seed=seed)
    clean_dir = save(clean, work / "clean")
    rows["clean model"] = evaluate(clean)
    ct = load_tree(clean_dir)
    sigs, robust_dirs = {}, {}
    for i, c in enumerate(CORRUPTIONS):
        robust = train(copy_of(clean), data["A"], epochs=cfg.ft_epochs, lr=1e-3, kind=c, seed=seed + 1 + i)
        robust_dirs[c] = save(robust, work / f"robust_{c}")
        rows[f"robust model ({c})"] = evaluate(robust)
        rt = load_tree(robust_dirs[c])
        for bits in (32, 8, 4):
            sig = extract(ct, rt, bits=bits, name=f"{c}_int{bits}" if bits < 32 else c)
            path = save_signatures([sig], work / "sigs" / f"{sig.name}.safetensors")
            (sigs[(c, bits)],) = load_signatures(path)  # patch from what was written
            sizes[sig.name] = path.stat().st_size
        nostat = extract(ct, rt, name=f"{c}_nostats", stats=False)
        sigs[(c, "nostats")] = nostat
    sizes["model"] = (clean_dir / "model.safetensors").stat().st_size

    n = [0]

    def patched(model_dir: Path, pairs) -> dict:
        n[0] += 1
        out = work / f"patched{n[0]}"
        patch(model_dir, pairs, out)
        acc = evaluate(load(out))
        back = work / f"unpatched{n[0]}"
        assert unpatch(out, pairs, back).how == "restored"  # and the original bytes come back
        assert (back / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
        shutil.rmtree(out)
        shutil.rmtree(back)
        return acc

    for c in CORRUPTIONS:
        for s in cfg.scales:
            rows[f"clean + σ_{c} x{s:g}"] = patched(clean_dir, [(sigs[(c, 32)], s)])
    rows["clean + σ_noise + σ_blur"] = patched(clean_dir, [(sigs[("noise", 32)], 1.0), (sigs[("blur", 32)], 1.0)])
    rows["clean + all three σ x1"] = patched(clean_dir, [(sigs[(c, 32)], 1.0) for c in CORRUPTIONS])
    rows["clean + all three σ x1/3"] = patched(clean_dir, [(sigs[(c, 32)], 1 / 3) for c in CORRUPTIONS])
    for c in CORRUPTIONS:
        for bits in (8, 4):
            rows[f"clean + σ_{c} int{bits}"] = patched(clean_dir, [(sigs[(c, bits)], 1.0)])
        rows[f"clean + σ_{c} without BN stats"] = patched(clean_dir, [(sigs[(c, "nostats")], 1.0)])

    # transfer: clean models trained on split B; σ was cut from split-A models
    sibling = train(copy_of(clean), data["B"], epochs=cfg.ft_epochs, lr=1e-3, kind=None, seed=seed + 7)
    sib_dir = save(sibling, work / "clean_B_finetuned")
    scratch = train(CNN(), data["B"], epochs=cfg.epochs, lr=2e-3, kind=None, seed=seed + 8)
    scr_dir = save(scratch, work / "clean_B_scratch")
    rows["B (fine-tuned from clean A)"] = evaluate(sibling)
    rows["B fine-tuned: + σ_noise (A)"] = patched(sib_dir, [(sigs[("noise", 32)], 1.0)])
    proj = extract(load_tree(sib_dir), load_tree(robust_dirs["noise"]), pretrained=ct, name="noise_proj")
    rows["B fine-tuned: + projected σ_noise (A)"] = patched(sib_dir, [(proj, 1.0)])
    rows["B fine-tuned: + all three σ (A) x1/3"] = patched(sib_dir, [(sigs[(c, 32)], 1 / 3) for c in CORRUPTIONS])
    rows["B fine-tuned: robust (noise) reference"] = evaluate(
        train(copy_of(sibling), data["B"], epochs=cfg.ft_epochs, lr=1e-3, kind="noise", seed=seed + 9)
    )
    rows["B (from scratch)"] = evaluate(scratch)
    rows["B scratch: + σ_noise (A)"] = patched(scr_dir, [(sigs[("noise", 32)], 1.0)])

    curve = {}
    for c in CORRUPTIONS:
        for s in scales_plot:
            curve[(c, s)] = patched(clean_dir, [(sigs[(c, 32)], s)]) if s != 0 else rows["clean model"]
    depth = {}
    for d in cfg.depths:  # how many weight layers the signature keeps (3 = the default, the shallow half)
        for c in CORRUPTIONS:
            sig = extract(ct, load_tree(robust_dirs[c]), layers=d, name=f"{c}_d{d}")
            depth[(d, c)] = {
                **patched(clean_dir, [(sig, 1.0)]),
                "bytes": sig.nbytes,
                "layers": ", ".join(x for x in sig.record["layers"] if x.startswith(("conv", "fc"))),
            }
    return rows, curve, sizes, depth


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def table(rows_by_seed: list[dict], cols: list[str]) -> tuple[str, list[list]]:
    names = list(rows_by_seed[0])
    md = ["| model | " + " | ".join(cols) + " | corrupted mean |", "|---|" + "---:|" * (len(cols) + 1)]
    csv = [["model", *cols, "corrupted_mean"]]
    for name in names:
        vals = np.array([[r[name][c] for c in cols] for r in rows_by_seed]) * 100  # (seeds, cols)
        corr = vals[:, 1:].mean(1)
        cells = [
            f"{m:.1f} ± {s:.1f}" if len(vals) > 1 else f"{m:.1f}"
            for m, s in zip(vals.mean(0), vals.std(0), strict=True)
        ]
        cm = f"{corr.mean():.1f} ± {corr.std():.1f}" if len(vals) > 1 else f"{corr.mean():.1f}"
        md.append(f"| {name} | " + " | ".join(cells) + f" | {cm} |")
        csv.append([name, *[f"{m:.2f}" for m in vals.mean(0)], f"{corr.mean():.2f}"])
    return "\n".join(md), csv


def depth_table(depths: list[dict], ds) -> str:
    md = [
        "| weight layers kept | tensors kept | signature (float32) | clean test, mean of the three patched | "
        + " | ".join(f"{c} test, clean + σ_{c}" for c in CORRUPTIONS)
        + " |",
        "|---|---|---:|---:|" + "---:|" * len(CORRUPTIONS),
    ]
    for d in ds:
        clean = np.mean([[r[(d, c)]["clean"] for c in CORRUPTIONS] for r in depths]) * 100
        own = [np.mean([r[(d, c)][c] for r in depths]) * 100 for c in CORRUPTIONS]
        r0 = depths[0][(d, CORRUPTIONS[0])]
        md.append(
            f"| {d}{' (default)' if d == 3 else ''} | {r0['layers']} (+ their BN) | "
            f"{r0['bytes'] / 1024:.1f} KiB | "
            f"{clean:.1f} | " + " | ".join(f"{x:.1f}" for x in own) + " |"
        )
    return "\n".join(md)


def plot(curves: list[dict], scales: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, c in enumerate(CORRUPTIONS):
        on = np.array([[cv[(c, s)][c] for s in scales] for cv in curves]).mean(0) * 100
        clean = np.array([[cv[(c, s)]["clean"] for s in scales] for cv in curves]).mean(0) * 100
        ax.plot(scales, on, "-o", color=f"C{i}", label=f"σ_{c}: {c} test")
        ax.plot(scales, clean, "--", color=f"C{i}", alpha=0.7, label=f"σ_{c}: clean test")
    ax.set_xlabel("scale α (clean + α·σ)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Robust Weight Signatures on digits (shallow half, BN stats included)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out: Path, seeds: int = 3, quick: bool = False) -> list[tuple]:
    """Run the demo into `out` (tables, CSV, PNG, the models and signature files of each seed); returns each
    seed's (rows, scale curve, file sizes, depth results)."""
    torch.set_num_threads(1)
    cfg = argparse.Namespace(epochs=30, ft_epochs=15, scales=(0.5, 1.0, 1.5), depths=(1, 2, 3, 4, 5), test_limit=None)
    scales_plot = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    if quick:  # checks that everything runs; the numbers mean little
        cfg.epochs, cfg.ft_epochs, seeds, scales_plot = 2, 1, 1, [0.0, 1.0]
        cfg.depths, cfg.test_limit = (1, 3, 5), 200
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    results = []
    for seed in range(seeds):
        work = out / f"seed{seed}"
        shutil.rmtree(work, ignore_errors=True)
        results.append(run_seed(seed, work, cfg, scales_plot))
    md, csv = table([r[0] for r in results], ["clean", *CORRUPTIONS])
    md2 = depth_table([r[3] for r in results], cfg.depths)
    size_line = ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in results[0][2].items())
    print(md)
    print(f"\nfile sizes (seed 0): {size_line}\n")
    print(md2)
    print(f"{seeds} seed(s), {time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} CPU-s")
    (out / "rws_table.md").write_text(md + f"\n\nfile sizes (seed 0): {size_line}\n\n" + md2 + "\n")
    (out / "rws_table.csv").write_text("\n".join(",".join(map(str, r)) for r in csv) + "\n")
    plot([r[1] for r in results], scales_plot, out / "rws_scale.png")
    print(f"wrote {out / 'rws_table.md'}, {out / 'rws_table.csv'}, {out / 'rws_scale.png'}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/rws_demo")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a few epochs, one seed: checks that everything runs")
    args = ap.parse_args(argv)
    run(Path(args.out), args.seeds, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
