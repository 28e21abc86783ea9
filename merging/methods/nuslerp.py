"""NuSLERP: mergekit's `nuslerp`, spherical interpolation of two models (or of their task vectors) with weights,
whole tensors or row/column vectors (https://github.com/arcee-ai/mergekit; SLERP: Shoemake, SIGGRAPH 1985,
https://doi.org/10.1145/325165.325242).

With the models' weights w_0, w_1, t = w_1 / (w_0 + w_1) (0.5 when |w_0 + w_1| < 1e-6); v_i = θ_i − θ_0 when a base
is given, else θ_i. Per vector (the flattened tensor with `nuslerp_flatten`, else each row along the last dimension,
or each column along the first with `nuslerp_row_wise`):

    c = clamp(<v_0, v_1> / (max(|v_0|, 1e-7) · max(|v_1|, 1e-7)), −1, 1)
    1 − c² <= 1e-16 (colinear):  v = (1 − t) v_0 + t v_1
    else, Ω = arccos c:           v = (sin((1 − t) Ω) v_0 + sin(t Ω) v_1) / sin Ω
    θ = θ_0 + v  (with a base),  v  (without)

Unlike `slerp` the colinearity threshold is float32's, not 0.9995, and the base is optional.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.base import FULL, METHODS, MergeMethod, ModelParams
from merging.methods._groups import Grams, per_element, unit
from peft_lab.params import Checked, param

_NORM_EPS = 1e-7
_COLINEAR_EPS = 1e-8


@dataclass(frozen=True)
class NuSlerpParams(Checked):
    """`nuslerp_flatten`: the whole tensor is one vector (mergekit's default). Otherwise each row along the last
    dimension, or with `nuslerp_row_wise` each column along the first dimension, is interpolated on its own."""

    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False


@dataclass(frozen=True)
class NuSlerpModelParams(ModelParams):
    """Per-model `weight`: t = w_1 / (w_0 + w_1)."""

    weight: float = param(1.0, help="the interpolation factor is the second model's share of the two weights")


def nuslerp_coefficients(G: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) per vector with v = c0·v_0 + c1·v_1, from the (groups, 2, 2) Gram matrices."""
    n0 = G[:, 0, 0].clamp_min(0).sqrt().clamp_min(_NORM_EPS)
    n1 = G[:, 1, 1].clamp_min(0).sqrt().clamp_min(_NORM_EPS)
    cos = (G[:, 0, 1] / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    safe = torch.where(colinear, torch.ones_like(s), s)
    c0 = torch.where(colinear, torch.full_like(s, 1 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(colinear, torch.full_like(s, t), torch.sin(t * theta) / safe)
    return c0, c1


@METHODS.register("nuslerp")
class NuSlerp(MergeMethod):
    name = "nuslerp"
    Params = NuSlerpParams
    ModelParams = NuSlerpModelParams
    needs_base = False
    optional_base = True
    uses_deltas = False
    min_models = max_models = 2
    streaming = True

    def _grouping(self, job) -> str:
        p = self.at(job)
        return "tensor" if p.nuslerp_flatten else "cols" if p.nuslerp_row_wise else "rows"

    @staticmethod
    def _t(job) -> float:
        w0, w1 = (p.weight for p in job.model_params)
        total = w0 + w1
        return 0.5 if abs(total) < 1e-6 else w1 / total

    def chunk_unit(self, job) -> int:
        return unit(job.shape, self._grouping(job))

    def next_pass(self, job, index):
        return FULL if index == 0 and job.chunked else None

    @staticmethod
    def _vectors(base, tensors):
        return list(tensors) if base is None else [x - base for x in tensors]

    def observe(self, job, pass_index, start, base, tensors):
        grams = job.state.get("grams")
        if grams is None:
            grams = job.state["grams"] = Grams(job.shape, self._grouping(job), 2)
        grams.add(start, self._vectors(base, tensors))

    def merge_chunk(self, job, start, base, tensors):
        v0, v1 = self._vectors(base, tensors)
        if not job.chunked:
            self.observe(job, 0, start, None, [v0, v1])
        if "coef" not in job.state:
            job.state["coef"] = nuslerp_coefficients(job.state["grams"].G, self._t(job))
        g = self._grouping(job)
        c0, c1 = (per_element(c, job.shape, g, start, v0.numel()) for c in job.state["coef"])
        out = v0.mul_(c0).add_(v1 * c1)
        return out if base is None else out.add_(base)
