"""TIES-Merging — Yadav et al., "Resolving Interference When Merging Models", https://arxiv.org/abs/2306.01708.

    trim:   τ̂_t = τ_t where |τ_t| >= (k-th largest |τ_t|), k = max(1, floor(density·n)), else 0
    elect:  γ = sign(Σ_t w_t τ̂_t)   (+1 where the sum is 0)
    merge:  θ = θ_0 + λ · Σ_t [sign(w_t τ̂_t) = γ] w_t τ̂_t / Σ_t [sign(w_t τ̂_t) = γ] w_t   (no division unless
            `normalize`)

`trim_scope: tensor` trims each tensor on its own (mergekit, peft); `global` ranks |τ_t| over the whole
model, as the official code does (computed exactly by streaming statistic passes, never by flattening the
model). With weights 1 and `normalize: true` the merge step is the official "dis-mean"; `normalize: false`
is "dis-sum". Deviations from the official code: the elected sign of an exactly-zero sum is + (mergekit/peft)
instead of the model-wide majority sign, and k is floor(density·n) where the official code keeps one more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from merging.base import METHODS
from merging.methods._gta import TRIM_SCOPES, GTAMethod, check_bool, check_choice, check_finite


@dataclass(frozen=True)
class TiesParams:
    """λ (recipe key `lambda`), `normalize` (disjoint mean), `trim_scope` (`tensor` | `global`). The
    per-model `weight` and `density` may also be given here as defaults for every model."""

    lambda_: float = field(default=1.0, metadata={"key": "lambda"})
    normalize: bool = True
    trim_scope: str = "tensor"

    def __post_init__(self):
        check_finite("lambda", self.lambda_)
        check_bool("normalize", self.normalize)
        check_choice("trim_scope", self.trim_scope, TRIM_SCOPES)


@METHODS.register("ties")
class Ties(GTAMethod):
    name = "ties"
    Params = TiesParams
    sparsify = "magnitude"
    consensus = True
