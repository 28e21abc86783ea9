"""Iso-CTS (isotropic merging in the common and task-specific subspaces) — Marczak et al., "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025, https://arxiv.org/abs/2502.04959.

Per matrix (2-D tensor) with the task vectors τ_t (each scaled by its model's weight), r = min(m, n), T tasks:

    c = r − T · round((r − ⌊f·r⌋) / T),  d = (r − c) / T       (f = common_space_fraction; d directions per task)
    Σ_t τ_t = U S Vᵀ:  the common subspace U_c = U[:, :c] (with S[:c], V[:, :c])
    each task: τ_t − U_c U_cᵀ τ_t = U'_t S'_t V'_tᵀ, its d leading triplets (the task-specific subspace)
    U = [U'_1[:, :d] … U'_T[:, :d]  U_c],  V likewise,  U⊥ = polar(U), V⊥ = polar(V)
    θ = θ_0 + α · U⊥ (mean of all r kept singular values · I) V⊥ᵀ

Other tensors (and matrices matched by `exclude`): θ = θ_0 + α · mean_t τ_t, as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.base import METHODS
from merging.methods._svd import MatrixMethod, polar, svd
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class IsoCtsParams(Checked):
    """`alpha`: the scale of the merged task vector; `common_space_fraction`: the share of the r singular directions
    given to the common subspace (the rest is split evenly between the tasks); `exclude`: tensor name patterns
    averaged, not decomposed."""

    alpha: float = param(1.0, within="[0, inf)")
    common_space_fraction: float = param(0.8, within="[0, 1]")
    exclude: tuple[str, ...] = param((), aliases={None: ()})


def subspace_sizes(r: int, T: int, fraction: float) -> tuple[int, int]:
    """(common directions c, directions per task d), with c + T·d = r (the official rounding)."""
    common = int(r * fraction)
    specific = round((r - common) / T) * T
    common = r - specific
    return common, (r - common) // T


def iso_cts_merge(taus: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """The Iso-CTS merge of one matrix's task vectors (no α)."""
    T, r = len(taus), min(taus[0].shape)
    total = taus[0].clone()
    for t in taus[1:]:
        total.add_(t)
    common, d = subspace_sizes(r, T, fraction)
    u, s, vh = svd(total)
    uc, sc, vhc = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [], [], []
    if d:
        for tau in taus:
            u_t, s_t, vh_t = svd(tau - uc @ (uc.T @ tau))
            us.append(u_t[:, :d])
            ss.append(s_t[:d])
            vhs.append(vh_t[:d])
    U = polar(torch.cat([*us, uc], dim=1))
    V = polar(torch.cat([*vhs, vhc], dim=0))
    return (U * torch.cat([*ss, sc]).mean()) @ V


@METHODS.register("iso_cts")
class IsoCts(MatrixMethod):
    name = "iso_cts"
    Params = IsoCtsParams

    def merge_matrix(self, taus, params):
        return iso_cts_merge(taus, params.common_space_fraction)
