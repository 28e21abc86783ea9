"""Model Breadcrumbs — Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", https://arxiv.org/abs/2312.06795 (mergekit's `breadcrumbs`).

    τ̂_t = τ_t on the magnitude ranks [g, g + k) of each tensor (from the largest: the g = min(⌊γ·n⌋, n − k)
          largest are outliers, k = ⌊density·n⌋ are kept), else 0          (merging/methods/_sparsifiers.py)
    θ   = θ_0 + λ · Σ_t w_t τ̂_t                (/ Σ_t w_t with `normalize`)
"""

from __future__ import annotations

from merging.base import METHODS
from merging.methods._breadcrumbs import BreadcrumbsParams
from merging.methods._sparsifiers import OutlierModelParams, SparsifyingGTA


@METHODS.register("breadcrumbs")
class Breadcrumbs(SparsifyingGTA):
    name = "breadcrumbs"
    Params = BreadcrumbsParams
    ModelParams = OutlierModelParams
    sparsify = "outliers"
    consensus = False
