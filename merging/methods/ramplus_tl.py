"""RAM+ (tensor-local) — https://arxiv.org/abs/2601.13572, as mergekit 0.1.5's `ramplus_tl`.

`ram`, with each model's unique changes scaled up by how much of its change the other models share, counted per
tensor:

    ρ_t = #{entries t changes that another model changes too} / max(#{entries only t changes}, ε)
    λ_t = 1 + r · clamp(ρ_t, 0, α)
    θ = θ_0 + Σ_t [|τ_t| > ε] τ_t · (λ_t [c = 1] + [c > 1] / c)

The counts are whole-tensor statistics (one statistics pass when a tensor is streamed in chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.base import FULL, METHODS, MergeMethod
from merging.methods._ram import ram_combine, ram_counts
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class RamPlusParams(Checked):
    """r: the boost per unit of ρ; alpha: the cap on ρ; epsilon: |τ_t| > epsilon counts as a change."""

    r: float = param(0.1, within="[0, inf)")
    alpha: float = param(0.2, within="[0, inf)")
    epsilon: float = param(1e-5, within="[0, inf)")


@dataclass(frozen=True)
class NoModelParams(Checked):
    """ramplus_tl takes no per-model parameters."""


@METHODS.register("ramplus_tl")
class RamPlusTL(MergeMethod):
    name = "ramplus_tl"
    Params = RamPlusParams
    ModelParams = NoModelParams
    needs_base = True
    uses_deltas = True
    streaming = True

    def next_pass(self, job, index):
        return FULL if index == 0 and job.chunked else None

    def observe(self, job, pass_index, start, base, tensors):
        shared, unique = ram_counts(tensors, self.at(job).epsilon)
        acc = job.state.setdefault("counts", ([0] * len(tensors), [0] * len(tensors)))
        for t in range(len(tensors)):
            acc[0][t] += shared[t]
            acc[1][t] += unique[t]

    def merge_chunk(self, job, start, base, tensors):
        p = self.at(job)
        if not job.chunked:
            self.observe(job, 0, start, base, tensors)
        shared, unique = (torch.tensor(c) for c in job.state["counts"])
        rho = shared / unique.clamp(min=p.epsilon)  # float32, as mergekit computes it
        factors = (1 + p.r * rho.clamp(min=0, max=p.alpha)).tolist()
        return ram_combine(base, tensors, p.epsilon, [torch.tensor(f, dtype=torch.float32) for f in factors])
