"""Iso-C (isotropic merging in the common subspace) — Marczak et al., "No Task Left Behind: Isotropic Model Merging
with Common and Task-Specific Subspaces", ICML 2025, https://arxiv.org/abs/2502.04959.

Per matrix (2-D tensor), with the task vectors τ_t (each scaled by its model's weight):

    Σ_t τ_t = U S Vᵀ,    θ = θ_0 + α · U (mean(S) · I) Vᵀ

The summed task matrix keeps its singular directions but its spectrum is flattened to the mean singular value, so
no task's dominant directions drown the others. Other tensors (and matrices matched by `exclude`):
θ = θ_0 + α · mean_t τ_t, as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.base import METHODS
from merging.methods._svd import MatrixMethod, svd
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class IsoCParams(Checked):
    """`alpha`: the scale of the merged task vector (the paper tunes it on validation data, around 1-1.5);
    `exclude`: tensor name patterns averaged, not decomposed."""

    alpha: float = param(1.0, within="[0, inf)")
    exclude: tuple[str, ...] = param((), aliases={None: ()})


def iso_c_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """U · mean(S) · Vᵀ of the summed task matrix (no α)."""
    total = taus[0].clone()
    for t in taus[1:]:
        total.add_(t)
    u, s, vh = svd(total)
    return (u * s.mean()) @ vh


@METHODS.register("iso_c")
class IsoC(MatrixMethod):
    name = "iso_c"
    Params = IsoCParams

    def merge_matrix(self, taus, params):
        return iso_c_merge(taus)
