"""Karcher mean: mergekit's `karcher`, the Riemannian (Fréchet) mean of the models' tensors on the unit sphere,
rescaled by their mean norm — mergekit's reference https://arxiv.org/abs/2603.04972; Karcher, "Riemannian center
of mass and mollifier smoothing", Comm. Pure Appl. Math. 30 (1977), https://doi.org/10.1002/cpa.3160300502.

Per tensor, with the N inputs x_i (the models; a base model is one more input, as in mergekit), weights
α_i = 1/N, u_i = x_i / |x_i| and the inputs with |x_i| > tol:

    m = Σ α'_i u_i / |Σ α'_i u_i|                 (α' = α renormalised over those inputs; u_1 if that sum < tol)
    repeat max_iter times:
        θ_i = arccos <m, u_i>,   τ = Σ_{θ_i >= tol} α'_i θ_i / sin θ_i · (u_i − <m, u_i> m)
        stop if |τ| < tol;   m ← cos|τ| m + sin|τ| τ/|τ|,   m ← m/|m|
    θ = (Σ_i α_i |x_i|) · m

Two inputs give the geodesic midpoint: slerp at t = 1/2, scaled to their mean norm.

Implementation: m and τ always lie in the span of the u_i, so the iteration runs on their coefficients with the
inputs' Gram matrix (float64, from one statistics pass) and the tensor is written once as Σ c_i x_i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from merging.base import FULL, METHODS, MergeMethod
from merging.methods._groups import Grams
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class KarcherParams(Checked):
    """`max_iter`: iterations of the Riemannian gradient step; `tol`: the convergence (and zero-norm) tolerance."""

    max_iter: int = param(10, within="[0, inf)")
    tol: float = param(1e-5, within="(0, inf)")


@dataclass(frozen=True)
class NoModelParams(Checked):
    """karcher takes no per-model parameters (every input has weight 1/N)."""


def _norm(c: torch.Tensor, U: torch.Tensor) -> float:
    return math.sqrt(max(float(c @ U @ c), 0.0))


def karcher_coefficients(G: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Coefficients c with θ = Σ c_i x_i, from the (N, N) Gram matrix of the inputs."""
    n = G.shape[0]
    norms = G.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    U = G * inv[:, None] * inv[None, :]  # Gram of the unit vectors (0 rows for zero inputs)
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros(n, dtype=torch.float64)
    alphas = torch.zeros(n, dtype=torch.float64)
    alphas[valid] = 1.0 / len(valid)
    mean = alphas.clone()
    mean_norm = _norm(mean, U)
    if mean_norm < tol:
        mean = torch.zeros(n, dtype=torch.float64)
        mean[valid[0]] = 1.0
    else:
        mean = mean / mean_norm
    for _ in range(max_iter):
        dots = (U @ mean).clamp(-1.0, 1.0)  # <m, u_i>
        tangent = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            step = float(alphas[i]) * theta / math.sin(theta)
            tangent[i] += step
            tangent -= step * float(dots[i]) * mean
        tn = _norm(tangent, U)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        un = _norm(mean, U)
        if un > tol:
            mean = mean / un
    scale = float(norms.sum()) / n
    return scale * mean * inv


@METHODS.register("karcher")
class Karcher(MergeMethod):
    name = "karcher"
    Params = KarcherParams
    ModelParams = NoModelParams
    needs_base = False
    uses_deltas = False
    base_is_input = True
    min_models = 1
    streaming = True

    def next_pass(self, job, index):
        return FULL if index == 0 and job.chunked and len(job.model_params) > 1 else None

    def observe(self, job, pass_index, start, base, tensors):
        grams = job.state.get("grams")
        if grams is None:
            grams = job.state["grams"] = Grams(job.shape, "tensor", len(tensors))
        grams.add(start, tensors)

    def merge_chunk(self, job, start, base, tensors):
        if len(tensors) == 1:
            return tensors[0]
        if not job.chunked:
            self.observe(job, 0, start, None, tensors)
        if "coef" not in job.state:
            p = self.at(job)
            job.state["coef"] = karcher_coefficients(job.state["grams"].G[0], p.max_iter, p.tol)
        c = job.state["coef"].tolist()
        out = tensors[0].mul_(c[0])
        for x, ci in zip(tensors[1:], c[1:], strict=True):
            out.add_(x, alpha=ci)
        return out
