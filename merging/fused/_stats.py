"""numba loops for per-entry statistics across models (imported on first use, like merging/fused/_loops.py).

`welford_variance` is SCE's variance across the task vectors (merging/methods/sce.py): Welford's update in float64,
in model order, rounded to float32, the same IEEE operations as the torch reference `merging.methods.sce._variance`
(no fast-math), so the two are bit-identical; one pass instead of ~10 array passes. It also counts the non-zero
variances. `square_sum` is SCE's Σ τ² for its weights: float32 squares summed in float64, as the torch reference
`tau.square().sum(dtype=torch.float64)`, but in another order (vectorised), so the two sums can differ by ~1e-16
relative (the float32 weights derived from them practically never do; DARE's L1 sums have the same caveat)."""

from __future__ import annotations

import numpy as np

from merging.fused._loops import _jit, _njit


@_njit
def _welford(xs, out):
    T = len(xs)
    n = out.size
    nonzero = 0
    for j in range(n):
        mean = np.float64(xs[0][j])
        m2 = 0.0
        for i in range(1, T):
            x = np.float64(xs[i][j])
            delta = x - mean
            mean = mean + delta / (i + 1)
            m2 = m2 + delta * (x - mean)
        v = np.float32(m2 / T)
        out[j] = v
        nonzero += v != 0
    return nonzero


@_jit(fastmath={"reassoc", "nsz"})
def _square_sum(x):
    # Σ x² with each square rounded to float32 and summed in float64; reassociation lets LLVM vectorise the sum (its
    # order then depends on the vector width)
    s = 0.0
    for i in range(x.size):
        s += np.float64(x[i] * x[i])
    return s


def welford_variance(xs) -> tuple[np.ndarray, int]:
    """float32 population variance across the float32 arrays `xs` (one per model), element-wise, and how many of
    the variances are not zero."""
    out = np.empty(xs[0].size, dtype=np.float32)
    nonzero = _welford(tuple(xs), out)
    return out, int(nonzero)


def square_sum(x: np.ndarray) -> float:
    """Σ x² of a float32 array: each square in float32, the sum in float64 (in a vectorised order)."""
    return float(_square_sum(x))
