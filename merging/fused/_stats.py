"""numba loops for per-entry statistics across models (imported on first use, like merging/fused/_loops.py).

`welford_variance` is SCE's variance across the task vectors (merging/methods/sce.py): Welford's update in float64,
in model order, rounded to float32, the same IEEE operations as the torch reference `merging.methods.sce._variance`
(no fast-math), so the two are bit-identical; one pass instead of ~10 array passes."""

from __future__ import annotations

import numpy as np

from merging.fused._loops import _njit


@_njit
def _welford(xs, out):
    T = len(xs)
    n = out.size
    for j in range(n):
        mean = np.float64(xs[0][j])
        m2 = 0.0
        for i in range(1, T):
            x = np.float64(xs[i][j])
            delta = x - mean
            mean = mean + delta / (i + 1)
            m2 = m2 + delta * (x - mean)
        out[j] = np.float32(m2 / T)


def welford_variance(xs) -> np.ndarray:
    """float32 population variance across the float32 arrays `xs` (one per model), element-wise."""
    out = np.empty(xs[0].size, dtype=np.float32)
    _welford(tuple(xs), out)
    return out
