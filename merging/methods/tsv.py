"""TSV-M (Task Singular Vectors: Merging) — Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
Model Merging", CVPR 2025, https://arxiv.org/abs/2412.00081.

Per matrix (2-D tensor), with the T task vectors τ_t (each scaled by its model's weight) and r = min(m, n):

    τ_t = U_t S_t V_tᵀ,  keep each task's k = ⌊r / T⌋ leading singular triplets
    U = [U_1[:, :k] … U_T[:, :k]],  S = diag(S_1[:k] … S_T[:k]),  V = [V_1[:, :k] … V_T[:, :k]]
    U⊥ = polar(U), V⊥ = polar(V)          (the closest orthonormal bases: decorrelates the tasks' subspaces)
    θ = θ_0 + α · U⊥ S V⊥ᵀ

Other tensors (and matrices matched by `exclude`): θ = θ_0 + α · mean_t τ_t, as the official code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merging.base import METHODS
from merging.methods._svd import MatrixMethod, polar, svd
from peft_lab.params import Checked, param


@dataclass(frozen=True)
class TsvParams(Checked):
    """`alpha`: the scale of the merged task vector; `exclude`: tensor name patterns averaged, not decomposed."""

    alpha: float = param(1.0, within="[0, inf)")
    exclude: tuple[str, ...] = param((), aliases={None: ()})


def tsv_merge(taus: list[torch.Tensor]) -> torch.Tensor:
    """The TSV-M merge of one matrix's task vectors (no α)."""
    T = len(taus)
    k = min(taus[0].shape) // T
    if k == 0:  # fewer singular directions than tasks: the official code keeps none of them
        return torch.zeros_like(taus[0])
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = svd(tau)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    return polar(torch.cat(us, dim=1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vhs, dim=0))


@METHODS.register("tsv")
class Tsv(MatrixMethod):
    name = "tsv"
    Params = TsvParams

    def merge_matrix(self, taus, params):
        return tsv_merge(taus)
