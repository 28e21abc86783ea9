"""The exact k-th largest value of a long non-negative stream, in a few cheap passes (TIES trimming).

TIES keeps the entries of a task vector whose magnitude is at least the k-th largest. `torch.topk` and
`torch.kthvalue` cost 14-24 ns per element on this machine (one thread, 4M-element tensors) and need the
whole vector in memory; the threshold alone is much cheaper to get exactly (~3 ns per element):

1. a sample of the values (any representative subset, each value weighted by 1 / its sampling rate)
   brackets the k-th largest: `[lo, hi]` around the sample's estimate, `z` binomial standard deviations wide;
2. one pass over all values counts those above `hi` (surely kept) and those inside `[lo, hi]`, by exact
   value: for non-negative floats the int32 bit pattern is monotone in the value, so a histogram over the
   bit patterns between lo and hi (a few hundred thousand bins for a percent-wide bracket) holds exact
   counts without storing the values; brackets too wide for that keep the values themselves;
3. the threshold is the (k − above)-th largest of the counted ones. If the bracket missed (bad luck, or a
   sample that does not represent the data), the counts say on which side and exactly how many values lie
   there; the sample restricted to that side brackets again and step 2 repeats.

The result is exact for any input. `count_ge` and `count_eq` say how many values are >= and == the threshold,
so a caller can keep exactly k (mergekit, PEFT) or every value tied at the threshold (the official TIES code).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from merging import fused

__all__ = ["KthLargest", "kth_largest", "select_kth"]

_SAMPLE_CAP = 1 << 18  # values kept from the sample pass (more are thinned)
_HIST_BINS = 1 << 22  # widest bracket counted by a histogram of bit patterns (32 MB of int64 counts)
_SORT_CAP = 1 << 16  # sample values sorted to bracket (more are thinned)
_CANDIDATE_CAP = 1 << 23  # values held at once otherwise (32 MB); past it they are thinned into a new sample


def _key(v: float) -> int:
    """int32 bit pattern of a non-negative float32 (monotone in the value)."""
    return int(torch.tensor(v, dtype=torch.float32).view(torch.int32))


def _value(key: int) -> float:
    return float(torch.tensor(key, dtype=torch.int32).view(torch.float32))


def _next(v: float, toward: float) -> float:
    """The float32 next to `v` toward `toward` (the values compared are float32: a float64 step is lost)."""
    t = torch.tensor(v, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(toward, dtype=torch.float32)))


class KthLargest:
    """Exact k-th largest of `n` non-negative values delivered in passes.

    Usage: `add_sample(values, weight)` over a sample, `bracket()`, then loop `{begin_count(); count(chunk)
    for every chunk; done = resolve()}` until `resolve()` returns True; then read `threshold`.

    The threshold is known to lie in `[L, U]`; a round that does not resolve it narrows `[L, U]` past the
    bracket (or to it) and brackets again inside. When that would not shrink the bracket (a long run of tied
    values), the next bracket is the single value at the estimated rank: a round then either finds the
    threshold there or excludes that value, so every round makes progress.

    Args:
        n: how many values the stream holds.
        k: which largest to find, 1 <= k <= n.
        z: bracket half-width in standard deviations of the sample rank (widen it when a missed bracket is
            expensive, e.g. when a counting round is a pass over a whole model).
        collect: keep the counted values inside the bracket (up to a cap) instead of a histogram of their bit
            patterns, when the fused loops are available: faster (no scattered histogram increments), for a
            round that ends soon (a tensor in memory); streamed rounds keep the bounded histogram.
    """

    def __init__(self, n: int, k: int, z: float = 6.0, *, collect: bool = False):
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
        self.n, self.k, self.z = n, k, z
        self.collect = collect
        self._sample: list[tuple[torch.Tensor, float]] = []
        self._sample_size = 0
        self.L, self.U = 0.0, math.inf  # the threshold lies in [L, U] ...
        self._below_L = self._above_U = 0  # ... with these many values outside it
        self.lo, self.hi = 0.0, math.inf  # this round's bracket: lo <= x <= hi counted, x > hi above
        self.threshold: float | None = None
        self.count_ge = self.count_eq = 0  # once resolved: how many values are >= / == the threshold
        self.rounds = 0

    # -- pass 1: sample -------------------------------------------------------------------------------
    def add_sample(self, values: torch.Tensor, weight: float = 1.0) -> None:
        """Values from a sample in which each stands for `weight` values of the stream."""
        v = values.reshape(-1).float()
        if v.numel() > _SAMPLE_CAP:
            step = -(-v.numel() // _SAMPLE_CAP)
            v, weight = v[::step], weight * step
        self._sample.append((v.clone(), float(weight)))
        self._sample_size += v.numel()
        if self._sample_size > 4 * _SAMPLE_CAP:  # keep memory bounded: thin everything by 2 ...
            # ... keeping each piece's total weight (a piece of one value keeps its value and its weight)
            self._sample = [(s[::2].clone(), w * s.numel() / ((s.numel() + 1) // 2)) for s, w in self._sample]
            self._sample_size = sum(s.numel() for s, _ in self._sample)

    def bracket(self) -> None:
        """Set `[lo, hi]` from the sample (or keep the full range if there is none). The sample is kept
        (bounded) to bracket again if a round misses."""
        if self._sample:
            vals = torch.cat([s for s, _ in self._sample])
            wts = torch.cat([torch.full((s.numel(),), w, dtype=torch.float64) for s, w in self._sample])
            if vals.numel() > _SORT_CAP:  # sorting a million values costs more than the wider bracket of fewer
                step = -(-vals.numel() // _SORT_CAP)
                vals, wts = vals[::step], wts[::step] * step
            # sorted once, descending, with numpy (its SIMD sorts are many times faster than torch's here); values
            # of one weight (the usual sample) need no permutation
            v = vals.numpy()
            if bool((wts == wts[0]).all()):
                vals = torch.from_numpy(np.ascontiguousarray(np.sort(v)[::-1]))
            else:
                order = torch.from_numpy(np.argsort(-v, kind="stable"))
                vals, wts = vals[order], wts[order]
            self._sample = [(vals, wts)]
            self._bracket_at(self.k, self.n)

    def _bracket_at(self, rank: float, count: float, cands: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
        """Bracket the value of `rank` (from the top) among the `count` stream values in [L, U], estimated
        from the sample restricted to [L, U] (or from `cands`). False if it would not narrow the bracket."""
        if cands is None:
            if not self._sample:
                return False
            vals, wts = self._sample[0]
            inside = (vals >= self.L) & (vals <= self.U)
            vals, wts = vals[inside], wts[inside]
        else:
            vals, wts = cands
        m = vals.numel()
        if m == 0:
            return False
        cum = torch.cumsum(wts, 0)
        cum = cum * (count / float(cum[-1]))  # the exact count of the region corrects the sample's weights
        p = min(max(rank / count, 0.0), 1.0)
        margin = self.z * math.sqrt(max(m * p * (1 - p), 1.0)) * (count / m)
        i_hi = int(torch.searchsorted(cum, torch.tensor(rank - margin, dtype=torch.float64)))
        i_lo = int(torch.searchsorted(cum, torch.tensor(rank + margin, dtype=torch.float64)))
        hi = min(float(vals[i_hi - 1]) if i_hi >= 1 else self.U, self.U)
        lo = max(float(vals[i_lo]) if i_lo < m else self.L, self.L)
        if (lo, hi) == (self.lo, self.hi) or lo > hi:
            i_mid = min(int(torch.searchsorted(cum, torch.tensor(rank, dtype=torch.float64))), m - 1)
            v = min(max(float(vals[i_mid]), self.L), self.U)
            if (v, v) == (self.lo, self.hi):
                return False
            lo = hi = v
        self.lo, self.hi = lo, hi
        return True

    # -- pass 2: count ---------------------------------------------------------------------------------
    def begin_count(self) -> None:
        self._above = 0
        self._ncand = 0
        self._hist = None
        self._hist_later = False
        if self.hi < math.inf:
            self._klo, khi = _key(self.lo), _key(self.hi)
            if khi - self._klo < _HIST_BINS:
                if self.collect and fused.available():  # collect the values; a histogram only past the cap
                    self._hist_later = True
                else:
                    self._hist = self._new_hist()
        self._cands: list[torch.Tensor] = []
        self._kept = 0
        self._thin = 1

    def _new_hist(self) -> torch.Tensor:
        """Zero counts, one per float32 bit pattern from lo to hi."""
        return torch.zeros(_key(self.hi) - self._klo + 1, dtype=torch.int64)

    def count(self, values: torch.Tensor) -> None:
        """Count one chunk of the stream (every value exactly once per counting round)."""
        x = values.reshape(-1)
        if self.hi == math.inf:
            c = x[x >= self.lo]
        else:
            above = x > self.hi
            self._above += int(torch.count_nonzero(above))
            c = x[(x >= self.lo).logical_xor_(above)]  # lo <= x <= hi, one comparison fewer
        self._add_inside(c)

    def count_abs(self, x: torch.Tensor | fused.RawDelta) -> None:
        """`count(x.abs())`, in one fused pass over `x` when a bracket is set (`x` may be raw task-vector bits)."""
        if self.hi < math.inf and fused.available():
            self.add_band(*fused.band(x, self.lo, self.hi))
        else:
            self.count(fused.tensors([x])[0].abs())

    def add_band(self, above: int, inside: torch.Tensor | int) -> None:
        """Count one chunk from a fused band pass (`merging.fused.band`, `band2`): how many of its values lie above
        the bracket, and its values inside it (or, for a bracket of one value, how many)."""
        self._above += above
        if not isinstance(inside, int):
            return self._add_inside(inside)
        if inside and self.lo != self.hi:
            raise ValueError("a count of the values inside a bracket needs a bracket of one value")
        self._ncand += inside
        if self._hist is not None:  # one bin
            self._hist[0] += inside

    def _add_inside(self, c: torch.Tensor) -> None:
        """Record the counted values inside [lo, hi]."""
        self._ncand += c.numel()
        if not c.numel():
            return
        if self._hist_later and self._kept + c.numel() > _CANDIDATE_CAP:  # too many to keep: histogram them
            self._hist = self._new_hist()
            self._hist_later = False
            for t in self._cands:
                self._hist += torch.bincount(t.view(torch.int32) - self._klo, minlength=self._hist.numel())
            self._cands, self._kept = [], 0
        if self._hist is not None:
            self._hist += torch.bincount(c.contiguous().view(torch.int32) - self._klo, minlength=self._hist.numel())
            return
        if self._thin > 1:
            c = c[:: self._thin].clone()
        self._cands.append(c)
        self._kept += c.numel()
        if self._kept > _CANDIDATE_CAP:  # too many to hold: keep a thinned copy (a sample for the next bracket)
            self._cands = [t[::2].clone() for t in self._cands]
            self._kept = sum(t.numel() for t in self._cands)
            self._thin *= 2

    def resolve(self) -> bool:
        """True when the threshold is known; otherwise the bracket has moved and another count is needed."""
        self.rounds += 1
        need = self.k - self._above  # rank of the threshold among the counted values, from the top
        cands, self._cands = self._cands, []
        if 0 < need <= self._ncand:
            if self._hist is not None:  # exact counts per value: walk down from hi
                from_top = torch.cumsum(self._hist.flip(0), 0)
                i = int(torch.searchsorted(from_top, torch.tensor(need)))
                self.threshold = _value(self._klo + self._hist.numel() - 1 - i)
                self.count_ge = self._above + int(from_top[i])
                self.count_eq = int(self._hist[self._hist.numel() - 1 - i])
                return True
            if self.lo == self.hi:  # every counted value is the same
                self.threshold = self.lo
                self.count_ge = self._above + self._ncand
                self.count_eq = self._ncand
                return True
            if self._thin == 1:
                cand = torch.cat(cands) if len(cands) > 1 else cands[0]
                self.threshold = float(torch.kthvalue(cand, self._ncand - need + 1).values)
                self.count_ge = self._above + int(torch.count_nonzero(cand >= self.threshold))
                self.count_eq = int(torch.count_nonzero(cand == self.threshold))
                return True
            # inside, but too many values to hold: bracket again from the thinned ones
            self.L, self.U = self.lo, self.hi
            self._below_L, self._above_U = self.n - self._above - self._ncand, self._above
            c = torch.sort(torch.cat(cands), descending=True).values
            if not self._bracket_at(
                need, self._ncand, (c, torch.full((c.numel(),), float(self._thin), dtype=torch.float64))
            ):
                raise RuntimeError("KthLargest made no progress")
        else:
            if need <= 0:  # above hi, where exactly `above` values lie
                self.L, self._below_L = _next(self.hi, math.inf), self.n - self._above
            else:  # below lo
                self.U, self._above_U = _next(self.lo, -math.inf), self._above + self._ncand
            self.lo, self.hi = self.L, self.U
            # rank and count inside [L, U] are exact: the sample restricted to it only has to spread them
            self._bracket_at(self.k - self._above_U, self.n - self._below_L - self._above_U)
        if self.rounds > 200 or self.L > self.U:
            raise RuntimeError("KthLargest did not converge (non-finite values in the stream?)")
        return False


def kth_largest(x: torch.Tensor, k: int, *, absolute: bool = False) -> float:
    """The k-th largest value of the non-negative tensor `x` (of `|x|` with `absolute=True`), exact, from a
    strided sample and one or two counting passes over `x` in memory: several times faster than
    `torch.kthvalue` for large `x`."""
    return select_kth(x, k, absolute=absolute).threshold  # type: ignore[return-value]


def select_kth(x: torch.Tensor, k: int, *, absolute: bool = False) -> KthLargest:
    """`kth_largest`, returning the resolved selection (its `threshold`, `count_ge`, `count_eq`)."""
    n = x.numel()
    flat = x.reshape(-1)
    sel = KthLargest(n, k, collect=True)
    if n > 4 * 16384:
        step = n // 16384 | 1  # odd stride: avoids aliasing with power-of-two row lengths
        sample = flat[::step]
        sel.add_sample(sample.abs() if absolute else sample, float(step))
        sel.bracket()
    while True:
        sel.begin_count()
        if absolute:
            sel.count_abs(flat)
        else:
            sel.count(flat)
        if sel.resolve():
            return sel
