"""Multi-SLERP: mergekit's `multislerp`, a barycentric interpolation of N models on the hypersphere
(https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; https://github.com/arcee-ai/mergekit).

Per tensor, with x_i = θ_i − θ_0 when a base is given (else θ_i), weights w_i (divided by Σ w with
`normalize_weights`) and ε = `eps`:

    u_i = x_i / (|x_i| + ε)                                    onto the unit sphere
    m   = Σ w_i u_i,   m ← m / |m|                             the weighted Euclidean mean, projected
    τ   = Σ w_i (u_i − <u_i, m> m)                              tangent vectors at m, averaged
    v   = (cos(|τ| + ε) m + sin(|τ| + ε) / (|τ| + ε) · τ) · Σ w_i |x_i|       back to the sphere, rescaled
    θ   = θ_0 + v  (with a base),   v  (without)

One model is returned as it is. Where |Σ w_i u_i| < ε (antipodal inputs that cancel) two models are averaged
linearly (Σ w_i x_i); with more, mergekit stops with an error, and peft-lab too, unless every x_i is zero (a
tensor no model changed), which merges to Σ w_i x_i = 0 as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from merging.base import FULL, METHODS, MergeMethod, ModelParams
from merging.methods._groups import Grams
from peft_lab.errors import UserError
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class MultiSlerpParams(Checked):
    """`normalize_weights`: divide the weights by their sum; `eps`: the stabilising constant ε."""

    normalize_weights: bool = True
    eps: float = param(1e-8, within="(0, inf)")


@dataclass(frozen=True)
class MultiSlerpModelParams(ModelParams):
    """Per-model `weight` (the barycentric weights)."""

    weight: float = 1.0


def multislerp_coefficients(G: torch.Tensor, w: list[float], eps: float, where: str) -> torch.Tensor:
    """Coefficients c with v = Σ c_i x_i, from the (N, N) Gram matrix of the inputs (float64)."""
    wt = torch.tensor(w, dtype=torch.float64)
    norms = G.diagonal().clamp_min(0).sqrt()
    a = 1.0 / (norms + eps)  # u_i = a_i x_i
    U = G * a[:, None] * a[None, :]  # Gram of the u_i
    m = wt.clone()  # coefficients of Σ w_i u_i over the u_i
    mean_norm = math.sqrt(max(float(m @ U @ m), 0.0))
    if mean_norm < eps:
        if len(w) == 2 or bool((norms == 0).all()):
            return wt
        raise UserError(
            f"multislerp: in tensor {where} the weighted sum of the models' unit vectors is zero (antipodal inputs "
            "whose weights cancel); with more than two models there is no interpolation. Change the weights."
        )
    m = m / mean_norm
    dots = U @ m  # <u_i, m>
    tangent = wt - float(wt @ dots) * m  # Σ w_i (u_i − <u_i, m> m) over the u_i
    tn = math.sqrt(max(float(tangent @ U @ tangent), 0.0)) + eps
    v = (math.cos(tn) * m + (math.sin(tn) / tn) * tangent) * float((norms * wt).sum())
    return v * a


@METHODS.register("multislerp")
class MultiSlerp(MergeMethod):
    name = "multislerp"
    Params = MultiSlerpParams
    ModelParams = MultiSlerpModelParams
    needs_base = False
    optional_base = True
    uses_deltas = False
    min_models = 1
    streaming = True

    def check_models(self, model_params, labels) -> None:
        if self.params.normalize_weights and len(model_params) > 1 and sum(p.weight for p in model_params) == 0:
            raise UserError(
                "multislerp: the model weights sum to 0, so normalize_weights=true cannot divide by them; "
                "change the weights or set normalize_weights=false."
            )

    def _weights(self, job) -> list[float]:
        w = [float(p.weight) for p in job.model_params]
        if self.at(job).normalize_weights:
            total = sum(w)
            w = [x / total for x in w]
        return w

    def next_pass(self, job, index):
        return FULL if index == 0 and job.chunked and len(job.model_params) > 1 else None

    @staticmethod
    def _vectors(base, tensors):
        return list(tensors) if base is None else [x - base for x in tensors]

    def observe(self, job, pass_index, start, base, tensors):
        grams = job.state.get("grams")
        if grams is None:
            grams = job.state["grams"] = Grams(job.shape, "tensor", len(tensors))
        grams.add(start, self._vectors(base, tensors))

    def merge_chunk(self, job, start, base, tensors):
        if len(tensors) == 1:
            return tensors[0]
        xs = self._vectors(base, tensors)
        if not job.chunked:
            self.observe(job, 0, start, None, xs)
        if "coef" not in job.state:
            G = job.state["grams"].G[0]
            job.state["coef"] = multislerp_coefficients(G, self._weights(job), self.at(job).eps, job.name)
        c = job.state["coef"].tolist()
        out = xs[0].mul_(c[0])
        for x, ci in zip(xs[1:], c[1:], strict=True):
            out.add_(x, alpha=ci)
        return out if base is None else out.add_(base)
