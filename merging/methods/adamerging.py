"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
https://arxiv.org/abs/2310.02575), task-wise and layer-wise, and AdaMerging++ (on TIES-processed vectors).

    θ^l(λ) = θ_0^l + Σ_k clamp(λ_k^l, 0, 1) · τ_k^l        (task-wise: λ_k^l = λ_k for every tensor l)

λ is learned by minimising the Shannon entropy of each task's predictions (its own frozen head on the merged
body) on unlabeled examples of that task, summed over tasks and batches, with Adam; official defaults
(EnnengYang/AdaMerging): λ init 0.3, clamp [0, 1], Adam lr 1e-3, betas (0.9, 0.999), 500 steps, 2 batches of 16
per task per step. The merged parameters are formed functionally every step (`torch.func.functional_call`), so
memory is one model plus the task vectors, never one model per task. AdaMerging++ replaces τ_k by its TIES
version: global top-`density` trim per task, elected sign ("mass"), sign-agreeing entries kept ("dis-sum").
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.func import functional_call

from merging.base import METHODS, MergeInputs, MergeMethod
from merging.datadriven.fisher import logits_of
from peft_lab.errors import UserError
from peft_lab.tree import matches

__all__ = [
    "AdaMerging",
    "AdaMergingParams",
    "AdaResult",
    "adamerge",
    "merged_params",
    "entropy",
    "ties_thresholds",
    "ties_vectors",
    "ties_tensor",
]

log = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class AdaMergingParams:
    granularity: str = "layer"  # "task": one λ per task; "layer": one λ per (tensor, task)
    init: float = 0.3
    clamp_min: float = 0.0
    clamp_max: float = 1.0
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    steps: int = 500
    batch_size: int = 16
    batches_per_step: int = 2  # per task: the official loop takes 2 batches of 16 per task per step
    ties: bool = False  # AdaMerging++: learn λ over TIES-processed task vectors
    density: float = 0.2  # TIES trim: keep the top 20% magnitudes of each task vector (global over the model)
    seed: int = 0
    heads: tuple[str, ...] = ("classifier.*", "score.*")  # per-task heads: frozen, never merged

    def __post_init__(self):
        if self.granularity not in ("task", "layer"):
            raise UserError(f"adamerging: granularity={self.granularity!r} must be 'task' or 'layer'.")
        if not self.clamp_min <= self.init <= self.clamp_max:
            raise UserError(f"adamerging: init={self.init} must lie in [clamp_min, clamp_max] = [{self.clamp_min}, {self.clamp_max}].")
        if self.steps < 0 or self.batch_size < 1 or self.batches_per_step < 1:
            raise UserError("adamerging: steps must be >= 0, batch_size and batches_per_step >= 1.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"adamerging: lr={self.lr} must be a positive number.")
        if not 0 < self.density <= 1:
            raise UserError(f"adamerging: density={self.density} must be in (0, 1].")
        object.__setattr__(self, "heads", tuple(self.heads or ()))


# ---------------------------------------------------------------------------------------------------------
# The functional merge and the objective
# ---------------------------------------------------------------------------------------------------------
def merged_params(
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    lambdas: torch.Tensor,
    names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """θ^l = θ_0^l + Σ_k λ[l or 0, k] · τ_k^l for each name l (differentiable in `lambdas`).

    Args:
        base: name -> θ_0 tensor.
        deltas: T dicts name -> τ_k (names missing from a dict count as zero).
        lambdas: (1, T) task-wise or (len(names), T) layer-wise coefficients (already clamped).
    Returns:
        name -> merged tensor, for `names` only.
    """
    layerwise = lambdas.shape[0] > 1
    out = {}
    for i, n in enumerate(names):
        row = lambdas[i if layerwise else 0]
        t = base[n]
        for k, d in enumerate(deltas):
            if n in d:
                t = t + row[k] * d[n]
        out[n] = t
    return out


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch: logits (B, C) -> scalar."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


@dataclass
class AdaResult:
    lambdas: torch.Tensor  # (1 | L, T), clamped: the coefficients to merge with
    names: list[str]  # the L merged tensor names (rows of a layer-wise λ)
    losses: list[float] = field(default_factory=list)  # the entropy objective per step
    seconds: float = 0.0

    def to_json(self, tasks: Sequence[str], params: Any = None) -> str:
        """Plot-ready: one row of coefficients per tensor (layer-wise) or a single row (task-wise)."""
        return json.dumps(
            {
                "granularity": "layer" if self.lambdas.shape[0] > 1 else "task",
                "tasks": list(tasks),
                "tensors": self.names if self.lambdas.shape[0] > 1 else ["*"],
                "lambdas": self.lambdas.tolist(),
                "losses": self.losses,
                "params": asdict(params) if params is not None else None,
            },
            indent=1,
        )


def adamerge(
    module: torch.nn.Module,
    base: Mapping[str, torch.Tensor],
    deltas: Sequence[Mapping[str, torch.Tensor]],
    heads: Sequence[Mapping[str, torch.Tensor]],
    samplers: Sequence[Callable[[], Batch]],
    params: AdaMergingParams = AdaMergingParams(),
    *,
    names: Sequence[str] | None = None,
    on_step: Callable[[int, float, torch.Tensor], None] | None = None,
) -> AdaResult:
    """Learn AdaMerging coefficients by entropy minimisation.

    Args:
        module: the model architecture (body + a head); run functionally, its own weights are never read for
            the names given here and never modified.
        base: θ_0 of the merged tensors (name -> tensor).
        deltas: per task, its task vector τ_k (name -> tensor; AdaMerging++ passes TIES-processed vectors).
        heads: per task, its frozen head tensors (name -> tensor), swapped in for that task's forward.
        samplers: per task, a callable returning one batch of unlabeled inputs (keyword tensors for `module`).
        params: hyperparameters (granularity, init, lr, steps, batches_per_step, ...).
        names: the merged tensors (default: the keys of `base`); rows of a layer-wise λ.
    Returns:
        AdaResult with the clamped λ ((1, T) or (L, T)), the names and the per-step losses.
    """
    T = len(deltas)
    if not (len(heads) == len(samplers) == T) or T == 0:
        raise UserError(f"adamerging: {T} task vectors, {len(heads)} heads and {len(samplers)} data sources must match (and be > 0).")
    names = list(names if names is not None else base)
    _check_heads(module, heads, names)
    rows = len(names) if params.granularity == "layer" else 1
    lam = torch.full((rows, T), float(params.init), requires_grad=True)
    opt = torch.optim.Adam([lam], lr=params.lr, betas=(params.beta1, params.beta2), weight_decay=0.0)
    # leaves of the graph: only λ. Frozen tensors are detached so nothing else accumulates a gradient.
    base = {n: base[n].detach() for n in names}
    deltas = [{n: d[n].detach() for n in names if n in d} for d in deltas]
    heads = [{n: h.detach() for n, h in hd.items()} for hd in heads]
    losses = []
    t0 = time.perf_counter()
    was_training = module.training
    module.eval()
    try:
        for step in range(params.steps):
            opt.zero_grad(set_to_none=True)
            merged = merged_params(base, deltas, lam.clamp(params.clamp_min, params.clamp_max), names)
            # Backpropagate batch by batch into a detached copy of the merged tensors (its .grad adds up
            # dL/dθ over tasks and batches), then once through the merge into λ: the same gradient as one
            # backward of the summed loss, but only one batch's activations are alive at a time, so memory does
            # not grow with the number of tasks beyond their task vectors (+ one model-sized gradient).
            leaf = {n: t.detach().requires_grad_(True) for n, t in merged.items()}
            total = 0.0
            for k in range(T):
                p = {**leaf, **heads[k]}
                for _ in range(params.batches_per_step):
                    loss = entropy(logits_of(functional_call(module, p, args=(), kwargs=dict(samplers[k]()))))
                    loss.backward()
                    total += float(loss.detach())
            live = [n for n in names if merged[n].requires_grad and leaf[n].grad is not None]  # tensors some τ touches
            if live:
                torch.autograd.backward([merged[n] for n in live], [leaf[n].grad for n in live])
            del merged, leaf
            opt.step()
            losses.append(total)
            if on_step is not None:
                on_step(step, losses[-1], lam.detach())
    finally:
        module.train(was_training)
    return AdaResult(lam.detach().clamp(params.clamp_min, params.clamp_max), names, losses, time.perf_counter() - t0)


def _check_heads(module: torch.nn.Module, heads: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
    """Every task's head names the same tensors, all of them the module's and none of them merged."""
    known = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    problems = []
    for k, hd in enumerate(heads):
        unknown = sorted(n for n in hd if n not in known)
        if unknown:
            problems.append(f"task {k}'s head names tensors the model does not have: {', '.join(unknown[:5])}")
        if set(hd) != set(heads[0]):
            problems.append(f"task {k}'s head has tensors {sorted(hd)} but task 0's has {sorted(heads[0])}")
        merged = sorted(set(hd) & set(names))
        if merged:
            problems.append(f"task {k}'s head tensors {merged[:5]} are also among the merged tensors")
    missing = [n for n in names if n not in known]
    if missing:
        problems.append(f"the merged tensors {missing[:5]} are not in the model")
    if problems:
        raise UserError("adamerging: the heads do not fit the model: " + "; ".join(problems) + ".")


# ---------------------------------------------------------------------------------------------------------
# TIES processing for AdaMerging++ (official TIES: global trim per task, "mass" sign election, dis-sum)
# ---------------------------------------------------------------------------------------------------------
def ties_thresholds(deltas: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], density: float) -> list[float]:
    """Per task, the magnitude threshold keeping its top `density` fraction over ALL `names` together
    (official `topk_values_mask`: k = N − int(N·density), keep |τ| ≥ kthvalue(|τ|, k))."""
    out = []
    for d in deltas:
        flat = torch.cat([d[n].detach().float().abs().reshape(-1) for n in names if n in d])
        N = flat.numel()
        if density >= 1 or N == 0:
            out.append(0.0)
            continue
        k = max(N - int(N * density), 1)
        out.append(float(flat.kthvalue(k).values))
    return out


def ties_tensor(taus: Sequence[torch.Tensor], thresholds: Sequence[float], majority: float = 1.0) -> list[torch.Tensor]:
    """One tensor's TIES-processed task vectors: trimmed, then only the entries agreeing with the elected sign.

    Args:
        taus: T tensors τ_k of one shape.
        thresholds: T magnitude thresholds (from `ties_thresholds`).
        majority: the global majority sign (+1/−1/0) used where the elected sign is 0.
    Returns:
        T tensors (float32); their plain sum is TIES "dis-sum".
    """
    trimmed = [t.float() * (t.float().abs() >= thr) for t, thr in zip(taus, thresholds, strict=True)]
    gamma = torch.sign(torch.stack(trimmed).sum(0))
    gamma = torch.where(gamma == 0, torch.full_like(gamma, float(majority)), gamma)
    return [torch.where(gamma > 0, t * (t > 0), t * (t < 0)) for t in trimmed]


def ties_vectors(deltas: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], density: float) -> list[dict[str, torch.Tensor]]:
    """TIES-processed task vectors over the whole model (AdaMerging++'s inputs)."""
    thr = ties_thresholds(deltas, names, density)
    majority = _global_majority(deltas, names, thr)
    out: list[dict[str, torch.Tensor]] = [{} for _ in deltas]
    for n in names:
        taus = [d[n] if n in d else torch.zeros_like(next(dd[n] for dd in deltas if n in dd)) for d in deltas]
        for k, v in enumerate(ties_tensor(taus, thr, majority)):
            out[k][n] = v
    return out


def _global_majority(deltas, names, thr) -> float:
    """sign(Σ over all parameters of the elected signs), the official fallback for ties at zero."""
    s = 0.0
    for n in names:
        taus = [d[n].float() * (d[n].float().abs() >= t) for d, t in zip(deltas, thr, strict=True) if n in d]
        if taus:
            s += float(torch.sign(torch.stack(taus).sum(0)).sum())
    return float(math.copysign(1.0, s)) if s != 0 else 0.0


# ---------------------------------------------------------------------------------------------------------
# The merge method
# ---------------------------------------------------------------------------------------------------------
@METHODS.register("adamerging")
class AdaMerging(MergeMethod):
    """Learns λ in `prepare` (from `data`: unlabeled examples of each model's task), then merges per tensor."""

    name = "adamerging"
    Params = AdaMergingParams
    needs_base = True
    uses_deltas = True
    min_models = 1

    def __init__(self, params: AdaMergingParams | None = None):
        super().__init__(params)
        self.result: AdaResult | None = None
        self.row: dict[str, int] = {}
        self.thresholds: list[float] | None = None
        self.majority = 1.0
        self.tasks: list[str] = []

    def is_head(self, name: str) -> bool:
        return bool(self.params.heads) and matches(name, list(self.params.heads))

    def prepare(self, inputs: MergeInputs) -> None:
        p: AdaMergingParams = self.params
        if inputs.base is None:
            raise UserError("adamerging needs a base model (the pretrained model the others were fine-tuned from).")
        self.tasks = list(inputs.labels)
        names = [n for n, leaf in inputs.base.items() if leaf.dtype.is_floating_point and not self.is_head(n)]
        if p.ties:
            deltas = [{n: d[n].dense(torch.float32) for n in names if n in d} for d in inputs.deltas]
            self.thresholds = ties_thresholds(deltas, names, p.density)
            self.majority = _global_majority(deltas, names, self.thresholds)
        if "lambdas" in inputs.extra:  # coefficients given (e.g. learned before): no training
            lam = torch.as_tensor(inputs.extra["lambdas"], dtype=torch.float32)
            self.result = AdaResult(lam.clamp(p.clamp_min, p.clamp_max), names)
        else:
            from merging.datadriven.examples import adamerging_from_data  # lazy: needs transformers/datasets

            self.result = adamerging_from_data(inputs, p, names, self)
        lam = self.result.lambdas
        if lam.shape[1] != len(inputs.deltas) or lam.shape[0] not in (1, len(names)):
            raise UserError(f"adamerging: coefficients of shape {tuple(lam.shape)} do not fit {len(names)} tensors x {len(inputs.deltas)} models.")
        self.row = {n: i for i, n in enumerate(self.result.names)} if lam.shape[0] > 1 else {}
        log.info("adamerging: learned %s coefficients: %s", p.granularity, _summary(lam))

    def task_vectors_for(self, name: str, taus: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The vectors λ multiplies for one tensor: τ_k, or their TIES versions (AdaMerging++)."""
        if not self.params.ties:
            return [t.float() for t in taus]
        thr = self.thresholds if self.thresholds is not None else [0.0] * len(taus)  # not prepared: no trim
        return ties_tensor(taus, thr, self.majority)

    def merge_chunk(self, job, start: int, base: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The executor's streaming form: every operation here is element-wise, so a flat slice merges alone."""
        return self.merge_tensor(job.name, base, tensors, job.model_params)

    def merge_tensor(self, name: str, base: torch.Tensor | None, tensors: Sequence[torch.Tensor], model_params: Sequence[Any]) -> torch.Tensor:
        if self.is_head(name):
            return base.float() + tensors[0].float()  # the first model's head, as Fisher merging does
        if self.result is None:  # not prepared (no data): the coefficients stay at their init, i.e. task arithmetic
            row = torch.full((len(tensors),), float(self.params.init))
        else:
            lam = self.result.lambdas
            row = lam[self.row[name]] if self.row else lam[0]
        out = base.float().clone()
        for c, t in zip(row.tolist(), self.task_vectors_for(name, tensors), strict=True):
            out += c * t
        return out

    def artifacts(self) -> dict[str, str]:
        """Files to write beside the merged model: the learned coefficients (JSON, plot-ready)."""
        if self.result is None:
            return {}
        return {"adamerging_coefficients.json": self.result.to_json(self.tasks, self.params)}


def _summary(lam: torch.Tensor) -> str:
    if lam.shape[0] == 1:
        return ", ".join(f"{x:.3f}" for x in lam[0].tolist())
    m = lam.mean(0)
    return "mean per task " + ", ".join(f"{x:.3f}" for x in m.tolist())
