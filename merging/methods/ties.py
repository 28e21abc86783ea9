"""TIES-Merging — Yadav et al., "Resolving Interference When Merging Models", https://arxiv.org/abs/2306.01708.

    trim:   τ̂_t = τ_t where |τ_t| >= (k-th largest |τ_t|), k = max(1, floor(density·n)), else 0
    elect:  γ = sign(Σ_t w_t τ̂_t)   (+1 where the sum is 0)
    merge:  θ = θ_0 + λ · Σ_t [sign(w_t τ̂_t) = γ] w_t τ̂_t / Σ_t [sign(w_t τ̂_t) = γ] w_t   (no division unless
            `normalize`)

`trim_scope: tensor` trims each tensor on its own (mergekit, peft) and keeps exactly k = max(1, floor(density·n))
entries: where magnitudes tie at the threshold (common in bfloat16 deltas) the tied entries with the lowest
indices are kept (mergekit keeps k too, choosing among ties in the order of torch's unstable argsort). `global`
ranks |τ_t| over the whole model with the official code's rule: keep |τ_t| >= its (floor(density·N) + 1)-th
largest magnitude, ties included (computed exactly by streaming statistic passes, never by flattening the
model). `zero_sign` is the elected sign where the weighted sum is exactly 0: `plus` (mergekit, peft) or
`majority` (the official code: the sign of the sum of all elected signs over the model; needs `global`). With
weights 1 and `normalize: true` the merge step is the official "dis-mean"; `normalize: false` is "dis-sum"; so
`trim_scope: global, zero_sign: majority` is the official TIES.
"""

from __future__ import annotations

from dataclasses import dataclass

from merging.base import METHODS
from merging.methods._gta import TRIM_SCOPES, GTAMethod
from peft_lab.errors import UserError
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class TiesParams(Checked):
    """λ (recipe key `lambda`), `normalize` (disjoint mean), `trim_scope` (`tensor` | `global`), `zero_sign`
    (`plus` | `majority`). The per-model `weight` and `density` may also be given here as defaults for every model."""

    lambda_: float = param(1.0, key="lambda")
    normalize: bool = True
    trim_scope: str = param("tensor", choices=TRIM_SCOPES, static=True)
    zero_sign: str = param("plus", choices=("plus", "majority"), static=True)

    def __post_init__(self):
        super().__post_init__()
        if self.zero_sign == "majority" and self.trim_scope != "global":
            raise UserError(
                "Parameter zero_sign=majority is the official TIES rule, a model-wide statistic computed with "
                "trim_scope=global; set trim_scope=global too (or zero_sign=plus, mergekit's rule)."
            )


@METHODS.register("ties")
class Ties(GTAMethod):
    name = "ties"
    Params = TiesParams
    sparsify = "magnitude"
    consensus = True
