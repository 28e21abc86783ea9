"""SCE (Select, Calculate, Erase) — Wan et al., "FuseChat: Knowledge Fusion of Chat Models",
https://arxiv.org/abs/2408.07990 (mergekit's `sce`).

Per tensor, with the task vectors τ_1..τ_T:

    select     v = Var_t(τ_t) element-wise (population variance across the models); keep the k = ⌊select_topk ·
               #{v ≠ 0}⌋ entries of largest v (ties by index), τ_t ← τ_t · mask    (select_topk = 1: no selection)
    calculate  s_t = mean(τ_t²) over the tensor;  w_t = s_t / Σ s   (1/T each when Σ s < 1e-6)
    erase      γ = sign(Σ_t τ_t) (+ where the sum is >= 0);  e_t = [sign(τ_t) = γ]
    merge      θ = θ_0 + Σ_t w_t e_t τ_t / max(Σ_t w_t e_t, 1e-6)

The variance threshold, the weights and the selection are whole-tensor statistics: a streamed tensor gets
statistics passes (a sample of the variances, a counting pass for the non-zeros and the exact threshold, more only
if the sample's bracket missed, the masked squares) before it is merged. The counting pass also sums the squares
of the entries whose variance is above the sample's bracket (selected whatever the exact threshold inside it) and
keeps those inside it: when that pass resolves the threshold, as it does unless the bracket missed, the weights
need no pass of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from merging import fused
from merging.base import FULL, METHODS, SAMPLE, MergeMethod
from merging.methods._kth_largest import KthLargest, select_kth
from peft_lab.params import Checked, param

_FOLD_CAP = 1 << 22  # undecided entries kept by the counting pass for the weights (past it: a weights pass)


@dataclass(frozen=True)
class SceParams(Checked):
    """select_topk: the fraction of the entries with non-zero variance across the models that is kept."""

    select_topk: float = param(1.0, within="[0, 1]", help="1 keeps every entry")


@dataclass(frozen=True)
class NoModelParams(Checked):
    """sce takes no per-model parameters: the weights come from the task vectors themselves."""


def _variance(taus) -> tuple[torch.Tensor, int]:
    """The population variance across the models, per entry, bit for bit what mergekit's `torch.var(stack, dim=0,
    unbiased=False)` gives (Welford's update in float64, in model order, rounded to float32), and how many of the
    variances are not zero; in one fused pass when numba is available (merging/fused/_stats.py), else at a third of
    torch.var's cost."""
    if fused.available() and len(taus) > 1:
        from merging.fused._stats import welford_variance

        var, nonzero = welford_variance([t.reshape(-1).contiguous().numpy() for t in taus])
        return torch.from_numpy(var), nonzero
    var = _torch_variance(taus)
    return var, int(torch.count_nonzero(var))


def _square_sum(tau: torch.Tensor) -> float:
    """Σ τ², each square in float32, summed in float64 (fused: the same sum in a vectorised order)."""
    if fused.available() and tau.dtype == torch.float32 and tau.is_contiguous():
        from merging.fused._stats import square_sum

        return square_sum(tau.reshape(-1).numpy())
    return float(tau.square().sum(dtype=torch.float64))


def _torch_variance(taus) -> torch.Tensor:
    """`_variance`'s reference: Welford's update on whole chunks in float64 torch ops."""
    mean = taus[0].double()
    m2 = torch.zeros_like(mean)
    for i, t in enumerate(taus[1:], 2):
        x = t.double()
        delta = x - mean
        mean.add_(delta / i)
        m2.add_(delta.mul_(x.sub_(mean)))
    return m2.div_(len(taus)).float()


class _Selection:
    """The k largest variances of a tensor (ties by index: the tied entries with the lowest indices are kept)."""

    def __init__(self, threshold: float | None, count_ge: int = 0, count_eq: int = 0, k: int = 0):
        self.threshold, self.k = threshold, k  # threshold None: keep nothing (k = 0)
        excess = count_ge - k
        self.tied_budget = count_eq - excess if excess > 0 else None  # tied entries still to keep (None: all)
        self.left = self.tied_budget

    def restart(self) -> None:
        self.left = self.tied_budget

    def apply_(self, var: torch.Tensor, taus: list[torch.Tensor]) -> list[torch.Tensor]:
        """τ_t · mask(var), in place (one fused pass when numba is available; `mask` is its reference)."""
        if (
            self.threshold is not None
            and fused.available()
            and all(t.dtype == torch.float32 and t.is_contiguous() for t in taus)
        ):
            self.left = fused.select_mask_(taus, var, self.threshold, self.left)
            return taus
        mask = self.mask(var)
        return [t.mul_(mask) for t in taus]

    def mask(self, var: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:
            return torch.zeros_like(var, dtype=torch.bool)
        keep = var >= self.threshold
        if self.left is not None:
            tied = torch.nonzero(var == self.threshold).reshape(-1)
            if tied.numel() > self.left:
                keep[tied[self.left :]] = False
            self.left = max(self.left - tied.numel(), 0)
        return keep


@METHODS.register("sce")
class Sce(MergeMethod):
    name = "sce"
    Params = SceParams
    ModelParams = NoModelParams
    needs_base = True
    uses_deltas = True
    streaming = True

    # -- statistics -----------------------------------------------------------------------------------
    def next_pass(self, job, index):
        """A streamed tensor: a sample of the variances brackets the threshold at the estimated k; the first full
        pass counts the non-zero variances (the exact k) and the variances in the bracket; more counting passes
        only if the bracket missed; then the weights pass (the selected squares)."""
        if not job.chunked:
            return None
        st, topk = job.state, self.at(job).select_topk
        if index == 0:
            if topk >= 1:
                st["stage"] = "weights"
                return FULL
            st.update(stage="sample", sample_nonzero=0.0, sel=KthLargest(job.numel, 1))
            return SAMPLE
        if st["stage"] == "sample":
            sel = st["sel"]
            sel.k = min(max(int(st["sample_nonzero"] * topk), 1), job.numel)  # an estimate: the count corrects it
            sel.bracket()
            sel.begin_count()
            st.update(stage="count", nonzero=0)
            return FULL
        if st["stage"] == "count":
            sel = st["sel"]
            if "k" not in st:  # the first counting pass also counted the non-zero variances
                st["k"] = int(st["nonzero"] * topk)
                if st["k"] == 0:  # nothing selected: every square is 0
                    st["selection"] = _Selection(None)
                    st["squares"] = [0.0] * len(job.model_params)
                    st["stage"] = "done"
                    return None
                sel.k = st["k"]
            if not sel.resolve():
                st["fold"] = None  # the squares summed in the first round assumed its bracket
                sel.begin_count()
                return FULL
            st["selection"] = _Selection(sel.threshold, sel.count_ge, sel.count_eq, sel.k)
            if st.get("fold") is not None and sel.rounds == 1:
                st["squares"], st["bits"] = self._folded(st["fold"], st["selection"])
                st["stage"] = "done"
                return None
            st["stage"] = "weights"
            return FULL
        return None  # the weights pass is done

    def raw_ok(self, job, kind):
        """Raw task vectors go to the fused counting pass and to the merge from the selection bits."""
        if not fused.available():
            return False
        if kind == FULL:
            return job.state.get("stage") == "count" and job.state["sel"].hi < math.inf
        return bool(job.state.get("bits"))

    def observe(self, job, pass_index, start, base, tensors):
        st = job.state
        if st["stage"] == "count" and self._fused_count(job, start, tensors):
            return
        tensors = fused.tensors(tensors)
        if st["stage"] == "weights":
            taus = self._selected(job, start, list(tensors))  # fresh reads: masked in place
            sq = st.setdefault("squares", [0.0] * len(taus))
            for t, tau in enumerate(taus):
                sq[t] += _square_sum(tau)
            return
        var, nonzero = _variance(tensors)
        if st["stage"] == "sample":
            st["sample_nonzero"] += nonzero / job.sample_rate
            st["sel"].add_sample(var, 1.0 / job.sample_rate)
            return
        if "k" not in st:
            st["nonzero"] += nonzero
            self._fold(job, start, var, tensors)
        st["sel"].count_abs(var)  # var >= 0

    # -- the weights, from the first counting pass --------------------------------------------------
    def _fold_begin(self, job, start, T: int):
        """The first counting round also sums the squares of the entries whose variance is above the bracket
        (selected whatever the threshold inside it) and keeps the positions, variances and squares of those inside
        it (decided once the threshold is known): `st["fold"]`, None once that does not apply."""
        st, sel = job.state, job.state["sel"]
        if start == 0:
            ok = "k" not in st and sel.hi < math.inf
            st["fold"] = {"sums": np.zeros(T), "var": [], "sq": [], "pos": [], "bits": {}, "n": 0} if ok else None
        return st.get("fold") if "k" not in st else None

    def _fold_add(self, job, fold, start, var, pos, squares) -> None:
        fold["n"] += pos.numel()
        if fold["n"] > _FOLD_CAP:  # too many undecided entries to hold: the weights get their own pass
            job.state["fold"] = None
            return
        fold["var"].append(var)
        fold["pos"].append((start, pos))
        fold["sq"].append(squares)

    def _fused_count(self, job, start, taus) -> bool:
        """The counting pass on one chunk in one fused loop (merging/fused/_stats.py `sce_count`): the variances
        stay in its blocks. Its first round also folds in the weights and records the entries above the bracket as
        bits, from which the merge pass builds the selection without computing the variances again."""
        sel = job.state["sel"]
        raw = all(isinstance(t, fused.RawDelta) for t in taus)
        if not (fused.available() and sel.hi < math.inf and (raw or all(t.dtype == torch.float32 for t in taus))):
            return False
        from merging.fused._stats import sce_count

        fold = self._fold_begin(job, start, len(taus))
        out = sce_count(taus, sel.lo, sel.hi, fold["sums"] if fold is not None else None)
        nonzero, above, inside = out[:3]
        if "k" not in job.state:
            job.state["nonzero"] += nonzero
        sel.add_band(above, torch.from_numpy(inside) if not isinstance(inside, int) else inside)
        if fold is not None:
            bits, pos, squares = out[3:]
            var = torch.from_numpy(inside) if not isinstance(inside, int) else torch.full((pos.size,), sel.lo)
            fold["bits"][start] = bits
            self._fold_add(job, fold, start, var, torch.from_numpy(pos), torch.from_numpy(squares))
        return True

    def _fold(self, job, start, var, taus) -> None:
        """`_fused_count`'s fold, in torch ops (the reference; no bits: its merge pass computes the variances)."""
        fold = self._fold_begin(job, start, len(taus))
        if fold is None:
            return
        sel = job.state["sel"]
        above = var > sel.hi
        for t, tau in enumerate(taus):
            fold["sums"][t] += float(tau[above].square().sum(dtype=torch.float64))
        idx = torch.nonzero((var >= sel.lo) & (var <= sel.hi)).reshape(-1)
        self._fold_add(job, fold, start, var[idx], idx, torch.stack([t[idx].square() for t in taus]))

    @staticmethod
    def _folded(fold, selection: _Selection) -> tuple[list[float], dict]:
        """Σ τ_t² over the selected entries (the sums above the bracket plus the selected entries inside it: those
        above the threshold, and the first of those tied at it, in index order, as `_Selection.mask` keeps), and,
        where the fused count recorded them, each chunk's selection as bits."""
        var = torch.cat(fold["var"])
        sq = torch.cat(fold["sq"], dim=1)
        keep = var > selection.threshold
        tied = torch.nonzero(var == selection.threshold).reshape(-1)
        keep[tied if selection.tied_budget is None else tied[: selection.tied_budget]] = True
        squares = [float(s) + float(q[keep].sum(dtype=torch.float64)) for s, q in zip(fold["sums"], sq, strict=True)]
        bits, i = fold["bits"], 0
        for start, pos in fold["pos"]:
            chosen = pos[keep[i : i + pos.numel()]].numpy()
            i += pos.numel()
            if start in bits:
                np.bitwise_or.at(bits[start], chosen >> 3, (1 << (chosen & 7)).astype(np.uint8))
        return squares, bits

    def _selected(self, job, start, taus):
        """τ_t · mask for this chunk (in place), with the tensor's selection (computed here for a whole tensor)."""
        if self.at(job).select_topk >= 1:
            return taus
        var, nonzero = _variance(taus)
        sel = job.state.get("selection")
        if sel is None:  # a whole tensor: select here
            k = int(nonzero * self.at(job).select_topk)
            if k == 0:
                sel = _Selection(None)
            else:
                s = select_kth(var, k, absolute=True)  # var >= 0: the fused count of |var| is the count of var
                sel = _Selection(s.threshold, s.count_ge, s.count_eq, k)
            job.state["selection"] = sel
        if start == 0:
            sel.restart()
        return sel.apply_(var, taus)

    # -- merge ----------------------------------------------------------------------------------------
    def _weights(self, job, taus) -> torch.Tensor:
        if "squares" not in job.state:  # a whole tensor: its selected task vectors are these
            job.state["squares"] = [_square_sum(t) for t in taus]
        means = torch.tensor([s / max(job.numel, 1) for s in job.state["squares"]], dtype=torch.float32)
        total = float(means.sum())
        if abs(total) < 1e-6:
            return torch.full_like(means, 1.0 / len(means))
        return means / total

    def merge_chunk(self, job, start, base, tensors):
        bits = job.state.get("bits", {}).pop(start, None)
        if bits is not None and base.dtype == torch.float32 and base.is_contiguous():  # the selection from the count
            w = self._weights(job, tensors)
            return fused.sce_combine_packed(base, tensors, bits, w.tolist())
        taus = self._selected(job, start, fused.tensors(tensors))
        w = self._weights(job, taus)
        if fused.available() and base.dtype == torch.float32 and base.is_contiguous():  # one pass, same float32 ops
            return fused.sce_combine(base, taus, w.tolist())
        tv = torch.stack(taus)
        majority = (tv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
        erased = w.reshape(-1, 1) * (tv.sign() == majority)
        merged = (tv * erased).sum(dim=0)
        return base.add_(merged / erased.sum(dim=0).clamp(min=1e-6))
