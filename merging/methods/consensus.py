"""Consensus merging with TALL masks — Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024, https://arxiv.org/abs/2405.07813 (official code: nik-dim/tall_masks).

Per element, with the task vectors τ_t and the multi-task vector τ_MTL (task arithmetic's Σ_t w_t τ_t, or TIES'
merged task vector with `aggregate: ties`):

    TALL mask of task t:   m_t = [ |τ_t| > λ_t · |τ_MTL − τ_t| ]        (task t's information survives in τ_MTL)
    consensus mask:        c   = [ Σ_t m_t >= k ]                         (k = 2 drops "selfish" weights, used by one
                                                                            task only, and "catastrophic" ones, by none)
    θ = θ_0 + α · c ⊙ τ_MTL

`aggregate: ties` is the official code's TIES variant: the global top-`density` trim of each task vector, the
model-wide majority sign, and the disjoint sum (merging/methods/ties.py with trim_scope global, zero_sign
majority, normalize false). The official code picks each task's λ_t on its validation data from 0.2-0.6; here it is
the per-model parameter `lambda`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from merging.base import METHODS, MergeMethod, TensorJob
from merging.methods._gta import GTAModelParams
from merging.methods.task_arithmetic import TaskArithmetic, TaskArithmeticParams
from merging.methods.ties import Ties, TiesParams
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class ConsensusParams(Checked):
    """`aggregate`: the multi-task vector (`task_arithmetic` or `ties`); `k`: the number of tasks an entry must
    matter to; `alpha`: the scale of the masked multi-task vector."""

    aggregate: str = param("task_arithmetic", choices=("task_arithmetic", "ties"), static=True)
    k: int = param(2, within="[0, inf)", help="0 keeps every entry (plain task arithmetic or TIES)")
    alpha: float = param(1.0, within="[0, inf)")


@dataclass(frozen=True)
class ConsensusModelParams(GTAModelParams):
    """Per-model `weight` (in the multi-task vector), `density` (the TIES trim with `aggregate: ties`) and `lambda`
    (the TALL mask's λ_t)."""

    lambda_: float = param(0.6, key="lambda", within="[0, inf)", help="the TALL mask's threshold factor")


@METHODS.register("consensus")
class Consensus(MergeMethod):
    name = "consensus"
    Params = ConsensusParams
    ModelParams = ConsensusModelParams
    needs_base = True
    uses_deltas = True
    streaming = True

    def __init__(self, params=None):
        super().__init__(params)
        if self.params.aggregate == "ties":
            self.inner = Ties(TiesParams(lambda_=1.0, normalize=False, trim_scope="global", zero_sign="majority"))
        else:
            self.inner = TaskArithmetic(TaskArithmeticParams(lambda_=1.0, normalize=False))

    def check_settings(self, shared_scopes, model_scopes) -> None:
        self.inner.check_settings(shared_scopes, model_scopes)

    def prepare(self, inputs) -> None:
        self.inner.prepare(inputs)

    @staticmethod
    def _inner_job(job: TensorJob) -> TensorJob:
        """The aggregator's view of the tensor: its own parameters, its own scratch space."""
        if "inner" not in job.state:
            job.state["inner"] = dataclasses.replace(job, params=None, state={})
        return job.state["inner"]

    def next_pass(self, job, index):
        return self.inner.next_pass(self._inner_job(job), index)

    def observe(self, job, pass_index, start, base, tensors):
        self.inner.observe(self._inner_job(job), pass_index, start, base, tensors)

    def merge_chunk(self, job, start, base, tensors):
        p = self.at(job)
        mtl = self.inner.merge_chunk(self._inner_job(job), start, None, [t.clone() for t in tensors])
        count = torch.zeros(mtl.shape, dtype=torch.int32)
        for tau, mp in zip(tensors, job.model_params, strict=True):
            count += tau.abs() > (mtl - tau).abs_().mul_(mp.lambda_)
        return base.add_(mtl.mul_(count >= p.k), alpha=p.alpha)
