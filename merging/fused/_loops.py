"""The numba loops behind `merging.fused` (imported on their first use, so that merges which do not need them
do not pay for importing numba). Every scalar is float32 where the torch reference computes in float32."""

from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import intrinsic

_ABS = np.int32(0x7FFFFFFF)
_INF = np.int32(0x7F800000)
_SIGN = np.int32(-0x80000000)
_ONE_BITS = np.int32(0x3F800000)  # 1.0f


def _jit(**options):
    """numba.njit with an on-disk cache, or without one where numba finds no writable place for it (a read-only
    install without a writable home: it then compiles once per process)."""

    def wrap(fn):
        try:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(nogil=True, **options)(fn)

    return wrap


_njit = _jit(error_model="numpy")


_BLOCK = 2048  # elements per block: the loops below run over one block at a time, so their scratch stays in L1


@_njit
def _load(xf, xb, base, raw, t, b0, m, buf):
    # model t's float32 task-vector entries b0 .. b0 + m − 1: a slice of xf[t], or (raw) decoded from its bfloat16
    # bits xb[t] and the base subtracted into buf, as decode_sub does for a whole chunk
    if not raw:
        return xf[t][b0 : b0 + m]
    _decode_sub_block(xb[t][b0 : b0 + m], base[b0 : b0 + m], buf[:m])
    return buf[:m]


@_njit
def _load_all(xf, xb, base, raw, b0, m, x, buf):
    # every model's entries b0 .. b0 + m − 1 into the rows of x (see _load)
    for t in range(x.shape[0]):
        src = _load(xf, xb, base, raw, t, b0, m, buf)
        xt = x[t]
        for i in range(m):
            xt[i] = src[i]


_SUB = 64  # elements per sub-block of the band loops: only sub-blocks holding a value in the bracket are compacted


@_jit(fastmath={"reassoc", "nsz"}, error_model="numpy")
def _count_band(keys, klo, width, khi):
    # (#{k > khi, k finite}, #{klo <= k <= khi}) of the keys' |x| bit patterns, summed as float32 ones: exact below
    # 2^24 in any order, so the sums vectorise (an integer count of comparisons is widened to int64 lanes)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    above = np.float32(0.0)
    inside = np.float32(0.0)
    for i in range(keys.size):
        k = keys[i] & _ABS  # bit pattern of |x|: monotone in |x| for non-negative floats
        above += one if (k > khi) & (k <= _INF) else zero  # |x| > hi; NaN excluded, as `x > hi` excludes it
        inside += one if np.uint32(k - klo) <= width else zero
    return int(above), int(inside)


@_njit
def _compact(keys, klo, width, buf, m):
    # append the keys in [klo, klo + width] to buf[m:], sub-block by sub-block (most sub-blocks hold none: they are
    # skipped after a vectorised count); returns the new m
    for s0 in range(0, keys.size, _SUB):
        sub = keys[s0 : s0 + _SUB]
        if _count_band(sub, klo, width, klo)[1] == 0:
            continue
        for i in range(sub.size):  # without a branch
            k = sub[i] & _ABS
            buf[m] = k
            m += np.uint32(k - klo) <= width
    return m


@_njit
def _band_block(blk, klo, khi, buf, m, collect):
    # one block of a band pass: (#{|x| > hi} in it, the new m: m plus #{lo <= |x| <= hi} in it, those values' bit
    # patterns appended to buf with `collect`)
    width = np.uint32(khi - klo)
    above, c = _count_band(blk, klo, width, khi)
    if not collect:
        return above, m + c
    return above, (_compact(blk, klo, width, buf, m) if c else m)


@_njit
def _band(xf, xb, base, raw, klo, khi, buf, collect):
    # one bracket over model 0 of xf (or of its raw bits xb): (#{|x| > hi}, #{lo <= |x| <= hi}), and with `collect`
    # those values' bit patterns in buf
    above = 0
    m = 0
    n = xb[0].size if raw else xf[0].size
    scratch = np.empty(_BLOCK, dtype=np.float32)
    for b0 in range(0, n, _BLOCK):
        blk = _load(xf, xb, base, raw, 0, b0, min(_BLOCK, n - b0), scratch).view(np.int32)
        a, m = _band_block(blk, klo, khi, buf, m, collect)
        above += a
    return above, m


@_njit
def _band2(xf, xb, base, raw, klo1, khi1, klo2, khi2, buf1, buf2, collect1, collect2):
    # `_band` for two brackets in one pass over the values (breadcrumbs' two edges of a rank window)
    above1 = 0
    above2 = 0
    m1 = 0
    m2 = 0
    n = xb[0].size if raw else xf[0].size
    scratch = np.empty(_BLOCK, dtype=np.float32)
    for b0 in range(0, n, _BLOCK):
        blk = _load(xf, xb, base, raw, 0, b0, min(_BLOCK, n - b0), scratch).view(np.int32)
        a, m1 = _band_block(blk, klo1, khi1, buf1, m1, collect1)
        above1 += a
        a, m2 = _band_block(blk, klo2, khi2, buf2, m2, collect2)
        above2 += a
    return above1, m1, above2, m2


@_njit
def _trim_weight(src, xt, th, wt, m, left, t):
    # hardshrink keeps |v| >= thr (and NaN); a trimmed entry is +0; then the weight. left[t] >= 0: only that many
    # more entries tied at thr are kept (the first ones in index order; the rest are trimmed too), as
    # merging.methods._gta's `_drop_excess_ties` zeroes the excess ties before the hardshrink
    zero = np.float32(0.0)
    lt = left[t]
    if lt == 0 and th > zero:  # no tie left to keep: keep |v| > thr
        for i in range(m):
            v = src[i]
            xt[i] = (zero if abs(v) <= th else v) * wt
        return
    for i in range(m):
        v = src[i]
        xt[i] = (zero if abs(v) < th else v) * wt
    if lt < 0 or not th > zero:
        return
    ties = 0
    for i in range(m):  # branch-free count (vectorises); the excess is located only when there is one
        ties += abs(src[i]) == th
    if ties <= lt:
        left[t] = lt - ties
        return
    seen = 0
    for i in range(m):
        if abs(src[i]) == th:
            seen += 1
            if seen > lt:
                xt[i] = zero * wt
    left[t] = 0


@_njit
def _sum_models(x, mx, T, m):
    # the sum over models, in model order (the merge without consensus; the election's input)
    x0 = x[0]
    for i in range(m):
        mx[i] = x0[i]
    for t in range(1, T):
        xt = x[t]
        for i in range(m):
            mx[i] = mx[i] + xt[i]


@_njit
def _elect(mxi, sgi, zs, m):
    # the elected sign, copysign(1, sum): +1 where the sum is >= +0, and the sign bit `zs` where it is ±0 (as
    # bits: vectorises)
    for i in range(m):
        b = mxi[i]
        sgi[i] = (b & _SIGN) | (zs if (b & _ABS) == 0 else np.int32(0)) | _ONE_BITS


@_njit
def _disjoint(x, w, sg, mx, dv, T, m):
    # Σ_t relu(x_t·γ) (mx is overwritten at t = 0: the sum is no longer needed) and the agreeing weights Σ_t a_t w_t
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for t in range(T):
        xt = x[t]
        wt = w[t]
        for i in range(m):
            a = xt[i] * sg[i]
            a = zero if a < zero else a  # relu keeps -0 and NaN as they are
            mx[i] = a if t == 0 else mx[i] + a
            ind = one if a > zero else (a if a != a else zero)  # sign(a), a >= 0 or NaN
            dv[i] = ind * wt if t == 0 else dv[i] + ind * wt
    for i in range(m):
        mx[i] = mx[i] * sg[i]


@_njit
def _divide(mx, dv, div_mode, div_value, m):
    one = np.float32(1.0)
    zero = np.float32(0.0)
    if div_mode == 0:  # all weights positive: a floor below the smallest weight
        for i in range(m):
            d = dv[i]
            mx[i] = mx[i] / (div_value if d < div_value else d)
    else:  # signed weights: mergekit's 0 -> 1
        for i in range(m):
            d = dv[i]
            mx[i] = mx[i] / (one if d == zero else d)


@_njit
def _finish(mx, ob, bb, has_base, lam, scale, m):
    # · λ, + base, into the output block
    if scale:
        for i in range(m):
            mx[i] = mx[i] * lam
    if has_base:
        for i in range(m):
            ob[i] = mx[i] + bb[i]
    else:
        for i in range(m):
            ob[i] = mx[i]


@_njit
def _gta_combine(
    out,
    base,
    has_base,
    xs,
    xb,
    raw,
    thr,
    left,
    win,
    wf,
    wi,
    w,
    consensus,
    normalize,
    div_mode,
    div_value,
    lam,
    scale,
    zero_neg,
):
    # Mirrors merging.methods._gta.combine op by op (see its docstring): every value is float32, the additions run in
    # the reference's order (model 0, 1, ...), and each step is a loop over one block of elements, written
    # with selects instead of branches so that LLVM vectorises it. Model t is trimmed at thr[t] (TIES), or, where
    # win[t], masked by its breadcrumbs window (wf[t] = lo, hi; wi[t] = has_hi, lo_first, lo_stop, hi_first,
    # seen_lo, seen_hi: see _window_block) before its weight. With `raw` the task vectors come as bfloat16 bits (xb)
    # and are decoded a block at a time (base is then the base they are taken from).
    T = len(xb) if raw else len(xs)
    n = out.size
    x = np.empty((T, _BLOCK), dtype=np.float32)
    buf = np.empty(_BLOCK, dtype=np.float32)
    sg = np.empty(_BLOCK, dtype=np.float32)
    mx = np.empty(_BLOCK, dtype=np.float32)
    dv = np.empty(_BLOCK, dtype=np.float32)
    zs = _SIGN if zero_neg else np.int32(0)  # the sign bit of an exactly-zero sum's elected sign
    for b0 in range(0, n, _BLOCK):
        m = min(_BLOCK, n - b0)
        for t in range(T):  # slices, not xs[t][b0 + i]: a non-negative index lets LLVM vectorise
            src = _load(xs, xb, base, raw, t, b0, m, buf)
            if win[t]:
                _window_block(src, x[t], wf[t, 0], wf[t, 1], wi[t], m)
                _scale(x[t], w[t], m)
            else:
                _trim_weight(src, x[t], thr[t], w[t], m, left, t)
        _sum_models(x, mx, T, m)
        if consensus:
            _elect(mx.view(np.int32), sg.view(np.int32), zs, m)
            _disjoint(x, w, sg, mx, dv, T, m)
            if normalize:
                _divide(mx, dv, div_mode, div_value, m)
        elif normalize and div_mode == 1:
            for i in range(m):
                mx[i] = mx[i] / div_value
        _finish(mx, out[b0 : b0 + m], base[b0 : b0 + m], has_base, lam, scale, m)


@_njit
def _scale(x, wt, m):
    for i in range(m):
        x[i] = x[i] * wt


@_njit
def _window(x, lo, hi, wi):
    # Model Breadcrumbs' rank window on one chunk, in place (merging.methods._sparsifiers.Window.apply_), a block at
    # a time
    for b0 in range(0, x.size, _BLOCK):
        blk = x[b0 : b0 + _BLOCK]
        _window_block(blk, blk, lo, hi, wi, blk.size)


@_jit(fastmath={"reassoc", "nsz"}, error_model="numpy")
def _count_eq2(x, u, v, m):
    # (#{|x| == u}, #{|x| == v}) over x[:m], m <= _BLOCK: summed as float32 ones, exact below 2^24 in any order, so
    # the sum may be reassociated and vectorised (an integer count of comparisons vectorises poorly here: each
    # compare mask is widened to int64 lanes)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    cu = np.float32(0.0)
    cv = np.float32(0.0)
    for i in range(m):
        a = abs(x[i])
        cu += one if a == u else zero
        cv += one if a == v else zero
    return int(cu), int(cv)


@_njit
def _window_block(src, dst, lo, hi, wi, m):
    # dst = src masked by Model Breadcrumbs' rank window (dst may be src): keep lo < |v| < hi (no upper edge unless
    # wi[0]); of the entries tied at lo (at hi), keep those whose position among all tied ones so far (wi[4], wi[5]:
    # carried across blocks and chunks, updated) lies in [wi[1], wi[2]) ([wi[3], inf)). When lo == hi the caller
    # passes no upper edge and the window of that single run in wi[1], wi[2]. Dropped entries become v * 0 (as the
    # reference multiplies by the mask: -0 for negative v, NaN stays).
    one = np.float32(1.0)
    zero = np.float32(0.0)
    has_hi = wi[0] != 0
    lo_first = wi[1]
    lo_stop = wi[2]
    hi_first = wi[3]
    slo = wi[4]
    shi = wi[5]
    tlo, thi = _count_eq2(src, lo, hi if has_hi else np.float32(-1.0), m)  # |v| never equals -1
    # each edge's ties in this block all inside its window, all outside, or split: a window's end falls in this
    # block (at most a few blocks per tensor). Without a split, one branch-free (vectorised) loop
    kl = tlo == 0 or (slo >= lo_first and slo + tlo <= lo_stop)
    split_lo = not kl and not (slo + tlo <= lo_first or slo >= lo_stop)
    kh = thi == 0 or shi >= hi_first
    split_hi = not kh and shi + thi > hi_first
    if not (split_lo or split_hi):
        if has_hi:
            for i in range(m):
                v = src[i]
                a = abs(v)
                dst[i] = v * (one if ((a > lo) & (a < hi)) | ((a == lo) & kl) | ((a == hi) & kh) else zero)
        else:
            for i in range(m):
                v = src[i]
                a = abs(v)
                dst[i] = v * (one if (a > lo) | ((a == lo) & kl) else zero)
        wi[4] = slo + tlo
        wi[5] = shi + thi
        return
    for i in range(m):  # entry by entry, the ties by their positions
        v = src[i]
        a = abs(v)
        if a == lo:
            keep = (slo >= lo_first) & (slo < lo_stop)
            slo += 1
        elif has_hi and a == hi:
            keep = shi >= hi_first
            shi += 1
        else:
            keep = (a > lo) & ((a < hi) | (not has_hi))
        dst[i] = v * (one if keep else zero)
    wi[4] = slo
    wi[5] = shi


@_njit
def _change_counts(xs, eps, b0, m, c):
    # c[i] = how many models change entry b0 + i by more than eps (|v| > eps), for a block of m entries
    for i in range(m):
        c[i] = 0
    for t in range(len(xs)):
        xt = xs[t][b0 : b0 + m]
        for i in range(m):
            c[i] += abs(xt[i]) > eps


@_njit
def _ram_counts(xs, eps, shared, unique):
    # per model: how many of its changed entries (|v| > eps) another model changes too, and how many only it does
    T = len(xs)
    n = xs[0].size
    c = np.empty(_BLOCK, dtype=np.int32)
    for b0 in range(0, n, _BLOCK):
        m = min(_BLOCK, n - b0)
        _change_counts(xs, eps, b0, m, c)
        for t in range(T):
            xt = xs[t][b0 : b0 + m]
            sh = 0
            un = 0
            for i in range(m):
                ch = abs(xt[i]) > eps
                sh += ch & (c[i] > 1)
                un += ch & (c[i] == 1)
            shared[t] += sh
            unique[t] += un


@_njit
def _ram_combine(base, xs, eps, factors, use_factors):
    # merging.methods._ram.ram_combine, in place on base: each model's term τ·[|τ| > eps], times its factor where it
    # alone changes the entry (use_factors) else divided by how many do (at least 1), summed in model order
    T = len(xs)
    n = base.size
    one = np.float32(1.0)
    zero = np.float32(0.0)
    c = np.empty(_BLOCK, dtype=np.int32)
    acc = np.empty(_BLOCK, dtype=np.float32)
    for b0 in range(0, n, _BLOCK):
        m = min(_BLOCK, n - b0)
        _change_counts(xs, eps, b0, m, c)
        for t in range(T):
            xt = xs[t][b0 : b0 + m]
            f = factors[t]
            for i in range(m):
                v = xt[i]
                term = v * (one if abs(v) > eps else zero)
                ci = c[i]
                d = np.float32(ci if ci > 1 else 1)
                term = term * f if use_factors and ci == 1 else term / d
                acc[i] = term if t == 0 else acc[i] + term
        bb = base[b0 : b0 + m]
        for i in range(m):
            bb[i] = bb[i] + acc[i]


@_njit
def _select_mask(xs, v, thr, left):
    # keep entry i of every xs[t] where v[i] >= thr, at most left[0] of those tied at thr (the first ones in index
    # order; left[0] < 0: all of them), else xs[t][i]·0; left[0] is updated (merging.methods.sce._Selection.mask)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    T = len(xs)
    keep = np.empty(_BLOCK, dtype=np.float32)
    lt = left[0]
    for b0 in range(0, v.size, _BLOCK):
        vb = v[b0 : b0 + _BLOCK]
        m = vb.size
        ties = 0
        for i in range(m):
            keep[i] = one if vb[i] >= thr else zero
            ties += vb[i] == thr
        if lt >= 0 and ties > 0:
            if ties <= lt:
                lt -= ties
            else:
                for i in range(m):
                    if vb[i] == thr:
                        if lt > 0:
                            lt -= 1
                        else:
                            keep[i] = zero
        for t in range(T):
            xt = xs[t][b0 : b0 + m]
            for i in range(m):
                xt[i] = xt[i] * keep[i]
    left[0] = lt


@_njit
def _sce_combine(base, xs, w):
    # merging.methods.sce's merge step, in place on base: the elected sign γ = sign of Σ_t τ_t (+ for >= 0; torch's
    # sum starts from +0), e_t = w_t·[sign(τ_t) = γ], θ = θ_0 + Σ_t τ_t e_t / max(Σ_t e_t, 1e-6), sums in model order
    T = len(xs)
    n = base.size
    x = np.empty((T, _BLOCK), dtype=np.float32)
    tmp = np.empty((3, _BLOCK), dtype=np.float32)
    for b0 in range(0, n, _BLOCK):
        m = min(_BLOCK, n - b0)
        for t in range(T):
            src = xs[t][b0 : b0 + m]
            xt = x[t]
            for i in range(m):
                xt[i] = src[i]
        _sce_block(base[b0 : b0 + m], x, w, tmp, m)


@_njit
def _sce_combine_packed(base, xs, xb, raw, bits, w):
    # _sce_combine on the task vectors masked by SCE's selection, given as bits (bit i % 8 of byte i // 8: entry i
    # selected): each entry is x·1 or x·0, as merging.methods.sce._Selection.apply_ masks them. With `raw` the task
    # vectors come as bfloat16 bits (xb), decoded a block at a time against base (before it is updated)
    T = len(xb) if raw else len(xs)
    n = base.size
    buf = np.empty(_BLOCK, dtype=np.float32)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    x = np.empty((T, _BLOCK), dtype=np.float32)
    tmp = np.empty((3, _BLOCK), dtype=np.float32)
    keep = np.empty(_BLOCK, dtype=np.float32)
    for b0 in range(0, n, _BLOCK):  # b0 is a multiple of 8: its bits start at byte b0 // 8
        m = min(_BLOCK, n - b0)
        bb = bits[b0 // 8 : (b0 + m + 7) // 8]
        for i in range(m):
            keep[i] = one if (bb[i >> 3] >> (i & 7)) & 1 else zero
        for t in range(T):
            src = _load(xs, xb, base, raw, t, b0, m, buf)
            xt = x[t]
            for i in range(m):
                xt[i] = src[i] * keep[i]
        _sce_block(base[b0 : b0 + m], x, w, tmp, m)


@_njit
def _sce_block(bb, x, w, tmp, m):
    # one block of _sce_combine: x holds the T task vectors' entries, bb the base's (updated in place)
    T = x.shape[0]
    one = np.float32(1.0)
    zero = np.float32(0.0)
    floor = np.float32(1e-6)
    s = tmp[0]
    num = tmp[1]
    den = tmp[2]
    for i in range(m):
        s[i] = zero
        num[i] = zero
        den[i] = zero
    for t in range(T):
        xt = x[t]
        for i in range(m):
            s[i] = s[i] + xt[i]
    for t in range(T):
        xt = x[t]
        wt = w[t]
        for i in range(m):
            v = xt[i]
            g = one if s[i] >= zero else -one
            sv = one if v > zero else (-one if v < zero else (v if v != v else zero))  # torch.sign
            e = wt * (one if sv == g else zero)
            num[i] = num[i] + v * e
            den[i] = den[i] + e
    for i in range(m):
        d = den[i]
        bb[i] = bb[i] + num[i] / (floor if d < floor else d)


@_njit
def _sfc64_words(state, words, nw):
    # numpy's SFC64 step (state = a, b, c, counter): nw raw 64-bit outputs into `words`
    a, b, c, w = state[0], state[1], state[2], state[3]
    one = np.uint64(1)
    for j in range(nw):
        r = a + b + w
        w += one
        a = b ^ (b >> np.uint64(11))
        b = c + (c << np.uint64(3))
        c = ((c << np.uint64(24)) | (c >> np.uint64(40))) + r
        words[j] = r
    state[0], state[1], state[2], state[3] = a, b, c, w


@_jit(fastmath={"reassoc", "nsz"})
def _abs_sums(v, kept_if, cut):
    # (sum |v|, sum |v * keep|) in float64. Reassociation lets LLVM vectorise the sums (the order of the
    # additions then depends on the vector width: a float64 sum of float32 values changes by ~1e-16 relative)
    before = 0.0
    after = 0.0
    for i in range(v.size):
        x = abs(np.float64(v[i]))
        before += x
        after += x * np.float64(kept_if[i] < cut)
    return before, after


@_njit
def _dare_drop(x, state, cut, sums, apply, op, factor):
    # one 64-bit word per two elements, read as two signed 32-bit uniforms in memory order (the low half
    # first on a little-endian machine), exactly as `merging.methods._gta.dare_keep` views numpy's words
    words = np.empty(_BLOCK // 2, dtype=np.uint64)
    u = words.view(np.int32)
    zero = np.float32(0.0)
    onef = np.float32(1.0)
    before = 0.0
    after = 0.0
    for b0 in range(0, x.size, _BLOCK):
        blk = x[b0 : b0 + _BLOCK]
        m = blk.size
        _sfc64_words(state, words, (m + 1) // 2)
        if sums:
            b, a = _abs_sums(blk, u, cut)
            before += b
            after += a
        if apply:
            for i in range(m):
                kept = blk[i] * (onef if u[i] < cut else zero)  # tau * keep, as the reference multiplies by the mask
                if op == 1:
                    kept = kept * factor
                elif op == 2:
                    kept = kept / factor
                blk[i] = kept
    return before, after


@_njit
def _radix_argsort(keys, idx, k2, i2, cnt):
    # stable LSD radix sort of (keys, idx) by the uint32 keys, 8 bits a pass; a pass whose digit is the same for
    # every key is skipped. Returns the sorted (keys, idx): either the inputs or the scratch arrays.
    L = keys.size
    src_k, src_i, dst_k, dst_i = keys, idx, k2, i2
    for shift in (0, 8, 16, 24):
        sh = np.uint32(shift)
        for d in range(256):
            cnt[d] = 0
        for j in range(L):
            cnt[(src_k[j] >> sh) & np.uint32(255)] += 1
        skip = False
        for d in range(256):
            skip |= cnt[d] == L
        if skip:
            continue
        total = 0
        for d in range(256):
            c = cnt[d]
            cnt[d] = total
            total += c
        for j in range(L):
            d = (src_k[j] >> sh) & np.uint32(255)
            pos = cnt[d]
            cnt[d] = pos + 1
            dst_k[pos] = src_k[j]
            dst_i[pos] = src_i[j]
        src_k, src_i, dst_k, dst_i = dst_k, dst_i, src_k, src_i
    return src_k, src_i


@_njit
def _della_mask(x, L, rest, c1, c2, state, mask, p, want_p):
    # DELLA's MagPrune on a chunk of whole dimension-0 slices (merging.methods._sparsifiers: della_ranks, then
    # della_keep, then τ·mask), in place: the rank of |x| along dimension 1 (stable: ties by index), the keep
    # probability c1 + rank/(L − 1)·c2 (float64), one 32-bit uniform per element from the SFC64 stream as
    # `dare_keep` views it, kept iff u < round(p·2^32) − 2^31; the mask goes to `mask`, p to `p` when `want_p`
    n = x.size
    xi = x.view(np.int32)
    ranks = np.empty(n, dtype=np.int32)
    keys = np.empty(L, dtype=np.uint32)
    idx = np.empty(L, dtype=np.int32)
    k2 = np.empty(L, dtype=np.uint32)
    i2 = np.empty(L, dtype=np.int32)
    cnt = np.empty(256, dtype=np.int64)
    slab = L * rest
    for s0 in range(0, n, slab):
        for r in range(rest):
            b = s0 + r
            for j in range(L):
                keys[j] = np.uint32(xi[b + j * rest] & _ABS)  # |x| as bits: monotone for non-negative floats
                idx[j] = j
            _, order = _radix_argsort(keys, idx, k2, i2, cnt)
            for pos in range(L):
                ranks[b + order[pos] * rest] = pos
    words = np.empty(_BLOCK // 2, dtype=np.uint64)
    u = words.view(np.int32)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    span = np.float64(L - 1)
    for b0 in range(0, n, _BLOCK):
        m = min(_BLOCK, n - b0)
        _sfc64_words(state, words, (m + 1) // 2)
        for i in range(m):
            q = 0.5 if L == 1 else min(max(np.float64(ranks[b0 + i]) / span, 0.0), 1.0)
            pr = c1 + q * c2
            c = np.rint(pr * 4294967296.0)
            if c > 4294967296.0:
                c = 4294967296.0
            k = np.int64(u[i]) < np.int64(c) - np.int64(2147483648)
            mask[b0 + i] = k
            if want_p:
                p[b0 + i] = pr
            x[b0 + i] = x[b0 + i] * (one if k else zero)


@_njit
def _first_mask_mismatch(xs):
    n = xs[0].size
    for b0 in range(0, n, _BLOCK):
        x0 = xs[0][b0 : b0 + _BLOCK]
        for t in range(1, len(xs)):
            xt = xs[t][b0 : b0 + _BLOCK]
            bad = False
            for i in range(x0.size):  # branch-free OR over the block (vectorises); located only on a mismatch
                bad |= (x0[i] == 0) != (xt[i] == 0)
            if bad:
                for i in range(x0.size):
                    if (x0[i] == 0) != (xt[i] == 0):
                        return t, b0 + i
    return -1, -1


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once (llvm.fma.f32): what torch's vectorised `add_(x, alpha=w)` computes."""
    from llvmlite import ir

    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


_BF16_EXP = np.uint16(0x7F80)
_F32_EXP = np.uint32(0x7F800000)


@_njit
def _decode(src, u):
    # bfloat16 bits -> float32 bits in u[:src.size] (a float32 is a bfloat16 with 16 more mantissa bits)
    for i in range(src.size):
        u[i] = np.uint32(src[i]) << np.uint32(16)


@_njit
def _any_nonfinite16(src):
    # _nonfinite16 over a whole array, a block at a time (stops at the first block holding one)
    for b0 in range(0, src.size, _BLOCK):
        if _nonfinite16(src[b0 : b0 + _BLOCK]):
            return True
    return False


@_njit
def _nonfinite16(src):
    # any NaN/inf among bfloat16 bits (exponent all ones), as a branch-free OR that vectorises
    bad = False
    for i in range(src.size):
        bad |= (src[i] & _BF16_EXP) == _BF16_EXP
    return bad


@_njit
def _decode_sub(src, base, out, check):
    # out = float32(bfloat16 bits src) − base, a block at a time (the decode, then the float32 subtraction torch's
    # `x.float().sub_(base)` does); with `check`, True as soon as a bfloat16 NaN/inf is seen (out is then unfinished)
    for b0 in range(0, src.size, _BLOCK):
        sb = src[b0 : b0 + _BLOCK]
        if check and _nonfinite16(sb):
            return True
        _decode_sub_block(sb, base[b0 : b0 + _BLOCK], out[b0 : b0 + _BLOCK])
    return False


@_njit
def _decode_sub_block(src, bb, ob):
    # ob = float32(bfloat16 bits src) − bb over one block
    _decode(src, ob.view(np.uint32))
    for i in range(ob.size):
        ob[i] = ob[i] - bb[i]


@_njit
def _to_bf16(x, out16, check):
    # a float32 chunk rounded to bfloat16 (as torch's cast) block by block; 1 when `check` finds NaN/inf
    none = np.empty(0, dtype=np.float32)
    for b0 in range(0, x.size, _BLOCK):
        if _store(x[b0 : b0 + _BLOCK], out16, none, True, b0, check):
            return 1
    return 0


@_njit
def _store(mx, out16, out32, to_bf16, b0, check):
    # one float32 block into the output at b0: rounded to nearest even bfloat16, as torch's float -> bfloat16
    # (NaN -> 0x7FC0), or copied as float32. Returns True (and writes nothing) when `check` finds NaN/inf.
    m = mx.size
    mxu = mx.view(np.uint32)
    if check:
        bad = False
        for i in range(m):
            bad |= (mxu[i] & _F32_EXP) == _F32_EXP
        if bad:
            return True
    if to_bf16:
        ob = out16[b0 : b0 + m]
        for i in range(m):
            v = mxu[i]
            r = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            ob[i] = np.uint16(0x7FC0) if mx[i] != mx[i] else np.uint16(r)
    else:
        ob32 = out32[b0 : b0 + m]
        for i in range(m):
            ob32[i] = mx[i]
    return False


@_njit
def _raw_accumulate(x, b, mx, wt, t, mode, m):
    # one model's block into the running sum: linear (mode 0) m = x_0·w_0 (x_0 when w_0 == 1), then fma(w_t, x_t, m);
    # task arithmetic (mode 1) m += (x_t − b)·w_t
    one = np.float32(1.0)
    if mode == 0:
        if t == 0:
            if wt == one:
                for i in range(m):
                    mx[i] = x[i]
            else:
                for i in range(m):
                    mx[i] = x[i] * wt
        else:
            for i in range(m):
                mx[i] = _fma(wt, x[i], mx[i])
    else:
        for i in range(m):
            d = (x[i] - b[i]) * wt
            mx[i] = d if t == 0 else mx[i] + d


@_njit
def _raw_finish(mx, b, mode, div_value, divide, lam, scale, m):
    # / div (normalize), · λ, + b (task arithmetic)
    if divide:
        for i in range(m):
            mx[i] = mx[i] / div_value
    if scale:
        for i in range(m):
            mx[i] = mx[i] * lam
    if mode == 1:
        for i in range(m):
            mx[i] = mx[i] + b[i]


@_njit
def _raw_merge(out16, out32, to_bf16, xs, base, has_base, mode, w, div_value, divide, lam, scale, check):
    # Linear (mode 0) or task arithmetic (mode 1) straight from bfloat16 bits (xs: (T, n) uint16, one row per
    # model; base: (n,) uint16), mirroring the torch path op by op in float32:
    #   mode 0 (merging.methods.linear.weighted_average): m = x_0·w_0 (x_0 when w_0 == 1); m = fma(w_t, x_t, m);
    #     m /= div (normalize);
    #   mode 1 (merging.methods._gta.combine, no consensus): m = Σ_t (x_t − b)·w_t in model order; m /= div; m *= λ;
    #     m + b.
    # Returns 0, or 1 when an input (`check`) or the result holds NaN/inf: the caller then reruns the chunk on
    # the torch path, which names the tensor and element in its error.
    T, n = xs.shape
    u = np.empty(_BLOCK, dtype=np.uint32)
    x = u.view(np.float32)
    bu = np.empty(_BLOCK, dtype=np.uint32)
    b = bu.view(np.float32)
    mx = np.empty(_BLOCK, dtype=np.float32)
    for b0 in range(0, n, _BLOCK):
        m = min(_BLOCK, n - b0)
        bad = False
        if has_base and (mode == 1 or check):  # linear reads the base only to check it, as the torch path does
            src = base[b0 : b0 + m]
            _decode(src, bu)
            bad |= check and _nonfinite16(src)
        for t in range(T):
            src = xs[t, b0 : b0 + m]
            _decode(src, u)
            bad |= check and _nonfinite16(src)
            _raw_accumulate(x, b, mx, w[t], t, mode, m)
        if bad:
            return 1
        _raw_finish(mx, b, mode, div_value, divide, lam, scale, m)
        if _store(mx[:m], out16, out32, to_bf16, b0, check):
            return 1
    return 0


@_jit(fastmath={"reassoc", "nsz"})
def _raw_dot3(x0, x1, check):
    # (<x0, x1>, |x0|², |x1|², any NaN/inf) of two bfloat16 bit arrays, summed in float64 (reassociation lets
    # LLVM vectorise the sums; their order then depends on the vector width)
    u0 = np.empty(_BLOCK, dtype=np.uint32)
    u1 = np.empty(_BLOCK, dtype=np.uint32)
    f0 = u0.view(np.float32)
    f1 = u1.view(np.float32)
    dot = 0.0
    n0 = 0.0
    n1 = 0.0
    bad = False
    for b0 in range(0, x0.size, _BLOCK):
        a = x0[b0 : b0 + _BLOCK]
        b = x1[b0 : b0 + _BLOCK]
        _decode(a, u0)
        _decode(b, u1)
        bad |= check and (_nonfinite16(a) or _nonfinite16(b))
        for i in range(a.size):
            p = np.float64(f0[i])
            q = np.float64(f1[i])
            dot += p * q
            n0 += p * p
            n1 += q * q
    return dot, n0, n1, bad


@_njit
def _raw_lerp(out16, out32, to_bf16, x0, x1, c0, c1, check):
    # out = fma(c1, x1, x0·c0) in float32 (the torch path's `base.mul_(c0).add_(v1, alpha=c1)`), from bfloat16
    # bits, rounded to bfloat16 (or kept float32) in the same loop; 1 when the result holds NaN/inf (`check`)
    u0 = np.empty(_BLOCK, dtype=np.uint32)
    u1 = np.empty(_BLOCK, dtype=np.uint32)
    f0 = u0.view(np.float32)
    f1 = u1.view(np.float32)
    mx = np.empty(_BLOCK, dtype=np.float32)
    for b0 in range(0, x0.size, _BLOCK):
        a = x0[b0 : b0 + _BLOCK]
        b = x1[b0 : b0 + _BLOCK]
        m = a.size
        _decode(a, u0)
        _decode(b, u1)
        for i in range(m):
            mx[i] = _fma(c1, f1[i], f0[i] * c0)
        if _store(mx[:m], out16, out32, to_bf16, b0, check):
            return 1
    return 0
