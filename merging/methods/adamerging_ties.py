"""AdaMerging++ (https://arxiv.org/abs/2310.02575): AdaMerging's learned coefficients over TIES-processed task
vectors (global top-20% trim per task, elected sign, sign-agreeing entries kept, "dis-sum").

    θ^l = θ_0^l + Σ_k clamp(λ_k^l, 0, 1) · TIES(τ)_k^l

The same code as `adamerging` (merging/methods/adamerging.py) with `ties: true`.
"""

from __future__ import annotations

from dataclasses import dataclass

from merging.base import METHODS
from merging.methods.adamerging import AdaMerging, AdaMergingParams

__all__ = ["AdaMergingTies", "AdaMergingTiesParams"]


@dataclass(frozen=True)
class AdaMergingTiesParams(AdaMergingParams):
    ties: bool = True


@METHODS.register("adamerging_ties")
class AdaMergingTies(AdaMerging):
    name = "adamerging_ties"
    Params = AdaMergingTiesParams
