"""Model Breadcrumbs with TIES' sign election — https://arxiv.org/abs/2312.06795 and
https://arxiv.org/abs/2306.01708 (mergekit's `breadcrumbs_ties`).

    τ̂_t as in `breadcrumbs` (magnitude ranks [g, g + k) of each tensor kept), then TIES' elect and disjoint merge:
    γ = sign(Σ_t w_t τ̂_t),  θ = θ_0 + λ · Σ_t [sign(w_t τ̂_t) = γ] w_t τ̂_t   (/ Σ agreeing w_t with `normalize`)
"""

from __future__ import annotations

from merging.base import METHODS
from merging.methods._breadcrumbs import BreadcrumbsParams
from merging.methods._sparsifiers import OutlierModelParams, SparsifyingGTA


@METHODS.register("breadcrumbs_ties")
class BreadcrumbsTies(SparsifyingGTA):
    name = "breadcrumbs_ties"
    Params = BreadcrumbsParams
    ModelParams = OutlierModelParams
    sparsify = "outliers"
    consensus = True
