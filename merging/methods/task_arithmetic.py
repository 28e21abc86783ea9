"""Task arithmetic — Ilharco et al., "Editing Models with Task Arithmetic", https://arxiv.org/abs/2212.04089.

    θ = θ_0 + λ · Σ_t w_t τ_t,   τ_t = θ_t − θ_0      (divided by Σ_t w_t when `normalize`)

Negative weights subtract a task ("negation"). Same semantics and defaults as mergekit's `task_arithmetic`.
"""

from __future__ import annotations

from dataclasses import dataclass

from merging.base import METHODS
from merging.methods._gta import GTAMethod, WeightParams
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class TaskArithmeticParams(Checked):
    """λ (recipe key `lambda`) scales the summed task vectors; `normalize` divides them by Σ_t w_t."""

    lambda_: float = param(1.0, key="lambda")
    normalize: bool = False


@METHODS.register("task_arithmetic")
class TaskArithmetic(GTAMethod):
    name = "task_arithmetic"
    Params = TaskArithmeticParams
    ModelParams = WeightParams
    sparsify = "none"
    consensus = False

    def raw_spec(self, job):
        return {
            "mode": "task_arithmetic",
            "weights": [p.weight for p in job.model_params],
            "normalize": self.at(job).normalize,
            "lam": self.at(job).lambda_,
        }
