"""SVD-based merges (tsv, iso_c, iso_cts) against a plain `torch.linalg.svd` loop over the same matrices.

    python benchmarks/svd_speed.py                       # small shapes (seconds)
    python benchmarks/svd_speed.py --size 1.1B --tasks 3 # TinyLlama-1.1B's matrix shapes, one layer's worth

For each shape of a Llama layer (attention q/k/v/o, MLP gate/up/down) at the chosen size, T random task matrices are
merged by each method's per-matrix function (`merging.methods.{tsv,iso_c,iso_cts}`), and the floor is the same T
matrices decomposed once each by `torch.linalg.svd(full_matrices=False)` in a loop (what any per-task SVD method
must at least do). Reported: seconds per layer (median of `--repeats`), and the ratio to the floor. Iso-C needs one
SVD of the summed matrix, TSV T SVDs plus two polar factors, Iso-CTS 1 + T SVDs plus two polar factors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.methods.iso_c import iso_c_merge  # noqa: E402
from merging.methods.iso_cts import iso_cts_merge  # noqa: E402
from merging.methods.tsv import tsv_merge  # noqa: E402

SIZES = {  # hidden, intermediate, kv dim: one layer's matrices (out, in)
    "small": (256, 704, 64),
    "medium": (1024, 2816, 128),
    "1.1B": (2048, 5632, 256),
}


def shapes(size: str) -> list[tuple[int, int]]:
    h, i, kv = SIZES[size]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    mats = [[torch.randn(s, generator=g) * 0.01 for _ in range(a.tasks)] for s in shapes(a.size)]

    def floor():
        for taus in mats:
            for t in taus:
                torch.linalg.svd(t, full_matrices=False)

    runs = {
        "plain svd loop (floor)": floor,
        "tsv": lambda: [tsv_merge(taus) for taus in mats],
        "iso_c": lambda: [iso_c_merge(taus) for taus in mats],
        "iso_cts": lambda: [iso_cts_merge(taus, 0.8) for taus in mats],
    }
    print(
        f"size {a.size}: {len(mats)} matrices {sorted(set(shapes(a.size)))}, {a.tasks} tasks, {a.threads} thread(s), "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}, median of {a.repeats}"
    )
    base = None
    print(f"  {'method':<26}{'s / layer':>10}{'x floor':>9}")
    for name, fn in runs.items():
        fn()  # warm-up
        t = timed(fn, a.repeats)
        base = base or t
        print(f"  {name:<26}{t:>10.3f}{t / base:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
