"""Two more sparsifiers for the GTA family (`merging/methods/_gta.py`), as mergekit 0.1.5 registers them:

- `outliers` (Model Breadcrumbs, arXiv 2312.06795): per tensor of n entries, with k = floor(density·n) and
  g = min(floor(gamma·n), n − k), rank |τ_t| from the largest down (ties by index) and keep ranks g … g + k − 1:
  the g largest magnitudes (outliers) and everything below the k that follow are dropped. `scope: row` applies
  the breadcrumbs code's rule to each row (last dimension) of L entries instead: g = floor(gamma·L),
  k = min(floor(density·L), L − g).
- `della` (DELLA's MagPrune, arXiv 2406.11617): rank |τ_t| within each row from the smallest (1) to the largest
  (L, ties by index); keep each entry with probability p = density − ε + 2ε·(rank − 1)/(L − 1) (so the largest
  magnitudes are kept most often), from the same per-(seed, tensor, model) random stream as DARE; rescale the
  survivors by the tensor's L1 norm ratio (`l1`, mergekit) or by 1/p each (`keep_rate`, the paper).

`SparsifyingGTA` adds them to `GTAMethod`: their statistics passes (the two magnitude thresholds of a streamed
tensor; the L1 sums), their per-chunk masks, and row-aligned chunks for DELLA's per-row ranks. The combination
(weights, sign election, normalisation, λ) is `GTAMethod`'s, so the fused combine applies to them too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from merging import fused
from merging.base import FULL, SAMPLE, TensorJob
from merging.methods._gta import _L1_EPS, GTAMethod, GTAModelParams
from merging.methods._kth_largest import KthLargest, select_kth
from peft_lab.errors import UserError
from peft_lab.params import param

__all__ = [
    "SparsifyingGTA",
    "OutlierModelParams",
    "DellaModelParams",
    "BREADCRUMB_SCOPES",
    "window",
    "row_window_",
    "della_ranks",
    "della_keep",
]

BREADCRUMB_SCOPES = ("tensor", "row")


@dataclass(frozen=True)
class OutlierModelParams(GTAModelParams):
    """Per-model `weight`, `density` (the fraction kept) and `gamma` (the fraction of largest magnitudes dropped)."""

    density: float = param(1.0, within="[0, 1]", help="the fraction of each task vector kept; 1 keeps everything")
    gamma: float = param(0.01, within="[0, 1]", help="the fraction of the largest magnitudes dropped as outliers")


@dataclass(frozen=True)
class DellaModelParams(GTAModelParams):
    """Per-model `weight`, `density` (the mean keep probability) and `epsilon` (the half-width of the keep
    probabilities around it: density ± epsilon must lie in (0, 1) when density < 1)."""

    density: float = param(1.0, within="(0, 1]", help="the mean keep probability; 1 keeps everything")
    epsilon: float = param(0.15, within="[0, 1)", help="keep probabilities span density ± epsilon")


# ---------------------------------------------------------------------------------------------------------
# outliers: a window of magnitude ranks
# ---------------------------------------------------------------------------------------------------------
def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(skip, keep): the magnitude ranks kept are skip … skip + keep − 1, counted from the largest."""
    keep = int(density * n)
    return min(int(gamma * n), n - keep), keep


@dataclass
class Window:
    """Which entries of a tensor have magnitude ranks in [skip, skip + keep) (from the largest; ties by index).

    `hi` is the skip-th largest magnitude (None when skip = 0) and `gt_hi` how many exceed it; `lo` the
    (skip + keep)-th largest (None when keep = 0) and `gt_lo` how many exceed it. Chunks must come in order:
    `seen_hi` / `seen_lo` count the entries tied at hi / lo in earlier chunks (`restart` at each pass)."""

    skip: int
    keep: int
    hi: float | None
    gt_hi: int
    lo: float | None
    gt_lo: int
    seen_hi: int = 0
    seen_lo: int = 0

    def restart(self) -> None:
        self.seen_hi = self.seen_lo = 0

    def apply_(self, tau: torch.Tensor) -> torch.Tensor:
        """Zero the entries of this chunk outside the window, in place (one fused pass when numba is available,
        `merging.fused.window_`; these torch ops are its reference)."""
        if self.keep == 0:
            return tau.zero_()
        lo_window, hi, hi_first = self._edges()
        if fused.available() and tau.dtype == torch.float32 and tau.is_contiguous():
            spec = self.spec()
            fused.window_(tau, *spec)
            self.advance(spec)
            return tau
        a = tau.abs()
        inside = a > self.lo
        if self.hi is not None:
            inside &= a < self.hi
        self._ties(a, inside, self.lo, *lo_window, "lo")
        if hi is not None:
            self._ties(a, inside, hi, hi_first, None, "hi")
        return tau.mul_(inside)

    def spec(self) -> fused.WindowSpec:
        """The window as the fused loops take it (`merging.fused.window_`'s arguments); `advance` reads back the
        ties they counted."""
        lo_window, hi, hi_first = self._edges()
        return self.lo, hi, lo_window, hi_first, [self.seen_lo, self.seen_hi]

    def advance(self, spec: fused.WindowSpec) -> None:
        self.seen_lo, self.seen_hi = spec[4]

    def _edges(self) -> tuple[tuple[int, int], float | None, int]:
        """Which tied entries are kept: positions [first, stop) of those tied at lo, and positions >= hi_first of
        those tied at hi (hi None when there is no upper edge, or when one run of ties spans both edges: then the
        lo window holds the whole window)."""
        if self.hi is not None and self.hi == self.lo:
            return (self.skip - self.gt_lo, self.skip + self.keep - self.gt_lo), None, 0
        hi_first = 0 if self.hi is None else self.skip - self.gt_hi
        return (0, self.skip + self.keep - self.gt_lo), self.hi, hi_first

    def _ties(self, a: torch.Tensor, inside: torch.Tensor, v: float, first: int, stop: int | None, which: str) -> None:
        """Mark the entries tied at `v` whose position among all tied ones (in index order) is in [first, stop)."""
        tied = torch.nonzero(a == v).reshape(-1)
        seen = getattr(self, f"seen_{which}")
        setattr(self, f"seen_{which}", seen + tied.numel())
        pos = torch.arange(seen, seen + tied.numel())
        ok = pos >= first
        if stop is not None:
            ok &= pos < stop
        inside[tied[ok]] = True


def window(tau: torch.Tensor, skip: int, keep: int) -> Window:
    """The window of a tensor held whole."""
    lo = select_kth(tau, skip + keep, absolute=True) if keep else None
    hi = select_kth(tau, skip, absolute=True) if skip else None
    return Window(
        skip,
        keep,
        None if hi is None else hi.threshold,
        0 if hi is None else hi.count_ge - hi.count_eq,
        None if lo is None else lo.threshold,
        0 if lo is None else lo.count_ge - lo.count_eq,
    )


def row_unit(shape: tuple[int, ...]) -> int:
    """Elements per row (the last dimension; a 1-D tensor is one row)."""
    n = 1
    for x in shape[-1:] if len(shape) >= 2 else shape:
        n *= x
    return max(n, 1)


def row_window_(tau: torch.Tensor, L: int, density: float, gamma: float) -> torch.Tensor:
    """The breadcrumbs code's per-row rule, in place on a chunk of whole rows of length L: drop the floor(gamma·L)
    largest magnitudes of each row, keep the floor(density·L) largest of the rest (ties by index)."""
    skip = int(gamma * L)
    keep = min(int(density * L), L - skip)
    a = tau.abs().reshape(-1, L)
    order = torch.argsort(a, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L).expand_as(order))
    return tau.mul_(((rank >= skip) & (rank < skip + keep)).reshape(-1))


# ---------------------------------------------------------------------------------------------------------
# della: per-row rank probabilities
# ---------------------------------------------------------------------------------------------------------
def della_unit(shape: tuple[int, ...]) -> int:
    """Elements per slice along dimension 0 (ranks run along dimension 1 of a slice; a 1-D tensor is one row)."""
    n = 1
    for s in shape[1:] if len(shape) >= 2 else shape:
        n *= s
    return max(n, 1)


def della_layout(shape: tuple[int, ...]) -> tuple[int, int]:
    """(L, rest): a dimension-0 slice is L × rest elements and ranks run along L (dimension 1; a 1-D tensor is one
    row of L)."""
    if len(shape) >= 2:
        return shape[1], della_unit(shape) // max(shape[1], 1)
    return max(shape[0] if shape else 1, 1), 1


def della_ranks(tau: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(rank − 1)/(L − 1) of each |τ| along dimension 1 (mergekit's `dim=1`; a 1-D tensor is one row), for a chunk
    of whole dimension-0 slices; float64, 0.5 where L = 1."""
    L, rest = della_layout(shape)
    a = tau.abs().reshape(-1, L, rest)
    order = torch.argsort(a, dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(L).reshape(1, L, 1).expand_as(order))
    if L == 1:
        return torch.full((tau.numel(),), 0.5, dtype=torch.float64)
    return (ranks.reshape(-1).double() / (L - 1)).clamp_(0, 1)


def della_keep(p: torch.Tensor, g: np.random.SFC64) -> torch.Tensor:
    """A keep mask with per-entry probabilities `p` (float64), from the stream `g` as DARE draws it (two 32-bit
    uniforms per 64-bit word): kept iff u < p·2^32."""
    n = p.numel()
    u = torch.from_numpy(g.random_raw((n + 1) // 2).view(np.int32)[:n].astype(np.int64))
    cut = torch.round(p * 2.0**32).clamp_(max=2.0**32).to(torch.int64) - 2**31
    return u < cut


# ---------------------------------------------------------------------------------------------------------
# the GTA methods that use them
# ---------------------------------------------------------------------------------------------------------
class SparsifyingGTA(GTAMethod):
    """`GTAMethod` with the `outliers` and `della` sparsifiers (module docstring); other sparsifiers as GTAMethod."""

    def _per_row(self, job: TensorJob) -> bool:
        """Masks computed row by row: DELLA's ranks, breadcrumbs with scope=row."""
        return self.sparsify == "della" or (self.sparsify == "outliers" and self.at(job).scope == "row")

    def chunk_unit(self, job: TensorJob) -> int:
        if self.sparsify == "della":  # an even number of elements: the random stream is drawn two values at a time
            u = della_unit(job.shape)
            return u if u % 2 == 0 else 2 * u
        return row_unit(job.shape) if self._per_row(job) else 1

    def check_models(self, model_params, labels) -> None:
        if self.sparsify == "della":
            for i, p in enumerate(model_params):
                _check_della(p, labels[i] if i < len(labels) else f"models[{i}]")

    # -- statistics passes ------------------------------------------------------------------------------
    def _fused_window(self, job: TensorJob) -> bool:
        """Breadcrumbs' window inside the fused combine loop (no rescale; per-tensor ranks)."""
        return (
            self.sparsify == "outliers"
            and fused.available()
            and not self._per_row(job)
            and self.at(job).rescale == "none"
        )

    def raw_ok(self, job: TensorJob, kind: str) -> bool:
        if self.sparsify not in ("outliers", "della"):
            return super().raw_ok(job, kind)
        if not self._fused_window(job):
            return False
        return kind != FULL or job.state.get("stage") == "count"

    def next_pass(self, job: TensorJob, index: int) -> str | None:
        if self.sparsify not in ("outliers", "della"):
            return super().next_pass(job, index)
        dens = [p.density for p in job.model_params]
        if all(d >= 1 for d in dens) or not job.chunked:
            return None
        l1 = self.at(job).rescale == "l1"
        if self._per_row(job):
            return FULL if index == 0 and l1 else None
        st = job.state
        if index == 0:
            st["sel"] = {}
            for t, p in enumerate(job.model_params):
                if p.density < 1:
                    skip, keep = outlier_counts(job.numel, p.density, p.gamma)
                    st["sel"].update({(t, "hi"): KthLargest(job.numel, skip)} if skip else {})
                    st["sel"].update({(t, "lo"): KthLargest(job.numel, skip + keep)} if keep else {})
            st["stage"] = "sample"
            return SAMPLE if st["sel"] else self._after_selection(job, l1)
        if st["stage"] == "sample":
            for sel in st["sel"].values():
                sel.bracket()
                sel.begin_count()
            st["stage"] = "count"
            return FULL
        if st["stage"] == "count":
            pending = [s for s in st["sel"].values() if s.threshold is None and not s.resolve()]
            for sel in pending:
                sel.begin_count()
            return FULL if pending else self._after_selection(job, l1)
        return None  # the L1 pass is done

    def _after_selection(self, job: TensorJob, l1: bool) -> str | None:
        st = job.state
        sels = st["sel"]
        st["windows"] = {}
        for t, p in enumerate(job.model_params):
            if p.density < 1:
                skip, keep = outlier_counts(job.numel, p.density, p.gamma)
                hi, lo = sels.get((t, "hi")), sels.get((t, "lo"))
                st["windows"][t] = Window(
                    skip,
                    keep,
                    None if hi is None else hi.threshold,
                    0 if hi is None else hi.count_ge - hi.count_eq,
                    None if lo is None else lo.threshold,
                    0 if lo is None else lo.count_ge - lo.count_eq,
                )
        st["stage"] = "l1" if l1 else "done"
        return FULL if l1 else None

    def observe(self, job, pass_index, start, base, tensors) -> None:
        if self.sparsify not in ("outliers", "della"):
            return super().observe(job, pass_index, start, base, tensors)
        if self._per_row(job) or job.state.get("stage") == "l1":
            return self._observe_masked_l1(job, start, tensors)
        sels = job.state["sel"]
        for (t, edge), sel in sels.items():
            if job.state["stage"] == "sample":
                sel.add_sample(tensors[t].abs(), 1.0 / job.sample_rate)
            elif sel.threshold is None:
                if edge == "hi" and _bracketed(sel, sels.get((t, "lo"))):
                    continue  # both edges of this model are counted in one pass below
                if edge == "lo" and _bracketed(sels.get((t, "hi")), sel):
                    hi = sels[(t, "hi")]
                    a1, c1, a2, c2 = fused.band2(tensors[t], hi.lo, hi.hi, sel.lo, sel.hi)
                    hi.add_band(a1, c1)
                    sel.add_band(a2, c2)
                else:
                    sel.count_abs(tensors[t])

    def _observe_masked_l1(self, job: TensorJob, start: int, tensors) -> None:
        before = job.state.setdefault("l1_before", [0.0] * len(tensors))
        after = job.state.setdefault("l1_after", [0.0] * len(tensors))
        for t, tau in enumerate(tensors):
            if job.model_params[t].density < 1:
                before[t] += float(tau.abs().sum(dtype=torch.float64))
                after[t] += float(self._masked(job, t, start, tau.clone(), keep=True).abs().sum(dtype=torch.float64))

    # -- masks ----------------------------------------------------------------------------------------
    def _masked(self, job: TensorJob, t: int, start: int, tau: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """τ_t with the sparsifier's mask applied (no rescale), in place; `della` returns the kept entries' p in
        job.state["p"] for a `keep_rate` rescale. `keep`: remember DELLA's mask of this chunk (bit-packed, n/8 bytes)
        for the merge pass, which then neither ranks nor draws again."""
        p = job.model_params[t]
        if self.sparsify == "outliers" and self._per_row(job):
            return row_window_(tau, row_unit(job.shape), p.density, p.gamma)
        if self.sparsify == "outliers":
            w = self._window(job, t, tau)
            if start == 0:
                w.restart()
            return w.apply_(tau)
        _check_della(p, job.labels[t] if t < len(job.labels) else f"models[{t}]", job.name)
        packed = job.state.pop(("keep", t, start), None)
        if packed is not None:
            return tau.mul_(torch.from_numpy(np.unpackbits(packed, count=tau.numel()).view(np.bool_)))
        want_p = self.at(job).rescale == "keep_rate"
        if fused.available() and tau.numel() and tau.dtype == torch.float32 and tau.is_contiguous():  # same bits
            L, rest = della_layout(job.shape)
            c1, c2 = p.density - p.epsilon, 2 * p.epsilon
            mask_np, probs = fused.della_mask_(tau, L, rest, c1, c2, self._generator(job, t, start), want_p=want_p)
            if want_p:
                job.state["p"] = probs
            if keep:
                job.state[("keep", t, start)] = np.packbits(mask_np)
            return tau
        probs = (p.density - p.epsilon) + della_ranks(tau, job.shape) * (2 * p.epsilon)
        mask = della_keep(probs, self._generator(job, t, start))
        job.state["p"] = probs
        if keep:
            job.state[("keep", t, start)] = np.packbits(mask.numpy())
        return tau.mul_(mask)

    def _window(self, job: TensorJob, t: int, tau: torch.Tensor) -> Window:
        if job.chunked:
            return job.state["windows"][t]
        key = ("window", t)
        if key not in job.state:
            skip, keep = outlier_counts(job.numel, job.model_params[t].density, job.model_params[t].gamma)
            job.state[key] = window(tau, skip, keep)
        return job.state[key]

    # -- merge ----------------------------------------------------------------------------------------
    def merge_chunk(self, job, start, base, tensors) -> torch.Tensor:
        """With the fused loops, breadcrumbs' windows (without a rescale) are applied inside `fused.gta_combine`: one
        pass over each task vector instead of two."""
        if not (self._fused_window(job) and all(_float32(t) for t in tensors)):
            return super().merge_chunk(job, start, base, fused.tensors(tensors))
        windows: list[Window | None] = []
        thr = [0.0] * len(tensors)
        for t, tau in enumerate(tensors):
            w = None
            if job.model_params[t].density < 1:
                w = self._window(job, t, tau)
                if start == 0:
                    w.restart()
                if w.keep == 0:  # nothing kept: a threshold no finite magnitude reaches (+0, as tau.zero_())
                    thr[t] = math.inf
                    w = None
            windows.append(w)
        specs = [None if w is None else w.spec() for w in windows]
        p = self.at(job)
        out = fused.gta_combine(
            base,
            tensors,
            thr,
            [m.weight for m in job.model_params],
            consensus=self.consensus,
            normalize=p.normalize,
            lam=p.lambda_,
            zero_sign=self._zero_sign,
            windows=specs,
        )
        for w, spec in zip(windows, specs, strict=True):
            if w is not None:
                w.advance(spec)
        return out

    def _sparsified(self, job: TensorJob, t: int, start: int, tau: torch.Tensor) -> torch.Tensor:
        if self.sparsify not in ("outliers", "della"):
            return super()._sparsified(job, t, start, tau)
        if job.model_params[t].density >= 1:
            return tau
        rescale = self.at(job).rescale
        if rescale == "l1" and not job.chunked:
            before = float(tau.abs().sum(dtype=torch.float64))
            x = self._masked(job, t, start, tau)
            after = float(x.abs().sum(dtype=torch.float64))
        else:
            x = self._masked(job, t, start, tau)
            if rescale == "l1":
                before, after = job.state["l1_before"][t], job.state["l1_after"][t]
        if rescale == "l1":
            if before >= _L1_EPS and after >= _L1_EPS:  # mergekit leaves near-zero tensors unscaled
                x.mul_(before / after)
        elif rescale == "keep_rate":
            x.div_(job.state["p"].to(torch.float32))
        return x


def _float32(t) -> bool:
    return isinstance(t, fused.RawDelta) or t.dtype == torch.float32


def _bracketed(a: KthLargest | None, b: KthLargest | None) -> bool:
    """Both selections still counting, both bracketed, and the fused loops on: one `band2` pass counts both."""
    return (
        a is not None
        and b is not None
        and a.threshold is None
        and b.threshold is None
        and a.hi < math.inf
        and b.hi < math.inf
        and fused.available()
    )


def _check_della(p, label: str, tensor: str | None = None) -> None:
    if p.density < 1 and not (0 < p.density - p.epsilon and p.density + p.epsilon < 1):
        where = f" (tensor {tensor})" if tensor else ""
        raise UserError(
            f"{label}{where}: density={p.density} and epsilon={p.epsilon} give keep probabilities from "
            f"{p.density - p.epsilon:g} to {p.density + p.epsilon:g}; DELLA needs density − epsilon > 0 and "
            "density + epsilon < 1: lower epsilon (or move density away from 0 and 1)."
        )
