"""Linear merge (model soup average) — Wortsman et al., "Model soups", https://arxiv.org/abs/2203.05482.

    θ = Σ_i w_i θ_i / Σ_i w_i      (`normalize`, the default)   or   Σ_i w_i θ_i

mergekit's `linear`: the models themselves are averaged (no task vectors), and a `base_model` that is not
listed under `models` is averaged in as one more model (taking the top-level `weight`, default 1).
Weights must be >= 0; to extrapolate or subtract, use task_arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from merging.base import METHODS, MergeMethod, ModelParams
from peft_lab.errors import UserError
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class LinearParams(Checked):
    normalize: bool = True


@dataclass(frozen=True)
class NonNegativeWeight(ModelParams):
    """Per-model `weight` >= 0."""

    weight: float = param(
        1.0,
        within="[0, inf)",
        help="linear and soup average models; to subtract a model's change use task_arithmetic with a negative weight",
    )


def weighted_average(tensors, weights, normalize: bool):
    """Σ_i w_i x_i (/ Σ_i w_i), accumulated in order into the first chunk (which it overwrites)."""
    out = tensors[0] if weights[0] == 1 else tensors[0].mul_(weights[0])
    for x, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(x, alpha=w)
    if normalize:
        out.div_(sum(weights))
    return out


@METHODS.register("linear")
class Linear(MergeMethod):
    name = "linear"
    Params = LinearParams
    ModelParams = NonNegativeWeight
    needs_base = False
    uses_deltas = False
    base_is_input = True
    streaming = True

    def check_models(self, model_params, labels) -> None:
        if self.params.normalize and sum(p.weight for p in model_params) == 0:
            raise UserError(
                "The weights of the models sum to 0, so normalize=true cannot divide by them; give a positive weight."
            )

    def raw_spec(self, job):
        return {"mode": "linear", "weights": [p.weight for p in job.model_params], "normalize": self.at(job).normalize}

    def merge_chunk(self, job, start, base, tensors):
        return weighted_average(tensors, [p.weight for p in job.model_params], self.at(job).normalize)
