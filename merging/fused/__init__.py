"""Fused CPU loops for the TIES/DARE-family merges, RAM, SCE and the soup's mask check, compiled with numba.

The torch code in `merging/methods/` (`_gta.py`, `_kth_largest.py`, `_sparsifiers.py`, `_ram.py`, `sce.py`,
`soup.py`) is the reference: chains of whole-chunk ops (trim, weight, sum, elect, agree, divide; abs, compare,
count; draw, mask, rescale) that read and write every element ~15 times per model. The loops here do the same
float32 (and, for DELLA's probabilities, float64) arithmetic in the same order, one block of elements at a time:

- `gta_combine`: TIES's trim (exactly k kept, ties by index) or Model Breadcrumbs' magnitude-rank window
  (`breadcrumbs`, `breadcrumbs_ties`) + weights + sign election + disjoint mean (or plain sum) + λ + base;
- `window_`: the breadcrumbs window alone, in place (where a rescale needs the masked task vector first);
- `ram_counts`, `ram_combine`: RAM's change counts and its merge (`ram`, `ramplus_tl`);
- `select_mask_`, `sce_combine`: SCE's variance selection; its sign election, erase and weighted mean;
- `band`, `band2`: one pass of TIES's threshold search (count above the bracket, collect the values inside it), for
  one bracket or two (breadcrumbs' two edges);
- `dare_drop`: DARE's random drop, drawing numpy's SFC64 stream inside the loop, and its rescale;
- `della_mask_`: DELLA's per-row magnitude ranks (a radix sort per row) and its rank-dependent random drop;
- `first_mask_mismatch`: the soup's shared-zero-mask check;
- `to_bf16`: a merged chunk checked for NaN/inf and rounded to bfloat16 in one pass (the streamed merges' output);
- `decode_sub`: a task-vector chunk straight from a bfloat16 file (decode and subtract the base in one pass), the
  reader's path for every method that takes task vectors;
- `raw_merge`: linear and task arithmetic straight from bfloat16 inputs (the executor's fast path for them):
  one pass that decodes, checks, combines and rounds to the output dtype; `raw_dot3` and `raw_lerp` do the
  same for slerp (its norms and dot product are summed in float64 here, in float32 chunks on the torch path,
  so slerp's two paths agree to float32 rounding, not bit for bit).

`band`, `band2`, `gta_combine`, `sce_combine_packed` and `merging.fused._stats.sce_count` also read task vectors
as a bfloat16 file's raw bits (`RawDelta`), decoding a block at a time: the reader hands a streamed tensor's
chunks over that way where the method asks for it (`MergeMethod.raw_ok`).

Their float32 results are bit-identical to the reference (tests/test_fused.py, on random inputs with signed
zeros and ties). One caveat: DARE's L1 rescale sums |τ| in float64 in both paths but in a different order
(vectorised here), so its float32 factor could differ in the last bit if the two sums straddle a rounding
boundary (they differ by ~1e-16 relative).

They are used when numba is installed (a dependency of the project; it is imported by the first loop that runs,
from `merging/fused/_loops.py`); `PEFT_LAB_FUSED=0` in the environment, or
`merging.fused.ENABLED = False`, selects the torch reference instead. Compiled code is cached on disk by
numba (`cache=True`), so only the first run on a machine pays the compile (~1-2 s per kernel).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "ENABLED",
    "RawDelta",
    "available",
    "band",
    "band2",
    "dare_drop",
    "decode_sub",
    "della_mask_",
    "first_mask_mismatch",
    "nonfinite16",
    "gta_combine",
    "raw_dot3",
    "raw_lerp",
    "raw_merge",
    "ram_combine",
    "ram_counts",
    "sce_combine",
    "sce_combine_packed",
    "tensors",
    "to_bf16",
    "select_mask_",
    "window_",
]

ENABLED = os.environ.get("PEFT_LAB_FUSED", "1") != "0"

_HAVE_NUMBA = importlib.util.find_spec("numba") is not None  # numba is imported only when a loop first runs


def available() -> bool:
    """True when the fused loops are to be used (numba installed and not switched off)."""
    return ENABLED and _HAVE_NUMBA


def _compiled():
    from merging.fused import _loops

    return _loops


_local = threading.local()  # per-thread scratch buffers for `band` and `band2`


class RawDelta:
    """A task-vector chunk not yet decoded: a bfloat16 file's raw bits and the float32 base chunk to subtract (the
    reader hands these to a method that asks for them, `MergeMethod.raw_ok`). The fused loops decode a block at a
    time where they read it, so no float32 copy of the chunk is written and read back; `tensor()` decodes it whole
    (`decode_sub`, bit for bit the reader's float32 task vector) for any other use."""

    __slots__ = ("bits", "base", "_tensor")

    def __init__(self, bits: np.ndarray, base: torch.Tensor):
        self.bits, self.base, self._tensor = bits, base, None

    def numel(self) -> int:
        return int(self.bits.size)

    def tensor(self) -> torch.Tensor:
        """The float32 task vector (decoded once)."""
        if self._tensor is None:
            self._tensor = decode_sub(self.bits, self.base, check=False)
        return self._tensor


def tensors(xs) -> list[torch.Tensor]:
    """`xs` with every `RawDelta` decoded (`RawDelta.tensor`)."""
    return [x.tensor() if isinstance(x, RawDelta) else x for x in xs]


def loop_inputs(xs, base: torch.Tensor | None = None):
    """Task vectors as the loops that read either kind take them: (float32 arrays, bfloat16 bit arrays, base array,
    raw). Raw only when all are `RawDelta`s (their bits are decoded against `base`, by default their own)."""
    if xs and all(isinstance(x, RawDelta) for x in xs):
        b = xs[0].base if base is None else base
        return (_NONE32,), tuple(x.bits for x in xs), b.reshape(-1).contiguous().numpy(), True
    arrs = tuple(x.reshape(-1).contiguous().numpy() for x in tensors(xs))
    return arrs, (_NONE16,), _NONE32, False


_NONE32 = np.empty(0, dtype=np.float32)
_NONE16 = np.empty(0, dtype=np.uint16)


def band(x: torch.Tensor | RawDelta, lo: float, hi: float) -> tuple[int, torch.Tensor | int]:
    """One pass over `x` for TIES's threshold search: (#{|x| > hi}, the values of |x| in [lo, hi], in order). When
    lo == hi the values are all equal and only their count is returned (an int)."""
    xf, xb, b, raw = loop_inputs([x])
    collect = lo != hi
    scratch = _scratch("scratch", x.numel() if collect else 0)[0]
    above, m = _compiled()._band(xf, xb, b, raw, np.int32(_bits(lo)), np.int32(_bits(hi)), scratch, collect)
    return int(above), _inside(scratch, m, collect)


def band2(
    x: torch.Tensor | RawDelta, lo1: float, hi1: float, lo2: float, hi2: float
) -> tuple[int, torch.Tensor | int, int, torch.Tensor | int]:
    """`band` for two brackets in one pass over `x`: (above1, values in [lo1, hi1], above2, values in [lo2, hi2])."""
    xf, xb, b, raw = loop_inputs([x])
    c1, c2 = lo1 != hi1, lo2 != hi2
    b1, b2 = _scratch("scratch2", x.numel() if c1 or c2 else 0)
    k = [np.int32(_bits(v)) for v in (lo1, hi1, lo2, hi2)]
    a1, m1, a2, m2 = _compiled()._band2(xf, xb, b, raw, *k, b1, b2, c1, c2)
    return int(a1), _inside(b1, m1, c1), int(a2), _inside(b2, m2, c2)


def _bits(v: float) -> int:
    return int(torch.tensor(v, dtype=torch.float32).view(torch.int32))


def _scratch(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two per-thread int32 scratch buffers of at least n + 1 entries, grown to the largest chunk seen."""
    bufs = getattr(_local, name, None)
    if bufs is None or bufs[0].size < n + 1:
        bufs = (np.empty(n + 1, dtype=np.int32), np.empty(n + 1, dtype=np.int32))
        setattr(_local, name, bufs)
    return bufs


def _inside(buf: np.ndarray, m: int, collected: bool) -> torch.Tensor | int:
    return torch.from_numpy(buf[:m].copy()).view(torch.float32) if collected else int(m)


def gta_combine(
    base: torch.Tensor | None,
    xs: Sequence[torch.Tensor | RawDelta],
    thresholds: Sequence[float],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    zero_sign: float = 1.0,
    tie_budgets: list[int | None] | None = None,
    windows: Sequence[WindowSpec | None] | None = None,
) -> torch.Tensor:
    """`merging.methods._gta.combine` with TIES's trim folded in: `xs` are the (unweighted) task-vector chunks, each
    trimmed to |x| >= its threshold (0: no trim) and multiplied by its weight in the loop. `tie_budgets[t]`
    (None: no limit) is how many of the entries tied at model t's threshold may still be kept: the first ones in
    index order are, the rest are trimmed, and the list is updated in place to what is left after this chunk
    (TIES keeping exactly k entries of a tensor streamed in chunks). `windows[t]`, when given, masks model t by
    Model Breadcrumbs' rank window instead of a threshold (the arguments of `window_`, whose `seen` is updated),
    in the same loop. `xs` may be `RawDelta`s taken from `base`: decoded in the loop. Inputs are not modified.
    Returns a new float32 tensor."""
    n = xs[0].numel()
    T = len(xs)
    if base is None and any(isinstance(x, RawDelta) for x in xs):
        xs = tensors(xs)
    xf, xb, _, raw = loop_inputs(xs, base)
    win = np.zeros(T, dtype=np.bool_)
    wf = np.zeros((T, 2), dtype=np.float32)
    wi = np.zeros((T, 6), dtype=np.int64)
    for t, spec in enumerate(windows or ()):
        if spec is not None:
            win[t] = True
            wf[t], wi[t] = _window_args(*spec)
    out = torch.empty(n, dtype=torch.float32)
    thr = np.array([max(float(t), 0.0) for t in thresholds], dtype=np.float32)
    budgets = tie_budgets if tie_budgets is not None else [None] * len(xs)
    left = np.array([-1 if b is None else int(b) for b in budgets], dtype=np.int64)
    w = np.array(weights, dtype=np.float32)
    div_mode, div_value = 2, np.float32(1.0)  # 2: no division
    if normalize and consensus:
        if min(weights) > 0:
            div_mode, div_value = 0, np.float32(min(weights) / 2)
        else:
            div_mode = 1
    elif normalize:
        d = float(sum(weights))
        if abs(d) >= 1e-8:  # mergekit leaves the sum undivided when the weights cancel
            div_mode, div_value = 1, np.float32(d)
    b = base.reshape(-1).contiguous().numpy() if base is not None else out.numpy()
    _compiled()._gta_combine(
        out.numpy(),
        b,
        base is not None,
        xf,
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
        np.float32(lam),
        lam != 1,
        zero_sign < 0,
    )
    if tie_budgets is not None:
        for t, b in enumerate(tie_budgets):
            if b is not None:
                tie_budgets[t] = int(left[t])
    for t, spec in enumerate(windows or ()):
        if spec is not None:
            spec[4][0], spec[4][1] = int(wi[t, 4]), int(wi[t, 5])
    return out


def dare_drop(
    x: torch.Tensor,
    g: np.random.SFC64,
    density: float,
    *,
    apply: bool,
    sums: bool = True,
    op: int = 0,
    factor: float = 1.0,
) -> tuple[float, float]:
    """DARE's random drop on a flat float32 chunk with the mask stream `g` (advanced past it, as
    `merging.methods._gta.dare_keep` would): returns the L1 norms of `x` before and after the drop (float64 sums;
    zeros unless `sums`);
    with `apply`, `x` is overwritten in place with `x * keep`, then multiplied (`op=1`) or divided (`op=2`)
    by `factor`."""
    st = g.state
    state = st["state"]["state"].copy()
    cut = min(round(density * 2**32), 2**32) - 2**31
    before, after = _compiled()._dare_drop(
        x.reshape(-1).numpy(), state, np.int64(cut), sums, apply, op, np.float32(factor)
    )
    g.state = {**st, "state": {"state": state}}
    return float(before), float(after)


def window_(x: torch.Tensor, lo: float, hi: float | None, lo_window: tuple[int, int], hi_first: int, seen: list[int]):
    """Model Breadcrumbs' magnitude-rank window on a flat float32 chunk, in place (one pass; see
    `merging.methods._sparsifiers.Window.apply_`, the reference): keep lo < |x| < hi (no upper edge when `hi` is
    None); of the entries tied at lo, those whose position among all tied ones lies in `lo_window` = [first, stop);
    of those tied at hi, positions >= `hi_first`. `seen` = [ties at lo, ties at hi] counted in earlier chunks,
    updated. With lo == hi pass `hi=None` and that run's window in `lo_window`."""
    lo_hi, wi = _window_args(lo, hi, lo_window, hi_first, seen)
    _compiled()._window(x.reshape(-1).numpy(), lo_hi[0], lo_hi[1], wi)
    seen[0], seen[1] = int(wi[4]), int(wi[5])
    return x


WindowSpec = tuple[
    float, "float | None", tuple[int, int], int, list[int]
]  # window_'s lo, hi, lo_window, hi_first, seen


def _window_args(lo, hi, lo_window, hi_first, seen) -> tuple[np.ndarray, np.ndarray]:
    """A window as the loops take it: float32 (lo, hi) and int64 (has_hi, lo_first, lo_stop, hi_first, seen_lo,
    seen_hi)."""
    f = np.array([lo, 0.0 if hi is None else hi], dtype=np.float32)
    i = np.array([hi is not None, lo_window[0], lo_window[1], hi_first, seen[0], seen[1]], dtype=np.int64)
    return f, i


def ram_counts(xs: Sequence[torch.Tensor], epsilon: float) -> tuple[list[int], list[int]]:
    """`merging.methods._ram.ram_counts` in one pass: per model, its changed entries (|x| > epsilon) that another
    model changes too, and those only it changes."""
    shared = np.zeros(len(xs), dtype=np.int64)
    unique = np.zeros(len(xs), dtype=np.int64)
    _compiled()._ram_counts(tuple(x.reshape(-1).contiguous().numpy() for x in xs), np.float32(epsilon), shared, unique)
    return shared.tolist(), unique.tolist()


def ram_combine(
    base: torch.Tensor, xs: Sequence[torch.Tensor], epsilon: float, factors: Sequence[float] | None
) -> torch.Tensor:
    """`merging.methods._ram.ram_combine` in one pass, in place on the flat float32 `base` (returned); `xs` are not
    modified."""
    f = np.array(factors if factors is not None else [1.0] * len(xs), dtype=np.float32)
    _compiled()._ram_combine(
        base.reshape(-1).numpy(),
        tuple(x.reshape(-1).contiguous().numpy() for x in xs),
        np.float32(epsilon),
        f,
        factors is not None,
    )
    return base


def select_mask_(xs: Sequence[torch.Tensor], v: torch.Tensor, threshold: float, tie_budget: int | None) -> int | None:
    """Multiply every flat float32 chunk of `xs` in place by the mask `v >= threshold`, keeping only the first
    `tie_budget` entries tied at the threshold (None: all); returns the budget left."""
    left = np.array([-1 if tie_budget is None else tie_budget], dtype=np.int64)
    _compiled()._select_mask(
        tuple(x.reshape(-1).numpy() for x in xs), v.reshape(-1).contiguous().numpy(), np.float32(threshold), left
    )
    return None if tie_budget is None else int(left[0])


def sce_combine(base: torch.Tensor, xs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """SCE's erase-and-merge step (`merging.methods.sce.Sce.merge_chunk`'s torch ops) in one pass, in place on the
    flat float32 `base` (returned)."""
    _compiled()._sce_combine(
        base.reshape(-1).numpy(),
        tuple(x.reshape(-1).contiguous().numpy() for x in xs),
        np.array(weights, dtype=np.float32),
    )
    return base


def sce_combine_packed(
    base: torch.Tensor, xs: Sequence[torch.Tensor | RawDelta], bits: np.ndarray, weights: Sequence[float]
) -> torch.Tensor:
    """`sce_combine` on the task vectors masked by a selection given as bits (bit i % 8 of byte i // 8: entry i
    kept), in the same pass (`select_mask_` then `sce_combine` give the same bits); `xs` are not modified."""
    xf, xb, _, raw = loop_inputs(xs, base)  # raw: decoded against base, block by block, before it is updated
    _compiled()._sce_combine_packed(base.reshape(-1).numpy(), xf, xb, raw, bits, np.array(weights, dtype=np.float32))
    return base


def della_mask_(
    x: torch.Tensor, L: int, rest: int, c1: float, c2: float, g: np.random.SFC64, *, want_p: bool
) -> tuple[np.ndarray, torch.Tensor | None]:
    """DELLA's MagPrune on a flat float32 chunk of whole dimension-0 slices, each L × rest, ranks along L, in place
    (`merging.methods._sparsifiers`: `della_ranks`, `della_keep`, then τ·mask, are the reference): keep
    probabilities c1 + c2·rank/(L − 1), drawn from `g` (advanced past the chunk as `della_keep` would). Returns the
    keep mask (numpy bool) and, with `want_p`, the probabilities (float64)."""
    n = x.numel()
    st = g.state
    state = st["state"]["state"].copy()
    mask = np.empty(n, dtype=np.bool_)
    p = np.empty(n if want_p else 0, dtype=np.float64)
    _compiled()._della_mask(
        x.reshape(-1).numpy(), int(L), int(rest), float(c1), float(c2), state, mask, p, bool(want_p)
    )
    g.state = {**st, "state": {"state": state}}
    return mask, (torch.from_numpy(p) if want_p else None)


def nonfinite16(bits: np.ndarray) -> bool:
    """Whether bfloat16 bits (uint16) hold a NaN or inf."""
    return bool(_compiled()._any_nonfinite16(bits))


def decode_sub(bits: np.ndarray, base: torch.Tensor, *, check: bool) -> torch.Tensor | None:
    """float32(bfloat16 `bits`) − `base` (flat float32) in one pass: a task-vector chunk straight from a bfloat16
    file's raw bits, bit-identical to `x.float().sub_(base)`. None when `check` finds a NaN/inf in `bits` (the
    caller's torch path then raises the error that names it)."""
    out = torch.empty(bits.size, dtype=torch.float32)
    if _compiled()._decode_sub(bits, base.reshape(-1).numpy(), out.numpy(), check):
        return None
    return out


def to_bf16(x: torch.Tensor, *, check: bool) -> torch.Tensor | None:
    """A flat float32 chunk rounded to bfloat16, bit for bit as `x.to(torch.bfloat16)`, in one pass that also checks
    for NaN/inf (`check`): None when it finds one (the caller's torch path then raises the error that names it)."""
    out = np.empty(x.numel(), dtype=np.uint16)
    if _compiled()._to_bf16(x.reshape(-1).contiguous().numpy(), out, check):
        return None
    return torch.from_numpy(out).view(torch.bfloat16)


def first_mask_mismatch(xs: Sequence[torch.Tensor]) -> tuple[int, int]:
    """The first (model, flat index) whose zero pattern differs from model 0's (`x == 0`, so -0 is a zero and
    NaN is not), or (-1, -1) when all share it: one pass, without materialising the masks."""
    t, i = _compiled()._first_mask_mismatch(tuple(x.reshape(-1).contiguous().numpy() for x in xs))
    return int(t), int(i)


RAW_MODES = {"linear": 0, "task_arithmetic": 1}


def raw_merge(
    xs: np.ndarray,
    base: np.ndarray | None,
    mode: str,
    weights: Sequence[float],
    *,
    normalize: bool,
    lam: float = 1.0,
    out_dtype: torch.dtype = torch.bfloat16,
    check: bool = True,
) -> torch.Tensor | None:
    """Linear or task arithmetic in one pass straight from bfloat16 bits, with the same float32 results as the
    torch path (`merging.methods.linear.weighted_average`, `merging.methods._gta.combine` on x_t − base): no float32
    copies of the inputs, no delta pass, and the rounding to the output dtype in the same loop.

    Args:
        xs: (T, n) uint16, the models' bfloat16 bits, one row per model (for task arithmetic: the fine-tuned
            models; the base comes separately).
        base: (n,) uint16 bfloat16 bits, or None (linear only: there it is only checked, as the torch path does).
        mode: "linear" or "task_arithmetic".
        weights: the T per-model weights.
        normalize, lam: the method's parameters (`lam` only for task arithmetic).
        out_dtype: torch.bfloat16 or torch.float32.
        check: refuse NaN/inf: return None when an input or the result holds one (the caller reruns the chunk
            on the torch path, whose error names the tensor and element).
    Returns:
        A new (n,) tensor of `out_dtype`, or None (see `check`).
    """
    T, n = xs.shape
    code = RAW_MODES[mode]
    divide, div_value = False, np.float32(1.0)
    if normalize:
        d = float(sum(weights))
        if code == 0 or abs(d) >= 1e-8:  # task arithmetic: mergekit leaves the sum undivided when weights cancel
            divide, div_value = True, np.float32(d)
    to_bf16, out16, out32 = _raw_out(n, out_dtype)
    b = base if base is not None else out16[:0]
    status = _compiled()._raw_merge(
        out16,
        out32,
        to_bf16,
        xs,
        b,
        base is not None,
        code,
        np.asarray(weights, dtype=np.float32),
        div_value,
        divide,
        np.float32(lam),
        lam != 1,
        check,
    )
    return None if status else _raw_tensor(out16, out32, to_bf16)


def _raw_out(n: int, out_dtype: torch.dtype) -> tuple[bool, np.ndarray, np.ndarray]:
    """(bfloat16 output?, the uint16 output, the float32 output): the one not used is empty."""
    to_bf16 = out_dtype == torch.bfloat16
    return to_bf16, np.empty(n if to_bf16 else 0, dtype=np.uint16), np.empty(0 if to_bf16 else n, dtype=np.float32)


def _raw_tensor(out16: np.ndarray, out32: np.ndarray, to_bf16: bool) -> torch.Tensor:
    return torch.from_numpy(out16).view(torch.bfloat16) if to_bf16 else torch.from_numpy(out32)


def raw_dot3(x0: np.ndarray, x1: np.ndarray, *, check: bool = True) -> tuple[float, float, float] | None:
    """(<x0, x1>, |x0|², |x1|²) of two bfloat16 bit arrays (uint16), summed in float64; None when `check` and
    either holds NaN/inf. (The torch path sums in float32 per chunk, so the two differ in the last bits.)"""
    dot, n0, n1, bad = _compiled()._raw_dot3(x0, x1, check)
    return None if bad else (float(dot), float(n0), float(n1))


def raw_lerp(
    x0: np.ndarray, x1: np.ndarray, c0: float, c1: float, *, out_dtype: torch.dtype = torch.bfloat16, check: bool = True
) -> torch.Tensor | None:
    """c0·x0 + c1·x1 from bfloat16 bits, computed as the torch path's `x0.mul_(c0).add_(x1, alpha=c1)` (float32,
    one fused multiply-add), as a new tensor of `out_dtype` (bfloat16 or float32); None when `check` and the
    result holds NaN/inf."""
    to_bf16, out16, out32 = _raw_out(x0.size, out_dtype)
    if _compiled()._raw_lerp(out16, out32, to_bf16, x0, x1, np.float32(c0), np.float32(c1), check):
        return None
    return _raw_tensor(out16, out32, to_bf16)


def warm() -> None:
    """Compile (or load from numba's cache) every loop for 1-4 models, e.g. before timing a merge."""
    x = torch.linspace(-1, 1, 64)
    for T in range(1, 5):
        for consensus in (False, True):
            gta_combine(x, [x] * T, [0.5] * T, [1.0] * T, consensus=consensus, normalize=True, lam=1.0)
        first_mask_mismatch([x] * T)
    band(x, 0.25, 0.5)
    band2(x, 0.25, 0.5, 0.1, 0.2)
    window_(x.clone(), 0.25, 0.5, (0, 1), 0, [0, 0])
    for T in range(1, 5):
        ram_counts([x] * T, 1e-5)
        ram_combine(x.clone(), [x] * T, 1e-5, [1.0] * T)
        ram_combine(x.clone(), [x] * T, 1e-5, None)
        sce_combine(x.clone(), [x] * T, [1.0 / T] * T)
        sce_combine_packed(x.clone(), [x] * T, np.full(8, 0x5A, dtype=np.uint8), [1.0 / T] * T)
        select_mask_([x.clone()] * T, x.abs(), 0.5, None)
    dare_drop(x.clone(), np.random.SFC64(0), 0.5, apply=True)
    della_mask_(x.clone(), 8, 1, 0.4, 0.2, np.random.SFC64(0), want_p=True)
    decode_sub(x.to(torch.bfloat16).view(torch.uint16).numpy(), x, check=True)
    bits = x.to(torch.bfloat16).view(torch.uint16).numpy()
    for mode in RAW_MODES:
        for out_dtype in (torch.bfloat16, torch.float32):
            raw_merge(np.stack([bits, bits]), bits, mode, [0.5, 0.5], normalize=True, lam=0.5, out_dtype=out_dtype)
    for out_dtype in (torch.bfloat16, torch.float32):
        raw_lerp(bits, bits, 0.5, 0.5, out_dtype=out_dtype)
    raw_dot3(bits, bits)
    to_bf16(x, check=True)
