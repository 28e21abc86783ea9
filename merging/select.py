"""The exact k-th largest value of a long non-negative stream, in a few cheap passes (TIES trimming).

TIES keeps the entries of a task vector whose magnitude is at least the k-th largest. `torch.topk` and
`torch.kthvalue` cost 14-24 ns per element on this machine (one thread, 4M-element tensors) and need the
whole vector in memory; the threshold alone is much cheaper to get exactly:

1. a sample of the values (any representative subset, each value weighted by 1 / its sampling rate)
   brackets the k-th largest: `[lo, hi]` around the sample's estimate, `z` binomial standard deviations wide;
2. one pass over all values counts those above `hi` (surely kept) and collects those in `[lo, hi]`;
3. the threshold is the (k − above)-th largest candidate. If the bracket missed (bad luck, or a sample that
   does not represent the data), the counts say on which side; the bracket moves there and step 2 repeats.

The result is exact for any input; the kept set is `{x >= threshold}` (every value tied at the threshold is
kept, as in the official TIES code).
"""

from __future__ import annotations

import math

import torch

__all__ = ["KthLargest", "kth_largest"]

_SAMPLE_CAP = 1 << 18  # values kept from the sample pass (more are thinned): enough for a ~0.5% bracket
_CANDIDATE_CAP = 1 << 23  # candidates held at once (32 MB); past it they are thinned into a new sample


class KthLargest:
    """Exact k-th largest of `n` non-negative values delivered in passes.

    Usage: `add_sample(values, weight)` over a sample, `bracket()`, then loop `{begin_count(); count(chunk)
    for every chunk; done = resolve()}` until `resolve()` returns True; then read `threshold`.

    Every round counts the values above the bracket `[lo, hi]` and collects those inside it. The threshold
    is known to lie in `[L, U]`; a round that does not resolve it narrows `[L, U]` (past the bracket, or to
    it) and picks the next bracket inside, from a thinned copy of the candidates when there were too many
    to keep. When that would not shrink the bracket (a long run of tied values), the next bracket is the
    single value at the estimated rank: a round then either finds the threshold there or excludes that
    value, so every round makes progress.

    Args:
        n: how many values the stream holds.
        k: which largest to find, 1 <= k <= n.
        z: bracket half-width in standard deviations of the sample rank.
    """

    def __init__(self, n: int, k: int, z: float = 6.0):
        if not 1 <= k <= n:
            raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
        self.n, self.k, self.z = n, k, z
        self._sample: list[tuple[torch.Tensor, float]] = []
        self._sample_size = 0
        self.L, self.U = 0.0, math.inf  # the threshold lies in [L, U]
        self.lo, self.hi = 0.0, math.inf  # this round's candidates: lo <= x <= hi; x > hi counted as above
        self.threshold: float | None = None
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
        if self._sample_size > 4 * _SAMPLE_CAP:  # keep memory bounded: thin everything by 2
            self._sample = [(s[::2].clone(), w * 2) for s, w in self._sample]
            self._sample_size = sum(s.numel() for s, _ in self._sample)

    def bracket(self) -> None:
        """Set `[lo, hi]` from the sample (or keep the full range if there is none)."""
        if self._sample:
            self._bracket_from(self._sample, self.k)
        self._sample = []
        self._sample_size = 0

    def _bracket_from(self, sample: list[tuple[torch.Tensor, float]], k: float) -> bool:
        """Bracket the value of weighted rank k (from the top) of the sample, inside [L, U]. Returns False
        if the bracket would not be narrower than the current one."""
        vals = torch.cat([s for s, _ in sample])
        wts = torch.cat([torch.full((s.numel(),), w, dtype=torch.float64) for s, w in sample])
        order = torch.argsort(vals, descending=True)
        vals, cum = vals[order], torch.cumsum(wts[order], 0)
        m = vals.numel()
        if m == 0:
            return False
        total = float(cum[-1])
        p = min(max(k / total, 0.0), 1.0)
        # rank uncertainty of the estimate, in stream units (binomial, effective sample size m)
        margin = self.z * math.sqrt(max(m * p * (1 - p), 1.0)) * (total / m)
        i_hi = int(torch.searchsorted(cum, torch.tensor(k - margin, dtype=torch.float64)))
        i_lo = int(torch.searchsorted(cum, torch.tensor(k + margin, dtype=torch.float64)))
        hi = min(float(vals[i_hi - 1]) if i_hi >= 1 else math.inf, self.U)
        lo = max(float(vals[i_lo]) if i_lo < m else self.L, self.L)
        if (lo, hi) == (self.lo, self.hi) or lo > hi:
            i_mid = min(int(torch.searchsorted(cum, torch.tensor(k, dtype=torch.float64))), m - 1)
            v = min(max(float(vals[i_mid]), self.L), self.U)
            if (v, v) == (self.lo, self.hi):
                return False
            lo = hi = v
        self.lo, self.hi = lo, hi
        return True

    # -- pass 2: count ---------------------------------------------------------------------------------
    def begin_count(self) -> None:
        self._above = 0
        self._cands: list[torch.Tensor] = []
        self._ncand = 0
        self._kept = 0
        self._thin = 1

    def count(self, values: torch.Tensor) -> None:
        """Count/collect one chunk of the stream (every value exactly once per counting round)."""
        x = values.reshape(-1)
        if self.hi == math.inf:
            c = x[x >= self.lo]
        else:
            self._above += int(torch.count_nonzero(x > self.hi))
            c = x[(x >= self.lo) & (x <= self.hi)]
        self._ncand += c.numel()
        if c.numel():
            if self._thin > 1:
                c = c[:: self._thin].clone()
            self._cands.append(c)
            self._kept += c.numel()
            if self._kept > _CANDIDATE_CAP:  # too many: keep a thinned copy (a sample for the next bracket)
                self._cands = [t[::2].clone() for t in self._cands]
                self._kept = sum(t.numel() for t in self._cands)
                self._thin *= 2

    def resolve(self) -> bool:
        """True when the threshold is known; otherwise the bracket has moved and another count is needed."""
        self.rounds += 1
        need = self.k - self._above  # rank of the threshold among the candidates
        cands, self._cands = self._cands, []
        if 0 < need <= self._ncand:
            if self.lo == self.hi:  # every candidate has the same value
                self.threshold = self.lo
                return True
            if self._thin == 1:
                cand = torch.cat(cands) if len(cands) > 1 else cands[0]
                # need-th largest == (ncand - need + 1)-th smallest
                self.threshold = float(torch.kthvalue(cand, self._ncand - need + 1).values)
                return True
            # inside, but too many candidates to hold: bracket again from the thinned ones
            self.L, self.U = self.lo, self.hi
            if not self._bracket_from([(torch.cat(cands), float(self._thin))], need):
                raise RuntimeError("KthLargest made no progress")
        elif need <= 0:  # the threshold lies above hi
            self.L = math.nextafter(self.hi, math.inf)
            self.lo, self.hi = self.L, self.U
        else:  # below lo
            self.U = math.nextafter(self.lo, -math.inf)
            self.lo, self.hi = self.L, self.U
        if self.rounds > 200 or self.L > self.U:
            raise RuntimeError("KthLargest did not converge (non-finite values in the stream?)")
        return False


def kth_largest(x: torch.Tensor, k: int) -> float:
    """The k-th largest value of the non-negative tensor `x` (exact), from a strided sample and one or two
    counting passes over `x` in memory: several times faster than `torch.kthvalue` for large `x`."""
    n = x.numel()
    flat = x.reshape(-1)
    sel = KthLargest(n, k)
    if n > 4 * 65536:
        step = n // 65536 | 1  # odd stride: avoids aliasing with power-of-two row lengths
        sel.add_sample(flat[::step], float(step))
        sel.bracket()
    while True:
        sel.begin_count()
        sel.count(flat)
        if sel.resolve():
            return sel.threshold  # type: ignore[return-value]
