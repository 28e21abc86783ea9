"""Generalized task arithmetic: the one function behind task_arithmetic, ties, dare_linear and dare_ties.

Per tensor, with task vectors τ_t = θ_t − θ_0 and per-model weights w_t (mergekit's formulation):

    τ̂_t = sparsify(τ_t)             none | magnitude trim (TIES) | random drop + rescale (DARE)
    x_t = w_t · τ̂_t
    with consensus (TIES "elect"):  γ = sign(Σ_t x_t), a_t = [sign(x_t) == γ]; where the sum is exactly 0, γ is +1
                                    (mergekit, PEFT) or the model-wide majority sign (`zero_sign: majority`, the
                                    official TIES code)
    mixed = Σ_t a_t x_t,  divisor = Σ_t a_t w_t (0 -> 1);   without consensus a_t = 1, divisor = Σ_t w_t
    θ = θ_0 + λ · (mixed / divisor if normalize else mixed)

The registered methods are configurations of `GTAMethod` (which sparsifier, consensus or not, defaults), as
in mergekit's registry; each lives in its own module under `merging/methods/`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from merging import fused
from merging.base import FULL, MERGE, SAMPLE, MergeInputs, MergeMethod, ModelParams, TensorJob
from merging.methods._kth_largest import KthLargest, select_kth
from merging.settings import is_scalar
from peft_lab.errors import UserError
from peft_lab.params import Checked, param

__all__ = [
    "GTAMethod",
    "GTAModelParams",
    "WeightParams",
    "DareParams",
    "combine",
    "dare_keep",
    "dare_drop",
    "dare_generator",
    "tensor_seed",
    "RESCALES",
    "TRIM_SCOPES",
]

RESCALES = ("keep_rate", "q", "l1", "none")
TRIM_SCOPES = ("tensor", "global")
_L1_EPS = 1e-7  # mergekit's `rescaled_masked_tensor` leaves a tensor unscaled below this norm


@dataclass(frozen=True)
class WeightParams(ModelParams):
    """Per-model parameter `weight` (w_t, any sign: a negative weight subtracts a task)."""

    weight: float = 1.0


@dataclass(frozen=True)
class GTAModelParams(ModelParams):
    """Per-model parameters: `weight` (w_t, any sign: negative weights subtract a task) and `density` (the
    fraction of τ_t kept: TIES magnitude trim / DARE keep rate)."""

    weight: float = 1.0
    density: float = param(1.0, within="(0, 1]", help="the fraction of each task vector kept; 1 keeps everything")


@dataclass(frozen=True)
class DareParams(Checked):
    """Shared parameters of dare_linear / dare_ties.

    Attributes:
        lambda_: λ, the scale of the merged task vector (recipe key `lambda`).
        normalize: divide by the summed weights (of the agreeing models, with consensus).
        rescale: how kept entries are scaled after the random drop with keep rate d (the model's `density`):
            `keep_rate`: 1/d (the DARE paper); `l1`: restore each tensor's L1 norm (mergekit's `rescale: true`);
            `q`: 1/q (DAREx-q, arXiv 2410.09344; usually d <= q <= 1); `none`: no rescale (`rescale: false`).
        q: the DAREx-q rescale factor, used with `rescale: q`.
        seed: the seed every per-tensor mask derives from (with the tensor name and model position).
    """

    lambda_: float = param(1.0, key="lambda")
    normalize: bool = False
    rescale: str = param("l1", choices=RESCALES, aliases={True: "l1", False: "none"})
    q: float | None = param(None, within="(0, 1]")
    seed: int = param(0, within="[0, inf)")

    def __post_init__(self):
        super().__post_init__()
        if self.rescale == "q" and self.q is None:
            raise UserError("Parameter rescale=q needs q (the DAREx-q factor, in (0, 1]), e.g. q=0.3.")
        if self.rescale != "q" and self.q is not None:
            raise UserError(f"Parameter q={self.q} is only used with rescale=q (rescale is {self.rescale!r}).")


def combine(
    base: torch.Tensor | None,
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    zero_sign: float = 1.0,
) -> torch.Tensor:
    """`θ_0 + λ · mix(x_1..x_T)` (module docstring) for flat chunks `xs` = w_t · τ̂_t, which it overwrites.

    Args:
        base: (n,) the base chunk, or None to return the merged delta.
        xs: T tensors (n,): the weighted, sparsified task vectors.
        weights: the T weights w_t (for the divisor).
        zero_sign: the elected sign where Σ_t x_t is exactly 0 (+1 or −1).
    Returns:
        (n,) float32.
    """
    if not consensus:
        mixed = xs[0]
        for x in xs[1:]:
            mixed.add_(x)
        if normalize:
            div = float(sum(weights))
            if abs(div) >= 1e-8:  # mergekit leaves the sum undivided when the weights cancel
                mixed.div_(div)
    else:
        sgn = elected_sign(xs, zero_sign)
        mixed = div = None
        for x, w in zip(xs, weights, strict=True):
            agree = F.relu_(x.mul_(sgn))  # |x_t| where sign(x_t) == γ, else 0
            if normalize:
                ind = torch.sign(agree)  # a_t as 0/1
                div = ind.mul_(w) if div is None else div.add_(ind, alpha=w)
            mixed = agree if mixed is None else mixed.add_(agree)
        mixed.mul_(sgn)
        if normalize:
            if min(weights) > 0:  # a divisor is 0 only where nothing agrees (mixed is 0 there): any floor
                div.clamp_min_(min(weights) / 2)  # below the smallest weight keeps 0/div = 0, 3-8x cheaper
            else:  # signed weights can cancel: mergekit's rule, divisor 0 -> 1
                div.masked_fill_(div == 0, 1.0)
            mixed.div_(div)
    if lam != 1:
        mixed.mul_(lam)
    return mixed if base is None else mixed.add_(base)


def elected_sign(xs: Sequence[torch.Tensor], zero_sign: float = 1.0) -> torch.Tensor:
    """TIES's elected sign γ = sign(Σ_t x_t) as ±1 floats; where the sum is exactly 0, `zero_sign`.

    copysign maps +0 -> +1 and -0 -> -1; the sum is -0 only when every x_t is ±0, and then no entry agrees with
    either sign, so `zero_sign = +1` is mergekit's and PEFT's rule (a zero sum elects +)."""
    S = xs[0].clone()
    for x in xs[1:]:
        S.add_(x)
    sgn = torch.copysign(torch.ones((), dtype=S.dtype), S)
    if zero_sign < 0:
        sgn.masked_fill_(S == 0, -1.0)
    return sgn


def agreeing(xs: Sequence[torch.Tensor], sgn: torch.Tensor) -> list[torch.Tensor]:
    """Each x_t where its sign agrees with γ, else 0 (TIES's "disjoint" selection, before any division)."""
    return [F.relu(x * sgn).mul_(sgn) for x in xs]


def hardshrink_at_least(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """`x` where `|x| >= threshold`, else 0, in one fused op (`hardshrink` keeps `|x| > λ`, so λ is the
    float32 just below the threshold)."""
    if threshold <= 0:
        return x
    thr = torch.tensor(threshold, dtype=torch.float32)
    return F.hardshrink(x, float(torch.nextafter(thr, torch.zeros_like(thr))))


# -------------------------------------------------------------------------------------------------------
# DARE masks: one random stream per (seed, tensor, model), drawn on the CPU in chunk order
# -------------------------------------------------------------------------------------------------------
def tensor_seed(seed: int, name: str, model_index: int) -> int:
    """A 63-bit seed from the recipe seed, the tensor name and the model's position in the recipe: masks do
    not depend on the order tensors are visited in, on the chunking, or on the device."""
    h = hashlib.blake2b(f"{seed}\0{name}\0{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def dare_generator(seed: int, name: str, model_index: int) -> np.random.SFC64:
    """The mask stream of one (tensor, model): numpy's SFC64 bit generator, seeded from `tensor_seed`.

    A CPU bit generator makes masks reproducible on any device. SFC64's raw 64-bit output costs ~1 ns per
    word here against ~2.5 ns for `torch.Generator.random_` (int64) and ~3.5 ns per `torch.rand` float, and
    DARE draws one value per parameter per model, so this is most of its cost."""
    return np.random.SFC64(tensor_seed(seed, name, model_index))


def dare_keep(n: int, density: float, g: np.random.SFC64) -> torch.Tensor:
    """A Bernoulli(density) keep mask of length n (bool): each 64-bit word gives two 32-bit uniforms u,
    kept iff u < density·2^32. Chunks other than a tensor's last have even length, so the stream — and the
    mask — is the same however the tensor is chunked."""
    words = g.random_raw((n + 1) // 2)
    u = torch.from_numpy(words.view(np.int32)[:n])  # uniform on [-2^31, 2^31)
    cut = min(round(density * 2**32), 2**32) - 2**31
    return u < cut


def dare_drop(
    tau: torch.Tensor,
    g: np.random.SFC64,
    density: float,
    *,
    apply: bool,
    sums: bool = True,
    op: int = 0,
    factor: float = 1.0,
) -> tuple[float, float]:
    """DARE's drop of a flat float32 chunk with the mask stream `g`: the L1 norms of `tau` before and after it
    (float64; 0 unless `sums`), and with `apply`, `tau *= keep` in place, then `*= factor` (`op=1`) or
    `/= factor` (`op=2`). One fused pass when numba is available (`merging.fused.dare_drop`), else these ops."""
    if fused.available():
        return fused.dare_drop(tau, g, density, apply=apply, sums=sums, op=op, factor=factor)
    keep = dare_keep(tau.numel(), density, g)
    before = float(tau.abs().sum(dtype=torch.float64)) if sums else 0.0
    x = tau.mul_(keep) if apply else tau * keep
    after = float(x.abs().sum(dtype=torch.float64)) if sums else 0.0
    if apply and op == 1:
        x.mul_(factor)
    elif apply and op == 2:
        x.div_(factor)
    return before, after


class GTAMethod(MergeMethod):
    """Task vectors → optional sparsification → optional sign consensus → weighted (normalized) sum.

    Subclasses set `sparsify` ("none" | "magnitude" | "random"), `consensus`, and a `Params` dataclass with
    `lambda_`, `normalize` and, as they apply, `trim_scope` (magnitude), `rescale`, `q`, `seed` (random).
    """

    sparsify: ClassVar[str] = "none"
    consensus: ClassVar[bool] = False
    ModelParams = GTAModelParams
    streaming = True
    needs_base = True
    uses_deltas = True

    def __init__(self, params: Any = None):
        super().__init__(params)
        self._global_thr: list[float] | None = None
        self._zero_sign = 1.0  # the elected sign of an exactly-zero sum (zero_sign: majority sets it in prepare)

    def check_settings(self, shared_scopes, model_scopes) -> None:
        """A model-wide trim (trim_scope global) ranks each model's whole task vector with one density: its
        density and weight cannot vary per tensor."""
        if self.sparsify != "magnitude" or getattr(self.params, "trim_scope", "tensor") != "global":
            return
        for i, scopes in enumerate(model_scopes):
            for scope in scopes:
                bad = [k for k in ("density", "weight") if k in scope and not is_scalar(scope[k])]
                if bad:
                    raise UserError(
                        f"models[{i}]: {', '.join(bad)} given per layer or per tensor, but trim_scope=global ranks "
                        "the whole model with one density per model; give one value, or use trim_scope=tensor."
                    )

    @property
    def global_thresholds(self) -> list[float] | None:
        """Per model, the magnitude threshold of a global trim (after `prepare`; None in tensor scope)."""
        return self._global_thr

    # -- whole-model statistics (TIES with trim_scope=global, zero_sign=majority) -----------------------
    def prepare(self, inputs: MergeInputs, names: Sequence[str] | None = None) -> None:
        """Global thresholds and the majority sign, streamed over the model (or over `names` only: AdaMerging++
        leaves its per-task heads out)."""
        if self.sparsify != "magnitude" or getattr(self.params, "trim_scope", "tensor") != "global":
            return
        if names is None:
            names = [n for n, leaf in inputs.base.items() if leaf.dtype.is_floating_point]
        dens = [p.density for p in inputs.model_params]
        total = sum(inputs.base[n].numel for n in names)
        # the official rule: keep |τ| >= kthvalue(|τ|, N − ⌊d·N⌋), the (⌊d·N⌋ + 1)-th largest, ties included. A
        # missed bracket costs another pass over the model: bracket 4x wider than for one tensor (the counts are
        # histograms of bit patterns, so a wider bracket costs almost nothing)
        sels = {
            t: KthLargest(total, min(int(d * total) + 1, total), z=24.0) for t, d in enumerate(dens) if d < 1 and total
        }

        def sample(job, start, base, chunks):
            for t, sel in sels.items():
                sel.add_sample(chunks[t].abs(), 1.0 / job.sample_rate)

        def count(job, start, base, chunks):
            for t, sel in todo.items():
                sel.count_abs(chunks[t])

        if sels:
            inputs.scan(sample, kind=SAMPLE, names=names)
            for sel in sels.values():
                sel.bracket()
            todo = dict(sels)
            while todo:
                for sel in todo.values():
                    sel.begin_count()
                inputs.scan(count, kind=FULL, names=names)
                todo = {t: s for t, s in todo.items() if not s.resolve()}
        self._global_thr = [sels[t].threshold if t in sels else 0.0 for t in range(len(dens))]
        if getattr(self.params, "zero_sign", "plus") == "majority":
            self._zero_sign = self._majority_sign(inputs, names)

    def _majority_sign(self, inputs: MergeInputs, names: Sequence[str]) -> float:
        """sign(Σ over every parameter of sign(Σ_t w_t τ̂_t)): the official code's sign for zero sums (its
        "majority" rule; a model-wide tie counts as −1, as the official selection `τ < 0` then applies)."""
        weights = [p.weight for p in inputs.model_params]
        total = [0.0]

        def add(job, start, base, chunks):
            xs = [
                hardshrink_at_least(x, th).mul_(w) for x, th, w in zip(chunks, self._global_thr, weights, strict=True)
            ]
            S = xs[0]
            for x in xs[1:]:
                S.add_(x)
            total[0] += float(torch.sign(S).sum(dtype=torch.float64))

        inputs.scan(add, kind=FULL, names=names)
        return 1.0 if total[0] > 0 else -1.0

    # -- per-tensor statistics ------------------------------------------------------------------------
    def raw_ok(self, job: TensorJob, kind: str) -> bool:
        """Raw task vectors go to the fused loops: the threshold counts of a tensor-scope trim (`fused.band`), and
        the merge of a trim or a sign election without a random drop (`fused.gta_combine`)."""
        if not fused.available() or self.sparsify not in ("none", "magnitude"):
            return False
        if kind == FULL:
            return self.sparsify == "magnitude" and self._global_thr is None
        return self.consensus or self.sparsify != "none"

    def next_pass(self, job: TensorJob, index: int) -> str | None:
        dens = [getattr(p, "density", 1.0) for p in job.model_params]
        if self.sparsify == "none" or all(d >= 1 for d in dens):
            return None
        if self.sparsify == "random":  # the L1 rescale needs whole-tensor norms: in memory unless chunked
            return FULL if index == 0 and self.at(job).rescale == "l1" and job.chunked else None
        if self.sparsify != "magnitude" or self._global_thr is not None or not job.chunked:
            return None  # global thresholds are known; a single chunk is selected in memory
        sels: dict[int, KthLargest] = job.state.setdefault("sel", {})
        if index == 0:
            n = job.numel
            sels.update({t: KthLargest(n, max(1, int(d * n))) for t, d in enumerate(dens) if d < 1})
            return SAMPLE
        if index == 1:
            for sel in sels.values():
                sel.bracket()
                sel.begin_count()
            return FULL
        pending = [s for s in sels.values() if s.threshold is None and not s.resolve()]
        for sel in pending:
            sel.begin_count()
        return FULL if pending else None

    def observe(self, job, pass_index, start, base, tensors) -> None:
        if self.sparsify == "random":  # L1 norms of τ_t before and after the drop
            return self._observe_l1(job, start, tensors)
        sels: dict[int, KthLargest] = job.state["sel"]
        for t, sel in sels.items():
            if pass_index == 0:
                sel.add_sample(tensors[t].abs(), 1.0 / job.sample_rate)
            elif sel.threshold is None:
                sel.count_abs(tensors[t])

    def _observe_l1(self, job: TensorJob, start: int, tensors) -> None:
        before = job.state.setdefault("l1_before", [0.0] * len(tensors))
        after = job.state.setdefault("l1_after", [0.0] * len(tensors))
        for t, (tau, p) in enumerate(zip(tensors, job.model_params, strict=True)):
            if p.density < 1:
                b, a = dare_drop(tau, self._generator(job, t, start), p.density, apply=False)
                before[t] += b
                after[t] += a

    def _generator(self, job: TensorJob, t: int, start: int) -> np.random.SFC64:
        """Model t's mask stream for this tensor, positioned at `start`: chunks of a pass come in order, so
        one stream per model is kept and restarted whenever a pass begins at element 0."""
        key = ("gen", t)
        if start == 0 or key not in job.state:
            job.state[key] = dare_generator(self.at(job).seed, job.name, t)
        return job.state[key]

    # -- merge -----------------------------------------------------------------------------------------
    def _threshold(self, job: TensorJob, t: int, tau: torch.Tensor) -> float:
        """TIES: keep |τ_t| >= this (0 keeps everything). In tensor scope exactly k = floor(d·n) entries are kept:
        when more than k lie at or above the threshold (tied magnitudes, common in bfloat16 deltas), the tied
        entries past the first k − #{|τ| > thr} in index order are dropped (`_drop_excess_ties`)."""
        d = job.model_params[t].density
        if self.sparsify != "magnitude" or d >= 1:
            return 0.0
        if self._global_thr is not None:
            return self._global_thr[t]
        k = max(1, int(d * job.numel))
        sel = job.state["sel"][t] if job.chunked else select_kth(tau, k, absolute=True)
        if ("ties_kept", t) not in job.state:  # how many tied entries may still be kept (None: all of them)
            excess = sel.count_ge - k
            job.state[("ties_kept", t)] = sel.count_eq - excess if excess > 0 else None
        return sel.threshold

    def _drop_excess_ties(self, job: TensorJob, t: int, tau: torch.Tensor, thr: float) -> None:
        """Zero the entries of this chunk tied at `thr` beyond the ones still to keep (chunks come in order)."""
        left = job.state.get(("ties_kept", t))
        if left is None or thr <= 0:
            return
        tied = torch.nonzero(tau.abs() == thr).reshape(-1)
        if tied.numel() > left:
            tau[tied[left:]] = 0.0
        job.state[("ties_kept", t)] = max(left - tied.numel(), 0)

    def _trim_threshold(self, job: TensorJob, t: int, tau: torch.Tensor) -> float:
        """The threshold, with the chunk's excess ties already dropped."""
        thr = self._threshold(job, t, tau)
        self._drop_excess_ties(job, t, tau, thr)
        return thr

    def _sparsified(self, job: TensorJob, t: int, start: int, tau: torch.Tensor) -> torch.Tensor:
        if self.sparsify == "none":
            return tau
        d = job.model_params[t].density
        if d >= 1:
            return tau
        if self.sparsify == "magnitude":
            return hardshrink_at_least(tau, self._trim_threshold(job, t, tau))
        g = self._generator(job, t, start)
        rescale = self.at(job).rescale
        if rescale == "l1" and not job.chunked:  # drop, then scale by the norms just measured
            before, after = dare_drop(tau, g, d, apply=True)
            if before >= _L1_EPS and after >= _L1_EPS:  # mergekit leaves near-zero tensors unscaled
                tau.mul_(before / after)
            return tau
        op, factor = 0, 1.0
        if rescale == "l1":  # whole-tensor norms from the statistics pass
            before, after = job.state["l1_before"][t], job.state["l1_after"][t]
            if before >= _L1_EPS and after >= _L1_EPS:
                op, factor = 1, before / after
        elif rescale in ("keep_rate", "q"):
            op, factor = 2, d if rescale == "keep_rate" else self.at(job).q
        dare_drop(tau, g, d, apply=True, sums=False, op=op, factor=factor)
        return tau

    def _weighted(self, job: TensorJob, start: int, tensors) -> list[torch.Tensor]:
        """x_t = w_t · sparsify(τ_t), in place on the chunks."""
        xs = []
        for t, (tau, p) in enumerate(zip(tensors, job.model_params, strict=True)):
            x = self._sparsified(job, t, start, tau)
            xs.append(x.mul_(p.weight) if p.weight != 1 else x)
        return xs

    def merge_chunk(self, job, start, base, tensors) -> torch.Tensor:
        weights = [p.weight for p in job.model_params]
        if not self.raw_ok(job, MERGE):  # (raw chunks only come where it allows them)
            tensors = fused.tensors(tensors)
        if fused.available() and (self.consensus or self.sparsify != "none"):  # one pass (merging/fused/); a
            # plain weighted sum (task arithmetic) is as fast in torch's vectorised ops
            budgets = None
            if self.sparsify == "magnitude":  # the trim (and its excess ties) happens in the loop
                thr = [self._threshold(job, t, tau) for t, tau in enumerate(tensors)]  # (a streamed tensor's: no tau)
                budgets = [job.state.get(("ties_kept", t)) if thr[t] > 0 else None for t in range(len(tensors))]
                xs = tensors
            else:
                thr = [0.0] * len(tensors)
                xs = [self._sparsified(job, t, start, tau) for t, tau in enumerate(tensors)]
            out = fused.gta_combine(
                base,
                xs,
                thr,
                weights,
                consensus=self.consensus,
                normalize=self.at(job).normalize,
                lam=self.at(job).lambda_,
                zero_sign=self._zero_sign,
                tie_budgets=budgets,
            )
            for t, b in enumerate(budgets or ()):
                if b is not None:
                    job.state[("ties_kept", t)] = b
            return out
        return combine(
            base,
            self._weighted(job, start, tensors),
            weights,
            consensus=self.consensus,
            normalize=self.at(job).normalize,
            lam=self.at(job).lambda_,
            zero_sign=self._zero_sign,
        )

    def components(self, job: TensorJob, start: int, tensors) -> list[torch.Tensor]:
        """Per model, what it contributes to the consensus merge: x_t = w_t · sparsify(τ_t) where its sign agrees
        with the elected sign, else 0 (their plain sum is TIES's "dis-sum"). AdaMerging++ learns coefficients
        over these. Modifies the chunks."""
        xs = self._weighted(job, start, tensors)
        return agreeing(xs, elected_sign(xs, self._zero_sign))
