"""numba loops for per-entry statistics across models (imported on first use, like merging/fused/_loops.py).

`welford_variance` is SCE's variance across the task vectors (merging/methods/sce.py): Welford's update in float64,
in model order, rounded to float32, the same IEEE operations as the torch reference `merging.methods.sce._variance`
(no fast-math), so the two are bit-identical; one pass instead of ~10 array passes. It also counts the non-zero
variances. `square_sum` is SCE's Σ τ² for its weights: float32 squares summed in float64, as the torch reference
`tau.square().sum(dtype=torch.float64)`, but in another order (vectorised), so the two sums can differ by ~1e-16
relative (the float32 weights derived from them practically never do; DARE's L1 sums have the same caveat).
`sce_count` is SCE's counting pass on a chunk, a block at a time: the variances, their band for the threshold
search and, in its first round, the squares of the entries sure to be selected (the weights then need no pass of
their own) and the positions of the undecided ones."""

from __future__ import annotations

import numpy as np

from merging.fused._loops import _ABS, _BLOCK, _SUB, _count_band, _jit, _load_all, _njit

_NONE16 = (np.empty(0, dtype=np.uint16),)  # the raw-bits slot of _load_all, unused by the float32 loops
_NONE32 = np.empty(0, dtype=np.float32)


@_njit
def _welford(xs, out):
    # out = the variances across the float32 arrays xs, a block at a time (_welford_block); returns the non-zeros
    n = out.size
    x = np.empty((len(xs), _BLOCK), dtype=np.float32)
    mean = np.empty(_BLOCK, dtype=np.float64)
    m2 = np.empty(_BLOCK, dtype=np.float64)
    nonzero = 0
    for b0 in range(0, n, _BLOCK):
        m = min(_BLOCK, n - b0)
        _load_all(xs, _NONE16, _NONE32, False, b0, m, x, x[0])
        nonzero += _welford_block(x, m, out[b0 : b0 + m], mean, m2)
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


@_njit
def _welford_block(x, m, vb, mean, m2):
    # vb[:m] = the variances of the entries in x[:, :m] (one row per model): Welford's update per entry in float64,
    # in model order, rounded to float32 (the operations of the torch reference, run model by model over the block
    # so that they vectorise; a division by a power of two is the multiplication by its inverse, exactly); returns
    # how many are not zero
    T = x.shape[0]
    x0 = x[0]
    for j in range(m):
        mean[j] = np.float64(x0[j])
        m2[j] = 0.0
    for i in range(1, T):
        xi = x[i]
        d = np.float64(i + 1)
        if i & (i + 1) == 0:  # i + 1 a power of two
            r = 1.0 / d
            for j in range(m):
                v = np.float64(xi[j])
                delta = v - mean[j]
                mn = mean[j] + delta * r
                mean[j] = mn
                m2[j] = m2[j] + delta * (v - mn)
        else:
            for j in range(m):
                v = np.float64(xi[j])
                delta = v - mean[j]
                mn = mean[j] + delta / d
                mean[j] = mn
                m2[j] = m2[j] + delta * (v - mn)
    fT = np.float64(T)
    nonzero = 0
    for j in range(m):
        r32 = np.float32(m2[j] / fT)
        vb[j] = r32
        nonzero += r32 != 0
    return nonzero


@_jit(fastmath={"reassoc", "nsz"}, error_model="numpy")
def _squares_above(x, vb, hi, m, sums, sure):
    # sums[t] += Σ x_t² over this block's entries (x: one row per model) whose variance is > hi (squares in float32,
    # the sum in float64 in a vectorised order); sure[i] = 1 for those entries, else 0
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for i in range(m):
        sure[i] = one if vb[i] > hi else zero
    for t in range(x.shape[0]):
        xt = x[t]
        s = 0.0
        for i in range(m):
            v = xt[i]
            s += np.float64(v * v * sure[i])
        sums[t] += s


@_njit
def _pack(sure, m, bits, at):
    # bit i % 8 of bits[at + i // 8] = sure[i] != 0
    for j in range(m // 8):
        byte = 0
        for b in range(8):
            byte |= np.int64(sure[8 * j + b] != 0) << b
        bits[at + j] = byte
    if m % 8:
        byte = 0
        for i in range(m - m % 8, m):
            byte |= np.int64(sure[i] != 0) << (i % 8)
        bits[at + m // 8] = byte


@_njit
def _sce_count(xs, xb, base, raw, hi, klo, khi, collect, fold, sums, keys, pos, bits, sq):
    # SCE's counting pass over one chunk, a block at a time (the variances never leave the block): the non-zero
    # variances; the band of the threshold search on them (how many are above hi, how many in [lo, hi], and with
    # `collect` their bit patterns in keys, their positions in pos and the task vectors' squares there in sq, in
    # order); with `fold`, the squares of the entries whose variance is above hi summed into sums and those entries
    # marked in bits. With `raw` the task vectors come as bfloat16 bits (xb), decoded against base block by block
    T = len(xb) if raw else len(xs)
    n = base.size if raw else xs[0].size
    x = np.empty((T, _BLOCK), dtype=np.float32)
    buf = np.empty(_BLOCK, dtype=np.float32)
    vb = np.empty(_BLOCK, dtype=np.float32)
    mean = np.empty(_BLOCK, dtype=np.float64)
    m2 = np.empty(_BLOCK, dtype=np.float64)
    sure = np.empty(_BLOCK, dtype=np.float32)
    kv = vb.view(np.int32)
    width = np.uint32(khi - klo)
    nonzero = 0
    above = 0
    m = 0
    for b0 in range(0, n, _BLOCK):  # b0 is a multiple of 8: its bits start at byte b0 // 8
        mb = min(_BLOCK, n - b0)
        _load_all(xs, xb, base, raw, b0, mb, x, buf)
        nonzero += _welford_block(x, mb, vb, mean, m2)
        a, c = _count_band(kv[:mb], klo, width, khi)
        above += a
        if fold:
            _squares_above(x, vb, hi, mb, sums, sure)
            _pack(sure, mb, bits, b0 // 8)
        if c == 0:
            continue
        if not collect:
            m += c
            continue
        for s0 in range(0, mb, _SUB):  # the values in the bracket, sub-block by sub-block (most hold none)
            sub = kv[s0 : min(s0 + _SUB, mb)]
            if _count_band(sub, klo, width, klo)[1] == 0:
                continue
            for i in range(sub.size):
                k = sub[i] & _ABS
                if np.uint32(k - klo) <= width:
                    keys[m] = k
                    pos[m] = b0 + s0 + i
                    if fold:
                        for t in range(T):
                            v = x[t, s0 + i]
                            sq[t, m] = v * v
                    m += 1
    return nonzero, above, m


def sce_count(xs, lo: float, hi: float, sums: np.ndarray | None):
    """One chunk of SCE's counting pass from the task vectors `xs` (float32 tensors, or `merging.fused.RawDelta`s),
    without materialising the variances: (how many variances are not zero, how many are above `hi`, those in
    [lo, hi]: their values (float32) or, when lo == hi, their count). With `sums` (float64, one per model) it also
    folds the weights in: adds Σ x_t² over the entries whose variance is above `hi` and returns, in addition, those
    entries as bits (bit i % 8 of byte i // 8), the positions of the variances in [lo, hi] and the task vectors'
    squares there ((T, m) float32)."""
    from merging.fused import loop_inputs

    xf, xb, base, raw = loop_inputs(xs)
    T, n = len(xs), xs[0].numel()
    fold = sums is not None
    collect = lo != hi or fold
    keys = np.empty(n if collect else 0, dtype=np.int32)
    pos = np.empty(n if collect else 0, dtype=np.int64)
    sq = np.empty((T, n if fold else 0), dtype=np.float32)
    bits = np.empty((n + 7) // 8 if fold else 0, dtype=np.uint8)
    klo, khi = (np.float32(v).view(np.int32) for v in (lo, hi))
    nonzero, above, m = _sce_count(
        xf,
        xb,
        base,
        raw,
        np.float32(hi),
        klo,
        khi,
        collect,
        fold,
        sums if fold else np.zeros(0),
        keys,
        pos,
        bits,
        sq,
    )
    inside = keys[:m].copy().view(np.float32) if lo != hi else int(m)
    if not fold:
        return int(nonzero), int(above), inside
    return int(nonzero), int(above), inside, bits, pos[:m].copy(), sq[:, :m].copy()
