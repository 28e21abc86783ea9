"""PCB-merging (Parameter Competition Balancing) — Du et al., "Parameter Competition Balancing for Model Merging",
NeurIPS 2024, https://arxiv.org/abs/2410.02396 (official code: duguodong7/pcb-merging, `pcb-merging.py`).

Over the entries of the whole model (`scope: global`, the official code's flattened vectors) or of each tensor
(`scope: tensor`), with the T task vectors τ_t and "sorted" meaning the ascending order over those n entries:

    clip       a_t = clamp(|τ_t|, lo_t, hi_t),  lo_t = sorted(|τ_t|)[⌊n·10⁻⁴⌋], hi_t = sorted(|τ_t|)[⌊n(1 − 10⁻⁴) − 1⌋]
    intra      i_t = exp(T · ((a_t − lo_t) / (hi_t − lo_t))²)              (a task's own large entries)
    inter      c_t = tanh(τ_t · Σ_j τ_j)                                   (agreement with the other tasks)
    drop       β_t = i_t · c_t,  v_t = sorted(β_t)[⌊n(1 − ratio)⌋]:  s_t = (max(β_t, v_t) − v_t) / (max β_t − v_t)
               (the entries below the top `ratio` get 0, the rest a weight in (0, 1])
    rescale    θ = θ_0 + λ · Σ_t w_t · sign(τ_t) a_t · s_t / max(Σ_t s_t, 1e-12)

The quantiles are exact, computed in statistics passes (over the model in `prepare` with `scope: global`, over the
tensor before it is merged with `scope: tensor`), never by holding the model. Where a range is empty (hi_t = lo_t, or
max β_t = v_t) the official code divides by zero; peft-lab takes the normalised intra term as 0 and drops the task's
entries there (s_t = 0). The official code then searches the per-model weights w_t (its "lams", in [0.8, 1.3]) on
validation data by evolution strategies; here they are the per-model `weight`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.base import FULL, METHODS, SAMPLE, MergeMethod, ModelParams
from merging.methods._kth_largest import KthLargest
from merging.settings import is_scalar
from peft_lab.errors import UserError
from peft_lab.params import Checked, param

_CLIP = 1e-4  # the official code's outlier clip on each side of |τ|


@dataclass(frozen=True)
class PcbParams(Checked):
    """`ratio`: the fraction of each task's entries kept by their balanced score; λ (recipe key `lambda`): the scale
    of the merged task vector; `scope`: `global` (the official statistics over the whole model) or `tensor`."""

    ratio: float = param(0.1, within="(0, 1]", help="the official code keeps 5-10% (ratio 0.05-0.1)")
    lambda_: float = param(1.0, key="lambda")
    scope: str = param("global", choices=("global", "tensor"), static=True)


@dataclass(frozen=True)
class PcbModelParams(ModelParams):
    """Per-model `weight` (the official code's searched "lams")."""

    weight: float = 1.0


def _positive(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0) with −0.0 made +0.0 (the exact selection reads the bit patterns of non-negative floats)."""
    return x.clamp(min=0).add_(0.0)


class _Quantile:
    """The value at ascending position i among n signed values, exactly, from streamed passes: the (n − i)-th
    largest of max(x, 0) when that is positive; else the (i + 1)-th largest of −x among the values <= 0."""

    def __init__(self, n: int, i: int):
        self.n, self.i = n, i
        self.pos = KthLargest(n, n - i)
        self.neg: KthLargest | None = None
        self.positives = 0
        self.value: float | None = None

    def after_pos(self) -> bool:
        """Called once `pos` is resolved: True when the value is known, False when the negative side is needed."""
        if self.pos.threshold > 0:
            self.value = self.pos.threshold
            return True
        m = self.n - self.positives  # the values <= 0; the one sought is the (i + 1)-th largest of their negation
        self.neg = KthLargest(m, self.i + 1)
        return False


class _Phase:
    """Exact selections resolved together: a SAMPLE pass (brackets), then FULL counting passes until all are known."""

    def __init__(self, sels: Sequence[KthLargest]):
        self.sels = list(sels)
        self.state = "new"
        self.count_passes = 0

    def next_kind(self) -> str | None:
        if self.state == "new":
            self.state = "sample"
            return SAMPLE
        if self.state == "sample":
            for s in self.sels:
                s.bracket()
                s.begin_count()
            self.state = "count"
        else:
            pending = [s for s in self.sels if s.threshold is None and not s.resolve()]
            for s in pending:
                s.begin_count()
            if not pending:
                self.state = "done"
                return None
        self.count_passes += 1
        return FULL


class PcbStats:
    """lo_t, hi_t, v_t and max β_t over a stream of chunks of the T task vectors (n entries in all). Drive it with
    `next_kind()` (SAMPLE, FULL or None when done) and `observe(taus, weight)` for each chunk of that pass."""

    def __init__(self, n: int, T: int, ratio: float):
        self.n, self.T = n, T
        self.abs_sel = [
            (KthLargest(n, n - int(n * _CLIP)), KthLargest(n, n - int(n * (1 - _CLIP) - 1) % n)) for _ in range(T)
        ]
        self.quant = [_Quantile(n, min(int(n * (1 - ratio)), n - 1)) for _ in range(T)]
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.top = [float("-inf")] * T
        self.abs_phase = _Phase([s for pair in self.abs_sel for s in pair])
        self.score_phase = _Phase([q.pos for q in self.quant])
        self.neg_phase: _Phase | None = None
        self.phase: _Phase | None = self.abs_phase

    def next_kind(self) -> str | None:
        """The kind of the next statistics pass, or None when every statistic is known."""
        if self.phase is self.abs_phase:
            if (kind := self.abs_phase.next_kind()) is not None:
                return kind
            self.lo = [lo.threshold for lo, _ in self.abs_sel]
            self.hi = [hi.threshold for _, hi in self.abs_sel]
            self.phase = self.score_phase
        if self.phase is self.score_phase:
            if (kind := self.score_phase.next_kind()) is not None:
                return kind
            needs = [q for q in self.quant if not q.after_pos()]
            if not needs:
                self.phase = None
                return None
            self.phase = self.neg_phase = _Phase([q.neg for q in needs])
        if self.phase is self.neg_phase and self.neg_phase is not None:
            if (kind := self.neg_phase.next_kind()) is not None:
                return kind
            for q in self.quant:
                if q.value is None:
                    q.value = -q.neg.threshold
            self.phase = None
        return None

    # -- one chunk of a pass --------------------------------------------------------------------------
    def scores(self, taus: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """β_t of a chunk (the balanced scores), once lo and hi are known."""
        total = taus[0].clone()
        for t in taus[1:]:
            total.add_(t)
        return [self._score(t, tau, total) for t, tau in enumerate(taus)]

    def _score(self, t: int, tau: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo[t], self.hi[t]
        a = tau.abs().clamp_(lo, hi)
        intra = a.sub_(lo).div_(hi - lo).square_() if hi > lo else a.zero_()
        return intra.mul_(self.T).exp_().mul_(torch.tanh(tau * total))

    def observe(self, taus: Sequence[torch.Tensor], weight: float) -> None:
        ph = self.phase
        sampling = ph is not None and ph.state == "sample"
        if ph is self.abs_phase:
            for t, pair in enumerate(self.abs_sel):
                a = taus[t].abs()
                for s in pair:
                    if sampling:
                        s.add_sample(a, weight)
                    elif s.threshold is None:
                        s.count(a)
            return
        for t, (q, b) in enumerate(zip(self.quant, self.scores(taus), strict=True)):
            if ph is self.score_phase:
                if sampling:
                    q.pos.add_sample(_positive(b), weight)
                    continue
                if ph.count_passes == 1:  # the positives and the maximum, in the first counting pass
                    q.positives += int(torch.count_nonzero(b > 0))
                    self.top[t] = max(self.top[t], float(b.max()))
                if q.pos.threshold is None:
                    q.pos.count(_positive(b))
            elif q.neg is not None:
                neg = _positive(-b[b <= 0])
                if sampling:
                    q.neg.add_sample(neg, weight)
                elif q.neg.threshold is None:
                    q.neg.count(neg)

    # -- the merge ------------------------------------------------------------------------------------
    def merge(self, taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """Σ_t w_t sign(τ_t) a_t s_t / max(Σ_t s_t, 1e-12) of a chunk."""
        scores = self.scores(taus)
        num = torch.zeros_like(taus[0])
        den = torch.zeros_like(taus[0])
        for t, (tau, b, w) in enumerate(zip(taus, scores, weights, strict=True)):
            v, top = self.quant[t].value, self.top[t]
            s = b.clamp_(min=v).sub_(v).div_(top - v) if top > v else b.zero_()
            clipped = tau.abs().clamp_(self.lo[t], self.hi[t]).mul_(torch.sign(tau))
            num.add_(clipped.mul_(s), alpha=w)
            den.add_(s)
        return num.div_(den.clamp_(min=1e-12))


@METHODS.register("pcb")
class Pcb(MergeMethod):
    name = "pcb"
    Params = PcbParams
    ModelParams = PcbModelParams
    needs_base = True
    uses_deltas = True
    streaming = True

    def __init__(self, params=None):
        super().__init__(params)
        self.global_stats: PcbStats | None = None

    def check_settings(self, shared_scopes, model_scopes) -> None:
        """scope=global ranks the whole model with one ratio: it cannot vary per tensor."""
        if self.params.scope != "global":
            return
        for scope in shared_scopes:
            if "ratio" in scope and not is_scalar(scope["ratio"]):
                raise UserError(
                    "pcb: ratio is given per layer or per tensor, but scope=global keeps the top ratio of each task "
                    "over the whole model with one value; give one value, or use scope=tensor."
                )

    def prepare(self, inputs) -> None:
        if self.params.scope != "global" or inputs.scan is None:
            return
        names = [n for n, leaf in inputs.base.items() if leaf.dtype.is_floating_point]
        stats = PcbStats(sum(inputs.base[n].numel for n in names), len(inputs.model_params), self.params.ratio)
        while (kind := stats.next_kind()) is not None:
            inputs.scan(lambda job, start, base, chunks: stats.observe(chunks, 1.0 / job.sample_rate), kind, names)
        self.global_stats = stats

    def _stats(self, job) -> PcbStats:
        if self.global_stats is not None:
            return self.global_stats
        if "pcb" not in job.state:
            job.state["pcb"] = PcbStats(job.numel, len(job.model_params), self.at(job).ratio)
        return job.state["pcb"]

    def next_pass(self, job, index):
        if self.global_stats is not None or job.numel == 0:
            return None
        return self._stats(job).next_kind()

    def observe(self, job, pass_index, start, base, tensors):
        self._stats(job).observe(tensors, 1.0 / job.sample_rate)

    def merge_chunk(self, job, start, base, tensors):
        merged = self._stats(job).merge(tensors, [p.weight for p in job.model_params])
        return base.add_(merged, alpha=self.at(job).lambda_)
